//! Socket.IO v4 with the real socket.io-client (tests/socketio/package.json pins it):
//! transports, auth, the seed services' events, and messages crossing dialects.

mod common;

use common::sio::{self, SioClient};
use common::{Server, ACME};
use serde_json::json;

fn server() -> Server {
    Server::start("")
}

/// The default transports (long-polling, then the upgrade to WebSocket) on two shards, an
/// API key in the auth payload; a shardcast-dialect PUBLISH reaches it as `message`, and one
/// whose data names an event as that event.
#[test]
fn default_transports_upgrade_and_receive_channel_messages() {
    if !sio::available("default_transports_upgrade_and_receive_channel_messages") {
        return;
    }
    let server = server();
    let mut sio = SioClient::connect(&server, json!({ "auth": { "key": ACME } }));
    sio.connected();
    let connected = sio.event("connected");
    assert!(connected[0]["connectionId"].is_string(), "{connected:?}");
    let established = sio.event("connection:established");
    assert_eq!(established[0]["tenantId"], "acme");
    sio.wait("upgrade", |r| r["upgrade"] == "websocket");

    sio.emit(
        "subscribe",
        json!([{ "channels": ["org:acme:usage"] }]),
        true,
    );
    let ack = sio.wait("subscribe ack", |r| r.get("ack").is_some());
    assert_eq!(ack["args"][0]["success"], true, "{ack}");

    let mut publisher = server.client(&format!("/ws?key={ACME}"));
    publisher.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":{"n":1},"id":"p1"}));
    publisher.recv_type("ACK");
    let message = sio.event("message");
    assert_eq!(
        message[0],
        json!({"channel":"org:acme:usage","seq":1,"data":{"n":1}})
    );

    let named = json!({"event":"analysis_progress","payload":{"analysisId":"a1","percentage":50}});
    publisher.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":named,"id":"p2"}));
    publisher.recv_type("ACK");
    let progress = sio.event("analysis_progress");
    assert_eq!(progress[0]["payload"]["percentage"], 50);

    sio.send(json!({ "op": "transport" }));
    let transport = sio.wait("transport", |r| r.get("transport").is_some());
    assert_eq!(transport["transport"], "websocket");
}

/// WebSocket only, a JWT in the auth payload; a refused credential is the client's
/// `connect_error`, with its code.
#[test]
fn websocket_only_with_a_token_and_refused_credentials() {
    if !sio::available("websocket_only_with_a_token_and_refused_credentials") {
        return;
    }
    let server = server();
    let token = common::jwt(300, &["subscribe"]);
    let opts = json!({ "transports": ["websocket"], "auth": { "token": token } });
    let mut sio = SioClient::connect(&server, opts);
    sio.connected();
    assert_eq!(sio.event("connection:established")[0]["tenantId"], "acme");

    let opts = json!({ "transports": ["websocket"], "auth": { "token": "not-a-jwt" } });
    let mut refused = SioClient::connect(&server, opts);
    let report = refused.wait("connect_error", |r| r.get("connect_error").is_some());
    assert_eq!(
        report["connect_error"]["data"]["code"], "invalid_token",
        "{report}"
    );

    let mut anonymous = SioClient::connect(&server, json!({}));
    let report = anonymous.wait("connect_error", |r| r.get("connect_error").is_some());
    assert_eq!(
        report["connect_error"]["data"]["code"], "missing_credentials",
        "{report}"
    );
}

/// A subscription the credential may not make is refused with `error` and a failed ack;
/// the connection stays usable.
#[test]
fn refused_subscription_answers_error_and_ack() {
    if !sio::available("refused_subscription_answers_error_and_ack") {
        return;
    }
    let server = server();
    let mut sio = SioClient::connect(&server, json!({ "auth": { "key": ACME } }));
    sio.connected();
    sio.emit(
        "subscribe",
        json!([{ "channels": ["org:other:usage"] }]),
        true,
    );
    let error = sio.event("error");
    assert_eq!(error[0]["code"], "forbidden", "{error:?}");
    let ack = sio.wait("ack", |r| r.get("ack").is_some());
    assert_eq!(ack["args"][0]["success"], false, "{ack}");
    sio.emit("ping", json!([]), false);
    let pong = sio.event("pong");
    assert!(pong[0]["timestamp"].is_u64(), "{pong:?}");
}

