//! Several shardcast processes against one Redis, as one server (docs/CLUSTER.md): what a
//! client on any node sees of what is published on every node.

mod common;

use std::collections::HashSet;

use common::{channels_owned_by_each_shard, ingest, Server, ADMIN};
use serde_json::{json, Value};
use shardcast::cluster::keys::{redis_for, Keys};

/// A cluster node with `shards` shards on Redis `url`, under a key prefix of its own test.
fn node(url: &str, prefix: &str, shards: usize) -> Server {
    node_with(url, prefix, shards, "")
}

/// [`node`] with more configuration sections.
fn node_with(url: &str, prefix: &str, shards: usize, more: &str) -> Server {
    node_on(&format!("\"{url}\""), prefix, shards, more)
}

/// [`node_with`] with `redis_url` as a TOML value (a string or a list).
fn node_on(redis_url: &str, prefix: &str, shards: usize, more: &str) -> Server {
    node_storing(redis_url, prefix, shards, more, "memory")
}

/// [`node_on`] storing decisions at `storage` (a PostgreSQL URL).
fn node_storing(redis_url: &str, prefix: &str, shards: usize, more: &str, storage: &str) -> Server {
    node_full(redis_url, prefix, shards, more, "", storage)
}

/// [`node_storing`] with more `[cluster]` settings.
fn node_full(
    redis_url: &str,
    prefix: &str,
    shards: usize,
    more: &str,
    cluster: &str,
    storage: &str,
) -> Server {
    let extra = format!(
        r#"
{more}

[limits]
outbound_queue_messages = 8192

[cluster]
redis_url = {redis_url}
prefix = "{prefix}"
{cluster}

[storage]
url = "{storage}"
"#
    );
    Server::start_with(shards, &extra)
}

/// A prefix no earlier run has used: every channel starts at seq 1.
fn fresh_prefix(test: &str) -> String {
    format!(
        "sctest.{test}.{}.{}",
        std::process::id(),
        common::unix_now()
    )
}

/// The next ACK of a client; an ERROR instead fails the test at once (rather than after the
/// read timeout) and says what it was.
fn ack(client: &mut common::Client) -> Value {
    loop {
        let v = client.recv();
        match v["type"].as_str() {
            Some("ACK") => return v,
            Some("ERROR") => panic!("an ERROR where an ACK was due: {v}"),
            _ => {}
        }
    }
}

/// The next MESSAGE of a subscriber: (channel, seq, data).
fn message(client: &mut common::Client) -> (String, u64, Value) {
    let m = client.recv_type("MESSAGE");
    let channel = m["channel"].as_str().expect("channel").to_owned();
    (channel, m["seq"].as_u64().expect("seq"), m["data"].clone())
}

#[test]
fn every_subscriber_on_every_node_gets_every_message_once_and_in_seq_order() {
    let Some(url) = common::redis_url("nodes_every_subscriber_gets_every_message") else {
        return;
    };
    let prefix = fresh_prefix("every");
    let nodes: Vec<Server> = (0..3).map(|_| node(&url, &prefix, 2)).collect();
    // One channel owned by each shard of a node.
    let channels = channels_owned_by_each_shard("usage");
    every_subscriber_gets_every_message(&nodes, &channels, 200);
}

#[test]
fn channels_spread_over_two_redis_are_each_delivered_once_and_in_order() {
    let (Some(one), Some(two)) = (
        common::OwnRedis::start("nodes_two_redis"),
        common::OwnRedis::start("nodes_two_redis"),
    ) else {
        return;
    };
    let prefix = fresh_prefix("two");
    let urls = format!(r#"["{}", "{}"]"#, one.url(), two.url());
    let nodes: Vec<Server> = (0..2).map(|_| node_on(&urls, &prefix, 2, "")).collect();
    // Two channels held by each Redis (by the stable hash every node uses).
    let mut channels: Vec<String> = Vec::new();
    for held_by in 0..2 {
        let mine = (0..)
            .map(|i| format!("org:team{i}:usage"))
            .filter(|c| redis_for(c, 2) == held_by);
        channels.extend(mine.take(2));
    }
    every_subscriber_gets_every_message(&nodes, &channels, 100);
    // Each channel's numbering lives in its Redis alone.
    let keys = Keys::new(&prefix);
    for (i, redis) in [&one, &two].into_iter().enumerate() {
        let mut conn = redis::Client::open(redis.url())
            .and_then(|c| c.get_connection())
            .expect("Redis connection");
        for channel in &channels {
            let top: Option<u64> = redis::cmd("HGET")
                .arg(keys.meta(channel))
                .arg("s")
                .query(&mut conn)
                .expect("HGET");
            let expected = (redis_for(channel, 2) == i).then_some(200);
            assert_eq!(top, expected, "{channel} in Redis {i}");
        }
    }
}

/// Publishers on every node, each publishing `each` messages to every channel, and a
/// subscriber to all of them on each shard of each node: every subscriber gets every
/// message once, in seq order, and every seq is acknowledged to one publisher.
fn every_subscriber_gets_every_message(nodes: &[Server], channels: &[String], each: u64) {
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    // A subscriber on each shard of each node.
    let mut subscribers = Vec::new();
    let mut epochs = HashSet::new();
    for node in nodes {
        for shard in 0..2 {
            let mut client = node.client_on(ADMIN, shard);
            let subscribed = client.subscribe(&names);
            for channel in &names {
                let epoch = subscribed["epochs"][channel].as_str();
                epochs.insert((*channel, epoch.expect("epochs").to_owned()));
            }
            subscribers.push(client);
        }
    }
    // Each channel has one epoch, whichever node and shard (owner or not) is asked.
    assert_eq!(epochs.len(), names.len(), "{epochs:?}");
    let (n_nodes, n_channels) = (nodes.len() as u64, channels.len() as u64);
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            let mut client = node.client_on(ADMIN, n % 2);
            let channels = channels.to_vec();
            std::thread::spawn(move || {
                for i in 0..each {
                    for channel in &channels {
                        let id = format!("{n}-{i}");
                        let data = json!({"node": n, "i": i});
                        client
                            .send(json!({"type":"PUBLISH","channel":channel,"data":data,"id":id}));
                    }
                }
                let mut acked = Vec::new();
                for _ in 0..each * n_channels {
                    let answer = ack(&mut client);
                    acked.push(answer["seq"].as_u64().expect("an ACK has a seq"));
                }
                acked
            })
        })
        .collect();
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || {
                let mut heard = Vec::new();
                for _ in 0..n_nodes * each * n_channels {
                    heard.push(message(&mut client));
                }
                // Nothing more: a duplicate would come after the last expected message.
                client.ping();
                heard
            })
        })
        .collect();
    let acked: Vec<u64> = publishers
        .into_iter()
        .flat_map(|p| p.join().expect("publisher"))
        .collect();
    assert_eq!(acked.len() as u64, n_nodes * each * n_channels);
    for reader in readers {
        let heard = reader.join().expect("subscriber");
        for channel in channels {
            let of_channel: Vec<&(String, u64, Value)> =
                heard.iter().filter(|(c, ..)| c == channel).collect();
            let seqs: Vec<u64> = of_channel.iter().map(|(_, seq, _)| *seq).collect();
            let expected: Vec<u64> = (1..=n_nodes * each).collect();
            assert_eq!(seqs, expected, "{channel}: every seq once, in order");
            let sent: HashSet<(u64, u64)> = of_channel
                .iter()
                .map(|(_, _, d)| (d["node"].as_u64().unwrap(), d["i"].as_u64().unwrap()))
                .collect();
            assert_eq!(
                sent.len() as u64,
                n_nodes * each,
                "{channel}: every message once"
            );
            // Each node's own messages keep the order it published them in.
            for n in 0..n_nodes {
                let mine: Vec<u64> = of_channel
                    .iter()
                    .filter(|(_, _, d)| d["node"] == n)
                    .map(|(_, _, d)| d["i"].as_u64().unwrap())
                    .collect();
                assert_eq!(mine, (0..each).collect::<Vec<_>>(), "node {n} on {channel}");
            }
        }
    }
    // Every seq was acknowledged to exactly one publisher.
    let mut acked = acked;
    acked.sort_unstable();
    let expected: Vec<u64> = (1..=n_nodes * each)
        .flat_map(|s| std::iter::repeat_n(s, n_channels as usize))
        .collect();
    assert_eq!(acked, expected);
}

