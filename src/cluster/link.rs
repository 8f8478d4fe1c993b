//! The thread that owns a node's connection to one Redis for publishes and history reads.
//! Shards send it requests over flume without waiting; it takes every request already
//! waiting (up to [`MAX_BATCH`]), sends each run of publishes as one pipelined round trip,
//! and hands each shard its completions on the shard's own channel. While Redis cannot be
//! reached, requests fail at once (the shards decide what that means) and the thread
//! reconnects with a backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::client::{
    Claimed, Client, Page, PresencePage, PresenceWrite, Publish, Published, Retention,
};
use super::keys::Keys;
use super::{Backoff, ClusterError};

/// Most requests taken into one round trip.
pub const MAX_BATCH: usize = 512;

/// Where to connect and what to keep.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Redis URL.
    pub url: String,
    /// Key prefix.
    pub prefix: String,
    /// Retention of histories, epochs and idempotency results.
    pub retention: Retention,
    /// Bound on connecting and on each round trip.
    pub timeout: Duration,
    /// First wait before reconnecting after a failure (doubled up to 32 times as long).
    pub backoff: Duration,
    /// A connection idle this long is checked (a PING) before it is used again, and while
    /// it stays idle: Redis may have gone away meanwhile (a restart), and a request sent on
    /// a dead connection would fail, with its effect unknown.
    pub probe: Duration,
    /// Set by the PUB/SUB side when its connection to the same Redis was lost: checked (a
    /// PING) before the next use, as an idle connection is.
    pub suspect: Arc<AtomicBool>,
    /// Where a channel Redis has no numbering for goes on from; `None`: from 0.
    pub floors: Option<Floors>,
    /// This node's boot id in hex: its presence changes are told under it, and its
    /// connections' ids begin with it.
    pub node: String,
    /// A presence member not refreshed this long is gone.
    pub presence_ttl_ms: u64,
    /// A session lock not refreshed this long is free.
    pub session_ttl_ms: u64,
}

/// Reads a channel's stored decisions' highest seq, where its numbering must go on from when
/// Redis has none (a new channel, or one Redis lost): the unique `(channel, seq)` of the
/// store must hold. Blocking: called on the link's thread, once per such channel.
#[derive(Clone)]
pub struct Floors(pub Arc<ReadFloor>);

/// Reads one channel's floor, or says why it cannot.
pub type ReadFloor = dyn Fn(&str) -> Result<u64, String> + Send + Sync;

impl std::fmt::Debug for Floors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Floors")
    }
}

/// A request from a shard; its answer goes to completion channel `shard` with `token`.
#[derive(Debug)]
pub struct Request {
    /// Index of the shard's completion channel.
    pub shard: usize,
    /// The shard's token for the answer.
    pub token: u64,
    /// What to do.
    pub op: Op,
}

