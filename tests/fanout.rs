//! Fan-out across shards: every subscriber gets every message once, in order.

mod common;

use std::collections::HashMap;
use std::thread;

use common::*;
use serde_json::{json, Value};

/// Subscribers on both shards, publishers on both shards, channels owned by each shard: every
/// subscriber sees every message exactly once, with seq rising by one, and each publisher's
/// messages in the order sent. 200,000 publishes and 800,000 deliveries keep the mesh busy in
/// both directions (the sustained load under which glommio's mesh has been reported to stall).
#[test]
fn every_subscriber_gets_every_publish_once_in_order() {
    let server = Server::start("");
    let channels = channels_owned_by_each_shard("usage");
    const PER_PUBLISHER: usize = 50_000;

    let mut subscribers = Vec::new();
    for shard in [0, 1, 0, 1] {
        let mut c = server.client_on(ADMIN, shard);
        let names: Vec<&str> = channels.iter().map(String::as_str).collect();
        c.subscribe(&names);
        subscribers.push(c);
    }
    let publishers: Vec<_> = [0, 1]
        .into_iter()
        .map(|shard| server.client_on(ADMIN, shard))
        .collect();

    // Each publisher ends with one acknowledged marker on the first channel.
    let expected = 2 * PER_PUBLISHER * channels.len() + 2;
    let window = Window::new(subscribers.len(), 256);
    let readers: Vec<_> = subscribers
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let window = window.clone();
            thread::spawn(move || {
                let mut last_seq: HashMap<String, u64> = HashMap::new();
                let mut last_n: HashMap<(String, u64), u64> = HashMap::new();
                for got in 1..=expected as u64 {
                    let m = c.recv();
                    window.received(i, got);
                    assert_eq!(m["type"], "MESSAGE", "{m}");
                    let channel = m["channel"].as_str().unwrap().to_string();
                    let seq = m["seq"].as_u64().unwrap();
                    let prev = last_seq.insert(channel.clone(), seq).unwrap_or(0);
                    assert_eq!(seq, prev + 1, "gap or duplicate on {channel}");
                    let (p, n) = (
                        m["data"]["p"].as_u64().unwrap(),
                        m["data"]["n"].as_u64().unwrap(),
                    );
                    if let Some(prev_n) = last_n.insert((channel, p), n) {
                        assert_eq!(n, prev_n + 1, "publisher {p} reordered");
                    }
                }
                last_seq
            })
        })
        .collect();

    let writers: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, mut c)| {
            let channels = channels.clone();
            let window = window.clone();
            thread::spawn(move || {
                for n in 1..=PER_PUBLISHER {
                    for ch in &channels {
                        window.before_send();
                        c.send(json!({"type":"PUBLISH","channel":ch,"data":{"p":p,"n":n}}));
                    }
                }
                // A final acknowledged publish proves everything before it was accepted.
                c.send(json!({"type":"PUBLISH","channel":channels[0],"data":{"p":10 + p,"n":1},"id":"last"}));
                c.recv_type("ACK")
            })
        })
        .collect();
    for w in writers {
        let ack = w.join().unwrap();
        assert_eq!(ack["id"], "last");
    }
    for r in readers {
        let seqs = r.join().unwrap();
        assert_eq!(seqs.len(), 2);
    }
    // Every publish crossed the mesh at least once (each channel has subscribers on both
    // shards), and the counters show how many messages each hand-off carried.
    let crossed = server.wait_metric("shardcast_mesh_messages_total", expected as u64);
    let batches = server.wait_metric("shardcast_mesh_batches_total", 1);
    assert!(
        batches <= crossed,
        "{batches} batches for {crossed} messages"
    );
}

/// `data` arrives byte for byte as published, and ACK carries the seq.
#[test]
fn publish_data_is_relayed_verbatim_and_acked() {
    let server = Server::start("");
    let mut sub = server.client_on(ACME, 0);
    sub.subscribe(&["org:acme:notifications"]);
    let mut publisher = server.client_on(ACME, 1);
    let raw = r#"{"type":"PUBLISH","channel":"org:acme:notifications","id":42,"data":{ "b" : 1.50 ,"a":"\u00e9" }}"#;
    publisher.send_text(raw);
    let ack = publisher.recv();
    assert_eq!(ack, json!({"type":"ACK","id":42,"seq":1}));
    let msg = sub.ws.read().unwrap().into_text().unwrap();
    assert_eq!(
        msg.as_str(),
        r#"{"type":"MESSAGE","channel":"org:acme:notifications","seq":1,"data":{ "b" : 1.50 ,"a":"\u00e9" }}"#
    );
    // Without an id there is no ACK: the next reply is the PONG.
    publisher.send(json!({"type":"PUBLISH","channel":"org:acme:notifications","data":1}));
    publisher.ping();
    assert_eq!(sub.recv()["seq"], 2);
}

