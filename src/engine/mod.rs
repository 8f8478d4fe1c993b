//! The engine: where a channel's numbering and history live, and where its publications come
//! from. The owner shard of a channel asks its engine to number a message and keep it; the
//! engine hands back what to deliver as [`Event`]s, which the owner fans out to its
//! subscribers and to the other shards that want the channel.
//!
//! [`Memory`] is the single-node engine: everything in the owner shard's memory, answered at
//! once. [`Redis`] (several nodes as one server, docs/CLUSTER.md) goes beside it: there the
//! publications come from Redis PUB/SUB, published on any node, which is why delivery is an
//! event and not the return value of `publish`; its numbering and history reads take a round
//! trip, so they may answer later, as an [`Event`] carrying the caller's token, and what its
//! threads hear comes in through [`Engine::heard`]. `tests.rs` holds the contract of the
//! engines that answer at once; centrifuge's `Broker` interface (`broker.go`, with
//! `broker_memory.go` and `broker_redis.go` side by side) is the model.
//!
//! What stays with the owner, whatever the engine: the queue of messages held behind
//! uncommitted decisions (the store is the owner's), and which shards of this node want a
//! channel (the mesh is the node's).

pub mod history;
mod memory;
mod redis;
#[cfg(test)]
mod tests;

use std::rc::Rc;
use std::time::Instant;

use crate::dialect::{Change, Kind, Member, Publication};
pub use history::Found;
pub(crate) use memory::shrink_if_sparse;
pub use memory::Memory;
pub use redis::{Input, Redis};

/// When a message reached the owner.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// For the fan-out latency figures.
    pub t0: Instant,
    /// Milliseconds on the shard clock, for the history's age limit.
    pub at_ms: u64,
}

/// A publish's seq: now, or later as [`Event::Numbered`] with the publish's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbered {
    /// This seq.
    Now(u64),
    /// Answered later.
    Later,
}

/// Where a message to a user went ([`Engine::publish_to_user`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Every node was told: this many heard it (this one too).
    Told(usize),
    /// The user is connected nowhere: kept, and this many older ones dropped for room.
    Kept(u64),
    /// The user is connected nowhere, and too much is kept already.
    Refused,
}

