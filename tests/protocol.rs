//! The wire protocol as clients see it: auth, ingest, refusals, bad input.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;
use serde_json::json;

#[test]
fn ingest_acks_fans_out_and_deduplicates() {
    let server = Server::start("");
    let channel = "org:acme:decisions";
    let mut sub = server.client_on(ACME, 0);
    sub.subscribe(&[channel]);
    let mut producer = server.client_on(ACME, 1);

    producer.send(ingest(channel, "idem-1", decision("acme")));
    let ack = producer.recv();
    assert_eq!(ack["type"], "ACK", "{ack}");
    assert_eq!(ack["id"], "idem-1");
    assert_eq!(ack["dedup"], false);
    let decision_id = ack["decisionId"].as_str().unwrap().to_string();
    assert!(decision_id.starts_with("dec_"));

    let d = sub.recv();
    assert_eq!(d["type"], "DECISION");
    assert_eq!(d["channel"], channel);
    assert_eq!(d["seq"], ack["seq"]);
    assert_eq!(d["data"]["id"], decision_id.as_str());
    assert_eq!(d["data"]["orgId"], "acme");
    assert_eq!(d["data"]["tool"], "web.fetch");
    assert!(d["data"]["timestamp"].as_str().unwrap().ends_with('Z'));

    // The same key again, even from another connection: same id, dedup, no second DECISION.
    let mut again = server.client_on(ACME, 0);
    again.send(ingest(channel, "idem-1", decision("acme")));
    let dup = again.recv();
    assert_eq!(dup["dedup"], true, "{dup}");
    assert_eq!(dup["decisionId"], decision_id.as_str());
    assert_eq!(dup["seq"], ack["seq"]);
    // A marker published after the duplicate must be the subscriber's very next message.
    again.send(json!({"type":"PUBLISH","channel":channel,"data":"marker","id":"m"}));
    again.recv_type("ACK");
    let next = sub.recv();
    assert_eq!(next["data"], "marker", "a duplicate was fanned out: {next}");

    server.wait_health("decision counters", |h| {
        h["metrics"]["decisions"]["processed"] == 1 && h["metrics"]["decisions"]["duplicates"] == 1
    });
}

#[test]
fn invalid_decisions_are_refused_with_reasons() {
    let server = Server::start("");
    let channel = "org:acme:decisions";
    let mut c = server.client(&format!("/ws?key={ACME}"));
    let mut wrong_org = decision("acme");
    wrong_org["orgId"] = json!("globex");
    let mut bad_direction = decision("acme");
    bad_direction["direction"] = json!("sideways");
    let mut no_hash = decision("acme");
    no_hash.as_object_mut().unwrap().remove("payloadHash");
    for (data, field) in [
        (wrong_org, "orgId"),
        (bad_direction, "direction"),
        (no_hash, "payloadHash"),
    ] {
        c.send(ingest(channel, "k", data));
        let e = c.recv();
        assert_eq!(e["type"], "ERROR");
        assert_eq!(e["code"], "invalid_decision", "{e}");
        assert_eq!(e["id"], "k");
        assert!(e["message"].as_str().unwrap().contains(field), "{e}");
    }
    let mut wrong_schema = ingest(channel, "k2", decision("acme"));
    wrong_schema["schema"] = json!("decision.v0");
    c.send(wrong_schema);
    assert_eq!(c.recv()["code"], "invalid_decision");
    // A refused key was not remembered: it works once the decision is valid.
    c.send(ingest(channel, "k", decision("acme")));
    assert_eq!(c.recv()["dedup"], false);

    // Without the ingest scope, or on another org's channel: forbidden.
    let mut ro = server.client(&format!("/ws?key={ACME_READONLY}"));
    ro.send(ingest(channel, "k3", decision("acme")));
    let e = ro.recv();
    assert_eq!(e["code"], "forbidden", "{e}");
    c.send(ingest("org:globex:decisions", "k4", decision("globex")));
    assert_eq!(c.recv()["code"], "forbidden");
}

