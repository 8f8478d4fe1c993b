//! Exclusive sessions on one node with 2 shards: one connection per user and session name,
//! the newest winning (or, with policy "reject", the first staying).

mod common;

use common::*;
use serde_json::json;

/// An exclusive API key, with `[sessions]` settings.
fn server(sessions: &str) -> Server {
    let extra = format!(
        r#"
[sessions]
{sessions}
{EXCLUSIVE_KEY}"#
    );
    Server::start_with(2, &extra)
}

#[test]
fn the_newest_connection_takes_the_session_on_any_shard() {
    let server = server("");
    let mut first = server.client_on(SOLO, 0);
    let mut second = server.client_on(SOLO, 1);
    first.expect_replaced();
    second.ping();
    // Another session name, and keys that are not exclusive, are left alone.
    let mut tab = server.client(&format!("/ws?key={SOLO}&session=tab2"));
    let (mut a, mut b) = (
        server.client(&format!("/ws?key={ADMIN}")),
        server.client(&format!("/ws?key={ADMIN}")),
    );
    for client in [&mut second, &mut tab, &mut a, &mut b] {
        client.ping();
    }
    // A token's claim makes it exclusive too.
    let token = |n: i64| {
        jwt_with(json!({"sub":"u1","org":"acme","exp":unix_now() + 600 + n,"session":"exclusive"}))
    };
    let mut web = server.client(&format!("/ws?token={}", token(0)));
    let mut newer = server.client(&format!("/ws?token={}", token(1)));
    web.expect_replaced();
    newer.ping();
    server.wait_metric("shardcast_sessions_replaced_total", 2);
}

#[test]
fn two_connections_at_once_leave_exactly_one() {
    let server = server("");
    let addr = server.addr;
    let racers: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, &format!("/ws?key={SOLO}")).expect("connect");
                let ready = c.recv();
                assert_eq!(ready["type"], "READY", "{ready}");
                c
            })
        })
        .collect();
    let mut clients: Vec<Client> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    // The one replaced is told; the other answers.
    let mut survivors = 0;
    for client in &mut clients {
        client.send(json!({"type":"PING","timestamp":"t"}));
        let v = client.recv();
        match v["type"].as_str() {
            Some("PONG") => survivors += 1,
            Some("SYSTEM") => {
                assert_eq!(v["event"], "session_replaced", "{v}");
                assert_eq!(client.recv_close(), Some(4408));
            }
            _ => panic!("{v}"),
        }
    }
    assert_eq!(survivors, 1);
}

#[test]
fn with_policy_reject_the_first_stays_and_the_newcomer_gets_4402() {
    let server = server(r#"policy = "reject""#);
    let mut first = server.client(&format!("/ws?key={SOLO}"));
    let mut refused = Client::connect(server.addr, &format!("/ws?key={SOLO}")).expect("upgrade");
    assert_eq!(refused.recv_close(), Some(4402), "no READY, refused");
    first.ping();
    server.wait_metric("shardcast_sessions_refused_total", 1);
    // Once the first is gone, the session is free again.
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut next = Client::connect(server.addr, &format!("/ws?key={SOLO}")).expect("upgrade");
        let v = next.recv_close_or_text();
        if v.as_ref().is_ok_and(|t| t["type"] == "READY") {
            next.ping();
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still refused: {v:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A session name over 64 bytes is refused at the upgrade.
    let long = "x".repeat(65);
    let (status, _) = http_get(server.addr, &format!("/ws?key={SOLO}&session={long}"), "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n");
    assert_eq!(status, 400);
}