/// What an engine hands back to the owner.
#[derive(Debug)]
pub enum Event {
    /// A publish answered [`Numbered::Later`]: its seq, or why it was not published.
    Numbered {
        /// The publish's token.
        token: u64,
        /// The seq.
        result: Result<u64, String>,
        /// Numbered by this node alone, under the channel's local epoch (its Redis is
        /// down): delivered to this node's subscribers only.
        local: bool,
        /// A message to a user ([`Engine::publish_to_user`]): whom it reached, or that it
        /// was kept.
        reach: Option<Reach>,
    },
    /// Every node's sessions per tenant ([`Engine::census`]).
    Census {
        /// Nodes alive (this one among them).
        nodes: u32,
        /// Per tenant (as [`crate::quota::Tenant::name`] writes it): this node's sessions,
        /// and the cluster's.
        counts: Vec<(String, u32, u32)>,
    },
    /// What is kept for a user ([`Engine::user_online`], [`Engine::kept`]): the entries
    /// as stored (`seq\ncreated\nexpires\norg\nchannel\ndata`), or why not.
    Kept {
        /// The request's token.
        token: u64,
        /// The entries.
        result: Result<Vec<Vec<u8>>, String>,
    },
    /// A Socket.IO connection's record taken ([`Engine::take_record`]), or why not.
    Record {
        /// The request's token.
        token: u64,
        /// The record, if one was there.
        result: Result<Option<Vec<u8>>, String>,
    },
    /// A history read answered `None`: what was found, or why nothing could be read.
    History {
        /// The read's token.
        token: u64,
        /// The history.
        found: Result<Found, String>,
    },
    /// The node now hears every message published on `channel` (see [`Engine::want`]).
    Subscribed {
        /// The channel.
        channel: Rc<str>,
    },
    /// Seqs `from..=to` of `channel` were published but cannot be delivered: its subscribers
    /// must be told.
    Gap {
        /// The channel.
        channel: Rc<str>,
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// `channel`'s numbering started again (its state in Redis was lost): its subscribers'
    /// positions mean nothing now.
    Reset {
        /// The channel.
        channel: Rc<str>,
        /// Its new epoch.
        epoch: Box<str>,
    },
    /// The publish of `token` must be numbered by `channel`'s owner shard (the node cannot
    /// reach Redis): send it there, and the answer it gets to its publisher.
    Reroute {
        /// The publish's token.
        token: u64,
        /// The channel.
        channel: Rc<str>,
        /// The message.
        data: Rc<[u8]>,
    },
    /// A member connected to another node joined `channel`, left it (or its node stopped
    /// refreshing it) or changed its status: `channel`'s presence members must be told.
    PresenceChange {
        /// The channel.
        channel: Rc<str>,
        /// What happened.
        change: Change,
        /// Who.
        member: Member,
    },
    /// The answer to [`Engine::presence_page`] of `token`: (members in all, distinct users,
    /// the page, the cursor of the next page if there is one), or why not.
    PresencePage {
        /// The request's token.
        token: u64,
        /// The page.
        result: Result<PresencePage, String>,
    },
    /// The answer to [`Engine::claim`] of `token`: whether the claimer holds the session now
    /// (a holder on another node was told to go), or why it could not be asked.
    Claimed {
        /// The request's token.
        token: u64,
        /// Granted, or refused (policy "reject").
        result: Result<bool, String>,
    },
    /// Session locks (key, holder) that [`Engine::refresh_locks`] found held by someone
    /// else: their holders here must go.
    LocksLost(Vec<(String, String)>),
    /// The node hears Redis again after it could not: kill switches and presence changes
    /// may have been missed meanwhile, so what the shard keeps must be refreshed now (a lock
    /// that someone else took meanwhile comes back as [`Event::LocksLost`]).
    Reconnected,
    /// Connection `conn` of this shard must give up session `key`: a newer connection, on
    /// another node or this one, took it at `at_ms` (unix ms).
    Kill {
        /// The connection.
        conn: u64,
        /// Its session key.
        key: String,
        /// When it was taken.
        at_ms: u64,
    },
    /// Another node asks this one to do its part of a server API request (to shard 0).
    Control(crate::cluster::control::Control),
    /// How many other nodes heard the control message of [`Engine::tell_nodes`]'s `token`
    /// (`None`: it could not be sent).
    Told {
        /// The request's token.
        token: u64,
        /// The other nodes that heard it.
        nodes: Option<usize>,
    },
    /// Deliver `publication` to `channel`'s subscribers (events of a channel come in seq
    /// order).
    Publication {
        /// The channel.
        channel: Rc<str>,
        /// The numbered message.
        publication: Publication,
        /// When it reached the owner.
        at: Arrival,
    },
}

/// A page of a channel's members across the cluster: (members in all, distinct users, the
/// page, the cursor of the next page if there is one).
pub type PresencePage = (usize, usize, Vec<Member>, Option<Box<str>>);

/// Numbering, history and delivery of the channels one shard owns; in a cluster, their
/// presence and the exclusive sessions across nodes too (on one node those are the shard's
/// own: the methods for them do nothing, and say so).
pub trait Engine {
    /// Number `data` as `channel`'s next message, keep it in the history and deliver it.
    /// An answer that comes later is an [`Event::Numbered`] with `token`. `key` is the
    /// publish's idempotency key, given only to an engine that numbers elsewhere (a retry
    /// of it, from any node, gets the original seq and delivers nothing); where numbering is
    /// local the owner remembers keys itself.
    fn publish(
        &mut self,
        channel: &str,
        kind: Kind,
        data: Rc<[u8]>,
        key: Option<&str>,
        at: Arrival,
        token: u64,
    ) -> Numbered;

