//! A channel's recent messages, kept by its owner shard so that a client that reconnects with
//! `since` gets exactly what it missed.
//!
//! Plain data, no I/O. Sequences may have holes (a decision refused by storage after later
//! messages were numbered is never delivered), so "complete from seq N" is not "contiguous":
//! the ring tracks the highest seq that was delivered and is no longer kept (`floor`). A replay
//! after N is complete exactly when `N >= floor`.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;

use crate::dialect::Publication;

/// How much history a channel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages kept (0: none).
    pub size: usize,
    /// Milliseconds a message stays replayable (0: no age limit).
    pub ttl_ms: u64,
}

#[derive(Debug)]
struct Entry {
    at_ms: u64,
    publication: Publication,
}

/// One channel's recent messages, oldest first.
#[derive(Debug)]
pub struct Ring {
    entries: VecDeque<Entry>,
    /// Highest seq delivered and no longer kept (or the sequence's start in this process).
    floor: u64,
    /// Highest seq delivered.
    last: u64,
}

/// What a replay found for `since`.
#[derive(Debug)]
pub struct Found {
    /// Kept messages with seq above `since`, in order.
    pub messages: Vec<Publication>,
    /// Highest seq delivered so far: live messages above it follow the replay.
    pub upto: u64,
    /// Highest seq delivered and no longer kept: messages in `(since, floor]` are missing
    /// from `messages` (only the store can supply them).
    pub floor: u64,
    /// The channel's epoch, when it has one of its own (a cluster's, from Redis).
    pub epoch: Option<Box<str>>,
}

impl Ring {
    /// An empty ring whose sequence starts after `base` (0, or a stored channel's maximum).
    pub fn new(base: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            floor: base,
            last: base,
        }
    }

    /// Highest seq delivered.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Nothing is kept (none yet, all expired, or a size of 0).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record a delivered message (seqs arrive in increasing order).
    pub fn push(&mut self, publication: &Publication, now_ms: u64, limits: Limits) {
        self.last = publication.seq;
        if limits.size == 0 {
            self.floor = publication.seq;
            return;
        }
        if self.entries.len() == limits.size {
            self.evict_front();
        }
        self.entries.push_back(Entry {
            at_ms: now_ms,
            publication: publication.clone(),
        });
        self.expire(now_ms, limits);
    }

    /// The sequence jumps to `seq` (a stored maximum learnt late): everything up to it was
    /// delivered by an earlier process and is not kept here.
    pub fn skip_to(&mut self, seq: u64) {
        if seq > self.last {
            self.last = seq;
            self.floor = self.floor.max(seq);
        }
    }

    /// Forget messages older than the TTL.
    pub fn expire(&mut self, now_ms: u64, limits: Limits) {
        if limits.ttl_ms == 0 {
            return;
        }
        while let Some(front) = self.entries.front() {
            if now_ms.saturating_sub(front.at_ms) <= limits.ttl_ms {
                break;
            }
            self.evict_front();
        }
        if self.entries.is_empty() {
            // Nothing kept: let the buffer go too (idle channels are many).
            self.entries = VecDeque::new();
        }
    }

    fn evict_front(&mut self) {
        if let Some(old) = self.entries.pop_front() {
            self.floor = old.publication.seq;
        }
    }

    /// The kept messages after `since`.
    pub fn since(&mut self, since: u64, now_ms: u64, limits: Limits) -> Found {
        self.expire(now_ms, limits);
        let start = self.entries.partition_point(|e| e.publication.seq <= since);
        Found {
            messages: self
                .entries
                .range(start..)
                .map(|e| e.publication.clone())
                .collect(),
            upto: self.last,
            floor: self.floor,
            epoch: None,
        }
    }
}

/// Buckets of [`Retired`]: 8 KiB per shard.
const RETIRED_BUCKETS: usize = 1024;

/// Where the sequences of channels whose state was freed stood, so that a channel made again
/// continues above its old numbers instead of reusing them: a reconnecting client's `since`
/// keeps its meaning without the owner remembering every channel it ever saw.
///
/// Channels share buckets, so a channel may start above its own last seq (a gap, reported as
/// an incomplete replay to a client that asks from before it): never below it.
#[derive(Debug)]
pub struct Retired {
    highest: Box<[u64]>,
    /// Keys unknown to clients: nobody can aim names at one bucket.
    hasher: RandomState,
}

