//! Messages for users who are not connected (`[offline]`), kept by the owner of the user's
//! channels (every `user:{id}:*` channel has one owner), and which shards of the node hold
//! each user's connections: the owner decides from that whether a message to the user is
//! delivered or kept, and delivers what it kept when a connection of the user arrives, before
//! anything sent after (both go from the owner to that shard, and the mesh keeps their order).
//!
//! What is kept is bounded per user (messages, bytes: the oldest goes first), per node (bytes:
//! past it nothing more is kept) and in time (`ttl_secs`); it is written to the store in order
//! (one reader thread) so that a restart delivers it still.

use std::collections::{HashMap, VecDeque};

use indexmap::IndexMap;
use std::rc::Rc;

use smallvec::SmallVec;

use super::directory::{Audience, Direct, ToUser};
use super::{MeshMsg, Shard};
use crate::dialect::{Kind, Publication};
use crate::metrics::Counter;
use crate::storage::{self, OfflineOp, OfflineRow};

/// Users' queues an expiry sweep looks at.
const SWEEP_QUEUES: usize = 1_024;

/// A message kept for a user.
#[derive(Debug, Clone)]
pub struct Kept {
    /// Its id in the store.
    pub id: Box<str>,
    /// Its order within its millisecond.
    pub ord: i64,
    /// Only for the user's connections of this org.
    pub org: Option<Box<str>>,
    /// The user's channel it was numbered on.
    pub channel: Box<str>,
    /// The message.
    pub publication: Publication,
    /// When it was kept (Unix ms).
    pub created_ms: u64,
    /// When it is dropped undelivered (Unix ms).
    pub expires_ms: u64,
}

/// One user's kept messages.
#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Kept>,
    bytes: usize,
}

/// What the owner of users' channels knows of them.
#[derive(Debug, Default)]
pub(super) struct Offline {
    /// The shards of this node with connections of each user.
    pub(super) online: HashMap<Box<str>, SmallVec<[u16; 2]>>,
    /// Messages kept for users not connected.
    queues: IndexMap<Box<str>, Queue>,
    /// Where the next expiry sweep starts among `queues` (each sweep looks at a slice).
    sweep_at: usize,
    /// Their bytes, all users together.
    bytes: usize,
    /// Their number, all users together.
    kept: usize,
    /// The last `ord` given.
    ord: i64,
    /// In a cluster: users whose kept messages are being taken from Redis, and what came
    /// for them meanwhile.
    pub(super) taking: HashMap<Box<str>, Vec<super::users::Held>>,
    /// In a cluster: reads of what Redis keeps, by token.
    pub(super) reads: HashMap<u64, super::users::Read>,
    /// In a cluster: users connected here whose mark in Redis failed (marked, and what
    /// was kept for them taken, at the next refresh).
    pub(super) unmarked: Vec<Box<str>>,
}

impl Offline {
    /// Messages kept, all users together.
    pub fn len(&self) -> usize {
        self.kept
    }
}

/// The owner shard of `user`'s channels.
pub fn owner_of_user(user: &str, nshards: usize) -> usize {
    // Channels are owned by their `type:id`; any category does.
    super::owner_of(&format!("user:{user}:_"), nshards)
}

impl Shard {
    /// Tell the owner of `user`'s channels that this shard has (or no longer has) connections
    /// of the user.
    pub(super) fn tell_online(&self, user: &str, on: bool) {
        let owner = owner_of_user(user, self.nshards);
        let msg = MeshMsg::UserOnline {
            user: user.into(),
            shard: self.id as u16,
            on,
        };
        self.route(owner, msg);
    }

