//! shardcast: a thread-per-core WebSocket server for real-time decision streaming.
//!
//! # Layout
//! The protocol core is plain code that tests drive without sockets; I/O sits at the edges.
//! docs/ARCHITECTURE.md walks through the layers and the path of a message.
//!
//! - [`clock`]: the time the I/O edge hands the core (the core never reads a clock).
//! - [`codec`]: WebSocket frames (RFC 6455), decode from a borrowed buffer, encode once.
//! - [`codes`]: every error code and close code a client can be told, in one catalogue.
//! - [`http`]: HTTP/1.1 request heads (httparse), body lengths, the upgrade's checks,
//!   responses (keep-alive or close).
//! - [`routes`]: the HTTP route table: upgrades, health and metrics, the REST API (reads,
//!   and the server API: publish, ingest, users, broadcasts, connections, tokens), the
//!   `Origin` allow-list and CORS.
//! - [`dialect`]: what crosses the wire boundary: requests in, typed replies and
//!   publications out, each encoded by the connection's dialect (the shardcast JSON protocol
//!   in `dialect/shardcast.rs`: simd-json in, frames built once out; Socket.IO in
//!   `dialect/socketio/`).
//! - [`socketio`]: Socket.IO at the edge: Engine.IO sessions over WebSocket and
//!   long-polling, what their packets do, the seed services' events as requests.
//! - [`json`]: raw value spans (so `data` is relayed byte for byte), the duplicate-key and
//!   depth checks, and string escaping.
//! - [`decision`]: decision validation, ids, timestamps, the idempotency table.
//! - [`auth`]: API keys, JWTs, channel names and who may use them.
//! - [`queue`]: a connection's outbound queue: fan-out frames bounded and dropped oldest
//!   first, replies never dropped (bounded by the reply budget instead).
//! - [`rate`]: token buckets (per connection, per source address).
//! - [`quota`]: limits over many connections: sessions per org, key and user, and the
//!   shard's share of their message rates.
//! - [`engine`]: a channel's numbering, history and publications behind one trait, with the
//!   single-node implementation (`engine/memory.rs`) and the contract any engine passes.
//! - [`shard`]: the core: one shard's state and the dispatch of client requests and mesh
//!   messages (`shard/mod.rs`), over its sub-states in `shard/`: connections, local
//!   subscriptions and catch-up, owned channels, decisions, replays, mesh outboxes; tested
//!   with a simulated mesh, clock and store (`shard/sim.rs`).
//! - [`cluster`]: the Redis side of a cluster of nodes: scripts, a pipelining client and
//!   the thread that batches the shards' requests.
//! - [`mesh`]: the tasks moving message batches between shards (and why they cannot deadlock).
//! - [`conn`]: one connection's state machine: read, handle, write.
//! - [`tls`]: `wss://` and `https://` (rustls), fed and drained by the connection's I/O.
//! - [`poller`]: socket readiness from the shard's own io_uring (no per-socket heap).
//! - [`metrics`]: per-shard counters and the `/health` and `/metrics` bodies.
//! - [`storage`]: durable decisions: SQLite or PostgreSQL behind a group-committing writer
//!   thread, reader threads for history and queries, and opening the store at start-up.
//! - [`server`]: start-up (fd limit, CPUs, listeners, executors), reloads and graceful
//!   shutdown; [`reload`]: watching the configuration file.
//! - [`config`]: the TOML file and its `SHARDCAST_…` overrides.

pub mod auth;
pub mod clock;
pub mod cluster;
pub mod codec;
pub mod codes;
pub mod config;
pub mod conn;
pub mod decision;
pub mod dialect;
pub mod engine;
pub mod http;
pub mod json;
pub mod mesh;
pub mod metrics;
pub mod poller;
pub mod queue;
pub mod quota;
pub mod rate;
pub mod reload;
pub mod routes;
pub mod server;
pub mod shard;
pub mod socketio;
pub mod storage;
pub mod tls;
