//! Socket.IO connection state recovery: a connection that drops without saying goodbye
//! leaves a record (its channels and its [`Trail`]) on its shard for `[socketio] recovery_ms`;
//! a new connection of the same principal that CONNECTs with the record's `pid` and the
//! `offset` of the last message it handled is subscribed again to those channels from where
//! it stood, the core replaying what it missed (from the store, for decisions). Its CONNECT
//! answer keeps the old `pid`, so `socket.recovered` is true, only when every replay is
//! complete.
//!
//! On one node, the pid names the shard holding the record (`{boot}-{shard}-{random}`); a
//! reconnection landing elsewhere asks that shard over the mesh. In a cluster the record is
//! kept in Redis (`{prefix}.recovery.{pid}`, expiring with the window) and taken from there
//! by whichever node the client comes back to; the channels' own epochs go with it, so a
//! replay on another node is complete only if the channel's numbering is the same one.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};

pub use super::replays::TOP;
use super::trail::{Recording, Trail};
use super::{MeshMsg, Peer, Shard};
use crate::auth::Principal;
use crate::dialect::{Dialect, Reply, Request};
use crate::metrics::Counter;
use serde::{Deserialize, Serialize};

/// A Socket.IO connection's recovery state, while it is open.
#[derive(Debug)]
pub struct Recoverable {
    /// Its pid (what its client sends back to recover it).
    pub pid: Box<str>,
    /// What it was sent, in order.
    pub trail: Recording,
    /// The SUB resuming it (its request id) and the pid it takes if that recovers it.
    resuming: Option<(Box<[u8]>, Box<str>)>,
}

/// The request ids a recovering CONNECT is answered with (see [`Shard::recover_session`]).
#[derive(Debug, Clone)]
pub struct ConnectIds {
    /// The answer when the session is resumed.
    pub recovered: Box<[u8]>,
    /// The answer when there is nothing to resume.
    pub fresh: Box<[u8]>,
    /// The pid the connection keeps when it is recovered.
    pub pid: Box<str>,
}

/// What a dropped connection left.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    /// Whose it was: `org` and user (or key id).
    owner: (Box<str>, Box<str>),
    channels: Vec<Box<str>>,
    /// The channels' own epochs, where the engine has them (in a cluster).
    epochs: Vec<Option<Box<str>>>,
    /// Joined as rooms (presence members, `room:message`).
    rooms: bool,
    trail: Trail,
    expires_ms: u64,
}

/// The records a shard keeps.
#[derive(Debug, Default)]
pub(super) struct Records {
    by_pid: HashMap<Box<str>, Record>,
    /// Pids by expiry (records taken early leave stale entries, skipped).
    order: VecDeque<(u64, Box<str>)>,
    /// In a cluster: records being taken from Redis, by token.
    taking: HashMap<u64, Taking>,
}

/// A record being taken from Redis for a connection of this shard.
#[derive(Debug)]
struct Taking {
    conn: u64,
    offset: Option<(String, u64)>,
    owner: (Box<str>, Box<str>),
    ids: ConnectIds,
}

/// Where a recovered connection resumes: its channels with the last seq it has of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// `(channel, last seq the client has)`.
    pub since: Vec<(String, u64)>,
    /// Joined as rooms.
    pub rooms: bool,
    /// `(channel, epoch)` of the channels whose own epoch the record has.
    pub epochs: Vec<(String, String)>,
}

/// Who a principal is, for matching a record: its org and its user (or key id).
fn owner(principal: &Principal) -> (Box<str>, Box<str>) {
    let who = principal.user.as_deref().or(principal.key_id.as_deref());
    (principal.org.clone(), who.unwrap_or("").into())
}

/// An offset as the dialect writes it: `{seq}:{channel}`.
pub fn parse_offset(offset: &str) -> Option<(&str, u64)> {
    let (seq, channel) = offset.split_once(':')?;
    Some((channel, seq.parse().ok()?))
}

/// The longest pid looked for.
const MAX_PID: usize = 128;

/// The shard named by `pid` (`{boot}-{shard}-{random}`), when it is one of this node's.
fn pid_shard(pid: &str, boot_id: u64, nshards: usize) -> Option<usize> {
    let mut parts = pid.splitn(3, '-');
    let boot = u64::from_str_radix(parts.next()?, 16).ok()?;
    let shard: usize = parts.next()?.parse().ok()?;
    parts.next()?;
    (boot == boot_id && shard < nshards).then_some(shard)
}

impl Shard {
    /// `peer` (a Socket.IO connection of the main namespace) may be recovered: its pid.
    pub fn enable_recovery(&self, peer: &Peer) -> Box<str> {
        // Keyed by the process's random hash keys: not guessable from outside.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(peer.id);
        let random = hasher.finish();
        let pid: Box<str> = format!("{:x}-{}-{random:x}", self.global.boot_id, self.id).into();
        peer.replace_recovery(Some(Box::new(Recoverable {
            pid: pid.clone(),
            trail: Recording::default(),
            resuming: None,
        })));
        pid
    }

