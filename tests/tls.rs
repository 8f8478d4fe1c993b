//! `wss://` and `https://` with rustls: a test CA and certificates made by openssl, clients
//! that trust only that CA, and a certificate renewed by a reload.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use common::ca::{Ca, Tls};
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

fn tls_server(cert: &Path, key: &Path, extra: &str) -> Server {
    Server::start(&format!(
        "{extra}\n[tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    ))
}

/// The certificate the server presented on `tls`, as PEM-less DER bytes.
fn presented(tls: &Tls) -> Vec<u8> {
    tls.conn.peer_certificates().expect("a certificate")[0].to_vec()
}

fn der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

/// A WebSocket over `tls` with an API key, READY read.
fn wss(tls: Tls, server: &Server) -> tungstenite::WebSocket<Tls> {
    let url = format!(
        "wss://localhost:{}/ws?key={ACME}",
        server.tls_addr.unwrap().port()
    );
    let (mut ws, response) = tungstenite::client(url, tls).expect("WebSocket over TLS");
    assert_eq!(response.status(), 101);
    let ready = read_json(&mut ws);
    assert_eq!(ready["type"], "READY", "{ready}");
    ws
}

fn read_json(ws: &mut tungstenite::WebSocket<Tls>) -> Value {
    loop {
        match ws.read().expect("read") {
            tungstenite::Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn send(ws: &mut tungstenite::WebSocket<Tls>, v: Value) {
    ws.send(tungstenite::Message::text(v.to_string())).unwrap();
}

#[test]
fn wss_carries_the_protocol_and_meets_plain_ws_clients_on_the_same_channels() {
    let ca = Ca::new();
    let (cert, key) = ca.issue("server");
    let server = tls_server(&cert, &key, "");
    let tls = ca.connect(&server);
    assert_eq!(
        tls.conn.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN picks HTTP/1.1"
    );
    let mut secure = wss(tls, &server);
    send(
        &mut secure,
        json!({"type":"SUB","channels":["org:acme:usage"],"id":"s"}),
    );
    assert_eq!(read_json(&mut secure)["type"], "SUBSCRIBED");
    // A plain client on the other listener publishes; the TLS one receives, and back.
    let mut plain = server.client(&format!("/ws?key={ACME}"));
    plain.subscribe(&["org:acme:usage"]);
    let big = "x".repeat(40_000); // several TLS records
    plain.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":{"big":big}}));
    let got = read_json(&mut secure);
    assert_eq!(got["type"], "MESSAGE", "{got}");
    assert_eq!(got["data"]["big"].as_str().map(str::len), Some(40_000));
    send(
        &mut secure,
        json!({"type":"PUBLISH","channel":"org:acme:usage","data":"from tls","id":"p"}),
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(plain.recv());
    }
    assert!(seen.iter().any(|m| m["data"] == "from tls"), "{seen:?}");
    secure.close(None).unwrap();
    loop {
        match secure.read() {
            Ok(tungstenite::Message::Close(frame)) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1000));
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn https_answers_health_and_the_server_api() {
    let ca = Ca::new();
    let (cert, key) = ca.issue("server");
    let server = tls_server(&cert, &key, "");
    let mut tls = ca.connect(&server);
    let body = json!({"channel":"org:acme:usage","data":{"n":1}}).to_string();
    write!(
        tls,
        "GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n\
         POST /api/publish HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {ACME}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    // The server ends TLS with close_notify after the last response.
    tls.read_to_string(&mut text).expect("read to close_notify");
    let statuses: Vec<&str> = text.matches("HTTP/1.1 200").collect();
    assert_eq!(statuses.len(), 2, "{text}");
    assert!(text.contains(r#""seq":1"#), "{text}");
}

#[test]
fn a_client_that_is_not_tls_or_distrusts_the_certificate_gets_nothing_served() {
    let ca = Ca::new();
    let (cert, key) = ca.issue("server");
    let server = tls_server(&cert, &key, "");
    // Plain HTTP on the TLS port: refused by the handshake, the connection closed.
    let mut raw = TcpStream::connect(server.tls_addr.unwrap()).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1"),
        "served in clear"
    );
    // A client trusting another CA fails its handshake; the server carries on.
    let other = Ca::new();
    let tcp = TcpStream::connect(server.tls_addr.unwrap()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(other.client_config(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let failed = loop {
        if !tls.conn.is_handshaking() {
            break false;
        }
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            break true;
        }
    };
    assert!(failed, "an untrusted certificate was accepted");
    let mut good = ca.connect(&server);
    good.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    good.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[test]
fn a_renewed_certificate_is_served_after_a_reload_and_open_connections_stay() {
    let ca = Ca::new();
    let (cert, key) = ca.issue("first");
    let (live_cert, live_key) = (ca.path("live.pem"), ca.path("live.key"));
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let server = tls_server(&live_cert, &live_key, "watch_config_ms = 0\n");
    let before = ca.connect(&server);
    assert_eq!(presented(&before), der(&cert));
    let mut open = wss(before, &server);

    // Renewal: new files in place, the configuration unchanged, SIGHUP.
    let (renewed, renewed_key) = ca.issue("second");
    std::fs::copy(&renewed, &live_cert).unwrap();
    std::fs::copy(&renewed_key, &live_key).unwrap();
    server.hangup();
    server.wait_metric("shardcast_config_reloads_total", 1);
    assert_eq!(presented(&ca.connect(&server)), der(&renewed));
    send(&mut open, json!({"type":"PING"}));
    assert_eq!(read_json(&mut open)["type"], "PONG");

    // A broken certificate is refused; the renewed one stays in force.
    std::fs::write(&live_cert, "not a certificate").unwrap();
    server.hangup();
    server.wait_metric("shardcast_config_reloads_refused_total", 1);
    assert_eq!(presented(&ca.connect(&server)), der(&renewed));
}
