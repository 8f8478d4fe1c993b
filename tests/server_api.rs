//! The HTTP server API's writes against a real server: `POST /api/publish`,
//! `/api/publish/batch` and `/api/ingest`, with good, bad and missing credentials, and what
//! WebSocket subscribers receive.

mod common;

use common::{
    channels_owned_by_each_shard, decision, http_request, ingest, jwt, post, Server, ACME,
    ACME_READONLY, ADMIN,
};
use serde_json::{json, Value};

const USAGE: &str = "org:acme:usage";
const DECISIONS: &str = "org:acme:decisions";

/// The next MESSAGE `client` receives on `channel`: (seq, data).
fn message(client: &mut common::Client, channel: &str) -> (u64, Value) {
    let m = client.recv_type("MESSAGE");
    assert_eq!(m["channel"], channel, "{m}");
    (m["seq"].as_u64().expect("seq"), m["data"].clone())
}

#[test]
fn http_publishes_are_numbered_with_websocket_ones_and_reach_subscribers() {
    let server = Server::start("");
    // One channel owned by each shard: the request's shard numbers it, or the owner does.
    for channel in channels_owned_by_each_shard("usage") {
        let mut subscriber = server.client(&format!("/ws?key={ADMIN}"));
        subscriber.subscribe(&[&channel]);
        let mut publisher = server.client(&format!("/ws?key={ADMIN}"));
        publisher.send(json!({"type":"PUBLISH","channel":channel,"data":"ws","id":"p"}));
        assert_eq!(publisher.recv_type("ACK")["seq"], 1);

        let data = json!({"n": 1.50, "s": "é"});
        let body = json!({"channel": channel, "data": data});
        let (status, answer) = post(server.addr, "/api/publish", ADMIN, &body);
        assert_eq!((status, &answer), (200, &json!({"seq": 2})));
        assert_eq!(message(&mut subscriber, &channel), (1, json!("ws")));
        assert_eq!(message(&mut subscriber, &channel), (2, data));
    }
    // The data is relayed byte for byte, as a WebSocket PUBLISH's.
    let mut subscriber = server.client(&format!("/ws?key={ACME}"));
    subscriber.subscribe(&[USAGE]);
    let raw = r#"{"channel":"org:acme:usage","data":{ "x" : 1.50 }}"#;
    let headers = format!("X-API-Key: {ACME}\r\n");
    let (status, _) = http_request(server.addr, "POST", "/api/publish", &headers, raw);
    assert_eq!(status, 200);
    let text = loop {
        match subscriber.ws.read().expect("read") {
            tungstenite::Message::Text(t) if t.contains("MESSAGE") => break t,
            _ => continue,
        }
    };
    assert!(text.contains(r#""data":{ "x" : 1.50 }"#), "{text}");
}

#[test]
fn a_retried_idempotency_key_gets_the_original_seq_and_is_not_delivered_twice() {
    let server = Server::start("");
    let mut subscriber = server.client(&format!("/ws?key={ACME}"));
    subscriber.subscribe(&[USAGE]);
    let keyed = json!({"channel": USAGE, "data": "once", "idempotencyKey": "k-1"});
    let (status, first) = post(server.addr, "/api/publish", ACME, &keyed);
    assert_eq!((status, &first), (200, &json!({"seq": 1})));
    let (_, again) = post(server.addr, "/api/publish", ACME, &keyed);
    assert_eq!(again, first, "a retry is answered with the original seq");
    // The WebSocket PUBLISH takes the same keys.
    let mut publisher = server.client(&format!("/ws?key={ACME}"));
    let ws =
        json!({"type":"PUBLISH","channel":USAGE,"data":"once","idempotencyKey":"k-1","id":"r"});
    publisher.send(ws);
    assert_eq!(publisher.recv_type("ACK")["seq"], 1);
    // A key is the channel's: the same key on another channel is another message.
    let other = json!({"channel": "org:acme:notifications", "data": 0, "idempotencyKey": "k-1"});
    assert_eq!(post(server.addr, "/api/publish", ACME, &other).1["seq"], 1);
    let (_, next) = post(
        server.addr,
        "/api/publish",
        ACME,
        &json!({"channel": USAGE, "data": "next"}),
    );
    assert_eq!(next["seq"], 2);
    assert_eq!(message(&mut subscriber, USAGE), (1, json!("once")));
    assert_eq!(
        message(&mut subscriber, USAGE),
        (2, json!("next")),
        "no second copy"
    );
    assert_eq!(
        server.wait_metric("shardcast_publish_duplicates_total", 2),
        2
    );
}

#[test]
fn writes_need_credentials_and_rights_on_the_channel() {
    let server = Server::start("");
    let body = json!({"channel": USAGE, "data": 1});
    let send = |headers: &str| {
        let (status, text) = http_request(
            server.addr,
            "POST",
            "/api/publish",
            headers,
            &body.to_string(),
        );
        let v: Value = serde_json::from_str(&text).expect("JSON error");
        (status, v["error"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(send(""), (401, "missing_credentials".into()));
    assert_eq!(send("X-API-Key: nope\r\n"), (401, "invalid_key".into()));
    let expired = format!("Authorization: Bearer {}\r\n", jwt(-3600, &["publish"]));
    assert_eq!(send(&expired), (401, "token_expired".into()));
    let readonly = format!("X-API-Key: {ACME_READONLY}\r\n");
    assert_eq!(send(&readonly), (403, "forbidden".into()));
    let token = format!("Authorization: Bearer {}\r\n", jwt(3600, &["publish"]));
    assert_eq!(send(&token).0, 200, "a JWT with the publish scope");
    // Another org's channel: refused to acme's key, allowed to the admin key.
    let beta = json!({"channel": "org:beta:usage", "data": 1});
    let (status, refused) = post(server.addr, "/api/publish", ACME, &beta);
    assert_eq!(
        (status, refused["error"].as_str()),
        (403, Some("forbidden"))
    );
    assert_eq!(post(server.addr, "/api/publish", ADMIN, &beta).0, 200);
    let other_org = json!({"channel": "org:beta:decisions", "schema": "decision.v1",
        "idempotencyKey": "x", "data": decision("beta")});
    assert_eq!(post(server.addr, "/api/ingest", ACME, &other_org).0, 403);
}

#[test]
fn bad_bodies_get_a_coded_error_and_change_nothing() {
    let server = Server::start("[http]\nmax_body_bytes = 4096\n");
    let key = format!("X-API-Key: {ACME}\r\n");
    let json_key = format!("{key}Content-Type: application/json\r\n");
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("/api/publish", &json_key, "{not json", 400, "bad_request"),
        ("/api/publish", &json_key, "[1]", 400, "bad_request"),
        (
            "/api/publish",
            &json_key,
            r#"{"channel":"org:acme:usage"}"#,
            400,
            "bad_request",
        ),
        (
            "/api/publish",
            &json_key,
            r#"{"channel":"nope","data":1}"#,
            400,
            "invalid_channel",
        ),
        (
            "/api/publish",
            &json_key,
            r#"{"channel":"org:acme:usage","data":1,"data":2}"#,
            400,
            "bad_request",
        ),
        ("/api/publish", &json_key, "", 400, "bad_request"),
        (
            "/api/publish",
            &format!("{key}Content-Type: text/plain\r\n"),
            r#"{"channel":"org:acme:usage","data":1}"#,
            415,
            "unsupported_media_type",
        ),
        (
            "/api/publish/batch",
            &json_key,
            r#"{"messages":[]}"#,
            400,
            "bad_request",
        ),
        (
            "/api/publish/batch",
            &json_key,
            r#"{"messages":{}}"#,
            400,
            "bad_request",
        ),
        (
            "/api/ingest",
            &json_key,
            r#"{"channel":"org:acme:decisions"}"#,
            400,
            "bad_request",
        ),
        (
            "/api/ingest",
            &json_key,
            r#"{"channel":"org:acme:decisions","schema":"v0","idempotencyKey":"k","data":{}}"#,
            400,
            "invalid_decision",
        ),
    ];
    for (path, headers, body, status, code) in cases {
        let (got, text) = http_request(server.addr, "POST", path, headers, body);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            (got, v["error"].as_str()),
            (*status, Some(*code)),
            "{body}: {v}"
        );
        assert!(v["message"].is_string(), "{v}");
    }
    let big = format!(
        r#"{{"channel":"org:acme:usage","data":"{}"}}"#,
        "x".repeat(5000)
    );
    let (status, text) = http_request(server.addr, "POST", "/api/publish", &json_key, &big);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    let (status, text) = http_request(server.addr, "GET", "/api/publish", &key, "");
    assert_eq!(status, 405, "{text}");
    // None of it was published: the channel's first message is numbered 1.
    let (_, first) = post(
        server.addr,
        "/api/publish",
        ACME,
        &json!({"channel": USAGE, "data": 1}),
    );
    assert_eq!(first["seq"], 1);
}

#[test]
fn a_batch_is_answered_in_order_and_published_in_order() {
    let server = Server::start("");
    let mut subscriber = server.client(&format!("/ws?key={ACME}"));
    subscriber.subscribe(&[USAGE]);
    let body = json!({"messages": [
        {"channel": USAGE, "data": 1},
        {"channel": "org:beta:usage", "data": 2},
        {"channel": USAGE, "data": 3, "idempotencyKey": "b"},
        {"channel": USAGE},
        {"channel": USAGE, "data": 3, "idempotencyKey": "b"},
        {"channel": USAGE, "data": 4},
    ]});
    let (status, answer) = post(server.addr, "/api/publish/batch", ACME, &body);
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 6);
    assert_eq!(results[0], json!({"seq": 1}));
    assert_eq!(results[1]["error"], "forbidden");
    assert_eq!(results[2], json!({"seq": 2}));
    assert_eq!(results[3]["error"], "bad_request");
    assert_eq!(results[4], json!({"seq": 2}), "the same key, the same seq");
    assert_eq!(results[5], json!({"seq": 3}));
    for (seq, data) in [(1, 1), (2, 3), (3, 4)] {
        assert_eq!(message(&mut subscriber, USAGE), (seq, json!(data)));
    }
}

/// The body of `POST /api/ingest` for `key` with acme's decision.
fn decision_body(key: &str) -> Value {
    let mut body = ingest(DECISIONS, key, decision("acme"));
    body.as_object_mut().expect("object").remove("type");
    body
}

#[test]
fn ingest_is_durable_deduplicated_across_a_restart_and_delivered() {
    let server = Server::start("");
    let mut subscriber = server.client(&format!("/ws?key={ACME}"));
    subscriber.subscribe(&[DECISIONS]);
    let (status, ack) = post(server.addr, "/api/ingest", ACME, &decision_body("d-1"));
    assert_eq!(status, 200, "{ack}");
    assert_eq!((&ack["type"], &ack["id"]), (&json!("ACK"), &json!("d-1")));
    assert_eq!((&ack["dedup"], &ack["seq"]), (&json!(false), &json!(1)));
    let id = ack["decisionId"].as_str().expect("decisionId").to_string();
    let delivered = subscriber.recv_type("DECISION");
    assert_eq!(
        (&delivered["seq"], &delivered["data"]["id"]),
        (&json!(1), &json!(id))
    );
    // The same ACK as a WebSocket INGEST of the same key.
    let mut producer = server.client(&format!("/ws?key={ACME}"));
    producer.send(ingest(DECISIONS, "d-1", decision("acme")));
    let ws_ack = producer.recv_type("ACK");
    let (_, retry) = post(server.addr, "/api/ingest", ACME, &decision_body("d-1"));
    assert_eq!(retry, ws_ack);
    assert_eq!(
        (&retry["dedup"], &retry["decisionId"]),
        (&json!(true), &json!(id))
    );
    drop((subscriber, producer));

    // Killed with nothing flushed: what was acknowledged was committed.
    let server = server.kill_and_restart();
    let (status, after) = post(server.addr, "/api/ingest", ACME, &decision_body("d-1"));
    assert_eq!(status, 200, "{after}");
    assert_eq!(
        (&after["dedup"], &after["decisionId"], &after["seq"]),
        (&json!(true), &json!(id), &json!(1))
    );
    let (_, next) = post(server.addr, "/api/ingest", ACME, &decision_body("d-2"));
    assert_eq!((&next["dedup"], &next["seq"]), (&json!(false), &json!(2)));
    // Another org's decision on acme's channel is not a decision of acme's.
    let mut foreign = decision_body("d-3");
    foreign["data"]["orgId"] = json!("beta");
    let (status, refused) = post(server.addr, "/api/ingest", ACME, &foreign);
    assert_eq!(
        (status, refused["error"].as_str()),
        (400, Some("invalid_decision"))
    );
}

#[test]
fn ingest_without_a_store_is_503_storage_unavailable() {
    // A PostgreSQL nobody listens on: the server starts, and refuses decisions.
    let server = Server::start("[storage]\nurl = \"postgres://postgres@127.0.0.1:1/test\"\n");
    let (status, refused) = post(server.addr, "/api/ingest", ACME, &decision_body("d-1"));
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"], "storage_unavailable");
    // Publishing needs no store.
    let (status, _) = post(
        server.addr,
        "/api/publish",
        ACME,
        &json!({"channel": USAGE, "data": 1}),
    );
    assert_eq!(status, 200);
}

/// A connection with a token for `user` of `org` (subscribe scope).
fn user_client(server: &Server, user: &str, org: &str) -> common::Client {
    let exp = common::unix_now() + 3600;
    let token = common::jwt_with(json!({"sub": user, "org": org, "exp": exp}));
    server.client(&format!("/ws?token={token}"))
}

/// Connections of `user` of `org` until there are at least `n` and both shards have one.
fn user_clients(server: &Server, user: &str, org: &str, n: usize) -> Vec<common::Client> {
    let mut clients: Vec<common::Client> = Vec::new();
    while clients.len() < n
        || clients.iter().map(|c| c.shard).min() == clients.iter().map(|c| c.shard).max()
    {
        clients.push(user_client(server, user, org));
        assert!(clients.len() < 200, "connections all land on one shard");
    }
    clients
}

/// `client` receives nothing before the answer to a PING.
fn nothing_for(client: &mut common::Client) {
    client.send(json!({"type":"PING","timestamp":"quiet"}));
    let next = client.recv();
    assert_eq!(
        (&next["type"], &next["timestamp"]),
        (&json!("PONG"), &json!("quiet")),
        "{next}"
    );
}

#[test]
fn a_message_to_a_user_reaches_each_of_its_connections_once_on_every_shard() {
    let server = Server::start("");
    let mut u1 = user_clients(&server, "u1", "acme", 3);
    // One of them subscribed to the channel: it gets the message once, as a subscriber.
    u1[0].subscribe(&["user:u1:notifications"]);
    let mut u1_beta = user_client(&server, "u1", "beta");
    let mut u2 = user_client(&server, "u2", "acme");

    let body = json!({"data": {"title": "done"}, "event": "notification"});
    let (status, sent) = post(server.addr, "/api/users/u1/send", ACME, &body);
    assert_eq!(status, 200, "{sent}");
    let expected = json!({"user": "u1", "channel": "user:u1:notifications", "seq": 1,
        "reached": u1.len(), "queued": false});
    assert_eq!(
        sent, expected,
        "acme's key reaches u1's connections in acme only"
    );
    let (_, second) = post(server.addr, "/api/users/u1/send", ACME, &json!({"data": 2}));
    assert_eq!(second["seq"], 2);
    for client in &mut u1 {
        let (seq, data) = message(client, "user:u1:notifications");
        assert_eq!(
            (seq, data),
            (
                1,
                json!({"event": "notification", "payload": {"title": "done"}})
            )
        );
        assert_eq!(
            message(client, "user:u1:notifications"),
            (2, json!(2)),
            "no second copy"
        );
    }
    nothing_for(&mut u1_beta);
    nothing_for(&mut u2);

    // An admin key reaches every org's; a category names another of the user's channels.
    let body = json!({"data": 3, "category": "usage"});
    let (_, sent) = post(server.addr, "/api/users/u1/send", ADMIN, &body);
    assert_eq!(
        (&sent["channel"], &sent["reached"]),
        (&json!("user:u1:usage"), &json!(u1.len() + 1))
    );
    assert_eq!(message(&mut u1_beta, "user:u1:usage"), (1, json!(3)));
    // Nobody connected: nobody reached.
    let (_, nobody) = post(
        server.addr,
        "/api/users/nobody/send",
        ACME,
        &json!({"data": 0}),
    );
    assert_eq!(nobody["reached"], 0);

    // Who may send: not a user's token, not a key without publish.
    let (status, _) = post(server.addr, "/api/users/u1/send", ACME_READONLY, &body);
    assert_eq!(status, 403);
    let headers = format!("Authorization: Bearer {}\r\n", jwt(3600, &["publish"]));
    let (status, _) = http_request(
        server.addr,
        "POST",
        "/api/users/u1/send",
        &headers,
        &body.to_string(),
    );
    assert_eq!(status, 403);
    let (status, bad) = post(server.addr, "/api/users/u%20x/send", ACME, &body);
    assert_eq!(
        (status, bad["error"].as_str()),
        (400, Some("invalid_channel"))
    );
    let (status, bad) = post(
        server.addr,
        "/api/users/u1/send",
        ACME,
        &json!({"data": 1, "category": "nope"}),
    );
    assert_eq!(
        (status, bad["error"].as_str()),
        (400, Some("invalid_channel"))
    );

    // Many users at once, answered in order.
    let body = json!({"users": ["u1", "u2", "nobody", "bad user"], "data": "all"});
    let (status, bulk) = post(server.addr, "/api/users/send", ACME, &body);
    assert_eq!(status, 200, "{bulk}");
    let results = bulk["results"].as_array().expect("results");
    assert_eq!(
        (
            &results[0]["user"],
            &results[0]["seq"],
            &results[0]["reached"]
        ),
        (&json!("u1"), &json!(3), &json!(u1.len()))
    );
    assert_eq!(
        (&results[1]["user"], &results[1]["reached"]),
        (&json!("u2"), &json!(1))
    );
    assert_eq!(results[2]["reached"], 0);
    assert_eq!(
        (&results[3]["user"], &results[3]["error"]),
        (&json!("bad user"), &json!("invalid_channel"))
    );
    assert_eq!(bulk["reached"], u1.len() + 1);
    assert_eq!(message(&mut u2, "user:u2:notifications"), (1, json!("all")));
}

#[test]
fn a_broadcast_reaches_every_connection_of_the_org_or_all() {
    let server = Server::start("");
    let mut acme = vec![
        server.client(&format!("/ws?key={ACME}")),
        user_client(&server, "u1", "acme"),
    ];
    let mut others = vec![
        user_client(&server, "u9", "beta"),
        server.client(&format!("/ws?key={ADMIN}")),
    ];
    let (status, answer) = post(
        server.addr,
        "/api/broadcast",
        ACME,
        &json!({"data": {"m": "hi"}}),
    );
    assert_eq!((status, answer), (200, json!({"reached": 2})));
    for client in &mut acme {
        let told = client.recv();
        assert_eq!(
            told,
            json!({"type": "SYSTEM", "event": "broadcast", "data": {"m": "hi"}})
        );
    }
    for client in &mut others {
        nothing_for(client);
    }
    let (_, all) = post(server.addr, "/api/broadcast", ADMIN, &json!({"data": 1}));
    assert_eq!(all["reached"], 4);
    let (_, beta) = post(
        server.addr,
        "/api/broadcast",
        ADMIN,
        &json!({"data": 1, "org": "beta"}),
    );
    assert_eq!(beta["reached"], 1);
    let (status, _) = post(
        server.addr,
        "/api/broadcast",
        ACME,
        &json!({"data": 1, "org": "beta"}),
    );
    assert_eq!(status, 403);
    let (status, _) = post(server.addr, "/api/broadcast", ACME, &json!({"org": "acme"}));
    assert_eq!(status, 400);
}

/// GET `path` with API key `key`: status and JSON.
fn get(server: &Server, path: &str, key: &str) -> (u16, Value) {
    let (status, text) = common::http_get(server.addr, path, &format!("X-API-Key: {key}\r\n"));
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {text:?}: {e}")),
    )
}

/// DELETE `path` with API key `key`: status and JSON.
fn delete(server: &Server, path: &str, key: &str) -> (u16, Value) {
    let headers = format!("X-API-Key: {key}\r\n");
    let (status, text) = http_request(server.addr, "DELETE", path, &headers, "");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {text:?}: {e}")),
    )
}

