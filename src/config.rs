//! Configuration: a TOML file, then `SHARDCAST_…` environment overrides, then the command line.
//!
//! Any field can be set from the environment: the variable name is `SHARDCAST_` followed by the
//! field's path in upper case, sections joined with `__` (`SHARDCAST_LIMITS__MAX_MESSAGE_BYTES`).
//! Values are read as TOML literals where they parse as one (numbers, booleans, arrays, inline
//! tables such as `SHARDCAST_API_KEYS='[{id="a",secret="…",org="acme",scopes=["subscribe"]}]'`)
//! and as plain strings otherwise.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The secret of the demo key shipped in config/shardcast.toml.
pub const DEMO_SECRET: &str = "demo-secret";

/// Errors found while loading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path of the file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML (file or environment) does not fit the schema.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// The values parse but cannot be used together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// What to do when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackpressurePolicy {
    /// Drop the oldest queued message and tell the client once per burst.
    DropOldest,
    /// Close the slow consumer with 1008.
    Close,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text each (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (`message` and the
    /// event's fields) and the spans it is in.
    Json,
}

/// TLS (rustls): a listener of its own, beside the plain one.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// Address the TLS listener binds (every shard, SO_REUSEPORT); none: no TLS.
    pub listen: Option<SocketAddr>,
    /// PEM file of the certificate chain, the server's first; read again on every reload.
    pub cert: String,
    /// PEM file of its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// Logging (stderr).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// What is written, as `RUST_LOG` says it (`info`, `warn,shardcast=debug`…);
    /// `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// How a refused credential is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseWith {
    /// HTTP 401 before the upgrade.
    Http,
    /// Upgrade, then close with 4401 (bad key) or 4403 (bad token): browsers can see close
    /// codes but not HTTP statuses.
    Close,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address every shard listens on (SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Number of shards (executors); 0 means one per CPU this process may run on.
    pub shards: usize,
    /// First CPU to pin shard 0 to, among the CPUs this process may run on.
    pub cpu_offset: usize,
    /// Most WebSocket connections held at once (0: as many as the file-descriptor limit
    /// allows); further upgrades get HTTP 503.
    pub max_connections: usize,
    /// Listen backlog per shard.
    pub backlog: u32,
    /// How often the configuration file is looked at for changes, which reload it as SIGHUP
    /// does (0: only SIGHUP).
    pub watch_config_ms: u64,
    /// Message size, queue and abuse limits.
    pub limits: Limits,
    /// Ping/pong and handshake timing.
    pub websocket: WebSocket,
    /// Token verification.
    pub auth: Auth,
    /// Channel naming.
    pub channels: Channels,
    /// Decision ingest.
    pub ingest: Ingest,
    /// Durable decisions.
    pub storage: Storage,
    /// Recent messages kept per channel for `SUB` with `since`.
    pub history: History,
    /// Who is in a channel (`SUB` with `presence`).
    pub presence: Presence,
    /// One connection per user (per session name) for exclusive credentials.
    pub sessions: Sessions,
    /// Messages to users who are not connected, kept for when they are.
    pub offline: Offline,
    /// Graceful shutdown.
    pub shutdown: Shutdown,
    /// Cross-shard mesh.
    pub mesh: Mesh,
    /// Several nodes as one server, through Redis (docs/CLUSTER.md).
    pub cluster: Cluster,
    /// Diagnostic endpoints.
    pub diagnostics: Diagnostics,
    /// The Socket.IO endpoint.
    pub socketio: SocketIo,
    /// The HTTP side of the port: origins, request bodies.
    pub http: Http,
    /// Logging.
    pub log: Log,
    /// `wss://` and `https://`.
    pub tls: Tls,
    /// API keys.
    pub api_keys: Vec<ApiKey>,
}

/// Limits applied to every connection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest message a client may send (larger: close 1009).
    pub max_message_bytes: usize,
    /// Most messages queued for one connection.
    pub outbound_queue_messages: usize,
    /// Most bytes queued for one connection.
    pub outbound_queue_bytes: usize,
    /// What to do when the queue is full.
    pub backpressure_policy: BackpressurePolicy,
    /// Consecutive malformed messages tolerated before closing with 4400.
    pub max_bad_messages: u32,
    /// Messages a client may send per second (0: unlimited); more get `rate_limited`.
    pub messages_per_second: u32,
    /// Messages a client may send in a burst (0: one second's worth).
    pub message_burst: u32,
    /// Consecutive rate-limited messages tolerated before closing with 4429.
    pub max_rate_limited: u32,
    /// Replies (answers, pongs) waiting for a client before its requests stop being read.
    pub reply_queue_messages: usize,
    /// Bytes of replies waiting for a client before its requests stop being read.
    pub reply_queue_bytes: usize,
    /// Channels one connection may be subscribed to at once (a subscription to a channel of
    /// its own costs the server about 360 B of heap, measured by tests/memory.rs); more get
    /// `too_many_subscriptions`.
    pub max_subscriptions: usize,
    /// Bytes of messages one connection may send per second (0: any); over it a message gets
    /// `rate_limited`, as over `messages_per_second`.
    pub bytes_per_second: u32,
    /// Bytes a connection may send at once before the byte rate applies (0: one second's
    /// worth); never less than `max_message_bytes`, or a large message could never pass.
    pub byte_burst: u32,
    /// New connections one source address may open per second (0: any): past it, upgrades
    /// get 429 `rate_limited` with `Retry-After`, before their credentials are checked.
    /// Each shard enforces its share (the kernel spreads an address's connections over
    /// the shards), so the whole is approximate.
    pub connections_per_ip_per_second: u32,
    /// Connections an address may open at once before the rate applies (0: one second's
    /// worth).
    pub connection_burst_per_ip: u32,
    /// Messages one API key, or one token's user, may send per second over all its
    /// connections and server API requests (0: any). Each shard holds a share, rebalanced
    /// every second by where its connections are; in a cluster, per node.
    pub key_messages_per_second: u32,
    /// Burst of `key_messages_per_second` (0: one second's worth).
    pub key_message_burst: u32,
    /// Messages one org may send per second, all its keys and users together (0: any);
    /// shared out as `key_messages_per_second` is. `[limits.orgs.NAME]` overrides it.
    pub org_messages_per_second: u32,
    /// Burst of `org_messages_per_second` (0: one second's worth).
    pub org_message_burst: u32,
    /// WebSocket connections one org may hold at once (0: any); more get HTTP 429
    /// `too_many_connections`. `[limits.orgs.NAME]` overrides it. In a cluster the other
    /// nodes' count as of the last second's census.
    pub org_max_connections: usize,
    /// Subscribers one channel may have (0: any); more get `too_many_subscribers`. Each
    /// shard holds its share (exact with one shard per node).
    pub max_subscribers_per_channel: usize,
    /// Channels one SUB or UNSUB may name.
    pub max_channels_per_request: usize,
    /// Limits of particular orgs (tenants), over the defaults above.
    pub orgs: std::collections::BTreeMap<String, OrgLimits>,
}

