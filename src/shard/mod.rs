//! One shard's state and its routing logic: local subscriptions, the channels it owns
//! (their engine, which shards want them, idempotency keys), and the mesh outboxes.
//!
//! Everything here runs on the shard's own thread: plain `Cell`/`RefCell`, no locks. Other shards
//! are reached only through [`MeshMsg`]s. A channel is owned by one shard (a hash of its
//! `type:id` prefix), which numbers its messages and sends each one once to every shard with
//! subscribers; each shard frames it once per dialect in use there and hands the same bytes to
//! all of its subscribers of that dialect. Requests and mesh messages enter at
//! [`Shard::request`] and [`Shard::handle`]; each one's path reads top to bottom from there.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use crate::auth::{Authenticator, Channel, Principal};
use crate::clock::Now;
use crate::codec::{self, Frame};
use crate::codes::{Close, ErrorCode};
use crate::config::{Config, Scope};
use crate::decision::{self, Decision, DecisionId, Original};
use crate::dialect::shardcast::Parser;
use crate::dialect::{Answer, Dialect, Ingest, Kind, Notice, Publication, Refusal, Reply, Request};
use crate::engine::{Arrival, Engine, Event, Found, Input, Memory, Numbered};
use crate::metrics::{Counter, Global, ShardCounters};
use crate::queue::{Bounds, OutQueue, Pushed};
use crate::storage;

pub mod asks;
mod channels;
mod clustered;
pub mod directory;
mod ingest;
pub mod offline;
mod outbox;
mod peer;
mod presence;
mod quotas;
mod reconfigure;
pub mod recovery;
mod replays;
pub mod sessions;
mod subscriptions;
mod trail;
mod users;

use channels::{Channels, Held, Hold, Waiter};
use ingest::{Admission, Decisions, Unconfirmed};
use outbox::Outboxes;
use peer::Registry;
pub use peer::{Peer, Phase, Stall};
use replays::{Asked, PendingRead, ReplayTo, Replays};
pub use replays::{HistoryPage, Replay, Since};
use subscriptions::{PendingSub, Subscriptions};

/// Who waits for an answer.
#[derive(Debug)]
pub enum Client {
    /// A connection on some shard: that shard encodes the answer in its dialect.
    Conn {
        /// Shard of the connection.
        shard: usize,
        /// Connection id on that shard.
        conn: u64,
    },
    /// An HTTP request: its handler, on whatever shard, awaits the answer on this channel.
    Http(flume::Sender<Answer>),
}

/// Where an answer must go, with the request id to echo.
#[derive(Debug)]
pub struct Origin {
    /// Who.
    pub client: Client,
    /// Raw request id (PUBLISH: an ACK is owed only when present, or to HTTP).
    pub id: Option<Box<[u8]>>,
}

impl Origin {
    /// Connection `conn` of shard `shard`, echoing `id`.
    pub fn conn(shard: usize, conn: u64, id: Option<&[u8]>) -> Self {
        let client = Client::Conn { shard, conn };
        let id = id.map(Box::from);
        Origin { client, id }
    }

    /// An HTTP request, answered on `reply`.
    pub fn http(reply: flume::Sender<Answer>) -> Self {
        let client = Client::Http(reply);
        Origin { client, id: None }
    }

    /// The id to acknowledge a PUBLISH with, if an ACK is owed: a connection is owed one
    /// when its PUBLISH had an id, an HTTP request always (it has no id to echo).
    fn take_ack(&mut self) -> Option<Box<[u8]>> {
        match self.client {
            Client::Conn { .. } => self.id.take(),
            Client::Http(_) => Some(Box::default()),
        }
    }
}

/// Serves a connection handed over by another shard (see [`MeshMsg::Adopt`]).
pub type Adopter = Box<dyn Fn(crate::conn::Adoption)>;

/// What shards tell each other. Sent in batches; owned data only (it crosses threads).
#[derive(Debug)]
pub enum MeshMsg {
    /// To a channel's owner: number and fan out this PUBLISH.
    Publish {
        /// Channel.
        channel: Box<str>,
        /// Raw `data`.
        data: Vec<u8>,
        /// Its idempotency key.
        key: Option<Box<str>>,
        /// Sent to a user through the server API: once numbered, to the user's connections.
        to_user: Option<Box<directory::ToUser>>,
        /// Who to acknowledge.
        origin: Origin,
        /// When the publisher's shard received it.
        t0: Instant,
    },
    /// To a channel's owner: deduplicate, number and fan out this INGEST.
    Ingest {
        /// Channel.
        channel: Box<str>,
        /// The validated decision (its org scopes the idempotency key).
        decision: Box<Decision>,
        /// Idempotency key.
        key: Box<str>,
        /// Raw `data`.
        data: Vec<u8>,
        /// Who to acknowledge.
        origin: Origin,
        /// When the sender's shard received it.
        t0: Instant,
    },
    /// From a channel's owner: a numbered message for this shard's subscribers (encoded here,
    /// once per dialect in use).
    Deliver {
        /// Channel.
        channel: Box<str>,
        /// The message (subscribers catching up skip what their replay already holds).
        publication: Publication<Vec<u8>>,
        /// When the publisher's shard received it.
        t0: Instant,
    },
    /// To a channel's owner: this shard does (or no longer does) have subscribers.
    Interest {
        /// Channel.
        channel: Box<str>,
        /// Subscribers present.
        on: bool,
        /// Non-zero: acknowledge with [`MeshMsg::InterestAck`] once registered.
        token: u64,
        /// Replay what came after this (answered with [`MeshMsg::Replay`], not an ack).
        since: Option<Since>,
    },
    /// From a channel's owner: the interest with this token is registered, and these are the
    /// messages the subscriber missed.
    Replay {
        /// Token from the request.
        token: u64,
        /// What was found.
        replay: Box<Replay<Vec<u8>>>,
    },
    /// From a channel's owner: the node could not hear `channel` in time (a cluster node
    /// that cannot reach Redis), so the SUB with this token does not get it.
    SubFailed {
        /// Token from the request.
        token: u64,
        /// The channel.
        channel: Box<str>,
    },
    /// To the shard a Socket.IO pid names: take its record for the connection at `to`.
    TakeRecord {
        /// The pid.
        pid: Box<str>,
        /// The last message the client handled: `(channel, seq)`.
        offset: Option<(String, u64)>,
        /// Who asks (the record's owner must be the same).
        owner: (Box<str>, Box<str>),
        /// The connection that asks.
        to: (u16, u64),
        /// Its CONNECT's answers.
        ids: recovery::ConnectIds,
    },
    /// To the shard a Socket.IO pid names: keep this dropped connection's record.
    KeepRecord {
        /// The pid.
        pid: Box<str>,
        /// The record.
        record: Box<recovery::Record>,
    },
    /// From the shard that held a record: resume connection `conn` (or not).
    Resume {
        /// The connection.
        conn: u64,
        /// Where it resumes; `None`: a fresh session.
        resume: Option<recovery::Resume>,
        /// Its CONNECT's answers.
        ids: recovery::ConnectIds,
    },
    /// From a channel's owner: the interest with this token is registered.
    InterestAck {
        /// Token from the request.
        token: u64,
        /// The channel and its own epoch, when the engine has one (in a cluster).
        epoch: Option<(Box<str>, Box<str>)>,
    },
    /// To a channel's owner: what the connection at `place` did in its presence.
    Roster {
        /// Channel.
        channel: Box<str>,
        /// The member's shard and connection.
        place: presence::Place,
        /// Joined or changed, or left.
        op: presence::Roster,
    },
    /// From a channel's owner: tell this shard's presence members of `channel`.
    PresenceChange {
        /// Channel.
        channel: Box<str>,
        /// What changed.
        change: crate::dialect::Change,
        /// Who.
        member: crate::dialect::Member,
    },
    /// To a channel's owner: a page of its members for a client's PRESENCE.
    PresenceQuery {
        /// Channel.
        channel: Box<str>,
        /// Members after this cursor.
        after: Option<Box<str>>,
        /// Who to answer.
        origin: Origin,
    },
    /// To a session key's owner: the connection at `place` claims it.
    SessionClaim {
        /// The session key.
        key: Box<str>,
        /// The claimant.
        place: presence::Place,
    },
    /// To a session key's owner: the connection at `place` is gone.
    SessionRelease {
        /// The session key.
        key: Box<str>,
        /// The connection.
        place: presence::Place,
    },
    /// From a session key's owner: what became of connection `conn`'s claim.
    SessionOutcome {
        /// The session key.
        key: Box<str>,
        /// The connection.
        conn: u64,
        /// Granted, replaced or refused.
        outcome: sessions::Outcome,
    },
    /// To a channel's owner: a page of its history for the HTTP API.
    History {
        /// Channel.
        channel: Box<str>,
        /// Messages after this seq.
        after: u64,
        /// Most messages.
        limit: usize,
        /// Where the page goes.
        reply: flume::Sender<HistoryPage>,
    },
    /// From a channel's owner: tell this shard's subscribers of the channel.
    Notice {
        /// Channel.
        channel: Box<str>,
        /// What.
        notice: Notice,
    },
    /// To every shard: give `direct` to the connections of `audience` there, and say how
    /// many on `reply`.
    Direct {
        /// Whose connections.
        audience: directory::Audience,
        /// What they get.
        direct: directory::Direct,
        /// Where the count goes.
        reply: Option<flume::Sender<usize>>,
    },
    /// To the owner of `user`'s channels: shard `shard` has (or no longer has) connections of
    /// the user.
    UserOnline {
        /// The user.
        user: Box<str>,
        /// The shard.
        shard: u16,
        /// Has some now.
        on: bool,
    },
    /// To the owner of `user`'s channels: what it keeps for the user (and, with `clear`,
    /// drop it), of what `org` sent (or all).
    OfflineQueue {
        /// The user.
        user: Box<str>,
        /// Sent by this org only.
        org: Option<Box<str>>,
        /// Drop it.
        clear: bool,
        /// Where the messages go (or why they could not be read: Redis).
        reply: flume::Sender<Result<Vec<storage::OfflineRow>, String>>,
    },
    /// To every shard: refuse the tokens `revocation` covers, and close the connections
    /// using them (4403); say how many on `reply`.
    Revoke {
        /// What is revoked.
        revocation: crate::auth::Revocation,
        /// Where the count goes, if anyone asks.
        reply: Option<flume::Sender<usize>>,
    },
    /// To the owner of `user`'s channels: a message another node numbered on one of them, for
    /// the user's connections on this node that are not its subscribers.
    UserMessage {
        /// The user.
        user: Box<str>,
        /// Only this org's connections.
        org: Option<Box<str>>,
        /// The user's channel.
        channel: Box<str>,
        /// The message.
        publication: Publication<Vec<u8>>,
        /// Where the count of connections reached goes, if anyone asks.
        reply: Option<flume::Sender<usize>>,
    },
    /// To the shard that asked question `id` of the other nodes: one node's answer.
    NodeAnswer {
        /// The question's number on the shard.
        id: u64,
        /// The answer.
        answer: crate::cluster::control::NodeAnswer,
    },
    /// To the shard holding a Socket.IO long-polling session: a GET or POST for it.
    Polling(Box<crate::socketio::polling::Exchange>),
    /// To the shard holding a Socket.IO long-polling session: the connection of a WebSocket
    /// upgrading it, to be served there.
    Adopt(Box<crate::conn::Adoption>),
    /// To one shard: a page of its connections, with its totals (the server API).
    Connections {
        /// Which.
        filter: directory::Filter,
        /// After this connection id.
        after: u64,
        /// At most this many.
        limit: usize,
        /// Where the page goes.
        reply: flume::Sender<directory::Listing>,
    },
    /// To one shard: its channels with subscribers there whose names start with `prefix`,
    /// and how many (the server API).
    Channels {
        /// The prefix.
        prefix: Box<str>,
        /// Where the list goes.
        reply: flume::Sender<Vec<(Box<str>, usize)>>,
    },
    /// An answer for one connection on the receiving shard, encoded there in its dialect.
    Reply {
        /// Connection id.
        conn: u64,
        /// The answer.
        answer: Answer,
    },
}

