//! Operations: health endpoints, connection limits, graceful shutdown.

mod common;

use common::*;
use serde_json::{json, Value};

#[test]
fn health_endpoints_report_state() {
    let server = Server::start("");
    let mut c = server.client(&format!("/ws?key={ACME}"));
    c.subscribe(&["org:acme:usage"]);
    c.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":1,"id":"a"}));
    c.recv_type("ACK");

    let h = server.wait_health("counters", |h| h["metrics"]["messages"]["received"] == 2);
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["shards"], 2);
    assert_eq!(h["metrics"]["connections"]["active"], 1);
    assert_eq!(h["metrics"]["connections"]["total"], 1);
    assert_eq!(h["metrics"]["connections"]["peak"], 1);
    assert!(h["uptime"]["seconds"].is_u64());
    assert!(h["metrics"]["decisions"]["processed"].is_u64());
    assert!(h["memory"]["rssBytes"].as_u64().unwrap() > 1_000_000, "{h}");
    // READY, SUBSCRIBED, MESSAGE and ACK: WebSocket messages, not the 101 or these responses.
    server.wait_health("4 sent", |h| h["metrics"]["messages"]["sent"] == 4);

    assert_eq!(
        server.get("/health/live"),
        (200, r#"{"status":"alive"}"#.into())
    );
    assert_eq!(
        server.get("/health/ready"),
        (200, r#"{"status":"ready"}"#.into())
    );
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "shardcast_connections_active 1",
        "shardcast_messages_received_total",
        "shardcast_messages_sent_total",
        "shardcast_messages_dropped_total",
        "shardcast_auth_failures_total{reason=\"invalid_key\"}",
        "shardcast_fanout_latency_seconds_bucket{le=\"+Inf\"}",
        "shardcast_fanout_latency_seconds_count",
        "shardcast_event_loop_lag_seconds_bucket{le=\"0.001\"}",
        "shardcast_event_loop_longest_poll_seconds{task=\"connection\"}",
        "shardcast_event_loop_slow_polls_total{task=\"readiness\"}",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    // Each shard's lag probe is due every 10 ms.
    server.wait_metric("shardcast_event_loop_lag_seconds_count", 10);
    let (status, info) = server.get("/info");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["name"], "shardcast");
    assert_eq!(info["shards"], 2);
    assert_eq!(server.get("/nope").0, 404);
    assert_eq!(
        server.get("/ws").0,
        426,
        "a plain GET on /ws is told to upgrade"
    );
}

#[test]
fn upgrades_past_max_connections_get_503() {
    let server = Server::start("max_connections = 2\n");
    let _a = server.client(&format!("/ws?key={ACME}"));
    let _b = server.client(&format!("/ws?key={ACME}"));
    match Client::connect(server.addr, &format!("/ws?key={ACME}")) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("third connection should be refused"),
    }
    // Health checks still answer at capacity.
    assert_eq!(server.get("/health/live").0, 200);
    drop(_a);
    server.wait_health("a slot to free up", |h| {
        h["metrics"]["connections"]["active"] == 1
    });
    server.client(&format!("/ws?key={ACME}"));
}

/// The descriptor table is grown when the server starts, not while clients wait: each growth
/// in a storm of connections held the accept loop for an RCU grace period (12-35 ms).
#[test]
fn descriptor_table_is_grown_at_start_for_max_connections() {
    let server = Server::start("max_connections = 3000\n");
    let proc = |file: &str| {
        std::fs::read_to_string(format!("/proc/{}/{file}", server.child.id()))
            .expect("the server's /proc files")
    };
    let size: u64 = proc("status")
        .lines()
        .find_map(|line| line.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("FDSize in /proc status");
    // The server lowers max_connections to what its descriptor limit allows.
    let limit: u64 = proc("limits")
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("the open-files limit in /proc limits");
    let connections = 3000.min(limit.saturating_sub(64));
    // Room for every connection and the server's own descriptors, before any client came.
    assert!(
        size >= connections + 64,
        "descriptor table of {size} entries for {connections} connections"
    );
}

#[test]
fn sigterm_sends_restart_notice_and_closes_with_1001() {
    let mut server = Server::start("[shutdown]\nreconnect_in_ms = 2500\ndrain_timeout_ms = 3000\n");
    let mut clients: Vec<Client> = [0, 1].iter().map(|&s| server.client_on(ACME, s)).collect();
    for c in &mut clients {
        c.subscribe(&["org:acme:usage"]);
    }
    server.terminate();
    for c in &mut clients {
        let notice = c.recv();
        assert_eq!(
            notice,
            json!({"type":"SYSTEM","event":"restart","reconnectIn":2500})
        );
    }
    // Draining (the clients have not answered the close yet): HTTP is still answered, with
    // 503 for readiness and for new upgrades.
    let (status, body) = server.get("/health/ready");
    assert_eq!(status, 503, "{body}");
    match Client::connect(server.addr, &format!("/ws?key={ACME}")) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(e) => panic!("an upgrade while draining must get 503, got {e}"),
        Ok(_) => panic!("an upgrade while draining must get 503, it was accepted"),
    }
    for c in &mut clients {
        assert_eq!(c.recv_close(), Some(1001));
    }
    drop(clients);
    assert_eq!(server.wait_exit(), Some(0));
}