    /// At the owner: `shard` has (or no longer has) connections of `user`; the first one
    /// gets what was kept for the user.
    pub(super) fn user_online(&self, user: &str, shard: u16, on: bool) {
        if !self.engine.borrow().numbers_locally() {
            return self.user_online_in_cluster(user, shard, on);
        }
        let mut offline = self.offline.borrow_mut();
        if !on {
            if let Some(shards) = offline.online.get_mut(user) {
                shards.retain(|s| *s != shard);
                if shards.is_empty() {
                    offline.online.remove(user);
                }
            }
            return;
        }
        let shards = offline.online.entry(user.into()).or_default();
        if !shards.contains(&shard) {
            shards.push(shard);
        }
        let Some(queue) = offline.queues.swap_remove(user) else {
            return;
        };
        offline.bytes -= queue.bytes;
        offline.kept -= queue.messages.len();
        drop(offline);
        self.recount_offline();
        let now = self.now().unix_ms;
        let mut delivered = 0;
        for kept in queue.messages.into_iter().filter(|k| k.expires_ms > now) {
            delivered += 1;
            let audience = Audience::User {
                user: user.into(),
                org: kept.org,
            };
            let direct = Direct::Publication {
                channel: kept.channel,
                publication: kept.publication.to_sendable(),
            };
            self.direct_to(shard, audience, direct, None);
        }
        self.counters.add(Counter::OfflineDelivered, delivered);
        let clear = OfflineOp::Clear {
            user: user.into(),
            org: None,
        };
        self.store_offline(clear, None);
    }

    /// At the owner, once `publication` is numbered on `user`'s `channel`: to the shards
    /// with the user's connections, or kept for when there are some. In a cluster this is
    /// a message the node numbered alone (its Redis is down): for its own connections only,
    /// like any message numbered so (Redis tells every node of the others: `users.rs`).
    pub(super) fn user_message(&self, channel: &str, publication: &Publication, to: ToUser) {
        let ToUser {
            user,
            org,
            reached,
            queued,
        } = to;
        if !self.config().offline.enabled || !self.engine.borrow().numbers_locally() {
            return self.to_connected(&user, org, channel, publication, reached);
        }
        // Kept if the user has no connection here as far as this owner knows. One being
        // opened right now (its shard's word still on the way) gets it right after, in order,
        // with what was kept before.
        if self.to_online(&user, org.clone(), channel, publication, Some(reached)) {
            return;
        }
        let Some(row) = self.keep_offline(&user, org, channel, publication) else {
            return;
        };
        let _ = reached;
        self.store_offline(row, Some(queued));
    }

    /// At the owner: `publication` of `user`'s `channel` to the shards of this node with
    /// connections of the user (of `org`), each counting on `reached`; false when there are
    /// none.
    pub(super) fn to_online(
        &self,
        user: &str,
        org: Option<Box<str>>,
        channel: &str,
        publication: &Publication,
        reached: Option<flume::Sender<usize>>,
    ) -> bool {
        let shards = self.offline.borrow().online.get(user).cloned();
        let Some(shards) = shards else {
            return false;
        };
        let audience = Audience::User {
            user: user.into(),
            org,
        };
        for shard in shards {
            let direct = Direct::Publication {
                channel: channel.into(),
                publication: publication.to_sendable(),
            };
            self.direct_to(shard, audience.clone(), direct, reached.clone());
        }
        true
    }

    /// At the owner: `publication` to the user's connections on this node, without keeping
    /// it: to the shards the owner knows of, or, knowing of none, to every shard (a
    /// connection of the user may be opening, its shard's word still on the way).
    pub(super) fn to_connected(
        &self,
        user: &str,
        org: Option<Box<str>>,
        channel: &str,
        publication: &Publication,
        reached: flume::Sender<usize>,
    ) {
        let reply = Some(reached.clone());
        if self.to_online(user, org.clone(), channel, publication, reply) {
            return;
        }
        let audience = Audience::User {
            user: user.into(),
            org,
        };
        for shard in 0..self.nshards {
            let direct = Direct::Publication {
                channel: channel.into(),
                publication: publication.to_sendable(),
            };
            self.direct_to(
                shard as u16,
                audience.clone(),
                direct,
                Some(reached.clone()),
            );
        }
    }