/// What a request asks.
#[derive(Debug)]
pub enum Op {
    /// Number and publish a message.
    Publish(Publish),
    /// Read a channel's history after `since`, at most `limit` messages.
    History {
        /// The channel.
        channel: String,
        /// Highest seq the reader has.
        since: u64,
        /// Most messages.
        limit: usize,
    },
    /// Members of a channel kept (new, changed or refreshed) and removed. Not answered: a
    /// change that fails is made good by the next refresh, or by the expiry.
    Presence {
        /// The channel.
        channel: String,
        /// (connection id, member as `keys::member_bytes` wrote it).
        set: Vec<(String, Vec<u8>)>,
        /// Connection ids.
        removed: Vec<String>,
    },
    /// A page of a channel's members, after id `after` (`""`: from the first).
    PresencePage {
        /// The channel.
        channel: String,
        /// Where the page starts.
        after: String,
        /// Most members.
        max: usize,
    },
    /// Connection `holder` claims exclusive session `key`.
    Claim {
        /// The session key.
        key: String,
        /// The claiming connection's id.
        holder: String,
        /// Replace a holder (else refuse the claim).
        replace: bool,
    },
    /// Connection `holder` lets session `key` go. Not answered.
    Release {
        /// The session key.
        key: String,
        /// The connection's id.
        holder: String,
    },
    /// Keep the node's session locks (key, holder).
    Refresh(Vec<(String, String)>),
    /// The node's sessions per tenant (`census.lua`); answered with the cluster's.
    Census(Vec<(String, u32)>),
    /// Serve what came before, then end the thread.
    Stop,
    /// Where the node's users are connected, and what is kept for users connected nowhere
    /// (`users.lua`). Answered (`Completion::Kept`) only with a token other than 0.
    Users {
        /// What to do.
        op: UsersOp,
        /// The users.
        users: Vec<String>,
        /// For `Read` and `Clear`: what this org sent ("": all).
        org: String,
        /// For `Back`: the entries, oldest first.
        entries: Vec<Vec<u8>>,
    },
    /// Keep a dropped Socket.IO connection's record (`Some`) for `ttl_ms`, or take it
    /// (`None`; answered with `Completion::Record`).
    Record {
        /// The connection's pid.
        pid: String,
        /// The record, to keep.
        value: Option<Vec<u8>>,
        /// How long it is kept.
        ttl_ms: u64,
    },
    /// PUBLISH a control message (`control::Control`) to every node, or to node `node` (its
    /// boot id in hex). Answered (`Completion::Told`) only with a token other than 0.
    Control {
        /// One node, or all.
        node: Option<String>,
        /// The encoded message.
        payload: Vec<u8>,
    },
}

/// What `Op::Users` does (`users.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsersOp {
    /// The node has connections of the user now: take what was kept for it.
    On,
    /// The node has no more connections of these users.
    Off,
    /// The node still has connections of these users; expired kept messages are dropped.
    Refresh,
    /// What is kept for the user.
    Read,
    /// Drop what is kept for the user.
    Clear,
    /// Keep these entries for the user again, first.
    Back,
}

impl UsersOp {
    fn name(self) -> &'static str {
        match self {
            UsersOp::On => "on",
            UsersOp::Off => "off",
            UsersOp::Refresh => "refresh",
            UsersOp::Read => "read",
            UsersOp::Clear => "clear",
            UsersOp::Back => "back",
        }
    }
}

/// The answer to a [`Request`].
#[derive(Debug)]
pub enum Completion {
    /// A publish's outcome.
    Published {
        /// The request's token.
        token: u64,
        /// Its seq and epoch, or why not.
        result: Result<Published, ClusterError>,
        /// The publish itself, handed back when Redis could not be reached (nothing was
        /// done): the node may deliver it alone.
        unsent: Option<Box<Publish>>,
    },
    /// A history read's outcome.
    History {
        /// The request's token.
        token: u64,
        /// The page, or why not.
        result: Result<Page, ClusterError>,
    },
    /// A presence page, or why not.
    PresencePage {
        /// The request's token.
        token: u64,
        /// The page.
        result: Result<PresencePage, ClusterError>,
    },
    /// A claim's outcome.
    Claimed {
        /// The request's token.
        token: u64,
        /// Granted, or refused, or why it could not be asked.
        result: Result<Claimed, ClusterError>,
    },
    /// The kept messages `Op::Users` answered with (`On`, `Read`, `Clear`), as stored.
    Kept {
        /// The request's token.
        token: u64,
        /// The entries, or why not.
        result: Result<Vec<Vec<u8>>, ClusterError>,
    },
    /// A record taken (or none there), or why not.
    Record {
        /// The request's token.
        token: u64,
        /// The record.
        result: Result<Option<Vec<u8>>, ClusterError>,
    },
    /// How many PUB/SUB connections heard a control message (nodes, the sender's own
    /// included when it listens on that channel), or why not.
    Told {
        /// The request's token.
        token: u64,
        /// The receivers.
        heard: Result<u64, ClusterError>,
    },
    /// A refresh's outcome: the locks of the request (key, holder) that someone else holds.
    Refreshed {
        /// Those locks, or why not.
        lost: Result<Vec<(String, String)>, ClusterError>,
    },
    /// A census's outcome.
    Census {
        /// The node's counts it wrote.
        counts: Vec<(String, u32)>,
        /// Nodes alive and each tenant's sessions over them, or why not.
        result: Result<(u32, Vec<u32>), ClusterError>,
    },
}