#[test]
fn connections_are_listed_by_page_and_closed_with_the_code_asked() {
    let server = Server::start("");
    let mut keyed: Vec<_> = (0..5)
        .map(|_| server.client(&format!("/ws?key={ACME}")))
        .collect();
    keyed[0].subscribe(&[USAGE, "org:acme:decisions"]);
    keyed[1].subscribe(&[USAGE]);
    let mut u1 = user_clients(&server, "u1", "acme", 2);
    u1[0].subscribe(&["user:u1:notifications"]);
    let mut beta = user_client(&server, "u9", "beta");
    let acme_ids: std::collections::BTreeSet<String> = keyed
        .iter()
        .chain(&u1)
        .map(|c| c.connection_id.clone())
        .collect();

    // Pages of 2 over both shards: every acme connection once, none of beta's.
    let mut seen = Vec::new();
    let mut path = "/api/connections?limit=2".to_string();
    loop {
        let (status, page) = get(&server, &path, ACME);
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["totals"]["connections"], acme_ids.len(), "{page}");
        assert_eq!(page["totals"]["orgs"], json!({"acme": acme_ids.len()}));
        let conns = page["connections"].as_array().expect("connections");
        assert!(conns.len() <= 2);
        for c in conns {
            assert_eq!(c["org"], "acme");
            assert!(
                c["remoteAddress"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:")),
                "{c}"
            );
            seen.push(c["connectionId"].as_str().expect("id").to_string());
        }
        match page["nextCursor"].as_str() {
            Some(cursor) => path = format!("/api/connections?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    let unique: std::collections::BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no connection twice");
    assert_eq!(unique, acme_ids);
    let (_, all) = get(&server, "/api/connections", ADMIN);
    let total = acme_ids.len() + 1;
    assert_eq!(all["totals"]["connections"], total);
    assert_eq!(
        all["totals"]["orgs"],
        json!({"acme": acme_ids.len(), "beta": 1})
    );
    let by_shard: u64 = all["totals"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(by_shard, total as u64);
    let (_, mine) = get(&server, "/api/connections?user=u1", ADMIN);
    assert_eq!(mine["connections"].as_array().unwrap().len(), u1.len());
    let (status, _) = get(&server, "/api/connections?org=beta", ACME);
    assert_eq!(status, 403);
    let (status, _) = get(&server, "/api/connections", ACME_READONLY);
    assert_eq!(status, 403);

    let (_, status_u1) = get(&server, "/api/users/u1", ACME);
    assert_eq!(status_u1["online"], true);
    assert_eq!(status_u1["connections"].as_array().unwrap().len(), u1.len());
    assert_eq!(status_u1["channels"], json!(["user:u1:notifications"]));

    let (_, channels) = get(&server, "/api/channels", ACME);
    assert_eq!(
        channels["channels"],
        json!([
            {"channel": "org:acme:decisions", "subscribers": 1},
            {"channel": "org:acme:usage", "subscribers": 2},
        ]),
        "acme's channels only"
    );
    let (_, first) = get(&server, "/api/channels?limit=1", ADMIN);
    assert_eq!(first["nextCursor"], "org:acme:decisions");
    let (_, users) = get(&server, "/api/channels?prefix=user:", ADMIN);
    assert_eq!(
        users["channels"],
        json!([{"channel": "user:u1:notifications", "subscribers": 1}])
    );

    // By id, with a code and reason; then gone.
    let id = keyed[2].connection_id.clone();
    let (status, closed) = delete(
        &server,
        &format!("/api/connections/{id}?code=4000&reason=bye"),
        ACME,
    );
    assert_eq!((status, closed), (200, json!({"closed": 1})));
    assert_eq!(keyed[2].recv_close(), Some(4000));
    let (status, gone) = delete(&server, &format!("/api/connections/{id}"), ACME);
    assert_eq!((status, gone["error"].as_str()), (404, Some("not_found")));
    let (status, _) = delete(
        &server,
        &format!("/api/connections/{}", beta.connection_id),
        ACME,
    );
    assert_eq!(
        status, 404,
        "another org's connection is not acme's to close"
    );
    let (status, _) = delete(&server, &format!("/api/connections/{id}?code=999"), ACME);
    assert_eq!(status, 400);
    // By user, on every shard.
    let (_, closed) = delete(&server, "/api/users/u1/connections?code=4001", ACME);
    assert_eq!(closed, json!({"closed": u1.len()}));
    for client in &mut u1 {
        assert_eq!(client.recv_close(), Some(4001));
    }
    let (_, status_u1) = get(&server, "/api/users/u1", ACME);
    assert_eq!(
        (&status_u1["online"], &status_u1["connections"]),
        (&json!(false), &json!([]))
    );
    nothing_for(&mut beta);
    nothing_for(&mut keyed[0]);
}

const TOKENS_KEY: &str = "acme-tokens-secret";

/// A server with, besides the usual keys, acme's key that may issue tokens.
fn token_server() -> Server {
    Server::start(&format!(
        "[[api_keys]]\nid = \"acme-tokens\"\nsecret = \"{TOKENS_KEY}\"\norg = \"acme\"\nscopes = [\"tokens\"]\n"
    ))
}

/// Issue a token with `key`: (status, answer).
fn issue(server: &Server, key: &str, body: Value) -> (u16, Value) {
    post(server.addr, "/api/tokens", key, &body)
}

/// The token of a successful issue.
fn token_of(answer: &Value) -> String {
    answer["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"))
        .to_string()
}

#[test]
fn an_issued_token_connects_with_exactly_its_rights() {
    let server = token_server();
    let body = json!({"sub": "u5", "scopes": ["subscribe", "publish"],
        "channels": ["org:acme:usage", "user:u5:*"], "expiresIn": 60});
    let (status, answer) = issue(&server, TOKENS_KEY, body.clone());
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["expiresAt"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{answer}"
    );
    let mut client = server.client(&format!("/ws?token={}", token_of(&answer)));
    client.subscribe(&[USAGE, "user:u5:notifications"]);
    client.send(json!({"type":"SUB","channels":["org:acme:decisions"],"id":"d"}));
    assert_eq!(
        client.recv_type("ERROR")["code"],
        "forbidden",
        "not in its channels"
    );
    client.send(json!({"type":"PUBLISH","channel":USAGE,"data":1,"id":"p"}));
    assert_eq!(client.recv_type("ACK")["seq"], 1);
    client.send(ingest(USAGE, "k", decision("acme")));
    assert_eq!(
        client.recv_type("ERROR")["code"],
        "forbidden",
        "no ingest scope"
    );
    let (_, status_u5) = get(&server, "/api/users/u5", ACME);
    assert_eq!(status_u5["online"], true);

    // A tokens key: its own org, the three client scopes, nothing more.
    let (status, _) = issue(
        &server,
        TOKENS_KEY,
        json!({"sub": "u5", "org": "beta", "scopes": ["subscribe"], "expiresIn": 60}),
    );
    assert_eq!(status, 403);
    let (status, _) = issue(
        &server,
        TOKENS_KEY,
        json!({"sub": "u5", "scopes": ["admin"], "expiresIn": 60}),
    );
    assert_eq!(status, 403);
    let (status, _) = issue(&server, ACME, body.clone());
    assert_eq!(status, 403, "publish is not the tokens scope");
    let (status, answer) = issue(
        &server,
        ADMIN,
        json!({"sub": "u5", "org": "beta", "scopes": ["subscribe"], "expiresIn": 60}),
    );
    assert_eq!(status, 200, "an admin key issues for any org");
    let mut beta = server.client(&format!("/ws?token={}", token_of(&answer)));
    beta.subscribe(&["org:beta:usage"]);
    for (bad, why) in [
        (json!({"scopes": ["subscribe"], "expiresIn": 60}), "no sub"),
        (
            json!({"sub": "a b", "scopes": ["subscribe"], "expiresIn": 60}),
            "bad sub",
        ),
        (
            json!({"sub": "u5", "scopes": ["fly"], "expiresIn": 60}),
            "unknown scope",
        ),
        (
            json!({"sub": "u5", "scopes": ["subscribe"], "expiresIn": 0}),
            "no life",
        ),
        (
            json!({"sub": "u5", "scopes": ["subscribe"], "expiresIn": 99999999}),
            "too long",
        ),
        (
            json!({"sub": "u5", "scopes": ["subscribe"], "expiresIn": 60, "channels": ["nope"]}),
            "bad channel",
        ),
        (
            json!({"sub": "u5", "scopes": ["subscribe"], "expiresIn": 60, "session": "shared"}),
            "bad session",
        ),
    ] {
        let (status, answer) = issue(&server, TOKENS_KEY, bad);
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("bad_request")),
            "{why}: {answer}"
        );
    }
}

