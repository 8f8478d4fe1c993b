//! The shard driven without sockets, executors or a real clock (see `sim.rs`).
use super::sim::{channel_owned_by, drain, Sim};
use super::*;
use std::task::Context;

#[test]
fn subscribed_waits_for_the_owner_to_register_interest() {
    let sim = Sim::new(2);
    let channel = channel_owned_by(0);
    let peer = sim.connect(1);
    sim.request(
        1,
        &peer,
        &format!(r#"{{"type":"SUB","channels":["{channel}"],"id":1}}"#),
    );
    assert!(
        drain(&peer).is_empty(),
        "SUBSCRIBED must wait for the owner"
    );
    sim.settle();
    let epoch = sim.shards[1].epoch;
    assert_eq!(
        drain(&peer),
        vec![format!(
            r#"{{"type":"SUBSCRIBED","channels":["{channel}"],"id":1,"epoch":{epoch}}}"#
        )]
    );
}

fn message(channel: &str, n: u64) -> String {
    format!(r#"{{"type":"MESSAGE","channel":"{channel}","seq":{n},"data":{n}}}"#)
}

fn publish(sim: &Sim, shard: usize, publisher: &Rc<Peer>, channel: &str, n: u64) {
    let json = format!(r#"{{"type":"PUBLISH","channel":"{channel}","data":{n}}}"#);
    sim.request(shard, publisher, &json);
}

/// The `recovered` member of a SUBSCRIBED, as text.
fn recovered(subscribed: &str) -> &str {
    let at = subscribed
        .find(r#""recovered":"#)
        .expect("recovered reported");
    &subscribed[at + 12..subscribed.len() - 1]
}

#[test]
fn reconnecting_with_since_gets_exactly_what_was_missed_then_live() {
    for (nshards, owner, sub_shard) in [(1, 0, 0), (2, 0, 1), (2, 1, 1)] {
        let sim = Sim::new(nshards);
        let channel = channel_owned_by(owner);
        let publisher = sim.connect(0);
        let first = sim.connect(sub_shard);
        let sub = format!(r#"{{"type":"SUB","channels":["{channel}"]}}"#);
        sim.request(sub_shard, &first, &sub);
        sim.settle();
        for n in 1..=3 {
            publish(&sim, 0, &publisher, &channel, n);
        }
        sim.settle();
        assert_eq!(drain(&first).len(), 4, "SUBSCRIBED and 3 messages");
        sim.shards[sub_shard].remove_conn(&first);
        sim.settle();
        for n in 4..=8 {
            publish(&sim, 0, &publisher, &channel, n);
        }
        sim.settle();
        let again = sim.connect(sub_shard);
        let sub = format!(r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":3}}}}"#);
        sim.request(sub_shard, &again, &sub);
        sim.settle();
        publish(&sim, 0, &publisher, &channel, 9);
        sim.settle();
        let got = drain(&again);
        assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":true}}"#));
        let expected: Vec<String> = (4..=9).map(|n| message(&channel, n)).collect();
        assert_eq!(got[1..], expected, "{nshards} shards, owner {owner}");
    }
}

#[test]
fn no_gap_or_duplicate_where_the_replay_meets_live_messages() {
    let sim = Sim::new(2);
    let channel = channel_owned_by(0);
    // Shard 1 already receives the channel, so messages numbered before the owner sees the
    // new SUB reach shard 1 both live and in the replay.
    let other = sim.connect(1);
    let sub = format!(r#"{{"type":"SUB","channels":["{channel}"]}}"#);
    sim.request(1, &other, &sub);
    let publisher = sim.connect(0);
    publish(&sim, 0, &publisher, &channel, 1);
    sim.settle();
    let late = sim.connect(1);
    let sub = format!(r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":1}}}}"#);
    sim.request(1, &late, &sub);
    // Numbered while the SUB is on its way to the owner, and after.
    publish(&sim, 0, &publisher, &channel, 2);
    sim.settle();
    publish(&sim, 0, &publisher, &channel, 3);
    sim.settle();
    let got = drain(&late);
    assert!(got[0].starts_with(r#"{"type":"SUBSCRIBED""#), "{got:?}");
    assert_eq!(got[1..], [message(&channel, 2), message(&channel, 3)]);
    // A subscriber that left while waiting for its replay gets nothing more.
    let gone = sim.connect(1);
    let sub = format!(r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":0}}}}"#);
    sim.request(1, &gone, &sub);
    sim.shards[1].remove_conn(&gone);
    sim.settle();
    assert!(drain(&gone).is_empty());
    assert_eq!(sim.shards[1].subs.borrow().catching_up(), 0);
}

/// One shard with `config` whose channel has had messages 1 to 10.
fn one_shard_with_ten_messages(config: Config) -> (Sim, &'static str) {
    let sim = Sim::with_config(1, config);
    let channel = "org:a:usage";
    let publisher = sim.connect(0);
    for n in 1..=10 {
        publish(&sim, 0, &publisher, channel, n);
    }
    (sim, channel)
}

#[test]
fn replay_beyond_the_history_or_from_another_epoch_is_incomplete() {
    let mut config = Config::default();
    config.history.size = 3;
    let (sim, channel) = one_shard_with_ten_messages(config);
    let ask = |json: String| {
        let peer = sim.connect(0);
        sim.request(0, &peer, &json);
        drain(&peer)
    };
    let got = ask(format!(
        r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":2}}}}"#
    ));
    assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":false}}"#));
    let newest: Vec<String> = (8..=10).map(|n| message(channel, n)).collect();
    assert_eq!(got[1..], newest, "what it has");
    let got = ask(format!(
        r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":7}}}}"#
    ));
    assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":true}}"#));
    assert_eq!(got[1..], newest);
    let epoch = sim.shards[0].epoch;
    let got = ask(format!(
        r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":7}},"epoch":{}}}"#,
        epoch - 1
    ));
    assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":false}}"#));
    // A seq the channel never reached (its sequence restarted) cannot be complete either.
    let got = ask(format!(
        r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":11}},"epoch":{epoch}}}"#
    ));
    assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":false}}"#));
    assert_eq!(got.len(), 1);
}

#[test]
fn a_replay_larger_than_the_queue_is_cut_and_reported_incomplete() {
    let mut config = Config::default();
    config.limits.outbound_queue_messages = 4;
    let (sim, channel) = one_shard_with_ten_messages(config);
    let peer = sim.connect(0);
    let sub = format!(r#"{{"type":"SUB","channels":["{channel}"],"since":{{"{channel}":0}}}}"#);
    sim.request(0, &peer, &sub);
    let got = drain(&peer);
    assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":false}}"#));
    // SUBSCRIBED is a reply: the four fan-out slots hold the newest four messages.
    let newest: Vec<String> = (7..=10).map(|n| message(channel, n)).collect();
    assert_eq!(got[1..], newest);
    assert_eq!(peer.dropped.get(), 0, "nothing lost silently");
}

#[test]
fn publish_crosses_shards_once_and_is_numbered_by_the_owner() {
    let sim = Sim::new(2);
    let channel = channel_owned_by(0);
    let subs: Vec<_> = [0, 1, 1].iter().map(|&s| (s, sim.connect(s))).collect();
    for (s, peer) in &subs {
        sim.request(
            *s,
            peer,
            &format!(r#"{{"type":"SUB","channels":["{channel}"]}}"#),
        );
    }
    sim.settle();
    for (_, peer) in &subs {
        drain(peer);
    }
    let publisher = sim.connect(1);
    for n in 1..=3 {
        sim.request(
            1,
            &publisher,
            &format!(r#"{{"type":"PUBLISH","channel":"{channel}","data":{n},"id":"p{n}"}}"#),
        );
    }
    // Before the mesh moves, nothing is delivered: the owner (shard 0) numbers messages.
    assert!(subs.iter().all(|(_, p)| p.out().borrow().is_empty()));
    sim.settle();
    for (_, peer) in &subs {
        let expected: Vec<String> = (1..=3)
            .map(|n| format!(r#"{{"type":"MESSAGE","channel":"{channel}","seq":{n},"data":{n}}}"#))
            .collect();
        assert_eq!(drain(peer), expected);
    }
    let acks = drain(&publisher);
    assert_eq!(acks[2], r#"{"type":"ACK","id":"p3","seq":3}"#);
}

#[test]
fn an_unused_channel_is_forgotten_and_made_again_above_its_old_numbers() {
    let mut config = Config::default();
    config.history.size = 0;
    let sim = Sim::with_config(2, config);
    let channel = channel_owned_by(0);
    let owner = &sim.shards[0];
    let sub = |since: Option<u64>| {
        let peer = sim.connect(1);
        let since = since.map_or(String::new(), |n| {
            format!(r#","since":{{"{channel}":{n}}}"#)
        });
        let json = format!(r#"{{"type":"SUB","channels":["{channel}"]{since}}}"#);
        sim.request(1, &peer, &json);
        sim.settle();
        peer
    };
    let remote = sub(None);
    let publisher = sim.connect(0);
    for n in 1..=3 {
        publish(&sim, 0, &publisher, &channel, n);
    }
    sim.settle();
    sim.sweep(0);
    assert_eq!(
        owner.engine.borrow().channels(),
        1,
        "kept while subscribed elsewhere"
    );
    sim.shards[1].remove_conn(&remote);
    sim.settle();
    sim.sweep(0);
    assert!(owner.engine.borrow().channels() == 0, "nobody needs it");
    assert_eq!(owner.counters.get(Counter::ChannelsFreed), 1);
    assert_eq!(owner.counters.get(Counter::Channels), 0);

    // A client that had everything catches up exactly; one that had less is told.
    let had_all = sub(Some(3));
    let had_less = sub(Some(2));
    publish(&sim, 0, &publisher, &channel, 4);
    sim.settle();
    let got = drain(&had_all);
    assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":true}}"#));
    assert_eq!(got[1..], [message(&channel, 4)], "numbering goes on from 3");
    let got = drain(&had_less);
    assert_eq!(recovered(&got[0]), format!(r#"{{"{channel}":false}}"#));
}

#[test]
fn owner_stops_forwarding_when_the_last_remote_subscriber_leaves() {
    let sim = Sim::new(2);
    let channel = channel_owned_by(0);
    let remote = sim.connect(1);
    sim.request(
        1,
        &remote,
        &format!(r#"{{"type":"SUB","channels":["{channel}"]}}"#),
    );
    sim.settle();
    sim.request(
        1,
        &remote,
        &format!(r#"{{"type":"UNSUB","channels":["{channel}"]}}"#),
    );
    sim.settle();
    drain(&remote);
    let publisher = sim.connect(0);
    sim.request(
        0,
        &publisher,
        &format!(r#"{{"type":"PUBLISH","channel":"{channel}","data":0}}"#),
    );
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(
        sim.shards[0].poll_outbox(1, &mut cx).is_pending(),
        "nothing is sent to a shard without subscribers"
    );
    // A closed connection's subscriptions go the same way.
    sim.request(
        1,
        &remote,
        &format!(r#"{{"type":"SUB","channels":["{channel}"]}}"#),
    );
    sim.settle();
    sim.shards[1].remove_conn(&remote);
    sim.settle();
    sim.request(
        0,
        &publisher,
        &format!(r#"{{"type":"PUBLISH","channel":"{channel}","data":0}}"#),
    );
    assert!(sim.shards[0].poll_outbox(1, &mut cx).is_pending());
}

#[test]
fn ingest_is_deduplicated_by_the_owner_across_shards() {
    let sim = Sim::new(2);
    let channel = channel_owned_by(1).replace(":usage", ":decisions");
    let org = channel.split(':').nth(1).unwrap().to_string();
    let ingest = |key: &str| {
        format!(
            r#"{{"type":"INGEST","channel":"{channel}","schema":"decision.v1","idempotencyKey":"{key}","data":{{"orgId":"{org}","direction":"precheck","decision":"allow","payloadHash":"h"}}}}"#
        )
    };
    let a = sim.connect(0);
    let b = sim.connect(1);
    sim.request(0, &a, &ingest("k"));
    sim.settle();
    sim.request(1, &b, &ingest("k"));
    sim.settle();
    let first = drain(&a);
    let second = drain(&b);
    assert!(first[0].contains(r#""dedup":false,"seq":1"#), "{first:?}");
    assert!(second[0].contains(r#""dedup":true,"seq":1"#), "{second:?}");
    let id = |s: &str| s.split(r#""decisionId":""#).nth(1).unwrap()[..30].to_string();
    assert_eq!(id(&first[0]), id(&second[0]));
    assert_eq!(sim.shards[1].counters.get(Counter::DecisionsDuplicate), 1);
}

#[test]
fn slow_peer_drops_are_counted() {
    let mut config = Config::default();
    config.limits.outbound_queue_messages = 4;
    let sim = Sim::with_config(1, config);
    let (shard, peer) = (&sim.shards[0], sim.connect(0));
    for _ in 0..10 {
        shard.deliver(&peer, codec::frame(codec::opcode::TEXT, b"x"));
    }
    assert_eq!(peer.dropped.get(), 6);
    assert_eq!(shard.counters.get(Counter::MessagesDropped), 6);
    assert_eq!(peer.out().borrow().len(), 4);
}

#[test]
fn answers_owed_by_another_shard_are_counted_until_they_arrive() {
    let sim = Sim::new(2);
    let channel = channel_owned_by(0);
    let peer = sim.connect(1);
    for n in 0..3 {
        let json = format!(r#"{{"type":"PUBLISH","channel":"{channel}","data":{n},"id":{n}}}"#);
        sim.request(1, &peer, &json);
    }
    // Without an id nothing is owed.
    publish(&sim, 1, &peer, &channel, 9);
    assert_eq!(peer.owed.get(), 3, "three ACKs to come from the owner");
    sim.settle();
    assert_eq!(peer.owed.get(), 0);
    assert_eq!(drain(&peer).len(), 3);
}

mod clock;
mod cost;
mod store;

/// A principal-free INGEST of a valid decision for `channel`'s org.
fn ingest_json(channel: &str, key: &str) -> String {
    let org = channel.split(':').nth(1).expect("org:ID:category");
    format!(
        r#"{{"type":"INGEST","channel":"{channel}","schema":"decision.v1","idempotencyKey":"{key}","data":{{"orgId":"{org}","direction":"precheck","decision":"allow","payloadHash":"h"}}}}"#
    )
}

/// SUB `channel` on `shard` and take the SUBSCRIBED.
fn subscriber(sim: &Sim, shard: usize, channel: &str) -> Rc<Peer> {
    let peer = sim.connect(shard);
    sim.request(
        shard,
        &peer,
        &format!(r#"{{"type":"SUB","channels":["{channel}"]}}"#),
    );
    sim.settle();
    assert!(drain(&peer)[0].contains("SUBSCRIBED"));
    peer
}

/// `(type, seq)` of each frame, for order checks.
fn kinds(frames: &[String]) -> Vec<(String, u64)> {
    frames
        .iter()
        .map(|f| {
            let v: serde_json::Value = serde_json::from_str(f).expect("JSON frame");
            let kind = v["type"].as_str().unwrap_or("").to_string();
            (kind, v["seq"].as_u64().unwrap_or(0))
        })
        .collect()
}

#[test]
fn a_message_is_encoded_once_per_shard_and_its_bytes_shared_by_every_subscriber() {
    let sim = Sim::new(2);
    let channel = channel_owned_by(0);
    let mut subscribers = Vec::new();
    for n in 0..400 {
        subscribers.push(subscriber(&sim, n % 2, &channel));
    }
    let publisher = sim.connect(1);
    publish(&sim, 1, &publisher, &channel, 1);
    sim.settle();
    for shard in &sim.shards {
        assert_eq!(
            shard.counters.get(Counter::FramesEncoded),
            1,
            "one encoding per shard"
        );
    }
    for side in 0..2 {
        let mine = subscribers.iter().skip(side).step_by(2);
        let frames: Vec<Frame> = mine
            .map(|p| p.out().borrow().back().cloned().expect("delivered"))
            .collect();
        assert_eq!(frames.len(), 200);
        assert!(
            frames.iter().all(|f| Rc::ptr_eq(f, &frames[0])),
            "shard {side}'s subscribers share one allocation"
        );
    }
    assert_eq!(drain(&subscribers[0]), [message(&channel, 1)]);
}
