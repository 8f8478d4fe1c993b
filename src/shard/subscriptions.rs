//! A shard's local subscriptions: who on this shard wants each channel, which of them still
//! wait for a replay (their live messages are kept until it is sent), and the SUBs waiting
//! for owners on other shards.
//!
//! Plain data, no I/O: the shard asks owners and sends frames around it.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use indexmap::IndexMap;

use crate::codec::Frame;
use crate::dialect::{Dialect, Encoded, Notice, Publication};

use super::{Peer, Replay};

/// A channel's local subscribers by connection id: O(1) removal, dense iteration for fan-out.
type Subscribers = IndexMap<u64, Rc<Peer>>;

/// A SUB waiting for owners on other shards to register this shard's interest (and for
/// their replays, for channels asked with `since`).
#[derive(Debug)]
pub(super) struct PendingSub {
    pub conn: u64,
    pub channels: Vec<String>,
    pub id: Option<Box<[u8]>>,
    /// Owner answers still to come.
    pub waiting: usize,
    pub replays: Vec<Replay>,
    /// `(channel, epoch)` of the channels without a replay whose epoch the owner gave.
    pub epochs: Vec<(Box<str>, Box<str>)>,
    /// Channels the node could not subscribe to in time (taken out of `channels`).
    pub failed: Vec<String>,
    /// Channels whose replay only says where they stand ([`super::replays::TOP`]).
    pub probes: Vec<String>,
}

/// A subscriber waiting for its replay: live messages for it are kept until the replay is
/// sent, then those above the replay's `upto` follow it.
#[derive(Debug)]
struct CatchUp {
    token: u64,
    live: VecDeque<(u64, Frame)>,
}

/// Live messages kept for a subscriber while its replay was on the way.
pub(super) type Live = VecDeque<(u64, Frame)>;

/// The local subscriptions of one shard.
#[derive(Default)]
pub(super) struct Subscriptions {
    by_channel: HashMap<Rc<str>, Subscribers>,
    /// Per channel, the subscribers waiting for a replay, by connection id.
    catching_up: HashMap<Rc<str>, HashMap<u64, CatchUp>>,
    /// SUBs waiting for owners, by token.
    pending: HashMap<u64, PendingSub>,
    /// Per channel, the local subscribers that are its presence members (they hear its
    /// JOIN, LEAVE and STATUS).
    members: HashMap<Rc<str>, Subscribers>,
}

impl Subscriptions {
    /// Whether connection `conn` is subscribed to `channel` (one lookup: the connection's own
    /// list may be long).
    pub fn has(&self, channel: &str, conn: u64) -> bool {
        self.by_channel
            .get(channel)
            .is_some_and(|members| members.contains_key(&conn))
    }

    /// The channels with subscribers here whose names start with `prefix`, and how many.
    pub fn counts(&self, prefix: &str) -> Vec<(Box<str>, usize)> {
        let named = self
            .by_channel
            .iter()
            .filter(|(c, _)| c.starts_with(prefix));
        named.map(|(c, subs)| ((**c).into(), subs.len())).collect()
    }

    /// How many local subscribers `channel` has.
    pub fn count(&self, channel: &str) -> usize {
        self.by_channel
            .get(channel)
            .map_or(0, |members| members.len())
    }

    /// Whether `channel` has any local subscriber.
    pub fn wanted(&self, channel: &str) -> bool {
        self.by_channel.contains_key(channel)
    }

    /// Subscribe `peer` to `channel`; false when it already was.
    pub fn add(&mut self, channel: Rc<str>, peer: &Rc<Peer>) -> bool {
        let members = self.by_channel.entry(channel).or_default();
        members.insert(peer.id, peer.clone()).is_none()
    }

    /// From now until the replay of SUB `token` is sent, keep `conn`'s live messages.
    pub fn begin_catch_up(&mut self, channel: Rc<str>, conn: u64, token: u64) {
        let live = VecDeque::new();
        let waiting = self.catching_up.entry(channel).or_default();
        waiting.insert(conn, CatchUp { token, live });
    }

