//! The `fanout` and `ingest` scenarios, and `churn` (fan-out while connections come and go).
//!
//! Subscribers spread over K channels; P publishers send stamped payloads at a total rate, or
//! as fast as a per-publisher window of unacknowledged messages allows. Every delivery is
//! checked (duplicate, out of order) and its publish→deliver latency recorded.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::adapter::{self, Incoming, Proto, Stamp};
use crate::net::{Engine, Handler, Outs, Phase};
use crate::report::{Latency, Report};
use crate::{metrics, sys};

/// Parameters shared by the scenarios in this module.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct Params {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Where the publishers connect, when not to `--addr` (another node of a cluster).
    #[arg(long)]
    pub publish_addr: Option<SocketAddr>,
    /// Server protocol.
    #[arg(long, value_enum, default_value = "shardcast")]
    pub proto: Proto,
    /// API key (shardcast) with rights on every org:benchN:usage channel.
    #[arg(long, default_value = "bench-secret")]
    pub key: String,
    /// Subscribers.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Channels the subscribers spread over (shardcast only; broadcast servers have one).
    #[arg(short = 'k', long, default_value_t = 1)]
    pub channels: usize,
    /// Publishers.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: usize,
    /// Total messages per second; 0 = as fast as the window allows.
    #[arg(short = 'r', long, default_value_t = 0)]
    pub rate: u64,
    /// Unacknowledged messages per publisher when --rate is 0.
    #[arg(short = 'w', long, default_value_t = 64)]
    pub window: u32,
    /// Payload size in bytes.
    #[arg(short = 's', long, default_value_t = 100)]
    pub size: usize,
    /// Seconds to publish.
    #[arg(short = 'd', long, default_value_t = 5.0)]
    pub duration: f64,
    /// Connections being opened at once.
    #[arg(short = 'c', long, default_value_t = 256)]
    pub concurrency: usize,
    /// Connections opened and closed per second while publishing (the churn scenario).
    #[arg(long, default_value_t = 0)]
    pub churn: u64,
    /// Bytes read per read system call (small values act like clients reading in small
    /// chunks).
    #[arg(long, default_value_t = 256 * 1024)]
    pub read_bytes: usize,
    /// Server pid, for its CPU time and memory.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Label for the server in reports.
    #[arg(long, default_value = "shardcast")]
    pub label: String,
    /// Connect with TLS (`wss://`), trusting the CA certificate in this PEM file.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Subscriber { index: usize, channel: usize },
    Publisher(usize),
    Churner,
}

struct State {
    proto: Proto,
    epoch: Instant,
    now_ns: u64,
    roles: Vec<Role>,
    readies_left: Vec<u32>,
    ready: usize,
    opened: usize,
    dead: usize,
    first_error: Option<String>,
    measuring: bool,
    /// Per subscriber and publisher: last publisher seq seen.
    last_seen: Vec<u32>,
    publishers: usize,
    inflight: Vec<u32>,
    acked: u64,
    /// Requests answered with an ERROR instead of an ACK.
    refused: u64,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    latency: Histogram<u64>,
    /// Ingest: send times of unacknowledged INGESTs per publisher, oldest first.
    pending_acks: Vec<std::collections::VecDeque<u64>>,
    ingest: bool,
}

impl State {
    fn now(&mut self) -> u64 {
        self.now_ns = self.epoch.elapsed().as_nanos() as u64;
        self.now_ns
    }
}

impl Handler for State {
    fn on_open(&mut self, id: usize, outs: &mut Outs) {
        let subscribe = match self.roles[id] {
            Role::Subscriber { channel, .. } => Some(channel_name(channel)),
            Role::Churner => Some(channel_name(0)),
            Role::Publisher(_) => None,
        };
        self.proto
            .on_open(subscribe.as_deref(), &mut |text| outs.text(id, text));
        if self.readies_left[id] == 0 {
            self.ready += 1;
        }
    }