/// One org's own limits (`[limits.orgs.NAME]`); a field left out takes `[limits]`'s.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrgLimits {
    /// Messages per second, all the org's connections and requests together.
    pub messages_per_second: Option<u32>,
    /// Burst of those.
    pub message_burst: Option<u32>,
    /// WebSocket connections at once on a node.
    pub max_connections: Option<usize>,
}

impl Limits {
    /// The reply budget of each connection.
    pub fn reply_budget(&self) -> crate::queue::ReplyBudget {
        crate::queue::ReplyBudget {
            messages: self.reply_queue_messages,
            bytes: self.reply_queue_bytes,
        }
    }

    /// The fan-out bounds of each connection's queue.
    pub fn bounds(&self) -> crate::queue::Bounds {
        crate::queue::Bounds {
            messages: self.outbound_queue_messages,
            bytes: self.outbound_queue_bytes,
            drop_oldest: self.backpressure_policy == BackpressurePolicy::DropOldest,
        }
    }

    /// The client byte rate limit.
    pub fn byte_rate(&self) -> crate::rate::Rate {
        let burst = match self.byte_burst {
            0 => self.bytes_per_second,
            n => n,
        };
        let largest = u32::try_from(self.max_message_bytes).unwrap_or(u32::MAX);
        crate::rate::Rate {
            per_second: self.bytes_per_second,
            burst: burst.max(largest),
        }
    }

    /// Each of `nshards` shards' share of the per-address connection rate.
    pub fn ip_rate(&self, nshards: usize) -> crate::rate::Rate {
        let share = |n: u32| n.div_ceil(nshards.max(1) as u32);
        let burst = match self.connection_burst_per_ip {
            0 => self.connections_per_ip_per_second,
            n => n,
        };
        crate::rate::Rate {
            per_second: share(self.connections_per_ip_per_second),
            burst: share(burst),
        }
    }

    /// The message rate of one API key or token user (all its connections).
    pub fn key_rate(&self) -> crate::rate::Rate {
        rate_of(self.key_messages_per_second, self.key_message_burst)
    }

    /// The message rate of `org` (all its connections).
    pub fn org_rate(&self, org: &str) -> crate::rate::Rate {
        match self.orgs.get(org) {
            // An org's own rate comes with its own burst (one second's worth unless given).
            Some(OrgLimits {
                messages_per_second: Some(rate),
                message_burst,
                ..
            }) => rate_of(*rate, message_burst.unwrap_or(0)),
            own => rate_of(
                self.org_messages_per_second,
                own.and_then(|o| o.message_burst)
                    .unwrap_or(self.org_message_burst),
            ),
        }
    }

