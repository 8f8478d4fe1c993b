//! Counters. Each shard counts in plain `Cell`s (nothing shared on the per-message path) and
//! copies its totals into its slot of [`Global`] on a timer; the HTTP endpoints read the slots.
//! Connection counts are shared atomics: they change per connection, not per message.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Per-shard counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Messages received from clients.
    MessagesReceived,
    /// Frames written to clients.
    MessagesSent,
    /// Frames dropped from slow consumers' queues.
    MessagesDropped,
    /// Decisions accepted.
    DecisionsProcessed,
    /// Decisions answered from the idempotency table.
    DecisionsDuplicate,
    /// Decisions refused by validation.
    DecisionsRejected,
    /// Malformed client messages.
    BadMessages,
    /// Connections closed for being too slow (policy "close") or silent.
    SlowConsumerCloses,
    /// Write system calls to clients (frames sent / writes = batching achieved).
    Writes,
    /// Batches handed to other shards over the channel mesh.
    MeshBatches,
    /// Messages in those batches.
    MeshMessages,
    /// Subscriptions with `since` answered with a replay.
    Replays,
    /// Those replays reported `recovered: false`.
    ReplaysIncomplete,
    /// Connections closed with 4408: a message left incomplete, or replies left unread.
    StalledCloses,
    /// Times a connection's requests stopped being read because its replies were not.
    ReadsPaused,
    /// Channels whose state their owner keeps now (a gauge, set by the sweep).
    Channels,
    /// Channels whose state was freed once nobody needed it.
    ChannelsFreed,
    /// Fan-out frames encoded: one per message, dialect in use and shard with subscribers
    /// (not one per subscriber).
    FramesEncoded,
    /// Cluster: messages Redis published that this node could not deliver (missed, and gone
    /// from the history).
    ClusterGaps,
    /// Cluster: channels whose numbering started again (Redis lost their state), or moved to
    /// the node's own while it could not reach Redis, and back.
    ClusterResets,
    /// Cluster: messages numbered and delivered by this node alone (it could not reach
    /// Redis).
    ClusterLocal,
    /// Presence members of the channels this shard owns (a gauge).
    PresenceMembers,
    /// Presence changes told (JOIN, LEAVE, STATUS).
    PresenceChanges,
    /// Presence changes not told: the channel has more members than `[presence]
    /// max_announced`.
    PresenceUntold,
    /// Exclusive sessions taken over by a newer connection.
    SessionsReplaced,
    /// Connections refused because their exclusive session was held (policy "reject").
    SessionsRefused,
    /// PUBLISHes answered from the idempotency keys this node remembers (not published
    /// again).
    PublishDuplicates,
    /// Messages kept for users who are not connected (a gauge).
    OfflineKept,
    /// Kept messages delivered when their user connected.
    OfflineDelivered,
    /// Kept messages dropped to keep a user's queue within its bounds.
    OfflineDropped,
    /// Messages not kept: the node keeps `[offline] max_total_bytes` already, or the message
    /// alone is over `max_bytes`.
    OfflineRefused,
    /// Upgrades refused: their source address opened connections faster than
    /// `[limits] connections_per_ip_per_second`.
    ConnectionsRateLimited,
    /// Messages refused by a connection's own rates (`messages_per_second`,
    /// `bytes_per_second`).
    LimitConnectionRate,
    /// Messages refused by `key_messages_per_second`.
    LimitKeyRate,
    /// Messages refused by an org's message rate.
    LimitOrgRate,
    /// Upgrades refused by an org's `max_connections`.
    LimitOrgConnections,
    /// Subscriptions refused by `max_subscriptions`.
    LimitSubscriptions,
    /// Subscriptions refused by `max_subscribers_per_channel`.
    LimitSubscribers,
    /// SUBs and UNSUBs refused by `max_channels_per_request`.
    LimitChannelList,
    /// Channel names refused by `[channels] max_name_bytes`.
    LimitChannelName,
    /// Socket.IO reconnections that recovered their session (`socket.recovered`).
    SocketIoRecovered,
    /// Socket.IO reconnections with a pid that could not recover it (a fresh session).
    SocketIoNotRecovered,
}