/// The query string's credentials serve as for `/ws` when the auth payload has none.
#[test]
fn query_credentials_authenticate() {
    if !sio::available("query_credentials_authenticate") {
        return;
    }
    let server = server();
    let opts = json!({ "transports": ["websocket"], "query": { "key": ACME } });
    let mut sio = SioClient::connect(&server, opts);
    sio.connected();
    assert!(sio.event("connected")[0]["connectionId"].is_string());
    // And it is a session like any other: the server API lists it.
    let key = format!("X-API-Key: {}\r\n", common::ADMIN);
    let (status, body) = common::http_get(server.addr, "/api/connections?org=acme", &key);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("acme-key"), "{body}");
}

/// The intelligence-graph service's event set: rooms joined, left, sent to, queried, with
/// presence, acks and `room:message`; a shardcast-dialect client sees the same channel.
#[test]
fn intelligence_graph_rooms_end_to_end() {
    if !sio::available("intelligence_graph_rooms_end_to_end") {
        return;
    }
    let server = server();
    let opts = json!({ "transports": ["websocket"], "auth": { "key": ACME } });
    let mut a = SioClient::connect(&server, opts.clone());
    a.connected();
    let mut b = SioClient::connect(&server, opts);
    b.connected();
    let room = json!({ "room": "investigation:123", "metadata": { "role": "lead" } });
    a.emit("room:join", json!([room]), true);
    assert_eq!(
        a.event("room:joined")[0],
        json!({ "room": "investigation:123" })
    );
    let ack = a.wait("join ack", |r| r.get("ack").is_some());
    assert_eq!(ack["args"][0]["success"], true, "{ack}");

    let mut plain = server.client(&format!("/ws?key={ACME}"));
    plain.subscribe(&["org:acme:rooms:investigation:123"]);

    b.emit("room:join", json!([{ "room": "investigation:123" }]), true);
    b.wait("join ack", |r| r.get("ack").is_some());
    let joined = a.event("presence:join");
    assert_eq!(joined[0]["room"], "investigation:123", "{joined:?}");

    let comment = json!({ "type": "comment", "text": "Hello, world!" });
    let send = json!({ "room": "investigation:123", "payload": comment, "persistent": true });
    a.emit("room:send", json!([send]), true);
    let ack = a.wait("send ack", |r| r.get("ack").is_some());
    assert_eq!(ack["args"][0]["success"], true, "{ack}");
    assert_eq!(ack["args"][0]["messageId"], "1", "{ack}");
    let message = b.event("room:message");
    assert_eq!(message[0]["room"], "investigation:123", "{message:?}");
    assert_eq!(message[0]["from"], "acme-key");
    assert_eq!(message[0]["payload"], comment);
    assert_eq!(message[0]["id"], "1");
    assert!(message[0]["timestamp"].is_u64());
    let seen = plain.recv_type("MESSAGE");
    assert_eq!(seen["data"]["payload"], comment, "{seen}");

    plain.send(json!({"type":"PUBLISH","channel":"org:acme:rooms:investigation:123","data":{"x":1},"id":"p"}));
    plain.recv_type("ACK");
    let message = b.event("room:message");
    assert_eq!(message[0]["payload"], json!({ "x": 1 }), "{message:?}");
    assert_eq!(message[0]["from"], "");

    a.emit("query:rooms", json!([]), true);
    let rooms = a.wait("rooms ack", |r| r.get("ack").is_some());
    assert_eq!(
        rooms["args"][0]["rooms"],
        json!(["investigation:123"]),
        "{rooms}"
    );
    a.emit(
        "query:presence",
        json!([{ "room": "investigation:123" }]),
        true,
    );
    let presence = a.wait("presence ack", |r| r.get("ack").is_some());
    assert_eq!(
        presence["args"][0]["presence"].as_array().map(Vec::len),
        Some(2),
        "{presence}"
    );

    b.emit("room:leave", json!([{ "room": "investigation:123" }]), true);
    assert_eq!(
        b.event("room:left")[0],
        json!({ "room": "investigation:123" })
    );
    let left = a.event("presence:leave");
    assert_eq!(left[0]["userId"], "acme-key", "{left:?}");
}