/// Connect with `token` and expect the server to close with 4403 (refused).
fn refused(server: &Server, token: &str) {
    let mut client =
        common::Client::connect(server.addr, &format!("/ws?token={token}")).expect("upgrade");
    assert_eq!(client.recv_close(), Some(4403));
}

#[test]
fn a_revoked_token_is_refused_and_its_connections_closed_even_after_a_restart() {
    let server = token_server();
    let body = json!({"sub": "u6", "scopes": ["subscribe"], "expiresIn": 600});
    let (_, first) = issue(&server, TOKENS_KEY, body.clone());
    let (_, second) = issue(&server, TOKENS_KEY, body.clone());
    let (a, b) = (token_of(&first), token_of(&second));
    let mut on_a = server.client(&format!("/ws?token={a}"));
    let mut on_b = server.client(&format!("/ws?token={b}"));

    let revoke = json!({"jti": first["jti"]});
    let (status, answer) = post(server.addr, "/api/tokens/revoke", TOKENS_KEY, &revoke);
    assert_eq!(
        (status, answer),
        (200, json!({"revoked": true, "closed": 1}))
    );
    assert_eq!(on_a.recv_close(), Some(4403));
    refused(&server, &a);
    nothing_for(&mut on_b);
    server.wait_metric("shardcast_auth_failures_total{reason=\"token_revoked\"}", 1);
    drop(on_b);

    // Kept in the store: refused after a restart too.
    let server = server.kill_and_restart();
    refused(&server, &a);
    let mut on_b = server.client(&format!("/ws?token={b}"));

    // By user: every token issued so far, live or not; the ones issued after still work.
    let (status, answer) = post(
        server.addr,
        "/api/tokens/revoke",
        ADMIN,
        &json!({"sub": "u6"}),
    );
    assert_eq!(
        (status, answer),
        (200, json!({"revoked": true, "closed": 1}))
    );
    assert_eq!(on_b.recv_close(), Some(4403));
    refused(&server, &b);
    // Tokens carry their issue time in whole seconds: one issued in the revocation's second
    // counts as revoked, so wait for the next.
    let second_now = common::unix_now();
    while common::unix_now() == second_now {
        std::thread::yield_now();
    }
    let (_, later) = issue(&server, TOKENS_KEY, body);
    server.client(&format!("/ws?token={}", token_of(&later)));

    let (status, _) = post(
        server.addr,
        "/api/tokens/revoke",
        ACME,
        &json!({"sub": "u6"}),
    );
    assert_eq!(status, 403);
    let (status, _) = post(
        server.addr,
        "/api/tokens/revoke",
        TOKENS_KEY,
        &json!({"sub": "u6", "org": "beta"}),
    );
    assert_eq!(status, 403);
    let (status, _) = post(
        server.addr,
        "/api/tokens/revoke",
        TOKENS_KEY,
        &json!({"jti": "x", "sub": "u6"}),
    );
    assert_eq!(status, 400);
}