/// What a link has done (written by its thread only, read by metrics and benchmarks); what
/// was not sent because Redis was unreachable is not counted.
#[derive(Debug)]
pub struct Stats {
    /// The last attempt to reach Redis succeeded.
    pub up: AtomicBool,
    /// Connections made.
    pub connections: AtomicU64,
    /// Microseconds each round trip waited for Redis.
    pub round_trip: Mutex<hdrhistogram::Histogram<u64>>,
    /// Round trips to Redis that carried publishes.
    pub publish_round_trips: AtomicU64,
    /// Publishes sent.
    pub publishes: AtomicU64,
    /// History reads sent.
    pub history_reads: AtomicU64,
    /// Microseconds spent waiting for Redis's answers, summed.
    pub wait_micros: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            round_trip: Mutex::new(crate::metrics::new_histogram()),
            publish_round_trips: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
            history_reads: AtomicU64::new(0),
            wait_micros: AtomicU64::new(0),
        }
    }
}

/// A running link: dropping every clone of its sender stops the thread.
pub struct Link {
    /// Where shards send requests.
    pub requests: flume::Sender<Request>,
    /// What it has done.
    pub stats: Arc<Stats>,
    thread: JoinHandle<()>,
}

impl Link {
    /// Start the thread; shard `i`'s completions go to `completions[i]`.
    pub fn spawn(
        settings: Settings,
        completions: Vec<flume::Sender<Completion>>,
    ) -> std::io::Result<Self> {
        let (requests, incoming) = flume::unbounded::<Request>();
        let backoff = Backoff::new(settings.backoff);
        let stats = Arc::new(Stats::default());
        let mut worker = Worker {
            settings,
            completions,
            client: None,
            answered: Instant::now(),
            backoff,
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("redis-link".into())
            .spawn(move || {
                // Connected before the first request, so that health says at once whether
                // Redis can be reached, and again whenever the backoff allows while it
                // cannot be: an idle node's health must see Redis come back.
                let _ = worker.client();
                loop {
                    let first = if worker.client.is_some() {
                        match incoming.recv_timeout(worker.settings.probe) {
                            Err(flume::RecvTimeoutError::Timeout) => {
                                worker.probe();
                                continue;
                            }
                            received => received.map_err(|_| ()),
                        }
                    } else {
                        match incoming.recv_deadline(worker.backoff.retry_at) {
                            Err(flume::RecvTimeoutError::Timeout) => {
                                let _ = worker.client();
                                continue;
                            }
                            received => received.map_err(|_| ()),
                        }
                    };
                    let Ok(first) = first else { break };
                    let mut batch = vec![first];
                    batch.extend(incoming.try_iter().take(MAX_BATCH - 1));
                    if let Some(stop) = batch.iter().position(|r| matches!(r.op, Op::Stop)) {
                        batch.truncate(stop);
                        worker.serve(batch);
                        break;
                    }
                    worker.serve(batch);
                }
            })?;
        Ok(Self {
            requests,
            stats,
            thread,
        })
    }

    /// Stop taking requests and wait for the thread to answer those it has.
    pub fn join(self) {
        // Told, not left to the last sender's drop: state leaked at exit may still hold one.
        let stop = Request {
            shard: 0,
            token: 0,
            op: Op::Stop,
        };
        let _ = self.requests.send(stop);
        drop(self.requests);
        let _ = self.thread.join();
    }
}

struct Worker {
    settings: Settings,
    completions: Vec<flume::Sender<Completion>>,
    client: Option<Client>,
    /// When the connection last answered.
    answered: Instant,
    backoff: Backoff,
    stats: Arc<Stats>,
}

impl Worker {
    fn serve(&mut self, batch: Vec<Request>) {
        let mut publishes = Vec::new();
        // Not answered, and independent of the rest: one round trip for all of them, after
        // the others.
        let mut presence: Vec<PresenceWrite> = Vec::new();
        for request in batch {
            let (shard, token) = (request.shard, request.token);
            match request.op {
                Op::Publish(publish) => publishes.push((shard, token, publish)),
                Op::Presence {
                    channel,
                    set,
                    removed,
                } => presence.push((channel, set, removed)),
                op => {
                    // In the order asked: the publishes before it first.
                    self.publish(std::mem::take(&mut publishes));
                    if let Some(completion) = self.other(token, op) {
                        self.complete(shard, completion);
                    }
                }
            }
        }
        self.publish(publishes);
        self.write_presence(&presence);
    }