    /// `peer`'s client said goodbye (or its session ended for good): nothing to recover.
    pub fn disable_recovery(&self, peer: &Peer) {
        peer.replace_recovery(None);
    }

    /// `peer` is going: keep what its client needs to recover it.
    pub(super) fn keep_for_recovery(&self, peer: &Peer) {
        let Some(recoverable) = peer.replace_recovery(None) else {
            return;
        };
        let Some(principal) = peer.principal() else {
            return;
        };
        let window = self.config().socketio.recovery_ms;
        if window == 0 {
            return;
        }
        let now = self.now().unix_ms;
        let Recoverable { pid, trail, .. } = *recoverable;
        let channels: Vec<Box<str>> = peer
            .channels
            .borrow()
            .iter()
            .map(|c| Box::from(&**c))
            .collect();
        let engine = self.engine.borrow();
        let epochs = channels
            .iter()
            .map(|c| engine.epoch(c).map(Into::into))
            .collect();
        let cluster = !engine.numbers_locally();
        drop(engine);
        let record = Record {
            owner: owner(&principal),
            channels,
            epochs,
            rooms: peer.dialect() == Dialect::SocketIoRooms,
            trail: trail.seal(),
            expires_ms: now.saturating_add(window),
        };
        if cluster {
            match simd_json::serde::to_vec(&record) {
                Ok(bytes) => self.engine.borrow_mut().keep_record(&pid, bytes, window),
                Err(e) => tracing::warn!("a Socket.IO session's record was not kept: {e}"),
            }
            return;
        }
        // Where the pid says, for the reconnection to find it (a recovered connection kept
        // the pid of its first shard).
        match pid_shard(&pid, self.global.boot_id, self.nshards) {
            Some(shard) if shard != self.id => {
                let record = Box::new(record);
                self.route(shard, MeshMsg::KeepRecord { pid, record });
            }
            _ => self.keep_record(pid, record),
        }
    }

    /// Forget the records whose window has passed (the sweep; keeping and taking do too).
    pub(super) fn expire_records(&self) {
        self.records.borrow_mut().expire(self.now().unix_ms);
    }

    /// Keep `record` for `pid` until it expires or is taken.
    pub(super) fn keep_record(&self, pid: Box<str>, record: Record) {
        let mut records = self.records.borrow_mut();
        records.expire(self.now().unix_ms);
        let most = self
            .config()
            .socketio
            .max_recoverable
            .div_ceil(self.nshards);
        if records.by_pid.len() >= most.max(1) {
            return;
        }
        records.order.push_back((record.expires_ms, pid.clone()));
        records.by_pid.insert(pid, record);
    }

    /// `peer` CONNECTs with `pid` and `offset`: resume it where the record says. `ids` are
    /// the request ids of the CONNECT's answer: as a recovery (the core answers it with the
    /// SUB that resumes the channels), and as a fresh session when there is no record.
    pub fn recover_session(&self, peer: &Peer, pid: &str, offset: Option<&str>, ids: ConnectIds) {
        let Some(principal) = peer.principal() else {
            return;
        };
        if pid.len() > MAX_PID {
            // Not one of ours (they are about 40 bytes): nothing to look for.
            return self.resume(peer.id, None, ids);
        }
        let offset = offset
            .and_then(parse_offset)
            .map(|(c, s)| (c.to_owned(), s));
        if !self.engine.borrow().numbers_locally() {
            let token = self.token();
            let taking = Taking {
                conn: peer.id,
                offset,
                owner: owner(&principal),
                ids,
            };
            self.records.borrow_mut().taking.insert(token, taking);
            self.engine.borrow_mut().take_record(pid, token);
            return self.deliver_events();
        }
        match pid_shard(pid, self.global.boot_id, self.nshards) {
            Some(shard) if shard != self.id => self.route(
                shard,
                MeshMsg::TakeRecord {
                    pid: pid.into(),
                    offset,
                    owner: owner(&principal),
                    to: (self.id as u16, peer.id),
                    ids,
                },
            ),
            Some(_) => {
                let resume = self.take_record(pid, offset, &owner(&principal));
                self.resume(peer.id, resume, ids);
            }
            None => self.resume(peer.id, None, ids),
        }
    }

    /// Take record `pid` for a client of `who` that handled up to `offset`: where it resumes.
    pub(super) fn take_record(
        &self,
        pid: &str,
        offset: Option<(String, u64)>,
        who: &(Box<str>, Box<str>),
    ) -> Option<Resume> {
        let mut records = self.records.borrow_mut();
        records.expire(self.now().unix_ms);
        if records.by_pid.get(pid).is_none_or(|r| r.owner != *who) {
            return None;
        }
        let record = records.by_pid.remove(pid)?;
        record.resume(offset)
    }