    /// Whether some org has a message rate.
    pub fn any_org_rate(&self) -> bool {
        self.org_messages_per_second > 0
            || self.orgs.values().any(|o| o.messages_per_second > Some(0))
    }

    /// Whether some org has a cap on its connections.
    pub fn any_org_max(&self) -> bool {
        self.org_max_connections > 0 || self.orgs.values().any(|o| o.max_connections > Some(0))
    }

    /// The connections `org` may hold at once (0: any).
    pub fn org_connections(&self, org: &str) -> usize {
        let own = self.orgs.get(org).and_then(|o| o.max_connections);
        own.unwrap_or(self.org_max_connections)
    }

    /// The client message rate limit.
    pub fn rate(&self) -> crate::rate::Rate {
        rate_of(self.messages_per_second, self.message_burst)
    }
}

/// A rate and its burst (0: one second's worth).
fn rate_of(per_second: u32, burst: u32) -> crate::rate::Rate {
    crate::rate::Rate {
        per_second,
        burst: if burst == 0 { per_second } else { burst },
    }
}

/// WebSocket timing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocket {
    /// Send a WebSocket ping after this long without hearing from the client.
    pub ping_interval_ms: u64,
    /// Drop a connection that has sent nothing (not even a pong) for this long.
    pub idle_timeout_ms: u64,
    /// Drop a connection that has not completed its HTTP request in this long.
    pub handshake_timeout_ms: u64,
    /// Close (4408) a connection whose message has not arrived whole this long after the
    /// previous one did.
    pub message_timeout_ms: u64,
    /// Close (4408) a connection that has read none of its replies for this long while its
    /// reply budget was spent.
    pub reply_timeout_ms: u64,
}

/// Token (JWT) settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// HS256 secret for JWTs (and for the tokens `POST /api/tokens` issues); empty: no
    /// HS256 tokens.
    pub jwt_secret: String,
    /// A secret HS256 tokens may still be signed with while clients move to `jwt_secret`
    /// (set it to the old secret when rotating; empty: none).
    pub jwt_secret_previous: String,
    /// A PEM public key file (RSA: RS256, EC P-256: ES256) tokens may be signed for.
    pub jwt_public_key: String,
    /// A JWKS file (`{"keys":[…]}`, as Auth0 or Supabase publish it): RS256 and ES256
    /// keys, chosen by the token's `kid`.
    pub jwks_file: String,
    /// When not empty, a token's `aud` must be one of these.
    pub jwt_audience: Vec<String>,
    /// When not empty, a token's `iss` must be one of these.
    pub jwt_issuer: Vec<String>,
    /// The org of a token without an `org` claim (Auth0's and Supabase's have none); empty:
    /// such tokens are refused.
    pub jwt_default_org: String,
    /// Clock skew allowed when checking `exp` and `nbf`, in seconds.
    pub jwt_leeway_secs: u64,
    /// How refused credentials are reported.
    pub refuse_with: RefuseWith,
    /// After a connection's token expires: how long it may still send REFRESH (its other
    /// requests refused, its subscriptions kept) before it is closed with 4403.
    pub token_grace_ms: u64,
    /// The longest life of a token `POST /api/tokens` issues, in seconds; revocations are
    /// kept this long (plus the leeway).
    pub max_token_secs: u64,
    /// Most revocations in force at once (each shard keeps them all); past it
    /// `POST /api/tokens/revoke` is refused until some expire.
    pub max_revocations: usize,
}

/// Channel naming rules.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Channels {
    /// Allowed categories (the third part of `type:id:category`).
    pub categories: Vec<String>,
    /// Longest channel name, in bytes (at most 1,024); longer names get `invalid_channel`.
    pub max_name_bytes: usize,
}

/// Decision ingest settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ingest {
    /// How long an idempotency key keeps deduplicating, in seconds.
    pub dedup_window_secs: u64,
    /// Most idempotency keys remembered per shard (oldest forgotten first).
    pub dedup_max_entries: usize,
}

/// When an INGEST is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// After the transaction holding the decision has committed.
    Durable,
    /// On receipt; the decision is written behind.
    Received,
}

/// Where decisions are stored, and when they are acknowledged.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// `"sqlite://PATH"` (embedded), `"postgres://…"`, or `"memory"` (nothing durable).
    pub url: String,
    /// When an INGEST is acknowledged.
    pub ack: AckMode,
    /// Decisions waiting for the database at most; beyond it INGEST gets `storage_unavailable`.
    pub queue_capacity: usize,
    /// Most decisions committed in one transaction.
    pub max_batch: usize,
    /// Days a decision is kept (0: for ever); a background job deletes older ones.
    pub retention_days: u64,
    /// Reader threads (replays past the in-memory history, the decisions API), each with its
    /// own connection.
    pub readers: usize,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            url: "sqlite://data/shardcast.db".into(),
            ack: AckMode::Durable,
            queue_capacity: 65_536,
            max_batch: 4_096,
            retention_days: 0,
            readers: 2,
        }
    }
}

