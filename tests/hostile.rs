//! Hostile and careless clients against the real server: each hole found by the probe of
//! issue 9, with the exact answer expected, and proof that the server still serves a healthy
//! client afterwards.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::thread;

use common::*;
use serde_json::json;
use tungstenite::Message;

/// A raw second handle on a client's socket, for writing frames without reading.
fn raw(c: &Client) -> TcpStream {
    c.ws.get_ref().try_clone().expect("clone socket")
}

/// Write `frames` (whole frames, concatenated) `times` times from another thread, blocking
/// when the server stops reading; stops quietly when the server closes. Returns how many
/// times the frames were written.
fn flood(socket: TcpStream, frames: Vec<u8>, times: usize) -> thread::JoinHandle<usize> {
    flood_until(socket, frames, times, None)
}

/// [`flood`], giving up once a write has made no progress for `patience`.
fn flood_until(
    mut socket: TcpStream,
    frames: Vec<u8>,
    times: usize,
    patience: Option<std::time::Duration>,
) -> thread::JoinHandle<usize> {
    socket.set_write_timeout(patience).unwrap();
    thread::spawn(move || {
        for n in 0..times {
            if socket.write_all(&frames).is_err() {
                return n;
            }
        }
        times
    })
}

/// A slow client whose connection landed on `shard`.
fn slow_client_on(server: &Server, secret: &str, shard: usize) -> Client {
    for _ in 0..200 {
        let c = server.slow_client(secret);
        if c.shard == shard {
            return c;
        }
    }
    panic!("no connection landed on shard {shard}");
}

/// Hole 1: pongs were queued without bound, so pings sent without reading grew the server's
/// memory linearly (3 million pings: +480 MB). Now the pongs spend the connection's reply
/// budget, the server stops reading that client, and every ping is still answered, in order.
#[test]
fn pings_without_reading_stop_being_read_and_are_all_answered() {
    let server = Server::start("");
    let mut c = server.slow_client(ACME);
    let rss_before = server.rss_kib();
    const BATCH: usize = 1_000;
    const BATCHES: usize = 200;
    let ping = client_frame(0x9, &[b'p'; 125]);
    let writer = flood(raw(&c), ping.repeat(BATCH), BATCHES);
    // The server stops reading this client once its unread pongs fill the reply budget.
    server.wait_metric("shardcast_reads_paused_total", 1);
    let rss_paused = server.rss_kib();
    assert!(
        rss_paused < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_paused} KiB while the client did not read"
    );
    let mut pongs = 0;
    while pongs < BATCH * BATCHES {
        match c.ws.read() {
            Ok(Message::Pong(payload)) => {
                assert_eq!(payload.len(), 125);
                pongs += 1;
            }
            Ok(other) => panic!("expected pongs only, got {other:?}"),
            Err(e) => panic!("after {pongs} pongs: {e}"),
        }
    }
    assert_eq!(writer.join().unwrap(), BATCHES);
    c.ping();
    server.client(&format!("/ws?key={ACME}")).ping();
}