    fn on_text(&mut self, id: usize, text: &[u8], outs: &mut Outs) {
        match self.proto.classify(text) {
            Incoming::Delivery(data) => match self.roles[id] {
                Role::Subscriber { index, .. } => self.delivered(index, data),
                Role::Publisher(p) => {
                    // Broadcast servers echo to the sender: its own messages are its acks.
                    if self.proto.echoes_to_sender()
                        && adapter::stamp(data).is_some_and(|s| s.p == p as u64)
                    {
                        self.inflight[p] = self.inflight[p].saturating_sub(1);
                        self.acked += 1;
                    }
                }
                Role::Churner => {}
            },
            Incoming::Ack => {
                if let Role::Publisher(p) = self.roles[id] {
                    self.inflight[p] = self.inflight[p].saturating_sub(1);
                    self.acked += 1;
                    if self.ingest {
                        if let Some(sent) = self.pending_acks[p].pop_front() {
                            if self.measuring {
                                let now = self.now();
                                let _ = self.latency.record(now.saturating_sub(sent).max(1));
                            }
                        }
                    }
                }
            }
            Incoming::Refused => {
                if let Role::Publisher(p) = self.roles[id] {
                    self.inflight[p] = self.inflight[p].saturating_sub(1);
                    self.refused += 1;
                    if self.ingest {
                        self.pending_acks[p].pop_front();
                    }
                }
            }
            Incoming::Ready => {
                if self.readies_left[id] > 0 {
                    self.readies_left[id] -= 1;
                    if self.readies_left[id] == 0 {
                        self.ready += 1;
                    }
                }
            }
            Incoming::Reply(text) => outs.text(id, text),
            Incoming::Other => {}
        }
    }

    fn on_read(&mut self) {
        if self.measuring {
            self.now();
        }
    }

    fn on_dead(&mut self, id: usize, error: Option<std::io::Error>) {
        if self.roles[id] != Role::Churner {
            self.dead += 1;
            if self.first_error.is_none() {
                self.first_error = Some(error.map_or("closed by server".into(), |e| e.to_string()));
            }
        }
    }
}

impl State {
    fn delivered(&mut self, index: usize, data: &[u8]) {
        let Some(Stamp { t, p, s }) = adapter::stamp(data) else {
            return;
        };
        let slot = index * self.publishers + p as usize;
        let Some(last) = self.last_seen.get_mut(slot) else {
            return;
        };
        let s = s as u32;
        if s == *last {
            self.duplicates += 1;
            return;
        }
        if s < *last {
            self.out_of_order += 1;
            return;
        }
        *last = s;
        self.received += 1;
        if self.measuring {
            let _ = self.latency.record(self.now_ns.saturating_sub(t).max(1));
        }
    }
}

/// Channel `k`'s name (an admin or bench key may use every org).
pub fn channel_name(k: usize) -> String {
    format!("org:bench{k}:usage")
}

fn source(i: usize) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::new(127, 0, 0, 2 + (i % 253) as u8))
}

/// Open connections with the given roles, `concurrency` at a time, until all are ready.
fn open_all(
    engine: &mut Engine,
    state: &mut State,
    params: &Params,
    roles: &[Role],
) -> Result<(), String> {
    let path = params.proto.path(&params.key);
    let deadline = Instant::now() + Duration::from_secs(60);
    let target = state.ready + roles.len();
    let mut next = 0;
    while state.ready < target {
        while next < roles.len() && state.opened - state.ready - state.dead < params.concurrency {
            let role = roles[next];
            let subscriber = matches!(role, Role::Subscriber { .. });
            let addr = match role {
                Role::Publisher(_) => params.publish_addr.unwrap_or(params.addr),
                _ => params.addr,
            };
            let id = engine
                .connect(addr, source(state.opened), &path)
                .map_err(|e| format!("connect: {e}"))?;
            debug_assert_eq!(id, state.roles.len());
            state.roles.push(role);
            state
                .readies_left
                .push(params.proto.readies_needed(subscriber));
            state.opened += 1;
            next += 1;
        }
        if state.dead > 0 {
            return Err(format!(
                "{} connection(s) failed: {}",
                state.dead,
                state.first_error.clone().unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {target} connections ready after 60 s",
                state.ready
            ));
        }
        engine
            .turn(Some(Duration::from_millis(5)), state)
            .map_err(|e| format!("poll: {e}"))?;
    }
    Ok(())
}