    fn write_presence(&mut self, writes: &[PresenceWrite]) {
        if writes.is_empty() {
            return;
        }
        let s = &self.settings;
        let (node, ttl) = (s.node.clone(), s.presence_ttl_ms);
        if let Err(e) = self.with(|c| c.presence_write(writes, &node, ttl)) {
            // Made good by the next refresh, or by the expiry.
            tracing::debug!(writes = writes.len(), "presence not written: {e}");
        }
    }

    /// Carry out a request that is not a publish, one round trip; its answer, if it has one.
    fn other(&mut self, token: u64, op: Op) -> Option<Completion> {
        let started = Instant::now();
        let session_ttl = self.settings.session_ttl_ms;
        match op {
            // Taken apart in `serve`: publishes pipelined, presence writes batched; the
            // thread ends at a stop.
            Op::Publish(_) | Op::Presence { .. } | Op::Stop => None,
            Op::History {
                channel,
                since,
                limit,
            } => {
                let result = self.with(|c| c.history(&channel, since, limit));
                if result.is_ok() {
                    self.count(&self.stats.history_reads, 1, started);
                }
                Some(Completion::History { token, result })
            }
            Op::PresencePage {
                channel,
                after,
                max,
            } => {
                let result = self.with(|c| c.presence_page(&channel, &after, max));
                Some(Completion::PresencePage { token, result })
            }
            Op::Claim {
                key,
                holder,
                replace,
            } => {
                let result = self.with(|c| c.claim(&key, &holder, session_ttl, replace));
                Some(Completion::Claimed { token, result })
            }
            Op::Release { key, holder } => {
                let _ = self.with(|c| c.release(&key, &holder));
                None
            }
            Op::Users {
                op,
                users,
                org,
                entries,
            } => {
                let node = self.settings.node.clone();
                let till = crate::clock::unix_ms() + self.settings.presence_ttl_ms;
                let result = self.with(|c| c.users(op.name(), &node, till, &users, &org, &entries));
                if let Err(e) = &result {
                    tracing::debug!(op = op.name(), "users not marked or read: {e}");
                }
                (token != 0).then_some(Completion::Kept { token, result })
            }
            Op::Record { pid, value, ttl_ms } => {
                let key = Keys::new(&self.settings.prefix).record(&pid);
                match value {
                    Some(value) => {
                        if let Err(e) = self.with(|c| c.keep(&key, &value, ttl_ms)) {
                            tracing::warn!("a Socket.IO session's record was not kept: {e}");
                        }
                        None
                    }
                    None => {
                        let result = self.with(|c| c.take(&key));
                        Some(Completion::Record { token, result })
                    }
                }
            }
            Op::Control { node, payload } => {
                let keys = Keys::new(&self.settings.prefix);
                let channel = node.map_or_else(|| keys.control(), |node| keys.node(&node));
                let heard = self.with(|c| c.publish_raw(&channel, &payload));
                if let Err(e) = &heard {
                    tracing::warn!("a server API command for the other nodes was lost: {e}");
                }
                (token != 0).then_some(Completion::Told { token, heard })
            }
            Op::Census(counts) => {
                let node = self.settings.node.clone();
                // Three missed seconds and a node's counts are gone.
                let result = self.with(|c| c.census(&node, 3_000, &counts));
                Some(Completion::Census { counts, result })
            }
            Op::Refresh(locks) => {
                let lost = self.with(|c| c.refresh(&locks, session_ttl)).map(|places| {
                    places
                        .iter()
                        .filter_map(|&i| locks.get(i).cloned())
                        .collect()
                });
                Some(Completion::Refreshed { lost })
            }
        }
    }

