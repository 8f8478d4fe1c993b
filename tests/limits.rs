//! Limits over many connections (per API key, per org) and on channels: each refused with its
//! code, each counted in /metrics by name.

mod common;

use common::*;
use serde_json::json;

/// A PING's answer: PONG, or the refusal's code.
fn ping(c: &mut Client) -> String {
    c.send(json!({"type":"PING"}));
    let v = c.recv_type_of(&["PONG", "ERROR"]);
    match v["type"].as_str() {
        Some("PONG") => "PONG".into(),
        _ => v["code"].as_str().unwrap_or_default().into(),
    }
}

fn refusals(server: &Server, limit: &str, min: u64) -> u64 {
    server.wait_metric(
        &format!("shardcast_limit_refusals_total{{limit=\"{limit}\"}}"),
        min,
    )
}

#[test]
fn a_keys_rate_counts_all_its_connections_and_not_other_keys() {
    // One shard: its share is the whole rate.
    let server = Server::start_with(
        1,
        "[limits]\nkey_messages_per_second = 1\nkey_message_burst = 3\n",
    );
    let mut a = server.client(&format!("/ws?key={ACME}"));
    let mut b = server.client(&format!("/ws?key={ACME}"));
    assert_eq!(ping(&mut a), "PONG");
    assert_eq!(ping(&mut b), "PONG");
    assert_eq!(ping(&mut a), "PONG");
    // The key's burst of 3 is spent, by both connections together.
    c_refused(&mut b);
    // Another key of the same org has its own bucket.
    let mut other = server.client(&format!("/ws?key={ACME_READONLY}"));
    assert_eq!(ping(&mut other), "PONG");
    assert_eq!(refusals(&server, "key_messages_per_second", 1), 1);
}

fn c_refused(c: &mut Client) {
    c.send(json!({"type":"PING"}));
    let v = c.recv_type_of(&["PONG", "ERROR"]);
    assert_eq!(v["code"], "rate_limited", "{v}");
    assert!(
        v["retryAfterMs"].as_u64().is_some_and(|ms| ms <= 1_000),
        "{v}"
    );
}

#[test]
fn an_orgs_rate_counts_all_its_keys_and_an_org_may_have_its_own() {
    let server = Server::start_with(
        1,
        "[limits]\norg_messages_per_second = 1\norg_message_burst = 2\n\
         [limits.orgs.ops]\nmessages_per_second = 1000\n",
    );
    let mut a = server.client(&format!("/ws?key={ACME}"));
    let mut b = server.client(&format!("/ws?key={ACME_READONLY}"));
    assert_eq!(ping(&mut a), "PONG");
    assert_eq!(ping(&mut b), "PONG");
    c_refused(&mut a);
    c_refused(&mut b);
    // Org "ops" (the admin key) has 1,000 a second of its own.
    let mut admin = server.client(&format!("/ws?key={ADMIN}"));
    for _ in 0..20 {
        assert_eq!(ping(&mut admin), "PONG");
    }
    assert_eq!(refusals(&server, "org_messages_per_second", 2), 2);
}