#[test]
fn a_client_that_moves_to_another_node_gets_what_it_missed_then_live_messages() {
    let Some(url) = common::redis_url("nodes_a_client_that_moves") else {
        return;
    };
    let prefix = fresh_prefix("moves");
    let a = node(&url, &prefix, 2);
    let b = node(&url, &prefix, 2);
    let channel = "org:acme:usage";
    let mut subscriber = a.client(&format!("/ws?key={ADMIN}"));
    let subscribed = subscriber.subscribe(&[channel]);
    // The channel's own epoch, the same on every node, beside the node's.
    let epoch = subscribed["epochs"][channel]
        .as_str()
        .expect("epochs")
        .to_owned();
    let node_epoch = subscribed["epoch"].clone();
    let mut publisher = a.client(&format!("/ws?key={ADMIN}"));
    let publish = |publisher: &mut common::Client, i: u64| {
        let id = i.to_string();
        publisher.send(json!({"type":"PUBLISH","channel":channel,"data":i,"id":id}));
        assert_eq!(ack(publisher)["seq"], i);
    };
    for i in 1..=3 {
        publish(&mut publisher, i);
        assert_eq!(message(&mut subscriber).1, i);
    }
    drop(subscriber);
    for i in 4..=6 {
        publish(&mut publisher, i);
    }
    // Back, on the other node, from where it left, with both epochs it was given: the
    // channel's decides.
    let mut moved = b.client(&format!("/ws?key={ADMIN}"));
    let since = json!({channel: 3});
    let epochs = json!({channel: epoch});
    moved.send(
        json!({"type":"SUB","channels":[channel],"since":since,"epoch":node_epoch,"epochs":epochs}),
    );
    let subscribed = moved.recv_type("SUBSCRIBED");
    assert_eq!(subscribed["recovered"][channel], true, "{subscribed}");
    assert_eq!(
        subscribed["epochs"][channel],
        epoch.as_str(),
        "{subscribed}"
    );
    for i in 4..=6 {
        assert_eq!(message(&mut moved), (channel.to_owned(), i, json!(i)));
    }
    publish(&mut publisher, 7);
    assert_eq!(message(&mut moved).1, 7);
    // Seqs of another numbering of the channel are not recovered, though what there is
    // is sent.
    let mut other = b.client(&format!("/ws?key={ADMIN}"));
    let epochs = json!({channel: "0123456789abcdef"});
    other.send(json!({"type":"SUB","channels":[channel],"since":since,"epochs":epochs}));
    let subscribed = other.recv_type("SUBSCRIBED");
    assert_eq!(subscribed["recovered"][channel], false, "{subscribed}");
    assert_eq!(message(&mut other).1, 4);
}

