//! Work per request, counted rather than timed: each probe runs `PROBE_N` requests through one
//! simulated shard and writes their answers out, so `perf/instructions.sh` can count the
//! instructions per request under cachegrind (these machines have no hardware counters, and
//! timed runs of the server vary by more than a small change costs). Ignored by default: they
//! are measurements, not checks; each still asserts every request was answered.

use super::super::sim::Sim;
use super::ingest_json;

/// How many requests a probe makes (`PROBE_N`, default 1,000).
fn requests() -> usize {
    std::env::var("PROBE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Send each request in turn on one connection, writing out its answers; returns how many
/// frames were answered.
fn run(requests: &[String]) -> usize {
    let sim = Sim::new(1);
    let peer = sim.connect(0);
    let mut answered = 0;
    for request in requests {
        sim.request(0, &peer, request);
        let mut out = peer.out().borrow_mut();
        let bytes = out.bytes();
        answered += out.consume(bytes);
    }
    answered
}

/// INGEST of a new decision (in-memory storage), ACKed.
#[test]
#[ignore = "a measurement: perf/instructions.sh"]
fn cost_ingest() {
    let n = requests();
    let channel = "org:acme:decisions";
    let all: Vec<String> = (0..n)
        .map(|i| ingest_json(channel, &format!("key-{i:08}")))
        .collect();
    assert_eq!(run(&all), n);
}

/// PUBLISH with an id on a channel without subscribers, ACKed.
#[test]
#[ignore = "a measurement: perf/instructions.sh"]
fn cost_publish() {
    let n = requests();
    let all: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"type":"PUBLISH","channel":"org:acme:usage","data":{i},"id":{i}}}"#))
        .collect();
    assert_eq!(run(&all), n);
}