/// The document service's rooms (`analysis:123`) are channels of the client's org; a
/// message naming an event arrives as that event.
#[test]
fn document_service_rooms_and_events() {
    if !sio::available("document_service_rooms_and_events") {
        return;
    }
    let server = server();
    let opts = json!({ "transports": ["websocket"], "auth": { "key": ACME } });
    let mut sio = SioClient::connect(&server, opts);
    sio.connected();
    sio.emit(
        "subscribe",
        json!([{ "channels": ["analysis:123", "document:456"] }]),
        true,
    );
    let ack = sio.wait("subscribe ack", |r| r.get("ack").is_some());
    assert_eq!(
        ack["args"][0]["channels"],
        json!(["analysis:123", "document:456"]),
        "{ack}"
    );

    let mut publisher = server.client(&format!("/ws?key={ACME}"));
    let done = json!({"event":"analysis_complete","payload":{"analysisId":"123"}});
    publisher.send(
        json!({"type":"PUBLISH","channel":"org:acme:rooms:analysis:123","data":done,"id":"p"}),
    );
    publisher.recv_type("ACK");
    assert_eq!(sio.event("analysis_complete")[0], done);
    publisher.send(
        json!({"type":"PUBLISH","channel":"org:acme:rooms:document:456","data":[2],"id":"q"}),
    );
    publisher.recv_type("ACK");
    let message = sio.event("message");
    assert_eq!(message[0]["channel"], "document:456", "{message:?}");
}

/// SIGTERM: every Socket.IO client is told `system:restart {reason, reconnectIn}` before its
/// connection closes.
#[test]
fn drain_tells_system_restart() {
    if !sio::available("drain_tells_system_restart") {
        return;
    }
    let mut server = server();
    let mut sio = SioClient::connect(&server, json!({ "auth": { "key": ACME } }));
    sio.connected();
    sio.wait("upgrade", |r| r["upgrade"] == "websocket");
    server.terminate();
    let restart = sio.event("system:restart");
    assert!(restart[0]["reconnectIn"].is_u64(), "{restart:?}");
    assert!(restart[0]["reason"].is_string(), "{restart:?}");
    sio.wait("disconnect", |r| r.get("disconnect").is_some());
    server.wait_exit();
}

/// Decisions missed while away come back from the store when the in-memory history holds
/// fewer than were missed (`[history] size = 2`, eight decisions): recovered, all of them, in
/// order, as `message` events with `decision: true`.
#[test]
fn recovery_replays_decisions_from_the_store() {
    if !sio::available("recovery_replays_decisions_from_the_store") {
        return;
    }
    const CHANNEL: &str = "org:acme:decisions";
    let server = Server::start("[history]\nsize = 2\n");
    let opts = json!({ "transports": ["websocket"], "auth": { "key": ACME } });
    let mut sio = SioClient::connect(&server, opts);
    sio.connected();
    sio.emit("subscribe", json!([{ "channels": [CHANNEL] }]), true);
    sio.wait("subscribe ack", |r| r.get("ack").is_some());
    let mut producer = server.client(&format!("/ws?key={ACME}"));
    let mut ingest = |n: u64| {
        let decision = common::ingest(CHANNEL, &format!("k{n}"), common::decision("acme"));
        producer.send(decision);
        assert_eq!(producer.recv_type("ACK")["seq"], n);
    };
    ingest(1);
    assert_eq!(sio.event("message")[0]["seq"], 1);

    sio.send(json!({ "op": "drop" }));
    sio.wait("disconnect", |r| r.get("disconnect").is_some());
    for n in 2..=9 {
        ingest(n);
    }
    sio.send(json!({ "op": "reconnect" }));
    assert_eq!(sio.connected()["recovered"], true);
    for n in 2..=9 {
        let message = sio.event("message");
        assert_eq!(
            (&message[0]["seq"], &message[0]["decision"]),
            (&json!(n), &json!(true))
        );
    }
}

