//! The Redis side of a cluster: several shardcast nodes as one server through Redis.
//!
//! centrifugal/centrifuge's Redis broker (`broker_redis.go`, `internal/redis_lua/`) is the
//! model. A channel's numbering, history and delivery live in Redis: one Lua script per
//! publish numbers the message (`HINCRBY` on the channel's meta hash), keeps it in the
//! channel's stream (the seq is the entry id), and `PUBLISH`es it, so every node sees a
//! channel's messages in seq order; a retried publish with an idempotency key gets its first
//! seq back. A channel whose meta Redis lost gets a new epoch, so a reader of the old one is
//! told its history is gone.
//!
//! - `keys.rs`: key names and the PUB/SUB payload (`seq:epoch:kind:data`);
//! - `control.rs`: the server API's commands and questions for the other nodes;
//! - `lua/`: the scripts;
//! - `client.rs`: one blocking connection, scripts loaded, publishes pipelined;
//! - `link.rs`: the thread that owns a client and batches the shards' requests;
//! - `order.rs`: each seq of a channel once and in order on a node, gaps filled from the
//!   history or reported (plain state, no I/O);
//! - `pubsub.rs`: the node's PUB/SUB connection: the channels its shards want, their
//!   messages to the owner shards, resubscription after a reconnect, probes;
//! - `node.rs`: a node's links and subscribers, started before its shards.
//!
//! The shards use them through the cluster engine, `crate::engine::Redis`.
//!
//! All Redis I/O is on these threads (the `redis` crate has no glommio runtime); shards talk
//! to them over flume and never wait.

pub mod client;
pub mod control;
pub mod keys;
pub mod link;
pub mod node;
pub mod order;
pub mod pubsub;

pub use client::{Claimed, Client, Page, PresencePage, Publish, Published, Retention};
pub use keys::{Envelope, Keys};
pub use link::{Completion, Link, Op, Request, Settings};
pub use pubsub::{Incoming, Subscriber, Wants};

/// When to try a failed connection again: waits double from `first` up to 32 times as long,
/// and start over once a connection is made.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: std::time::Duration,
    next: std::time::Duration,
    /// Not before this.
    pub retry_at: std::time::Instant,
}

impl Backoff {
    /// Try at once, then wait `first` after the first failure.
    pub fn new(first: std::time::Duration) -> Self {
        Self {
            first,
            next: first,
            retry_at: std::time::Instant::now(),
        }
    }

    /// An attempt failed at `now`.
    pub fn failed(&mut self, now: std::time::Instant) {
        self.retry_at = now + self.next;
        self.next = (self.next * 2).min(self.first * 32);
    }

    /// A connection was made.
    pub fn succeeded(&mut self) {
        self.next = self.first;
    }
}

/// What can go wrong talking to Redis.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    /// Redis could not be reached: nothing was done.
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    /// The connection failed during the call: it may or may not have taken effect.
    #[error("the connection to Redis failed during the call: {0}")]
    Unknown(String),
    /// Redis refused the command.
    #[error("Redis refused: {0}")]
    Refused(String),
    /// Redis answered something this code does not understand.
    #[error("unexpected answer from Redis: {0}")]
    Protocol(String),
    /// Redis has no numbering for the channel and the publish said where none starts.
    #[error("the channel has no numbering in Redis: where it starts must be read first")]
    NoFloor,
}