    /// Number a decision already committed (in a cluster a decision is stored first) under
    /// its decision id `id`: a second publish of it, from any node, gets the same seq and
    /// delivers nothing. Answered as [`Engine::publish`] is. Only for an engine that does
    /// not number locally: one node numbers a decision before its commit.
    fn publish_stored(&mut self, channel: &str, id: &str, data: Rc<[u8]>, token: u64) -> Numbered;

    /// Whether numbering is answered at once, so that [`Engine::reserve`], [`Engine::keep`]
    /// and [`Engine::give_back`] may be used (decisions held behind their commit).
    fn numbers_locally(&self) -> bool {
        true
    }

    /// Take `channel`'s next seq for a message that is kept later with [`Engine::keep`] or
    /// given back (a decision waiting for its commit, or a message queued behind one).
    /// `stored`: the message goes to the durable store, whose highest seq the numbering
    /// continues from when the channel is made again.
    fn reserve(&mut self, channel: &str, stored: bool) -> u64;

    /// Keep and deliver a message numbered by [`Engine::reserve`] (in seq order).
    fn keep(&mut self, channel: &str, publication: Publication, at: Arrival);

    /// A reserved seq will not be used: if nothing was numbered after it, the next message
    /// may have it, so the sequence has no hole.
    fn give_back(&mut self, channel: &str, seq: u64);

    /// What `channel` keeps after seq `after`, at `now_ms` on the shard clock; `None`: the
    /// answer comes later as an [`Event::History`] with `token`.
    fn history(&mut self, channel: &str, after: u64, now_ms: u64, token: u64) -> Option<Found>;

    /// The node wants `channel` (some shard of it has subscribers) or, with `on` false, no
    /// longer does. True when the node hears every message published on it from now on;
    /// false: an [`Event::Subscribed`] says when.
    fn want(&mut self, channel: &str, on: bool) -> bool {
        let _ = (channel, on);
        true
    }

    /// Take what the engine's threads report (an engine without threads hears nothing).
    fn heard(&mut self, input: Input, at: Arrival) {
        let _ = (input, at);
    }

    /// `channel`'s publishes must go to its owner shard, as on one node: the node cannot
    /// hear its Redis, and the owner may have to number them itself.
    fn degraded(&self, channel: &str) -> bool {
        let _ = channel;
        false
    }

    /// The node's members of `channel`: `set` are there (new, changed, or still there: a
    /// refresh), `removed` are gone. Told to the other nodes.
    fn presence(&mut self, channel: &str, set: &[&Member], removed: &[&str]) {
        let _ = (channel, set, removed);
    }

    /// Ask for a page of `channel`'s members on every node after cursor `after` (`""`: the
    /// first), at most `max`: true if asked (answered as [`Event::PresencePage`] with
    /// `token`); false: the node's own members are all there are.
    fn presence_page(&mut self, channel: &str, after: &str, max: usize, token: u64) -> bool {
        let _ = (channel, after, max, token);
        false
    }

    /// Connection `holder` (its id) claims exclusive session `key` on every node, replacing
    /// a holder or (`replace` false) not: true if asked (answered as [`Event::Claimed`] with
    /// `token`); false: the node's own holders are all there are.
    fn claim(&mut self, key: &str, holder: &str, replace: bool, token: u64) -> bool {
        let _ = (key, holder, replace, token);
        false
    }

    /// Connection `holder` has let session `key` go.
    fn release(&mut self, key: &str, holder: &str) {
        let _ = (key, holder);
    }

    /// Keep the locks (key, holder) of the sessions this shard has granted; the lost ones
    /// come back as [`Event::LocksLost`].
    fn refresh_locks(&mut self, locks: Vec<(String, String)>) {
        let _ = locks;
    }

