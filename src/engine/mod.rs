//! The engine: where a channel's numbering and history live, and where its publications come
//! from. The owner shard of a channel asks its engine to number a message and keep it; the
//! engine hands back what to deliver as [`Event`]s, which the owner fans out to its
//! subscribers and to the other shards that want the channel.
//!
//! [`Memory`] is the single-node engine: everything in the owner shard's memory, answered at
//! once. A Redis engine (several nodes as one server) goes beside it: there the publications
//! come from Redis PUB/SUB, published on any node, which is why delivery is an event and not
//! the return value of `publish`. Its numbering and history reads take a round trip, so
//! those calls will become completions with a token when it comes (docs/ARCHITECTURE.md).
//! `tests.rs` holds the contract every engine must pass; centrifuge's `Broker` interface
//! (`broker.go`, with `broker_memory.go` and `broker_redis.go` side by side) is the model.
//!
//! What stays with the owner, whatever the engine: the queue of messages held behind
//! uncommitted decisions (the store is the owner's), and which shards of this node want a
//! channel (the mesh is the node's).

pub mod history;
mod memory;
#[cfg(test)]
mod tests;

use std::rc::Rc;
use std::time::Instant;

use crate::dialect::{Kind, Publication};
pub use history::Found;
pub(crate) use memory::shrink_if_sparse;
pub use memory::Memory;

/// When a message reached the owner.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// For the fan-out latency figures.
    pub t0: Instant,
    /// Milliseconds on the shard clock, for the history's age limit.
    pub at_ms: u64,
}

/// What an engine hands back to the owner.
#[derive(Debug)]
pub enum Event {
    /// Deliver `publication` to `channel`'s subscribers (events of a channel come in seq
    /// order).
    Publication {
        /// The channel.
        channel: Rc<str>,
        /// The numbered message.
        publication: Publication,
        /// When it reached the owner.
        at: Arrival,
    },
}

/// Numbering, history and delivery of the channels one shard owns.
pub trait Engine {
    /// Number `data` as `channel`'s next message, keep it in the history and deliver it.
    fn publish(&mut self, channel: &str, kind: Kind, data: Rc<[u8]>, at: Arrival) -> u64;

    /// Take `channel`'s next seq for a message that is kept later with [`Engine::keep`] or
    /// given back (a decision waiting for its commit, or a message queued behind one).
    /// `stored`: the message goes to the durable store, whose highest seq the numbering
    /// continues from when the channel is made again.
    fn reserve(&mut self, channel: &str, stored: bool) -> u64;

    /// Keep and deliver a message numbered by [`Engine::reserve`] (in seq order).
    fn keep(&mut self, channel: &str, publication: Publication, at: Arrival);

    /// A reserved seq will not be used: if nothing was numbered after it, the next message
    /// may have it, so the sequence has no hole.
    fn give_back(&mut self, channel: &str, seq: u64);

    /// What `channel` keeps after seq `after`, at `now_ms` on the shard clock.
    fn history(&mut self, channel: &str, after: u64, now_ms: u64) -> Found;

    /// The durable store holds `channel` up to `seq`: its numbering continues above it.
    fn recover(&mut self, channel: &str, seq: u64);

    /// Expire history and forget the channels not `needed` any more whose history is empty;
    /// their numbering continues where it stood if they are used again. Returns how many
    /// were forgotten.
    fn sweep(&mut self, now_ms: u64, needed: &dyn Fn(&str) -> bool) -> usize;

    /// The next thing to deliver, if any.
    fn next_event(&mut self) -> Option<Event>;

    /// Channels whose state is kept.
    fn channels(&self) -> usize;
}