/// Hole 2: drop-oldest also dropped queued pongs, so keepalives of a subscriber on a busy
/// channel timed out (100 pings, 36 pongs). And the slow_consumer notice could itself be
/// dropped. Now every ping gets its pong, and the notices account for every dropped message.
#[test]
fn pongs_and_drop_notices_survive_a_burst_to_a_slow_subscriber() {
    let server =
        Server::start("[limits]\noutbound_queue_messages = 64\noutbound_queue_bytes = 262144\n");
    let channel = "org:acme:usage";
    let mut slow = server.slow_client(ACME);
    slow.subscribe(&[channel]);
    let mut publisher = server.client(&format!("/ws?key={ACME}"));
    let pad = "x".repeat(2000);
    const COUNT: u64 = 5_000;
    let mut pinger = raw(&slow);
    for n in 1..=COUNT {
        let mut publish = json!({"type":"PUBLISH","channel":channel,"data":{"n":n,"pad":pad}});
        if n == COUNT {
            publish["id"] = json!("last");
        }
        publisher.send(publish);
        if n % 50 == 0 {
            let payload = (n / 50).to_string();
            pinger
                .write_all(&client_frame(0x9, payload.as_bytes()))
                .unwrap();
        }
    }
    assert_eq!(publisher.recv_type("ACK")["seq"], COUNT);
    let (mut pongs, mut received, mut told, mut last) = (0u64, 0u64, 0u64, 0u64);
    while last < COUNT {
        match slow.ws.read().expect("read") {
            Message::Pong(payload) => {
                pongs += 1;
                assert_eq!(payload, pongs.to_string().as_bytes(), "pongs in ping order");
            }
            Message::Text(t) => {
                let m: serde_json::Value = serde_json::from_str(&t).unwrap();
                match m["type"].as_str() {
                    Some("ERROR") => {
                        assert_eq!(m["code"], "slow_consumer", "{m}");
                        told += m["dropped"].as_u64().unwrap();
                    }
                    Some("MESSAGE") => {
                        let seq = m["seq"].as_u64().unwrap();
                        assert!(seq > last, "seq {seq} after {last}");
                        last = seq;
                        received += 1;
                    }
                    _ => panic!("unexpected {m}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        told > 0,
        "the burst should have overflowed the slow subscriber"
    );
    assert_eq!(
        received + told,
        COUNT,
        "every message arrived or was reported dropped"
    );
    // The pings went on the subscriber's own connection while the burst went on another:
    // the server may read the last of them after it queued the last message, so their
    // pongs may follow it. None may be missing.
    while pongs < COUNT / 50 {
        match slow.ws.read().expect("read") {
            Message::Pong(payload) => {
                pongs += 1;
                assert_eq!(payload, pongs.to_string().as_bytes(), "pongs in ping order");
            }
            other => panic!("only pongs after the last message, not {other:?}"),
        }
    }
    slow.ping();
    server.wait_health("drop counter to match", |h| {
        h["metrics"]["messages"]["dropped"] == told
    });
}

/// Hole 3: the answers to a client's own requests went through drop-oldest (135,000
/// pipelined INGESTs, 39,557 ACKs). Now a client that does not read its answers is not read
/// either, and when it reads it finds every ACK, in order, across shards, with its fan-out
/// copies either delivered or reported dropped.
#[test]
fn acks_are_never_dropped_for_a_client_that_sends_before_reading() {
    let server = Server::start(
        "[limits]\noutbound_queue_messages = 64\nreply_queue_messages = 16\n[storage]\nurl = \"memory\"\n",
    );
    let decisions = "org:acme:decisions";
    let owner = shardcast::shard::owner_of(decisions, 2);
    // Its decisions' owner is the other shard: those ACKs cross the mesh.
    let mut c = slow_client_on(&server, ACME, 1 - owner);
    c.subscribe(&["org:acme:usage", decisions]);
    // Long ids make long ACKs: enough of them to fill the kernel's buffers on the way back.
    const COUNT: usize = 20_000;
    let id = |n: usize| format!("{n:0>200}");
    let mut requests = Vec::new();
    for n in 0..COUNT {
        let request = if n % 2 == 0 {
            json!({"type":"PUBLISH","channel":"org:acme:usage","data":n,"id":id(n)})
        } else {
            ingest(decisions, &id(n), decision("acme"))
        };
        requests.extend(client_frame(0x1, request.to_string().as_bytes()));
    }
    let writer = flood(raw(&c), requests, 1);
    server.wait_metric("shardcast_reads_paused_total", 1);
    let (mut acked, mut fanned, mut told) = (Vec::new(), 0u64, 0u64);
    // Counts fan-out copies and drop notices; hands anything else back.
    let mut tally = |m: serde_json::Value| match m["type"].as_str() {
        Some("MESSAGE" | "DECISION") => {
            fanned += 1;
            None
        }
        Some("ERROR") if m["code"] == "slow_consumer" => {
            told += m["dropped"].as_u64().unwrap();
            None
        }
        _ => Some(m),
    };
    while acked.len() < COUNT {
        if let Some(m) = tally(c.recv()) {
            assert_eq!(m["type"], "ACK", "unexpected {m}");
            acked.push(m["id"].as_str().unwrap().parse::<usize>().unwrap());
        }
    }
    assert_eq!(writer.join().unwrap(), 1);
    // Each kind in the order sent (the two owners answer independently).
    let (publishes, ingests): (Vec<usize>, Vec<usize>) = acked.iter().partition(|n| *n % 2 == 0);
    assert_eq!(publishes, (0..COUNT).step_by(2).collect::<Vec<_>>());
    assert_eq!(ingests, (1..COUNT).step_by(2).collect::<Vec<_>>());
    // The fan-out copies not yet read come before the answer to this PING.
    c.send(json!({"type":"PING","timestamp":"end"}));
    loop {
        if let Some(m) = tally(c.recv()) {
            assert_eq!(m["type"], "PONG", "unexpected {m}");
            break;
        }
    }
    assert_eq!(
        fanned + told,
        COUNT as u64,
        "each copy delivered or reported dropped"
    );
}

/// A client that stops reading for good while its reply budget is spent is closed with 4408
/// after `reply_timeout_ms`, and the server goes on serving others.
#[test]
fn a_client_stuck_on_unread_replies_is_closed_with_4408() {
    let server =
        Server::start("[limits]\nreply_queue_messages = 16\n[websocket]\nreply_timeout_ms = 300\n");
    let mut c = server.slow_client(ACME);
    let pings = client_frame(0x9, &[b'p'; 125]).repeat(1_000);
    // Stuck for good: it stops writing too, once the server stops reading it.
    let patience = Some(std::time::Duration::from_millis(200));
    let writer = flood_until(raw(&c), pings, 1_000, patience);
    server.wait_metric("shardcast_stalled_closes_total", 1);
    assert_eq!(c.recv_close(), Some(4408));
    writer.join().unwrap();
    server.client(&format!("/ws?key={ACME}")).ping();
}

/// Hole 7a: a partial frame could be held for ever while the client trickled bytes. A message
/// must now arrive whole within `message_timeout_ms` of the previous one: else 4408.
#[test]
fn a_message_left_incomplete_is_closed_with_4408() {
    let server = Server::start("[websocket]\nmessage_timeout_ms = 300\n");
    let mut c = server.client(&format!("/ws?key={ACME}"));
    c.ping();
    let frame = client_frame(0x1, &[b' '; 1000]);
    raw(&c).write_all(&frame[..100]).unwrap();
    assert_eq!(c.recv_close(), Some(4408));
    assert!(server.wait_metric("shardcast_stalled_closes_total", 1) >= 1);
    server.client(&format!("/ws?key={ACME}")).ping();
}

/// Hole 4: duplicate keys got past INGEST validation (the server read the first, JavaScript
/// reads the last). Now any name twice in one object is `bad_request` naming it, and nothing
/// is stored or fanned out.
#[test]
fn duplicate_keys_are_refused_and_nothing_is_stored() {
    let server = Server::start("");
    let channel = "org:acme:decisions";
    let mut watcher = server.client(&format!("/ws?key={ACME}"));
    watcher.subscribe(&[channel]);
    let mut c = server.client(&format!("/ws?key={ACME}"));
    let raw = r#"{"type":"INGEST","channel":"org:acme:decisions","schema":"decision.v1","idempotencyKey":"dup-1","data":{"orgId":"acme","orgId":"other","direction":"precheck","decision":"allow","decision":"nonsense","payloadHash":"h"}}"#;
    c.send_text(raw);
    let e = c.recv();
    assert_eq!(e["code"], "bad_request", "{e}");
    assert_eq!(e["id"], "dup-1", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(r#"duplicate key "orgId""#),
        "{e}"
    );
    // An escaped spelling of the server's own "id" is the same name too.
    let spoof = ingest(channel, "dup-2", decision("acme"));
    let spoof = spoof
        .to_string()
        .replace(r#""data":{"#, r#""data":{"\u0069d":"dec_fake","id":"x","#);
    c.send_text(&spoof);
    assert_eq!(c.recv()["code"], "bad_request");
    for (text, key) in [
        (
            r#"{"type":"PING","timestamp":1,"timestamp":2}"#,
            "timestamp",
        ),
        (
            r#"{"type":"PUBLISH","channel":"org:acme:usage","data":{"a":{"b":1,"b":2}}}"#,
            "b",
        ),
    ] {
        c.send_text(text);
        let e = c.recv();
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains(&format!("duplicate key {key:?}")),
            "{e}"
        );
    }
    // Nothing reached the watcher, and nothing was stored.
    c.send(ingest(channel, "ok-1", decision("acme")));
    assert_eq!(c.recv_type("ACK")["seq"], 1);
    assert_eq!(watcher.recv_type("DECISION")["seq"], 1);
    let (status, body) = server.get(&format!("/api/decisions?key={ACME}"));
    assert_eq!(status, 200, "{body}");
    let stored: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stored["decisions"].as_array().unwrap().len(), 1, "{body}");
}

/// Hole 7: `invalid_channel` echoed the offending name twice, whole (a 1 MB name made a
/// 2.1 MB reply). Now the message quotes at most 64 bytes and the `channel` field at most a
/// valid name's length.
#[test]
fn refusals_echo_a_bounded_part_of_the_input() {
    let server = Server::start("");
    let mut c = server.client(&format!("/ws?key={ACME}"));
    let name = format!("org:acme:{}", "x".repeat(60_000));
    c.send(json!({"type":"SUB","channels":[name],"id":"s"}));
    let e = c.recv();
    assert_eq!(e["code"], "invalid_channel", "{e}");
    assert!(
        e.to_string().len() < 600,
        "reply of {} bytes",
        e.to_string().len()
    );
    c.send(json!({"type":"PUBLISH","channel":name,"data":1,"id":"p"}));
    let e = c.recv();
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("invalid_channel"), Some("p"))
    );
    assert!(
        e.to_string().len() < 400,
        "reply of {} bytes",
        e.to_string().len()
    );
    c.send(json!({"type":"X".repeat(50_000)}));
    let e = c.recv();
    assert!(
        e.to_string().len() < 400,
        "reply of {} bytes",
        e.to_string().len()
    );
}

/// Hole 7: forbidden requests never counted toward the bad-message limit, so a client could
/// probe other orgs' channels for ever. Now `limits.max_bad_messages` refusals in a row close
/// it with 4400; an accepted request in between resets the count.
#[test]
fn repeated_forbidden_requests_close_with_4400() {
    let server = Server::start("[limits]\nmax_bad_messages = 5\n");
    let mut c = server.client(&format!("/ws?key={ACME}"));
    for _ in 0..4 {
        c.send(json!({"type":"PUBLISH","channel":"org:other:usage","data":1}));
        assert_eq!(c.recv()["code"], "forbidden");
    }
    c.ping();
    for _ in 0..4 {
        c.send(json!({"type":"SUB","channels":["org:other:usage"]}));
        assert_eq!(c.recv()["code"], "forbidden");
    }
    c.send(ingest("org:other:decisions", "k", decision("other")));
    assert_eq!(c.recv()["code"], "forbidden");
    assert_eq!(c.recv_close(), Some(4400));
    server.client(&format!("/ws?key={ACME}")).ping();
}

/// Send a raw request head; returns the status line's code and the whole response.
fn raw_request(server: &Server, head: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // The status line is enough; an upgraded connection stays open.
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

fn upgrade_head(version: &str, key: &str, extra: &str) -> String {
    format!(
        "GET /ws?key={ACME} HTTP/{version}\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{key}{extra}\r\n"
    )
}

/// Hole 7: an empty or malformed `Sec-WebSocket-Key` and HTTP/1.0 upgrades were accepted;
/// RFC 6455 4.2.1 says 400. Heads with up to 64 headers and 16 KiB are served (browsers
/// behind proxies send more than 32); beyond, 431.
#[test]
fn handshakes_follow_rfc_6455() {
    let server = Server::start("");
    let good = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    assert_eq!(raw_request(&server, &upgrade_head("1.1", good, "")).0, 101);
    for key in [
        "",
        "Sec-WebSocket-Key: \r\n",
        "Sec-WebSocket-Key: c2hvcnQ=\r\n",
        "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n",
    ] {
        let (code, text) = raw_request(&server, &upgrade_head("1.1", key, ""));
        assert_eq!(code, 400, "{key:?}: {text}");
    }
    let (code, text) = raw_request(&server, &upgrade_head("1.0", good, ""));
    assert_eq!(code, 400, "HTTP/1.0: {text}");
    let headers: String = (0..55).map(|i| format!("X-Proxy-{i}: hop\r\n")).collect();
    assert_eq!(
        raw_request(&server, &upgrade_head("1.1", good, &headers)).0,
        101
    );
    let big = format!("Cookie: {}\r\n", "c".repeat(12_000));
    assert_eq!(
        raw_request(&server, &upgrade_head("1.1", good, &big)).0,
        101
    );
    let headers: String = (0..70).map(|i| format!("X-Proxy-{i}: hop\r\n")).collect();
    assert_eq!(
        raw_request(&server, &upgrade_head("1.1", good, &headers)).0,
        431
    );
    let big = format!("Cookie: {}\r\n", "c".repeat(17_000));
    assert_eq!(
        raw_request(&server, &upgrade_head("1.1", good, &big)).0,
        431
    );
    server.client(&format!("/ws?key={ACME}")).ping();
}

/// Hole 7: a partial handshake whose client had already closed its side (FIN) was sometimes
/// held until the handshake timeout. It is dropped as soon as the FIN is read, even when the
/// FIN came in the same segment as the bytes (one readiness event for both).
#[test]
fn a_half_closed_partial_handshake_is_dropped_at_once() {
    use std::io::Read;
    let server = Server::start("[websocket]\nhandshake_timeout_ms = 600000\n");
    let addr = server.addr;
    // Many at once: the race needs the readiness event handled before the first read.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                let mut streams = Vec::new();
                for _ in 0..100 {
                    let s = TcpStream::connect(addr).unwrap();
                    // Corked, the bytes and the FIN leave in one segment.
                    let sock = socket2::SockRef::from(&s);
                    sock.set_tcp_cork(true).unwrap();
                    (&s).write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\n").unwrap();
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    streams.push(s);
                }
                let mut held = 0;
                for s in streams {
                    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                        .unwrap();
                    if (&s).read_to_end(&mut Vec::new()).is_err() {
                        held += 1;
                    }
                }
                held
            })
        })
        .collect();
    let held: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(held, 0, "half-closed handshakes held open");
    server.client(&format!("/ws?key={ACME}")).ping();
}