    /// Number a message to user `send.user` on `channel` as [`Engine::publish`] does, and in
    /// the same step tell every node (`send`'s control message, with the seq) or, while the
    /// user is connected nowhere, keep it: so that every node hears a user's messages in
    /// seq order. Answered as [`Event::Numbered`] with its [`Reach`]. False: this engine
    /// does not (on one node the owner does it itself).
    fn publish_to_user(
        &mut self,
        channel: &str,
        data: &[u8],
        key: Option<&str>,
        send: crate::cluster::client::UserSend,
        token: u64,
    ) -> bool {
        let _ = (channel, data, key, send, token);
        false
    }

    /// This shard has connections of `user` on the node now (`on`), or no more: marked
    /// where every node sees it. `on` takes what was kept for the user: [`Event::Kept`]
    /// with `token`.
    fn user_online(&mut self, user: &str, on: bool, token: u64) {
        let _ = (user, on, token);
    }

    /// In a cluster: write this node's sessions per tenant (name, count) where every node
    /// reads them, and learn every node's: [`Event::Census`]. Alone, nothing to learn.
    fn census(&mut self, counts: Vec<(String, u32)>) {
        let _ = counts;
    }

    /// The users (whose channels this shard owns) the node still has connections of,
    /// every third of the presence TTL; kept messages past their TTL are dropped meanwhile.
    fn users_online(&mut self, users: Vec<String>) {
        let _ = users;
    }

    /// Keep `entries` (as [`Event::Kept`] gave them) for `user` again, before what was kept
    /// since: they were taken for a connection that was gone before they arrived.
    fn keep_again(&mut self, user: &str, entries: Vec<Vec<u8>>) {
        let _ = (user, entries);
    }

    /// Keep a dropped Socket.IO connection's record where every node finds it, for
    /// `ttl_ms` (an engine that numbers locally keeps none: its shards do).
    fn keep_record(&mut self, pid: &str, record: Vec<u8>, ttl_ms: u64) {
        let _ = (pid, record, ttl_ms);
    }

    /// Take the record kept for `pid`: [`Event::Record`] with `token`.
    fn take_record(&mut self, pid: &str, token: u64) {
        let _ = (pid, token);
    }

    /// What is kept for `user` (sent by `org`, or all), dropped too with `clear`:
    /// [`Event::Kept`] with `token`.
    fn kept(&mut self, user: &str, org: Option<&str>, clear: bool, token: u64) {
        let _ = (user, org, clear, token);
    }

    /// Ask the other nodes (or node `node`, its boot id in hex) to do their part of a server
    /// API request: false on one node, which has no others. With a `token` other than 0,
    /// how many other nodes heard it comes back as [`Event::Told`].
    fn tell_nodes(
        &mut self,
        control: &crate::cluster::control::Control,
        node: Option<&str>,
        token: u64,
    ) -> bool {
        let _ = (control, node, token);
        false
    }

    /// Too much is waiting for the engine: publishers should pause.
    fn congested(&self) -> bool {
        false
    }

    /// The durable store holds `channel` up to `seq`: its numbering continues above it.
    fn recover(&mut self, channel: &str, seq: u64);

    /// Expire history and forget the channels not `needed` any more whose history is empty;
    /// their numbering continues where it stood if they are used again. Returns how many
    /// were forgotten.
    fn sweep(&mut self, now_ms: u64, needed: &dyn Fn(&str) -> bool) -> usize;

    /// The next thing to deliver, if any.
    fn next_event(&mut self) -> Option<Event>;

    /// Channels whose state is kept.
    fn channels(&self) -> usize;

    /// `channel`'s own epoch, for an engine whose channels have one (a cluster's): a client
    /// sends it back to recover, on whatever node. `None` on one node, whose epoch is the
    /// server's.
    fn epoch(&self, _channel: &str) -> Option<&str> {
        None
    }
}