/// The shard's side of the storage writer.
pub struct StorageLink {
    /// The writer's queue.
    pub writer: storage::Writer,
    /// Where this shard's completions come back (read by the server's completion task).
    pub completions: flume::Sender<storage::Completion>,
    /// ACK only after commit (`ack = "durable"`).
    pub durable: bool,
    /// The store's readers, for replays that reach past the in-memory history.
    pub reader: storage::Reader,
    /// One reader, for small writes that must keep their order (offline messages).
    pub ordered: storage::Reader,
    /// Where this shard's reads come back (read by the server's completion task).
    pub loaded: flume::Sender<Loaded>,
}

/// A read this shard asked for, answered.
#[derive(Debug)]
pub struct Loaded {
    /// The shard's token for the read.
    pub token: u64,
    /// What was read.
    pub result: Result<storage::reader::Answer, String>,
}

/// Where a request went: carried out on this shard, or sent to the one that owns it (whose
/// answer crosses the mesh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// This shard.
    Here,
    /// Another shard.
    Away,
}

/// What became of a client request.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Carried out (or answered on its merits, such as a decision refused by validation).
    Done,
    /// Refused for a channel the client may not use: counts toward `limits.max_bad_messages`.
    Refused,
}

/// One shard.
pub struct Shard {
    /// Shard index.
    pub id: usize,
    /// Number of shards.
    pub nshards: usize,
    /// Configuration (replaced by [`Shard::reconfigure`]).
    config: RefCell<Rc<Config>>,
    /// Process-wide counters and connection slots.
    pub global: Arc<Global>,
    /// Credential checks.
    pub auth: Authenticator,
    /// This shard's counters.
    pub counters: ShardCounters,
    /// Request parser buffers.
    pub parser: RefCell<Parser>,
    /// Read buffer shared by every connection of the shard (used only inside a poll).
    pub scratch: RefCell<Vec<u8>>,
    /// Plaintext out of TLS records (empty until a TLS connection reads).
    pub plain: RefCell<Vec<u8>>,
    /// Set when graceful shutdown begins.
    pub shutting_down: Cell<bool>,
    /// Where a connection gathers its queued frames for one send (used only inside a poll).
    pub write_buf: RefCell<Vec<u8>>,
    /// Socket.IO sessions on HTTP long-polling (connections without a socket).
    pub polls: crate::socketio::polling::Sessions,
    /// Serves a connection another shard handed over (set by the server, which holds the
    /// poller: the core does no I/O).
    adopter: RefCell<Option<Adopter>>,
    bounds: Cell<Bounds>,
    /// Key, user and org message buckets (`[limits] key_messages_per_second`, org rates).
    quotas: RefCell<crate::quota::Quotas>,
    /// Whether any of those rates is set (the message path's one test when none is).
    quota_active: Cell<bool>,
    /// TLS connections' settings, when there is a TLS listener.
    tls: RefCell<Option<crate::tls::Acceptor>>,
    started: Instant,
    /// The time the I/O edge passed in with the current call (the shard reads no clock).
    now: Cell<Now>,
    conns: RefCell<Registry>,
    subs: RefCell<Subscriptions>,
    /// Numbering, history and publications of the channels this shard owns.
    engine: RefCell<Box<dyn Engine>>,
    /// What the owner keeps besides: other shards' interest, messages held behind commits.
    channels: RefCell<Channels>,
    /// Publishes the engine answers later, by token: whom to acknowledge.
    numbering: RefCell<HashMap<u64, Origin>>,
    /// Those of them sent to a user: its channel, the data, and who to reach once numbered.
    user_sends: RefCell<HashMap<u64, UserSend>>,
    /// The open sessions, by user and org (for the server API).
    directory: RefCell<directory::Directory>,
    /// Of the users whose channels this shard owns: where they are connected, and what is
    /// kept for them while they are not.
    offline: RefCell<offline::Offline>,
    /// What dropped Socket.IO connections left for their clients to recover.
    records: RefCell<recovery::Records>,
    /// New connections per source address (`[limits] connections_per_ip_per_second`).
    connecting: RefCell<crate::rate::PerAddress>,
    /// Questions to other nodes, and other nodes' questions being answered.
    asks: RefCell<asks::Asks>,
    /// Idempotency keys of the PUBLISHes this shard numbered ("channel\0key" to seq), when
    /// the engine numbers locally (Redis remembers them in a cluster).
    published: RefCell<decision::DedupTable<u64>>,
    /// Decisions stopped nodes committed and never numbered, numbered here (cluster).
    orphans: RefCell<clustered::Orphans>,
    /// Presence members of the channels this shard owns.
    rosters: RefCell<presence::Rosters>,
    /// PRESENCE pages the engine answers later, by token: the channel, whom to answer.
    presence_asks: RefCell<HashMap<u64, (Box<str>, Origin)>>,
    /// Claims of sessions the engine answers later, by token: the key, the claimant.
    claims: RefCell<HashMap<u64, (Box<str>, presence::Place)>>,
    /// When the engine is next told of the members and session holders this shard keeps
    /// (unix ms; in a cluster Redis forgets what is not refreshed).
    next_refresh_ms: Cell<u64>,
    /// The status and metadata of this shard's connections that sent STATUS (kept here,
    /// not in every [`Peer`]).
    statuses: RefCell<HashMap<u64, presence::Statused>>,
    /// Who holds the exclusive sessions this shard owns.
    holders: RefCell<sessions::Holders>,
    /// The session key of each of this shard's connections that claimed one.
    session_keys: RefCell<HashMap<u64, Box<str>>>,
    /// Publishers paused while the engine is congested.
    engine_waiters: RefCell<Vec<Waker>>,
    decisions: RefCell<Decisions>,
    replays: RefCell<Replays>,
    /// Server epoch (start time): seqs of ephemeral channels restart when it changes.
    epoch: u64,
    next_token: Cell<u64>,
    storage: Option<StorageLink>,
    /// The store's state is known (see [`Shard::recover`]).
    recovered: Cell<bool>,
    outboxes: Outboxes,
}

/// A message to a user waiting for its seq: its channel, data and addressee, and (in a
/// cluster) the number of the question every node answers with its reach.
type UserSend = (Box<str>, Rc<[u8]>, directory::ToUser, Option<u64>);

/// Source addresses a shard keeps connection rates for (about 64 B each).
const ADDRESSES_TRACKED: usize = 65_536;

/// Size of the per-shard read buffer.
pub const SCRATCH_BYTES: usize = 64 * 1024;

