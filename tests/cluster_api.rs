//! The server API across two nodes through Redis: broadcasts, messages to a user and
//! disconnects reach the other node's connections, and a token revoked on one node is refused
//! and closed on the other.

mod common;

use common::*;
use serde_json::{json, Value};

/// A node of 2 shards on Redis `url` under `prefix`, with `extra` configuration.
fn node(url: &str, prefix: &str, extra: &str) -> Server {
    Server::start_with(
        2,
        &format!("[cluster]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\n\n[storage]\nurl = \"memory\"\n{extra}"),
    )
}

/// Two nodes under a fresh prefix, each hearing Redis, or `None` when Redis is not here.
fn two_nodes(test: &str) -> Option<(Server, Server)> {
    two_nodes_with(test, "").map(|(a, b, _)| (a, b))
}

/// [`two_nodes`] with `extra` configuration, and the Redis URL and the prefix.
fn two_nodes_with(test: &str, extra: &str) -> Option<(Server, Server, (String, String))> {
    let url = redis_url(test)?;
    let prefix = format!("sctest.{test}.{}.{}", std::process::id(), unix_now());
    let nodes = (node(&url, &prefix, extra), node(&url, &prefix, extra));
    for n in [&nodes.0, &nodes.1] {
        n.wait_health("pubsub up", |h| h["cluster"]["redis"][0]["pubsub"] == "up");
    }
    Some((nodes.0, nodes.1, (url, prefix)))
}

/// A connection of `user` of org acme, with a token.
fn user_client(server: &Server, user: &str) -> Client {
    let token = jwt_with(
        json!({"sub": user, "org": "acme", "exp": unix_now() + 3600, "jti": format!("{user}-jti")}),
    );
    server.client(&format!("/ws?token={token}"))
}

#[test]
fn broadcasts_and_messages_to_a_user_reach_the_other_node() {
    let Some((a, b)) = two_nodes("cluster_api_send") else {
        return;
    };
    let mut on_a = user_client(&a, "u1");
    let mut on_b = user_client(&b, "u1");
    let (status, sent) = post(a.addr, "/api/broadcast", ACME, &json!({"data": {"m": 1}}));
    assert_eq!(
        (status, &sent["reached"]),
        (200, &json!(2)),
        "{sent}: both nodes' connections"
    );
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            client.recv(),
            json!({"type": "SYSTEM", "event": "broadcast", "data": {"m": 1}})
        );
    }
    for n in 1..=3 {
        let (status, sent) = post(a.addr, "/api/users/u1/send", ACME, &json!({"data": n}));
        assert_eq!(status, 200, "{sent}");
        assert_eq!(
            (&sent["seq"], &sent["reached"]),
            (&json!(n), &json!(2)),
            "{sent}"
        );
    }
    for client in [&mut on_a, &mut on_b] {
        for n in 1..=3 {
            let m = client.recv_type("MESSAGE");
            assert_eq!(
                (&m["channel"], &m["seq"], &m["data"]),
                (&json!("user:u1:notifications"), &json!(n), &json!(n))
            );
        }
    }
}

