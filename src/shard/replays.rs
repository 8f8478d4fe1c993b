//! Replays: the messages a subscriber (or an HTTP history page) asks for after some seq, and
//! those waiting for the store because the owner's in-memory history no longer reaches back
//! far enough.
//!
//! Plain data, no I/O: the owner reads its ring and the store around it.

use std::collections::HashMap;
use std::rc::Rc;

use crate::dialect::{Kind, Publication};

/// A `since` that asks for nothing but where the channel stands (the replay's `upto`): a
/// recoverable connection's subscription, whose trail starts there.
pub const TOP: u64 = u64::MAX;

/// Where a reconnecting subscriber left a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// Last seq the client has.
    pub after: u64,
    /// The client's seqs come from an earlier epoch (a restart may have reused them).
    pub stale: bool,
    /// The channel's epoch the client's seqs come from, if it sent one: the owner compares
    /// it with the channel's own (in a cluster), and it takes the place of `stale`.
    pub epoch: Option<Box<str>>,
}

/// Messages a subscriber missed on one channel, from the owner's history. `D` is the
/// publications' data (`Vec<u8>` to cross shards).
#[derive(Debug)]
pub struct Replay<D = Rc<[u8]>> {
    /// Channel.
    pub channel: Box<str>,
    /// What came after the client's seq, in order.
    pub messages: Vec<Publication<D>>,
    /// Last seq sent before the subscription was registered: live messages above it follow.
    pub upto: u64,
    /// Every message after the client's seq is in `messages`.
    pub complete: bool,
    /// The channel's own epoch, when the engine has one (in a cluster).
    pub epoch: Option<Box<str>>,
}

impl Replay {
    /// The same replay with owned bytes, to cross to another shard.
    pub(super) fn into_sendable(self) -> Replay<Vec<u8>> {
        Replay {
            channel: self.channel,
            messages: self.messages.iter().map(Publication::to_sendable).collect(),
            upto: self.upto,
            complete: self.complete,
            epoch: self.epoch,
        }
    }
}

impl Replay<Vec<u8>> {
    /// The same replay, shareable within a shard.
    pub(super) fn into_shared(self) -> Replay {
        Replay {
            channel: self.channel,
            messages: self
                .messages
                .into_iter()
                .map(Publication::into_shared)
                .collect(),
            upto: self.upto,
            complete: self.complete,
            epoch: self.epoch,
        }
    }
}

/// A page of a channel's history, for `GET /api/channels/{channel}/history`.
#[derive(Debug)]
pub struct HistoryPage {
    /// What came after the asked seq, in order, at most the asked limit.
    pub messages: Vec<Publication<Vec<u8>>>,
    /// No message between the asked seq and the last frame is missing.
    pub complete: bool,
    /// More messages follow the last frame.
    pub more: bool,
}

/// Where a replay goes once the owner has it.
#[derive(Debug)]
pub(super) enum ReplayTo {
    /// A pending SUB on some shard.
    Sub { shard: usize, token: u64 },
    /// An HTTP history request, with its page size.
    Http {
        reply: flume::Sender<HistoryPage>,
        limit: usize,
    },
}

/// A replay waiting for stored decisions older than the channel's in-memory history.
#[derive(Debug)]
pub(super) struct PendingRead {
    pub to: ReplayTo,
    pub since: Since,
    /// Lowest seq the ring holds is above this; the store is asked for `(since, floor]`.
    pub floor: u64,
    /// Most rows asked of the store (an HTTP page may end inside the stored range).
    pub limit: usize,
    /// What the ring had when the subscriber was registered.
    pub ring: Replay,
}

impl PendingRead {
    /// Put the stored decisions `rows` (read for this replay) before what the ring had.
    /// Returns where the replay goes, the replay, and whether more messages follow its last
    /// one (an HTTP page that ended in the store).
    ///
    /// The replay is complete when the store holds every seq the ring lost (a hole means an
    /// ephemeral message, gone for good).
    pub fn merge(self, rows: Vec<(u64, String)>) -> (ReplayTo, Replay, bool) {
        let mut replay = self.ring;
        // Seqs are unique and within (after, floor]: as many rows as seqs means no hole.
        let after = self.since.after;
        let missing = self.floor - after;
        let page_ends_in_store = rows.len() == self.limit && (self.limit as u64) < missing;
        let reaches = rows.last().map_or(after, |(seq, _)| *seq);
        let whole = if page_ends_in_store {
            rows.len() as u64 == reaches - after
        } else {
            rows.len() as u64 == missing
        };
        replay.complete = !self.since.stale && whole;
        let stored = rows.into_iter().map(|(seq, data)| Publication {
            seq,
            kind: Kind::Decision,
            data: Rc::from(data.into_bytes()),
        });
        let mut messages: Vec<Publication> = stored.collect();
        // A page that ends in the store leaves the ring's messages for the next page.
        if !page_ends_in_store {
            messages.append(&mut replay.messages);
        }
        replay.messages = messages;
        (self.to, replay, page_ends_in_store)
    }
}

/// A replay waiting for the engine's history (a round trip to Redis).
#[derive(Debug)]
pub(super) struct Asked {
    pub channel: Box<str>,
    pub since: Since,
    pub to: ReplayTo,
}

/// The replays of one shard waiting for the store or the engine, by read token.
#[derive(Debug, Default)]
pub(super) struct Replays {
    reading: HashMap<u64, PendingRead>,
    asked: HashMap<u64, Asked>,
}

impl Replays {
    /// Wait for the engine's history read `token`.
    pub fn ask(&mut self, token: u64, asked: Asked) {
        self.asked.insert(token, asked);
    }

    /// The replay the engine's read `token` was for.
    pub fn answer(&mut self, token: u64) -> Option<Asked> {
        self.asked.remove(&token)
    }

    /// Wait for store read `token`.
    pub fn wait(&mut self, token: u64, read: PendingRead) {
        self.reading.insert(token, read);
    }

    /// The replay read `token` was for.
    pub fn take(&mut self, token: u64) -> Option<PendingRead> {
        self.reading.remove(&token)
    }
}