/// Presence: who is in a channel.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Presence {
    /// Most members in one PRESENCE answer (`cursor` pages through the rest).
    pub max_members: usize,
    /// Most bytes of a connection's presence metadata (STATUS `meta`).
    pub max_meta_bytes: usize,
    /// JOIN, LEAVE and STATUS are told while a channel has at most this many members on the
    /// node (each is a fan-out to every member: a mass reconnect of N members is N²/2
    /// deliveries); past it, PRESENCE is how members learn who is there.
    pub max_announced: usize,
    /// In a cluster: a member its node has not refreshed in Redis for this long is gone (its
    /// node stopped), and LEAVE is told; nodes refresh theirs every third of it.
    pub ttl_ms: u64,
}

impl Default for Presence {
    fn default() -> Self {
        Self {
            max_members: 1_000,
            max_meta_bytes: 1_024,
            max_announced: 10_000,
            ttl_ms: 30_000,
        }
    }
}

/// Offline delivery: a message the server API sends to a user with no connection is kept
/// (bounded, for a time, in the store) and delivered when the user next connects.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Offline {
    /// Keep messages for users who are not connected.
    pub enabled: bool,
    /// Most messages kept per user (the oldest goes first).
    pub max_messages: usize,
    /// Most bytes of data kept per user (the oldest goes first).
    pub max_bytes: usize,
    /// A message not delivered within this many seconds is dropped.
    pub ttl_secs: u64,
    /// Most bytes kept for all users of the node together; past it, new messages are not
    /// kept (`queued: false`).
    pub max_total_bytes: usize,
}

impl Default for Offline {
    fn default() -> Self {
        Self {
            enabled: false,
            max_messages: 100,
            max_bytes: 256 * 1024,
            ttl_secs: 86_400,
            max_total_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Recent messages each channel's owner keeps, so a reconnecting client can catch up.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct History {
    /// Messages kept per channel (0: none; stored decisions are still replayed from the store).
    pub size: usize,
    /// Seconds a message stays replayable from memory (0: no age limit).
    pub ttl_secs: u64,
}

impl Default for History {
    fn default() -> Self {
        Self {
            size: 1_000,
            ttl_secs: 3_600,
        }
    }
}

impl History {
    /// The ring's limits.
    pub fn limits(&self) -> crate::engine::history::Limits {
        crate::engine::history::Limits {
            size: self.size,
            ttl_ms: self.ttl_secs.saturating_mul(1_000),
        }
    }
}

/// Graceful shutdown settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shutdown {
    /// Longest time spent flushing queues and closing connections.
    pub drain_timeout_ms: u64,
    /// Delay suggested to clients before they reconnect.
    pub reconnect_in_ms: u64,
}

/// Cross-shard channel mesh settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mesh {
    /// Capacity of each shard-to-shard channel, in batches.
    pub channel_capacity: usize,
    /// Messages waiting for one peer shard before publishers are slowed down.
    pub max_pending: usize,
}

/// Several nodes as one server: channels numbered, kept and delivered through Redis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// Redis URLs (a string or a list; channels are spread over several by a stable hash of
    /// their name). Empty: a single node.
    #[serde(deserialize_with = "one_or_many")]
    pub redis_url: Vec<String>,
    /// This node's name in logs and `/health` (empty: made up at start).
    pub node_id: String,
    /// Prefix of every Redis key and PUB/SUB channel (several clusters may share a Redis).
    pub prefix: String,
    /// A silent PUB/SUB connection is probed this often.
    pub probe_interval_ms: u64,
    /// Bound on connecting to Redis, on each round trip and on a probe's answer.
    pub timeout_ms: u64,
    /// Publishes a shard may have waiting for Redis before its publishers are paused.
    pub max_in_flight: usize,
    /// Seconds a channel's epoch and numbering outlive its last publish (0: for ever).
    pub meta_ttl_secs: u64,
    /// Seconds an idempotency key's result is remembered in Redis.
    pub result_ttl_secs: u64,
    /// A decision committed this long ago and still without a seq (its node stopped before
    /// Redis numbered it) is numbered by another node; looked for this often.
    pub renumber_after_ms: u64,
}

impl Cluster {
    /// Whether this node is part of a cluster.
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            redis_url: Vec::new(),
            node_id: String::new(),
            prefix: "shardcast".into(),
            probe_interval_ms: 1_000,
            timeout_ms: 2_000,
            max_in_flight: 16_384,
            meta_ttl_secs: 0,
            result_ttl_secs: 86_400,
            renumber_after_ms: 5_000,
        }
    }
}

/// `url` without its credentials, for logs, health and metrics.
pub fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***{}", &url[at..]),
        _ => url.to_owned(),
    }
}

/// A string or a list of strings (an empty string: none).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Urls::deserialize(d)? {
        Urls::One(url) if url.is_empty() => Vec::new(),
        Urls::One(url) => vec![url],
        Urls::Many(urls) => urls,
    })
}