/// Hole 5: a token whose `nbf` is an hour ahead was accepted. It is refused (4403).
#[test]
fn a_token_not_valid_yet_is_refused() {
    let server = Server::start("");
    let now = unix_now();
    let early = jwt_with(json!({"sub":"u1","org":"acme","exp":now + 7200,"nbf":now + 3600}));
    let mut c = Client::connect(server.addr, &format!("/ws?token={early}")).unwrap();
    assert_eq!(c.recv_close(), Some(4403));
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains(r#"shardcast_auth_failures_total{reason="invalid_token"} 1"#),
        "{metrics}"
    );
}

/// Hole 5: a token whose `exp` passed on an open connection kept working. Now the client is
/// told (`SYSTEM token_expired`), its requests are refused with `token_expired` while it may
/// still refresh, and it is closed with 4403 when the grace ends.
#[test]
fn an_expired_token_is_told_refused_then_closed_with_4403() {
    let server = Server::start("[auth]\ntoken_grace_ms = 1000\n");
    let mut c = server.client(&format!("/ws?token={}", jwt(1, &["subscribe", "publish"])));
    c.subscribe(&["org:acme:usage"]);
    let notice = c.recv();
    assert_eq!(
        (notice["type"].as_str(), notice["event"].as_str()),
        (Some("SYSTEM"), Some("token_expired")),
        "{notice}"
    );
    assert_eq!(notice["graceMs"], 1000);
    c.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":1,"id":"late"}));
    let e = c.recv();
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("token_expired"), Some("late"))
    );
    c.send(json!({"type":"SUB","channels":["org:acme:decisions"],"id":"s"}));
    assert_eq!(c.recv()["code"], "token_expired");
    assert_eq!(c.recv_close(), Some(4403));
}