#[test]
fn forbidden_channel_keeps_connection_open() {
    let server = Server::start("");
    let mut c = server.client(&format!("/ws?key={ACME}"));
    c.send(
        json!({"type":"SUB","channels":["org:globex:decisions","org:acme:decisions"],"id":"s1"}),
    );
    let e = c.recv();
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["code"], "forbidden");
    assert_eq!(e["channel"], "org:globex:decisions");
    assert_eq!(e["id"], "s1");
    let ok = c.recv();
    assert_eq!(ok["type"], "SUBSCRIBED");
    assert_eq!(ok["channels"], json!(["org:acme:decisions"]));
    c.send(json!({"type":"SUB","channels":["nonsense"]}));
    assert_eq!(c.recv()["code"], "invalid_channel");
    let mut ro = server.client(&format!("/ws?key={ACME_READONLY}"));
    ro.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":1}));
    assert_eq!(ro.recv()["code"], "forbidden");
    c.ping();
    ro.ping();
}

#[test]
fn bad_api_key_is_refused_with_4401_or_http_401() {
    let server = Server::start("");
    for path in ["/ws?key=wrong", "/ws"] {
        let mut c = Client::connect(server.addr, path).expect("upgrade happens, then close");
        assert_eq!(c.recv_close(), Some(4401), "{path}");
    }
    let http = Server::start("[auth]\nrefuse_with = \"http\"\n");
    match Client::connect(http.addr, "/ws?key=wrong") {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("upgrade should be refused"),
    }
    let h = server.wait_health("connections", |_| true);
    assert_eq!(h["metrics"]["connections"]["active"], 0);
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains("shardcast_auth_failures_total{reason=\"invalid_key\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("shardcast_auth_failures_total{reason=\"missing_credentials\"} 1"));
}

#[test]
fn jwt_auth_accepts_valid_and_refuses_expired_tokens() {
    let server = Server::start("");
    let mut c = server.client(&format!(
        "/ws?token={}",
        jwt(300, &["subscribe", "publish"])
    ));
    c.subscribe(&["user:u1:notifications", "org:acme:usage"]);
    c.send(json!({"type":"SUB","channels":["user:u2:notifications"]}));
    assert_eq!(c.recv()["code"], "forbidden");

    let mut expired = Client::connect(
        server.addr,
        &format!("/ws?token={}", jwt(-60, &["subscribe"])),
    )
    .unwrap();
    assert_eq!(expired.recv_close(), Some(4403));
    let mut garbage = Client::connect(server.addr, "/ws?token=not.a.jwt").unwrap();
    assert_eq!(garbage.recv_close(), Some(4403));

    // The Authorization header works too.
    let stream = TcpStream::connect(server.addr).unwrap();
    let req = tungstenite::http::Request::builder()
        .uri(format!("ws://{}/ws", server.addr))
        .header("Host", "test")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tungstenite::handshake::client::generate_key(),
        )
        .header(
            "Authorization",
            format!("Bearer {}", jwt(300, &["subscribe"])),
        )
        .body(())
        .unwrap();
    let (mut ws, _) = tungstenite::client(req, stream).unwrap();
    let ready: serde_json::Value =
        serde_json::from_str(&ws.read().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(ready["type"], "READY");
}

#[test]
fn malformed_messages_get_clear_errors_and_the_server_keeps_serving() {
    let server = Server::start("[limits]\nmax_message_bytes = 1024\n");
    let mut bystander = server.client(&format!("/ws?key={ACME}"));
    let mut c = server.client(&format!("/ws?key={ACME}"));

    c.send_text("{not json");
    let e = c.recv();
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("ERROR"), Some("bad_request"))
    );
    assert!(e["message"].as_str().unwrap().contains("invalid JSON"));
    c.send(json!({"type":"LAUNCH","id":"x"}));
    let e = c.recv();
    assert_eq!(e["code"], "bad_request");
    assert_eq!(e["id"], "x");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("unknown message type"),
        "{e}"
    );
    c.ws.send(tungstenite::Message::binary(vec![1u8, 2, 3]))
        .unwrap();
    let e = c.recv();
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("binary"), "{e}");
    c.ping();

    // Oversized: close 1009.
    c.send_text(&format!(
        "{{\"type\":\"PING\",\"pad\":\"{}\"}}",
        "x".repeat(2000)
    ));
    assert_eq!(c.recv_close(), Some(1009));

    // Invalid UTF-8 in a text frame: close 1007 (sent raw: clients refuse to build it).
    let mut raw = raw_ws(&server, &format!("/ws?key={ACME}"));
    raw.write_all(&client_frame(0x1, &[0xff, 0xfe, 0xfd]))
        .unwrap();
    assert_eq!(read_close_code(&mut raw), Some(1007));

    // A client that keeps sending garbage is closed with 4400.
    let mut spammer = server.client(&format!("/ws?key={ACME}"));
    for _ in 0..10 {
        spammer.send_text("nope");
    }
    assert_eq!(spammer.recv_close(), Some(4400));

    bystander.ping();
    server.wait_health("bad message counter", |h| {
        h["metrics"]["messages"]["errors"].as_u64().unwrap() >= 15
    });
}

