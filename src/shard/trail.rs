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
//! Plain data (it crosses shards with its record): the shard records into it, the recovery
//! reads it.

use std::collections::VecDeque;

/// Runs kept before the oldest are folded (24 bytes each, and only a connection whose
/// channels interleave has more than a few).
pub const MAX_RUNS: usize = 64;

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

impl Trail {
    /// `channel`'s live messages follow `top` from here (a subscription, or a replay that
    /// ended there).
    pub fn start(&mut self, channel: &str, top: u64) {
        let channel = self.index(channel);
        self.push(Run {
            channel,
            first: top + 1,
            last: top,
        });
    }

    /// Message `seq` of `channel` was queued to the connection.
    pub fn record(&mut self, channel: &str, seq: u64) {
        if let Some(run) = self.runs.back_mut() {
            if *self.channels[run.channel as usize] == *channel && seq > run.last {
                run.last = seq;
                return;
            }
        }
        let channel = self.index(channel);
        self.push(Run {
            channel,
            first: seq,
            last: seq,
        });
    }

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
        self.channels.push(channel.into());
        self.folded.push(None);
        (self.channels.len() - 1) as u32
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
        let mut trail = Trail::default();
        trail.start(a, 10);
        for seq in 11..=1_000 {
            trail.record(a, seq);
        }
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
        let mut trail = Trail::default();
        trail.start(a, 0);
        trail.start(b, 7);
        trail.record(a, 1);
        trail.record(b, 8);
        trail.record(b, 9);
        trail.record(a, 2);
        trail.start(c, 40);
        trail.record(b, 10);
        trail.record(c, 41);
        let all = names(&["a", "b", "c"]);
        assert_eq!(trail.position(Some(("b", 8)), &all), Some(vec![1, 8, 40]));
        assert_eq!(trail.position(Some(("a", 2)), &all), Some(vec![2, 9, 40]));
        assert_eq!(trail.position(Some(("c", 41)), &all), Some(vec![2, 10, 41]));
        assert_eq!(trail.position(None, &all), Some(vec![0, 7, 40]));
        // A channel the trail never saw cannot be placed.
        assert_eq!(trail.position(None, &names(&["d"])), None);
    }

    #[test]
    fn folded_runs_still_place_later_offsets_but_not_their_own() {
        let (a, b) = ("a", "b");
        let mut trail = Trail::default();
        trail.start(a, 0);
        trail.start(b, 0);
        for seq in 1..=100 {
            trail.record(a, seq);
            trail.record(b, seq);
        }
        assert_eq!(trail.runs.len(), MAX_RUNS);
        let both = names(&["a", "b"]);
        assert_eq!(trail.position(Some(("a", 99)), &both), Some(vec![99, 98]));
        assert_eq!(trail.position(Some(("a", 3)), &both), None);
    }
}