/// Hole 5: `REFRESH` with a new token keeps the connection, applies the new rights at once
/// (a channel it may no longer read is unsubscribed) and moves the expiry; a token for
/// someone else, or a bad one, is refused and changes nothing.
#[test]
fn refresh_replaces_the_token_without_reconnecting() {
    let server = Server::start("[auth]\ntoken_grace_ms = 60000\n");
    let mut c = server.client(&format!("/ws?token={}", jwt(1, &["subscribe", "publish"])));
    c.subscribe(&["user:u1:notifications"]);
    assert_eq!(c.recv()["event"], "token_expired");
    let other = jwt_with(json!({"sub":"u2","org":"acme","exp":unix_now() + 3600}));
    c.send(json!({"type":"REFRESH","token":other,"id":"r0"}));
    let e = c.recv();
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("forbidden"), Some("r0"))
    );
    c.send(json!({"type":"REFRESH","token":"not.a.jwt","id":"r1"}));
    assert_eq!(c.recv()["code"], "invalid_token");
    // Publish only now: the subscription it can no longer hold goes first.
    c.send(json!({"type":"REFRESH","token":jwt(3600, &["publish"]),"id":"r2"}));
    let unsub = c.recv();
    assert_eq!(unsub["type"], "UNSUBSCRIBED", "{unsub}");
    assert_eq!(unsub["channels"], json!(["user:u1:notifications"]));
    let refreshed = c.recv();
    assert_eq!(refreshed["type"], "REFRESHED", "{refreshed}");
    assert_eq!(refreshed["id"], "r2");
    let expires = refreshed["expiresAt"].as_i64().unwrap() / 1000;
    assert!(
        (expires - unix_now() - 3600).abs() <= 2,
        "expiresAt {expires}"
    );
    c.send(json!({"type":"PUBLISH","channel":"user:u1:notifications","data":1,"id":"p"}));
    let ack = c.recv();
    assert_eq!(ack["type"], "ACK", "{ack}");
    c.send(json!({"type":"SUB","channels":["user:u1:notifications"],"id":"s"}));
    assert_eq!(c.recv()["code"], "forbidden");
    // An API-key connection has no token to refresh.
    let mut k = server.client(&format!("/ws?key={ACME}"));
    k.send(json!({"type":"REFRESH","token":jwt(3600, &["publish"])}));
    assert_eq!(k.recv()["code"], "bad_request");
}