#[test]
fn health_and_metrics_show_redis_and_ready_follows_it_down_and_back() {
    let Some(redis) = common::OwnRedis::start("nodes_health_follows_redis") else {
        return;
    };
    let url = redis.url();
    let a = node(&url, &fresh_prefix("health"), 2);
    let cluster_up = |h: &Value| {
        let r = &h["cluster"]["redis"][0];
        r["link"] == "up" && r["pubsub"] == "up"
    };
    let health = a.wait_health("the cluster up", cluster_up);
    assert_eq!(
        health["cluster"]["redis"][0]["url"],
        url.as_str(),
        "{health}"
    );
    a.wait_ready();
    let channel = "org:acme:usage";
    let mut subscriber = a.client(&format!("/ws?key={ADMIN}"));
    let subscribed = subscriber.subscribe(&[channel]);
    let mut publisher = a.client(&format!("/ws?key={ADMIN}"));
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"before","id":"p1"}));
    assert_eq!(ack(&mut publisher)["seq"], 1);
    assert_eq!(message(&mut subscriber).2, "before");
    let publishes = format!("shardcast_cluster_publishes_total{{redis=\"{url}\"}}");
    a.wait_metric(&publishes, 1);
    a.wait_metric(
        &format!("shardcast_cluster_subscriptions{{redis=\"{url}\"}}"),
        1,
    );
    let (_, metrics) = a.get("/metrics");
    assert!(
        metrics.contains("shardcast_cluster_round_trip_seconds_count"),
        "{metrics}"
    );

    // Redis gone: not ready, and a publish is refused rather than acknowledged.
    let port = redis.stop();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, body) = a.get("/health/ready");
        if status == 503 {
            assert!(body.contains(r#""reason":"cluster_unavailable""#), "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still ready: {body}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A publish is numbered and delivered by the node alone, under an epoch of its own,
    // and says so (one sent before the shard heard that Redis is gone is refused with
    // cluster_unavailable, as documented, and nothing ran: Redis is down).
    let during = loop {
        publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"during","id":"p2"}));
        let answer = publisher.recv_type_of(&["ACK", "ERROR"]);
        if answer["type"] == "ACK" {
            break answer;
        }
        assert_eq!(answer["code"], "cluster_unavailable", "{answer}");
    };
    assert_eq!(
        (&during["seq"], &during["local"]),
        (&json!(1), &json!(true))
    );
    let moved = subscriber.recv();
    assert_eq!(moved["event"], "channel_reset", "{moved}");
    assert_ne!(moved["epoch"], subscribed["epochs"][channel], "{moved}");
    assert_eq!(
        message(&mut subscriber),
        (channel.to_owned(), 1, json!("during"))
    );

    // Back (empty, as a restart with nothing on disk leaves it): ready again with nobody
    // publishing, and the subscription still delivers.
    let _redis = common::OwnRedis::start_on("nodes_health_follows_redis", port)
        .expect("redis-server started once already");
    a.wait_ready();
    a.wait_health("the cluster up again", cluster_up);
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"after","id":"p3"}));
    ack(&mut publisher);
    // Redis lost the channel: its numbering starts again, and the subscriber is moved to
    // it before its first message.
    let reset = subscriber.recv();
    assert_eq!(reset["type"], "SYSTEM", "{reset}");
    assert_eq!(reset["event"], "channel_reset", "{reset}");
    assert_eq!(reset["channel"], channel, "{reset}");
    assert_eq!(
        message(&mut subscriber),
        (channel.to_owned(), 1, json!("after"))
    );
    // A client that had the old numbering's seq 1 and recovers with its epoch is told it
    // cannot; one with the new epoch recovers.
    let old_epoch = subscribed["epochs"][channel].clone();
    let new_epoch = reset["epoch"].clone();
    assert!(
        new_epoch.is_string() && new_epoch != old_epoch && new_epoch != moved["epoch"],
        "{reset} {subscribed}"
    );
    for (epoch, recovered) in [(old_epoch, false), (new_epoch, true)] {
        let mut back = a.client(&format!("/ws?key={ADMIN}"));
        let epochs = json!({channel: epoch});
        back.send(json!({"type":"SUB","channels":[channel],"since":{channel: 1},"epochs":epochs}));
        let answer = back.recv_type("SUBSCRIBED");
        assert_eq!(answer["recovered"][channel], recovered, "{answer}");
    }
    a.wait_metric(
        &format!("shardcast_cluster_resubscribes_total{{redis=\"{url}\"}}"),
        2,
    );
}

/// Redis refuses new connections (as when it is out of clients) until the guard is dropped:
/// the node whose PUB/SUB connection was killed cannot make it again meanwhile.
struct RefuseConnections(redis::Connection);

impl RefuseConnections {
    /// Refuse, then kill every PUB/SUB connection.
    fn kill_pubsub(url: &str) -> Self {
        let mut admin = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .expect("Redis admin connection");
        let info: String = redis::cmd("INFO").arg("clients").query(&mut admin).unwrap();
        let connected: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("connected_clients");
        let pubsub: String = redis::cmd("CLIENT")
            .arg(&["LIST", "TYPE", "pubsub"])
            .query(&mut admin)
            .unwrap();
        // Room for the connections that stay, none for those killed next.
        let staying = connected - pubsub.lines().count() as u64;
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "maxclients"])
            .arg(staying)
            .query(&mut admin)
            .unwrap();
        let _: u64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "pubsub"])
            .query(&mut admin)
            .unwrap();
        Self(admin)
    }
}

impl Drop for RefuseConnections {
    fn drop(&mut self) {
        let _: Result<(), _> = redis::cmd("CONFIG")
            .arg(&["SET", "maxclients", "10000"])
            .query(&mut self.0);
    }
}

impl RefuseConnections {
    /// Refuse, then kill every connection made so far but this one's and `keep`'s.
    fn kill_all_but(url: &str, keep: &[u64]) -> Self {
        let mut admin = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .expect("Redis admin connection");
        let me: u64 = redis::cmd("CLIENT").arg("ID").query(&mut admin).unwrap();
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
        let ids: Vec<u64> = list
            .lines()
            .filter_map(|l| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix("id="))?
                    .parse()
                    .ok()
            })
            .collect();
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "maxclients"])
            .arg(keep.len() + 1)
            .query(&mut admin)
            .unwrap();
        for id in ids.into_iter().filter(|id| *id != me && !keep.contains(id)) {
            let _: Result<(), _> = redis::cmd("CLIENT")
                .arg(&["KILL", "ID"])
                .arg(id)
                .query(&mut admin);
        }
        Self(admin)
    }
}

/// Wait until node `a`'s PUB/SUB connection is `state`.
fn wait_pubsub(a: &Server, state: &'static str) {
    a.wait_health(state, |h| h["cluster"]["redis"][0]["pubsub"] == state);
}

#[test]
fn what_is_published_while_a_node_cannot_listen_reaches_its_subscribers_afterwards() {
    let Some(redis) = common::OwnRedis::start("nodes_published_while_a_node_cannot_listen") else {
        return;
    };
    let (url, prefix) = (redis.url(), fresh_prefix("outage"));
    let (a, b) = (node(&url, &prefix, 1), node(&url, &prefix, 1));
    let channel = "org:acme:usage";
    // Subscribed on A before anything was published: A has heard nothing of the channel.
    let mut subscriber = a.client(&format!("/ws?key={ADMIN}"));
    subscriber.subscribe(&[channel]);
    let mut publisher = b.client(&format!("/ws?key={ADMIN}"));
    let refusing = RefuseConnections::kill_pubsub(&url);
    wait_pubsub(&a, "down");
    for i in 1..=3 {
        publisher.send(json!({"type":"PUBLISH","channel":channel,"data":i,"id":i}));
        assert_eq!(ack(&mut publisher)["seq"], i);
    }
    drop(refusing);
    wait_pubsub(&a, "up");
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":4,"id":4}));
    for i in 1..=4 {
        assert_eq!(message(&mut subscriber), (channel.to_owned(), i, json!(i)));
    }
}