const COUNTERS: usize = 42;

/// The limits refusals are counted by, with their label in `shardcast_limit_refusals_total`.
const LIMITS: [(Counter, &str); 9] = [
    (
        Counter::ConnectionsRateLimited,
        "connections_per_ip_per_second",
    ),
    (Counter::LimitConnectionRate, "connection_rate"),
    (Counter::LimitKeyRate, "key_messages_per_second"),
    (Counter::LimitOrgRate, "org_messages_per_second"),
    (Counter::LimitOrgConnections, "org_max_connections"),
    (Counter::LimitSubscriptions, "max_subscriptions"),
    (Counter::LimitSubscribers, "max_subscribers_per_channel"),
    (Counter::LimitChannelList, "max_channels_per_request"),
    (Counter::LimitChannelName, "max_channel_name_bytes"),
];
const AUTH_REASONS: [&str; 5] = [
    "missing_credentials",
    "invalid_key",
    "invalid_token",
    "token_expired",
    "token_revoked",
];

/// The tasks of a shard whose polls are timed (see [`ShardCounters::record_poll`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// A connection: its requests, replies and writes.
    Connection,
    /// Handing socket readiness to connections.
    Readiness,
    /// Accepting connections.
    Accept,
    /// The sweep (pings, timeouts, idle state) and publishing counters.
    Timers,
    /// Messages from other shards.
    Mesh,
    /// Answers from the storage threads.
    Storage,
    /// What the cluster's Redis threads report.
    Cluster,
}

const TASKS: [&str; 7] = [
    "connection",
    "readiness",
    "accept",
    "timers",
    "mesh",
    "storage",
    "cluster",
];

/// A poll at least this long counts as slow.
const SLOW_POLL: Duration = Duration::from_millis(1);

/// A histogram of microseconds, 1 µs to 60 s, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

/// A shard's own counters.
#[derive(Debug)]
pub struct ShardCounters {
    values: [Cell<u64>; COUNTERS],
    fanout_latency: RefCell<Histogram<u64>>,
    /// How late the lag probe's timer ran.
    loop_lag: RefCell<Histogram<u64>>,
    /// From a session's takeover to its older holder's close.
    kill_latency: RefCell<Histogram<u64>>,
    /// Per task: the longest single poll so far, in microseconds.
    longest_poll: [Cell<u64>; TASKS.len()],
    /// Per task: polls of at least [`SLOW_POLL`].
    slow_polls: [Cell<u64>; TASKS.len()],
}

impl Default for ShardCounters {
    fn default() -> Self {
        Self {
            values: std::array::from_fn(|_| Cell::new(0)),
            fanout_latency: RefCell::new(new_histogram()),
            loop_lag: RefCell::new(new_histogram()),
            kill_latency: RefCell::new(new_histogram()),
            longest_poll: Default::default(),
            slow_polls: Default::default(),
        }
    }
}

impl ShardCounters {
    /// Add `n` to a counter.
    #[inline]
    pub fn add(&self, counter: Counter, n: u64) {
        let cell = &self.values[counter as usize];
        cell.set(cell.get() + n);
    }

    /// Set a gauge.
    pub fn set(&self, counter: Counter, n: u64) {
        self.values[counter as usize].set(n);
    }

