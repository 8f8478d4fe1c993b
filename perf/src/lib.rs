//! shardcast-bench as a library: the scenarios, so the server's test suite can run each one
//! for a second against a real server and check its counts.
//!
//! - [`ws`]: the client side of the WebSocket wire, parsed in place.
//! - [`adapter`]: how each kind of server is spoken to (shardcast, broadcast, Socket.IO).
//! - [`net`]: the single-threaded epoll engine holding every connection.
//! - [`connect`], [`fanout`]: the scenarios (fanout also runs ingest and churn).
//! - [`report`]: results as tables, JSON and SVG plots.
//! - [`metrics`]: the server's own event-loop figures for the window, from shardcast's
//!   `/metrics`.
//! - [`sys`]: CPU, memory and descriptor readings from the OS.

pub mod adapter;
pub mod connect;
pub mod fanout;
pub mod metrics;
pub mod net;
pub mod report;
pub mod sys;
pub mod ws;