#[test]
fn subscribers_are_told_which_seqs_the_history_no_longer_had() {
    let Some(redis) = common::OwnRedis::start("nodes_told_which_seqs") else {
        return;
    };
    let (url, prefix) = (redis.url(), fresh_prefix("lost"));
    let small = "[history]\nsize = 10\n";
    // Every node trims the history as it publishes: both keep 10.
    let (a, b) = (
        node_with(&url, &prefix, 2, small),
        node_with(&url, &prefix, 1, small),
    );
    // Owned by A's shard 0, which tells its subscriber on shard 1 across the mesh.
    let [channel, _] = channels_owned_by_each_shard("usage");
    let channel = channel.as_str();
    let mut subscribers = [a.client_on(ADMIN, 0), a.client_on(ADMIN, 1)];
    for s in &mut subscribers {
        s.subscribe(&[channel]);
    }
    let mut publisher = b.client(&format!("/ws?key={ADMIN}"));
    let refusing = RefuseConnections::kill_pubsub(&url);
    wait_pubsub(&a, "down");
    const N: u64 = 500;
    for i in 1..=N {
        publisher.send(json!({"type":"PUBLISH","channel":channel,"data":i}));
    }
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":0,"id":"last"}));
    assert_eq!(ack(&mut publisher)["seq"], N + 1);
    drop(refusing);
    for s in &mut subscribers {
        let lost = s.recv();
        assert_eq!(lost["type"], "SYSTEM", "{lost}");
        assert_eq!(lost["event"], "messages_lost", "{lost}");
        assert_eq!(lost["channel"], channel, "{lost}");
        assert_eq!(lost["from"], 1, "{lost}");
        // The stream keeps at least 10, and at most one stream node (100) more.
        let to = lost["to"].as_u64().expect("to");
        assert!((N - 110..=N - 10).contains(&to), "{lost}");
        for seq in to + 1..=N + 1 {
            assert_eq!(message(s).1, seq);
        }
    }
}

/// Two nodes against the shared Redis, storing decisions in a PostgreSQL schema of the
/// test's own.
fn two_nodes_storing(test: &str) -> Option<(Server, Server, common::PgSchema)> {
    two_nodes_storing_with(test, "")
}

/// [`two_nodes_storing`] with more configuration sections.
fn two_nodes_storing_with(test: &str, more: &str) -> Option<(Server, Server, common::PgSchema)> {
    let url = common::redis_url(test)?;
    let db = common::postgres_schema(test)?;
    let prefix = fresh_prefix(test);
    let redis_url = format!("\"{url}\"");
    let start = || node_storing(&redis_url, &prefix, 2, more, &db.url);
    let (a, b) = (start(), start());
    a.wait_ready();
    b.wait_ready();
    Some((a, b, db))
}

/// The stored seq of decision `key` of org acme, once its node has written it.
fn stored_seq(db: &common::PgSchema, key: &str) -> i64 {
    let mut client = postgres::Client::connect(&db.url, postgres::NoTls).expect("PostgreSQL");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let row = client
            .query_one(
                "SELECT seq FROM decisions WHERE org = 'acme' AND idempotency_key = $1",
                &[&key],
            )
            .expect("one stored decision");
        if let Some(seq) = row.get::<_, Option<i64>>(0) {
            return seq;
        }
        assert!(std::time::Instant::now() < deadline, "{key} never numbered");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_decision_is_committed_numbered_and_delivered_on_every_node_once() {
    let Some((a, b, db)) = two_nodes_storing("nodes_decision_delivered") else {
        return;
    };
    let channel = "org:acme:decisions";
    let mut subscriber = b.client(&format!("/ws?key={ADMIN}"));
    subscriber.subscribe(&[channel]);
    let mut producer = a.client(&format!("/ws?key={}", common::ACME));
    producer.send(ingest(channel, "k1", common::decision("acme")));
    let first = ack(&mut producer);
    assert_eq!(first["dedup"], false, "{first}");
    assert_eq!(first["seq"], 1, "{first}");
    let id = first["decisionId"].as_str().expect("decisionId").to_owned();
    let delivered = subscriber.recv_type("DECISION");
    assert_eq!(delivered["seq"], 1, "{delivered}");
    assert_eq!(delivered["data"]["id"], id.as_str(), "{delivered}");
    assert_eq!(stored_seq(&db, "k1"), 1);
    // The same key on the other node: the original, and nothing delivered again.
    let mut retry = b.client(&format!("/ws?key={}", common::ACME));
    retry.send(ingest(channel, "k1", common::decision("acme")));
    let again = ack(&mut retry);
    assert_eq!(again["dedup"], true, "{again}");
    assert_eq!(again["decisionId"], id.as_str(), "{again}");
    assert_eq!(again["seq"], 1, "{again}");
    producer.send(json!({"type":"PUBLISH","channel":channel,"data":"next","id":"p"}));
    assert_eq!(ack(&mut producer)["seq"], 2);
    let next = subscriber.recv();
    assert_eq!(
        (next["type"].as_str(), next["seq"].as_u64()),
        (Some("MESSAGE"), Some(2)),
        "{next}"
    );
}

#[test]
fn the_same_key_on_two_nodes_at_once_is_one_decision() {
    let Some((a, b, db)) = two_nodes_storing("nodes_same_key_two_nodes") else {
        return;
    };
    let channel = "org:acme:decisions";
    let mut subscriber = a.client(&format!("/ws?key={ADMIN}"));
    subscriber.subscribe(&[channel]);
    const KEYS: usize = 20;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let senders: Vec<_> = [&a, &b]
        .into_iter()
        .map(|node| {
            let mut client = node.client(&format!("/ws?key={}", common::ACME));
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                (0..KEYS)
                    .map(|k| {
                        barrier.wait();
                        client.send(ingest(
                            channel,
                            &format!("race-{k}"),
                            common::decision("acme"),
                        ));
                        ack(&mut client)
                    })
                    .collect::<Vec<Value>>()
            })
        })
        .collect();
    let acks: Vec<Vec<Value>> = senders
        .into_iter()
        .map(|s| s.join().expect("sender"))
        .collect();
    let mut seqs = HashSet::new();
    for (k, (one, two)) in acks[0].iter().zip(&acks[1]).enumerate() {
        assert_eq!(one["decisionId"], two["decisionId"], "{one} {two}");
        assert_eq!(one["seq"], two["seq"], "{one} {two}");
        let fresh = [one, two].iter().filter(|a| a["dedup"] == false).count();
        assert_eq!(fresh, 1, "one of them stored it: {one} {two}");
        seqs.insert(one["seq"].as_u64().expect("seq"));
        assert_eq!(
            stored_seq(&db, &format!("race-{k}")),
            one["seq"].as_i64().unwrap()
        );
    }
    assert_eq!(
        seqs,
        (1..=KEYS as u64).collect(),
        "one seq per key, none skipped"
    );
    // One DECISION per key, in seq order, then the next message.
    for seq in 1..=KEYS as u64 {
        assert_eq!(subscriber.recv_type("DECISION")["seq"], seq);
    }
    let mut publisher = b.client(&format!("/ws?key={ADMIN}"));
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"after","id":"p"}));
    ack(&mut publisher);
    let next = subscriber.recv();
    assert_eq!(next["type"], "MESSAGE", "{next}");
}

