//! The single-node engine: each channel's numbering and recent history in its owner shard's
//! memory, and where the numbering of channels not kept stands (stored channels, and those
//! freed once unused). Everything is answered at once.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::rc::Rc;

use super::history::{Found, Limits, Retired, Ring};
use super::{Arrival, Engine, Event, Numbered};
use crate::dialect::{Kind, Publication};

/// A channel's numbering and history.
#[derive(Debug)]
struct Channel {
    /// The map's key, shared with the events (one allocation per channel, not per message).
    name: Rc<str>,
    /// The last seq given out.
    seq: u64,
    /// Decisions on it are stored: its sequence continues from the store, not from
    /// [`Retired`], when its state is freed and made again.
    stored: bool,
    /// Recent messages, for subscribers catching up.
    ring: Ring,
}

impl Channel {
    /// Keep a numbered message in the ring; the event that delivers it.
    fn keep(&mut self, publication: Publication, at: Arrival, limits: Limits) -> Event {
        self.ring.push(&publication, at.at_ms, limits);
        let channel = Rc::clone(&self.name);
        Event::Publication {
            channel,
            publication,
            at,
        }
    }
}

/// The in-memory engine of one shard.
#[derive(Debug)]
pub struct Memory {
    channels: HashMap<Rc<str>, Channel>,
    /// Highest seq of stored channels whose state is not kept (not touched since start-up, or
    /// freed since).
    stored_seqs: HashMap<Box<str>, u64>,
    /// Where the other freed channels' sequences stood.
    retired: Retired,
    limits: Limits,
    events: VecDeque<Event>,
}

impl Memory {
    /// An engine keeping `limits` of history per channel.
    pub fn new(limits: Limits) -> Self {
        Self {
            channels: HashMap::new(),
            stored_seqs: HashMap::new(),
            retired: Retired::default(),
            limits,
            events: VecDeque::new(),
        }
    }

    /// The state of `channel`, made on first use (continuing a stored sequence, or above the
    /// numbers it had before it was freed).
    fn entry(&mut self, channel: &str) -> &mut Channel {
        if !self.channels.contains_key(channel) {
            let stored = self.stored_seqs.remove(channel);
            let seq = stored.unwrap_or_else(|| self.retired.base(channel));
            let name: Rc<str> = channel.into();
            let state = Channel {
                name: Rc::clone(&name),
                seq,
                stored: stored.is_some(),
                ring: Ring::new(seq),
            };
            self.channels.insert(name, state);
        }
        self.channels.get_mut(channel).expect("inserted above")
    }
}

impl Engine for Memory {
    fn publish(
        &mut self,
        channel: &str,
        kind: Kind,
        data: Rc<[u8]>,
        _key: Option<&str>,
        at: Arrival,
        _token: u64,
    ) -> Numbered {
        let limits = self.limits;
        // One lookup of the channel, not one for the number and one for the ring.
        let state = self.entry(channel);
        state.seq += 1;
        let seq = state.seq;
        let event = state.keep(Publication { seq, kind, data }, at, limits);
        self.events.push_back(event);
        Numbered::Now(seq)
    }

    /// Never asked: this engine numbers locally (see [`Engine::publish_stored`]).
    fn publish_stored(
        &mut self,
        channel: &str,
        _id: &str,
        _data: Rc<[u8]>,
        token: u64,
    ) -> Numbered {
        tracing::error!(channel, "publish_stored on the single-node engine");
        let result = Err("the single-node engine numbers decisions before their commit".into());
        let local = false;
        self.events.push_back(Event::Numbered {
            token,
            result,
            local,
            reach: None,
        });
        Numbered::Later
    }

    fn reserve(&mut self, channel: &str, stored: bool) -> u64 {
        let state = self.entry(channel);
        state.stored |= stored;
        state.seq += 1;
        state.seq
    }

    fn keep(&mut self, channel: &str, publication: Publication, at: Arrival) {
        let limits = self.limits;
        let event = self.entry(channel).keep(publication, at, limits);
        self.events.push_back(event);
    }

    fn give_back(&mut self, channel: &str, seq: u64) {
        if let Some(state) = self.channels.get_mut(channel) {
            if state.seq == seq && state.ring.last() < seq {
                state.seq -= 1;
            }
        }
    }

    fn history(&mut self, channel: &str, after: u64, now_ms: u64, _token: u64) -> Option<Found> {
        let limits = self.limits;
        let state = self.entry(channel);
        Some(state.ring.since(after, now_ms, limits))
    }

    /// Numbering continues from the stored maximum, never back below numbers given meanwhile
    /// (PUBLISH while the store was unreachable).
    fn recover(&mut self, channel: &str, seq: u64) {
        match self.channels.get_mut(channel) {
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

    /// Memory follows the channels in use, not every name ever seen.
    fn sweep(&mut self, now_ms: u64, needed: &dyn Fn(&str) -> bool) -> usize {
        let (stored_seqs, retired, limits) =
            (&mut self.stored_seqs, &mut self.retired, self.limits);
        let before = self.channels.len();
        self.channels.retain(|name, state| {
            state.ring.expire(now_ms, limits);
            let idle = state.ring.is_empty() && !needed(name);
            if idle {
                if state.stored {
                    stored_seqs.insert(name.as_ref().into(), state.seq);
                } else {
                    retired.retire(name, state.seq);
                }
            }
            !idle
        });
        shrink_if_sparse(&mut self.channels);
        before - self.channels.len()
    }

    fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn channels(&self) -> usize {
        self.channels.len()
    }
}

/// Give back a map's table once most of it is empty: a burst of a million channels must not
/// keep a million slots after it has gone.
pub(crate) fn shrink_if_sparse<K: Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}
