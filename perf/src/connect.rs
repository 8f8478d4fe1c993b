//! The `connect` scenario: open N connections at a given concurrency, hold them, and report
//! connect rate, connect latency, and the server's memory per connection.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::adapter::{Incoming, Proto};
use crate::net::{Engine, Handler, Outs};
use crate::report::{Latency, Report};
use crate::{metrics, sys};

/// Parameters.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct Params {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Server protocol.
    #[arg(long, value_enum, default_value = "shardcast")]
    pub proto: Proto,
    /// API key (shardcast).
    #[arg(long, default_value = "bench-secret")]
    pub key: String,
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections being opened at once.
    #[arg(short = 'c', long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds to hold the connections once open (memory is read at the end).
    #[arg(long, default_value_t = 1.0)]
    pub hold: f64,
    /// Server pid, for its memory growth.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Label for the server in reports.
    #[arg(long, default_value = "shardcast")]
    pub label: String,
    /// Once READY, each connection subscribes to one of this many channels
    /// (`org:room{i}:usage`, shardcast only; 0: none) and counts as connected at SUBSCRIBED.
    #[arg(long, default_value_t = 0)]
    pub rooms: usize,
    /// Subscribe with presence (each connection a member of its room: JOIN to the others).
    #[arg(long)]
    pub presence: bool,
    /// Connect with a JWT signed (HS256) with this secret instead of the API key: each
    /// connection a user of its own (`sub` u{i}, org bench, a `jti`), as browsers connect.
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// Connect with TLS (`wss://`), trusting the CA certificate in this PEM file.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// The path of connection `i`: the API key's, or a token of its own.
fn paths(params: &Params) -> Vec<String> {
    let Some(secret) = &params.jwt_secret else {
        return vec![params.proto.path(&params.key); params.connections];
    };
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    let header = jsonwebtoken::Header::default();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3_600;
    (0..params.connections)
        .map(|i| {
            let claims = serde_json::json!({"sub": format!("u{i}"), "org": "bench",
                "exp": exp, "jti": format!("bench-{i}"), "scopes": ["subscribe"]});
            let token = jsonwebtoken::encode(&header, &claims, &key).expect("a token");
            format!("/ws?token={token}")
        })
        .collect()
}

struct State {
    proto: Proto,
    rooms: usize,
    presence: bool,
    started: Vec<Instant>,
    readies_left: Vec<u32>,
    ready: usize,
    failed: usize,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

impl State {
    fn became_ready(&mut self, id: usize) {
        self.ready += 1;
        let _ = self
            .latency
            .record(self.started[id].elapsed().as_nanos() as u64);
    }
}

impl Handler for State {
    fn on_open(&mut self, id: usize, outs: &mut Outs) {
        if self.rooms > 0 && self.proto.has_channels() {
            let room = id % self.rooms;
            let sub = format!(
                r#"{{"type":"SUB","channels":["org:room{room}:usage"],"presence":{}}}"#,
                self.presence
            );
            outs.text(id, sub.as_bytes());
        }
        self.proto.on_open(None, &mut |t| outs.text(id, t));
        if self.readies_left[id] == 0 {
            self.became_ready(id);
        }
    }

    fn on_text(&mut self, id: usize, text: &[u8], outs: &mut Outs) {
        match self.proto.classify(text) {
            Incoming::Ready if self.readies_left[id] > 0 => {
                self.readies_left[id] -= 1;
                if self.readies_left[id] == 0 {
                    self.became_ready(id);
                }
            }
            Incoming::Reply(t) => outs.text(id, t),
            _ => {}
        }
    }

    fn on_dead(&mut self, _id: usize, error: Option<std::io::Error>) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error.map_or("closed by server".into(), |e| e.to_string()));
        }
    }
}

