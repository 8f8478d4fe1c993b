//! Presence and exclusive sessions across two nodes through Redis (docs/CLUSTER.md): JOIN,
//! STATUS and LEAVE between nodes, PRESENCE paging over every node's members, members of a
//! node killed with -9 leaving within the TTL; an exclusive session moving to the newest
//! connection on whatever node, "reject" across nodes, two connects at once on two nodes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A node of 2 shards on Redis `url` under `prefix`, with presence and sessions TTLs short
/// enough for a test, and an exclusive key.
fn node(url: &str, prefix: &str, more: &str) -> Server {
    let extra = format!(
        r#"
{more}
{EXCLUSIVE_KEY}
[cluster]
redis_url = "{url}"
prefix = "{prefix}"

[storage]
url = "memory"
"#
    );
    Server::start_with(2, &extra)
}

/// Two nodes under a fresh prefix, or `None` when Redis is not here.
fn two_nodes(test: &str, more: &str) -> Option<(Server, Server)> {
    let url = redis_url(test)?;
    let prefix = format!("sctest.{test}.{}.{}", std::process::id(), unix_now());
    let nodes = (node(&url, &prefix, more), node(&url, &prefix, more));
    // As a load balancer would: each node listens to its channel in Redis (where kill
    // switches come) once it is ready.
    for n in [&nodes.0, &nodes.1] {
        n.wait_health("pubsub up", |h| h["cluster"]["redis"][0]["pubsub"] == "up");
    }
    Some(nodes)
}