#[test]
fn a_replay_reads_from_postgresql_what_the_redis_history_no_longer_has() {
    let small = "[history]\nsize = 10\n";
    let Some((a, b, _db)) = two_nodes_storing_with("nodes_replay_from_postgres", small) else {
        return;
    };
    let channel = "org:acme:decisions";
    let mut producer = a.client(&format!("/ws?key={}", common::ACME));
    const N: u64 = 250;
    for k in 1..=N {
        producer.send(ingest(channel, &format!("r-{k}"), common::decision("acme")));
        assert_eq!(ack(&mut producer)["seq"], k);
    }
    // Redis keeps the last 10 to 110; the rest comes from the store, on the other node.
    let mut client = b.client(&format!("/ws?key={}", common::ACME));
    client.send(json!({"type":"SUB","channels":[channel],"since":{channel: 0}}));
    let subscribed = client.recv_type("SUBSCRIBED");
    assert_eq!(subscribed["recovered"][channel], true, "{subscribed}");
    for seq in 1..=N {
        assert_eq!(client.recv_type("DECISION")["seq"], seq);
    }
}

#[test]
fn decision_seqs_go_on_from_postgresql_after_redis_lost_the_channel() {
    let test = "nodes_seqs_go_on_after_redis_lost";
    let (Some(redis), Some(db)) = (common::OwnRedis::start(test), common::postgres_schema(test))
    else {
        return;
    };
    let (redis_url, prefix) = (format!("\"{}\"", redis.url()), fresh_prefix("floor"));
    let start = || node_storing(&redis_url, &prefix, 2, "", &db.url);
    let (a, b) = (start(), start());
    let channel = "org:acme:decisions";
    let mut producer = a.client(&format!("/ws?key={}", common::ACME));
    for k in 1..=3 {
        producer.send(ingest(channel, &format!("d{k}"), common::decision("acme")));
        assert_eq!(ack(&mut producer)["seq"], k);
    }
    assert_eq!(stored_seq(&db, "d3"), 3);
    // Redis restarts with nothing: the channel's numbering is gone from it.
    let port = redis.stop();
    let _redis = common::OwnRedis::start_on(test, port).expect("redis-server started before");
    a.wait_ready();
    b.wait_ready();
    let mut other = b.client(&format!("/ws?key={}", common::ACME));
    other.send(ingest(channel, "d4", common::decision("acme")));
    let ack = other.recv();
    assert_eq!(
        (ack["seq"].as_u64(), ack["dedup"].as_bool()),
        (Some(4), Some(false)),
        "{ack}"
    );
    assert_eq!(stored_seq(&db, "d4"), 4);
    producer.send(json!({"type":"PUBLISH","channel":channel,"data":"m","id":"m"}));
    let ack = producer.recv();
    assert_eq!(ack["seq"], 5, "{ack}");
    // All of it replays: 1-3 from PostgreSQL, 4-5 from Redis's new history.
    let mut back = a.client(&format!("/ws?key={}", common::ACME));
    back.send(json!({"type":"SUB","channels":[channel],"since":{channel: 0}}));
    let subscribed = back.recv_type("SUBSCRIBED");
    assert_eq!(subscribed["recovered"][channel], true, "{subscribed}");
    for seq in 1..=4 {
        assert_eq!(back.recv_type("DECISION")["seq"], seq);
    }
    assert_eq!(back.recv_type("MESSAGE")["seq"], 5);
}

#[test]
fn a_decision_a_stopped_node_committed_but_never_numbered_is_numbered_by_another() {
    let test = "nodes_orphan_numbered";
    let (Some(url), Some(db)) = (common::redis_url(test), common::postgres_schema(test)) else {
        return;
    };
    let channel = "org:acme:decisions";
    // What a node killed between the commit and Redis's answer leaves: a row without a seq.
    let mut client = postgres::Client::connect(&db.url, postgres::NoTls).expect("PostgreSQL");
    let cluster = "renumber_after_ms = 100";
    let (redis_url, prefix) = (format!("\"{url}\""), fresh_prefix(test));
    let node = node_full(&redis_url, &prefix, 2, "", cluster, &db.url);
    node.wait_ready();
    let created = common::unix_now() * 1000 - 1000;
    client
        .execute(
            "INSERT INTO decisions (id, org, channel, seq, schema, idempotency_key, direction,
                 decision, payload_hash, data, created_ms)
             VALUES ('dec_orphan', 'acme', $1, NULL, 'decision.v1', 'orphan', 'precheck',
                 'allow', 'sha256:x', '{\"id\":\"dec_orphan\"}', $2)",
            &[&channel, &created],
        )
        .expect("insert the orphan");
    let mut subscriber = node.client(&format!("/ws?key={ADMIN}"));
    subscriber.subscribe(&[channel]);
    let delivered = subscriber.recv_type("DECISION");
    assert_eq!(delivered["data"]["id"], "dec_orphan", "{delivered}");
    let seq = delivered["seq"].as_i64().expect("seq");
    assert_eq!(stored_seq(&db, "orphan"), seq);
    // Its key is known, with that id and seq.
    let mut producer = node.client(&format!("/ws?key={}", common::ACME));
    producer.send(ingest(channel, "orphan", common::decision("acme")));
    let ack = producer.recv();
    assert_eq!(
        (ack["decisionId"].as_str(), ack["seq"].as_i64()),
        (Some("dec_orphan"), Some(seq)),
        "{ack}"
    );
    assert_eq!(ack["dedup"], true, "{ack}");
}

