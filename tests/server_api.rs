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