    /// Redis answered the take of a record (token `token`).
    pub(super) fn record_taken(&self, token: u64, result: Result<Option<Vec<u8>>, String>) {
        let Some(taking) = self.records.borrow_mut().taking.remove(&token) else {
            return;
        };
        let record = match result {
            Ok(bytes) => {
                bytes.and_then(|mut b| simd_json::serde::from_slice::<Record>(&mut b).ok())
            }
            Err(e) => {
                tracing::warn!(
                    shard = self.id,
                    "a Socket.IO session could not be recovered: {e}"
                );
                None
            }
        };
        let resume = record
            .filter(|r| r.owner == taking.owner)
            .and_then(|r| r.resume(taking.offset));
        self.resume(taking.conn, resume, taking.ids);
    }

    /// Resume connection `conn` as `resume` says (or not at all): a SUB from where it stood,
    /// whose SUBSCRIBED answers the CONNECT (as recovered only if every replay is complete).
    pub(super) fn resume(&self, conn: u64, resume: Option<Resume>, ids: ConnectIds) {
        let Some(peer) = self.peer(conn) else {
            return;
        };
        let Some(principal) = peer.principal() else {
            return;
        };
        let answer = |id: &[u8]| {
            let subscribed = Reply::Subscribed {
                channels: &[],
                id: Some(id),
                epoch: self.epoch,
                epochs: &[],
                recovered: &[],
            };
            self.answer(&peer, &subscribed);
        };
        let Some(resume) = resume else {
            self.counters.add(Counter::SocketIoNotRecovered, 1);
            return answer(&ids.fresh);
        };
        peer.with_recovery(|r| r.resuming = Some((ids.recovered.clone(), ids.pid.clone())));
        if resume.since.is_empty() {
            // Nothing to replay: recovered as it is.
            return self.resumed(&peer, &ids.recovered, true, || answer(&ids.recovered));
        }
        if resume.rooms {
            peer.set_dialect(Dialect::SocketIoRooms);
        }
        let channels: Vec<String> = resume.since.iter().map(|(c, _)| c.clone()).collect();
        let sub = Request::Sub {
            channels: channels.clone(),
            id: Some(&ids.recovered),
            since: resume.since,
            // A record of this process is of this epoch; one from Redis carries its
            // channels' own, which the owners compare.
            epoch: resume.epochs.is_empty().then_some(self.epoch),
            epochs: resume.epochs,
            presence: resume.rooms,
        };
        let now = self.now();
        let _ = self.request(&peer, &principal, sub, now);
        let held = peer.channels.borrow();
        if !channels.iter().any(|c| held.iter().any(|h| **h == **c)) {
            // Refused whole (the rights changed, or too many): no SUBSCRIBED will answer.
            drop(held);
            self.resumed(&peer, &ids.recovered, false, || answer(&ids.fresh));
        }
    }

    /// The SUB with request id `id` is answered (`complete`: every replay whole): if it
    /// resumes `peer`, the connection takes the old pid when recovered. Then `answer`.
    pub(super) fn resumed(&self, peer: &Peer, id: &[u8], complete: bool, answer: impl FnOnce()) {
        let resumed = peer.with_recovery(|recoverable| {
            let mine = recoverable
                .resuming
                .as_ref()
                .is_some_and(|(i, _)| **i == *id);
            if mine {
                if let Some((_, pid)) = recoverable.resuming.take().filter(|_| complete) {
                    recoverable.pid = pid;
                }
            }
            mine
        });
        if resumed == Some(true) {
            let counter = if complete {
                Counter::SocketIoRecovered
            } else {
                Counter::SocketIoNotRecovered
            };
            self.counters.add(counter, 1);
        }
        answer();
    }
}

impl Record {
    /// Where a client that handled up to `offset` resumes.
    fn resume(self, offset: Option<(String, u64)>) -> Option<Resume> {
        let offset = offset.as_ref().map(|(c, s)| (c.as_str(), *s));
        let seqs = self.trail.position(offset, &self.channels)?;
        let epochs = self.channels.iter().zip(&self.epochs);
        let epochs = epochs.filter_map(|(c, e)| Some((c.to_string(), e.as_deref()?.to_owned())));
        Some(Resume {
            since: self
                .channels
                .iter()
                .map(|c| c.to_string())
                .zip(seqs)
                .collect(),
            rooms: self.rooms,
            epochs: epochs.collect(),
        })
    }
}

impl Records {
    fn expire(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.order.front() {
            if *at > now_ms {
                return;
            }
            if let Some((_, pid)) = self.order.pop_front() {
                if self
                    .by_pid
                    .get(&pid)
                    .is_some_and(|r| r.expires_ms <= now_ms)
                {
                    self.by_pid.remove(&pid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_name_their_shard_on_this_node_only() {
        assert_eq!(pid_shard("1f-1-abc", 0x1f, 2), Some(1));
        assert_eq!(pid_shard("1f-2-abc", 0x1f, 2), None);
        assert_eq!(pid_shard("20-1-abc", 0x1f, 2), None);
        assert_eq!(pid_shard("1f-1", 0x1f, 2), None);
        assert_eq!(pid_shard("", 0x1f, 2), None);
        assert_eq!(parse_offset("17:org:acme:a"), Some(("org:acme:a", 17)));
        assert_eq!(parse_offset("x:org"), None);
    }
}