    /// What was kept for `conn` on `channel` while SUB `token`'s replay was on the way; `None`
    /// when it unsubscribed meanwhile (or a later SUB of the same channel took over).
    pub fn end_catch_up(&mut self, channel: &str, conn: u64, token: u64) -> Option<Live> {
        let waiting = self.catching_up.get_mut(channel)?;
        let mine = match waiting.get(&conn) {
            Some(c) if c.token == token => waiting.remove(&conn).map(|c| c.live),
            _ => None,
        };
        if waiting.is_empty() {
            self.catching_up.remove(channel);
        }
        mine
    }

    /// Unsubscribe `conn` from `channel`; true when that was the channel's last local
    /// subscriber.
    pub fn remove(&mut self, conn: u64, channel: &str) -> bool {
        if let Some(waiting) = self.catching_up.get_mut(channel) {
            waiting.remove(&conn);
            if waiting.is_empty() {
                self.catching_up.remove(channel);
            }
        }
        let Some(members) = self.by_channel.get_mut(channel) else {
            return false;
        };
        members.swap_remove(&conn);
        let empty = members.is_empty();
        if empty {
            self.by_channel.remove(channel);
        }
        empty
    }

    /// Hand `publication` of `channel` to every local subscriber through `deliver`, encoded
    /// once per dialect in use; a subscriber waiting for its replay keeps it instead, at most
    /// `bound` of them (the oldest goes first, as in the queue they are bound for). Returns
    /// how many kept messages were dropped and how many encodings were made, or `None` when
    /// the channel has no subscriber here.
    pub fn fan_out(
        &mut self,
        channel: &str,
        publication: &Publication,
        bound: usize,
        mut deliver: impl FnMut(&Rc<Peer>, &Rc<str>, Frame),
    ) -> Option<(u64, u64)> {
        let (name, members) = self.by_channel.get_key_value(channel)?;
        let mut waiting = if self.catching_up.is_empty() {
            None
        } else {
            self.catching_up.get_mut(channel)
        };
        let mut encoded = Encoded::new(channel, publication);
        let mut dropped = 0;
        for peer in members.values() {
            let frame = encoded.frame(peer.dialect()).clone();
            match waiting.as_mut().and_then(|w| w.get_mut(&peer.id)) {
                Some(catch) => dropped += keep(catch, peer, publication.seq, frame, bound),
                None => deliver(peer, name, frame),
            }
        }
        Some((dropped, encoded.encodings))
    }

    /// Hand `notice` of `channel` to every local subscriber through `tell`, framed by
    /// `frame` once per dialect in use; a subscriber waiting for its replay
    /// keeps it with its live messages, after the seqs it speaks of, within `bound`. Returns
    /// how many kept messages were dropped for it.
    pub fn notify(
        &mut self,
        channel: &str,
        notice: &Notice,
        bound: usize,
        frame: impl Fn(Dialect) -> Frame,
        mut tell: impl FnMut(&Rc<Peer>, Frame),
    ) -> u64 {
        let Some(members) = self.by_channel.get(channel) else {
            return 0;
        };
        let after = match notice {
            Notice::Lost { to, .. } => *to,
            Notice::Reset { .. } => u64::MAX,
        };
        let mut waiting = self.catching_up.get_mut(channel);
        let mut frames: [Option<Frame>; Dialect::COUNT] = Default::default();
        let mut dropped = 0;
        for peer in members.values() {
            let dialect = peer.dialect();
            let framed = frames[dialect as usize].get_or_insert_with(|| frame(dialect));
            let framed = framed.clone();
            match waiting.as_mut().and_then(|w| w.get_mut(&peer.id)) {
                Some(catch) => dropped += keep(catch, peer, after, framed, bound),
                None => tell(peer, framed),
            }
        }
        dropped
    }