    /// Current value of a counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize].get()
    }

    /// Record the time from a message's arrival to its delivery into local queues.
    pub fn record_fanout(&self, elapsed: Duration) {
        let micros = (elapsed.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.fanout_latency.borrow_mut().record(micros);
    }

    /// Record how late a timer due `late` ago ran: the event loop's lag.
    pub fn record_lag(&self, late: Duration) {
        let micros = (late.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.loop_lag.borrow_mut().record(micros);
    }

    /// Record how long after a newer connection took its session an older one was told to
    /// go.
    pub fn record_kill(&self, elapsed: Duration) {
        let micros = (elapsed.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.kill_latency.borrow_mut().record(micros);
    }

    /// Record one poll of `task` that took `took`.
    #[inline]
    pub fn record_poll(&self, task: Task, took: Duration) {
        let i = task as usize;
        let micros = took.as_micros() as u64;
        if micros > self.longest_poll[i].get() {
            self.longest_poll[i].set(micros);
        }
        if took >= SLOW_POLL {
            self.slow_polls[i].set(self.slow_polls[i].get() + 1);
        }
    }

    /// The longest poll of `task` so far.
    pub fn longest_poll(&self, task: Task) -> Duration {
        Duration::from_micros(self.longest_poll[task as usize].get())
    }

    /// Copy totals into this shard's slot; the histograms move over as deltas.
    pub fn publish(&self, slot: &ShardSlot) {
        for (cell, shared) in self.values.iter().zip(&slot.values) {
            shared.store(cell.get(), Relaxed);
        }
        for (cell, shared) in self.longest_poll.iter().zip(&slot.longest_poll) {
            shared.store(cell.get(), Relaxed);
        }
        for (cell, shared) in self.slow_polls.iter().zip(&slot.slow_polls) {
            shared.store(cell.get(), Relaxed);
        }
        move_histogram(&self.fanout_latency, &slot.fanout_latency);
        move_histogram(&self.loop_lag, &slot.loop_lag);
        move_histogram(&self.kill_latency, &slot.kill_latency);
    }
}

/// Add a shard's recordings to its slot's and start afresh.
fn move_histogram(local: &RefCell<Histogram<u64>>, shared: &Mutex<Histogram<u64>>) {
    let mut local = local.borrow_mut();
    if !local.is_empty() {
        if let Ok(mut shared) = shared.lock() {
            let _ = shared.add(&*local);
        }
        local.reset();
    }
}

/// What one shard has published.
#[derive(Debug)]
pub struct ShardSlot {
    values: [AtomicU64; COUNTERS],
    fanout_latency: Mutex<Histogram<u64>>,
    loop_lag: Mutex<Histogram<u64>>,
    kill_latency: Mutex<Histogram<u64>>,
    longest_poll: [AtomicU64; TASKS.len()],
    slow_polls: [AtomicU64; TASKS.len()],
    /// Reloads of the configuration this shard has put in force.
    reloads: AtomicU64,
}

/// Process-wide state read by the HTTP endpoints.
#[derive(Debug)]
pub struct Global {
    /// When the server started.
    pub started: Instant,
    /// Unix milliseconds at start, shifted left 12 bits, and 12 random bits: makes connection
    /// ids unique across restarts and across the nodes of a cluster (two may start in the same
    /// millisecond), and stays below 2^53 for JavaScript clients, which get it as `epoch`.
    pub boot_id: u64,
    /// One slot per shard.
    pub shards: Vec<ShardSlot>,
    /// WebSocket connections open now.
    pub active: AtomicUsize,
    /// WebSocket connections ever accepted.
    pub total: AtomicU64,
    /// Most WebSocket connections open at once.
    pub peak: AtomicUsize,
    /// Upgrades refused because of `max_connections`.
    pub refused_capacity: AtomicU64,
    /// Reloads refused (the new configuration was invalid).
    pub reloads_refused: AtomicU64,
    /// Sessions per org, API key and token user (the limits over many connections).
    pub census: Mutex<crate::quota::Census>,
    auth_failures: [AtomicU64; 5],
    /// False once shutdown has begun.
    pub ready: AtomicBool,
    /// A cluster node's Redis threads.
    pub cluster: Option<crate::cluster::node::Stats>,
}

/// See [`Global::boot_id`].
fn boot_id() -> u64 {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    (crate::decision::unix_ms() << 12) | (random & 0xfff)
}

impl Global {
    /// State for `shards` shards.
    pub fn new(shards: usize) -> Self {
        Self {
            started: Instant::now(),
            boot_id: boot_id(),
            shards: (0..shards)
                .map(|_| ShardSlot {
                    values: std::array::from_fn(|_| AtomicU64::new(0)),
                    fanout_latency: Mutex::new(new_histogram()),
                    loop_lag: Mutex::new(new_histogram()),
                    kill_latency: Mutex::new(new_histogram()),
                    longest_poll: Default::default(),
                    slow_polls: Default::default(),
                    reloads: AtomicU64::new(0),
                })
                .collect(),
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
            refused_capacity: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            census: Default::default(),
            auth_failures: Default::default(),
            ready: AtomicBool::new(true),
            cluster: None,
        }
    }

    /// `shard` has put the `reloads`-th reload of the configuration in force.
    pub fn reconfigured(&self, shard: usize, reloads: u64) {
        if let Some(slot) = self.shards.get(shard) {
            slot.reloads.store(reloads, Relaxed);
        }
    }

    /// Claim a connection slot; false when `max` are already open.
    pub fn try_open(&self, max: usize) -> bool {
        let claimed = self
            .active
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1));
        match claimed {
            Ok(previous) => {
                self.total.fetch_add(1, Relaxed);
                self.peak.fetch_max(previous + 1, Relaxed);
                true
            }
            Err(_) => {
                self.refused_capacity.fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// Release a connection slot.
    pub fn close(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// Count a refused credential by reason code.
    pub fn auth_failed(&self, reason: crate::codes::ErrorCode) {
        if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason.as_str()) {
            self.auth_failures[i].fetch_add(1, Relaxed);
        }
    }

    /// Sum of a counter over all shards.
    pub fn sum(&self, counter: Counter) -> u64 {
        self.shards
            .iter()
            .map(|s| s.values[counter as usize].load(Relaxed))
            .sum()
    }

    /// `/health` body.
    pub fn health_json(&self, status: &str) -> String {
        let uptime = self.started.elapsed().as_secs();
        let c = |counter| self.sum(counter);
        format!(
            concat!(
                r#"{{"status":"{}","uptime":{{"seconds":{},"human":"{}h {}m"}},"shards":{},"#,
                r#""metrics":{{"connections":{{"total":{},"active":{},"peak":{}}},"#,
                r#""messages":{{"received":{},"sent":{},"dropped":{},"errors":{}}},"#,
                r#""decisions":{{"processed":{},"duplicates":{},"errors":{}}}}},"#,
                r#""memory":{{"rssBytes":{}}}{}}}"#
            ),
            status,
            uptime,
            uptime / 3600,
            uptime / 60 % 60,
            self.shards.len(),
            self.total.load(Relaxed),
            self.active.load(Relaxed),
            self.peak.load(Relaxed),
            c(Counter::MessagesReceived),
            c(Counter::MessagesSent),
            c(Counter::MessagesDropped),
            c(Counter::BadMessages),
            c(Counter::DecisionsProcessed),
            c(Counter::DecisionsDuplicate),
            c(Counter::DecisionsRejected),
            rss_bytes(),
            self.cluster_json(),
        )
    }

    /// `,"cluster":{…}` for `/health`, on a cluster node.
    fn cluster_json(&self) -> String {
        let Some(cluster) = &self.cluster else {
            return String::new();
        };
        let mut out = br#","cluster":{"node":"#.to_vec();
        crate::json::push_str(&mut out, &cluster.node_id);
        out.extend_from_slice(br#","redis":["#);
        for (i, (url, link, pubsub)) in cluster.instances.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let state = |up: bool| if up { "up" } else { "down" };
            out.extend_from_slice(br#"{"url":"#);
            crate::json::push_str(&mut out, url);
            let figures = format!(
                concat!(
                    r#","link":"{}","pubsub":"{}","subscriptions":{},"publishes":{},"#,
                    r#""roundTrips":{},"messagesReceived":{},"resubscribes":{}}}"#
                ),
                state(link.up.load(Relaxed)),
                state(pubsub.up.load(Relaxed)),
                pubsub.subscriptions.load(Relaxed),
                link.publishes.load(Relaxed),
                link.publish_round_trips.load(Relaxed),
                pubsub.messages.load(Relaxed),
                pubsub.resubscribes.load(Relaxed),
            );
            out.extend_from_slice(figures.as_bytes());
        }
        out.extend_from_slice(b"]}");
        String::from_utf8(out).unwrap_or_default()
    }

    /// `/metrics` body (Prometheus text format 0.0.4).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "shardcast_connections_active",
            "gauge",
            "Open WebSocket connections.",
            self.active.load(Relaxed) as u64,
        );
        metric(
            "shardcast_connections_total",
            "counter",
            "WebSocket connections accepted.",
            self.total.load(Relaxed),
        );
        metric(
            "shardcast_connections_peak",
            "gauge",
            "Most WebSocket connections open at once.",
            self.peak.load(Relaxed) as u64,
        );
        let census = self.census.lock().map(|c| c.nodes_heard()).unwrap_or(0);
        metric(
            "shardcast_census_nodes",
            "gauge",
            "Nodes sharing key and org limits, as the last census over Redis said (0: none yet).",
            u64::from(census),
        );
        metric(
            "shardcast_config_reloads_total",
            "counter",
            "Reloads of the configuration (SIGHUP, a change of the file) in force on every shard.",
            self.shards
                .iter()
                .map(|s| s.reloads.load(Relaxed))
                .min()
                .unwrap_or(0),
        );
        metric(
            "shardcast_config_reloads_refused_total",
            "counter",
            "Reloads refused because the new configuration was invalid (the old one stays).",
            self.reloads_refused.load(Relaxed),
        );
        metric(
            "shardcast_connections_refused_capacity_total",
            "counter",
            "Upgrades refused with 503 at max_connections.",
            self.refused_capacity.load(Relaxed),
        );
        metric(
            "shardcast_messages_received_total",
            "counter",
            "Messages received from clients.",
            self.sum(Counter::MessagesReceived),
        );
        metric(
            "shardcast_messages_sent_total",
            "counter",
            "Frames written to clients.",
            self.sum(Counter::MessagesSent),
        );
        metric(
            "shardcast_messages_dropped_total",
            "counter",
            "Frames dropped from slow consumers' queues.",
            self.sum(Counter::MessagesDropped),
        );
        metric(
            "shardcast_bad_messages_total",
            "counter",
            "Malformed client messages.",
            self.sum(Counter::BadMessages),
        );
        metric(
            "shardcast_write_syscalls_total",
            "counter",
            "Writes to client sockets (each carries every frame queued at the time).",
            self.sum(Counter::Writes),
        );
        metric(
            "shardcast_mesh_batches_total",
            "counter",
            "Batches handed to other shards (messages / batches = batching achieved).",
            self.sum(Counter::MeshBatches),
        );
        metric(
            "shardcast_mesh_messages_total",
            "counter",
            "Messages forwarded to other shards.",
            self.sum(Counter::MeshMessages),
        );
        metric(
            "shardcast_replays_total",
            "counter",
            "Channels subscribed with since and replayed.",
            self.sum(Counter::Replays),
        );
        metric(
            "shardcast_replays_incomplete_total",
            "counter",
            "Replays answered recovered:false (the client must resync).",
            self.sum(Counter::ReplaysIncomplete),
        );
        metric(
            "shardcast_slow_consumer_closes_total",
            "counter",
            "Connections closed for being slow or silent.",
            self.sum(Counter::SlowConsumerCloses),
        );
        metric(
            "shardcast_stalled_closes_total",
            "counter",
            "Connections closed with 4408 (a message left incomplete, or replies left unread).",
            self.sum(Counter::StalledCloses),
        );
        metric(
            "shardcast_reads_paused_total",
            "counter",
            "Times a connection was not read because it did not read its replies.",
            self.sum(Counter::ReadsPaused),
        );
        metric(
            "shardcast_channels",
            "gauge",
            "Channels whose owners keep state (sequence, history, subscribers elsewhere).",
            self.sum(Counter::Channels),
        );
        metric(
            "shardcast_channels_freed_total",
            "counter",
            "Channels forgotten once unused (no subscribers, nothing held, history expired).",
            self.sum(Counter::ChannelsFreed),
        );
        metric(
            "shardcast_frames_encoded_total",
            "counter",
            "Fan-out frames encoded: once per message and wire dialect on each shard with subscribers.",
            self.sum(Counter::FramesEncoded),
        );
        metric(
            "shardcast_cluster_gaps_total",
            "counter",
            "Runs of messages published through Redis that this node could not deliver.",
            self.sum(Counter::ClusterGaps),
        );
        metric(
            "shardcast_cluster_resets_total",
            "counter",
            "Channels whose numbering changed: Redis lost their state, or the node numbered them itself while it could not reach Redis, and back.",
            self.sum(Counter::ClusterResets),
        );
        metric(
            "shardcast_presence_members",
            "gauge",
            "Presence members: connections subscribed with presence, counted once per channel.",
            self.sum(Counter::PresenceMembers),
        );
        metric(
            "shardcast_presence_changes_total",
            "counter",
            "Presence changes told to a channel's members (JOIN, LEAVE, STATUS).",
            self.sum(Counter::PresenceChanges),
        );
        metric(
            "shardcast_presence_untold_total",
            "counter",
            "Presence changes not told: their channel had more members on the node than [presence] max_announced (PRESENCE still lists them).",
            self.sum(Counter::PresenceUntold),
        );
        metric(
            "shardcast_sessions_replaced_total",
            "counter",
            "Exclusive sessions taken over by a newer connection (the older one closed with 4408).",
            self.sum(Counter::SessionsReplaced),
        );
        metric(
            "shardcast_sessions_refused_total",
            "counter",
            "Connections refused with 4402 because their exclusive session was held.",
            self.sum(Counter::SessionsRefused),
        );
        metric(
            "shardcast_cluster_local_messages_total",
            "counter",
            "Messages numbered and delivered by this node alone while it could not reach Redis (the other nodes never get them).",
            self.sum(Counter::ClusterLocal),
        );
        metric(
            "shardcast_decisions_processed_total",
            "counter",
            "Decisions accepted.",
            self.sum(Counter::DecisionsProcessed),
        );
        metric(
            "shardcast_decisions_duplicates_total",
            "counter",
            "Decisions deduplicated by idempotency key.",
            self.sum(Counter::DecisionsDuplicate),
        );
        metric(
            "shardcast_publish_duplicates_total",
            "counter",
            "PUBLISHes answered from a remembered idempotency key, not published again.",
            self.sum(Counter::PublishDuplicates),
        );
        metric(
            "shardcast_offline_messages",
            "gauge",
            "Messages kept for users who are not connected.",
            self.sum(Counter::OfflineKept),
        );
        metric(
            "shardcast_offline_delivered_total",
            "counter",
            "Kept messages delivered when their user connected.",
            self.sum(Counter::OfflineDelivered),
        );
        metric(
            "shardcast_socketio_recovered_total",
            "counter",
            "Socket.IO reconnections that recovered their session and what they missed.",
            self.sum(Counter::SocketIoRecovered),
        );
        metric(
            "shardcast_socketio_not_recovered_total",
            "counter",
            "Socket.IO reconnections with a pid that started a fresh session instead.",
            self.sum(Counter::SocketIoNotRecovered),
        );
        metric(
            "shardcast_offline_dropped_total",
            "counter",
            "Kept messages dropped, oldest first, to keep a user within its bounds.",
            self.sum(Counter::OfflineDropped),
        );
        metric(
            "shardcast_offline_refused_total",
            "counter",
            "Messages not kept: the node keeps max_total_bytes already, or one is over max_bytes.",
            self.sum(Counter::OfflineRefused),
        );
        metric(
            "shardcast_connections_rate_limited_total",
            "counter",
            "Upgrades refused (429): their source address opened connections too fast.",
            self.sum(Counter::ConnectionsRateLimited),
        );
        metric(
            "shardcast_decisions_rejected_total",
            "counter",
            "Decisions refused by validation.",
            self.sum(Counter::DecisionsRejected),
        );
        let _ = writeln!(out, "# HELP shardcast_limit_refusals_total Requests refused by each configured limit.\n# TYPE shardcast_limit_refusals_total counter");
        for (counter, limit) in LIMITS {
            let n = self.sum(counter);
            let _ = writeln!(
                out,
                "shardcast_limit_refusals_total{{limit=\"{limit}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP shardcast_auth_failures_total Refused credentials by reason.\n# TYPE shardcast_auth_failures_total counter");
        for (reason, n) in AUTH_REASONS.iter().zip(&self.auth_failures) {
            let _ = writeln!(
                out,
                "shardcast_auth_failures_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }
        let merged = merge(self.shards.iter().map(|slot| &slot.fanout_latency));
        histogram(
            &mut out,
            "shardcast_fanout_latency_seconds",
            "Time from a message's arrival to its delivery into subscriber queues.",
            &merged,
        );
        let merged = merge(self.shards.iter().map(|slot| &slot.loop_lag));
        histogram(
            &mut out,
            "shardcast_event_loop_lag_seconds",
            "How late each shard ran a timer due every 10 ms: time its event loop could not run a ready task.",
            &merged,
        );
        let merged = merge(self.shards.iter().map(|slot| &slot.kill_latency));
        histogram(
            &mut out,
            "shardcast_session_kill_latency_seconds",
            "From a newer connection taking an exclusive session (Redis's clock) to the older holder being told to go, on the holder's node (cluster mode).",
            &merged,
        );
        let _ = writeln!(out, "# HELP shardcast_event_loop_longest_poll_seconds The longest single poll of a shard's task since start, by task.\n# TYPE shardcast_event_loop_longest_poll_seconds gauge");
        for (i, task) in TASKS.iter().enumerate() {
            let longest = self.shards.iter().map(|s| s.longest_poll[i].load(Relaxed));
            let longest = longest.max().unwrap_or(0);
            let _ = writeln!(
                out,
                "shardcast_event_loop_longest_poll_seconds{{task=\"{task}\"}} {}",
                longest as f64 / 1e6
            );
        }
        let _ = writeln!(out, "# HELP shardcast_event_loop_slow_polls_total Polls of a shard's task that took 1 ms or more, by task.\n# TYPE shardcast_event_loop_slow_polls_total counter");
        for (i, task) in TASKS.iter().enumerate() {
            let slow: u64 = self
                .shards
                .iter()
                .map(|s| s.slow_polls[i].load(Relaxed))
                .sum();
            let _ = writeln!(
                out,
                "shardcast_event_loop_slow_polls_total{{task=\"{task}\"}} {slow}"
            );
        }
        self.cluster_prometheus(&mut out);
        out
    }

    /// The Redis figures of a cluster node, labelled by Redis URL.
    fn cluster_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let Some(cluster) = &self.cluster else {
            return;
        };
        type Read = fn(&LinkStats, &PubSubStats) -> u64;
        let families: [(&str, &str, &str, Read); 9] = [
            ("shardcast_cluster_link_up", "gauge", "1 while the node can publish through this Redis.", |l, _| l.up.load(Relaxed).into()),
            ("shardcast_cluster_pubsub_up", "gauge", "1 while the node's PUB/SUB connection to this Redis has every subscription.", |_, p| p.up.load(Relaxed).into()),
            ("shardcast_cluster_publishes_total", "counter", "Messages published through this Redis.", |l, _| l.publishes.load(Relaxed)),
            ("shardcast_cluster_publish_round_trips_total", "counter", "Round trips that carried them (publishes per round trip = batching).", |l, _| l.publish_round_trips.load(Relaxed)),
            ("shardcast_cluster_history_reads_total", "counter", "History reads from this Redis.", |l, _| l.history_reads.load(Relaxed)),
            ("shardcast_cluster_connections_total", "counter", "Connections made to this Redis (publishing and PUB/SUB): more than 2 means reconnects.", |l, p| l.connections.load(Relaxed) + p.connections.load(Relaxed)),
            ("shardcast_cluster_resubscribes_total", "counter", "Times every wanted channel was subscribed again on a new PUB/SUB connection.", |_, p| p.resubscribes.load(Relaxed)),
            ("shardcast_cluster_messages_received_total", "counter", "Messages heard on PUB/SUB (dropped ones included, read again from the history).", |_, p| p.messages.load(Relaxed)),
            ("shardcast_cluster_subscriptions", "gauge", "Channels this node is subscribed to in this Redis.", |_, p| p.subscriptions.load(Relaxed)),
        ];
        for (name, kind, help, read) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (url, link, pubsub) in &cluster.instances {
                let _ = writeln!(out, "{name}{{redis=\"{url}\"}} {}", read(link, pubsub));
            }
        }
        let merged = merge(
            cluster
                .instances
                .iter()
                .map(|(_, link, _)| &link.round_trip),
        );
        histogram(
            out,
            "shardcast_cluster_round_trip_seconds",
            "Time each round trip to Redis waited for its answer.",
            &merged,
        );
    }
}

use crate::cluster::link::Stats as LinkStats;
use crate::cluster::pubsub::Stats as PubSubStats;

/// The shards' histograms added up.
fn merge<'a>(slots: impl Iterator<Item = &'a Mutex<Histogram<u64>>>) -> Histogram<u64> {
    let mut merged = new_histogram();
    for slot in slots {
        if let Ok(h) = slot.lock() {
            let _ = merged.add(&*h);
        }
    }
    merged
}

/// Write `h` (microseconds) as the Prometheus histogram `name`, in seconds.
fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for bound_us in [
        50u64, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
        1_000_000,
    ] {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {}",
            bound_us as f64 / 1e6,
            h.count_between(0, bound_us)
        );
    }
    let total = h.len();
    // A fold from 0.0: an empty float sum() is -0.0, which prints as "-0".
    let sum = h.iter_recorded().fold(0.0, |sum: f64, v| {
        sum + v.value_iterated_to() as f64 * v.count_at_value() as f64
    });
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum {}", sum / 1e6);
    let _ = writeln!(out, "{name}_count {total}");
}

