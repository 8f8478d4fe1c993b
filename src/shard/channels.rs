//! What the owner of a channel keeps besides its engine: the other shards that want it, the
//! messages held behind uncommitted decisions, and the subscriptions waiting for the node to
//! hear the channel.
//!
//! Plain data, no I/O, no routing: the shard reads and updates it, then sends. Numbering and
//! history are the engine's (`crate::engine`).

use std::collections::{HashMap, VecDeque};

use smallvec::SmallVec;

use crate::dialect::Publication;
use crate::engine::shrink_if_sparse;
use crate::engine::Arrival;

use super::replays::{ReplayTo, Since};

/// A channel owned by this shard that another shard wants or that has held messages.
#[derive(Debug, Default)]
pub(super) struct Owned {
    /// Other shards with subscribers.
    pub interest: SmallVec<[u16; 4]>,
    /// Messages numbered after a decision that is not committed yet, in seq order: they wait
    /// so that subscribers see every seq in order (empty unless `ack = "durable"`).
    pub held: VecDeque<Held>,
    /// Subscriptions answered once the engine hears the channel (a cluster node's Redis
    /// subscription is in place), each until its deadline (shard ms).
    pub waiting: Vec<(u64, Waiter)>,
}

/// A subscription waiting for the engine to hear its channel.
#[derive(Debug)]
pub(super) enum Waiter {
    /// Answer `MeshMsg::InterestAck` with `token` to `shard` (this one too).
    Ack { shard: usize, token: u64 },
    /// Replay what came after `since`, then answer.
    Replay { since: Since, to: ReplayTo },
}

/// A numbered message held back until the decisions before it are committed.
#[derive(Debug)]
pub(super) struct Held {
    pub publication: Publication,
    pub at: Arrival,
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

/// The owned channels of one shard that have interest or held messages.
#[derive(Debug, Default)]
pub(super) struct Channels {
    owned: HashMap<Box<str>, Owned>,
    /// Channels with subscriptions waiting, by deadline (every wait is as long, so in the
    /// order they began).
    deadlines: VecDeque<(u64, Box<str>)>,
}

impl Channels {
    /// What is kept for `channel`, if anything.
    pub fn get(&self, channel: &str) -> Option<&Owned> {
        self.owned.get(channel)
    }

    /// What is kept for `channel`, if anything.
    pub fn get_mut(&mut self, channel: &str) -> Option<&mut Owned> {
        self.owned.get_mut(channel)
    }

    /// What is kept for `channel`, made on first use.
    pub fn entry(&mut self, channel: &str) -> &mut Owned {
        if !self.owned.contains_key(channel) {
            self.owned.insert(channel.into(), Owned::default());
        }
        self.owned.get_mut(channel).expect("inserted above")
    }

    /// `waiter` waits for the engine to hear `channel` until `deadline` (shard ms).
    pub fn wait(&mut self, channel: &str, waiter: Waiter, deadline: u64) {
        self.entry(channel).waiting.push((deadline, waiter));
        self.deadlines.push_back((deadline, channel.into()));
    }

    /// The subscriptions still waiting at `now` (shard ms) past their deadline, by channel.
    pub fn expired(&mut self, now: u64) -> Vec<(Box<str>, Vec<Waiter>)> {
        let mut late = Vec::new();
        while self.deadlines.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, channel)) = self.deadlines.pop_front() else {
                break;
            };
            let Some(owned) = self.owned.get_mut(&channel) else {
                continue;
            };
            let (gone, kept) = std::mem::take(&mut owned.waiting)
                .into_iter()
                .partition(|(at, _)| *at <= now);
            owned.waiting = kept;
            let gone: Vec<Waiter> = gone.into_iter().map(|(_, waiter)| waiter).collect();
            if !gone.is_empty() {
                late.push((channel, gone));
            }
        }
        late
    }

    /// Shard `shard` wants `channel` (`on`) or no longer does.
    pub fn interest(&mut self, channel: &str, shard: u16, on: bool) {
        let state = self.entry(channel);
        let present = state.interest.iter().position(|s| *s == shard);
        match (on, present) {
            (true, None) => state.interest.push(shard),
            (false, Some(i)) => {
                state.interest.swap_remove(i);
            }
            _ => {}
        }
    }

    /// Forget the channels no other shard wants and nothing is held on.
    pub fn free_idle(&mut self) {
        self.owned.retain(|_, state| {
            !state.interest.is_empty() || !state.held.is_empty() || !state.waiting.is_empty()
        });
        shrink_if_sparse(&mut self.owned);
    }
}