    /// Send `direct` for `audience` to shard `shard`, whose count (if asked) goes to `reply`.
    pub(super) fn direct_to(
        &self,
        shard: u16,
        audience: Audience,
        direct: Direct,
        reply: Option<flume::Sender<usize>>,
    ) {
        let msg = MeshMsg::Direct {
            audience,
            direct,
            reply,
        };
        self.route(usize::from(shard), msg);
    }

    /// Keep a message for `user` within the bounds: the store's change, or `None` when the
    /// node keeps too much already.
    fn keep_offline(
        &self,
        user: &str,
        org: Option<Box<str>>,
        channel: &str,
        publication: &Publication,
    ) -> Option<OfflineOp> {
        let limits = &self.config().offline;
        let size = publication.data.len();
        let mut offline = self.offline.borrow_mut();
        let node_share = limits.max_total_bytes / self.nshards.max(1);
        if size > limits.max_bytes || offline.bytes + size > node_share {
            self.counters.add(Counter::OfflineRefused, 1);
            return None;
        }
        offline.ord += 1;
        let ord = offline.ord;
        let now = self.now().unix_ms;
        let kept = Kept {
            id: format!("{:x}-{}-{ord}", self.global.boot_id, self.id).into(),
            ord,
            org,
            channel: channel.into(),
            publication: publication.clone(),
            created_ms: now,
            expires_ms: now.saturating_add(limits.ttl_secs.saturating_mul(1_000)),
        };
        let row = row(user, &kept);
        let queue = offline.queues.entry(user.into()).or_default();
        queue.bytes += size;
        queue.messages.push_back(kept);
        let (mut dropped, mut freed) = (Vec::new(), 0);
        while queue.messages.len() > limits.max_messages || queue.bytes > limits.max_bytes {
            let Some(old) = queue.messages.pop_front() else {
                break;
            };
            queue.bytes -= old.publication.data.len();
            freed += old.publication.data.len();
            dropped.push(old.id.to_string());
        }
        offline.bytes = offline.bytes + size - freed;
        offline.kept = offline.kept + 1 - dropped.len();
        drop(offline);
        self.recount_offline();
        self.counters
            .add(Counter::OfflineDropped, dropped.len() as u64);
        Some(OfflineOp::Keep { row, dropped })
    }

    /// Hand `op` to the store (in order with the others), then say on `done` whether it is
    /// kept; without a store, at once.
    fn store_offline(&self, op: OfflineOp, done: Option<flume::Sender<bool>>) {
        let Some(link) = &self.storage else {
            if let Some(done) = done {
                let _ = done.send(true);
            }
            return;
        };
        let reply: storage::reader::Reply = Box::new(move |result| {
            if let Err(e) = &result {
                tracing::warn!("an offline message change was not stored: {e}");
            }
            if let Some(done) = done {
                let _ = done.send(result.is_ok());
            }
        });
        if let Err(e) = link
            .ordered
            .submit(storage::reader::Query::Offline(op), reply)
        {
            tracing::warn!(
                shard = self.id,
                "an offline message change was refused: {e}"
            );
        }
    }

    /// What is kept for `user` (at the owner), oldest first: what `org` sent, or all.
    pub(super) fn offline_queue(&self, user: &str, org: Option<&str>) -> Vec<OfflineRow> {
        let now = self.now().unix_ms;
        let offline = self.offline.borrow();
        let queue = offline.queues.get(user).into_iter();
        let kept = queue.flat_map(|q| q.messages.iter());
        kept.filter(|k| k.expires_ms > now && sent_by(k, org))
            .map(|k| row(user, k))
            .collect()
    }

