//! Catching up after a reconnect: `SUB` with `since` replays what was missed, then live.

mod common;

use common::{channels_owned_by_each_shard, Client, Server, ADMIN};
use serde_json::{json, Value};

/// PUBLISH with an id and return the seq from its ACK.
fn publish(c: &mut Client, channel: &str, n: u64) -> u64 {
    c.send(json!({"type":"PUBLISH","channel":channel,"data":{"n":n},"id":n}));
    let ack = c.recv_type("ACK");
    assert_eq!(ack["id"], n, "{ack}");
    ack["seq"].as_u64().expect("seq")
}

/// Receive `count` messages and return (channel, seq, n) of each.
fn messages(c: &mut Client, count: usize) -> Vec<(String, u64, u64)> {
    (0..count)
        .map(|_| {
            let m = c.recv();
            assert_eq!(m["type"], "MESSAGE", "{m}");
            let channel = m["channel"].as_str().expect("channel").to_string();
            (
                channel,
                m["seq"].as_u64().unwrap(),
                m["data"]["n"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Subscribe with `since` and return the SUBSCRIBED answer.
fn subscribe_since(c: &mut Client, since: &[(&str, u64)]) -> Value {
    let channels: Vec<&str> = since.iter().map(|(c, _)| *c).collect();
    let since: serde_json::Map<String, Value> = since
        .iter()
        .map(|(c, s)| (c.to_string(), json!(s)))
        .collect();
    c.send(json!({"type":"SUB","channels":channels,"since":since,"id":"again"}));
    let answer = c.recv();
    assert_eq!(answer["type"], "SUBSCRIBED", "{answer}");
    answer
}

fn missed_messages_come_back_in_order_then_live(shards: usize) {
    const MISSED: u64 = 20;
    let server = Server::start_with(shards, "");
    let channels: Vec<String> = if shards == 1 {
        vec!["org:team0:usage".into()]
    } else {
        channels_owned_by_each_shard("usage").to_vec()
    };
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let mut publisher = server.client_on(ADMIN, 0);
    let mut sub = server.client_on(ADMIN, shards - 1);
    sub.subscribe(&names);
    for name in &names {
        publish(&mut publisher, name, 0);
    }
    let seen = messages(&mut sub, names.len());
    drop(sub);

    // Missed while away (each channel numbers its own messages).
    let mut missed: Vec<(String, u64, u64)> = Vec::new();
    for n in 1..=MISSED {
        for name in &names {
            let seq = publish(&mut publisher, name, n);
            missed.push((name.to_string(), seq, n));
        }
    }

    let mut again = server.client_on(ADMIN, shards - 1);
    let since: Vec<(&str, u64)> = seen.iter().map(|(c, s, _)| (c.as_str(), *s)).collect();
    let answer = subscribe_since(&mut again, &since);
    for name in &names {
        assert_eq!(answer["recovered"][name], true, "{answer}");
    }
    assert!(answer["epoch"].as_u64().is_some(), "{answer}");
    let replayed = messages(&mut again, missed.len());
    for name in &names {
        let of = |list: &[(String, u64, u64)]| -> Vec<(u64, u64)> {
            list.iter()
                .filter(|(c, _, _)| c == name)
                .map(|(_, s, n)| (*s, *n))
                .collect()
        };
        assert_eq!(
            of(&replayed),
            of(&missed),
            "{name}: exactly what was missed, in order"
        );
    }
    // Then live, with nothing repeated at the seam.
    for name in &names {
        let seq = publish(&mut publisher, name, 99);
        let live = messages(&mut again, 1);
        assert_eq!(live, [(name.to_string(), seq, 99)]);
    }
    again.ping();
}

#[test]
fn missed_messages_come_back_in_order_then_live_on_one_shard() {
    missed_messages_come_back_in_order_then_live(1);
}

#[test]
fn missed_messages_come_back_in_order_then_live_across_shards() {
    missed_messages_come_back_in_order_then_live(2);
}

#[test]
fn since_beyond_the_history_is_reported_not_recovered() {
    let server = Server::start("[history]\nsize = 5\n");
    let [a, b] = channels_owned_by_each_shard("usage");
    let mut publisher = server.client_on(ADMIN, 0);
    for n in 1..=10 {
        publish(&mut publisher, &a, n);
        publish(&mut publisher, &b, n);
    }
    let mut late = server.client_on(ADMIN, 1);
    let answer = subscribe_since(&mut late, &[(&a, 2), (&b, 5)]);
    assert_eq!(answer["recovered"][&a], false, "{answer}");
    assert_eq!(answer["recovered"][&b], true, "{answer}");
    let got = messages(&mut late, 10);
    let of = |name: &str| -> Vec<u64> {
        got.iter()
            .filter(|(c, _, _)| c == name)
            .map(|(_, s, _)| *s)
            .collect()
    };
    assert_eq!(of(&a), [6, 7, 8, 9, 10], "what the history still has");
    assert_eq!(of(&b), [6, 7, 8, 9, 10]);
    late.ping();
    assert_eq!(server.wait_metric("shardcast_replays_total", 2), 2);
    assert_eq!(
        server.wait_metric("shardcast_replays_incomplete_total", 1),
        1
    );
}

/// Receive `count` DECISION frames and return their seqs (checking each is whole).
fn decision_seqs(c: &mut Client, count: usize) -> Vec<u64> {
    (0..count)
        .map(|_| {
            let m = c.recv();
            assert_eq!(m["type"], "DECISION", "{m}");
            assert_eq!(m["data"]["orgId"], "acme", "{m}");
            assert!(m["data"]["id"].is_string(), "{m}");
            m["seq"].as_u64().expect("seq")
        })
        .collect()
}

#[test]
fn decisions_older_than_the_ring_are_replayed_from_the_store_even_after_kill_9() {
    decisions_are_replayed_from_the_store("");
}

#[test]
fn decisions_are_replayed_from_postgresql_too() {
    let Some(schema) = common::postgres_schema("replay") else {
        return;
    };
    decisions_are_replayed_from_the_store(&format!("[storage]\nurl = \"{}\"\n", schema.url));
}

fn decisions_are_replayed_from_the_store(storage: &str) {
    const CHANNEL: &str = "org:acme:decisions";
    let server = Server::start(&format!("[history]\nsize = 2\n{storage}"));
    let mut producer = server.client_on(common::ACME, 0);
    for n in 1..=10 {
        producer.send(common::ingest(
            CHANNEL,
            &format!("k{n}"),
            common::decision("acme"),
        ));
        assert_eq!(producer.recv_type("ACK")["seq"], n);
    }
    let mut late = server.client_on(common::ACME, 1);
    let answer = subscribe_since(&mut late, &[(CHANNEL, 3)]);
    assert_eq!(answer["recovered"][CHANNEL], true, "{answer}");
    let epoch = answer["epoch"].as_u64().expect("epoch");
    assert_eq!(decision_seqs(&mut late, 7), (4..=10).collect::<Vec<_>>());
    late.ping();

    // After a crash the ring is empty and the sequence continues from the store.
    let server = server.kill_and_restart();
    let mut again = server.client_on(common::ACME, 1);
    let answer = subscribe_since(&mut again, &[(CHANNEL, 5)]);
    assert_eq!(answer["recovered"][CHANNEL], true, "{answer}");
    assert_ne!(answer["epoch"], epoch, "a restart is a new epoch");
    assert_eq!(decision_seqs(&mut again, 5), (6..=10).collect::<Vec<_>>());
    // A client that says which epoch its seq came from is told the replay may not be whole:
    // ephemeral messages of that epoch are gone (the decisions are still sent).
    let mut careful = server.client_on(common::ACME, 0);
    careful.send(json!({"type":"SUB","channels":[CHANNEL],"since":{CHANNEL:8},"epoch":epoch}));
    let answer = careful.recv();
    assert_eq!(answer["recovered"][CHANNEL], false, "{answer}");
    assert_eq!(decision_seqs(&mut careful, 2), [9, 10]);

    // An ephemeral message among the decisions leaves a hole the store cannot fill.
    let mut producer = server.client_on(common::ACME, 0);
    producer.send(json!({"type":"PUBLISH","channel":CHANNEL,"data":{"n":1},"id":"p"}));
    assert_eq!(producer.recv_type("ACK")["seq"], 11);
    for n in 12..=14 {
        producer.send(common::ingest(
            CHANNEL,
            &format!("k{n}"),
            common::decision("acme"),
        ));
        assert_eq!(producer.recv_type("ACK")["seq"], n);
    }
    let mut gap = server.client_on(common::ACME, 1);
    let answer = subscribe_since(&mut gap, &[(CHANNEL, 10)]);
    assert_eq!(answer["recovered"][CHANNEL], false, "{answer}");
    assert_eq!(decision_seqs(&mut gap, 3), [12, 13, 14]);
    gap.ping();
}

/// A channel nobody uses is forgotten once its history has expired; used again, it goes on
/// numbering where it stood, so a reconnecting client's `since` still means what it did.
#[test]
fn a_forgotten_channel_goes_on_where_it_stood() {
    const DECISIONS: &str = "org:acme:decisions";
    const USAGE: &str = "org:acme:usage";
    let server = Server::start("[history]\nsize = 10\nttl_secs = 1\n");
    let mut producer = server.client_on(common::ACME, 0);
    for n in 1..=5 {
        let ingest = common::ingest(DECISIONS, &format!("k{n}"), common::decision("acme"));
        producer.send(ingest);
        assert_eq!(producer.recv_type("ACK")["seq"], n);
    }
    for n in 1..=3 {
        assert_eq!(publish(&mut producer, USAGE, n), n);
    }
    server.wait_metric("shardcast_channels_freed_total", 2);

    let mut back = server.client_on(common::ACME, 1);
    let answer = subscribe_since(&mut back, &[(DECISIONS, 2), (USAGE, 3)]);
    assert_eq!(
        answer["recovered"][DECISIONS], true,
        "from the store: {answer}"
    );
    assert_eq!(
        answer["recovered"][USAGE], true,
        "nothing was missed: {answer}"
    );
    assert_eq!(decision_seqs(&mut back, 3), [3, 4, 5]);
    assert_eq!(publish(&mut producer, USAGE, 4), 4, "not back to 1");
    assert_eq!(messages(&mut back, 1), [(USAGE.to_string(), 4, 4)]);
    let mut behind = server.client_on(common::ACME, 0);
    let answer = subscribe_since(&mut behind, &[(USAGE, 1)]);
    assert_eq!(
        answer["recovered"][USAGE], false,
        "2 and 3 are gone: {answer}"
    );
}
