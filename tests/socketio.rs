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