/// A rolling restart of a cluster: a client of the node that drains is told `system:restart`,
/// reconnects to the other node, and recovers its subscription and what was published while
/// it moved.
#[test]
fn a_drained_nodes_clients_recover_on_another() {
    if !sio::available("a_drained_nodes_clients_recover_on_another") {
        return;
    }
    let Some(url) = common::redis_url("a_drained_nodes_clients_recover_on_another") else {
        return;
    };
    let prefix = format!("sctest.drain.{}.{}", std::process::id(), common::unix_now());
    let node = || {
        let cluster = format!("[cluster]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\n");
        Server::start_with(2, &format!("{cluster}\n[storage]\nurl = \"memory\"\n"))
    };
    let (mut a, b) = (node(), node());
    let mut sio = SioClient::connect(&a, json!({ "auth": { "key": ACME } }));
    sio.connected();
    sio.emit(
        "subscribe",
        json!([{ "channels": ["org:acme:usage"] }]),
        true,
    );
    sio.wait("subscribe ack", |r| r.get("ack").is_some());
    let mut publisher = b.client(&format!("/ws?key={ACME}"));
    let mut publish = |n: u64| {
        let data = json!({ "n": n });
        publisher.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":data,"id":"p"}));
        assert_eq!(publisher.recv_type("ACK")["seq"], n);
    };
    publish(1);
    assert_eq!(sio.event("message")[0]["seq"], 1);
    sio.wait("upgrade", |r| r["upgrade"] == "websocket");

    a.terminate();
    let restart = sio.event("system:restart");
    assert!(restart[0]["reconnectIn"].is_u64(), "{restart:?}");
    sio.wait("disconnect", |r| r.get("disconnect").is_some());
    a.wait_exit();
    publish(2);
    sio.send(json!({ "op": "reconnect", "url": format!("http://{}", b.addr) }));
    assert_eq!(sio.connected()["recovered"], true);
    assert_eq!(sio.event("message")[0]["seq"], 2);
    publish(3);
    assert_eq!(sio.event("message")[0]["seq"], 3);
}

/// The document service's HTTP endpoints: a send to a user arrives as the event its `type`
/// names, a broadcast too; the user's status and queue answer as the server API's.
#[test]
fn document_service_http_endpoints_are_aliases() {
    if !sio::available("document_service_http_endpoints_are_aliases") {
        return;
    }
    let server = server();
    let token = common::jwt(300, &["subscribe"]);
    let opts = json!({ "transports": ["websocket"], "auth": { "token": token } });
    let mut sio = SioClient::connect(&server, opts);
    sio.connected();
    sio.event("connected");

    let note =
        json!({"type":"notification","payload":{"title":"Analysis Complete"},"priority":"high"});
    let (status, sent) = common::post(server.addr, "/ws/send/u1", ACME, &note);
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["reached"], 1, "{sent}");
    let got = sio.event("notification");
    assert_eq!(got[0]["payload"]["title"], "Analysis Complete", "{got:?}");

    let bulk = json!({"userIds":["u1","u2"],"message":{"type":"notification","payload":{"n":2}}});
    let (status, sent) = common::post(server.addr, "/ws/send/bulk", ACME, &bulk);
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["reached"], 1, "{sent}");
    assert_eq!(sio.event("notification")[0]["payload"]["n"], 2);

    let alert = json!({"type":"maintenance","payload":{"title":"Scheduled Maintenance"}});
    let (status, sent) = common::post(server.addr, "/ws/broadcast", ACME, &alert);
    assert_eq!(status, 200, "{sent}");
    let got = sio.event("maintenance");
    assert_eq!(
        got[0]["payload"]["title"], "Scheduled Maintenance",
        "{got:?}"
    );

    let key = format!("X-API-Key: {ACME}\r\n");
    let (status, body) = common::http_get(server.addr, "/ws/status/u1", &key);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""online":true"#), "{body}");
    let (status, body) = common::http_get(server.addr, "/ws/queue/u1", &key);
    assert_eq!(status, 200, "{body}");
    let (status, _) = common::http_get(server.addr, "/ws/nothing", &key);
    assert_eq!(status, 404);
    // A wrong method is told which one; a priority that is not a string is refused, and
    // nothing is sent.
    let (status, body) = common::http_get(server.addr, "/ws/broadcast", &key);
    assert_eq!(status, 405, "{body}");
    let odd = json!({"type":"notification","payload":{},"priority":{"level":1}});
    let (status, body) = common::post(server.addr, "/ws/send/u1", ACME, &odd);
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("bad_request")),
        "{body}"
    );
    sio.emit("ping", json!([]), false);
    sio.event("pong");
    assert!(!sio.backlog_has(|r| r["event"] == "notification"));
}