/// Cases that already had the right answer, kept so they stay right: each bad frame fails
/// the connection with its RFC 6455 code, and the server goes on serving.
#[test]
fn protocol_violations_get_their_close_codes() {
    let server = Server::start("");
    let path = format!("/ws?key={ACME}");
    let mut huge_header = vec![0x81, 0x80 | 127];
    huge_header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge_header.extend_from_slice(&[0, 0, 0, 0]);
    let mut msb_set = vec![0x81, 0x80 | 127];
    msb_set.extend_from_slice(&u64::MAX.to_be_bytes());
    msb_set.extend_from_slice(&[0, 0, 0, 0]);
    let split = "é".as_bytes();
    let mut bad_utf8_fragments = client_frame(0x1, &split[..1])[..].to_vec();
    bad_utf8_fragments[0] &= 0x7f; // not final
    bad_utf8_fragments.extend(client_frame(0x0, &[0x28]));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("oversized frame header", huge_header, 1009),
        ("64-bit length with its top bit set", msb_set, 1009),
        ("invalid UTF-8 across fragments", bad_utf8_fragments, 1007),
        (
            "reserved bits",
            {
                let mut f = client_frame(0x1, b"{}");
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        (
            "close code 1005 (reserved)",
            client_frame(0x8, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "close code 999",
            client_frame(0x8, &999u16.to_be_bytes()),
            1002,
        ),
        ("unmasked frame", vec![0x81, 0x02, b'{', b'}'], 1002),
        ("ping over 125 bytes", client_frame(0x9, &[0; 126]), 1002),
    ];
    for (what, wire, code) in cases {
        let mut s = raw_ws(&server, &path);
        s.write_all(&wire).unwrap();
        assert_eq!(read_close_code(&mut s), Some(code), "{what}");
    }
    server.client(&path).ping();
}

/// Slowloris (a head trickled byte by byte) is dropped at the handshake timeout; a flood of
/// headers gets 431; neither holds the server.
#[test]
fn slowloris_and_header_floods_are_cut_off() {
    use std::io::Read;
    let server = Server::start("[websocket]\nhandshake_timeout_ms = 300\n");
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.set_read_timeout(Some(WAIT)).unwrap();
    for b in b"GET /ws HTTP/1.1\r\nHost: t\r\nX-Slow: " {
        if slow.write_all(&[*b]).is_err() {
            break;
        }
    }
    // Nothing more is sent: the server closes it (EOF or a reset, never a timeout here).
    let mut buf = [0u8; 64];
    match slow.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("unexpected answer {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "not closed: {e}"),
    }
    let flood: String = (0..10_000).map(|i| format!("X-{i}: y\r\n")).collect();
    let (code, _) = raw_request(&server, &format!("GET /ws HTTP/1.1\r\n{flood}\r\n"));
    assert_eq!(code, 431);
    server.client(&format!("/ws?key={ACME}")).ping();
}

/// A 100,000-name SUB and nesting 500,000 deep are refused, cheaply: deep input is refused
/// before a tree is built of it (it cost about 60 MB of memory per megabyte before).
#[test]
fn huge_and_deep_requests_are_answered_without_harm() {
    let server = Server::start("[limits]\nmax_message_bytes = 2000000\n");
    let rss_before = server.rss_kib();
    let mut c = server.client(&format!("/ws?key={ACME}"));
    let names: Vec<String> = (0..100_000).map(|i| format!("org:acme:c{i}")).collect();
    c.send(json!({"type":"SUB","channels":names,"id":"big"}));
    let e = c.recv();
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("bad_request"), Some("big"))
    );
    assert!(e["message"].as_str().unwrap().contains("1 to 100"), "{e}");
    let depth = 500_000;
    let deep = format!(
        r#"{{"type":"PUBLISH","channel":"org:acme:usage","id":"deep","data":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    c.send_text(&deep);
    let e = c.recv();
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("bad_request"), Some("deep"))
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("nested deeper than 128"),
        "{e}"
    );
    c.ping();
    // Parsing a message costs a multiple of its size (simd-json's tape and values): the
    // 1.5 MB SUB took the RSS up by about 54 MB here. The bound is max_message_bytes.
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
}

