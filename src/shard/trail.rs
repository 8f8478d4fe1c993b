//! What a Socket.IO connection was sent on its channels, in order and compactly: enough to
//! tell, from the last message its client handled (the `offset` socket.io-client sends back
//! when it reconnects), where the client stood on every channel it was subscribed to.
//!
//! TCP delivers in order and the client handles messages in order, so everything queued
//! before the message named by the offset was handled, and nothing after it. The trail keeps
//! the queue order as runs (consecutive messages of one channel): a connection on one channel
//! is one run however much it receives; runs beyond [`MAX_RUNS`] are folded into where each
//! channel stood, and an offset inside them can no longer be placed (recovery then fails, as
//! Socket.IO's does past its buffer).
//!
//! The shard records into a [`Recording`] on the fan-out path: the open run is held apart
//! with the shard's own `Rc` of its channel's name, so one more message of the same channel
//! is a pointer comparison and a store, in the connection's own state. What a dropped
//! connection leaves is the sealed [`Trail`], plain data that crosses shards and nodes.

use std::collections::VecDeque;
use std::rc::Rc;

/// Runs kept before the oldest are folded (24 bytes each, and only a connection whose
/// channels interleave has more than a few).
pub const MAX_RUNS: usize = 64;

/// Channel names kept: past it, those no kept run names are forgotten.
const MAX_NAMES: usize = 2 * MAX_RUNS;

use serde::{Deserialize, Serialize};

/// Consecutive messages of one channel queued to the connection: seqs `first..=last`. A run
/// with `first == last + 1` sent nothing: the subscription started there, live messages
/// following `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Run {
    channel: u32,
    first: u64,
    last: u64,
}

/// One connection's trail.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Trail {
    /// Channels named by the runs.
    channels: Vec<Box<str>>,
    /// Per channel: where it stood before the runs kept (`None`: no run folded).
    folded: Vec<Option<u64>>,
    runs: VecDeque<Run>,
}

/// A trail being recorded (a recoverable connection's, while it is open).
#[derive(Debug, Default)]
pub struct Recording {
    /// The open run: its channel and seqs `first..=last`.
    open: Option<(Rc<str>, u64, u64)>,
    /// The runs before it.
    trail: Trail,
}

impl Recording {
    /// Message `seq` of `channel` (the shard's own `Rc` of its name) was queued to the
    /// connection.
    #[inline]
    pub fn record(&mut self, channel: &Rc<str>, seq: u64) {
        if let Some((name, _, last)) = &mut self.open {
            if Rc::ptr_eq(name, channel) && seq > *last {
                *last = seq;
                return;
            }
        }
        self.extend(channel.clone(), seq, seq);
    }

    /// [`Recording::record`] of a channel named by a string of its own.
    pub fn record_named(&mut self, channel: &str, seq: u64) {
        match &mut self.open {
            Some((name, _, last)) if **name == *channel && seq > *last => *last = seq,
            _ => self.extend(Rc::from(channel), seq, seq),
        }
    }

    /// `channel`'s live messages follow `top` from here (a subscription, or a replay that
    /// ended there).
    pub fn start(&mut self, channel: &str, top: u64) {
        self.close();
        self.open = Some((Rc::from(channel), top + 1, top));
    }

    /// The trail recorded.
    pub fn seal(mut self) -> Trail {
        self.close();
        self.trail
    }

    /// Seqs `first..=last` of `channel` follow: the open run grows, or another opens.
    fn extend(&mut self, channel: Rc<str>, first: u64, last: u64) {
        if let Some((name, _, end)) = &mut self.open {
            if **name == *channel && first > *end {
                // The same channel under another `Rc` (a start, a replay): this one next.
                *name = channel;
                *end = last;
                return;
            }
        }
        self.close();
        self.open = Some((channel, first, last));
    }

    fn close(&mut self) {
        if let Some((name, first, last)) = self.open.take() {
            let channel = self.trail.index(&name);
            self.trail.push(Run {
                channel,
                first,
                last,
            });
        }
    }
}

impl Trail {
    /// Where the client stood on each of `channels` once it had handled message `offset`
    /// (`None`: none yet): the last seq it has of each. `None` when that cannot be told
    /// exactly (the offset is not one the connection was sent, or its run was folded).
    pub fn position(&self, offset: Option<(&str, u64)>, channels: &[Box<str>]) -> Option<Vec<u64>> {
        // Runs up to and including `at` were handled.
        let at = match offset {
            None => None,
            Some((name, seq)) => {
                let index = self.channels.iter().position(|c| **c == *name)?;
                let found = self
                    .runs
                    .iter()
                    .position(|r| r.channel as usize == index && r.first <= seq && seq <= r.last)?;
                Some((found, seq))
            }
        };
        if at.is_none() && self.folded.iter().any(Option::is_some) {
            // The client handled nothing, and what it was sent is no longer all here.
            return None;
        }
        let handled = at.map_or(0, |(i, _)| i + 1);
        channels
            .iter()
            .map(|name| {
                let index = self.channels.iter().position(|c| **c == **name)?;
                let runs = self.runs.iter().enumerate();
                let mine = runs.filter(|(_, r)| r.channel as usize == index);
                let mut before = None;
                let mut after = None;
                for (i, run) in mine {
                    if i < handled {
                        before = Some(match at {
                            Some((j, seq)) if j == i => seq,
                            _ => run.last,
                        });
                    } else if after.is_none() {
                        after = Some(run.first - 1);
                    }
                }
                // Folded runs came before every run kept: only when the offset is in one
                // are they not handled, and then `at` was not found above.
                before.or(self.folded[index]).or(after)
            })
            .collect()
    }