/// UNSUB stops delivery; other subscribers keep receiving.
#[test]
fn unsubscribe_stops_delivery() {
    let server = Server::start("");
    let channel = "org:acme:usage";
    let mut a = server.client_on(ACME, 0);
    let mut b = server.client_on(ACME, 1);
    a.subscribe(&[channel]);
    b.subscribe(&[channel]);
    a.send(json!({"type":"UNSUB","channels":[channel],"id":"u"}));
    let v = a.recv();
    assert_eq!(
        v,
        json!({"type":"UNSUBSCRIBED","channels":[channel],"id":"u"})
    );
    let mut p = server.client(&format!("/ws?key={ACME}"));
    p.send(json!({"type":"PUBLISH","channel":channel,"data":"x","id":"1"}));
    p.recv_type("ACK");
    assert_eq!(b.recv()["data"], "x");
    a.ping(); // a got nothing before its PONG
}

/// A consumer that stops reading loses old messages (counted, and told), while a normal
/// subscriber on the same channel gets everything and server memory stays bounded.
#[test]
fn slow_consumer_drops_oldest_without_hurting_others() {
    let server =
        Server::start("[limits]\noutbound_queue_messages = 64\noutbound_queue_bytes = 262144\n");
    let channel = "org:acme:usage";
    let mut slow = slow_subscriber(&server, channel);
    let mut normal = server.client(&format!("/ws?key={ACME}"));
    normal.subscribe(&[channel]);
    let rss_before = server.rss_kib();

    const COUNT: u64 = 20_000;
    let payload = "x".repeat(2000);
    let window = Window::new(1, 64);
    let progress = window.clone();
    let reader = thread::spawn(move || {
        for n in 1..=COUNT {
            let m = normal.recv();
            progress.received(0, n);
            assert_eq!(m["seq"], n, "normal subscriber missed a message");
        }
    });
    let mut publisher = server.client(&format!("/ws?key={ACME}"));
    for n in 0..COUNT {
        window.before_send();
        publisher.send(json!({"type":"PUBLISH","channel":channel,"data":{"n":n,"pad":payload}}));
    }
    reader.join().unwrap();
    let rss_after = server.rss_kib();
    // 20,000 x 2 KB = 40 MB went to the slow consumer; its queue holds at most 256 KiB.
    assert!(
        rss_after < rss_before + 16 * 1024,
        "server RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The slow consumer, reading at last, is told how many it lost, and seqs only move forward.
    let mut told = 0;
    let mut last = 0;
    loop {
        let m = slow.recv();
        match m["type"].as_str() {
            Some("ERROR") => {
                assert_eq!(m["code"], "slow_consumer", "{m}");
                told += m["dropped"].as_u64().unwrap();
            }
            Some("MESSAGE") => {
                let seq = m["seq"].as_u64().unwrap();
                assert!(seq > last);
                last = seq;
                if seq == COUNT {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(told > 0, "slow consumer was never told about drops");
    // The server counted exactly what it told the client.
    server.wait_health("drop counter to match", |h| {
        h["metrics"]["messages"]["dropped"] == told
    });
}

/// Under the "close" policy the slow consumer is closed with 1008 instead.
#[test]
fn slow_consumer_closed_under_close_policy() {
    let server = Server::start(
        "[limits]\noutbound_queue_messages = 16\noutbound_queue_bytes = 65536\nbackpressure_policy = \"close\"\n",
    );
    let channel = "org:acme:usage";
    let mut slow = slow_subscriber(&server, channel);
    let mut publisher = server.client(&format!("/ws?key={ACME}"));
    let payload = "y".repeat(2000);
    for n in 0..5_000 {
        publisher.send(json!({"type":"PUBLISH","channel":channel,"data":{"n":n,"pad":payload}}));
    }
    publisher.ping();
    let code = loop {
        match slow.ws.read() {
            Ok(tungstenite::Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, Some(1008));
    let v: Value = server.health();
    assert!(v["metrics"]["connections"]["total"].as_u64().unwrap() >= 2);
}

/// A subscriber that will not read (see [`Server::slow_client`]).
fn slow_subscriber(server: &Server, channel: &str) -> Client {
    let mut slow = server.slow_client(ACME);
    slow.subscribe(&[channel]);
    slow
}

/// CHANNELS lists the connection's subscriptions, as SUB and UNSUB leave them.
#[test]
fn channels_lists_what_the_connection_is_subscribed_to() {
    let server = Server::start("");
    let mut client = server.client_on(ADMIN, 0);
    client.send(json!({"type":"CHANNELS","id":"c0"}));
    assert_eq!(
        client.recv(),
        json!({"type":"CHANNELS","channels":[],"id":"c0"})
    );
    // One channel owned by each shard: the answer does not depend on where they live.
    let [a, b] = channels_owned_by_each_shard("usage");
    client.subscribe(&[&a, &b]);
    client.send(json!({"type":"CHANNELS","id":"c1"}));
    assert_eq!(
        client.recv(),
        json!({"type":"CHANNELS","channels":[a, b],"id":"c1"})
    );
    client.send(json!({"type":"UNSUB","channels":[a]}));
    client.recv_type("UNSUBSCRIBED");
    client.send(json!({"type":"CHANNELS"}));
    assert_eq!(client.recv(), json!({"type":"CHANNELS","channels":[b]}));
}