/// Run the scenario.
pub fn run(params: &Params) -> Result<Report, String> {
    let fd_limit = sys::raise_fd_limit();
    if params.connections as u64 + 16 > fd_limit {
        eprintln!(
            "warning: client fd limit {fd_limit} is below {} connections",
            params.connections
        );
    }
    let mut engine = Engine::new(params.addr.to_string(), 256 * 1024).map_err(|e| e.to_string())?;
    engine.trust(params.tls_ca.as_deref())?;
    let mut state = State {
        proto: params.proto,
        rooms: params.rooms,
        presence: params.presence,
        started: Vec::with_capacity(params.connections),
        readies_left: Vec::with_capacity(params.connections),
        ready: 0,
        failed: 0,
        first_error: None,
        latency: Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram"),
    };
    let rss_before = params.pid.and_then(sys::rss_kib);
    let loop_before = metrics::scrape(params.addr);
    let cpu_before = params.pid.and_then(sys::process_cpu);
    let own_before = sys::own_cpu();
    let paths = paths(params);
    let begun = Instant::now();
    let deadline = begun + Duration::from_secs(120);
    let mut opened = 0;
    while state.ready + state.failed < params.connections && Instant::now() < deadline {
        while opened < params.connections
            && opened - state.ready - state.failed < params.concurrency
        {
            let src = std::net::Ipv4Addr::new(127, 0, 0, 2 + (opened % 253) as u8);
            match engine.connect(params.addr, Some(src), &paths[opened]) {
                Ok(_) => {
                    state.started.push(Instant::now());
                    let subscriber = params.rooms > 0 && params.proto.has_channels();
                    state
                        .readies_left
                        .push(params.proto.readies_needed(subscriber));
                }
                Err(e) => {
                    // Keep ids aligned with the engine's: count it as a failure.
                    state.failed += 1;
                    state.first_error.get_or_insert(e.to_string());
                    opened += 1;
                    continue;
                }
            }
            opened += 1;
        }
        engine
            .turn(Some(Duration::from_millis(5)), &mut state)
            .map_err(|e| e.to_string())?;
    }
    let elapsed = begun.elapsed().as_secs_f64();
    let own_cpu = (sys::own_cpu() - own_before).as_secs_f64();
    let cpu_after = params.pid.and_then(sys::process_cpu);
    let loop_after = loop_before
        .as_ref()
        .and_then(|_| metrics::scrape(params.addr));
    // Hold, answering pings, then read memory.
    let hold_until = Instant::now() + Duration::from_secs_f64(params.hold);
    while Instant::now() < hold_until {
        engine
            .turn(Some(Duration::from_millis(50)), &mut state)
            .map_err(|e| e.to_string())?;
    }
    let rss_after = params.pid.and_then(sys::rss_kib);
    let mut report = Report::new(
        "connect",
        &params.label,
        serde_json::to_value(params).unwrap_or_default(),
    );
    report.add("connections ok", state.ready as f64, "");
    report.add("connections failed", state.failed as f64, "");
    report.add("connect rate", state.ready as f64 / elapsed, "/s");
    report.add("client cpu busy", 100.0 * own_cpu / elapsed, "%");
    if let (Some(b), Some(a)) = (cpu_before, cpu_after) {
        let server = (a - b).as_secs_f64();
        report.add("server cpu busy", 100.0 * server / elapsed, "%");
        // The whole cost of accepting one (its TLS handshake, when there is one).
        let per = 1e6 * server / state.ready.max(1) as f64;
        report.add("server cpu per connection", per, "us");
    }
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        report.add("server rss before", before as f64, "KiB");
        report.add("server rss after", after as f64, "KiB");
        let per = after.saturating_sub(before) as f64 * 1024.0 / state.ready.max(1) as f64;
        report.add("server rss per connection", per.round(), "B");
    }
    if let (Some(before), Some(after)) = (&loop_before, &loop_after) {
        metrics::report(before, after, &mut report);
    }
    report.latency = Latency::from_ns(&state.latency);
    if let Some(e) = &state.first_error {
        eprintln!("first connection error: {e}");
    }
    Ok(report)
}