/// The HTTP side of the port.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    /// Browser origins that may upgrade and call the HTTP API: `*`, an origin
    /// (`https://app.example.com`) or any subdomain (`https://*.example.com`). Empty: any.
    /// A request without `Origin` (not a browser page) is never refused.
    pub allowed_origins: Vec<String>,
    /// Largest request body accepted (larger: 413).
    pub max_body_bytes: usize,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_body_bytes: 1 << 20,
        }
    }
}

/// Diagnostic endpoints.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Diagnostics {
    /// Serve `/echo` (no auth; loopback only) for WebSocket conformance testing.
    pub echo: bool,
    /// Make `/socket.io/` the Socket.IO protocol suite's reference app (no auth; loopback
    /// only) instead of the gateway.
    pub socketio_conformance: bool,
}

/// The Socket.IO endpoint (Engine.IO protocol 4, Socket.IO protocol 5).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketIo {
    /// Serve it at all.
    pub enabled: bool,
    /// Its path (socket.io-client's `path` option).
    pub path: String,
    /// The Engine.IO ping interval: the server pings this often.
    pub ping_interval_ms: u64,
    /// How long a ping waits for its pong before the session is closed.
    pub ping_timeout_ms: u64,
    /// How long a new connection has to join a namespace (CONNECT).
    pub connect_timeout_ms: u64,
    /// Namespaces clients may join besides `/`.
    pub namespaces: Vec<String>,
    /// Most binary attachments in one packet.
    pub max_attachments: usize,
    /// Where rooms that are not channel names go: room `R` of a client of org `O` is channel
    /// `org:O:{room_category}:R` (a category of `[channels]`).
    pub room_category: String,
    /// How long a dropped connection's state waits for its client to recover it (Socket.IO's
    /// `maxDisconnectionDuration`); 0: no recovery (no `pid` in the CONNECT answer).
    pub recovery_ms: u64,
    /// Most dropped connections' states kept at once (the node's; past it, no more).
    pub max_recoverable: usize,
}

impl Default for SocketIo {
    fn default() -> Self {
        // Socket.IO 4's own defaults (packages/socket.io/lib/index.ts, engine.io/lib/server.ts).
        Self {
            enabled: true,
            path: "/socket.io/".into(),
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            connect_timeout_ms: 45_000,
            namespaces: Vec::new(),
            max_attachments: 10,
            room_category: "rooms".into(),
            recovery_ms: 120_000,
            max_recoverable: 100_000,
        }
    }
}

impl SocketIo {
    /// Whether clients may join `namespace`.
    pub fn serves(&self, namespace: &str) -> bool {
        namespace == "/" || self.namespaces.iter().any(|n| n == namespace)
    }
}

/// A scope a principal may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// SUB / UNSUB.
    Subscribe,
    /// PUBLISH.
    Publish,
    /// INGEST.
    Ingest,
    /// Every channel, every operation.
    Admin,
    /// Issue and revoke tokens for its own org (`POST /api/tokens`).
    Tokens,
}

/// An API key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Public key id (used in `key:<id>:*` channels and logs).
    pub id: String,
    /// The secret clients present.
    pub secret: String,
    /// Organization the key belongs to.
    pub org: String,
    /// Scopes granted.
    pub scopes: Vec<Scope>,
    /// `"exclusive"`: one connection per user and session name at a time (`[sessions]`).
    #[serde(default)]
    pub session: SessionMode,
}

/// Whether a credential's connections share their session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionMode {
    /// Any number of connections at once.
    #[default]
    Shared,
    /// One per session key (user, and `?session=NAME`).
    Exclusive,
}

/// What happens when a second connection claims an exclusive session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionPolicy {
    /// The newest wins: the older connection is told `session_replaced` and closed (4408).
    #[default]
    Replace,
    /// The first stays: the newcomer is closed with 4402.
    Reject,
}