#[test]
fn a_node_killed_during_ingest_loses_nothing_it_acknowledged() {
    let Some((a, b, db)) = two_nodes_storing("nodes_killed_during_ingest") else {
        return;
    };
    let channel = "org:acme:decisions";
    const KEYS: u64 = 200;
    let key = |k: u64| format!("kill-{k}");
    let mut producer = a.client(&format!("/ws?key={}", common::ACME));
    for k in 0..KEYS {
        producer.send(ingest(channel, &key(k), common::decision("acme")));
    }
    // Killed once some are acknowledged, with the rest in flight.
    let mut acked = std::collections::HashMap::new();
    while acked.len() < 50 {
        let answer = ack(&mut producer);
        let id = answer["decisionId"]
            .as_str()
            .expect("decisionId")
            .to_owned();
        acked.insert(
            answer["id"].as_str().expect("key").to_owned(),
            (id, answer["seq"].clone()),
        );
    }
    let mut a = a;
    a.child.kill().expect("kill -9");
    a.wait_exit();
    // Every key again on the other node: the acknowledged ones are known with their id and
    // seq; the others are stored now either way, each under one seq.
    let mut retry = b.client(&format!("/ws?key={}", common::ACME));
    let mut seqs = HashSet::new();
    for k in 0..KEYS {
        retry.send(ingest(channel, &key(k), common::decision("acme")));
        let ack = retry.recv();
        assert_eq!(ack["type"], "ACK", "{ack}");
        if let Some((id, seq)) = acked.get(&key(k)) {
            assert_eq!(ack["dedup"], true, "{ack}");
            assert_eq!(
                (&ack["decisionId"], &ack["seq"]),
                (&json!(id), seq),
                "{ack}"
            );
        }
        let seq = ack["seq"].as_u64().expect("seq");
        assert!(seqs.insert(seq), "seq {seq} given twice");
        assert_eq!(stored_seq(&db, &key(k)), seq as i64);
    }
    assert_eq!(
        seqs,
        (1..=KEYS).collect(),
        "every seq one decision's, none skipped"
    );
}

/// Wait until Redis at `url` has `n` subscribers of `channel` under `prefix`.
fn await_redis_subscribers(url: &str, prefix: &str, channel: &str, n: i64) {
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("Redis connection");
    let name = Keys::new(prefix).pubsub(channel);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&name)
            .query(&mut conn)
            .expect("PUBSUB NUMSUB");
        if counts[0].1 == n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{counts:?}, not {n}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_sub_while_redis_is_down_is_served_by_the_node_then_by_redis_when_it_is_back() {
    let test = "nodes_sub_while_redis_is_down";
    let Some(redis) = common::OwnRedis::start(test) else {
        return;
    };
    let (url, prefix) = (redis.url(), fresh_prefix("subdown"));
    let node = node_full(&format!("\"{url}\""), &prefix, 2, "", "", "memory");
    node.wait_ready();
    let port = redis.stop();
    wait_pubsub(&node, "down");
    // A channel the node has never heard of: subscribed at once, on the node alone.
    let channel = "org:acme:usage";
    let mut client = node.client(&format!("/ws?key={ADMIN}"));
    let subscribed = client.subscribe(&[channel]);
    assert_eq!(subscribed["channels"], json!([channel]), "{subscribed}");
    let mut publisher = node.client(&format!("/ws?key={ADMIN}"));
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"down","id":"d"}));
    assert_eq!(ack(&mut publisher)["local"], true);
    assert_eq!(client.recv()["event"], "channel_reset");
    assert_eq!(message(&mut client), (channel.to_owned(), 1, json!("down")));

    // Back: subscribed in Redis, and moved to its numbering before its first message.
    let _redis = common::OwnRedis::start_on(test, port).expect("redis-server started before");
    node.wait_ready();
    await_redis_subscribers(&url, &prefix, channel, 1);
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"up","id":"u"}));
    let up = ack(&mut publisher);
    assert_eq!(
        (&up["seq"], &up["local"]),
        (&json!(1), &Value::Null),
        "{up}"
    );
    let back = client.recv();
    assert_eq!(back["event"], "channel_reset", "{back}");
    assert_eq!(message(&mut client), (channel.to_owned(), 1, json!("up")));
    client.ping();
}

#[test]
fn a_sub_the_node_cannot_confirm_is_refused_in_time() {
    let test = "nodes_sub_refused_in_time";
    let Some(redis) = common::OwnRedis::start(test) else {
        return;
    };
    let (url, prefix) = (redis.url(), fresh_prefix("subrefused"));
    let node = node_full(
        &format!("\"{url}\""),
        &prefix,
        2,
        "",
        "timeout_ms = 300",
        "memory",
    );
    node.wait_ready();
    // The node still hears Redis (its PUB/SUB connection counts as one once it has a
    // subscription), but cannot read a channel's top to subscribe to it.
    let mut client = node.client(&format!("/ws?key={ADMIN}"));
    client.subscribe(&["org:acme:notifications"]);
    await_redis_subscribers(&url, &prefix, "org:acme:notifications", 1);
    let mut admin = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("Redis admin connection");
    let pubsub: String = redis::cmd("CLIENT")
        .arg(&["LIST", "TYPE", "pubsub"])
        .query(&mut admin)
        .unwrap();
    let room = pubsub.lines().count() + 1;
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxclients"])
        .arg(room)
        .query(&mut admin)
        .unwrap();
    let _: u64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal"])
        .query(&mut admin)
        .unwrap();
    let refusing = RefuseConnections(admin);
    let channel = "org:acme:usage";
    for attempt in ["s1", "s2"] {
        client.send(json!({"type":"SUB","channels":[channel],"id":attempt}));
        let refused = client.recv();
        assert_eq!(refused["type"], "ERROR", "{refused}");
        assert_eq!(refused["code"], "cluster_unavailable", "{refused}");
        assert_eq!(
            (refused["channel"].as_str(), refused["id"].as_str()),
            (Some(channel), Some(attempt))
        );
    }
    // Not subscribed: once Redis takes connections again, it takes the subscription.
    drop(refusing);
    node.wait_health("the link up", |h| h["cluster"]["redis"][0]["link"] == "up");
    let subscribed = client.subscribe(&[channel]);
    assert_eq!(subscribed["channels"], json!([channel]), "{subscribed}");
    let mut publisher = node.client(&format!("/ws?key={ADMIN}"));
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"up","id":"p"}));
    ack(&mut publisher);
    assert_eq!(message(&mut client).2, "up");
    client.ping();
}

