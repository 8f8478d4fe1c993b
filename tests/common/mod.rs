//! Test harness: a real `shardcast` process on an ephemeral port, and real WebSocket clients.
#![allow(dead_code)]

pub mod ca;
pub mod sio;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// Longest any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);
/// Secret of the admin key every test server has.
pub const ADMIN: &str = "admin-secret";
/// Secret of a key for org "acme" with subscribe, publish and ingest.
pub const ACME: &str = "acme-secret";
/// Secret of a key for org "acme" that may only subscribe.
pub const ACME_READONLY: &str = "acme-ro-secret";
/// JWT secret of every test server.
pub const JWT_SECRET: &str = "test-jwt-secret";

/// A running server process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The TLS listener's address, when the configuration has `[tls]`.
    pub tls_addr: Option<SocketAddr>,
    dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Start a server with 2 shards and `extra` TOML appended to the base test config.
    pub fn start(extra: &str) -> Server {
        Self::start_with(2, extra)
    }

    /// Start a server with `shards` shards. Unless `extra` names a storage `url`, decisions go
    /// to a SQLite file in the server's temporary directory (the default backend).
    pub fn start_with(shards: usize, extra: &str) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("shardcast.toml");
        // A SQLite file in the server's own directory, unless the test names its store.
        let db = dir.path().join("decisions.db");
        let url = format!("url = \"sqlite://{}\"\n", db.display());
        let (extra, storage) = match extra.find("[storage]\n") {
            None => (extra.to_string(), format!("[storage]\n{url}")),
            Some(_) if extra.contains("url =") => (extra.to_string(), String::new()),
            Some(at) => {
                let (before, after) = extra.split_at(at + "[storage]\n".len());
                (format!("{before}{url}{after}"), String::new())
            }
        };
        let config = format!(
            r#"
listen = "127.0.0.1:0"
shards = {shards}
{extra}
{storage}

[[api_keys]]
id = "admin"
secret = "{ADMIN}"
org = "ops"
scopes = ["admin"]

[[api_keys]]
id = "acme-key"
secret = "{ACME}"
org = "acme"
scopes = ["subscribe", "publish", "ingest"]

[[api_keys]]
id = "acme-ro"
secret = "{ACME_READONLY}"
org = "acme"
scopes = ["subscribe"]
"#
        );
        std::fs::write(&path, config).expect("write config");
        Self::spawn(dir)
    }

    /// The server's data directory (its config, and the default SQLite database
    /// `decisions.db`).
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir
            .as_ref()
            .expect("a running server has its directory")
            .path()
    }

    /// Kill the server with SIGKILL (nothing flushed, nothing said to clients) and start it
    /// again from the same configuration and data directory.
    pub fn kill_and_restart(mut self) -> Server {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = self.dir.take().expect("a running server has its directory");
        Self::spawn(dir)
    }

    fn spawn(dir: tempfile::TempDir) -> Server {
        let path = dir.path().join("shardcast.toml");
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .env("SHARDCAST_AUTH__JWT_SECRET", JWT_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start shardcast");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout);
        let mut listening = |scheme: &str| -> SocketAddr {
            let mut line = String::new();
            lines.read_line(&mut line).expect("read listen line");
            line.trim()
                .strip_prefix(&format!("shardcast listening on {scheme}://"))
                .and_then(|s| s.strip_suffix("/ws"))
                .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                .parse()
                .expect("address")
        };
        let addr = listening("ws");
        let config = std::fs::read_to_string(&path).unwrap_or_default();
        let tls_addr = config.contains("[tls]").then(|| listening("wss"));
        Server {
            child,
            addr,
            tls_addr,
            dir: Some(dir),
        }
    }

    /// Connect to `path` (with its query) and expect READY.
    pub fn client(&self, path: &str) -> Client {
        let mut c = Client::connect(self.addr, path).expect("connect");
        let ready = c.recv();
        assert_eq!(ready["type"], "READY", "{ready}");
        c.shard = ready["shard"].as_u64().expect("shard") as usize;
        c.connection_id = ready["connectionId"].as_str().unwrap_or_default().into();
        c
    }

    /// Connect with an API key until the connection lands on `shard`.
    pub fn client_on(&self, secret: &str, shard: usize) -> Client {
        for _ in 0..200 {
            let c = self.client(&format!("/ws?key={secret}"));
            if c.shard == shard {
                return c;
            }
        }
        panic!("no connection landed on shard {shard}");
    }

    /// A client (API key `secret`) that reads slowly: a tiny receive buffer makes the kernel
    /// stop taking bytes for it early, so what the server sends it waits in the server.
    pub fn slow_client(&self, secret: &str) -> Client {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&self.addr.into()).unwrap();
        let path = format!("/ws?key={secret}");
        let mut c = Client::over(socket.into(), self.addr, &path).expect("upgrade");
        let ready = c.recv();
        assert_eq!(ready["type"], "READY", "{ready}");
        c.shard = ready["shard"].as_u64().expect("shard") as usize;
        c.connection_id = ready["connectionId"].as_str().unwrap_or_default().into();
        c
    }

    /// GET a path; returns status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path, "")
    }

    /// `/health` as JSON.
    pub fn health(&self) -> Value {
        let (status, body) = self.get("/health");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("health JSON")
    }

    /// Poll `/health` until `pred` holds (counters are published every 100 ms).
    pub fn wait_health(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let h = self.health();
            if pred(&h) {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {h}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Prometheus counter `name` (unlabelled) now, 0 if absent.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    /// Wait until the Prometheus counter `name` reaches at least `min`; returns its value.
    pub fn wait_metric(&self, name: &str, min: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.metric(name);
            if value >= min {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {name} >= {min} (at {value})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until `/health/ready` answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = self.get("/health/ready");
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "not ready: {status} {body}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the server process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The server's configuration file.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.data_dir().join("shardcast.toml")
    }

    /// Replace the configuration file with `change` of its text, whole at once (written
    /// beside it, then renamed over it, as editors and deployment tools do).
    pub fn rewrite_config(&self, change: impl FnOnce(String) -> String) {
        let path = self.config_path();
        let text = change(std::fs::read_to_string(&path).expect("read config"));
        let next = path.with_extension("toml.new");
        std::fs::write(&next, text).expect("write config");
        std::fs::rename(&next, &path).expect("replace config");
    }

    /// Send SIGHUP (reload the configuration).
    pub fn hangup(&self) {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGHUP);
        }
    }

    /// Send SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Wait for the process to exit; returns its status code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run openssl with `args`; its stdout.
pub fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (Debian: apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A plain HTTP GET with optional extra header lines (asking the server to close the
/// connection after it); returns status and body.
pub fn http_get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    http_request(addr, "GET", path, headers, "")
}

/// `POST path` of JSON `body` with API key `key`: the status and the JSON answer.
pub fn post(addr: SocketAddr, path: &str, key: &str, body: &Value) -> (u16, Value) {
    let headers = format!("X-API-Key: {key}\r\nContent-Type: application/json\r\n");
    let (status, text) = http_request(addr, "POST", path, &headers, &body.to_string());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"));
    (status, v)
}

/// One HTTP request with extra header lines and a body (with its `Content-Length`), asking
/// the server to close the connection after it; returns status and body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let text = http_response(addr, method, path, headers, body);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// One HTTP request as [`http_request`] makes it: the whole response, head and body.
pub fn http_response(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let length = if body.is_empty() && method == "GET" {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{length}{headers}\r\n{body}"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read response");
    text
}

/// A WebSocket client (tungstenite, blocking, with a read timeout so a missing message fails
/// the test instead of hanging it).
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub shard: usize,
    /// READY's `connectionId` (empty before READY is read).
    pub connection_id: String,
}

impl Client {
    /// Connect and upgrade; does not read READY.
    pub fn connect(addr: SocketAddr, path: &str) -> Result<Client, tungstenite::Error> {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        Self::over(stream, addr, path)
    }

    /// Upgrade over an already connected stream.
    pub fn over(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
    ) -> Result<Client, tungstenite::Error> {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tungstenite::client(url.as_str(), stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("interrupted handshake"),
        })?;
        Ok(Client {
            ws,
            shard: 0,
            connection_id: String::new(),
        })
    }

    /// Send a JSON text message.
    pub fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    /// Send raw text.
    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    /// Next message, which must be JSON text.
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t}: {e}"))
                }
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(other) => panic!("expected text, got {other:?}"),
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Next message of the given type, skipping others.
    pub fn recv_type(&mut self, kind: &str) -> Value {
        self.recv_type_of(&[kind])
    }

    /// The next message of one of these types (others are skipped).
    pub fn recv_type_of(&mut self, kinds: &[&str]) -> Value {
        loop {
            let v = self.recv();
            if kinds.iter().any(|k| v["type"] == *k) {
                return v;
            }
        }
    }

    /// The next text message, or the close code if the server closes first.
    pub fn recv_close_or_text(&mut self) -> Result<Value, Option<u16>> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return Ok(serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t}: {e}")))
                }
                Ok(Message::Close(frame)) => return Err(frame.map(|f| u16::from(f.code))),
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed) => return Err(None),
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// SUB `channel` with presence, and wait for SUBSCRIBED (JOINs may come before it).
    pub fn join_presence(&mut self, channel: &str) {
        self.send(json!({"type":"SUB","channels":[channel],"presence":true,"id":"s"}));
        self.recv_type("SUBSCRIBED");
    }

    /// PRESENCE of `channel` from `cursor`: the answer.
    pub fn presence(&mut self, channel: &str, cursor: Option<&str>) -> Value {
        let mut ask = json!({"type":"PRESENCE","channel":channel,"id":"p"});
        if let Some(cursor) = cursor {
            ask["cursor"] = json!(cursor);
        }
        self.send(ask);
        self.recv_type("PRESENCE")
    }

    /// The end of a replaced exclusive connection: SYSTEM session_replaced, then 4408.
    pub fn expect_replaced(&mut self) {
        let told = self.recv();
        assert_eq!(
            told,
            json!({"type":"SYSTEM","event":"session_replaced"}),
            "{told}"
        );
        assert_eq!(self.recv_close(), Some(4408));
    }

    /// Read until the server closes; returns the close code.
    pub fn recv_close(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed) => return None,
                Err(e) => panic!("read failed while waiting for close: {e}"),
            }
        }
    }

    /// SUB and wait for SUBSCRIBED.
    pub fn subscribe(&mut self, channels: &[&str]) -> Value {
        self.send(json!({"type":"SUB","channels":channels,"id":"sub"}));
        let v = self.recv();
        assert_eq!(v["type"], "SUBSCRIBED", "{v}");
        v
    }

    /// Round trip a PING: proves the connection still serves.
    pub fn ping(&mut self) {
        self.send(json!({"type":"PING","timestamp":"t"}));
        let v = self.recv_type("PONG");
        assert_eq!(v["timestamp"], "t");
    }

    /// The close code from a `tungstenite` close frame.
    pub fn code(code: CloseCode) -> u16 {
        code.into()
    }
}

