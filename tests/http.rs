//! The HTTP side of the port as a client sees it: keep-alive and pipelining, request bodies
//! and their limits, the status codes for bad requests, and the `Origin` allow-list with CORS.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use common::*;

/// One response read off a kept-alive connection.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        let found = self
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name));
        found.map(|(_, v)| v.as_str())
    }
}

fn connect(server: &Server) -> BufReader<TcpStream> {
    let s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    BufReader::new(s)
}

fn send(s: &mut BufReader<TcpStream>, bytes: &str) {
    s.get_mut().write_all(bytes.as_bytes()).expect("send");
}

/// Read one response: status line, headers, then exactly `Content-Length` bytes of body.
fn read_response(s: &mut BufReader<TcpStream>) -> Response {
    let mut line = String::new();
    s.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        s.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').expect("name: value");
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let mut response = Response {
        status,
        headers,
        body: String::new(),
    };
    let length: usize = response
        .header("content-length")
        .map_or(0, |l| l.parse().expect("numeric Content-Length"));
    let mut body = vec![0; length];
    s.read_exact(&mut body).expect("body");
    response.body = String::from_utf8(body).expect("UTF-8 body");
    response
}

/// True once the server has closed the connection (EOF, nothing more).
fn closed(s: &mut BufReader<TcpStream>) -> bool {
    let mut rest = Vec::new();
    matches!(s.read_to_end(&mut rest), Ok(0))
}

fn get(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n")
}