#[test]
fn a_node_cut_off_from_redis_delivers_its_own_publishes_then_what_it_missed() {
    let test = "nodes_cut_off_from_redis";
    let Some(redis) = common::OwnRedis::start(test) else {
        return;
    };
    let (url, prefix) = (redis.url(), fresh_prefix("cutoff"));
    let a = node(&url, &prefix, 2);
    a.wait_ready();
    let channel = "org:acme:usage";
    // A subscriber on each shard: one hears from the channel's owner through the mesh.
    let mut subscribers: Vec<_> = (0..2).map(|s| a.client_on(ADMIN, s)).collect();
    let epoch = subscribers[0].subscribe(&[channel])["epochs"][channel].clone();
    subscribers[1].subscribe(&[channel]);
    let mut publisher = a.client(&format!("/ws?key={ADMIN}"));
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"before","id":"b"}));
    assert_eq!(ack(&mut publisher)["seq"], 1);
    for s in &mut subscribers {
        assert_eq!(message(s), (channel.to_owned(), 1, json!("before")));
    }
    // Another node as Redis sees it: a connection that Redis keeps while the node's own are
    // killed and refused.
    let mut other = shardcast::cluster::Client::connect(
        &url,
        Keys::new(&prefix),
        shardcast::cluster::Retention {
            history_size: 100,
            history_ttl_s: 600,
            meta_ttl_s: 3600,
            result_ttl_s: 300,
            kept: Default::default(),
        },
        std::time::Duration::from_secs(2),
    )
    .expect("a connection of the test's own");
    let other_id: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query(other.connection())
        .unwrap();
    let refusing = RefuseConnections::kill_all_but(&url, &[other_id]);
    wait_pubsub(&a, "down");

    // Numbered and delivered by the node alone, on both shards, under an epoch of its own.
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"local","id":"l"}));
    let local = ack(&mut publisher);
    assert_eq!((&local["seq"], &local["local"]), (&json!(1), &json!(true)));
    let mut local_epoch = Value::Null;
    for s in &mut subscribers {
        let moved = s.recv();
        assert_eq!(
            (&moved["event"], &moved["channel"]),
            (&json!("channel_reset"), &json!(channel)),
            "{moved}"
        );
        assert_ne!(moved["epoch"], epoch, "{moved}");
        local_epoch = moved["epoch"].clone();
        assert_eq!(message(s), (channel.to_owned(), 1, json!("local")));
    }
    a.wait_metric("shardcast_cluster_local_messages_total", 1);
    // A client coming now is given that epoch, and recovers in it.
    let mut late = a.client(&format!("/ws?key={ADMIN}"));
    let epochs = json!({channel: local_epoch});
    late.send(json!({"type":"SUB","channels":[channel],"since":{channel: 0},"epochs":epochs}));
    let subscribed = late.recv_type("SUBSCRIBED");
    assert_eq!(subscribed["epochs"][channel], local_epoch, "{subscribed}");
    assert_eq!(subscribed["recovered"][channel], true, "{subscribed}");
    assert_eq!(message(&mut late), (channel.to_owned(), 1, json!("local")));
    // Meanwhile another node publishes through Redis.
    let publish = shardcast::cluster::Publish {
        channel: channel.into(),
        kind: shardcast::dialect::Kind::Message,
        data: br#""remote""#.to_vec(),
        idempotency_key: None,
        floor: Some(0),
        to_user: None,
    };
    let published = other.publish(&[publish]).expect("a round trip").remove(0);
    let published = published.expect("published");
    assert_eq!(published.seq, 2);

    // Back: moved to Redis's numbering (the same epoch), with what was published there
    // meanwhile, then live.
    drop(refusing);
    wait_pubsub(&a, "up");
    for s in subscribers.iter_mut().chain([&mut late]) {
        let back = s.recv();
        assert_eq!(
            (&back["event"], &back["epoch"]),
            (&json!("channel_reset"), &epoch),
            "{back}"
        );
        assert_eq!(message(s), (channel.to_owned(), 2, json!("remote")));
    }
    publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"after","id":"a"}));
    let after = ack(&mut publisher);
    assert_eq!((&after["seq"], &after["local"]), (&json!(3), &Value::Null));
    for s in subscribers.iter_mut().chain([&mut late]) {
        assert_eq!(message(s), (channel.to_owned(), 3, json!("after")));
    }
}