/// Run `fanout` (or `ingest` when `ingest` is set); `churn` follows `params.churn`.
pub fn run(params: &Params, ingest: bool, scenario: &str) -> Result<Report, String> {
    sys::raise_fd_limit();
    let mut engine =
        Engine::new(params.addr.to_string(), params.read_bytes).map_err(|e| e.to_string())?;
    engine.trust(params.tls_ca.as_deref())?;
    let publishers = params.publishers.max(1);
    let subscribers = if ingest { 0 } else { params.subscribers };
    let channels = if params.proto.has_channels() {
        params.channels.max(1)
    } else {
        1
    };
    let mut state = State {
        proto: params.proto,
        epoch: Instant::now(),
        now_ns: 0,
        roles: Vec::new(),
        readies_left: Vec::new(),
        ready: 0,
        opened: 0,
        dead: 0,
        first_error: None,
        measuring: false,
        last_seen: vec![0; subscribers * publishers],
        publishers,
        inflight: vec![0; publishers],
        acked: 0,
        refused: 0,
        received: 0,
        duplicates: 0,
        out_of_order: 0,
        latency: Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram"),
        pending_acks: vec![Default::default(); publishers],
        ingest,
    };
    let sub_roles: Vec<Role> = (0..subscribers)
        .map(|index| Role::Subscriber {
            index,
            channel: index % channels,
        })
        .collect();
    let connect_started = Instant::now();
    open_all(&mut engine, &mut state, params, &sub_roles)?;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let pub_roles: Vec<Role> = (0..publishers).map(Role::Publisher).collect();
    open_all(&mut engine, &mut state, params, &pub_roles)?;
    let pub_conn: Vec<usize> = (0..publishers).map(|p| subscribers + p).collect();
    let mut subs_per_channel = vec![0u64; channels];
    for i in 0..subscribers {
        subs_per_channel[i % channels] += 1;
    }

    // Publish.
    let mut seq = vec![0u64; publishers];
    let mut sent_per_channel = vec![0u64; channels];
    let mut sent = 0u64;
    let mut churned = 0u64;
    let mut churn_live: std::collections::VecDeque<usize> = Default::default();
    let loop_before = metrics::scrape(params.addr);
    let cpu_before = params.pid.and_then(sys::process_cpu);
    let own_before = sys::own_cpu();
    let cores_before = sys::core_times();
    let frames_before = engine.frames_in;
    let received_before = state.received;
    state.measuring = true;
    let started = Instant::now();
    let duration = Duration::from_secs_f64(params.duration);
    let mut buf = Vec::with_capacity(params.size + 128);
    let mut next_publisher = 0usize;
    let mut last_progress = Instant::now();
    while started.elapsed() < duration {
        let elapsed = started.elapsed();
        state.now();
        let mut send_one = |p: usize, state: &mut State, engine: &mut Engine, ack: bool| {
            seq[p] += 1;
            let stamp = Stamp {
                t: state.now_ns,
                p: p as u64,
                s: seq[p],
            };
            // INGEST acks come back in order only per channel: a publisher keeps to one.
            let channel = if ingest {
                p % channels
            } else {
                ((p as u64 + seq[p]) % channels as u64) as usize
            };
            buf.clear();
            if ingest {
                ingest_text(&mut buf, &channel_name(channel), p, seq[p], stamp.t);
                state.pending_acks[p].push_back(stamp.t);
            } else {
                let mut data = Vec::with_capacity(params.size);
                adapter::payload(&mut data, stamp, params.size);
                params
                    .proto
                    .publish(&mut buf, &channel_name(channel), &data, ack);
            }
            engine.outs.text(pub_conn[p], &buf);
            sent_per_channel[channel] += 1;
        };
        if params.rate > 0 {
            let target = (params.rate as f64 * elapsed.as_secs_f64()) as u64;
            while sent < target {
                let p = next_publisher % publishers;
                next_publisher += 1;
                send_one(p, &mut state, &mut engine, false);
                sent += 1;
            }
        } else {
            for p in 0..publishers {
                while state.inflight[p] < params.window {
                    state.inflight[p] += 1;
                    send_one(p, &mut state, &mut engine, true);
                    sent += 1;
                }
            }
        }
        if params.churn > 0 {
            let target = (params.churn as f64 * elapsed.as_secs_f64()) as u64;
            while churned < target {
                let path = params.proto.path(&params.key);
                if let Ok(id) = engine.connect(params.addr, source(state.opened), &path) {
                    state.roles.push(Role::Churner);
                    state.readies_left.push(params.proto.readies_needed(true));
                    state.opened += 1;
                    churn_live.push_back(id);
                }
                if churn_live.len() > 100 {
                    if let Some(old) = churn_live.pop_front() {
                        engine.close(old);
                    }
                }
                churned += 1;
            }
        }
        let timeout = if params.rate > 0 {
            Duration::from_micros(500)
        } else {
            Duration::from_millis(1)
        };
        engine
            .turn(Some(timeout), &mut state)
            .map_err(|e| e.to_string())?;
        if last_progress.elapsed() > Duration::from_secs(2) {
            last_progress = Instant::now();
            eprintln!(
                "  {:.0}s: sent {sent}, received {}, {} dead",
                started.elapsed().as_secs_f64(),
                state.received,
                state.dead
            );
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let received_in_window = state.received - received_before;
    let frames_in_window = engine.frames_in - frames_before;
    let cpu_after = params.pid.and_then(sys::process_cpu);
    let own_after = sys::own_cpu();
    let cores_after = sys::core_times();
    let loop_after = loop_before
        .as_ref()
        .and_then(|_| metrics::scrape(params.addr));
    // Drain: wait for what is still in flight (no more than 5 s).
    let expected: u64 = if ingest {
        0
    } else {
        sent_per_channel
            .iter()
            .zip(&subs_per_channel)
            .map(|(m, s)| m * s)
            .sum()
    };
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < drain_deadline
        && ((!ingest && state.received < expected)
            || (ingest && state.acked + state.refused < sent))
    {
        engine
            .turn(Some(Duration::from_millis(2)), &mut state)
            .map_err(|e| e.to_string())?;
    }

    let mut report = Report::new(
        scenario,
        &params.label,
        serde_json::to_value(params).unwrap_or_default(),
    );
    report.add("connections", (subscribers + publishers) as f64, "");
    if subscribers > 0 {
        report.add("connect time", connect_secs, "s");
    }
    report.add("sent", sent as f64, "msgs");
    if ingest {
        report.add("acked", state.acked as f64, "acks");
        report.add("acks/s", state.acked as f64 / publish_secs, "/s");
        report.add("refused", state.refused as f64, "msgs");
    } else {
        report.add(
            "deliveries/s",
            received_in_window as f64 / publish_secs,
            "/s",
        );
        report.add("expected", expected as f64, "");
        report.add("received", state.received as f64, "");
        report.add("lost", expected.saturating_sub(state.received) as f64, "");
        report.add("duplicated", state.duplicates as f64, "");
        report.add("out of order", state.out_of_order as f64, "");
    }
    report.add("connections failed", state.dead as f64, "");
    if params.churn > 0 {
        report.add("churned connections", churned as f64, "");
    }
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        let cpu = (after - before).as_secs_f64();
        report.add("server cpu", cpu, "s");
        report.add("server cpu busy", 100.0 * cpu / publish_secs, "%");
        let per = if ingest {
            state.acked
        } else {
            received_in_window
        };
        if per > 0 {
            report.add("server cpu per delivery", cpu * 1e6 / per as f64, "µs");
        }
    }
    if let Some(rss) = params.pid.and_then(sys::rss_kib) {
        report.add("server rss", rss as f64, "KiB");
    }
    report.add(
        "client cpu busy",
        100.0 * (own_after - own_before).as_secs_f64() / publish_secs,
        "%",
    );
    report.add(
        "client frames/s",
        frames_in_window as f64 / publish_secs,
        "/s",
    );
    for (core, (busy, softirq)) in sys::core_busy(&cores_before, &cores_after)
        .iter()
        .enumerate()
    {
        report.add(&format!("core {core} busy"), *busy, "%");
        report.add(&format!("core {core} softirq"), *softirq, "%");
    }
    if let (Some(before), Some(after)) = (&loop_before, &loop_after) {
        metrics::report(before, after, &mut report);
    }
    report.latency = Latency::from_ns(&state.latency);
    let live = (0..engine.connections())
        .filter(|&i| engine.phase(i) == Phase::Open)
        .count();
    if let Some(e) = &state.first_error {
        eprintln!("first connection error: {e} ({live} connections still open)");
    }
    Ok(report)
}

fn ingest_text(out: &mut Vec<u8>, channel: &str, p: usize, n: u64, t: u64) {
    let org = channel.split(':').nth(1).unwrap_or("bench");
    out.extend_from_slice(
        format!(
            r#"{{"type":"INGEST","channel":"{channel}","schema":"decision.v1","idempotencyKey":"bench-{t}-{p}-{n}","data":{{"orgId":"{org}","direction":"precheck","decision":"allow","tool":"bench","payloadHash":"sha256:0","t":{t}}}}}"#
        )
        .as_bytes(),
    );
}