#[test]
fn messages_to_a_user_not_connected_wait_for_it_in_order_and_survive_a_restart() {
    let server = Server::start("[offline]\nenabled = true\nmax_messages = 3\n");
    for n in 1..=4 {
        let (status, sent) = post(server.addr, "/api/users/u7/send", ACME, &json!({"data": n}));
        assert_eq!(status, 200, "{sent}");
        assert_eq!(
            (&sent["seq"], &sent["reached"], &sent["queued"]),
            (&json!(n), &json!(0), &json!(true))
        );
    }
    // At most 3 per user: the oldest went.
    let (_, queue) = get(&server, "/api/users/u7/queue", ACME);
    let seqs: Vec<u64> = queue["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3, 4], "{queue}");
    assert_eq!(queue["messages"][0]["data"], 2);
    assert_eq!(queue["messages"][0]["channel"], "user:u7:notifications");
    server.wait_metric("shardcast_offline_dropped_total", 1);
    assert_eq!(server.wait_metric("shardcast_offline_messages", 3), 3);

    // Killed: what was kept is in the store.
    let server = server.kill_and_restart();
    let (_, queue) = get(&server, "/api/users/u7/queue", ACME);
    assert_eq!(queue["messages"].as_array().unwrap().len(), 3, "{queue}");
    // Another org's key sees none of acme's.
    let (status, _) = get(&server, "/api/users/u7/queue", ACME_READONLY);
    assert_eq!(status, 403);

    // Delivered in order when the user connects, before what is sent after.
    let mut u7 = user_client(&server, "u7", "acme");
    let (_, live) = post(
        server.addr,
        "/api/users/u7/send",
        ACME,
        &json!({"data": "live"}),
    );
    // The owner may not have heard of the new connection yet: then the message is kept
    // (the oldest giving way, at most 3 per user) and comes right after the others; either
    // way in order, numbered after what was kept before the restart.
    let now = (&live["reached"], &live["queued"]);
    let first = if now == (&json!(1), &json!(false)) {
        2
    } else {
        assert_eq!(now, (&json!(0), &json!(true)), "{live}");
        3
    };
    for n in first..=4 {
        assert_eq!(message(&mut u7, "user:u7:notifications"), (n, json!(n)));
    }
    assert_eq!(
        message(&mut u7, "user:u7:notifications"),
        (5, json!("live"))
    );
    let (_, queue) = get(&server, "/api/users/u7/queue", ACME);
    assert_eq!(queue["messages"], json!([]));
    server.wait_metric("shardcast_offline_delivered_total", 3);
    let deadline = std::time::Instant::now() + common::WAIT;
    while server.metric("shardcast_offline_messages") != 0 {
        assert!(std::time::Instant::now() < deadline, "the gauge stays up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(u7);

    // Deleted through the API: nothing is delivered.
    let mut sent = json!(null);
    for _ in 0..50 {
        // Until the owner has heard that u7's connection is gone.
        sent = post(
            server.addr,
            "/api/users/u7/send",
            ACME,
            &json!({"data": "late"}),
        )
        .1;
        if sent["queued"] == true {
            break;
        }
    }
    assert_eq!(sent["queued"], true, "{sent}");
    let (status, deleted) = delete(&server, "/api/users/u7/queue", ACME);
    assert_eq!(
        (status, deleted["deleted"].as_u64().map(|n| n >= 1)),
        (200, Some(true))
    );
    let mut u7 = user_client(&server, "u7", "acme");
    nothing_for(&mut u7);
}

#[test]
fn without_offline_delivery_a_message_to_nobody_is_not_kept_and_expired_ones_go() {
    let server = Server::start("");
    let (_, sent) = post(server.addr, "/api/users/u8/send", ACME, &json!({"data": 1}));
    assert_eq!(
        (&sent["reached"], &sent["queued"]),
        (&json!(0), &json!(false))
    );
    drop(server);
    let server = Server::start("[offline]\nenabled = true\nttl_secs = 1\n");
    let (_, sent) = post(server.addr, "/api/users/u8/send", ACME, &json!({"data": 1}));
    assert_eq!(sent["queued"], true);
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let (_, queue) = get(&server, "/api/users/u8/queue", ACME);
        if queue["messages"] == json!([]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never expired: {queue}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut u8 = user_client(&server, "u8", "acme");
    nothing_for(&mut u8);
}

#[test]
fn a_user_that_has_just_connected_gets_what_is_sent_at_once() {
    // Its shard tells the owner of the user's channels of it over the mesh: a send that
    // reaches the owner first still finds the connection.
    let server = Server::start("");
    for n in 0..20 {
        let user = format!("fresh{n}");
        let mut client = user_client(&server, &user, "acme");
        let path = format!("/api/users/{user}/send");
        let (_, sent) = post(server.addr, &path, ACME, &json!({"data": n}));
        assert_eq!(sent["reached"], 1, "{sent}");
        let channel = format!("user:{user}:notifications");
        assert_eq!(message(&mut client, &channel).1, json!(n));
    }
}

#[test]
fn revocations_in_force_are_bounded() {
    let server = Server::start("[auth]\nmax_revocations = 2\n");
    for jti in ["a", "b"] {
        let (status, _) = post(
            server.addr,
            "/api/tokens/revoke",
            ADMIN,
            &json!({"jti": jti}),
        );
        assert_eq!(status, 200);
    }
    let (status, refused) = post(
        server.addr,
        "/api/tokens/revoke",
        ADMIN,
        &json!({"jti": "c"}),
    );
    assert_eq!(
        (status, refused["error"].as_str()),
        (503, Some("overloaded"))
    );
}