impl Shard {
    /// A shard with no connections, starting its clock at `now`.
    pub fn new(
        id: usize,
        nshards: usize,
        config: Arc<Config>,
        global: Arc<Global>,
        now: Now,
    ) -> Self {
        let bounds = Cell::new(config.limits.bounds());
        Self {
            id,
            nshards,
            auth: Authenticator::new(&config),
            counters: ShardCounters::default(),
            parser: RefCell::default(),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES]),
            plain: RefCell::default(),
            shutting_down: Cell::new(false),
            write_buf: RefCell::new(Vec::with_capacity(256 * 1024)),
            polls: Default::default(),
            adopter: RefCell::new(None),
            bounds,
            quotas: RefCell::default(),
            tls: RefCell::default(),
            quota_active: Cell::new(
                config.limits.key_messages_per_second > 0 || config.limits.any_org_rate(),
            ),
            started: now.instant,
            now: Cell::new(now),
            conns: RefCell::default(),
            subs: RefCell::default(),
            engine: RefCell::new(Box::new(Memory::new(config.history.limits()))),
            channels: RefCell::default(),
            numbering: RefCell::default(),
            user_sends: RefCell::default(),
            directory: RefCell::default(),
            offline: RefCell::default(),
            records: RefCell::default(),
            connecting: RefCell::new(crate::rate::PerAddress::new(ADDRESSES_TRACKED)),
            asks: RefCell::default(),
            published: RefCell::new(decision::DedupTable::new(
                std::time::Duration::from_secs(config.ingest.dedup_window_secs),
                config.ingest.dedup_max_entries,
            )),
            orphans: RefCell::default(),
            rosters: RefCell::default(),
            presence_asks: RefCell::default(),
            claims: RefCell::default(),
            next_refresh_ms: Cell::new(0),
            statuses: RefCell::default(),
            holders: RefCell::default(),
            session_keys: RefCell::default(),
            engine_waiters: RefCell::default(),
            decisions: RefCell::new(Decisions::new(&config, id)),
            replays: RefCell::default(),
            epoch: global.boot_id,
            next_token: Cell::new(1),
            storage: None,
            recovered: Cell::new(true),
            outboxes: Outboxes::new(nshards, config.mesh.max_pending),
            config: RefCell::new(Rc::new(Config::clone(&config))),
            global,
        }
    }

    /// Number, keep and deliver this shard's channels with `engine` instead of the in-memory
    /// one (a cluster node's [`crate::engine::Redis`]).
    pub fn attach_engine(&mut self, engine: Box<dyn Engine>) {
        self.engine = RefCell::new(engine);
    }

    /// What the engine's threads report, received at `now`.
    pub fn heard(&self, input: Input, now: Now) {
        self.enter(now);
        let at = self.arrival(now.instant);
        self.engine.borrow_mut().heard(input, at);
        self.deliver_events();
        if !self.engine.borrow().congested() {
            for waker in self.engine_waiters.borrow_mut().drain(..) {
                waker.wake();
            }
        }
    }

    /// A fresh token for a request whose answer comes later.
    fn token(&self) -> u64 {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        token
    }

    /// Store decisions through `link`. With what the store `recovered` at start-up the shard
    /// takes decisions at once; without it (the store was unreachable) INGEST is refused until
    /// [`Shard::recover`] is called.
    pub fn attach_storage(
        &mut self,
        link: StorageLink,
        recovered: Option<&storage::Recovered>,
        now: Now,
    ) {
        self.storage = Some(link);
        match recovered {
            Some(recovered) => self.recover(recovered, now),
            None => self.recovered.set(false),
        }
    }

    /// Continue the stored channels' sequences and know the recent idempotency keys of the
    /// channels this shard owns; then take decisions. A channel numbered meanwhile (PUBLISH
    /// while the store was unreachable) jumps ahead to its stored maximum.
    pub fn recover(&self, recovered: &storage::Recovered, now: Now) {
        self.enter(now);
        let mut engine = self.engine.borrow_mut();
        for (channel, seq) in &recovered.channel_seqs {
            if self.owner_of(channel) == self.id {
                engine.recover(channel, *seq);
            }
        }
        // What is kept for users goes out with its numbers: what follows on their channels
        // must come after them, not start again at 1.
        for row in &recovered.offline {
            if self.owner_of(&row.channel) == self.id {
                engine.recover(&row.channel, row.seq);
            }
        }
        drop(engine);
        for revocation in &recovered.revocations {
            self.auth.revoke(revocation.clone());
        }
        self.recover_offline(&recovered.offline);
        let (id, nshards) = (self.id, self.nshards);
        let mine = recovered.recent.iter();
        let mine = mine.filter(|recent| owner_of(&recent.channel, nshards) == id);
        self.decisions.borrow_mut().recover(mine, now.instant);
        self.recovered.set(true);
    }

    /// False until the store has told this shard where its channels' sequences stand (it was
    /// unreachable at start-up): decisions are refused until then.
    pub fn storage_recovered(&self) -> bool {
        self.recovered.get()
    }

    /// Whether the decision store is reachable (`None` when storage is "memory").
    pub fn storage_status(&self) -> Option<&storage::Status> {
        self.storage.as_ref().map(|link| link.writer.status())
    }

    /// The store's readers (`None` when storage is "memory").
    pub fn reader(&self) -> Option<&storage::Reader> {
        self.storage.as_ref().map(|link| &link.reader)
    }

    /// Decisions sent to storage and not yet answered.
    pub fn unconfirmed_count(&self) -> usize {
        self.decisions.borrow().unconfirmed()
    }

    /// Milliseconds since the shard started, on the real clock: for the I/O edge, which
    /// stamps its connections' activity with it.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Take the time the I/O edge read for this call into the shard.
    fn enter(&self, now: Now) {
        self.now.set(now);
    }

    /// The time of the current call.
    fn now(&self) -> Now {
        self.now.get()
    }

    /// Milliseconds since the shard started, at the current call.
    fn ms(&self) -> u64 {
        self.now()
            .instant
            .saturating_duration_since(self.started)
            .as_millis() as u64
    }

    /// The shard that owns `channel`.
    pub fn owner_of(&self, channel: &str) -> usize {
        owner_of(channel, self.nshards)
    }

    // ----- connections -----

    /// Register a new connection, accepted at `now`.
    pub fn add_conn(&self, now: Now) -> Rc<Peer> {
        self.enter(now);
        self.conns.borrow_mut().add(self.ms())
    }

    /// Forget a connection and its subscriptions.
    pub fn remove_conn(&self, peer: &Peer) {
        self.keep_for_recovery(peer);
        let channels = std::mem::take(&mut *peer.channels.borrow_mut());
        for channel in channels {
            self.unsubscribe_one(peer.id, &channel);
        }
        self.statuses.borrow_mut().remove(&peer.id);
        self.release_session(peer.id);
        self.close_session(peer);
        self.conns.borrow_mut().remove(peer.id);
    }

    /// Connection `conn`'s id as clients see it (READY, presence): unique across the
    /// node's shards and restarts.
    pub fn connection_id(&self, conn: u64) -> String {
        self.place_id((self.id as u16, conn))
    }

    /// The id of the connection at `place` on this node: `{boot id}-{shard}-{conn}`, unique
    /// across restarts and nodes (a cluster's presence and session locks key on it).
    fn place_id(&self, place: presence::Place) -> String {
        format!("{:x}-{}-{}", self.global.boot_id, place.0, place.1)
    }

    /// In a cluster: tell the engine again, every third of the shorter TTL, of this shard's
    /// presence members and session holders (Redis forgets what is not refreshed).
    fn refresh_cluster(&self) {
        if self.engine.borrow().numbers_locally() {
            return;
        }
        let now = self.now().unix_ms;
        if now < self.next_refresh_ms.get() {
            return;
        }
        let ttl = (self.config().presence.ttl_ms).min(self.config().sessions.lock_ttl_ms);
        self.next_refresh_ms.set(now + (ttl / 3).max(1));
        self.refresh_presence();
        self.refresh_sessions();
        self.refresh_users();
    }

    /// Admit a new connection from the peer of socket `fd` under `[limits]
    /// connections_per_ip_per_second` (this shard's share): when not, how many
    /// milliseconds until it would be.
    pub fn admit_connection(&self, fd: i32) -> Result<(), u64> {
        let rate = self.config().limits.ip_rate(self.nshards);
        if rate.per_second == 0 {
            return Ok(());
        }
        let Some(address) = directory::peer_address(fd) else {
            return Ok(());
        };
        let admitted = self
            .connecting
            .borrow_mut()
            .take(address.ip(), rate, self.now_ms());
        if admitted.is_err() {
            self.counters.add(Counter::ConnectionsRateLimited, 1);
        }
        admitted
    }

    /// The connection with this id, if it is still open.
    pub fn peer(&self, id: u64) -> Option<Rc<Peer>> {
        self.conns.borrow().get(id)
    }

    /// Number of connections (any phase) on this shard.
    pub fn conn_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// WebSocket connections (open or closing) on this shard: what a drain waits for.
    pub fn websocket_count(&self) -> usize {
        self.conns.borrow().websockets()
    }

    /// A snapshot of this shard's connections (for the sweeper and shutdown).
    pub fn peers(&self) -> Vec<Rc<Peer>> {
        self.conns.borrow().all()
    }

    /// Queue a fan-out frame for `peer`, applying the backpressure policy (drop the oldest
    /// fan-out frame, or close the connection).
    pub fn deliver(&self, peer: &Peer, frame: Frame) {
        if peer.phase.get() == Phase::Closing {
            return; // Nothing may follow a close frame.
        }
        let mut out = peer.out.borrow_mut();
        let was_empty = out.is_empty();
        let pushed = out.push(frame, self.bounds.get());
        drop(out);
        match pushed {
            Pushed::Queued { dropped: 0 } => {}
            Pushed::Queued { dropped } => {
                peer.dropped.set(peer.dropped.get() + u64::from(dropped));
                self.counters
                    .add(Counter::MessagesDropped, u64::from(dropped));
            }
            Pushed::Overflow => {
                self.counters.add(Counter::MessagesDropped, 1);
                self.counters.add(Counter::SlowConsumerCloses, 1);
                peer.request_close(Close::SlowConsumer, "slow consumer", true);
            }
        }
        if was_empty {
            peer.wake();
        }
    }

    /// [`Shard::deliver`] of message `seq` of `channel`, which a recoverable connection's
    /// trail records.
    fn deliver_publication(&self, peer: &Peer, channel: &str, seq: u64, frame: Frame) {
        peer.with_recovery(|r| r.trail.record_named(channel, seq));
        self.deliver(peer, frame);
    }

    /// [`Shard::deliver_publication`] on the fan-out path, with the shard's own `Rc` of the
    /// channel's name (the trail compares pointers).
    fn fan_out_to(&self, peer: &Peer, channel: &Rc<str>, seq: u64, frame: Frame) {
        peer.with_recovery(|r| r.trail.record(channel, seq));
        self.deliver(peer, frame);
    }

    /// Answer one of `peer`'s own requests, in its dialect: never dropped (a client that
    /// does not read its answers stops being read instead; see `conn.rs`).
    pub fn answer(&self, peer: &Peer, reply: &Reply<'_>) {
        let frame = peer.dialect().reply(reply);
        // A dialect may have nothing to say (Socket.IO: an ack nobody asked for).
        if !frame.is_empty() {
            self.answer_frame(peer, frame);
        }
    }

    /// Queue an already framed answer (echo, control replies).
    pub fn answer_frame(&self, peer: &Peer, frame: Frame) {
        self.queue_answer(peer, |out| out.push_reply(frame));
    }

    /// Queue an HTTP response (or the `101` of an upgrade) on `peer`'s connection.
    pub fn answer_http(&self, peer: &Peer, response: Frame) {
        self.queue_answer(peer, |out| out.push_http(response));
    }

    fn queue_answer(&self, peer: &Peer, push: impl FnOnce(&mut OutQueue)) {
        if peer.phase.get() == Phase::Closing {
            return;
        }
        let mut out = peer.out.borrow_mut();
        let was_empty = out.is_empty();
        push(&mut out);
        drop(out);
        if was_empty {
            peer.wake();
        }
    }

    /// Answer a client that may live on another shard: its own shard encodes the answer.
    fn reply(&self, origin: &Origin, answer: Answer) {
        match origin.client {
            Client::Conn { shard, conn } if shard == self.id => {
                if let Some(peer) = self.peer(conn) {
                    self.answer(&peer, &answer.reply());
                }
            }
            Client::Conn { shard, conn } => self.route(shard, MeshMsg::Reply { conn, answer }),
            // A handler that stopped waiting (its connection closed) needs nothing.
            Client::Http(ref reply) => drop(reply.send(answer)),
        }
    }

    // ----- client requests -----

    /// Carry out a parsed request from `peer`, authenticated as `principal`, received at
    /// `now`.
    pub fn request(
        &self,
        peer: &Rc<Peer>,
        principal: &Principal,
        request: Request<'_>,
        now: Now,
    ) -> Handled {
        self.enter(now);
        match request {
            Request::Sub {
                channels,
                id,
                since,
                epoch,
                mut epochs,
                presence,
            } => {
                // Seqs from another epoch may have been reused since (ephemeral channels restart
                // at 1): such replays are never called complete. A channel's own epoch (in a
                // cluster) is compared by its owner.
                let stale = epoch.is_some_and(|e| e != self.epoch);
                let since = since
                    .into_iter()
                    .map(|(channel, after)| {
                        let mine = epochs.iter().position(|(c, _)| *c == channel);
                        let epoch = mine.map(|i| epochs.swap_remove(i).1.into());
                        let since = Since {
                            after,
                            stale,
                            epoch,
                        };
                        (channel, since)
                    })
                    .collect();
                if let Err(refusal) = self.check_list(channels.len()) {
                    return self.refuse(peer, &refusal.with_id(id));
                }
                return self.subscribe(peer, principal, (channels, presence), id, since);
            }
            Request::Unsub { channels, id } => {
                if let Err(refusal) = self.check_list(channels.len()) {
                    return self.refuse(peer, &refusal.with_id(id));
                }
                for channel in &channels {
                    let removed = {
                        let mut mine = peer.channels.borrow_mut();
                        let before = mine.len();
                        mine.retain(|c| **c != **channel);
                        before != mine.len()
                    };
                    if removed {
                        self.unsubscribe_one(peer.id, channel);
                    }
                }
                self.answer(
                    peer,
                    &Reply::Unsubscribed {
                        channels: &channels,
                        id,
                    },
                );
            }
            Request::Publish {
                channel,
                data,
                id,
                key,
            } => {
                let origin = Origin::conn(self.id, peer.id, id);
                let key = key.as_deref();
                match self.publish(principal, (&channel, data, key), origin, now) {
                    Err(refusal) => return self.refuse(peer, &refusal.with_id(id)),
                    // Its ACK is owed by another shard: it counts against the reply budget.
                    Ok(Sent::Away) if id.is_some() => peer.owed.set(peer.owed.get() + 1),
                    Ok(_) => {}
                }
            }
            Request::Ingest(ingest) => {
                let key = Some(ingest.raw_key);
                let origin = Origin::conn(self.id, peer.id, None);
                match self.ingest_request(principal, ingest, origin, now) {
                    // A decision refused by validation, like those the parser refuses: counted
                    // as rejected, not as a bad message.
                    Err(refusal) if refusal.code == ErrorCode::InvalidDecision => {
                        self.answer(peer, &Reply::refusal(&refusal.with_id(key)));
                    }
                    Err(refusal) => return self.refuse(peer, &refusal.with_id(key)),
                    Ok(Sent::Away) => peer.owed.set(peer.owed.get() + 1),
                    Ok(Sent::Here) => {}
                }
            }
            Request::Ping { timestamp } => self.answer(peer, &Reply::Pong { timestamp }),
            Request::Status { status, meta } => {
                if let Err(refusal) = self.set_status(peer, principal, status, meta) {
                    return self.refuse(peer, &refusal);
                }
            }
            Request::Presence {
                channel,
                id,
                cursor,
            } => {
                let asked = self
                    .check_channel(principal, Scope::Subscribe, &channel)
                    .map(drop)
                    .and_then(|()| self.presence_query(peer, &channel, id, cursor.as_deref()));
                if let Err(refusal) = asked {
                    return self.refuse(peer, &refusal.with_id(id));
                }
            }
            Request::Channels { id } => {
                let channels = peer.channels.borrow();
                self.answer(
                    peer,
                    &Reply::Channels {
                        channels: &channels,
                        id,
                    },
                );
            }
            Request::Refresh { id, .. } => {
                // The connection owns its credentials and answers REFRESH itself.
                let refusal = Refusal::bad_request("REFRESH is not accepted here").with_id(id);
                return self.refuse(peer, &refusal);
            }
        }
        Handled::Done
    }

    fn refuse(&self, peer: &Peer, refusal: &Refusal) -> Handled {
        self.answer(peer, &Reply::refusal(refusal));
        Handled::Refused
    }

    /// A PUBLISH (channel, raw data, idempotency key) by `principal`, from a connection or
    /// over HTTP, received at `now`: checked here, then numbered by the channel's owner,
    /// which answers `origin`.
    pub fn publish(
        &self,
        principal: &Principal,
        (channel, data, key): (&str, &[u8], Option<&str>),
        origin: Origin,
        now: Now,
    ) -> Result<Sent, Refusal> {
        self.enter(now);
        self.check_channel(principal, Scope::Publish, channel)?;
        Ok(self.publish_checked((channel, data, key), None, origin))
    }

    /// A message to `user`'s own `channel` (`user:{id}:{category}`) from the server API: the
    /// channel's owner numbers it as a PUBLISH, then it reaches every connection of the
    /// user (of `org` only, unless `None`) on every shard, subscribed to it or not. Each
    /// shard sends how many it reached on `reached`; `origin` gets the seq.
    pub fn send_to_user(
        &self,
        (channel, data, key): (&str, &[u8], Option<&str>),
        to: directory::ToUser,
        origin: Origin,
        now: Now,
    ) -> Result<Sent, Refusal> {
        self.enter(now);
        let parsed = Channel::parse(channel, &self.config().channels.categories);
        let named =
            parsed.is_ok_and(|c| c.kind == crate::auth::ChannelKind::User && c.id == &*to.user);
        if !named {
            let message = format!("{}: not that user's channel", crate::json::echo(channel));
            return Err(Refusal {
                code: ErrorCode::InvalidChannel,
                message,
                id: None,
            });
        }
        Ok(self.publish_checked((channel, data, key), Some(Box::new(to)), origin))
    }

    /// A PUBLISH already allowed, to its owner.
    fn publish_checked(
        &self,
        (channel, data, key): (&str, &[u8], Option<&str>),
        to_user: Option<Box<directory::ToUser>>,
        origin: Origin,
    ) -> Sent {
        let (owner, t0) = (self.owner_of(channel), self.now().instant);
        // Owned here: no need to copy the message into a mesh message. An engine that
        // numbers elsewhere (Redis) is asked from any shard, bounded by its congestion, and
        // delivers through the owner; unless it cannot reach Redis, and the owner may have to
        // number the message itself.
        // A message to a user goes to its owner, which knows where the user is connected.
        if owner == self.id || (to_user.is_none() && self.numbered_from_any_shard(channel)) {
            self.publish_as_owner(channel, data, (key, to_user), origin, t0);
            return Sent::Here;
        }
        let msg = MeshMsg::Publish {
            channel: channel.into(),
            data: data.to_vec(),
            key: key.map(Box::from),
            to_user,
            origin,
            t0,
        };
        self.route(owner, msg);
        Sent::Away
    }

    /// An INGEST by `principal`, from a connection or over HTTP, received at `now`: checked
    /// here (a decision of another org than its channel's is `invalid_decision`),
    /// then deduplicated, stored and numbered by the channel's owner, which answers `origin`.
    pub fn ingest_request(
        &self,
        principal: &Principal,
        ingest: Ingest<'_>,
        origin: Origin,
        now: Now,
    ) -> Result<Sent, Refusal> {
        self.enter(now);
        let channel = self.check_channel(principal, Scope::Ingest, &ingest.channel)?;
        let expected_org = channel.org().unwrap_or(&principal.org);
        if ingest.decision.org_id != expected_org {
            self.counters.add(Counter::DecisionsRejected, 1);
            return Err(Refusal {
                code: ErrorCode::InvalidDecision,
                message: format!("data.orgId must be {expected_org:?}, the channel's org"),
                id: None,
            });
        }
        let (owner, t0) = (self.owner_of(&ingest.channel), self.now().instant);
        if owner == self.id {
            let (channel, decision, key) = (&ingest.channel, &ingest.decision, &ingest.key);
            self.ingest(channel, decision, key, ingest.data, origin, t0);
            return Ok(Sent::Here);
        }
        let msg = MeshMsg::Ingest {
            channel: ingest.channel.as_str().into(),
            decision: ingest.decision,
            key: ingest.key.as_str().into(),
            data: ingest.data.to_vec(),
            origin,
            t0,
        };
        self.route(owner, msg);
        Ok(Sent::Away)
    }

    /// Refuse a SUB or UNSUB naming more than `[limits] max_channels_per_request` channels.
    fn check_list(&self, names: usize) -> Result<(), Refusal> {
        let max = self.config().limits.max_channels_per_request;
        if names <= max {
            return Ok(());
        }
        self.counters.add(Counter::LimitChannelList, 1);
        Err(Refusal::bad_request(format!(
            "\"channels\" must hold 1 to {max} names"
        )))
    }

    /// Parse `name` and check that `principal` may use it for `scope`.
    fn check_channel<'a>(
        &self,
        principal: &Principal,
        scope: Scope,
        name: &'a str,
    ) -> Result<Channel<'a>, Refusal> {
        let config = self.config();
        let max = config.channels.max_name_bytes;
        if name.len() > max {
            self.counters.add(Counter::LimitChannelName, 1);
            return Err(Refusal {
                code: ErrorCode::InvalidChannel,
                message: format!("channel names are at most {max} bytes"),
                id: None,
            });
        }
        let channel = Channel::parse(name, &config.channels.categories).map_err(|e| Refusal {
            code: ErrorCode::InvalidChannel,
            message: format!("{}: {e}", crate::json::echo(name)),
            id: None,
        })?;
        if principal.may(scope, &channel) {
            Ok(channel)
        } else {
            Err(Refusal {
                code: ErrorCode::Forbidden,
                message: format!("not allowed to {} on {name:?}", scope_verb(scope)),
                id: None,
            })
        }
    }

    fn subscribe(
        &self,
        peer: &Rc<Peer>,
        principal: &Principal,
        (names, presence): (Vec<String>, bool),
        id: Option<&[u8]>,
        since: HashMap<String, Since>,
    ) -> Handled {
        let config = self.config();
        let mut accepted: Vec<String> = Vec::with_capacity(names.len());
        let mut handled = Handled::Done;
        let max = config.limits.max_subscriptions;
        // Each shard holds its share of a channel's subscribers.
        let crowd = match config.limits.max_subscribers_per_channel {
            0 => usize::MAX,
            n => n.div_ceil(self.nshards),
        };
        let mut held = peer.channels.borrow().len();
        for name in names {
            // The shard's subscriber map answers in one lookup (the connection's own list is
            // up to `max_subscriptions` long).
            let known = self.subs.borrow().has(&name, peer.id);
            let allowed = self
                .check_channel(principal, Scope::Subscribe, &name)
                .map(drop)
                .and_then(|()| {
                    if known || accepted.contains(&name) {
                        Ok(())
                    } else if self.subs.borrow().count(&name) >= crowd {
                        self.counters.add(Counter::LimitSubscribers, 1);
                        Err(Refusal {
                            code: ErrorCode::TooManySubscribers,
                            message: format!(
                                "the channel has {} subscribers, the most allowed",
                                config.limits.max_subscribers_per_channel
                            ),
                            id: None,
                        })
                    } else if held >= max {
                        self.counters.add(Counter::LimitSubscriptions, 1);
                        Err(Refusal {
                            code: ErrorCode::TooManySubscriptions,
                            message: format!(
                                "this connection holds {max} subscriptions, the most allowed"
                            ),
                            id: None,
                        })
                    } else {
                        held += 1;
                        Ok(())
                    }
                });
            match allowed {
                Ok(()) => accepted.push(name),
                Err(refusal) => {
                    // Named so the client knows which one; a name too long to be valid is cut.
                    let named = Some(crate::json::truncate(&name, config.channels.max_name_bytes));
                    let reply = Reply::Error {
                        code: refusal.code,
                        message: &refusal.message,
                        id,
                        channel: named,
                    };
                    self.answer(peer, &reply);
                    handled = Handled::Refused;
                }
            }
        }
        if accepted.is_empty() {
            return handled;
        }
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let mut local = Vec::new();
        let mut pending = PendingSub {
            conn: peer.id,
            channels: Vec::new(),
            id: id.map(Box::from),
            waiting: 0,
            replays: Vec::new(),
            epochs: Vec::new(),
            failed: Vec::new(),
            probes: Vec::new(),
        };
        for name in &accepted {
            let channel: Rc<str> = Rc::from(name.as_str());
            if self.subs.borrow_mut().add(channel.clone(), peer) {
                peer.channels.borrow_mut().push(channel.clone());
            }
            let since = since.get(name).cloned();
            if since.as_ref().is_some_and(|s| s.after == replays::TOP) {
                pending.probes.push(name.clone());
            }
            if since.is_some() {
                // From here until its replay is sent, live messages for this subscriber wait.
                self.subs
                    .borrow_mut()
                    .begin_catch_up(channel, peer.id, token);
            }
            let owner = self.owner_of(name);
            if owner != self.id {
                // Every SUB asks the owner, even when this shard is already registered: the
                // SUBSCRIBED reply must not overtake a registration still in flight.
                pending.waiting += 1;
                let msg = MeshMsg::Interest {
                    channel: name.as_str().into(),
                    on: true,
                    token,
                    since,
                };
                self.route(owner, msg);
            } else if !self.engine.borrow_mut().want(name, true) {
                // The node does not hear the channel yet: answered once it does.
                pending.waiting += 1;
                let waiter = match since {
                    Some(since) => Waiter::Replay {
                        since,
                        to: ReplayTo::Sub {
                            shard: self.id,
                            token,
                        },
                    },
                    None => Waiter::Ack {
                        shard: self.id,
                        token,
                    },
                };
                let deadline = self.ms() + self.config().cluster.timeout_ms;
                self.channels.borrow_mut().wait(name, waiter, deadline);
            } else if let Some(since) = since {
                pending.waiting += 1;
                local.push((name.clone(), since));
            } else if let Some(epoch) = self.engine.borrow().epoch(name) {
                pending.epochs.push((name.as_str().into(), epoch.into()));
            }
        }
        if presence {
            // After the interest above: the owner knows this shard before it tells it.
            self.join(peer, principal, &accepted);
        }
        pending.channels = accepted;
        if pending.waiting == 0 {
            self.finish_subscribe(token, pending);
            return handled;
        }
        self.subs.borrow_mut().park(token, pending);
        // Owned here: answered at once from the ring, or once the store has been read.
        for (name, since) in local {
            let to = ReplayTo::Sub {
                shard: self.id,
                token,
            };
            self.replay(&name, since, to);
        }
        handled
    }

    /// A SUB has everything it waited for: answer SUBSCRIBED, then send each replay followed by
    /// the live messages that arrived meanwhile (those the replay does not already hold).
    fn finish_subscribe(&self, token: u64, mut p: PendingSub) {
        let live: Vec<_> = {
            let mut subs = self.subs.borrow_mut();
            let mut end = |r: &Replay| subs.end_catch_up(&r.channel, p.conn, token);
            p.replays.iter().map(&mut end).collect()
        };
        let Some(peer) = self.peer(p.conn) else {
            return;
        };
        for channel in &p.failed {
            let reply = Reply::Error {
                code: ErrorCode::ClusterUnavailable,
                message: "this node cannot hear the channel now (Redis is out of reach): \
                          send the SUB again",
                id: p.id.as_deref(),
                channel: Some(channel),
            };
            self.answer(&peer, &reply);
        }
        if p.channels.is_empty() {
            return;
        }
        // A replay must fit in the connection's fan-out bounds, or drop-oldest would lose part
        // of it silently: what does not fit is left out and the channel reported incomplete.
        let (mut room, mut bytes) = {
            let (queued, queued_bytes) = peer.out().borrow().fanout();
            (
                self.bounds.get().messages.saturating_sub(queued),
                self.bounds.get().bytes.saturating_sub(queued_bytes),
            )
        };
        let dialect = peer.dialect();
        let encode = |r: &Replay| -> Vec<Frame> {
            let messages = r.messages.iter();
            messages
                .map(|m| dialect.publication(&r.channel, m))
                .collect()
        };
        let mut frames: Vec<Vec<Frame>> = p.replays.iter().map(encode).collect();
        for ((replay, frames), live) in p.replays.iter_mut().zip(&mut frames).zip(&live) {
            let Some(live) = live else { continue };
            let after = live.iter().filter(|(seq, _)| *seq > replay.upto);
            let (live_n, live_bytes) = after.fold((0, 0), |(n, b), (_, f)| (n + 1, b + f.len()));
            room = room.saturating_sub(live_n);
            bytes = bytes.saturating_sub(live_bytes);
            let mut keep = frames.len();
            let mut size: usize = frames.iter().map(|f| f.len()).sum();
            while keep > room || size > bytes {
                size -= frames[frames.len() - keep].len();
                keep -= 1;
            }
            if keep < frames.len() {
                frames.drain(..frames.len() - keep);
                replay.complete = false;
            }
            room -= keep;
            bytes -= size;
        }
        let probe = |r: &Replay| p.probes.iter().any(|c| **c == *r.channel);
        let recovered: Vec<(&str, bool)> = p
            .replays
            .iter()
            .filter(|r| !probe(r))
            .map(|r| (&*r.channel, r.complete))
            .collect();
        let incomplete = recovered.iter().filter(|(_, complete)| !complete).count();
        self.counters.add(Counter::Replays, recovered.len() as u64);
        self.counters
            .add(Counter::ReplaysIncomplete, incomplete as u64);
        let replayed = p
            .replays
            .iter()
            .filter_map(|r| Some((&*r.channel, r.epoch.as_deref()?)));
        let epochs: Vec<(&str, &str)> = p
            .epochs
            .iter()
            .map(|(c, e)| (&**c, &**e))
            .chain(replayed)
            .collect();
        let subscribed = Reply::Subscribed {
            channels: &p.channels,
            id: p.id.as_deref(),
            epoch: self.epoch,
            epochs: &epochs,
            recovered: &recovered,
        };
        match p.id.as_deref() {
            Some(id) if peer.recoverable() => {
                self.resumed(&peer, id, incomplete == 0, || {
                    self.answer(&peer, &subscribed)
                });
            }
            _ => self.answer(&peer, &subscribed),
        }
        for ((replay, frames), live) in p.replays.iter().zip(frames).zip(live) {
            // Unsubscribed meanwhile: nothing more for that channel.
            let Some(live) = live else { continue };
            let channel = &*replay.channel;
            // What did not fit was left out of the front.
            let sent = &replay.messages[replay.messages.len() - frames.len()..];
            let before = sent
                .first()
                .map_or(replay.upto, |m| m.seq.saturating_sub(1));
            peer.with_recovery(|r| r.trail.start(channel, before));
            for (frame, m) in frames.into_iter().zip(sent) {
                self.deliver_publication(&peer, channel, m.seq, frame);
            }
            for (seq, frame) in live {
                if seq > replay.upto {
                    self.deliver_publication(&peer, channel, seq, frame);
                }
            }
        }
    }

    /// The owner's side of a replay: find what came after `since` on a channel this shard
    /// owns and send it `to` the subscriber. What the ring no longer holds may be stored
    /// decisions: then the store is read first.
    fn replay(&self, channel: &str, since: Since, to: ReplayTo) {
        let token = self.token();
        let found = self
            .engine
            .borrow_mut()
            .history(channel, since.after, self.ms(), token);
        match found {
            Some(found) => self.replay_found(channel, since, to, found),
            None => {
                let channel = channel.into();
                let asked = Asked { channel, since, to };
                self.replays.borrow_mut().ask(token, asked);
                // An engine that cannot even ask answers at once.
                self.deliver_events();
            }
        }
    }

    /// The engine's history read `token` is answered.
    fn history_found(&self, token: u64, found: Result<Found, String>) {
        let Some(Asked { channel, since, to }) = self.replays.borrow_mut().answer(token) else {
            return;
        };
        match found {
            Ok(found) => self.replay_found(&channel, since, to, found),
            Err(e) => {
                tracing::warn!(shard = self.id, channel = &*channel, "replay failed: {e}");
                let replay = Replay {
                    channel,
                    messages: Vec::new(),
                    upto: 0,
                    complete: false,
                    epoch: None,
                };
                self.send_replay(to, replay, false);
            }
        }
    }

    /// The second half of [`Shard::replay`]: what the engine found, and the store for what
    /// it no longer has.
    fn replay_found(&self, channel: &str, mut since: Since, to: ReplayTo, found: Found) {
        if let (Some(theirs), Some(ours)) = (&since.epoch, &found.epoch) {
            // The channel's own epoch decides, on whatever node the client was before.
            since.stale = theirs != ours;
        }
        let in_range = since.after <= found.upto;
        let ring = Replay {
            channel: channel.into(),
            messages: found.messages,
            upto: found.upto,
            complete: !since.stale && in_range && since.after >= found.floor,
            epoch: found.epoch,
        };
        let missing = found.floor.saturating_sub(since.after) as usize;
        let limit = match &to {
            // A SUB's replay is read only when it can be sent whole (it must fit the queue).
            ReplayTo::Sub { .. } => (missing <= self.bounds.get().messages).then_some(missing),
            // An HTTP page may end inside the stored range.
            ReplayTo::Http { limit, .. } => Some(missing.min(*limit)),
        };
        let reader = self
            .storage
            .as_ref()
            .zip(limit)
            .filter(|_| in_range && missing > 0);
        let Some((link, limit)) = reader else {
            return self.send_replay(to, ring, false);
        };
        let token = self.token();
        let query = storage::reader::Query::History {
            channel: channel.into(),
            after: since.after,
            upto: found.floor,
            limit,
        };
        let loaded = link.loaded.clone();
        let reply = Box::new(move |result| drop(loaded.send(Loaded { token, result })));
        match link.reader.submit(query, reply) {
            Ok(()) => {
                let floor = found.floor;
                let read = PendingRead {
                    to,
                    since,
                    floor,
                    limit,
                    ring,
                };
                self.replays.borrow_mut().wait(token, read);
            }
            Err(e) => {
                tracing::warn!(shard = self.id, "replay from the store refused: {e}");
                self.send_replay(to, ring, false);
            }
        }
    }

    /// Stored decisions for a replay have been read: put them before what the ring had.
    /// The replay is complete when the store holds every seq the ring lost (a hole means an
    /// ephemeral message, gone for good).
    pub fn loaded(&self, loaded: Loaded, now: Now) {
        self.enter(now);
        // A clustered decision waiting for its key's original row.
        let decision = self.decisions.borrow_mut().settle(loaded.token);
        if let Some(u) = decision {
            return self.found_original(u, loaded.result);
        }
        if self.orphans.borrow().looking == Some(loaded.token) {
            return self.found_orphans(loaded.result);
        }
        let Some(read) = self.replays.borrow_mut().take(loaded.token) else {
            return;
        };
        let rows = match loaded.result {
            Ok(storage::reader::Answer::History(rows)) => rows,
            Ok(other) => {
                tracing::error!(shard = self.id, "history read answered with {other:?}");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(shard = self.id, "replay from the store failed: {e}");
                Vec::new()
            }
        };
        let (to, replay, cut) = read.merge(rows);
        self.send_replay(to, replay, cut);
    }

    /// Hand a replay to whoever asked; `cut` says more messages follow the last one (an HTTP
    /// page that ended in the store).
    fn send_replay(&self, to: ReplayTo, replay: Replay, cut: bool) {
        match to {
            ReplayTo::Sub { shard, token } if shard == self.id => {
                self.answered(token, Some(replay), None)
            }
            ReplayTo::Sub { shard, token } => {
                let replay = Box::new(replay.into_sendable());
                self.route(shard, MeshMsg::Replay { token, replay });
            }
            ReplayTo::Http { reply, limit } => {
                let more = cut || replay.messages.len() > limit;
                let messages = replay.messages.iter().take(limit);
                let page = HistoryPage {
                    messages: messages.map(Publication::to_sendable).collect(),
                    complete: replay.complete,
                    more,
                };
                let _ = reply.send(page);
            }
        }
    }

    /// A page of `channel`'s history after seq `after` for the HTTP API, from its owner (the
    /// ring, and the store for older decisions).
    pub fn history(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        reply: flume::Sender<HistoryPage>,
        now: Now,
    ) {
        self.enter(now);
        let msg = MeshMsg::History {
            channel: channel.into(),
            after,
            limit,
            reply,
        };
        self.route(self.owner_of(channel), msg);
    }

    fn unsubscribe_one(&self, conn: u64, channel: &str) {
        // Before the interest goes: the owner still tells this shard's other members.
        self.leave(conn, channel);
        let now_empty = self.subs.borrow_mut().remove(conn, channel);
        let owner = self.owner_of(channel);
        if now_empty && owner == self.id {
            self.refresh_want(channel);
        } else if now_empty {
            let msg = MeshMsg::Interest {
                channel: channel.into(),
                on: false,
                token: 0,
                since: None,
            };
            self.route(owner, msg);
        }
    }

    // ----- the owner's side -----

    /// Tell the engine when the node no longer wants a channel this shard owns (no
    /// subscriber here, no other shard interested), and answer the subscriptions that were
    /// waiting for it.
    fn refresh_want(&self, channel: &str) {
        let interest = |o: &channels::Owned| !o.interest.is_empty();
        let others = self.channels.borrow().get(channel).is_some_and(interest);
        if others || self.subs.borrow().wanted(channel) {
            return;
        }
        self.engine.borrow_mut().want(channel, false);
        self.release_waiting(channel);
    }

    /// The node hears `channel` now (or no longer wants it): answer the subscriptions that
    /// waited.
    fn release_waiting(&self, channel: &str) {
        let waiting = {
            let mut channels = self.channels.borrow_mut();
            let owned = channels.get_mut(channel);
            owned.map(|o| std::mem::take(&mut o.waiting))
        };
        for (_, waiter) in waiting.into_iter().flatten() {
            match waiter {
                Waiter::Ack { shard, token } => {
                    let epoch = self.channel_epoch(channel);
                    self.route(shard, MeshMsg::InterestAck { token, epoch });
                }
                Waiter::Replay { since, to } => self.replay(channel, since, to),
            }
        }
    }

    /// Subscriptions that waited past their deadline for the node to hear their channel
    /// (a cluster node that cannot reach Redis): their SUBs are told, and may be sent again.
    /// Without this a client repeating a SUB while Redis is down would grow them for ever.
    fn fail_late_subscriptions(&self, now: u64) {
        let late = self.channels.borrow_mut().expired(now);
        for (channel, waiters) in late {
            for waiter in waiters {
                let (shard, token) = match waiter {
                    Waiter::Ack { shard, token } => (shard, token),
                    Waiter::Replay {
                        to: ReplayTo::Sub { shard, token },
                        ..
                    } => (shard, token),
                    Waiter::Replay {
                        to: ReplayTo::Http { .. },
                        ..
                    } => continue,
                };
                let channel = channel.clone();
                // Its shard drops the subscription, which refreshes what the node wants.
                self.route(shard, MeshMsg::SubFailed { token, channel });
            }
        }
    }

    /// The owner of `channel` could not subscribe the SUB with `token` to it in time: drop
    /// that subscription, tell the client, and answer the rest of the SUB when it is ready.
    fn sub_failed(&self, token: u64, channel: &str) {
        let failed = self.subs.borrow_mut().failed(token, channel);
        let Some((conn, done)) = failed else {
            return;
        };
        if let Some(peer) = self.peer(conn) {
            peer.channels.borrow_mut().retain(|c| **c != *channel);
        }
        self.unsubscribe_one(conn, channel);
        if let Some(sub) = done {
            self.finish_subscribe(token, sub);
        }
    }

    /// A PUBLISH on `channel` goes straight to an engine that numbers elsewhere (Redis), from
    /// whatever shard: unless the node cannot reach it, and the owner may number it itself.
    fn numbered_from_any_shard(&self, channel: &str) -> bool {
        let engine = self.engine.borrow();
        !engine.numbers_locally() && !engine.degraded(channel)
    }

    /// `channel` and its own epoch, for an InterestAck, when the engine has one.
    fn channel_epoch(&self, channel: &str) -> Option<(Box<str>, Box<str>)> {
        let engine = self.engine.borrow();
        Some((channel.into(), engine.epoch(channel)?.into()))
    }

    /// Number a message on `channel` and fan it out (or hold it behind an uncommitted
    /// decision). An engine that numbers later answers with `token`.
    /// `key` (a PUBLISH's idempotency key) goes to an engine that numbers elsewhere.
    fn fan_out(
        &self,
        channel: &str,
        (kind, key): (Kind, Option<&str>),
        data: &[u8],
        t0: Instant,
        token: u64,
    ) -> Numbered {
        let at = self.arrival(t0);
        let data = Rc::from(data);
        let mut channels = self.channels.borrow_mut();
        let Some(owned) = channels.get_mut(channel).filter(|o| !o.held.is_empty()) else {
            drop(channels);
            let seq = self
                .engine
                .borrow_mut()
                .publish(channel, kind, data, key, at, token);
            if let Numbered::Now(_) = seq {
                self.deliver_events();
            }
            return seq;
        };
        let seq = self.engine.borrow_mut().reserve(channel, false);
        let publication = Publication { seq, kind, data };
        let hold = Hold::Ready;
        owned.held.push_back(Held {
            publication,
            at,
            hold,
        });
        Numbered::Now(seq)
    }

    /// When a message that reached the owner at `t0` arrived, on the shard clock too (no
    /// clock read per message).
    fn arrival(&self, t0: Instant) -> Arrival {
        let at_ms = t0.saturating_duration_since(self.started).as_millis() as u64;
        Arrival { t0, at_ms }
    }

    /// Do what the engine has to say: deliveries, and the answers that came later.
    fn deliver_events(&self) {
        loop {
            let event = self.engine.borrow_mut().next_event();
            match event {
                None => return,
                Some(Event::Publication {
                    channel,
                    publication,
                    at,
                }) => self.emit(&channel, &publication, at.t0),
                Some(Event::Numbered {
                    token,
                    result,
                    local,
                    reach,
                }) => self.numbered(token, result, local, reach),
                Some(Event::Kept { token, result }) => self.kept_read(token, result),
                Some(Event::Record { token, result }) => self.record_taken(token, result),
                Some(Event::Census { nodes, counts }) => self.census_heard(nodes, &counts),
                Some(Event::History { token, found }) => self.history_found(token, found),
                Some(Event::Reroute {
                    token,
                    channel,
                    data,
                }) => self.reroute(token, &channel, &data),
                Some(Event::Subscribed { channel }) => self.release_waiting(&channel),
                Some(Event::Gap { channel, from, to }) => {
                    self.counters.add(Counter::ClusterGaps, 1);
                    tracing::warn!(shard = self.id, %channel, from, to, "messages lost");
                    self.notify(&channel, Notice::Lost { from, to });
                }
                Some(Event::Reset { channel, epoch }) => {
                    self.counters.add(Counter::ClusterResets, 1);
                    tracing::warn!(shard = self.id, %channel, %epoch, "numbering started again");
                    self.notify(&channel, Notice::Reset { epoch });
                }
                Some(Event::PresenceChange {
                    channel,
                    change,
                    member,
                }) => self.presence_changed(&channel, change, &member),
                Some(Event::PresencePage { token, result }) => self.presence_paged(token, result),
                Some(Event::Claimed { token, result }) => self.claim_answered(token, result),
                Some(Event::LocksLost(locks)) => self.locks_lost(locks),
                // At the next tick.
                Some(Event::Reconnected) => self.next_refresh_ms.set(0),
                Some(Event::Control(control)) => self.controlled(control),
                Some(Event::Told { token, nodes }) => self.told(token, nodes),
                Some(Event::Kill { conn, key, at_ms }) => self.killed(conn, &key, at_ms),
            }
        }
    }

    /// The engine numbered (or could not publish) the publish of `token` (on this node
    /// alone: `local`): acknowledge it.
    fn numbered(
        &self,
        token: u64,
        result: Result<u64, String>,
        local: bool,
        reach: Option<crate::engine::Reach>,
    ) {
        // A PUBLISH (the common case), else a decision, else one a stopped node left.
        let publish = self.numbering.borrow_mut().remove(&token);
        let Some(mut origin) = publish else {
            let decision = self.decisions.borrow_mut().settle(token);
            if let Some(u) = decision {
                return self.decision_numbered(u, result);
            }
            let orphan = self.orphans.borrow_mut().numbering.remove(&token);
            if let Some(id) = orphan {
                self.orphan_numbered(&id, result);
            }
            return;
        };
        let send = self.user_sends.borrow_mut().remove(&token);
        if let Some((channel, data, to, ask)) = send {
            match (&result, reach, ask) {
                (Ok(_), Some(reach), Some(ask)) => self.user_reached(ask, reach, to),
                (result, _, ask) => {
                    // Nobody else was told: numbered on one node, or here alone (Redis
                    // could not be reached), or not at all.
                    if let Some(ask) = ask {
                        self.told(ask, None);
                    }
                    if let Ok(seq) = result {
                        let kind = Kind::Message;
                        let publication = Publication {
                            seq: *seq,
                            kind,
                            data,
                        };
                        self.user_message(&channel, &publication, to);
                    }
                }
            }
        }
        let id = origin.take_ack();
        self.counters
            .add(Counter::ClusterLocal, u64::from(local && result.is_ok()));
        match (result, id) {
            (Ok(seq), Some(id)) => self.reply(&origin, Answer::PublishAck { id, seq, local }),
            (Ok(_), None) => {}
            (Err(reason), id) => {
                tracing::debug!(shard = self.id, "publish failed: {reason}");
                let answer = Answer::Error {
                    code: ErrorCode::ClusterUnavailable,
                    message: format!("not acknowledged: {reason}").into(),
                    owed: id.is_some(),
                    id,
                };
                self.reply(&origin, answer);
            }
        }
    }

    /// Send the publish of `token` to `channel`'s owner, which numbers it while the node
    /// cannot reach Redis; its answer goes to the publisher as from any owner.
    fn reroute(&self, token: u64, channel: &str, data: &[u8]) {
        let Some(origin) = self.numbering.borrow_mut().remove(&token) else {
            return;
        };
        // The owner numbers it alone, for this node: the user's other connections are told
        // nothing (their count comes back as none).
        self.user_sends.borrow_mut().remove(&token);
        if let (Client::Conn { conn, .. }, Some(_)) = (&origin.client, &origin.id) {
            if let Some(peer) = self.peer(*conn) {
                peer.owed.set(peer.owed.get() + 1);
            }
        }
        // Keys are not remembered by a node that cannot reach Redis (docs/CLUSTER.md).
        let msg = MeshMsg::Publish {
            channel: channel.into(),
            data: data.to_vec(),
            key: None,
            to_user: None,
            origin,
            t0: self.now().instant,
        };
        self.route(self.owner_of(channel), msg);
    }

    /// Send a numbered message to every subscriber, here and on the shards that have
    /// subscribers.
    fn emit(&self, channel: &str, publication: &Publication, t0: Instant) {
        if let Some(owned) = self.channels.borrow().get(channel) {
            for &shard in &owned.interest {
                let msg = MeshMsg::Deliver {
                    channel: channel.into(),
                    publication: publication.to_sendable(),
                    t0,
                };
                self.route(usize::from(shard), msg);
            }
        }
        self.deliver_local(channel, publication, t0);
    }

    /// Tell every subscriber of `channel`, on every shard, in order with its messages.
    fn notify(&self, channel: &str, notice: Notice) {
        if let Some(owned) = self.channels.borrow().get(channel) {
            for &shard in &owned.interest {
                let (channel, notice) = (channel.into(), notice.clone());
                self.route(usize::from(shard), MeshMsg::Notice { channel, notice });
            }
        }
        self.notify_local(channel, &notice);
    }

    /// Tell this shard's subscribers of `channel`: never dropped, after what they were sent.
    fn notify_local(&self, channel: &str, notice: &Notice) {
        let reply = Reply::Channel { channel, notice };
        let answer = |dialect: Dialect| dialect.reply(&reply);
        let tell = |peer: &Rc<Peer>, frame| self.answer_frame(peer, frame);
        let dropped = self.subs.borrow_mut().notify(
            channel,
            notice,
            self.bounds.get().messages,
            answer,
            tell,
        );
        self.counters.add(Counter::MessagesDropped, dropped);
    }

    /// Number and fan out a PUBLISH on a channel this shard owns; ACK it if it had an id.
    /// A retry of an idempotency key still remembered is acknowledged with the original
    /// seq and not published again (by the owner here, by Redis in a cluster).
    fn publish_as_owner(
        &self,
        channel: &str,
        data: &[u8],
        (key, to_user): (Option<&str>, Option<Box<directory::ToUser>>),
        mut origin: Origin,
        t0: Instant,
    ) {
        let numbers_locally = self.engine.borrow().numbers_locally();
        let now = self.now().instant;
        let remembered = key
            .filter(|_| numbers_locally)
            .and_then(|key| self.published.borrow_mut().get(channel, key, now));
        if let Some(seq) = remembered {
            self.counters.add(Counter::PublishDuplicates, 1);
            if let Some(id) = origin.take_ack() {
                let local = false;
                self.reply(&origin, Answer::PublishAck { id, seq, local });
            }
            return;
        }
        let token = self.token();
        let engine_key = key.filter(|_| !numbers_locally);
        // In a cluster, Redis tells every node of a message to a user, or keeps it, in the
        // step that numbers it.
        let to_user = match to_user {
            Some(to) if !numbers_locally => {
                match self.publish_to_user(channel, data, engine_key, *to, token) {
                    Ok((ask, to)) => {
                        self.numbering.borrow_mut().insert(token, origin);
                        let send = (channel.into(), Rc::from(data), to, Some(ask));
                        self.user_sends.borrow_mut().insert(token, send);
                        return self.deliver_events();
                    }
                    Err(to) => Some(to),
                }
            }
            other => other,
        };
        match self.fan_out(channel, (Kind::Message, engine_key), data, t0, token) {
            Numbered::Now(seq) => {
                if let Some(key) = key {
                    self.published.borrow_mut().insert(channel, key, seq, now);
                }
                if let Some(to) = to_user {
                    let data = Rc::from(data);
                    let publication = Publication {
                        seq,
                        kind: Kind::Message,
                        data,
                    };
                    self.user_message(channel, &publication, *to);
                }
                if let Some(id) = origin.take_ack() {
                    let local = false;
                    self.reply(&origin, Answer::PublishAck { id, seq, local });
                }
            }
            Numbered::Later => {
                self.numbering.borrow_mut().insert(token, origin);
                if let Some(to) = to_user {
                    let send = (channel.into(), Rc::from(data), *to, None);
                    self.user_sends.borrow_mut().insert(token, send);
                }
                // An engine that could not even send it has answered already.
                self.deliver_events();
            }
        }
    }

    /// Hand a message to every local subscriber of `channel`, encoded once per dialect in use
    /// (subscribers waiting for a replay keep it for later).
    fn deliver_local(&self, channel: &str, publication: &Publication, t0: Instant) {
        let bound = self.bounds.get().messages;
        let seq = publication.seq;
        let deliver =
            |peer: &Rc<Peer>, name: &Rc<str>, frame| self.fan_out_to(peer, name, seq, frame);
        let fanned = self
            .subs
            .borrow_mut()
            .fan_out(channel, publication, bound, deliver);
        let Some((dropped, encodings)) = fanned else {
            return;
        };
        self.counters.add(Counter::MessagesDropped, dropped);
        self.counters.add(Counter::FramesEncoded, encodings);
        self.counters.record_fanout(t0.elapsed());
    }

    /// Admit an INGEST of `key` by `org`: `None` when it is answered already (a known key)
    /// or will be with the same key in flight; else whom to answer and, when it must wait
    /// for its commit (`durable`), its place among the keys in flight.
    fn admit(
        &self,
        org: &str,
        key: &str,
        durable: bool,
        origin: Origin,
    ) -> Option<(Origin, Option<Rc<str>>)> {
        let now = self.now().instant;
        let admission = self
            .decisions
            .borrow_mut()
            .admit(org, key, durable, origin, now);
        match admission {
            Admission::Known(original, origin) => {
                self.counters.add(Counter::DecisionsDuplicate, 1);
                let id = original.decision_id.text();
                let ack = ingest_ack(key, id.as_str(), true, original.seq);
                self.reply(&origin, ack);
                None
            }
            Admission::Joined => None,
            Admission::New {
                origin,
                pending_key,
            } => Some((origin, pending_key)),
        }
    }

    /// Deduplicate, number, store (unless storage is "memory") and fan out a decision on a
    /// channel this shard owns. Under `ack = "durable"` the ACK and the fan-out wait for the
    /// commit (see [`Shard::stored`]); under "received" both happen at once and the decision is
    /// written behind.
    fn ingest(
        &self,
        channel: &str,
        decision: &Decision,
        key: &str,
        data: &[u8],
        origin: Origin,
        t0: Instant,
    ) {
        if !self.engine.borrow().numbers_locally() {
            return self.ingest_clustered(channel, decision, key, data, origin);
        }
        let org = decision.org_id.as_str();
        let now = self.now().instant;
        let durable = self.storage.as_ref().is_some_and(|link| link.durable);
        let Some((origin, pending_key)) = self.admit(org, key, durable, origin) else {
            return;
        };
        if !self.recovered.get() {
            // Numbering now could reuse a stored seq, and the key may be stored already.
            return self.reply(&origin, storage_unavailable(key));
        }
        let ms = self.now().unix_ms;
        let decision_id = self.decisions.borrow_mut().next_id(ms);
        let id = decision_id.text();
        let data = decision::enrich(data, id.as_str(), &decision::rfc3339(ms));
        let Some(link) = &self.storage else {
            let numbered = self.fan_out(channel, (Kind::Decision, None), &data, t0, self.token());
            // An engine that numbers later does not take decisions (refused above).
            let Numbered::Now(seq) = numbered else {
                return self.reply(&origin, storage_unavailable(key));
            };
            let original = Original { decision_id, seq };
            self.decisions
                .borrow_mut()
                .remember(org, key, original, now);
            self.counters.add(Counter::DecisionsProcessed, 1);
            return self.reply(&origin, ingest_ack(key, id.as_str(), false, seq));
        };
        // Numbered now: the stored row carries its seq.
        let seq = self.engine.borrow_mut().reserve(channel, true);
        let publication = Publication {
            seq,
            kind: Kind::Decision,
            data: Rc::from(&data[..]),
        };
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let record = record(channel, decision, key, id.as_str(), seq, data, ms);
        let reply = link.completions.clone();
        if let Err(e) = link.writer.submit(storage::Request {
            record,
            token,
            reply,
        }) {
            // Nothing was numbered since: the seq is given back.
            self.engine.borrow_mut().give_back(channel, seq);
            tracing::warn!(shard = self.id, "decision refused: {e}");
            return self.reply(&origin, storage_unavailable(key));
        }
        let at = self.arrival(t0);
        let Some(pending_key) = pending_key else {
            self.keep(channel, publication, at);
            self.decisions
                .borrow_mut()
                .remember(org, key, Original { decision_id, seq }, now);
            self.counters.add(Counter::DecisionsProcessed, 1);
            return self.reply(&origin, ingest_ack(key, id.as_str(), false, seq));
        };
        let hold = Hold::Commit(token);
        self.channels
            .borrow_mut()
            .entry(channel)
            .held
            .push_back(Held {
                publication,
                at,
                hold,
            });
        let unconfirmed = Unconfirmed {
            pending_key,
            channel: channel.into(),
            org: org.into(),
            key: key.into(),
            decision_id,
            seq,
            origin,
            waiters: Vec::new(),
            data: None,
            original: None,
        };
        self.decisions.borrow_mut().hold(token, unconfirmed);
    }

    /// What storage did with a decision: acknowledge and release it, or answer with the
    /// original (a duplicate) or `storage_unavailable` (never an ACK for what is not stored).
    pub fn stored(&self, completion: storage::Completion, now: Now) {
        self.enter(now);
        let settled = self.decisions.borrow_mut().settle(completion.token);
        let Some(u) = settled else {
            // Written behind (ack = "received"): the client already has its ACK.
            if let storage::Outcome::Unavailable(reason) | storage::Outcome::Failed(reason) =
                completion.outcome
            {
                tracing::error!(
                    shard = self.id,
                    "an acknowledged decision was not stored: {reason}"
                );
            }
            return;
        };
        if !self.engine.borrow().numbers_locally() {
            return self.stored_clustered(u, completion.outcome);
        }
        let everyone = u.everyone();
        // (what the held message becomes, whether its seq may be reused)
        let (hold, unused) = match completion.outcome {
            storage::Outcome::Stored => {
                let original = Original {
                    decision_id: u.decision_id,
                    seq: u.seq,
                };
                self.decisions
                    .borrow_mut()
                    .remember(&u.org, &u.key, original, now.instant);
                self.counters.add(Counter::DecisionsProcessed, 1);
                let id = u.decision_id.text();
                for (n, to) in everyone.enumerate() {
                    let dedup = n > 0;
                    self.counters
                        .add(Counter::DecisionsDuplicate, u64::from(dedup));
                    self.reply(to, ingest_ack(&u.key, id.as_str(), dedup, u.seq));
                }
                (Hold::Ready, false)
            }
            storage::Outcome::Duplicate { id, seq } => {
                if let Some(decision_id) = DecisionId::parse(&id) {
                    let original = Original { decision_id, seq };
                    self.decisions
                        .borrow_mut()
                        .remember(&u.org, &u.key, original, now.instant);
                }
                for to in everyone {
                    self.counters.add(Counter::DecisionsDuplicate, 1);
                    self.reply(to, ingest_ack(&u.key, &id, true, seq));
                }
                // Known not inserted: its number can go to the next message.
                (Hold::Void, true)
            }
            storage::Outcome::Unavailable(reason) => {
                tracing::debug!(shard = self.id, "decision not stored: {reason}");
                for to in everyone {
                    self.reply(to, storage_unavailable(&u.key));
                }
                // Nothing was attempted: the number can go to the next message.
                (Hold::Void, true)
            }
            storage::Outcome::Failed(reason) => {
                tracing::warn!(shard = self.id, "decision not stored: {reason}");
                for to in everyone {
                    self.reply(to, storage_unavailable(&u.key));
                }
                // The commit may still have reached the disk (a connection lost before its
                // answer): never reuse the number, or the next insert would collide.
                (Hold::Void, false)
            }
        };
        self.release(&u.channel, completion.token, hold, unused);
    }

    /// Settle the held message of storage request `token`, then send everything at the front
    /// of the channel's held queue that may go. An `unused` number at the end of the queue is
    /// given back so the sequence has no hole.
    fn release(&self, channel: &str, token: u64, hold: Hold, unused: bool) {
        {
            let mut channels = self.channels.borrow_mut();
            let Some(state) = channels.get_mut(channel) else {
                return;
            };
            let held = &mut state.held;
            if let Some(i) = held.iter().position(|h| h.hold == Hold::Commit(token)) {
                held[i].hold = hold;
                if unused && i + 1 == held.len() {
                    if let Some(last) = held.pop_back() {
                        let seq = last.publication.seq;
                        self.engine.borrow_mut().give_back(channel, seq);
                    }
                }
            }
        }
        loop {
            let next = {
                let mut channels = self.channels.borrow_mut();
                let Some(state) = channels.get_mut(channel) else {
                    return;
                };
                match state.held.front().map(|h| h.hold) {
                    None | Some(Hold::Commit(_)) => return,
                    Some(Hold::Void) => {
                        state.held.pop_front();
                        continue;
                    }
                    Some(Hold::Ready) => state.held.pop_front(),
                }
            };
            if let Some(held) = next {
                self.keep(channel, held.publication, held.at);
            }
        }
    }

    /// Keep a message numbered earlier and deliver it.
    fn keep(&self, channel: &str, publication: Publication, at: Arrival) {
        self.engine.borrow_mut().keep(channel, publication, at);
        self.deliver_events();
    }

    // ----- the mesh -----

    /// Deliver `msg` to shard `to`: handled at once when that is this shard, else queued for the
    /// mesh sender (never blocks: see `mesh.rs` for why).
    pub fn route(&self, to: usize, msg: MeshMsg) {
        if to == self.id {
            return self.dispatch(to, msg);
        }
        self.outboxes.push(to, msg);
    }

    /// Handle a message from shard `from` (or from this shard), received at `now`.
    pub fn handle(&self, from: usize, msg: MeshMsg, now: Now) {
        self.enter(now);
        self.dispatch(from, msg);
    }

    /// Handle a message from shard `from` (or from this shard) at the current call's time.
    fn dispatch(&self, from: usize, msg: MeshMsg) {
        match msg {
            MeshMsg::Publish {
                channel,
                data,
                key,
                to_user,
                origin,
                t0,
            } => self.publish_as_owner(&channel, &data, (key.as_deref(), to_user), origin, t0),
            MeshMsg::Direct {
                audience,
                direct,
                reply,
            } => {
                let reached = self.direct(&audience, &direct);
                if let Some(reply) = reply {
                    let _ = reply.send(reached);
                }
            }
            MeshMsg::UserOnline { user, shard, on } => self.user_online(&user, shard, on),
            MeshMsg::TakeRecord {
                pid,
                offset,
                owner,
                to: (shard, conn),
                ids,
            } => {
                let resume = self.take_record(&pid, offset, &owner);
                self.route(usize::from(shard), MeshMsg::Resume { conn, resume, ids });
            }
            MeshMsg::Resume { conn, resume, ids } => self.resume(conn, resume, ids),
            MeshMsg::KeepRecord { pid, record } => self.keep_record(pid, *record),
            MeshMsg::OfflineQueue {
                user,
                org,
                clear,
                reply,
            } => {
                if self.engine.borrow().numbers_locally() {
                    let kept = self.offline_queue(&user, org.as_deref());
                    if clear {
                        self.offline_clear(&user, org.as_deref());
                    }
                    let _ = reply.send(Ok(kept));
                } else {
                    self.kept_in_redis(&user, org.as_deref(), clear, reply);
                }
            }
            MeshMsg::Revoke { revocation, reply } => {
                let closed = self.revoke(revocation);
                if let Some(reply) = reply {
                    let _ = reply.send(closed);
                }
            }
            MeshMsg::UserMessage {
                user,
                org,
                channel,
                publication,
                reply,
            } => {
                let publication = publication.into_shared();
                // Nobody waiting for its count: one that nobody reads.
                let reached = reply.unwrap_or_else(|| flume::bounded(1).0);
                self.user_message_heard(user, org, channel, publication, reached);
            }
            MeshMsg::NodeAnswer { id, answer } => self.node_answered(id, answer),
            MeshMsg::Connections {
                filter,
                after,
                limit,
                reply,
            } => drop(reply.send(self.listing(&filter, after, limit))),
            MeshMsg::Polling(exchange) => crate::socketio::polling::exchange(self, *exchange),
            MeshMsg::Adopt(adoption) => match &*self.adopter.borrow() {
                Some(adopt) => adopt(*adoption),
                None => {
                    tracing::warn!(shard = self.id, "a connection came with no way to serve it")
                }
            },
            MeshMsg::Channels { prefix, reply } => {
                drop(reply.send(self.subs.borrow().counts(&prefix)))
            }
            MeshMsg::Ingest {
                channel,
                decision,
                key,
                data,
                origin,
                t0,
            } => self.ingest(&channel, &decision, &key, &data, origin, t0),
            MeshMsg::Deliver {
                channel,
                publication,
                t0,
            } => self.deliver_local(&channel, &publication.into_shared(), t0),
            MeshMsg::Interest {
                channel,
                on,
                token,
                since,
            } => {
                self.channels
                    .borrow_mut()
                    .interest(&channel, from as u16, on);
                if !on {
                    return self.refresh_want(&channel);
                }
                if !self.engine.borrow_mut().want(&channel, true) {
                    // Answered once the node hears the channel.
                    let waiter = match since {
                        Some(since) => Waiter::Replay {
                            since,
                            to: ReplayTo::Sub { shard: from, token },
                        },
                        None => Waiter::Ack { shard: from, token },
                    };
                    let deadline = self.ms() + self.config().cluster.timeout_ms;
                    return self.channels.borrow_mut().wait(&channel, waiter, deadline);
                }
                // Registered first: every message after the replay's `upto` reaches that shard
                // live (the mesh keeps each shard pair's messages in order).
                if let Some(since) = since {
                    let to = ReplayTo::Sub { shard: from, token };
                    self.replay(&channel, since, to);
                } else if token != 0 {
                    let epoch = self.channel_epoch(&channel);
                    self.route(from, MeshMsg::InterestAck { token, epoch });
                }
            }
            MeshMsg::InterestAck { token, epoch } => self.answered(token, None, epoch),
            MeshMsg::SubFailed { token, channel } => self.sub_failed(token, &channel),
            MeshMsg::Replay { token, replay } => {
                self.answered(token, Some(replay.into_shared()), None)
            }
            MeshMsg::Notice { channel, notice } => self.notify_local(&channel, &notice),
            MeshMsg::Roster { channel, place, op } => self.roster(&channel, place, op),
            MeshMsg::SessionClaim { key, place } => self.session_claimed(&key, place),
            MeshMsg::SessionRelease { key, place } => self.session_released(&key, place),
            MeshMsg::SessionOutcome { key, conn, outcome } => {
                self.session_outcome(&key, conn, outcome)
            }
            MeshMsg::PresenceChange {
                channel,
                change,
                member,
            } => self.tell_members(&channel, change, &member),
            MeshMsg::PresenceQuery {
                channel,
                after,
                origin,
            } => self.presence_page(&channel, after.as_deref(), origin),
            MeshMsg::Reply { conn, answer } => {
                // Each request routed to an owner is answered once: the debt is paid.
                if let Some(peer) = self.peer(conn) {
                    let paid = u32::from(answer.owed());
                    peer.owed.set(peer.owed.get().saturating_sub(paid));
                    self.answer(&peer, &answer.reply());
                }
            }
            MeshMsg::History {
                channel,
                after,
                limit,
                reply,
            } => {
                let since = Since {
                    after,
                    stale: false,
                    epoch: None,
                };
                self.replay(&channel, since, ReplayTo::Http { reply, limit });
            }
        }
    }

    /// An owner answered a pending SUB (with a replay, for a channel asked with `since`).
    fn answered(
        &self,
        token: u64,
        replay: Option<Replay<Frame>>,
        epoch: Option<(Box<str>, Box<str>)>,
    ) {
        let done = self.subs.borrow_mut().answered(token, replay, epoch);
        if let Some(sub) = done {
            self.finish_subscribe(token, sub);
        }
    }

    /// Wait for messages for shard `to`, then take them all (one mesh send per batch).
    pub fn poll_outbox(
        &self,
        to: usize,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Vec<MeshMsg>> {
        let polled = self.outboxes.poll(to, cx);
        if let std::task::Poll::Ready(batch) = &polled {
            self.counters.add(Counter::MeshBatches, 1);
            self.counters.add(Counter::MeshMessages, batch.len() as u64);
        }
        polled
    }

    /// True when some peer shard, or the engine, has too much waiting for it: publishers
    /// should pause.
    pub fn congested(&self) -> bool {
        self.outboxes.congested() || self.engine.borrow().congested()
    }

    /// Wake `waker` once the mesh and the engine are no longer congested.
    pub fn wait_uncongested(&self, waker: &Waker) {
        if self.engine.borrow().congested() {
            self.engine_waiters.borrow_mut().push(waker.clone());
        } else {
            self.outboxes.wait_uncongested(waker);
        }
    }

    // ----- timers -----

    /// Ping quiet connections, drop dead or stuck ones, forget unused channels. Called by the
    /// sweeper task.
    pub fn sweep(&self, ping: &Frame, now: Now) {
        self.sweep_slice(ping, now, 0, 1);
    }

    /// [`Shard::sweep`] of slice `slice` (0-based) of `slices`: the connections whose id is
    /// `slice` modulo `slices`, and (with slice 0) the channels. Sweeping 19,900 connections
    /// in one go held the shard for 15-37 ms; the timers sweep one slice per tick instead.
    pub fn sweep_slice(&self, ping: &Frame, now: Now, slice: u64, slices: u64) {
        self.enter(now);
        self.refresh_cluster();
        let now = self.ms();
        let config = self.config();
        let (ws, sio) = (&config.websocket, &config.socketio);
        if slice == 0 {
            self.free_idle_channels(now);
            self.auth.expire_revocations(self.now().unix_ms);
            self.expire_offline();
            self.expire_records();
            self.expire_asks();
            let rate = self.config().limits.ip_rate(self.nshards);
            self.connecting
                .borrow_mut()
                .forget_idle(rate, self.now_ms());
        }
        let peers = self.conns.borrow().slice(slice, slices);
        for peer in peers {
            peer.out.borrow_mut().shrink_if_idle();
            let quiet = now.saturating_sub(peer.last_heard.get());
            let in_phase = now.saturating_sub(peer.phase_since.get());
            let stalled = now.saturating_sub(peer.stall_since.get());
            match (peer.phase.get(), peer.stall.get()) {
                (Phase::Http, _) if in_phase > ws.handshake_timeout_ms => abort(&peer),
                (Phase::Closing, _) if in_phase > CLOSE_TIMEOUT_MS => abort(&peer),
                (Phase::Open, _) if now >= peer.token_deadline.get() => {
                    if peer.token_expired.replace(true) {
                        peer.token_deadline.set(u64::MAX);
                        peer.request_close(Close::TokenRefused, "token expired", false);
                    } else {
                        let grace = self.config().auth.token_grace_ms;
                        peer.token_deadline.set(now.saturating_add(grace));
                        self.answer(&peer, &Reply::TokenExpired { grace_ms: grace });
                    }
                }
                (Phase::Open, Stall::Replies) if stalled > ws.reply_timeout_ms => {
                    self.counters.add(Counter::StalledCloses, 1);
                    // Its replies cannot reach it anyway: make room for the close frame.
                    peer.request_close(Close::Stalled, "replies not read", true);
                }
                (Phase::Open, Stall::Message) if stalled > ws.message_timeout_ms => {
                    self.counters.add(Counter::StalledCloses, 1);
                    peer.request_close(Close::Stalled, "message incomplete for too long", false);
                }
                (Phase::Open, Stall::Connect) if stalled > sio.connect_timeout_ms => {
                    peer.request_close(Close::Stalled, "no Socket.IO CONNECT in time", false);
                }
                // Its requests are not being read, so it cannot be heard: no idle check.
                (Phase::Open, Stall::Replies) => {}
                (Phase::Open, _) if peer.dialect() == Dialect::SocketIo => {
                    heartbeat(&peer, sio, now);
                }
                (Phase::Open, _) if quiet > ws.idle_timeout_ms => {
                    self.counters.add(Counter::SlowConsumerCloses, 1);
                    abort(&peer);
                }
                (Phase::Open, _)
                    if quiet >= ws.ping_interval_ms
                        && now.saturating_sub(peer.last_ping.get()) >= ws.ping_interval_ms =>
                {
                    peer.last_ping.set(now);
                    peer.send_urgent(ping.clone());
                }
                _ => {}
            }
        }
    }

    /// Expire history and forget the channels nobody needs any more: no other shard wants
    /// them, none subscribed here, nothing held, no history left (see [`Engine::sweep`]).
    fn free_idle_channels(&self, now: u64) {
        self.look_for_orphans();
        self.fail_late_subscriptions(now);
        let mut subs = self.subs.borrow_mut();
        let mut channels = self.channels.borrow_mut();
        channels.free_idle();
        let needed = |name: &str| subs.wanted(name) || channels.get(name).is_some();
        let mut engine = self.engine.borrow_mut();
        let freed = engine.sweep(now, &needed);
        self.counters.add(Counter::ChannelsFreed, freed as u64);
        self.counters
            .set(Counter::Channels, engine.channels() as u64);
        subs.shrink();
    }

    /// Start graceful shutdown: tell every client to reconnect later, then close with 1001.
    pub fn begin_shutdown(&self) {
        self.shutting_down.set(true);
        let reconnect_in_ms = self.config().shutdown.reconnect_in_ms;
        for peer in self.peers() {
            match peer.phase.get() {
                Phase::Open => {
                    self.answer(&peer, &Reply::Restart { reconnect_in_ms });
                    peer.request_close(Close::GoingAway, "server restarting", false);
                }
                Phase::Http => abort(&peer),
                Phase::Closing => {}
            }
        }
    }

    /// Publish counters for the HTTP endpoints.
    pub fn publish_counters(&self) {
        self.counters.publish(&self.global.shards[self.id]);
    }

    /// A shared ping frame.
    pub fn ping_frame() -> Frame {
        codec::frame(codec::opcode::PING, b"")
    }
}