#[test]
fn ping_gets_pong_with_timestamp() {
    let server = Server::start("");
    let mut c = server.client(&format!("/ws?key={ACME}"));
    c.send(json!({"type":"PING","timestamp":"2024-01-01T00:00:00Z"}));
    assert_eq!(
        c.recv(),
        json!({"type":"PONG","timestamp":"2024-01-01T00:00:00Z"})
    );
}

#[test]
fn silent_connections_are_pinged_then_dropped() {
    let server = Server::start("[websocket]\nping_interval_ms = 50\nidle_timeout_ms = 300\n");
    // A client that keeps talking (and answers pings while reading) stays.
    let mut live = server.client(&format!("/ws?key={ACME}"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keep_alive = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                live.ping();
            }
            live
        })
    };
    // A raw client that never answers is dropped.
    let mut dead = raw_ws(&server, &format!("/ws?key={ACME}"));
    let (op, _) = read_frame(&mut dead);
    assert_eq!(op, 9, "server sends WebSocket pings");
    let mut buf = [0u8; 64];
    loop {
        match std::io::Read::read(&mut dead, &mut buf) {
            Ok(0) | Err(_) => break, // closed by the server
            Ok(_) => continue,       // more pings
        }
    }
    // Meanwhile the live client kept answering and still works.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut live = keep_alive.join().unwrap();
    live.ping();
    server.wait_health("silent connection to be dropped", |h| {
        h["metrics"]["connections"]["active"] == 1
    });
}

#[test]
fn message_rate_limit_refuses_then_closes_with_4429() {
    let server = Server::start(
        "[limits]\nmessages_per_second = 1\nmessage_burst = 3\nmax_rate_limited = 5\n",
    );
    let mut c = server.client(&format!("/ws?key={ACME}"));
    // 15 messages at once against 3 of burst and 1/s: the burst passes, then refusals, then
    // (after 5 refusals in a row) the close. A token refilled mid-way only delays the close.
    for _ in 0..15 {
        c.send(json!({"type":"PING"}));
    }
    let (mut pongs, mut limited) = (0, 0);
    let code = loop {
        match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("PONG") => pongs += 1,
                    Some("ERROR") => {
                        assert_eq!(v["code"], "rate_limited", "{v}");
                        assert!(v["retryAfterMs"].as_u64().unwrap() <= 1000);
                        limited += 1;
                    }
                    _ => panic!("unexpected {v}"),
                }
            }
            Ok(tungstenite::Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, Some(4429));
    assert!(pongs >= 3, "the burst is allowed");
    assert!(limited >= 5);
    // Others are unaffected.
    server.client(&format!("/ws?key={ACME}")).ping();
}

#[test]
fn byte_rate_limit_refuses_messages_by_their_size() {
    let server = Server::start(
        "[limits]\nmax_message_bytes = 1024\nbytes_per_second = 100\nbyte_burst = 2000\n",
    );
    let mut c = server.client(&format!("/ws?key={ACME}"));
    let data = "x".repeat(800);
    let publish =
        |id: &str| json!({"type":"PUBLISH","channel":"org:acme:usage","data":data,"id":id});
    // Two of about 870 bytes pass within 2,000 bytes of burst; the third does not, and says
    // when it would (at 100 bytes/s, seconds); small messages still pass meanwhile.
    for id in ["a", "b"] {
        c.send(publish(id));
        assert_eq!(c.recv_type_of(&["ACK", "ERROR"])["type"], "ACK");
    }
    c.send(publish("c"));
    let refused = c.recv_type_of(&["ACK", "ERROR"]);
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(
        refused["retryAfterMs"].as_u64().unwrap() > 1_000,
        "{refused}"
    );
    c.send(json!({"type":"PING"}));
    assert_eq!(c.recv_type_of(&["PONG", "ERROR"])["type"], "PONG");
}