#[test]
fn disconnects_and_revocations_reach_the_other_node() {
    let Some((a, b)) = two_nodes("cluster_api_close") else {
        return;
    };
    // By user: both nodes' connections.
    let mut on_a = user_client(&a, "u2");
    let mut on_b = user_client(&b, "u2");
    let headers = format!("X-API-Key: {ACME}\r\n");
    let (status, text) = http_request(
        a.addr,
        "DELETE",
        "/api/users/u2/connections?code=4001",
        &headers,
        "",
    );
    assert_eq!((status, &*text), (200, r#"{"closed":2}"#));
    assert_eq!(on_a.recv_close(), Some(4001));
    assert_eq!(on_b.recv_close(), Some(4001));

    // By id: the node that has it closes it.
    let mut on_b = user_client(&b, "u3");
    let path = format!(
        "/api/connections/{}?code=4002&reason=moved",
        on_b.connection_id
    );
    let (status, text) = http_request(a.addr, "DELETE", &path, &headers, "");
    assert_eq!((status, &*text), (200, r#"{"closed":1}"#));
    assert_eq!(on_b.recv_close(), Some(4002));
    // Gone now, and a node that does not exist: nobody closes it.
    let (status, text) = http_request(a.addr, "DELETE", &path, &headers, "");
    assert_eq!(status, 404, "{text}");
    let (status, text) = http_request(a.addr, "DELETE", "/api/connections/abc-0-1", &headers, "");
    assert_eq!(status, 404, "{text}");

    // A token revoked on A: closed on B, and refused there from then on.
    let mut on_b = user_client(&b, "u4");
    let (status, revoked) = post(
        a.addr,
        "/api/tokens/revoke",
        ADMIN,
        &json!({"jti": "u4-jti"}),
    );
    assert_eq!((status, &revoked["closed"]), (200, &json!(1)), "{revoked}");
    assert_eq!(on_b.recv_close(), Some(4403));
    let token =
        jwt_with(json!({"sub": "u4", "org": "acme", "exp": unix_now() + 3600, "jti": "u4-jti"}));
    let mut again = Client::connect(b.addr, &format!("/ws?token={token}")).expect("upgrade");
    assert_eq!(again.recv_close(), Some(4403));
}

#[test]
fn connections_users_and_channels_are_answered_by_every_node() {
    let Some((a, b)) = two_nodes("cluster_api_list") else {
        return;
    };
    let mut q1_a = user_client(&a, "q1");
    q1_a.subscribe(&["org:acme:notifications"]);
    let mut q1_b = user_client(&b, "q1");
    q1_b.subscribe(&["org:acme:notifications", "org:acme:usage"]);
    let q2_b = user_client(&b, "q2");
    let key = format!("X-API-Key: {ACME}\r\n");
    let get = |path: &str| {
        let (status, text) = http_get(a.addr, path, &key);
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };

    let user = get("/api/users/q1");
    assert_eq!(user["online"], true, "{user}");
    let mut ids: Vec<&str> = user["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["connectionId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut expected = [q1_a.connection_id.as_str(), q1_b.connection_id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "{user}");
    assert_eq!(
        user["channels"],
        json!(["org:acme:notifications", "org:acme:usage"])
    );

    let channels = get("/api/channels?prefix=org:acme:");
    assert_eq!(
        channels,
        json!({"channels": [{"channel": "org:acme:notifications", "subscribers": 2},
            {"channel": "org:acme:usage", "subscribers": 1}], "nextCursor": null})
    );
    let first = get("/api/channels?prefix=org:acme:&limit=1");
    assert_eq!(first["nextCursor"], "org:acme:notifications", "{first}");
    let second = get("/api/channels?prefix=org:acme:&limit=1&cursor=org:acme:notifications");
    assert_eq!(
        second["channels"][0]["channel"], "org:acme:usage",
        "{second}"
    );
    assert_eq!(second["nextCursor"], Value::Null, "{second}");

    // Every connection once, a page of one at a time, across both nodes.
    let all = get("/api/connections");
    assert_eq!(all["totals"]["connections"], 3, "{all}");
    assert_eq!(all["totals"]["orgs"]["acme"], 3, "{all}");
    let per_node: Vec<u64> = all["totals"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(per_node.iter().sum::<u64>(), 3, "{all}");
    assert_eq!(per_node.len(), 2, "{all}");
    let mut seen = Vec::new();
    let mut path = "/api/connections?limit=1".to_owned();
    loop {
        let page = get(&path);
        let conns = page["connections"].as_array().unwrap();
        assert_eq!(conns.len(), 1, "{page}");
        seen.push(conns[0]["connectionId"].as_str().unwrap().to_owned());
        match page["nextCursor"].as_str() {
            Some(next) => path = format!("/api/connections?limit=1&cursor={next}"),
            None => break,
        }
    }
    let mut expected: Vec<String> = [&q1_a, &q1_b, &q2_b]
        .iter()
        .map(|c| c.connection_id.clone())
        .collect();
    expected.sort_unstable();
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected, "each connection once: {seen:?}");
}

#[test]
fn messages_to_one_user_from_two_nodes_arrive_in_seq_order_everywhere() {
    let Some((a, b)) = two_nodes("cluster_api_order") else {
        return;
    };
    let mut on_a = user_client(&a, "o1");
    let mut on_b = user_client(&b, "o1");
    const EACH: usize = 40;
    let senders: Vec<_> = [a.addr, b.addr]
        .into_iter()
        .map(|addr| {
            std::thread::spawn(move || {
                for n in 0..EACH {
                    let (status, sent) =
                        post(addr, "/api/users/o1/send", ACME, &json!({"data": n}));
                    assert_eq!((status, &sent["reached"]), (200, &json!(2)), "{sent}");
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    // Neither connection subscribes to the user's channel: both get every message from
    // the control channel, in the order Redis numbered them.
    for client in [&mut on_a, &mut on_b] {
        let seqs: Vec<u64> = (0..2 * EACH)
            .map(|_| client.recv_type("MESSAGE")["seq"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=2 * EACH as u64).collect();
        assert_eq!(seqs, expected);
    }
}

#[test]
fn messages_to_a_user_connected_nowhere_wait_in_redis_for_any_node() {
    let offline = "[offline]\nenabled = true\nmax_messages = 3\n";
    let Some((a, b, (url, prefix))) = two_nodes_with("cluster_api_offline", offline) else {
        return;
    };
    let send = |node: &Server, n: u64| {
        let (status, sent) = post(node.addr, "/api/users/w1/send", ACME, &json!({"data": n}));
        assert_eq!(status, 200, "{sent}");
        sent
    };
    // Kept, the oldest dropped past max_messages, whichever node they are sent to.
    for n in 1..=4 {
        let sent = send(if n % 2 == 0 { &a } else { &b }, n);
        assert_eq!(
            (&sent["reached"], &sent["queued"]),
            (&json!(0), &json!(true)),
            "{sent}"
        );
    }
    let key = format!("X-API-Key: {ACME}\r\n");
    let (status, text) = http_get(a.addr, "/api/users/w1/queue", &key);
    assert_eq!(status, 200, "{text}");
    let queue: Value = serde_json::from_str(&text).unwrap();
    let kept: Vec<&Value> = queue["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(kept, [&json!(2), &json!(3), &json!(4)], "{queue}");

    // The user connects to B: what was kept first, in order, then what is sent after.
    let mut on_b = user_client(&b, "w1");
    for n in 2..=4 {
        let m = on_b.recv_type("MESSAGE");
        assert_eq!(
            (&m["channel"], &m["seq"], &m["data"]),
            (&json!("user:w1:notifications"), &json!(n), &json!(n)),
            "{m}"
        );
    }
    let sent = send(&a, 5);
    assert_eq!(
        (&sent["reached"], &sent["queued"]),
        (&json!(1), &json!(false)),
        "{sent}"
    );
    assert_eq!(on_b.recv_type("MESSAGE")["seq"], 5);
    let (_, text) = http_get(a.addr, "/api/users/w1/queue", &key);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["messages"],
        json!([]),
        "{text}"
    );

    // Gone from every node: kept again once B has said so in Redis.
    drop(on_b);
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let online = format!("{prefix}.online.w1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while redis::cmd("HLEN")
        .arg(&online)
        .query::<u64>(&mut redis)
        .unwrap()
        > 0
    {
        assert!(std::time::Instant::now() < deadline, "B never said w1 left");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let sent = send(&b, 6);
    assert_eq!(sent["queued"], true, "{sent}");
    let headers = format!("X-API-Key: {ACME}\r\n");
    let (status, text) = http_request(b.addr, "DELETE", "/api/users/w1/queue", &headers, "");
    assert_eq!((status, &*text), (200, r#"{"deleted":1}"#));
    let (_, text) = http_get(a.addr, "/api/users/w1/queue", &key);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["messages"],
        json!([]),
        "{text}"
    );
}

#[test]
fn what_is_kept_in_redis_expires_and_gives_its_room_back() {
    let config = "[offline]\nenabled = true\nttl_secs = 1\n\n[presence]\nttl_ms = 600\n";
    let Some((a, _b, (url, prefix))) = two_nodes_with("cluster_api_expiry", config) else {
        return;
    };
    for n in 1..=2 {
        let (status, sent) = post(a.addr, "/api/users/x1/send", ACME, &json!({"data": n}));
        assert_eq!((status, &sent["queued"]), (200, &json!(true)), "{sent}");
    }
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let queued = format!("{prefix}.queued");
    let bytes = |redis: &mut redis::Connection| -> u64 {
        redis::cmd("HGET")
            .arg(&queued)
            .arg("*")
            .query::<Option<u64>>(redis)
            .unwrap()
            .unwrap_or(0)
    };
    assert!(bytes(&mut redis) > 0);
    // The nodes' refreshes (every 200 ms here) drop them once their second is up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while bytes(&mut redis) > 0 {
        assert!(std::time::Instant::now() < deadline, "never expired");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let queue = format!("{prefix}.queue.x1");
    assert_eq!(
        redis::cmd("EXISTS")
            .arg(&queue)
            .query::<u64>(&mut redis)
            .unwrap(),
        0
    );
    let due = format!("{prefix}.queues");
    assert_eq!(
        redis::cmd("ZCARD")
            .arg(&due)
            .query::<u64>(&mut redis)
            .unwrap(),
        0
    );
    let key = format!("X-API-Key: {ACME}\r\n");
    let (_, text) = http_get(a.addr, "/api/users/x1/queue", &key);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["messages"],
        json!([]),
        "{text}"
    );
}

/// Both nodes have heard each other in the census of key and org limits.
fn census_done(a: &Server, b: &Server) {
    for n in [a, b] {
        n.wait_metric("shardcast_census_nodes", 2);
    }
}

#[test]
fn a_keys_rate_and_an_orgs_connections_are_shared_across_nodes() {
    let extra = "[limits]\nkey_messages_per_second = 2\nkey_message_burst = 2\n\
                 org_max_connections = 3\n";
    let Some((a, b, _)) = two_nodes_with("census", extra) else {
        return;
    };
    let mut on_a = a.client(&format!("/ws?key={ACME}"));
    let mut on_b = b.client(&format!("/ws?key={ACME}"));
    census_done(&a, &b);
    // The key has a session on each node: each node's part of its 2 a second (burst 2)
    // is 1, where alone it would have had both.
    for c in [&mut on_a, &mut on_b] {
        c.send(json!({"type":"PING"}));
        assert_eq!(c.recv_type_of(&["PONG", "ERROR"])["type"], "PONG");
        c.send(json!({"type":"PING"}));
        let refused = c.recv_type_of(&["PONG", "ERROR"]);
        assert_eq!(refused["code"], "rate_limited", "{refused}");
    }
    // Org acme holds 2 of its 3 connections; a third on A makes 3 in all.
    let _third = a.client(&format!("/ws?key={ACME_READONLY}"));
    // Once the census has it, a fourth is refused on B, which holds only one itself.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match Client::connect(b.addr, &format!("/ws?key={ACME_READONLY}")) {
            Err(tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 429);
                break;
            }
            Ok(mut extra) => {
                // Not heard yet: let it go and ask again.
                extra.ws.close(None).unwrap();
                assert_eq!(extra.recv_close(), Some(1000));
            }
            Err(e) => panic!("{e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never counted A's connections"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