impl Default for Retired {
    fn default() -> Self {
        Self {
            highest: vec![0; RETIRED_BUCKETS].into_boxed_slice(),
            hasher: RandomState::new(),
        }
    }
}

impl Retired {
    fn bucket(&self, channel: &str) -> usize {
        (self.hasher.hash_one(channel) % RETIRED_BUCKETS as u64) as usize
    }

    /// The seq a channel made now continues from.
    pub fn base(&self, channel: &str) -> u64 {
        self.highest[self.bucket(channel)]
    }

    /// A channel whose last seq is `seq` is forgotten.
    pub fn retire(&mut self, channel: &str, seq: u64) {
        let bucket = self.bucket(channel);
        self.highest[bucket] = self.highest[bucket].max(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn message(seq: u64) -> Publication {
        let data = Rc::from(seq.to_string().into_bytes());
        let kind = crate::dialect::Kind::Message;
        Publication { seq, kind, data }
    }

    fn seqs(found: &Found) -> Vec<u64> {
        found.messages.iter().map(|p| p.seq).collect()
    }

    const KEEP3: Limits = Limits { size: 3, ttl_ms: 0 };

    #[test]
    fn keeps_the_newest_and_knows_what_it_lost() {
        let mut ring = Ring::new(0);
        for seq in 1..=5 {
            ring.push(&message(seq), 0, KEEP3);
        }
        let found = ring.since(2, 0, KEEP3);
        assert_eq!(seqs(&found), [3, 4, 5]);
        assert_eq!((found.upto, found.floor), (5, 2));
        let found = ring.since(1, 0, KEEP3);
        assert_eq!(seqs(&found), [3, 4, 5], "seq 2 is gone");
        assert!(found.floor > 1);
        assert!(ring.since(5, 0, KEEP3).messages.is_empty());
    }

    #[test]
    fn holes_in_the_sequence_do_not_count_as_losses() {
        let mut ring = Ring::new(10);
        for seq in [11, 13, 14] {
            ring.push(&message(seq), 0, KEEP3);
        }
        let found = ring.since(10, 0, KEEP3);
        assert_eq!(seqs(&found), [11, 13, 14]);
        assert_eq!(
            found.floor, 10,
            "a stored channel's ring starts at its base"
        );
    }

    #[test]
    fn a_jump_ahead_counts_as_lost_from_here() {
        let mut ring = Ring::new(0);
        ring.push(&message(1), 0, KEEP3);
        ring.skip_to(40);
        ring.push(&message(41), 0, KEEP3);
        let found = ring.since(0, 0, KEEP3);
        assert_eq!(seqs(&found), [1, 41]);
        assert_eq!((found.floor, found.upto), (40, 41));
        ring.skip_to(5);
        assert_eq!(ring.last(), 41, "never backwards");
    }

    #[test]
    fn old_messages_expire() {
        let limits = Limits {
            size: 10,
            ttl_ms: 1_000,
        };
        let mut ring = Ring::new(0);
        ring.push(&message(1), 0, limits);
        ring.push(&message(2), 900, limits);
        let found = ring.since(0, 1_500, limits);
        assert_eq!(seqs(&found), [2]);
        assert_eq!(found.floor, 1);
        let found = ring.since(0, 5_000, limits);
        assert!(found.messages.is_empty());
        assert_eq!((found.floor, found.upto), (2, 2));
    }

    #[test]
    fn a_retired_channel_never_goes_below_its_last_seq() {
        let mut retired = Retired::default();
        assert_eq!(retired.base("a"), 0);
        retired.retire("a", 40);
        retired.retire("a", 7);
        assert_eq!(retired.base("a"), 40, "the highest stays");
        // Another channel may share the bucket (then it starts above 40), never below its own.
        for n in 0..5000 {
            let name = format!("c{n}");
            retired.retire(&name, n);
            assert!(retired.base(&name) >= n);
        }
    }

    #[test]
    fn size_zero_keeps_nothing_but_tracks_the_sequence() {
        let none = Limits { size: 0, ttl_ms: 0 };
        let mut ring = Ring::new(0);
        ring.push(&message(1), 0, none);
        let found = ring.since(0, 0, none);
        assert!(found.messages.is_empty());
        assert_eq!((found.floor, found.upto), (1, 1));
    }
}