/// Exclusive sessions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sessions {
    /// Who wins a conflict.
    pub policy: SessionPolicy,
    /// In a cluster: a session's lock in Redis that its node has not refreshed for this long
    /// is free (its node stopped); nodes refresh theirs every third of it.
    pub lock_ttl_ms: u64,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            policy: SessionPolicy::default(),
            lock_ttl_ms: 15_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: 0,
            cpu_offset: 0,
            max_connections: 0,
            backlog: 4096,
            watch_config_ms: 1_000,
            limits: Limits::default(),
            websocket: WebSocket::default(),
            auth: Auth::default(),
            channels: Channels::default(),
            ingest: Ingest::default(),
            storage: Storage::default(),
            history: History::default(),
            presence: Presence::default(),
            offline: Offline::default(),
            sessions: Sessions::default(),
            shutdown: Shutdown::default(),
            mesh: Mesh::default(),
            cluster: Cluster::default(),
            diagnostics: Diagnostics::default(),
            socketio: SocketIo::default(),
            http: Http::default(),
            log: Log::default(),
            tls: Tls::default(),
            api_keys: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 65536,
            outbound_queue_messages: 1024,
            outbound_queue_bytes: 4 << 20,
            backpressure_policy: BackpressurePolicy::DropOldest,
            max_bad_messages: 10,
            messages_per_second: 0,
            message_burst: 0,
            max_rate_limited: 100,
            reply_queue_messages: 1024,
            reply_queue_bytes: 1 << 20,
            max_subscriptions: 1_000,
            bytes_per_second: 0,
            byte_burst: 0,
            connections_per_ip_per_second: 0,
            connection_burst_per_ip: 0,
            key_messages_per_second: 0,
            key_message_burst: 0,
            org_messages_per_second: 0,
            org_message_burst: 0,
            org_max_connections: 0,
            max_subscribers_per_channel: 0,
            max_channels_per_request: 100,
            orgs: Default::default(),
        }
    }
}

impl Default for WebSocket {
    fn default() -> Self {
        Self {
            ping_interval_ms: 30_000,
            idle_timeout_ms: 75_000,
            handshake_timeout_ms: 10_000,
            message_timeout_ms: 30_000,
            reply_timeout_ms: 30_000,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            jwt_secret_previous: String::new(),
            jwt_public_key: String::new(),
            jwks_file: String::new(),
            jwt_audience: Vec::new(),
            jwt_issuer: Vec::new(),
            jwt_default_org: String::new(),
            jwt_leeway_secs: 0,
            refuse_with: RefuseWith::Close,
            token_grace_ms: 30_000,
            max_token_secs: 7 * 86_400,
            max_revocations: 100_000,
        }
    }
}

impl Default for Channels {
    fn default() -> Self {
        Self {
            categories: ["decisions", "notifications", "usage", "rooms"]
                .map(String::from)
                .to_vec(),
            max_name_bytes: 200,
        }
    }
}

impl Default for Ingest {
    fn default() -> Self {
        Self {
            dedup_window_secs: 86_400,
            dedup_max_entries: 1_000_000,
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 5_000,
            reconnect_in_ms: 1_000,
        }
    }
}

impl Default for Mesh {
    fn default() -> Self {
        Self {
            channel_capacity: 1024,
            max_pending: 65_536,
        }
    }
}