/// Two nodes on one Redis: a Socket.IO client on one hears what is published on the other,
/// and a room message it sends reaches a Socket.IO client on the other; dropped, it recovers
/// its room and what it missed on the other node.
#[test]
fn across_two_nodes_with_redis() {
    if !sio::available("across_two_nodes_with_redis") {
        return;
    }
    let Some(url) = common::redis_url("across_two_nodes_with_redis") else {
        return;
    };
    let prefix = format!(
        "sctest.socketio.{}.{}",
        std::process::id(),
        common::unix_now()
    );
    let node = || {
        Server::start_with(
            2,
            &format!(
                "[cluster]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\n\n[storage]\nurl = \"memory\"\n"
            ),
        )
    };
    let (a, b) = (node(), node());
    let opts = json!({ "auth": { "key": ACME } });
    let mut on_a = SioClient::connect(&a, opts.clone());
    on_a.connected();
    let mut on_b = SioClient::connect(&b, opts);
    on_b.connected();
    for sio in [&mut on_a, &mut on_b] {
        sio.emit("room:join", json!([{ "room": "ops" }]), true);
        let ack = sio.wait("join ack", |r| r.get("ack").is_some());
        assert_eq!(ack["args"][0]["success"], true, "{ack}");
    }
    let mut publisher = b.client(&format!("/ws?key={ACME}"));
    publisher
        .send(json!({"type":"PUBLISH","channel":"org:acme:rooms:ops","data":{"n":1},"id":"p"}));
    publisher.recv_type("ACK");
    assert_eq!(on_a.event("room:message")[0]["payload"], json!({ "n": 1 }));

    on_a.emit(
        "room:send",
        json!([{ "room": "ops", "payload": "from a" }]),
        true,
    );
    let message = on_b.wait("room:message from a", |r| {
        r["event"] == "room:message" && r["args"][0]["payload"] == "from a"
    });
    assert_eq!(message["args"][0]["from"], "acme-key", "{message}");
    assert_eq!(message["args"][0]["seq"], 2, "{message}");
    let own = on_a.wait("its own room:message", |r| r["event"] == "room:message");
    assert_eq!(own["args"][0]["seq"], 2, "{own}");

    on_a.send(json!({ "op": "drop" }));
    on_a.wait("disconnect", |r| r.get("disconnect").is_some());
    for n in [3, 4] {
        publisher
            .send(json!({"type":"PUBLISH","channel":"org:acme:rooms:ops","data":{"n":n},"id":"p"}));
        assert_eq!(publisher.recv_type("ACK")["seq"], n);
    }
    on_a.send(json!({ "op": "reconnect", "url": format!("http://{}", b.addr) }));
    assert_eq!(on_a.connected()["recovered"], true);
    for n in [3, 4] {
        let message = on_a.event("room:message");
        assert_eq!(
            (&message[0]["seq"], &message[0]["payload"]),
            (&json!(n), &json!({ "n": n }))
        );
    }
    // In the room still, on b now.
    publisher
        .send(json!({"type":"PUBLISH","channel":"org:acme:rooms:ops","data":{"n":5},"id":"p"}));
    publisher.recv_type("ACK");
    assert_eq!(on_a.event("room:message")[0]["seq"], 5);
}