/// How long a closing connection may take to answer our close frame.
pub const CLOSE_TIMEOUT_MS: u64 = 2_000;

/// The ACK of a decision, owed to a client on any shard.
/// The row of decision `id` (`data` enriched), numbered `seq` (0: not yet), made at `ms`.
fn record(
    channel: &str,
    decision: &Decision,
    key: &str,
    id: &str,
    seq: u64,
    data: Vec<u8>,
    ms: u64,
) -> storage::Record {
    storage::Record {
        id: id.into(),
        org: decision.org_id.clone(),
        channel: channel.into(),
        seq,
        schema: decision::SCHEMA.into(),
        idempotency_key: key.into(),
        direction: decision.direction.clone(),
        decision: decision.decision.clone(),
        tool: decision.tool.clone(),
        scope: decision.scope.clone(),
        payload_hash: decision.payload_hash.clone(),
        latency_ms: decision.latency_ms,
        correlation_id: decision.correlation_id.clone(),
        tags: decision.tags.clone(),
        // Valid UTF-8 (a text frame's, enriched with ASCII): moved, not copied.
        data: String::from_utf8(data)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        created_ms: ms as i64,
    }
}

fn ingest_ack(key: &str, decision_id: &str, dedup: bool, seq: u64) -> Answer {
    Answer::IngestAck {
        key: key.into(),
        decision_id: decision_id.into(),
        dedup,
        seq,
    }
}

