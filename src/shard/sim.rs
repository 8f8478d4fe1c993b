//! The shard test harness: shards wired by a simulated mesh that moves outbox batches by hand,
//! a clock that moves only when the test says so, and (optionally) a store whose answers the
//! test decides. Every interleaving is deterministic (quinn-proto's `Pair` is the model).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::auth::{Principal, Scopes};
use crate::clock::Now;
use crate::config::{Config, Scope};
use crate::dialect::shardcast::Parser;
use crate::metrics::Global;
use crate::storage::{self, reader, Completion, Outcome};

use super::{owner_of, Loaded, Peer, Shard, StorageLink};

/// Shards under test.
pub(super) struct Sim {
    pub shards: Vec<Shard>,
    now: Cell<Now>,
    store: Option<Store>,
}

/// The store's side of the simulation: what the shards submitted, and the channels their
/// answers come back on.
struct Store {
    writes: storage::Submitted,
    reads: reader::Asked,
    /// Per shard.
    completions: Vec<flume::Receiver<Completion>>,
    /// Per shard.
    loaded: Vec<flume::Receiver<Loaded>>,
}

impl Sim {
    /// `n` shards with the default configuration and no store (`storage = "memory"`).
    pub fn new(n: usize) -> Self {
        Self::with_config(n, Config::default())
    }

    /// `n` shards with `config` and no store.
    pub fn with_config(n: usize, config: Config) -> Self {
        let config = Arc::new(config);
        let global = Arc::new(Global::new(n));
        let now = Now::read();
        Sim {
            shards: (0..n)
                .map(|id| Shard::new(id, n, config.clone(), global.clone(), now))
                .collect(),
            now: Cell::new(now),
            store: None,
        }
    }

    /// `n` shards with `config` and a store that holds at most `capacity` unanswered writes
    /// (more are refused as by a full writer queue); `durable` is `ack = "durable"`.
    pub fn with_store(n: usize, config: Config, durable: bool, capacity: usize) -> Self {
        let mut sim = Self::with_config(n, config);
        let (writer, writes) = storage::Writer::detached(capacity);
        let (reader, reads) = storage::Reader::detached(capacity);
        let (mut completions, mut loaded) = (Vec::new(), Vec::new());
        let now = sim.now();
        for shard in &mut sim.shards {
            let (done, done_rx) = flume::unbounded();
            let (read, read_rx) = flume::unbounded();
            let link = StorageLink {
                writer: writer.clone(),
                completions: done,
                durable,
                reader: reader.clone(),
                ordered: reader.clone(),
                loaded: read,
            };
            shard.attach_storage(link, Some(&storage::Recovered::default()), now);
            completions.push(done_rx);
            loaded.push(read_rx);
        }
        sim.store = Some(Store {
            writes,
            reads,
            completions,
            loaded,
        });
        sim
    }

    /// The simulated time.
    pub fn now(&self) -> Now {
        self.now.get()
    }

    /// Move the clock on by `ms` milliseconds.
    pub fn advance(&self, ms: u64) {
        self.now.set(self.now().later(Duration::from_millis(ms)));
    }

    /// A new connection on `shard`.
    pub fn connect(&self, shard: usize) -> Rc<Peer> {
        self.shards[shard].add_conn(self.now())
    }

    /// Parse `json` and hand it to `shard` as a request of `peer` (an admin).
    pub fn request(&self, shard: usize, peer: &Rc<Peer>, json: &str) {
        let principal = admin();
        let mut parser = Parser::default();
        let request = parser.parse(json.as_bytes()).expect("valid request");
        let _ = self.shards[shard].request(peer, &principal, request, self.now());
    }

    /// Run `shard`'s sweep at the simulated time.
    pub fn sweep(&self, shard: usize) {
        self.shards[shard].sweep(&Shard::ping_frame(), self.now());
    }

    /// Deliver every queued mesh batch and every store answer until nothing moves.
    pub fn settle(&self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let now = self.now();
        loop {
            let mut moved = false;
            for (from, shard) in self.shards.iter().enumerate() {
                for to in 0..self.shards.len() {
                    if to == from {
                        continue;
                    }
                    if let Poll::Ready(batch) = shard.poll_outbox(to, &mut cx) {
                        moved = true;
                        for msg in batch {
                            self.shards[to].handle(from, msg, now);
                        }
                    }
                }
            }
            if let Some(store) = &self.store {
                for (shard, completions) in self.shards.iter().zip(&store.completions) {
                    for completion in completions.try_iter() {
                        moved = true;
                        shard.stored(completion, now);
                    }
                }
                for (shard, loaded) in self.shards.iter().zip(&store.loaded) {
                    for answer in loaded.try_iter() {
                        moved = true;
                        shard.loaded(answer, now);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// The decisions submitted to the store since the last call, in order.
    pub fn writes(&self) -> Vec<storage::Request> {
        self.store().writes.take()
    }

    /// The reads asked of the store since the last call, in order.
    pub fn reads(&self) -> Vec<(reader::Query, reader::Reply)> {
        self.store().reads.take()
    }

    /// Answer a submitted decision (the shard sees it at the next [`Sim::settle`]).
    pub fn answer(&self, write: &storage::Request, outcome: Outcome) {
        let token = write.token;
        let _ = write.reply.send(Completion { token, outcome });
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("a simulation made with_store")
    }
}

/// An admin of org "ops": may use any channel.
pub(super) fn admin() -> Principal {
    Principal {
        org: "ops".into(),
        user: None,
        key_id: None,
        scopes: Scopes::from_list(&[Scope::Admin]),
        exclusive: false,
        expires_ms: None,
        grant: None,
    }
}

/// Take every queued frame's payload as text.
pub(super) fn drain(peer: &Peer) -> Vec<String> {
    let mut out = peer.out().borrow_mut();
    let mut texts = Vec::new();
    while !out.is_empty() {
        let mut frame = Vec::new();
        out.gather(&mut frame, 1);
        let start = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        texts.push(String::from_utf8_lossy(&frame[start..]).into_owned());
        out.consume(frame.len());
    }
    texts
}

/// A channel (of category "usage") owned by `owner` of 2 shards.
pub(super) fn channel_owned_by(owner: usize) -> String {
    (0..)
        .map(|i| format!("org:o{i}:usage"))
        .find(|c| owner_of(c, 2) == owner)
        .expect("some channel hashes to each shard")
}