    fn index(&mut self, channel: &str) -> u32 {
        if let Some(i) = self.channels.iter().position(|c| **c == *channel) {
            return i as u32;
        }
        if self.channels.len() >= MAX_NAMES {
            self.forget_unused();
        }
        self.channels.push(channel.into());
        self.folded.push(None);
        (self.channels.len() - 1) as u32
    }

    /// Forget the channels no kept run names (a connection that went through many channels
    /// must not grow its trail without end): where they stood is lost, and an offset needing
    /// it can no longer be placed.
    fn forget_unused(&mut self) {
        let mut used = vec![false; self.channels.len()];
        for run in &self.runs {
            used[run.channel as usize] = true;
        }
        let mut new_index = vec![0u32; self.channels.len()];
        let mut kept = 0;
        for (i, used) in used.iter().enumerate() {
            if *used {
                new_index[i] = kept;
                self.channels.swap(kept as usize, i);
                self.folded.swap(kept as usize, i);
                kept += 1;
            }
        }
        self.channels.truncate(kept as usize);
        self.folded.truncate(kept as usize);
        for run in &mut self.runs {
            run.channel = new_index[run.channel as usize];
        }
    }

    fn push(&mut self, run: Run) {
        self.runs.push_back(run);
        if self.runs.len() > MAX_RUNS {
            if let Some(old) = self.runs.pop_front() {
                self.folded[old.channel as usize] = Some(old.last);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<Box<str>> {
        list.iter().map(|n| Box::from(*n)).collect()
    }

    #[test]
    fn one_channel_is_one_run_and_the_offset_says_where_the_client_is() {
        let a = "org:acme:a";
        let mut rec = Recording::default();
        rec.start(a, 10);
        for seq in 11..=1_000 {
            rec.record_named(a, seq);
        }
        let trail = rec.seal();
        assert_eq!(trail.runs.len(), 1);
        let channels = names(&["org:acme:a"]);
        assert_eq!(
            trail.position(Some(("org:acme:a", 500)), &channels),
            Some(vec![500])
        );
        // Nothing handled yet: where the subscription began.
        assert_eq!(trail.position(None, &channels), Some(vec![10]));
        // An offset never sent, or of another channel.
        assert_eq!(trail.position(Some(("org:acme:a", 1_001)), &channels), None);
        assert_eq!(trail.position(Some(("org:acme:b", 5)), &channels), None);
    }

    #[test]
    fn other_channels_stand_at_their_last_message_before_the_offset() {
        let (a, b, c) = ("a", "b", "c");
        let mut rec = Recording::default();
        rec.start(a, 0);
        rec.start(b, 7);
        rec.record_named(a, 1);
        rec.record_named(b, 8);
        rec.record_named(b, 9);
        rec.record_named(a, 2);
        rec.start(c, 40);
        rec.record_named(b, 10);
        rec.record_named(c, 41);
        let trail = rec.seal();
        let all = names(&["a", "b", "c"]);
        assert_eq!(trail.position(Some(("b", 8)), &all), Some(vec![1, 8, 40]));
        assert_eq!(trail.position(Some(("a", 2)), &all), Some(vec![2, 9, 40]));
        assert_eq!(trail.position(Some(("c", 41)), &all), Some(vec![2, 10, 41]));
        assert_eq!(trail.position(None, &all), Some(vec![0, 7, 40]));
        // A channel the trail never saw cannot be placed.
        assert_eq!(trail.position(None, &names(&["d"])), None);
    }

    #[test]
    fn the_shards_own_names_and_other_copies_make_one_run() {
        let shared: Rc<str> = Rc::from("a");
        let other: Rc<str> = Rc::from("a");
        let b: Rc<str> = Rc::from("b");
        let mut rec = Recording::default();
        rec.start("a", 4);
        rec.record(&shared, 5);
        rec.record(&shared, 6);
        rec.record(&other, 7);
        rec.record_named("a", 8);
        rec.record(&b, 1);
        rec.record(&shared, 9);
        let trail = rec.seal();
        assert_eq!(trail.runs.len(), 3);
        let both = names(&["a", "b"]);
        assert_eq!(trail.position(Some(("a", 6)), &both), Some(vec![6, 0]));
        assert_eq!(trail.position(Some(("b", 1)), &both), Some(vec![8, 1]));
        assert_eq!(trail.position(Some(("a", 9)), &both), Some(vec![9, 1]));
        assert_eq!(trail.position(None, &both), Some(vec![4, 0]));
    }

    #[test]
    fn a_connection_through_many_channels_keeps_few_names() {
        let mut rec = Recording::default();
        for i in 0..10_000u64 {
            rec.record_named(&format!("c{i}"), 1);
        }
        rec.record_named("c9999", 2);
        let trail = rec.seal();
        assert!(
            trail.channels.len() <= MAX_NAMES,
            "{}",
            trail.channels.len()
        );
        let kept = names(&["c9999", "c9990"]);
        assert_eq!(trail.position(Some(("c9999", 2)), &kept), Some(vec![2, 1]));
        // Forgotten: cannot be placed.
        assert_eq!(trail.position(Some(("c9999", 2)), &names(&["c5"])), None);
    }

    #[test]
    fn folded_runs_still_place_later_offsets_but_not_their_own() {
        let (a, b) = ("a", "b");
        let mut rec = Recording::default();
        rec.start(a, 0);
        rec.start(b, 0);
        for seq in 1..=100 {
            rec.record_named(a, seq);
            rec.record_named(b, seq);
        }
        let trail = rec.seal();
        assert_eq!(trail.runs.len(), MAX_RUNS);
        let both = names(&["a", "b"]);
        assert_eq!(trail.position(Some(("a", 99)), &both), Some(vec![99, 98]));
        assert_eq!(trail.position(Some(("a", 3)), &both), None);
    }
}