#[test]
fn while_redis_is_down_decisions_are_stored_and_acknowledged_then_numbered_everywhere() {
    let test = "nodes_decisions_while_redis_is_down";
    let (Some(redis), Some(db)) = (common::OwnRedis::start(test), common::postgres_schema(test))
    else {
        return;
    };
    let (redis_url, prefix) = (format!("\"{}\"", redis.url()), fresh_prefix("ingestdown"));
    let start = || {
        node_full(
            &redis_url,
            &prefix,
            2,
            "",
            "renumber_after_ms = 200",
            &db.url,
        )
    };
    let (a, b) = (start(), start());
    a.wait_ready();
    b.wait_ready();
    let (decisions, usage) = ("org:acme:decisions", "org:acme:usage");
    let subscribe = |node: &Server| {
        let mut client = node.client(&format!("/ws?key={ADMIN}"));
        client.subscribe(&[decisions, usage]);
        client
    };
    let (mut on_a, mut on_b) = (subscribe(&a), subscribe(&b));
    let mut producer = a.client(&format!("/ws?key={}", common::ACME));
    producer.send(ingest(decisions, "d1", common::decision("acme")));
    assert_eq!(ack(&mut producer)["seq"], 1);
    for s in [&mut on_a, &mut on_b] {
        assert_eq!(s.recv_type("DECISION")["seq"], 1);
    }

    let port = redis.stop();
    wait_pubsub(&a, "down");
    wait_pubsub(&b, "down");
    // Committed and acknowledged without a seq: Redis numbers it when it is back.
    producer.send(ingest(decisions, "d2", common::decision("acme")));
    let stored = ack(&mut producer);
    assert_eq!(
        (&stored["seq"], &stored["dedup"]),
        (&Value::Null, &json!(false))
    );
    let id = stored["decisionId"].clone();
    // Each node delivers its own publishes to its own subscribers, and only those.
    for (node, name) in [(&a, "from a"), (&b, "from b")] {
        let mut publisher = node.client(&format!("/ws?key={ADMIN}"));
        publisher.send(json!({"type":"PUBLISH","channel":usage,"data":name,"id":1}));
        assert_eq!(ack(&mut publisher)["local"], true);
    }
    for (s, name) in [(&mut on_a, "from a"), (&mut on_b, "from b")] {
        assert_eq!(s.recv()["event"], "channel_reset");
        assert_eq!(message(s), (usage.to_owned(), 1, json!(name)));
    }

    // Back, empty (nothing on disk): the decision is numbered after the stored ones and
    // delivered on both nodes once; plain channels start again under a new epoch.
    let _redis = common::OwnRedis::start_on(test, port).expect("redis-server started before");
    for s in [&mut on_a, &mut on_b] {
        let decision = loop {
            let v = s.recv();
            assert_ne!(v["event"], "messages_lost", "nothing was lost: {v}");
            if v["type"] == "DECISION" {
                break v;
            }
        };
        assert_eq!(
            (&decision["seq"], &decision["data"]["id"]),
            (&json!(2), &id)
        );
    }
    assert_eq!(stored_seq(&db, "d2"), 2);
    producer.send(ingest(decisions, "d2", common::decision("acme")));
    let again = ack(&mut producer);
    assert_eq!(
        (&again["seq"], &again["dedup"], &again["decisionId"]),
        (&json!(2), &json!(true), &id)
    );
    let mut publisher = b.client(&format!("/ws?key={ADMIN}"));
    publisher.send(json!({"type":"PUBLISH","channel":usage,"data":"across","id":2}));
    ack(&mut publisher);
    for s in [&mut on_a, &mut on_b] {
        assert_eq!(message(s).2, "across", "delivered across nodes again");
    }
}

/// What a subscriber may see of one channel: within each numbering (epoch), every seq once
/// and in order, unless it was told which were lost.
#[derive(Default)]
struct Numbering {
    next: Option<u64>,
    epochs: usize,
    heard: HashSet<(usize, u64)>,
}

impl Numbering {
    fn see(&mut self, v: &Value) {
        match (v["type"].as_str(), v["event"].as_str()) {
            (Some("SYSTEM"), Some("channel_reset")) => {
                self.epochs += 1;
                self.next = None;
            }
            (Some("SYSTEM"), Some("messages_lost")) => {
                let (from, to) = (v["from"].as_u64().unwrap(), v["to"].as_u64().unwrap());
                assert!(
                    self.next.is_none_or(|n| n == from),
                    "lost {v} after {:?}",
                    self.next
                );
                self.next = Some(to + 1);
            }
            (Some("MESSAGE"), _) => {
                let seq = v["seq"].as_u64().expect("seq");
                assert!(
                    self.next.is_none_or(|n| n == seq),
                    "{v}: expected seq {:?}, nothing said of those between",
                    self.next
                );
                assert!(self.heard.insert((self.epochs, seq)), "{v} twice");
                self.next = Some(seq + 1);
            }
            _ => {}
        }
    }
}

#[test]
fn redis_restarted_mid_run_loses_no_subscription_and_skips_nothing_in_silence() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;
    let test = "nodes_redis_restarted_mid_run";
    let Some(redis) = common::OwnRedis::start(test) else {
        return;
    };
    let (url, prefix) = (redis.url(), fresh_prefix("midrun"));
    let nodes = [node(&url, &prefix, 2), node(&url, &prefix, 2)];
    for n in &nodes {
        n.wait_ready();
    }
    let channel = "org:acme:usage";
    let readers: Vec<_> = nodes
        .iter()
        .flat_map(|n| [n.client_on(ADMIN, 0), n.client_on(ADMIN, 1)])
        .map(|mut client| {
            client.subscribe(&[channel]);
            std::thread::spawn(move || {
                let (mut numbering, mut last) = (Numbering::default(), HashSet::new());
                while last.len() < 2 {
                    let v = client.recv();
                    numbering.see(&v);
                    if let Some(n) = v["data"]["last"].as_u64() {
                        last.insert(n);
                    }
                }
                (numbering.heard.len(), numbering.epochs)
            })
        })
        .collect();
    let (answered, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            let mut client = node.client(&format!("/ws?key={ADMIN}"));
            let (answered, stop) = (Arc::clone(&answered), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Relaxed) {
                    i += 1;
                    let data = json!({"node": n, "i": i});
                    client.send(json!({"type":"PUBLISH","channel":channel,"data":data,"id":i}));
                    // An ACK, or (the moment Redis goes) cluster_unavailable.
                    let answer = loop {
                        let v = client.recv();
                        if v["type"] == "ACK" || v["type"] == "ERROR" {
                            break v;
                        }
                    };
                    if answer["type"] == "ERROR" {
                        assert_eq!(answer["code"], "cluster_unavailable", "{answer}");
                    }
                    answered.fetch_add(1, Relaxed);
                }
                client
            })
        })
        .collect();
    let wait_answers = |more: u64| {
        let target = answered.load(Relaxed) + more;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while answered.load(Relaxed) < target {
            assert!(std::time::Instant::now() < deadline, "publishers stalled");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };
    wait_answers(100);
    let port = redis.stop();
    for n in &nodes {
        wait_pubsub(n, "down");
    }
    wait_answers(100);
    let _redis = common::OwnRedis::start_on(test, port).expect("redis-server started before");
    for n in &nodes {
        n.wait_ready();
    }
    wait_answers(100);
    stop.store(true, Relaxed);
    for (n, publisher) in publishers.into_iter().enumerate() {
        let mut client = publisher.join().expect("publisher");
        let data = json!({"last": n});
        client.send(json!({"type":"PUBLISH","channel":channel,"data":data,"id":"last"}));
        let last = ack(&mut client);
        assert_eq!(last["local"], Value::Null, "through Redis again: {last}");
    }
    for reader in readers {
        let (heard, resets) = reader.join().expect("subscriber");
        println!(
            "a subscriber heard {heard} messages in {} numberings",
            resets + 1
        );
        assert!(heard > 100, "{heard} messages");
        // Redis lost the channel: told at least once that its numbering started again.
        assert!(resets >= 1, "{resets} resets");
    }
}