#[test]
fn the_server_api_gets_429_with_retry_after_over_a_keys_rate() {
    let server = Server::start_with(
        1,
        "[limits]\nkey_messages_per_second = 1\nkey_message_burst = 1\n",
    );
    let body = json!({"channel":"org:acme:usage","data":{"n":1}}).to_string();
    let headers = format!("X-API-Key: {ACME}\r\nContent-Type: application/json\r\n");
    let first = http_response(server.addr, "POST", "/api/publish", &headers, &body);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let second = http_response(server.addr, "POST", "/api/publish", &headers, &body);
    assert!(second.starts_with("HTTP/1.1 429"), "{second}");
    assert!(second.contains("Retry-After: 1\r\n"), "{second}");
    assert!(second.contains(r#""error":"rate_limited""#), "{second}");
    // The key's WebSocket connections share the same bucket.
    let mut c = server.client(&format!("/ws?key={ACME}"));
    c_refused(&mut c);
}

#[test]
fn an_org_past_its_max_connections_gets_429_until_one_closes() {
    let server = Server::start(
        "[limits]\norg_max_connections = 2\n[limits.orgs.ops]\nmax_connections = 1\n",
    );
    let mut a = server.client(&format!("/ws?key={ACME}"));
    let _b = server.client(&format!("/ws?key={ACME_READONLY}"));
    let over = |secret: &str| match Client::connect(server.addr, &format!("/ws?key={secret}")) {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            let body = response.body().as_deref().unwrap_or_default();
            assert!(String::from_utf8_lossy(body).contains("too_many_connections"));
            true
        }
        Ok(_) => false,
        Err(e) => panic!("{e}"),
    };
    // Both shards count the org's connections together.
    assert!(over(ACME));
    let _admin = server.client(&format!("/ws?key={ADMIN}"));
    assert!(over(ADMIN), "ops may hold 1");
    assert_eq!(refusals(&server, "org_max_connections", 2), 2);
    // One acme connection goes: another may come (once the server has seen it go).
    a.ws.close(None).unwrap();
    assert_eq!(a.recv_close(), Some(1000));
    let deadline = std::time::Instant::now() + WAIT;
    while over(ACME) {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection still counts"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_channel_past_its_max_subscribers_refuses_the_next_subscriber() {
    let server = Server::start_with(1, "[limits]\nmax_subscribers_per_channel = 2\n");
    let mut subs: Vec<Client> = (0..2)
        .map(|_| {
            let mut c = server.client(&format!("/ws?key={ACME}"));
            c.subscribe(&["org:acme:usage"]);
            c
        })
        .collect();
    let mut third = server.client(&format!("/ws?key={ACME}"));
    third.send(json!({"type":"SUB","channels":["org:acme:usage","org:acme:decisions"],"id":"s"}));
    let refused = third.recv_type("ERROR");
    assert_eq!(refused["code"], "too_many_subscribers", "{refused}");
    assert_eq!(refused["channel"], "org:acme:usage");
    // The other channel of the same SUB was taken.
    let subscribed = third.recv_type("SUBSCRIBED");
    assert_eq!(subscribed["channels"], json!(["org:acme:decisions"]));
    // A subscriber leaving makes room.
    subs[0].send(json!({"type":"UNSUB","channels":["org:acme:usage"],"id":"u"}));
    subs[0].recv_type("UNSUBSCRIBED");
    third.subscribe(&["org:acme:usage"]);
    assert_eq!(refusals(&server, "max_subscribers_per_channel", 1), 1);
}

#[test]
fn channel_lists_and_names_have_configured_bounds() {
    let server =
        Server::start("[limits]\nmax_channels_per_request = 2\n[channels]\nmax_name_bytes = 24\n");
    let mut c = server.client(&format!("/ws?key={ACME}"));
    let three = [
        "org:acme:usage",
        "org:acme:decisions",
        "org:acme:notifications",
    ];
    c.send(json!({"type":"SUB","channels":three,"id":"l"}));
    let refused = c.recv_type("ERROR");
    assert_eq!(refused["code"], "bad_request", "{refused}");
    assert_eq!(refused["id"], "l");
    c.send(json!({"type":"UNSUB","channels":three,"id":"u"}));
    assert_eq!(c.recv_type("ERROR")["code"], "bad_request");
    // 25 bytes: over the name bound, though a valid name otherwise.
    let long = "org:acme:notifications";
    let longer = format!("{long}xyz");
    c.send(json!({"type":"PUBLISH","channel":longer,"data":1,"id":"p"}));
    let refused = c.recv_type("ERROR");
    assert_eq!(refused["code"], "invalid_channel", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("24 bytes"),
        "{refused}"
    );
    c.subscribe(&["org:acme:usage", long]);
    assert_eq!(refusals(&server, "max_channels_per_request", 2), 2);
    assert_eq!(refusals(&server, "max_channel_name_bytes", 1), 1);
}