#[test]
fn one_connection_serves_pipelined_requests_in_order_then_closes_when_asked() {
    let server = Server::start("");
    let mut s = connect(&server);
    // Three requests in one write: each answered in turn, the connection kept.
    let pipelined = [
        get("/health/live", ""),
        get("/info", ""),
        get("/nowhere", ""),
    ];
    send(&mut s, &pipelined.concat());
    let live = read_response(&mut s);
    assert_eq!(
        (live.status, live.body.as_str()),
        (200, r#"{"status":"alive"}"#)
    );
    assert_eq!(live.header("connection"), Some("keep-alive"));
    let info = read_response(&mut s);
    assert_eq!(info.status, 200);
    assert!(info.body.contains(r#""name":"shardcast""#), "{}", info.body);
    let missing = read_response(&mut s);
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains(r#""error":"not_found""#));
    // An API request needs an answer from another thread: what follows it waits its turn.
    let key = format!("X-API-Key: {ADMIN}\r\n");
    let history = "/api/channels/org:ops:usage/history";
    send(
        &mut s,
        &[get(history, &key), get("/health/live", "")].concat(),
    );
    let page = read_response(&mut s);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains(r#""messages":[]"#), "{}", page.body);
    assert_eq!(read_response(&mut s).status, 200);

    send(&mut s, &get("/health/live", "Connection: close\r\n"));
    let last = read_response(&mut s);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(closed(&mut s));
}

#[test]
fn an_http_1_0_request_is_answered_and_closed() {
    let server = Server::start("");
    let mut s = connect(&server);
    send(&mut s, "GET /health/live HTTP/1.0\r\n\r\n");
    let response = read_response(&mut s);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(closed(&mut s));
}

#[test]
fn a_body_is_read_by_its_length_and_never_taken_for_the_next_request() {
    let server = Server::start("");
    let mut s = connect(&server);
    // The body looks like a request: it must not be served as one.
    let body = "GET /health/live HTTP/1.1\r\n\r\n";
    let post = format!(
        "POST /api/decisions HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    send(&mut s, &post[..40]);
    send(&mut s, &[&post[40..], &get("/info", "")].concat());
    let refused = read_response(&mut s);
    assert_eq!(refused.status, 405);
    assert_eq!(refused.header("allow"), Some("GET, OPTIONS"));
    let next = read_response(&mut s);
    assert!(
        next.body.contains(r#""name":"shardcast""#),
        "the request after the body"
    );
}

#[test]
fn bad_requests_get_their_status_and_the_connection_closes() {
    let server = Server::start("[http]\nmax_body_bytes = 1024\n");
    let cases = [
        (
            "POST /api/decisions HTTP/1.1\r\nContent-Length: 1025\r\n\r\n".to_string(),
            413,
            "payload_too_large",
        ),
        (
            "POST /api/decisions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_string(),
            411,
            "length_required",
        ),
        (
            "POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_string(),
            400,
            "bad_request",
        ),
        (
            "GET /x HTTP/1.1\r\nContent-Length: many\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            "\x16\x03\x01 not http\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(17 * 1024)),
            431,
            "bad_request",
        ),
    ];
    for (request, status, code) in cases {
        let mut s = connect(&server);
        send(&mut s, &request);
        let response = read_response(&mut s);
        assert_eq!(response.status, status, "{request:.60}");
        assert!(response.body.contains(code), "{}", response.body);
        assert_eq!(response.header("connection"), Some("close"));
        assert!(closed(&mut s), "closed after {status}");
    }
    // Within the limit, a body is fine (the route still decides: 405 here).
    let mut s = connect(&server);
    let body = "x".repeat(1024);
    send(
        &mut s,
        &format!("POST /health HTTP/1.1\r\nContent-Length: 1024\r\n\r\n{body}"),
    );
    assert_eq!(read_response(&mut s).status, 405);
}

#[test]
fn a_body_refused_as_too_large_is_drained_so_the_413_arrives() {
    // The server answers at the head, while the body is still coming: closing with it unread
    // would make the kernel send a reset, which can destroy the response before it is read.
    let server = Server::start("[http]\nmax_body_bytes = 1024\n");
    let body = "x".repeat(512 * 1024);
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(common::WAIT)).unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            // The server may stop reading once it has the head; that is fine.
            let _ = s
                .write_all(head.as_bytes())
                .and_then(|()| s.write_all(body.as_bytes()));
        })
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).expect("no reset");
    assert!(text.starts_with("HTTP/1.1 413"), "{text:.80}");
    assert!(text.contains("payload_too_large"), "{text}");
    writer.join().unwrap();
}

/// An upgrade request's head, from `origin` when given.
fn upgrade(origin: Option<&str>) -> String {
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    format!(
        "GET /ws?key={ADMIN} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
    )
}

fn status_line(s: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    s.read_line(&mut line).expect("status line");
    line
}

#[test]
fn only_allowed_origins_may_upgrade_or_read_the_api() {
    let server = Server::start(
        "[http]\nallowed_origins = [\"https://app.example.com\", \"https://*.corp.test\"]\n",
    );
    for (origin, allowed) in [
        (Some("https://app.example.com"), true),
        (Some("https://eu.corp.test"), true),
        (None, true),
        (Some("https://evil.example"), false),
        (Some("https://app.example.com.evil.example"), false),
    ] {
        let mut s = connect(&server);
        send(&mut s, &upgrade(origin));
        let line = status_line(&mut s);
        let expected = if allowed { "101" } else { "403" };
        assert!(line.contains(expected), "{origin:?}: {line}");
    }

    let key = format!("X-API-Key: {ADMIN}\r\n");
    let history = "/api/channels/org:ops:usage/history";
    let mut s = connect(&server);
    send(
        &mut s,
        &get(
            history,
            &format!("{key}Origin: https://app.example.com\r\n"),
        ),
    );
    let page = read_response(&mut s);
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(page.header("vary"), Some("Origin"));

    send(
        &mut s,
        &get(history, &format!("{key}Origin: https://evil.example\r\n")),
    );
    let refused = read_response(&mut s);
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains("origin_not_allowed"));
    assert_eq!(refused.header("access-control-allow-origin"), None);

    // A browser's preflight before a cross-origin fetch with an API key header.
    let preflight = format!(
        "OPTIONS {history} HTTP/1.1\r\nHost: test\r\nOrigin: https://eu.corp.test\r\nAccess-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: x-api-key\r\n\r\n"
    );
    send(&mut s, &preflight);
    let answer = read_response(&mut s);
    assert_eq!(answer.status, 204);
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("https://eu.corp.test")
    );
    assert!(answer
        .header("access-control-allow-methods")
        .unwrap()
        .contains("GET"));
    let allowed_headers = answer.header("access-control-allow-headers").unwrap();
    assert!(allowed_headers.to_ascii_lowercase().contains("x-api-key"));
}

#[test]
fn with_no_allow_list_any_page_may_read_the_api() {
    let server = Server::start("");
    let mut s = connect(&server);
    let key = format!("X-API-Key: {ADMIN}\r\n");
    let preflight = "OPTIONS /api/decisions HTTP/1.1\r\nHost: test\r\nOrigin: http://localhost:3000\r\nAccess-Control-Request-Method: GET\r\n\r\n";
    send(&mut s, preflight);
    let answer = read_response(&mut s);
    assert_eq!(answer.status, 204);
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    send(
        &mut s,
        &get(
            "/api/decisions?limit=1",
            &format!("{key}Origin: http://localhost:3000\r\n"),
        ),
    );
    let page = read_response(&mut s);
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.header("access-control-allow-origin"), Some("*"));
    let mut ws = connect(&server);
    send(&mut ws, &upgrade(Some("http://localhost:3000")));
    assert!(status_line(&mut ws).contains("101"));
}

#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let server = Server::start("");
    let mut s = connect(&server);
    let key = format!("X-API-Key: {ADMIN}\r\n");
    // Answered by the channel's owner, possibly on another shard: the end of the request
    // stream must not drop the answer being waited for.
    send(&mut s, &get("/api/channels/org:ops:usage/history", &key));
    s.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
    let page = read_response(&mut s);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(closed(&mut s));
}
