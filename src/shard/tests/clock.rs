//! What the shard does as time passes, on the simulation's clock: pings and idle closes,
//! history expiry, and the idempotency window.

use super::*;

#[test]
fn a_quiet_connection_is_pinged_then_dropped() {
    let sim = Sim::new(1);
    let ws = Config::default().websocket;
    let peer = sim.connect(0);
    peer.phase.set(Phase::Open);
    sim.advance(ws.ping_interval_ms - 1);
    sim.sweep(0);
    assert!(drain(&peer).is_empty(), "not quiet long enough");
    sim.advance(1);
    sim.sweep(0);
    assert_eq!(drain(&peer), [""], "one empty ping");
    sim.sweep(0);
    assert!(drain(&peer).is_empty(), "one ping per interval");
    sim.advance(ws.idle_timeout_ms - ws.ping_interval_ms);
    sim.sweep(0);
    assert!(!peer.abort.get(), "still within the idle timeout");
    sim.advance(1);
    sim.sweep(0);
    assert!(peer.abort.get(), "silent past the idle timeout");
}

#[test]
fn a_sweep_in_slices_visits_every_connection_once_a_pass() {
    let sim = Sim::new(1);
    let ws = Config::default().websocket;
    let peers: Vec<_> = (0..10).map(|_| sim.connect(0)).collect();
    for peer in &peers {
        peer.phase.set(Phase::Open);
    }
    sim.advance(ws.ping_interval_ms);
    let ping = Shard::ping_frame();
    let mut pinged = Vec::new();
    for slice in 0..4 {
        sim.shards[0].sweep_slice(&ping, sim.now(), slice, 4);
        let now: Vec<u64> = peers
            .iter()
            .filter(|p| !drain(p).is_empty())
            .map(|p| p.id)
            .collect();
        assert!(
            now.iter().all(|id| id % 4 == slice),
            "slice {slice}: {now:?}"
        );
        pinged.extend(now);
    }
    pinged.sort_unstable();
    let all: Vec<u64> = peers.iter().map(|p| p.id).collect();
    assert_eq!(pinged, all, "each connection pinged once in the pass");
}

#[test]
fn a_handshake_that_takes_too_long_is_dropped() {
    let sim = Sim::new(1);
    let peer = sim.connect(0);
    sim.advance(Config::default().websocket.handshake_timeout_ms);
    sim.sweep(0);
    assert!(!peer.abort.get());
    sim.advance(1);
    sim.sweep(0);
    assert!(peer.abort.get());
}

#[test]
fn history_older_than_its_ttl_is_not_replayed() {
    let mut config = Config::default();
    config.history.ttl_secs = 60;
    let sim = Sim::with_config(1, config);
    let channel = channel_owned_by(0);
    let publisher = sim.connect(0);
    publish(&sim, 0, &publisher, &channel, 1);
    sim.advance(30_000);
    publish(&sim, 0, &publisher, &channel, 2);
    sim.advance(30_001);
    let late = sim.connect(0);
    let json = format!(r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":0}}}}"#);
    sim.request(0, &late, &json);
    let got = drain(&late);
    assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":false}}"#));
    assert_eq!(
        got[1..],
        [message(&channel, 2)],
        "only the one still within the TTL"
    );
}

#[test]
fn an_idempotency_key_is_remembered_for_its_window_only() {
    let config = Config::default();
    let window_ms = config.ingest.dedup_window_secs * 1000;
    let sim = Sim::with_config(1, config);
    let channel = "org:o1:decisions";
    let client = sim.connect(0);
    let ack = |sim: &Sim| {
        sim.request(0, &client, &ingest_json(channel, "k"));
        drain(&client).remove(0)
    };
    assert!(ack(&sim).contains(r#""dedup":false,"seq":1"#));
    sim.advance(window_ms - 1);
    assert!(
        ack(&sim).contains(r#""dedup":true,"seq":1"#),
        "within the window"
    );
    sim.advance(1);
    assert!(
        ack(&sim).contains(r#""dedup":false,"seq":2"#),
        "a new decision once the window has passed"
    );
}