/// `storage_unavailable` for a decision, owed to a client on any shard.
fn storage_unavailable(key: &str) -> Answer {
    Answer::StorageUnavailable { key: key.into() }
}

/// Engine.IO's heartbeat: the server pings every `ping_interval_ms` and closes a session
/// whose pong has not come `ping_timeout_ms` after the ping was due. Anything heard counts
/// as the pong (a client busy sending is alive), so a session is dead once nothing has been
/// heard for the interval and the timeout together, whenever the sweep sent the ping.
fn heartbeat(peer: &Peer, sio: &crate::config::SocketIo, now: u64) {
    let last_ping = peer.last_ping.get();
    if crate::socketio::silent_too_long(peer, sio, now) {
        peer.request_close(Close::Stalled, "ping timeout", false);
    } else if peer.last_heard.get() >= last_ping
        && now.saturating_sub(last_ping) >= sio.ping_interval_ms
    {
        peer.last_ping.set(now);
        peer.send_urgent(crate::codec::frame(crate::codec::opcode::TEXT, b"2"));
    }
}

fn abort(peer: &Peer) {
    peer.abort.set(true);
    peer.wake();
}

fn scope_verb(scope: Scope) -> &'static str {
    match scope {
        Scope::Subscribe => "subscribe",
        Scope::Publish => "publish",
        Scope::Ingest => "ingest",
        Scope::Admin => "administer",
        Scope::Tokens => "issue tokens",
    }
}

/// The shard that owns `channel` among `nshards`: a fixed hash of its `type:id` prefix, so all
/// of an org's channels (and its idempotency keys) live on one shard.
pub fn owner_of(channel: &str, nshards: usize) -> usize {
    if nshards <= 1 {
        return 0;
    }
    // DefaultHasher::new() has fixed keys: the same answer on every thread and every run.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    Channel::owner_key(channel).hash(&mut hasher);
    (hasher.finish() % nshards as u64) as usize
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