/// This process's resident memory (0 where /proc cannot say).
pub fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf reads a constant of the running system; no memory is touched.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_respect_the_limit_and_track_peak() {
        let g = Global::new(1);
        assert!(g.try_open(2));
        assert!(g.try_open(2));
        assert!(!g.try_open(2));
        g.close();
        assert!(g.try_open(2));
        assert_eq!(g.active.load(Relaxed), 2);
        assert_eq!(g.peak.load(Relaxed), 2);
        assert_eq!(g.total.load(Relaxed), 3);
        assert_eq!(g.refused_capacity.load(Relaxed), 1);
    }

    #[test]
    fn published_counters_are_summed() {
        let g = Global::new(2);
        let a = ShardCounters::default();
        let b = ShardCounters::default();
        a.add(Counter::MessagesSent, 3);
        b.add(Counter::MessagesSent, 4);
        a.record_fanout(Duration::from_micros(200));
        a.publish(&g.shards[0]);
        b.publish(&g.shards[1]);
        assert_eq!(g.sum(Counter::MessagesSent), 7);
        let text = g.prometheus();
        assert!(text.contains("shardcast_messages_sent_total 7"), "{text}");
        assert!(
            text.contains("shardcast_fanout_latency_seconds_count 1"),
            "{text}"
        );
        assert!(g.health_json("healthy").contains(r#""sent":7"#));
    }

    #[test]
    fn the_longest_poll_and_slow_polls_are_published_per_task() {
        let global = Global::new(1);
        let counters = ShardCounters::default();
        counters.record_poll(Task::Connection, Duration::from_micros(300));
        counters.record_poll(Task::Connection, Duration::from_millis(4));
        counters.record_poll(Task::Connection, Duration::from_micros(900));
        counters.record_poll(Task::Mesh, Duration::from_millis(1));
        counters.record_lag(Duration::from_millis(30));
        counters.publish(&global.shards[0]);
        let text = global.prometheus();
        for line in [
            "shardcast_event_loop_longest_poll_seconds{task=\"connection\"} 0.004\n",
            "shardcast_event_loop_slow_polls_total{task=\"connection\"} 1\n",
            "shardcast_event_loop_slow_polls_total{task=\"mesh\"} 1\n",
            "shardcast_event_loop_longest_poll_seconds{task=\"storage\"} 0\n",
            "shardcast_event_loop_lag_seconds_bucket{le=\"0.025\"} 0\n",
            "shardcast_event_loop_lag_seconds_bucket{le=\"0.05\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn an_empty_histogram_sums_to_zero_and_health_tells_the_memory() {
        let text = Global::new(1).prometheus();
        assert!(
            text.contains("shardcast_fanout_latency_seconds_sum 0\n"),
            "{text}"
        );
        assert!(!text.contains("-0"), "{text}");
        let health: serde_json::Value =
            serde_json::from_str(&Global::new(1).health_json("healthy")).unwrap();
        assert!(
            health["memory"]["rssBytes"].as_u64().unwrap() > 1_000_000,
            "{health}"
        );
    }
}