/// A raw socket that has completed the upgrade and read READY.
pub fn raw_ws(server: &Server, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).unwrap();
    let head = upgrade_response(&mut s, path);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The READY frame.
    read_frame(&mut s);
    s
}

/// Send an upgrade request for `path` on `s` and read the response head, byte by byte (what
/// follows it stays unread).
pub fn upgrade_response(s: &mut TcpStream, path: &str) -> String {
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        std::io::Read::read_exact(s, &mut byte).unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// One frame from the server: opcode and payload.
pub fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    use std::io::Read;
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).unwrap();
    (h[0] & 0x0f, payload)
}

/// Read frames until a close frame; its code.
pub fn read_close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (op, payload) = read_frame(s);
        if op == 8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

/// A client frame (masked, final) with `opcode` and `payload`, for writing raw to a socket
/// (the load tool's encoder).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    shardcast_bench::ws::push_frame(&mut out, opcode, payload);
    out
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A JWT for user u1 of org acme, expiring `exp_offset` seconds from now.
pub fn jwt(exp_offset: i64, scopes: &[&str]) -> String {
    jwt_with(json!({"sub":"u1","org":"acme","exp":unix_now() + exp_offset,"scopes":scopes}))
}

/// A JWT with exactly these claims, signed with the test servers' secret.
pub fn jwt_with(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign")
}