    /// `f` on the connection (made first if need be), its failure noted.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, ClusterError>,
    ) -> Result<T, ClusterError> {
        let result = match self.client() {
            Ok(client) => f(client),
            Err(e) => Err(e),
        };
        self.check(&result);
        result
    }

    fn publish(&mut self, run: Vec<(usize, u64, Publish)>) {
        if run.is_empty() {
            return;
        }
        let (to, mut batch): (Vec<(usize, u64)>, Vec<Publish>) =
            run.into_iter().map(|(s, t, p)| ((s, t), p)).unzip();
        if self.settings.floors.is_none() {
            for p in batch.iter_mut().filter(|p| p.floor.is_none()) {
                p.floor = Some(0);
            }
        }
        let mut outcomes = self.send_publishes(&mut batch);
        // A connection that died unnoticed (Redis restarted since it last answered) leaves
        // what was sent on it unknown: a publish with an idempotency key is safe to send
        // again, once, on a new connection (the first to have run, if one did, answers).
        let again: Vec<usize> = (0..batch.len())
            .filter(|&i| matches!(outcomes[i], Err(ClusterError::Unknown(_))))
            .filter(|&i| batch[i].idempotency_key.is_some())
            .collect();
        if !again.is_empty() {
            let mut retry: Vec<Publish> = again.iter().map(|&i| batch[i].clone()).collect();
            let answers = self.send_publishes(&mut retry);
            again
                .into_iter()
                .zip(answers)
                .for_each(|(i, a)| outcomes[i] = a);
        }
        let mut outcomes = outcomes.into_iter();
        for ((shard, token), publish) in to.into_iter().zip(batch) {
            let result = outcomes
                .next()
                .unwrap_or_else(|| Err(ClusterError::Protocol("no outcome".into())));
            let unsent =
                matches!(result, Err(ClusterError::Unavailable(_))).then(|| publish.into());
            let completion = Completion::Published {
                token,
                result,
                unsent,
            };
            self.complete(shard, completion);
        }
    }

    /// One round trip for `batch` (and one more for channels Redis has no numbering for):
    /// each message's outcome.
    fn send_publishes(&mut self, batch: &mut [Publish]) -> Vec<Result<Published, ClusterError>> {
        let started = Instant::now();
        let outcomes = match self.client() {
            Ok(client) => {
                let outcomes = client.publish(batch);
                let stats = &self.stats;
                stats.publish_round_trips.fetch_add(1, Ordering::Relaxed);
                self.count(&self.stats.publishes, batch.len() as u64, started);
                outcomes
            }
            // Nothing was sent: not a round trip.
            Err(e) => Err(e),
        };
        let outcomes = outcomes.map(|outcomes| self.floored(batch, outcomes));
        self.check(&outcomes);
        outcomes.unwrap_or_else(|e| vec![Err(e); batch.len()])
    }