/// Every member PRESENCE pages through, by connection id, and the first page's counts.
fn all_members(client: &mut Client, channel: &str) -> (Vec<String>, Value) {
    let (mut ids, mut cursor, mut first) = (Vec::new(), None::<String>, None);
    loop {
        let page = client.presence(channel, cursor.as_deref());
        for m in page["members"].as_array().expect("members") {
            ids.push(m["connectionId"].as_str().expect("id").to_owned());
        }
        let counts = json!({"total":page["total"],"users":page["users"]});
        first.get_or_insert(counts);
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    ids.sort();
    (ids, first.unwrap_or_default())
}

/// The next JOIN, LEAVE or STATUS a client hears of another connection, as (type,
/// connection id, all of it). (Its own JOIN may come before or after its SUBSCRIBED: in a
/// cluster SUBSCRIBED waits for Redis.)
fn change(client: &mut Client) -> (String, String, Value) {
    loop {
        let v = client.recv();
        let kind = v["type"].as_str().unwrap_or_default();
        let id = v["member"]["connectionId"].as_str().unwrap_or_default();
        if ["JOIN", "LEAVE", "STATUS"].contains(&kind) && id != client.connection_id {
            return (kind.to_owned(), id.to_owned(), v);
        }
    }
}

#[test]
fn members_on_two_nodes_see_each_other_and_a_killed_node_leaves_within_the_ttl() {
    let Some((a, b)) = two_nodes(
        "cluster_presence_members",
        "[presence]\nttl_ms = 1500\nmax_members = 2\n",
    ) else {
        return;
    };
    let channel = "org:acme:usage";
    let mut ann = a.client(&format!("/ws?key={ADMIN}"));
    ann.join_presence(channel);

    let mut bob = b.client(&format!("/ws?key={ACME}"));
    bob.join_presence(channel);
    let (kind, id, joined) = change(&mut ann);
    assert_eq!(
        (kind.as_str(), id.as_str()),
        ("JOIN", bob.connection_id.as_str())
    );
    assert_eq!(joined["member"]["user"], "acme-key", "{joined}");

    bob.send(json!({"type":"STATUS","status":"busy","meta":{"doc":"q3"}}));
    let (kind, id, status) = change(&mut ann);
    assert_eq!(
        (kind.as_str(), id.as_str()),
        ("STATUS", bob.connection_id.as_str())
    );
    assert_eq!(status["member"]["meta"], json!({"doc":"q3"}), "{status}");

    // Two more on B: four members, three users, two a page, from either node.
    let mut carol = b.client(&format!("/ws?key={ACME}"));
    carol.join_presence(channel);
    let mut dave = b.client(&format!("/ws?key={ACME_READONLY}"));
    dave.join_presence(channel);
    for _ in 0..2 {
        assert_eq!(change(&mut ann).0, "JOIN");
    }
    let mut everyone = vec![
        ann.connection_id.clone(),
        bob.connection_id.clone(),
        carol.connection_id.clone(),
        dave.connection_id.clone(),
    ];
    everyone.sort();
    for asker in [&mut ann, &mut carol] {
        let (ids, counts) = all_members(asker, channel);
        assert_eq!(ids, everyone);
        assert_eq!(counts, json!({"total":4,"users":3}));
    }

    // A close is a LEAVE at once.
    drop(dave);
    let (kind, _, left) = change(&mut ann);
    assert_eq!(kind, "LEAVE", "{left}");

    // B killed: its members leave once Redis has not heard from it for the TTL.
    let mut gone = [bob.connection_id.clone(), carol.connection_id.clone()];
    gone.sort();
    let mut b = b;
    b.child.kill().expect("kill -9");
    b.wait_exit();
    let killed = Instant::now();
    let mut left: Vec<String> = (0..2)
        .map(|_| {
            let (kind, id, v) = change(&mut ann);
            assert_eq!(kind, "LEAVE", "{v}");
            id
        })
        .collect();
    left.sort();
    assert_eq!(left, gone);
    // The TTL, a refresh of the node that notices, and room for a slow machine; not the
    // client's read timeout.
    assert!(
        killed.elapsed() < Duration::from_millis(3 * 1500),
        "LEAVE within the TTL: {:?}",
        killed.elapsed()
    );
    let (ids, counts) = all_members(&mut ann, channel);
    assert_eq!(ids, [ann.connection_id.clone()]);
    assert_eq!(counts, json!({"total":1,"users":1}));
}

#[test]
fn an_exclusive_session_moves_to_the_newest_connection_on_either_node() {
    let Some((a, b)) = two_nodes("cluster_sessions_replace", "") else {
        return;
    };
    let path = format!("/ws?key={SOLO}");
    let mut first = a.client(&path);
    let mut second = b.client(&path);
    first.expect_replaced();
    second.ping();
    // Back to A, on the shard the first one had or not.
    let mut third = a.client(&path);
    second.expect_replaced();
    third.ping();
    b.wait_metric("shardcast_session_kill_latency_seconds_count", 1);
    a.wait_metric("shardcast_session_kill_latency_seconds_count", 1);
    // Another session name, and keys that are not exclusive, are left alone.
    let mut tab = b.client(&format!("{path}&session=tab2"));
    let mut shared = [
        a.client(&format!("/ws?key={ADMIN}")),
        b.client(&format!("/ws?key={ADMIN}")),
    ];
    for client in shared.iter_mut().chain([&mut third, &mut tab]) {
        client.ping();
    }
}

#[test]
fn with_policy_reject_a_newcomer_on_another_node_gets_4402() {
    let Some((a, b)) = two_nodes(
        "cluster_sessions_reject",
        "[sessions]\npolicy = \"reject\"\n",
    ) else {
        return;
    };
    let path = format!("/ws?key={SOLO}");
    let mut first = a.client(&path);
    let mut refused = Client::connect(b.addr, &path).expect("upgrade");
    assert_eq!(refused.recv_close(), Some(4402), "no READY, refused");
    first.ping();
    // Once the first is gone, the session is free on the other node too.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut next = Client::connect(b.addr, &path).expect("upgrade");
        let v = next.recv_close_or_text();
        if v.as_ref().is_ok_and(|t| t["type"] == "READY") {
            next.ping();
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {v:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_connections_at_once_on_two_nodes_leave_exactly_one() {
    let Some((a, b)) = two_nodes("cluster_sessions_race", "") else {
        return;
    };
    for round in 0..5 {
        let path = format!("/ws?key={SOLO}&session=race{round}");
        let racers: Vec<_> = [a.addr, b.addr]
            .into_iter()
            .map(|addr| {
                let path = path.clone();
                std::thread::spawn(move || Client::connect(addr, &path).expect("connect"))
            })
            .collect();
        let mut clients: Vec<Client> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        // One is replaced, on whichever node, possibly after its READY and a PONG.
        let deadline = Instant::now() + WAIT;
        let replaced = |n: &Server| n.metric("shardcast_sessions_replaced_total");
        while replaced(&a) + replaced(&b) < round + 1 {
            assert!(Instant::now() < deadline, "round {round}: nobody replaced");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The loser was told (possibly before its READY: the kill switch and the answer to
        // its claim come from Redis on two connections); the other answers.
        let mut survivors = 0;
        for client in &mut clients {
            // The loser's socket may be closed already: a failed send is its answer.
            let ping = json!({"type":"PING","timestamp":"t"}).to_string();
            let _ = client.ws.send(tungstenite::Message::text(ping));
            let mut seen = Vec::new();
            let end = loop {
                match client.recv_close_or_text() {
                    Ok(v) if v["type"] == "PONG" => break None,
                    Ok(v) => seen.push(v),
                    Err(code) => break Some(code),
                }
            };
            let told = seen.iter().any(|v| v["event"] == "session_replaced");
            match end {
                None => {
                    assert!(!told, "replaced yet answering: {seen:?}");
                    survivors += 1;
                }
                Some(code) => {
                    assert!(told, "closed without being told: {seen:?}");
                    assert_eq!(code, Some(4408));
                }
            }
        }
        assert_eq!(survivors, 1, "round {round}");
    }
}

#[test]
fn while_redis_is_down_sessions_and_presence_are_the_nodes_own_then_redis_decides_again() {
    let test = "cluster_presence_redis_down";
    let Some(redis) = OwnRedis::start(test) else {
        return;
    };
    let prefix = format!("sctest.{test}.{}.{}", std::process::id(), unix_now());
    let a = node(&redis.url(), &prefix, "[presence]\nttl_ms = 1500\n");
    let pubsub = |state: &'static str| {
        a.wait_health(state, move |h| h["cluster"]["redis"][0]["pubsub"] == state);
    };
    pubsub("up");
    let port = redis.stop();
    pubsub("down");
    // Decided on the node: READY, and the newest wins.
    let path = format!("/ws?key={SOLO}");
    let mut first = a.client(&path);
    let mut second = a.client(&path);
    first.expect_replaced();
    second.ping();
    // Presence from the node's own members.
    let channel = "org:acme:usage";
    let mut ann = a.client(&format!("/ws?key={ADMIN}"));
    ann.join_presence(channel);
    let (ids, counts) = all_members(&mut ann, channel);
    assert_eq!(ids, [ann.connection_id.clone()]);
    assert_eq!(counts, json!({"total":1,"users":1}));

    // Redis back, empty: the node puts its holder's lock and its members there again (the
    // refresh when PUB/SUB is back), and a newcomer replaces the holder through Redis.
    let redis = OwnRedis::start_on(test, port).expect("Redis again");
    pubsub("up");
    let keys = shardcast::cluster::Keys::new(&prefix);
    let mut conn = redis::Client::open(redis.url().as_str())
        .and_then(|c| c.get_connection())
        .expect("Redis");
    let deadline = Instant::now() + WAIT;
    loop {
        let lock: Option<String> = redis::cmd("GET")
            .arg(keys.session("acme\0solo\0"))
            .query(&mut conn)
            .expect("GET");
        let member: bool = redis::cmd("HEXISTS")
            .arg(&keys.presence(channel)[0])
            .arg(&ann.connection_id)
            .query(&mut conn)
            .expect("HEXISTS");
        if lock.as_deref() == Some(second.connection_id.as_str()) && member {
            break;
        }
        assert!(Instant::now() < deadline, "lock {lock:?}, member {member}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ids, _) = all_members(&mut ann, channel);
    assert_eq!(ids, [ann.connection_id.clone()]);
    let mut third = a.client(&path);
    second.expect_replaced();
    third.ping();
}