/// Tokens signed with another algorithm than HS256 (none, HS512 with the same secret, a
/// public-key algorithm) are refused with 4403.
#[test]
fn forged_jwt_algorithms_are_refused() {
    use base64_url as b64;
    let server = Server::start("");
    let claims = json!({"sub":"u1","org":"acme","exp":unix_now() + 3600,"scopes":["admin"]});
    let body = b64::encode(claims.to_string().as_bytes());
    let none = format!("{}.{body}.", b64::encode(br#"{"alg":"none","typ":"JWT"}"#));
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let rs256 = format!(
        "{}.{body}.{}",
        b64::encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64::encode(b"not a signature")
    );
    for (what, token) in [("alg none", none), ("HS512", hs512), ("RS256", rs256)] {
        let mut c = Client::connect(server.addr, &format!("/ws?token={token}")).unwrap();
        assert_eq!(c.recv_close(), Some(4403), "{what}");
    }
    server.client(&format!("/ws?key={ACME}")).ping();
}

/// Unpadded base64url, as JWTs use.
mod base64_url {
    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

/// An upgrade from source address `from`: the response's head.
fn upgrade_from(server: &Server, from: [u8; 4]) -> String {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local = std::net::SocketAddr::from((from, 0));
    socket.bind(&local.into()).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    upgrade_response(&mut socket.into(), &format!("/ws?key={ACME}"))
}

#[test]
fn an_address_opening_connections_too_fast_gets_429_and_others_do_not() {
    // One shard: its share is the whole rate.
    let server = Server::start_with(
        1,
        "[limits]\nconnections_per_ip_per_second = 1\nconnection_burst_per_ip = 3\n",
    );
    let mut open = Vec::new();
    for _ in 0..3 {
        let head = upgrade_from(&server, [127, 0, 0, 7]);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        open.push(head);
    }
    let refused = upgrade_from(&server, [127, 0, 0, 7]);
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("Retry-After: 1\r\n"), "{refused}");
    assert_eq!(
        server.wait_metric("shardcast_connections_rate_limited_total", 1),
        1
    );
    // Another address has its own budget.
    let other = upgrade_from(&server, [127, 0, 0, 8]);
    assert!(other.starts_with("HTTP/1.1 101"), "{other}");
}