impl Config {
    /// Load `path` (if given), apply `SHARDCAST_…` variables from `env`, and check the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                (text, path.display().to_string())
            }
            None => (String::new(), "defaults".to_string()),
        };
        Self::parse(&text, &origin, env)
    }

    /// The configuration in TOML `text` (read from `origin`, for messages), then `env`.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Parse(format!("{origin}: {e}")))?;
        for (name, value) in env {
            if let Some(field) = name.strip_prefix("SHARDCAST_") {
                apply_override(&mut table, field, &value)?;
            }
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// `new` as it can take effect on a running server (a reload): what only a restart can
    /// change (the listener, shards, storage, the cluster, what sizes memory at start) kept
    /// as it is here, in force. Also returns the names of those settings that differ in
    /// `new` from `loaded`, the configuration as it was read before (start-up fills in some
    /// of what is in force: `max_connections`, the node id).
    pub fn live_part(&self, loaded: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
        let mut restart = Vec::new();
        macro_rules! keep {
            ($($field:ident).+) => {
                let (was, now) = (&loaded.$($field).+, &new.$($field).+);
                if toml::Value::try_from(was).ok() != toml::Value::try_from(now).ok() {
                    restart.push(stringify!($($field).+));
                }
                new.$($field).+ = self.$($field).+.clone();
            };
        }
        keep!(listen);
        keep!(shards);
        keep!(cpu_offset);
        keep!(max_connections);
        keep!(backlog);
        keep!(watch_config_ms);
        keep!(ingest);
        keep!(storage);
        keep!(history);
        keep!(presence.ttl_ms);
        keep!(sessions.lock_ttl_ms);
        keep!(offline);
        keep!(shutdown);
        keep!(mesh);
        keep!(cluster);
        keep!(diagnostics);
        keep!(log.format);
        keep!(tls.listen);
        (new, restart)
    }

    /// The configuration as TOML, every secret masked (`***`): the JWT secret, API key
    /// secrets, and the credentials in storage and Redis URLs.
    pub fn masked(&self) -> Result<String, ConfigError> {
        let mut shown = self.clone();
        if !shown.auth.jwt_secret.is_empty() {
            shown.auth.jwt_secret = "***".into();
        }
        if !shown.auth.jwt_secret_previous.is_empty() {
            shown.auth.jwt_secret_previous = "***".into();
        }
        for key in &mut shown.api_keys {
            key.secret = "***".into();
        }
        shown.storage.url = redacted(&shown.storage.url);
        for url in &mut shown.cluster.redis_url {
            *url = redacted(url);
        }
        toml::to_string(&shown).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Check values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if let Err(e) = crate::auth::token_keys(&self.auth) {
            return invalid(format!("auth: {e}"));
        }
        if self.tls.listen.is_some() {
            if let Err(e) = crate::tls::acceptor(&self.tls) {
                return invalid(e);
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid(format!("log.level {:?}: {e}", self.log.level));
        }
        let exposed = !self.listen.ip().is_loopback();
        if exposed && self.api_keys.iter().any(|k| k.secret == DEMO_SECRET) {
            return invalid(format!(
                "refusing to listen on {} with the demo API key configured; replace it \
                 (SHARDCAST_API_KEYS) or listen on loopback",
                self.listen
            ));
        }
        if exposed && self.diagnostics.socketio_conformance {
            return invalid(format!(
                "the unauthenticated Socket.IO conformance app is loopback-only; disable \
                 diagnostics.socketio_conformance to listen on {}",
                self.listen
            ));
        }
        if !self.socketio.path.starts_with('/') || !self.socketio.path.ends_with('/') {
            return invalid("socketio.path must begin and end with '/'".into());
        }
        if self.socketio.ping_interval_ms == 0 || self.socketio.ping_timeout_ms == 0 {
            return invalid("socketio ping times must be greater than zero".into());
        }
        if let Some(bad) = self.socketio.namespaces.iter().find(|n| {
            !n.starts_with('/')
                || n.contains(',')
                || n.len() > crate::dialect::socketio::packet::MAX_NAMESPACE_BYTES
        }) {
            return invalid(format!(
                "socketio namespace {bad:?} must begin with '/' and hold no ','"
            ));
        }
        if exposed && self.diagnostics.echo {
            return invalid(format!(
                "the unauthenticated /echo endpoint is loopback-only; disable diagnostics.echo \
                 to listen on {}",
                self.listen
            ));
        }
        if self.limits.max_message_bytes == 0
            || self.limits.outbound_queue_messages == 0
            || self.limits.reply_queue_messages == 0
            || self.limits.reply_queue_bytes == 0
        {
            return invalid("limits must be greater than zero".into());
        }
        if self.limits.outbound_queue_bytes < self.limits.max_message_bytes {
            return invalid("limits.outbound_queue_bytes must hold at least one message".into());
        }
        if self.channels.max_name_bytes == 0
            || self.channels.max_name_bytes > crate::auth::MAX_CHANNEL_LEN
        {
            return invalid(format!(
                "channels.max_name_bytes must be 1 to {}",
                crate::auth::MAX_CHANNEL_LEN
            ));
        }
        let most = crate::dialect::shardcast::MAX_CHANNELS_PER_REQUEST;
        if self.limits.max_channels_per_request == 0 || self.limits.max_channels_per_request > most
        {
            return invalid(format!(
                "limits.max_channels_per_request must be 1 to {most}"
            ));
        }
        if self.channels.categories.is_empty() {
            return invalid("channels.categories must not be empty".into());
        }
        if let Err(e) = crate::routes::cors::validate(&self.http.allowed_origins) {
            return invalid(format!("http.{e}"));
        }
        if let Err(e) = crate::storage::Backend::parse(&self.storage.url) {
            return invalid(format!("storage.url: {e}"));
        }
        if self.storage.queue_capacity == 0 || self.storage.max_batch == 0 {
            return invalid("storage.queue_capacity and storage.max_batch must be positive".into());
        }
        if self.cluster.enabled() {
            if let Some(url) = self
                .cluster
                .redis_url
                .iter()
                .find(|u| !u.starts_with("redis://"))
            {
                return invalid(format!("cluster.redis_url: {url:?} is not a redis:// URL"));
            }
            if let Ok(crate::storage::Backend::Sqlite(_)) =
                crate::storage::Backend::parse(&self.storage.url)
            {
                return invalid(
                    "cluster mode needs a store every node shares: set storage.url to \
                     postgres://… (or \"memory\"); SQLite is one node's file"
                        .into(),
                );
            }
            if self.cluster.max_in_flight == 0 || self.cluster.timeout_ms == 0 {
                return invalid("cluster.max_in_flight and timeout_ms must be positive".into());
            }
        }
        if self.mesh.channel_capacity == 0 {
            return invalid("mesh.channel_capacity must be greater than zero".into());
        }
        let mut secrets = std::collections::HashSet::new();
        for key in &self.api_keys {
            if key.id.is_empty() || key.secret.is_empty() || key.org.is_empty() {
                return invalid("every api_keys entry needs id, secret and org".into());
            }
            if !secrets.insert(&key.secret) {
                return invalid(format!("api key {} reuses another key's secret", key.id));
            }
        }
        Ok(())
    }
}

fn apply_override(table: &mut toml::Table, field: &str, value: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = field.split("__").map(|p| p.to_ascii_lowercase()).collect();
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let (last, sections) = path
        .split_last()
        .ok_or_else(|| ConfigError::Parse(format!("empty variable name SHARDCAST_{field}")))?;
    let mut node = table;
    for section in sections {
        let entry = node
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| {
            ConfigError::Parse(format!("SHARDCAST_{field}: {section} is not a section"))
        })?;
    }
    node.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/shardcast.toml");
        let config = Config::load(Some(&path), []).unwrap();
        assert!(config.listen.ip().is_loopback());
        assert_eq!(config.api_keys[0].secret, DEMO_SECRET);
    }

    #[test]
    fn environment_overrides_any_field() {
        let config = Config::load(
            None,
            env(&[
                ("SHARDCAST_SHARDS", "3"),
                ("SHARDCAST_LIMITS__MAX_MESSAGE_BYTES", "1000"),
                ("SHARDCAST_LIMITS__BACKPRESSURE_POLICY", "close"),
                ("SHARDCAST_AUTH__JWT_SECRET", "s3cret with spaces"),
                (
                    "SHARDCAST_API_KEYS",
                    r#"[{id="k1",secret="x",org="acme",scopes=["subscribe","admin"]}]"#,
                ),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(config.shards, 3);
        assert_eq!(config.limits.max_message_bytes, 1000);
        assert_eq!(config.limits.backpressure_policy, BackpressurePolicy::Close);
        assert_eq!(config.auth.jwt_secret, "s3cret with spaces");
        assert_eq!(
            config.api_keys[0].scopes,
            vec![Scope::Subscribe, Scope::Admin]
        );
    }

    #[test]
    fn refuses_demo_key_and_echo_off_loopback() {
        let demo = r#"[{id="demo",secret="demo-secret",org="demo",scopes=["subscribe"]}]"#;
        let err = Config::load(
            None,
            env(&[
                ("SHARDCAST_LISTEN", "0.0.0.0:8080"),
                ("SHARDCAST_API_KEYS", demo),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("demo API key"), "{err}");
        let err = Config::load(
            None,
            env(&[
                ("SHARDCAST_LISTEN", "0.0.0.0:8080"),
                ("SHARDCAST_DIAGNOSTICS__ECHO", "true"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("loopback-only"), "{err}");
    }

    #[test]
    fn cluster_takes_one_redis_url_or_a_list_and_refuses_sqlite() {
        let memory = ("SHARDCAST_STORAGE__URL", "memory");
        let one = [
            ("SHARDCAST_CLUSTER__REDIS_URL", "redis://127.0.0.1:6379"),
            memory,
        ];
        let config = Config::load(None, env(&one)).unwrap();
        assert_eq!(config.cluster.redis_url, ["redis://127.0.0.1:6379"]);
        let two = r#"["redis://a:6379", "redis://b:6379"]"#;
        let config = Config::load(None, env(&[("SHARDCAST_CLUSTER__REDIS_URL", two), memory]));
        assert_eq!(config.unwrap().cluster.redis_url.len(), 2);
        assert!(!Config::default().cluster.enabled());
        let sqlite = [("SHARDCAST_CLUSTER__REDIS_URL", "redis://127.0.0.1:6379")];
        let err = Config::load(None, env(&sqlite)).unwrap_err();
        assert!(err.to_string().contains("shares"), "{err}");
    }

    #[test]
    fn a_reload_keeps_what_needs_a_restart() {
        let running = Config::default();
        let mut new = Config {
            listen: "0.0.0.0:9000".parse().unwrap(),
            ..Config::default()
        };
        new.presence.ttl_ms += 1;
        new.presence.max_meta_bytes += 1;
        new.limits.max_subscriptions = 7;
        new.auth.jwt_secret_previous = "old".into();
        let (live, restart) = running.live_part(&running, new);
        assert_eq!(restart, ["listen", "presence.ttl_ms"]);
        assert_eq!(live.listen, running.listen);
        assert_eq!(live.presence.ttl_ms, running.presence.ttl_ms);
        assert_eq!(
            live.presence.max_meta_bytes,
            running.presence.max_meta_bytes + 1
        );
        assert_eq!(live.limits.max_subscriptions, 7);
        assert_eq!(live.auth.jwt_secret_previous, "old");
        assert!(running.live_part(&running, running.clone()).1.is_empty());
        // What start-up filled in is kept, and not taken for a change.
        let started = Config {
            max_connections: 1_000,
            ..Config::default()
        };
        let (live, restart) = started.live_part(&running, Config::default());
        assert!(restart.is_empty(), "{restart:?}");
        assert_eq!(live.max_connections, 1_000);
    }

    #[test]
    fn unknown_fields_are_errors() {
        let err =
            Config::load(None, env(&[("SHARDCAST_LIMITS__MAX_MESAGE_BYTES", "1")])).unwrap_err();
        assert!(err.to_string().contains("max_mesage_bytes"), "{err}");
    }
}