    /// Make subscriber `peer` a presence member of `channel`; false when it already was.
    pub fn add_member(&mut self, channel: Rc<str>, peer: &Rc<Peer>) -> bool {
        let members = self.members.entry(channel).or_default();
        members.insert(peer.id, peer.clone()).is_none()
    }

    /// Whether connection `conn` is a presence member of `channel`.
    pub fn is_member(&self, channel: &str, conn: u64) -> bool {
        self.members
            .get(channel)
            .is_some_and(|members| members.contains_key(&conn))
    }

    /// `conn` is no longer a presence member of `channel`; true when it was.
    pub fn remove_member(&mut self, channel: &str, conn: u64) -> bool {
        let Some(members) = self.members.get_mut(channel) else {
            return false;
        };
        let was = members.swap_remove(&conn).is_some();
        if members.is_empty() {
            self.members.remove(channel);
        }
        was
    }

    /// Hand `frame` (made once per dialect in use) to every presence member of `channel`
    /// through `deliver`; returns how many.
    pub fn tell_members(
        &self,
        channel: &str,
        frame: impl Fn(Dialect) -> Frame,
        mut deliver: impl FnMut(&Rc<Peer>, Frame),
    ) -> usize {
        let Some(members) = self.members.get(channel) else {
            return 0;
        };
        let mut frames: [Option<Frame>; Dialect::COUNT] = Default::default();
        for peer in members.values() {
            let dialect = peer.dialect();
            let framed = frames[dialect as usize].get_or_insert_with(|| frame(dialect));
            deliver(peer, framed.clone());
        }
        members.len()
    }

    /// Park a SUB until its owners have answered.
    pub fn park(&mut self, token: u64, sub: PendingSub) {
        self.pending.insert(token, sub);
    }

    /// An owner answered SUB `token` (with a replay, for a channel asked with `since`, or
    /// the channel's epoch): the SUB, once nothing more is awaited.
    pub fn answered(
        &mut self,
        token: u64,
        replay: Option<Replay>,
        epoch: Option<(Box<str>, Box<str>)>,
    ) -> Option<PendingSub> {
        let sub = self.pending.get_mut(&token)?;
        sub.replays.extend(replay);
        sub.epochs.extend(epoch);
        sub.waiting -= 1;
        if sub.waiting > 0 {
            return None;
        }
        self.pending.remove(&token)
    }

    /// The owner could not subscribe SUB `token` to `channel` in time: the connection, and
    /// the SUB once nothing more is awaited.
    pub fn failed(&mut self, token: u64, channel: &str) -> Option<(u64, Option<PendingSub>)> {
        let sub = self.pending.get_mut(&token)?;
        let conn = sub.conn;
        sub.channels.retain(|c| c != channel);
        sub.failed.push(channel.to_owned());
        sub.waiting -= 1;
        if sub.waiting > 0 {
            return Some((conn, None));
        }
        Some((conn, self.pending.remove(&token)))
    }

    /// Channels with a subscriber waiting for its replay.
    #[cfg(test)]
    pub fn catching_up(&self) -> usize {
        self.catching_up.len()
    }

    /// Give back the subscriber map's table once it is mostly empty.
    pub fn shrink(&mut self) {
        crate::engine::shrink_if_sparse(&mut self.by_channel);
        crate::engine::shrink_if_sparse(&mut self.members);
    }
}

/// Keep `frame` (about `seq`) for a subscriber waiting for its replay, the oldest kept going
/// first past `bound` as in the queue it is bound for; returns how many went.
fn keep(catch: &mut CatchUp, peer: &Peer, seq: u64, frame: Frame, bound: usize) -> u64 {
    let mut dropped = 0;
    if catch.live.len() >= bound {
        catch.live.pop_front();
        peer.dropped.set(peer.dropped.get() + 1);
        dropped = 1;
    }
    catch.live.push_back((seq, frame));
    dropped
}