/// Binary values on channels: a `room:send` with binary in its payload reaches the room's
/// Socket.IO clients as binary (on polling and on WebSocket), and `/ws` subscribers as
/// `{"_binary":"BASE64"}`; a `/ws` client publishing that form reaches Socket.IO clients
/// as binary too.
#[test]
fn binary_values_cross_channels_as_binary() {
    if !sio::available("binary_values_cross_channels_as_binary") {
        return;
    }
    let server = server();
    let opts = json!({ "transports": ["websocket"], "auth": { "key": ACME } });
    let mut sender = SioClient::connect(&server, opts);
    sender.connected();
    // Long-polling only: binary frames go as `b<base64>` records.
    let opts = json!({ "transports": ["polling"], "auth": { "key": ACME } });
    let mut receiver = SioClient::connect(&server, opts);
    receiver.connected();
    for sio in [&mut sender, &mut receiver] {
        sio.emit("room:join", json!([{ "room": "ops" }]), true);
        sio.wait("join ack", |r| r.get("ack").is_some());
    }
    let mut ws = server.client(&format!("/ws?key={ACME}"));
    ws.subscribe(&["org:acme:rooms:ops"]);

    let payload = json!({ "image": { "binary": [0, 1, 2, 255] }, "name": "scan" });
    sender.emit(
        "room:send",
        json!([{ "room": "ops", "payload": payload }]),
        true,
    );
    let ack = sender.wait("send ack", |r| r.get("ack").is_some());
    assert_eq!(ack["args"][0]["success"], true, "{ack}");
    for sio in [&mut receiver, &mut sender] {
        let message = sio.event("room:message");
        assert_eq!(message[0]["payload"], payload, "{message:?}");
    }
    let seen = ws.recv_type("MESSAGE");
    assert_eq!(
        seen["data"]["payload"],
        json!({ "image": { "_binary": "AAEC/w==" }, "name": "scan" }),
        "{seen}"
    );

    ws.send(json!({"type":"PUBLISH","channel":"org:acme:rooms:ops",
        "data":{"from":"ws","payload":[{"_binary":"3q2+7w=="}]},"id":"p"}));
    ws.recv_type("ACK");
    let message = receiver.event("room:message");
    assert_eq!(
        message[0]["payload"],
        json!([{ "binary": [0xde, 0xad, 0xbe, 0xef] }]),
        "{message:?}"
    );
}

/// What no Socket.IO client sends, on the raw wire (no node needed): a frame whose first
/// character is not ASCII (it once panicked the shard: fuzz/corpus/socketio_packet), garbage
/// packets, attachments nobody announced. Each closes its connection; the server serves on.
#[test]
fn hostile_engine_io_frames_close_only_their_connection() {
    use std::io::Write;
    let server = server();
    let path = "/socket.io/?EIO=4&transport=websocket";
    let open = || {
        let mut ws = std::net::TcpStream::connect(server.addr).unwrap();
        let head = common::upgrade_response(&mut ws, path);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        ws
    };
    for hostile in [
        &b"\xc3\xa9"[..],
        b"4\xc3\xa9",
        b"0{}",
        b"45\xc3\xa9",
        b"42\xc3\xa9",
    ] {
        let mut ws = open();
        let (_, first) = common::read_frame(&mut ws);
        assert!(
            first.starts_with(b"0{"),
            "{}",
            String::from_utf8_lossy(&first)
        );
        ws.write_all(&common::client_frame(1, hostile)).unwrap();
        let mut closed = false;
        for _ in 0..4 {
            let (opcode, _) = common::read_frame(&mut ws);
            if opcode == 8 {
                closed = true;
                break;
            }
        }
        assert!(closed, "{hostile:?} did not close its connection");
    }
    // An unknown namespace is refused, and the connection stays.
    let mut ws = open();
    common::read_frame(&mut ws);
    ws.write_all(&common::client_frame(1, "40/é,{}".as_bytes()))
        .unwrap();
    let (_, refused) = common::read_frame(&mut ws);
    assert_eq!(
        refused,
        r#"44/é,{"message":"Invalid namespace"}"#.as_bytes()
    );
    let mut ws = open();
    ws.write_all(&common::client_frame(2, &[1, 2, 3])).unwrap();
    assert_eq!(common::read_frame(&mut ws).1[0], b'0', "open packet first");
    assert_eq!(
        common::read_frame(&mut ws).0,
        8,
        "an unannounced attachment closes"
    );
    assert_eq!(server.health()["status"], "healthy");
}

