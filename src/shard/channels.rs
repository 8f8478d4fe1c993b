//! The channels a shard owns: each one's numbering, recent history, the other shards that
//! want it and the messages held behind uncommitted decisions; and where the numbering of
//! channels not kept in memory stands (stored channels, and those freed once unused).
//!
//! Plain data, no I/O, no routing: the shard reads and updates it, then sends.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

use smallvec::SmallVec;

use crate::dialect::Publication;
use crate::history::{self, Retired, Ring};

/// A channel owned by this shard.
#[derive(Debug)]
pub(super) struct Owned {
    pub seq: u64,
    /// Decisions on it are stored: its sequence continues from the store, not from
    /// [`Retired`], when its state is freed and made again.
    pub stored: bool,
    /// Recent messages, for subscribers catching up.
    pub ring: Ring,
    /// Other shards with subscribers.
    pub interest: SmallVec<[u16; 4]>,
    /// Messages numbered after a decision that is not committed yet, in seq order: they wait
    /// so that subscribers see every seq in order (empty unless `ack = "durable"`).
    pub held: VecDeque<Held>,
}

/// A numbered message held back until the decisions before it are committed.
#[derive(Debug)]
pub(super) struct Held {
    pub publication: Publication,
    pub t0: Instant,
    pub hold: Hold,
}

/// What a held message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    /// A decision waiting for storage request `token`.
    Commit(u64),
    /// Free to go once everything before it has gone.
    Ready,
    /// Not stored after all (a duplicate, or storage failed): nothing to deliver.
    Void,
}

/// The owned channels of one shard.
#[derive(Debug, Default)]
pub(super) struct Channels {
    owned: HashMap<Box<str>, Owned>,
    /// Highest seq of stored channels whose state is not kept (not touched since start-up, or
    /// freed since).
    stored_seqs: HashMap<Box<str>, u64>,
    /// Where the other freed channels' sequences stood.
    retired: Retired,
}

impl Channels {
    /// Channels whose state is kept.
    pub fn len(&self) -> usize {
        self.owned.len()
    }

    /// The state of `channel`, if kept.
    pub fn get_mut(&mut self, channel: &str) -> Option<&mut Owned> {
        self.owned.get_mut(channel)
    }

    /// The state of `channel`, made on first use (continuing a stored sequence, or above the
    /// numbers it had before it was freed).
    pub fn entry(&mut self, channel: &str) -> &mut Owned {
        if !self.owned.contains_key(channel) {
            let stored = self.stored_seqs.remove(channel);
            let seq = stored.unwrap_or_else(|| self.retired.base(channel));
            let state = Owned {
                seq,
                stored: stored.is_some(),
                ring: Ring::new(seq),
                interest: SmallVec::new(),
                held: VecDeque::new(),
            };
            self.owned.insert(channel.into(), state);
        }
        self.owned.get_mut(channel).expect("inserted above")
    }

    /// The store says `channel`'s highest stored seq is `seq`: its numbering continues from
    /// there, never back below numbers given meanwhile (PUBLISH while the store was
    /// unreachable).
    pub fn recover(&mut self, channel: &str, seq: u64) {
        match self.owned.get_mut(channel) {
            Some(state) => {
                state.stored = true;
                if seq > state.seq {
                    state.seq = seq;
                    state.ring.skip_to(seq);
                }
            }
            None => {
                let freed = self.stored_seqs.get(channel).copied().unwrap_or(0);
                let seq = seq.max(freed).max(self.retired.base(channel));
                self.stored_seqs.insert(channel.into(), seq);
            }
        }
    }

    /// Expire history, and forget the channels nobody needs any more: no other shard wants
    /// them, none `subscribed` here, nothing held, no history left. Their sequences continue
    /// where they stood if they are used again, so memory follows the channels in use, not
    /// every name ever seen. Returns how many were forgotten.
    pub fn free_idle(
        &mut self,
        now_ms: u64,
        limits: history::Limits,
        subscribed: impl Fn(&str) -> bool,
    ) -> usize {
        let (stored_seqs, retired) = (&mut self.stored_seqs, &mut self.retired);
        let before = self.owned.len();
        self.owned.retain(|name, state| {
            state.ring.expire(now_ms, limits);
            let idle = state.interest.is_empty()
                && state.held.is_empty()
                && state.ring.is_empty()
                && !subscribed(name);
            if idle {
                if state.stored {
                    stored_seqs.insert(name.clone(), state.seq);
                } else {
                    retired.retire(name, state.seq);
                }
            }
            !idle
        });
        shrink_if_sparse(&mut self.owned);
        before - self.owned.len()
    }
}

/// Give back a map's table once most of it is empty: a burst of a million channels must not
/// keep a million slots after it has gone.
pub(super) fn shrink_if_sparse<K: Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}