    /// Drop what is kept for `user` (at the owner): what `org` sent, or all.
    pub(super) fn offline_clear(&self, user: &str, org: Option<&str>) {
        let mut offline = self.offline.borrow_mut();
        let Some(queue) = offline.queues.get_mut(user) else {
            return;
        };
        let (before, count) = (queue.bytes, queue.messages.len());
        queue.messages.retain(|k| !sent_by(k, org));
        queue.bytes = queue
            .messages
            .iter()
            .map(|k| k.publication.data.len())
            .sum();
        let (freed, gone) = (before - queue.bytes, count - queue.messages.len());
        if queue.messages.is_empty() {
            offline.queues.swap_remove(user);
        }
        offline.kept -= gone;
        offline.bytes -= freed;
        drop(offline);
        self.recount_offline();
        let clear = OfflineOp::Clear {
            user: user.into(),
            org: org.map(Into::into),
        };
        self.store_offline(clear, None);
    }

    /// Drop what has waited past its `ttl_secs`, looking at the next [`SWEEP_QUEUES`] users'
    /// queues (a sweep of every user at once would hold the shard for as long as there are
    /// users); the store drops its rows on its next change.
    pub(super) fn expire_offline(&self) {
        let now = self.now().unix_ms;
        let mut offline = self.offline.borrow_mut();
        let (mut freed, mut gone) = (0, 0);
        let mut at = offline.sweep_at;
        for _ in 0..SWEEP_QUEUES {
            let Some((_, queue)) = offline.queues.get_index_mut(at) else {
                at = 0;
                break;
            };
            while queue.messages.front().is_some_and(|k| k.expires_ms <= now) {
                if let Some(old) = queue.messages.pop_front() {
                    queue.bytes -= old.publication.data.len();
                    freed += old.publication.data.len();
                    gone += 1;
                }
            }
            if queue.messages.is_empty() {
                // The last one takes its place: looked at next.
                offline.queues.swap_remove_index(at);
            } else {
                at += 1;
            }
        }
        offline.sweep_at = at;
        offline.bytes -= freed;
        offline.kept -= gone;
        drop(offline);
        self.recount_offline();
    }

    /// Take back what the store kept for the users whose channels this shard owns.
    pub(super) fn recover_offline(&self, rows: &[OfflineRow]) {
        let mut offline = self.offline.borrow_mut();
        for row in rows {
            if owner_of_user(&row.user, self.nshards) != self.id {
                continue;
            }
            let kept = Kept {
                id: row.id.as_str().into(),
                ord: row.ord,
                org: row.org.as_deref().map(Into::into),
                channel: row.channel.as_str().into(),
                publication: Publication {
                    seq: row.seq,
                    kind: Kind::Message,
                    data: Rc::from(row.data.as_bytes()),
                },
                created_ms: row.created_ms.max(0) as u64,
                expires_ms: row.expires_ms.max(0) as u64,
            };
            let size = kept.publication.data.len();
            offline.bytes += size;
            offline.kept += 1;
            let queue = offline.queues.entry(row.user.as_str().into()).or_default();
            queue.bytes += size;
            queue.messages.push_back(kept);
        }
        drop(offline);
        self.recount_offline();
    }

    fn recount_offline(&self) {
        let kept = self.offline.borrow().len();
        self.counters.set(Counter::OfflineKept, kept as u64);
    }
}

/// Whether `kept` was sent by `org` (any, when `None`).
fn sent_by(kept: &Kept, org: Option<&str>) -> bool {
    org.is_none_or(|org| kept.org.as_deref() == Some(org))
}

/// The store's row of a message kept for `user`.
fn row(user: &str, kept: &Kept) -> OfflineRow {
    OfflineRow {
        id: kept.id.to_string(),
        ord: kept.ord,
        user: user.into(),
        org: kept.org.as_deref().map(Into::into),
        channel: kept.channel.to_string(),
        seq: kept.publication.seq,
        data: String::from_utf8_lossy(&kept.publication.data).into_owned(),
        created_ms: kept.created_ms as i64,
        expires_ms: kept.expires_ms as i64,
    }
}
