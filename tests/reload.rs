//! Reloading the configuration of a running server: SIGHUP and a change of the file.

mod common;

use common::*;
use serde_json::json;

/// The acme publisher's key block in the test configuration.
const ACME_KEY: &str = r#"[[api_keys]]
id = "acme-key"
secret = "acme-secret"
org = "acme"
scopes = ["subscribe", "publish", "ingest"]
"#;

/// Nothing but SIGHUP reloads: the tests say when.
const NO_WATCH: &str = "watch_config_ms = 0\n";

/// The close code a connection to `path` is refused with (`None`: it was accepted).
fn refused(server: &Server, path: &str) -> Option<u16> {
    let mut c = Client::connect(server.addr, path).expect("upgrade");
    match c.recv_close_or_text() {
        Ok(ready) => {
            assert_eq!(ready["type"], "READY", "{ready}");
            None
        }
        Err(code) => code,
    }
}

fn publish(c: &mut Client, id: &str) -> serde_json::Value {
    c.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":{"n":id},"id":id}));
    c.recv_type_of(&["ACK", "ERROR"])
}

#[test]
fn sighup_closes_connections_on_a_removed_key_with_4401_and_keeps_the_others() {
    let server = Server::start(NO_WATCH);
    let mut withdrawn = server.client(&format!("/ws?key={ACME}"));
    let mut readonly = server.client(&format!("/ws?key={ACME_READONLY}"));
    let token = jwt(3_600, &["subscribe", "publish"]);
    let mut user = server.client(&format!("/ws?token={token}"));
    user.subscribe(&["org:acme:usage"]);
    assert_eq!(publish(&mut readonly, "before")["code"], "forbidden");

    // The acme key goes; the read-only key gains "publish".
    server.rewrite_config(|text| {
        assert!(text.contains(ACME_KEY));
        text.replace(ACME_KEY, "").replace(
            r#"scopes = ["subscribe"]"#,
            r#"scopes = ["subscribe", "publish"]"#,
        )
    });
    server.hangup();
    assert_eq!(withdrawn.recv_close(), Some(4401));
    server.wait_metric("shardcast_config_reloads_total", 1);

    // The others stay connected: the read-only key's connection may publish now, without
    // reconnecting, and its subscription is still there.
    assert_eq!(publish(&mut readonly, "after")["type"], "ACK");
    assert_eq!(user.recv_type("MESSAGE")["data"]["n"], "after");
    // The removed key no longer opens connections.
    assert_eq!(refused(&server, &format!("/ws?key={ACME}")), Some(4401));
    assert_eq!(server.metric("shardcast_config_reloads_refused_total"), 0);
}

#[test]
fn a_limit_raised_in_the_file_applies_to_open_connections() {
    let server = Server::start("watch_config_ms = 20\n[limits]\nmax_subscriptions = 1\n");
    let mut c = server.client(&format!("/ws?key={ACME}"));
    c.subscribe(&["org:acme:usage"]);
    c.send(json!({"type":"SUB","channels":["org:acme:decisions"],"id":"2"}));
    assert_eq!(c.recv_type("ERROR")["code"], "too_many_subscriptions");

    server
        .rewrite_config(|text| text.replace("max_subscriptions = 1\n", "max_subscriptions = 2\n"));
    server.wait_metric("shardcast_config_reloads_total", 1);
    c.subscribe(&["org:acme:decisions"]);
    c.send(json!({"type":"SUB","channels":["org:acme:notifications"],"id":"3"}));
    assert_eq!(c.recv_type("ERROR")["code"], "too_many_subscriptions");
}

#[test]
fn a_rate_limit_set_by_a_reload_applies_to_connections_opened_without_one() {
    let server = Server::start(NO_WATCH);
    let mut c = server.client(&format!("/ws?key={ACME}"));
    assert_eq!(publish(&mut c, "free")["type"], "ACK");
    server.rewrite_config(|text| {
        format!("{text}\n[limits]\nmessages_per_second = 1\nmessage_burst = 1\n")
    });
    server.hangup();
    server.wait_metric("shardcast_config_reloads_total", 1);
    assert_eq!(publish(&mut c, "1")["type"], "ACK");
    assert_eq!(publish(&mut c, "2")["code"], "rate_limited");
}

#[test]
fn an_invalid_file_is_refused_and_the_configuration_in_force_stays() {
    let server = Server::start(NO_WATCH);
    let mut before = server.client(&format!("/ws?key={ACME}"));
    let original = std::fs::read_to_string(server.config_path()).unwrap();
    // A field that does not exist (and the acme key gone: nothing of it may apply), then
    // values that parse but cannot be used.
    let unknown = original
        .replace(ACME_KEY, "")
        .replace("shards =", "shard =");
    server.rewrite_config(|_| unknown);
    server.hangup();
    server.wait_metric("shardcast_config_reloads_refused_total", 1);
    let unusable = format!(
        "{}\n[limits]\nmax_message_bytes = 0\n",
        original.replace(ACME_KEY, "")
    );
    server.rewrite_config(|_| unusable);
    server.hangup();
    server.wait_metric("shardcast_config_reloads_refused_total", 2);
    // Nothing changed: the acme key still works, old connections and new.
    before.ping();
    server.client(&format!("/ws?key={ACME}")).ping();
    assert_eq!(server.metric("shardcast_config_reloads_total"), 0);
}

#[test]
fn a_previous_jwt_secret_set_by_a_reload_accepts_tokens_signed_with_it() {
    let server = Server::start(NO_WATCH);
    let old = {
        let claims = json!({"sub":"u1","org":"acme","exp":unix_now() + 600});
        let key = jsonwebtoken::EncodingKey::from_secret(b"the-old-secret");
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    let path = format!("/ws?token={old}");
    assert_eq!(
        refused(&server, &path),
        Some(4403),
        "an unknown secret was accepted"
    );
    server.rewrite_config(|text| {
        format!("{text}\n[auth]\njwt_secret_previous = \"the-old-secret\"\n")
    });
    server.hangup();
    server.wait_metric("shardcast_config_reloads_total", 1);
    server.client(&path).ping();
    // The current secret still signs valid tokens.
    server
        .client(&format!("/ws?token={}", jwt(600, &["subscribe"])))
        .ping();
}

#[test]
fn allowed_origins_change_with_a_reload() {
    let server = Server::start(&format!(
        "{NO_WATCH}[http]\nallowed_origins = [\"https://app.example.com\"]\n"
    ));
    let upgrade_from = |origin: &str| {
        let request = tungstenite::http::Request::builder()
            .uri(format!("ws://{}/ws?key={ACME}", server.addr))
            .header("Host", "t")
            .header("Origin", origin)
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header(
                "Sec-WebSocket-Key",
                tungstenite::handshake::client::generate_key(),
            )
            .body(())
            .unwrap();
        let stream = std::net::TcpStream::connect(server.addr).unwrap();
        match tungstenite::client(request, stream) {
            Ok(_) => 101,
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                r.status().as_u16()
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(upgrade_from("https://app.example.com"), 101);
    assert_eq!(upgrade_from("https://new.example.com"), 403);
    server.rewrite_config(|text| {
        text.replace(
            "allowed_origins = [\"https://app.example.com\"]",
            "allowed_origins = [\"https://new.example.com\"]",
        )
    });
    server.hangup();
    server.wait_metric("shardcast_config_reloads_total", 1);
    assert_eq!(upgrade_from("https://new.example.com"), 101);
    assert_eq!(upgrade_from("https://app.example.com"), 403);
}