/// Long-polling is held to the same limits as a WebSocket: past the connection's message
/// rate a packet is answered `rate_limited` (in the next GET) and not handled, and too many
/// in a row end the session. Raw HTTP, as the Engine.IO protocol has it.
#[test]
fn long_polling_is_rate_limited_like_a_websocket() {
    let server = Server::start_with(
        1,
        "[limits]\nmessages_per_second = 2\nmax_rate_limited = 5\n",
    );
    let url = "/socket.io/?EIO=4&transport=polling";
    let (status, open) = common::http_get(server.addr, url, "");
    assert_eq!(status, 200, "{open}");
    let sid = serde_json::from_str::<serde_json::Value>(&open[1..]).unwrap()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    let session = format!("{url}&sid={sid}");
    let post = |body: &str| common::http_request(server.addr, "POST", &session, "", body);
    assert_eq!(post(&format!(r#"40{{"key":"{ACME}"}}"#)).0, 200);
    let (_, connected) = common::http_get(server.addr, &session, "");
    assert!(connected.starts_with("40{"), "{connected}");
    // Two pings pass (the second with the first's token back), the third is over.
    let pings = ["42[\"ping\"]"; 3].join("\u{1e}");
    assert_eq!(post(&pings).0, 200);
    let (_, answers) = common::http_get(server.addr, &session, "");
    assert!(answers.contains("rate_limited"), "{answers}");
    // Five more in a row over the rate end the session.
    let flood = ["42[\"ping\"]"; 6].join("\u{1e}");
    post(&flood);
    let (status, gone) = common::http_get(server.addr, &session, "");
    assert!(status == 400 || gone.ends_with('1'), "{status} {gone}");
}

/// A long-polling handshake opens a connection: it is held to the per-address connection
/// rate like an upgrade.
#[test]
fn long_polling_handshakes_are_held_to_the_address_rate() {
    let server = Server::start_with(
        1,
        "[limits]\nconnections_per_ip_per_second = 1\nconnection_burst_per_ip = 3\n",
    );
    let url = "/socket.io/?EIO=4&transport=polling";
    for _ in 0..3 {
        assert_eq!(common::http_get(server.addr, url, "").0, 200);
    }
    let (status, body) = common::http_get(server.addr, url, "");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate_limited"), "{body}");
}

/// Connection state recovery: a client that loses its connection and comes back with its
/// `pid` and `offset` (any shard, any transport) gets `socket.recovered` and exactly what it
/// missed on each of its channels, whether the messages were published while it was away or
/// were on their way to it when the connection dropped; a client that said goodbye starts
/// afresh.
#[test]
fn a_dropped_client_recovers_exactly_what_it_missed() {
    if !sio::available("a_dropped_client_recovers_exactly_what_it_missed") {
        return;
    }
    let server = server();
    let mut sio = SioClient::connect(&server, json!({ "auth": { "key": ACME } }));
    assert_eq!(sio.connected()["recovered"], false);
    let (a, b) = ("org:acme:usage", "org:acme:notifications");
    // Quiet until the client is away: where it stood is where it subscribed.
    let quiet = "org:acme:decisions";
    sio.emit("subscribe", json!([{ "channels": [a, b, quiet] }]), true);
    let ack = sio.wait("subscribe ack", |r| r.get("ack").is_some());
    assert_eq!(ack["args"][0]["success"], true, "{ack}");

    let mut publisher = server.client(&format!("/ws?key={ACME}"));
    let mut next = std::collections::HashMap::new();
    let mut publish = |channel: &str| -> u64 {
        let n = next.entry(channel.to_string()).or_insert(0u64);
        *n += 1;
        let data = json!({ "n": *n });
        publisher.send(json!({"type":"PUBLISH","channel":channel,"data":data,"id":"p"}));
        let ack = publisher.recv();
        assert_eq!(ack["seq"], *n, "{ack}");
        *n
    };
    // The messages of `channel` the client gets next, up to `seq`, in order, each once.
    let expect = |sio: &mut SioClient, channel: &str, seqs: std::ops::RangeInclusive<u64>| {
        for seq in seqs {
            let message = sio.wait("a message", |r| {
                r["event"] == "message" && r["args"][0]["channel"] == channel
            });
            let args = &message["args"];
            assert_eq!(args[0]["seq"], seq, "{message}");
            assert_eq!(args[0]["data"], json!({ "n": seq }), "{message}");
            // The offset the client keeps, as its last argument.
            assert_eq!(args[1], format!("{seq}:{channel}"), "{message}");
        }
    };
    publish(a);
    publish(b);
    publish(a);
    expect(&mut sio, a, 1..=2);
    expect(&mut sio, b, 1..=1);

    // Lost several times (each time on whichever shard the new connection lands, with the
    // record on the old one's): what came meanwhile arrives after the reconnection, once.
    for round in 0..4u64 {
        sio.send(json!({ "op": "drop" }));
        sio.wait("disconnect", |r| r.get("disconnect").is_some());
        let top_a = publish(a);
        let missed_b = publish(b);
        let top_b = if round % 2 == 1 { publish(b) } else { missed_b };
        if round == 0 {
            publish(quiet);
        }
        sio.send(json!({ "op": "reconnect" }));
        assert_eq!(sio.connected()["recovered"], true, "round {round}");
        if round == 0 {
            expect(&mut sio, quiet, 1..=1);
        }
        expect(&mut sio, a, top_a..=top_a);
        expect(&mut sio, b, missed_b..=top_b);
        // Subscribed still, live again.
        let live = publish(a);
        expect(&mut sio, a, live..=live);
    }
    assert!(
        !sio.backlog_has(|r| r["event"] == "message"),
        "no message twice"
    );

    // A client that had handled nothing yet (no offset) gets all that followed its
    // subscription.
    let mut fresh = SioClient::connect(&server, json!({ "auth": { "key": ACME } }));
    fresh.connected();
    fresh.emit("subscribe", json!([{ "channels": [b] }]), true);
    fresh.wait("subscribe ack", |r| r.get("ack").is_some());
    fresh.send(json!({ "op": "drop" }));
    fresh.wait("disconnect", |r| r.get("disconnect").is_some());
    let missed = publish(b);
    fresh.send(json!({ "op": "reconnect" }));
    assert_eq!(fresh.connected()["recovered"], true);
    expect(&mut fresh, b, missed..=missed);
    drop(fresh);
    expect(&mut sio, b, missed..=missed);

    // A goodbye: nothing to recover, and no channel either.
    sio.send(json!({ "op": "disconnect" }));
    sio.wait("disconnect", |r| r.get("disconnect").is_some());
    sio.send(json!({ "op": "reconnect" }));
    assert_eq!(sio.connected()["recovered"], false);
    publish(a);
    sio.emit("ping", json!([]), false);
    sio.event("pong");
    assert!(
        !sio.backlog_has(|r| r["event"] == "message"),
        "{:?}",
        sio.backlog
    );
    // Five recoveries (four drops, the client that had handled nothing), one refused.
    // (Counters are published a moment later: waited for, then exact.)
    let recovered = server.wait_metric("shardcast_socketio_recovered_total", 5);
    assert_eq!(recovered, 5);
    let fresh = server.wait_metric("shardcast_socketio_not_recovered_total", 1);
    assert_eq!(fresh, 1);
}