/// `shardcast check-config --config FILE` with `env`: exit code, stdout, stderr.
fn check_config(file: &std::path::Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_shardcast"));
    command.arg("check-config").arg("--config").arg(file);
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().expect("shardcast runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shardcast.toml");
    std::fs::write(
        &file,
        r#"listen = "127.0.0.1:9000"

[storage]
url = "postgres://app:pg-s3cret@127.0.0.1/test"

[cluster]
redis_url = ["redis://:redis-s3cret@127.0.0.1:6379"]

[[api_keys]]
id = "backend"
secret = "key-s3cret"
org = "acme"
scopes = ["publish"]
"#,
    )
    .unwrap();
    let env = [
        ("SHARDCAST_AUTH__JWT_SECRET", "jwt-s3cret"),
        ("SHARDCAST_SHARDS", "3"),
    ];
    let (code, out, err) = check_config(&file, &env);
    assert_eq!(code, 0, "{err}");
    for secret in ["pg-s3cret", "redis-s3cret", "key-s3cret", "jwt-s3cret"] {
        assert!(!out.contains(secret), "{secret} shown:\n{out}");
    }
    // What takes effect: the file, the environment and the defaults together.
    let effective: toml::Table = out.parse().expect("TOML");
    assert_eq!(effective["listen"].as_str(), Some("127.0.0.1:9000"));
    assert_eq!(effective["shards"].as_integer(), Some(3));
    assert_eq!(effective["auth"]["jwt_secret"].as_str(), Some("***"));
    assert_eq!(effective["api_keys"][0]["secret"].as_str(), Some("***"));
    assert_eq!(
        effective["storage"]["url"].as_str(),
        Some("postgres://***@127.0.0.1/test")
    );
    assert_eq!(
        effective["limits"]["max_subscriptions"].as_integer(),
        Some(1000)
    );
    // It reads back as a configuration itself.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).unwrap();
    let (code, _, err) = check_config(&printed, &[]);
    assert_eq!(code, 0, "{err}");

    // Refused, with the reason: an unknown field, a value that cannot work, no file.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_subscriptionz = 5\n").unwrap();
    let (code, out, err) = check_config(&bad, &[]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("max_subscriptionz"), "{err}");
    std::fs::write(&bad, "[limits]\nmax_message_bytes = 0\n").unwrap();
    let (code, _, err) = check_config(&bad, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("limits"), "{err}");
    std::fs::write(
        &bad,
        "[log]\nformat = \"json\"\nlevel = \"shardcast=loud\"\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&bad, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("log.level"), "{err}");
    let (code, _, err) = check_config(&dir.path().join("missing.toml"), &[]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shardcast.toml");
    let config = format!(
        "listen = \"127.0.0.1:0\"\nshards = 1\n\n[storage]\nurl = \"memory\"\n\n\
         [limits]\nmax_bad_messages = 1\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n\
         [[api_keys]]\nid = \"acme-key\"\nsecret = \"{ACME}\"\norg = \"acme\"\nscopes = [\"subscribe\"]\n"
    );
    std::fs::write(&file, config).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .arg("--config")
        .arg(&file)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start shardcast");
    let stderr = child.stderr.take().unwrap();
    let mut listening = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut listening,
    )
    .unwrap();
    let addr: std::net::SocketAddr = listening
        .trim()
        .trim_start_matches("shardcast listening on ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen: Vec<(String, String)> = Vec::new();
    // Up to the line that says where it listens (info: the level set in [log]).
    loop {
        let line = lines.next().expect("a log line before it listens").unwrap();
        let entry: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
        let message = entry["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(!line.contains('\u{1b}'), "colour codes: {line}");
        let level = entry["level"].as_str().unwrap_or_default().to_owned();
        seen.push((level, message.clone()));
        if message.starts_with("listening on ws://") {
            break;
        }
    }
    let warned = |(level, m): &(String, String)| level == "WARN" && m.contains("NOT durable");
    assert!(seen.iter().any(warned), "{seen:?}");
    // A connection closed for its conduct: the line says which connection, and whose.
    let mut c = Client::connect(addr, &format!("/ws?key={ACME}")).unwrap();
    let ready = c.recv();
    c.send_text("not json");
    assert_eq!(c.recv_close(), Some(4400));
    let closed = loop {
        let line = lines.next().expect("the close's log line").unwrap();
        let entry: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if entry["fields"]["message"] == "closing the connection" {
            break entry;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let fields = &closed["fields"];
    assert_eq!(fields["code"], 4400, "{closed}");
    assert_eq!(fields["org"], "acme", "{closed}");
    assert_eq!(fields["principal"], "key:acme-key", "{closed}");
    assert_eq!(fields["shard"], 0, "{closed}");
    assert_eq!(fields["conn"], ready["connectionId"], "{closed}");
}