    /// Publish again, from where the store's decisions leave them, the messages refused for
    /// channels Redis has no numbering for; in order, so a channel's messages keep theirs.
    fn floored(
        &mut self,
        batch: &mut [Publish],
        mut outcomes: Vec<Result<Published, ClusterError>>,
    ) -> Vec<Result<Published, ClusterError>> {
        let refused: Vec<usize> = (0..outcomes.len())
            .filter(|&i| matches!(outcomes[i], Err(ClusterError::NoFloor)))
            .collect();
        let Some(floors) = self.settings.floors.clone().filter(|_| !refused.is_empty()) else {
            return outcomes;
        };
        let mut found: HashMap<String, Result<u64, String>> = HashMap::new();
        for &i in &refused {
            let channel = &batch[i].channel;
            let floor = found
                .entry(channel.clone())
                .or_insert_with(|| (floors.0)(channel))
                .clone();
            match floor {
                Ok(floor) => batch[i].floor = Some(floor),
                Err(e) => outcomes[i] = Err(ClusterError::Unavailable(e)),
            }
        }
        let again: Vec<usize> = refused
            .into_iter()
            .filter(|&i| batch[i].floor.is_some())
            .collect();
        let retry: Vec<Publish> = again.iter().map(|&i| batch[i].clone()).collect();
        let answers = match self.client() {
            Ok(client) => client.publish(&retry),
            Err(e) => Err(e),
        };
        match answers {
            Ok(answers) => again
                .into_iter()
                .zip(answers)
                .for_each(|(i, a)| outcomes[i] = a),
            Err(e) => again.into_iter().for_each(|i| outcomes[i] = Err(e.clone())),
        }
        outcomes
    }

    fn count(&self, counter: &AtomicU64, n: u64, started: Instant) {
        counter.fetch_add(n, Ordering::Relaxed);
        let micros = started.elapsed().as_micros() as u64;
        self.stats.wait_micros.fetch_add(micros, Ordering::Relaxed);
        if let Ok(mut histogram) = self.stats.round_trip.lock() {
            histogram.saturating_record(micros.max(1));
        }
    }

    /// After a failed connection, the next request connects again.
    fn check<T>(&mut self, result: &Result<T, ClusterError>) {
        if result.is_ok() {
            self.answered = Instant::now();
        }
        if let Err(ClusterError::Unavailable(_) | ClusterError::Unknown(_)) = result {
            self.client = None;
            self.stats.up.store(false, Ordering::Relaxed);
        }
    }

    fn complete(&self, shard: usize, completion: Completion) {
        if let Some(to) = self.completions.get(shard) {
            // A shard that stopped no longer wants its answers.
            let _ = to.send(completion);
        }
    }

    /// Check an idle connection; a dead one is dropped (the next use connects again).
    fn probe(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        match client.ping() {
            Ok(()) => self.answered = Instant::now(),
            Err(e) => {
                tracing::warn!(url = %self.settings.url, "Redis connection lost: {e}");
                self.client = None;
                self.stats.up.store(false, Ordering::Relaxed);
            }
        }
    }

    fn client(&mut self) -> Result<&mut Client, ClusterError> {
        let suspect = self.settings.suspect.swap(false, Ordering::Relaxed);
        if self.client.is_some() && (suspect || self.answered.elapsed() >= self.settings.probe) {
            self.probe();
        }
        if self.client.is_none() {
            let now = Instant::now();
            if now < self.backoff.retry_at {
                let wait = self.backoff.retry_at - now;
                return Err(ClusterError::Unavailable(format!(
                    "reconnecting to {} in {} ms",
                    self.settings.url,
                    wait.as_millis()
                )));
            }
            let s = &self.settings;
            let keys = Keys::new(&s.prefix);
            match Client::connect(&s.url, keys, s.retention.clone(), s.timeout) {
                Ok(client) => {
                    self.client = Some(client);
                    self.answered = Instant::now();
                    self.backoff.succeeded();
                    self.stats.up.store(true, Ordering::Relaxed);
                    self.stats.connections.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.backoff.failed(now);
                    self.stats.up.store(false, Ordering::Relaxed);
                    tracing::warn!(url = %s.url, "cannot reach Redis: {e}");
                    return Err(e);
                }
            }
        }
        self.client
            .as_mut()
            .ok_or_else(|| ClusterError::Unavailable("not connected".into()))
    }
}