/// A decision `data` object for `org`.
pub fn decision(org: &str) -> Value {
    json!({
        "orgId": org,
        "direction": "precheck",
        "decision": "allow",
        "tool": "web.fetch",
        "payloadHash": "sha256:abc",
        "latencyMs": 12,
        "tags": ["test"]
    })
}

/// An INGEST message.
pub fn ingest(channel: &str, key: &str, data: Value) -> Value {
    json!({"type":"INGEST","channel":channel,"schema":"decision.v1","idempotencyKey":key,"data":data})
}

/// Channels with the given category whose owners are shard 0 and shard 1 (of 2).
pub fn channels_owned_by_each_shard(category: &str) -> [String; 2] {
    let mut found: [Option<String>; 2] = [None, None];
    for i in 0.. {
        let name = format!("org:team{i}:{category}");
        let owner = shardcast::shard::owner_of(&name, 2);
        if found[owner].is_none() {
            found[owner] = Some(name);
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.map(|c| c.expect("found"))
}

/// End-to-end flow control for tests whose clients are slower than the server: publishers
/// call `before_send` and wait while more than `window` messages are unread by the slowest
/// tracked reader; readers call `received`. A client that reads slower than it publishes
/// would otherwise be a slow consumer, which is a different test.
pub struct Window {
    state: std::sync::Mutex<(u64, Vec<u64>)>,
    changed: std::sync::Condvar,
    window: u64,
}

impl Window {
    /// Track `readers` readers.
    pub fn new(readers: usize, window: u64) -> std::sync::Arc<Window> {
        std::sync::Arc::new(Window {
            state: std::sync::Mutex::new((0, vec![0; readers])),
            changed: std::sync::Condvar::new(),
            window,
        })
    }

    /// Wait until one more message may be sent, and count it as sent.
    pub fn before_send(&self) {
        let guard = self.state.lock().unwrap();
        let mut guard = self
            .changed
            .wait_timeout_while(guard, WAIT, |(sent, got)| {
                *sent - got.iter().min().copied().unwrap_or(0) >= self.window
            })
            .unwrap()
            .0;
        guard.0 += 1;
    }

    /// Reader `i` has received `n` messages in all.
    pub fn received(&self, i: usize, n: u64) {
        if n % 16 == 0 {
            self.state.lock().unwrap().1[i] = n;
            self.changed.notify_all();
        }
    }
}

/// The PostgreSQL server tests use, or `None` (with a loud note) when it is not running here;
/// under CI=true it must be.
pub fn postgres_admin(test: &str) -> Option<postgres::Client> {
    let url = std::env::var("SHARDCAST_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    match postgres::Client::connect(&url, postgres::NoTls) {
        Ok(client) => Some(client),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED {test}: PostgreSQL not reachable at {url} ({e})");
            None
        }
        Err(e) => panic!("PostgreSQL must be reachable at {url} under CI=true: {e}"),
    }
}

/// A PostgreSQL schema of a test's own, dropped when the test ends.
pub struct PgSchema {
    /// Connection string whose search path is the schema.
    pub url: String,
    name: String,
    admin: postgres::Client,
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
    }
}

/// A fresh schema for `test` in the test database (`None`, loudly, when PostgreSQL is not
/// running here and CI is not set).
pub fn postgres_schema(test: &str) -> Option<PgSchema> {
    let mut admin = postgres_admin(test)?;
    let base = std::env::var("SHARDCAST_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let separator = if base.contains('?') { '&' } else { '?' };
    let name = format!("shardcast_{test}_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
        ))
        .expect("create test schema");
    Some(PgSchema {
        url: format!("{base}{separator}options=-csearch_path%3D{name}"),
        name,
        admin,
    })
}

/// The secret of [`EXCLUSIVE_KEY`].
pub const SOLO: &str = "solo-secret";

/// An API key of org acme whose connections hold exclusive sessions (`[sessions]`), as a
/// config section.
pub const EXCLUSIVE_KEY: &str = r#"
[[api_keys]]
id = "solo"
secret = "solo-secret"
org = "acme"
scopes = ["subscribe", "publish"]
session = "exclusive"
"#;

/// The Redis server tests share (127.0.0.1:6379 unless `SHARDCAST_TEST_REDIS` says), or
/// `None` (with a loud note) when it is not running here; under CI=true it must be.
pub fn redis_url(test: &str) -> Option<String> {
    let url =
        std::env::var("SHARDCAST_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let reachable = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    match reachable {
        Ok(_) => Some(url),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED {test}: Redis not reachable at {url} ({e})");
            None
        }
        Err(e) => panic!("Redis must be reachable at {url} under CI=true: {e}"),
    }
}

/// A redis-server of a test's own on a free port (for tests that stop or restart Redis),
/// nothing on disk; killed when dropped.
pub struct OwnRedis {
    /// Its port.
    pub port: u16,
    child: std::process::Child,
}

impl OwnRedis {
    /// Start one on a free port (`None`, loudly, when redis-server is not installed here and
    /// CI is not set).
    pub fn start(test: &str) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        Self::start_on(test, port)
    }

    /// Start one on `port` (again, after [`OwnRedis::stop`]).
    pub fn start_on(test: &str, port: u16) -> Option<Self> {
        let spawned = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIPPED {test}: cannot start redis-server ({e})");
                return None;
            }
            Err(e) => panic!("redis-server must be installed under CI=true: {e}"),
        };
        let redis = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.ping().is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn ping(&self) -> redis::RedisResult<String> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_millis(200))?;
        redis::cmd("PING").query(&mut conn)
    }

    /// Kill it (as a crash would: nothing kept) and wait until it is gone.
    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
