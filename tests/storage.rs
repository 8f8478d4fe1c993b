//! Durable decisions end to end: a real server, a real SQLite file or PostgreSQL database, a
//! SIGKILL in the middle.

mod common;

use std::time::{Duration, Instant};

use common::{decision, ingest, Client, Server, ACME};
use serde_json::{json, Value};

const CHANNEL: &str = "org:acme:decisions";

/// Send one INGEST and return its answer (ACK or ERROR).
fn ingest_one(c: &mut Client, key: &str) -> Value {
    c.send(ingest(CHANNEL, key, decision("acme")));
    let answer = c.recv();
    assert!(
        answer["type"] == "ACK" || answer["type"] == "ERROR",
        "{answer}"
    );
    answer
}

#[test]
fn acknowledged_decisions_survive_kill_9_and_keep_deduplicating() {
    const N: u64 = 40;
    let server = Server::start("");
    let mut producer = server.client_on(ACME, 1);
    // Pipelined: all N in flight at once, so they share commits.
    for n in 0..N {
        producer.send(ingest(CHANNEL, &format!("k{n}"), decision("acme")));
    }
    let acks: Vec<Value> = (0..N).map(|_| producer.recv_type("ACK")).collect();
    for (n, ack) in acks.iter().enumerate() {
        assert_eq!(ack["id"], format!("k{n}"));
        assert_eq!(ack["dedup"], false);
        assert_eq!(ack["seq"], n as u64 + 1, "{ack}");
    }

    let server = server.kill_and_restart();
    let mut producer = server.client_on(ACME, 0);
    for (n, original) in acks.iter().enumerate() {
        let again = ingest_one(&mut producer, &format!("k{n}"));
        assert_eq!(again["dedup"], true, "{again}");
        assert_eq!(again["decisionId"], original["decisionId"]);
        assert_eq!(again["seq"], original["seq"]);
    }
    // The channel's sequence continues where the stored decisions left it.
    let mut sub = server.client_on(ACME, 1);
    sub.subscribe(&[CHANNEL]);
    let next = ingest_one(&mut producer, "fresh");
    assert_eq!(next["dedup"], false);
    assert_eq!(next["seq"], N + 1);
    let delivered = sub.recv();
    assert_eq!(delivered["type"], "DECISION");
    assert_eq!(delivered["seq"], N + 1);
}

#[test]
fn acknowledged_on_receipt_still_deduplicates_after_kill_9() {
    let server = Server::start("[storage]\nack = \"received\"\n");
    let mut producer = server.client_on(ACME, 0);
    let ack = ingest_one(&mut producer, "behind");
    assert_eq!(ack["dedup"], false);
    // Written behind: wait until the row is in the default SQLite file, then kill.
    let db = server.data_dir().join("decisions.db");
    let deadline = Instant::now() + common::WAIT;
    while stored_keys(&db, "behind") == 0 {
        assert!(Instant::now() < deadline, "never written");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(producer);

    let server = server.kill_and_restart();
    let mut sub = server.client_on(ACME, 1);
    sub.subscribe(&[CHANNEL]);
    let mut producer = server.client_on(ACME, 0);
    // Known from the store at start-up: answered at once, and not fanned out again.
    let again = ingest_one(&mut producer, "behind");
    assert_eq!(again["dedup"], true, "{again}");
    assert_eq!(again["decisionId"], ack["decisionId"]);
    producer.send(json!({"type":"PUBLISH","channel":CHANNEL,"data":"marker","id":"m"}));
    assert_eq!(sub.recv()["data"], "marker");
}

/// Rows stored under idempotency key `key` (0 while the database is not there yet).
fn stored_keys(db: &std::path::Path, key: &str) -> i64 {
    let Ok(conn) = rusqlite::Connection::open(db) else {
        return 0;
    };
    conn.query_row(
        "SELECT count(*) FROM decisions WHERE idempotency_key = ?1",
        [key],
        |row| row.get(0),
    )
    .unwrap_or(0)
}

#[test]
fn messages_after_a_pending_decision_keep_their_order() {
    let server = Server::start("");
    let mut sub = server.client_on(ACME, 0);
    sub.subscribe(&[CHANNEL]);
    let mut producer = server.client_on(ACME, 1);
    // A decision, then a PUBLISH on the same channel while the decision may still be committing:
    // subscribers see them in seq order, each once.
    for n in 0..20 {
        producer.send(ingest(CHANNEL, &format!("d{n}"), decision("acme")));
        producer.send(json!({"type":"PUBLISH","channel":CHANNEL,"data":{"n":n}}));
    }
    for seq in 1..=40u64 {
        let m = sub.recv();
        assert_eq!(m["seq"], seq, "{m}");
        let kind = if seq % 2 == 1 { "DECISION" } else { "MESSAGE" };
        assert_eq!(m["type"], kind, "{m}");
    }
}

#[test]
fn the_same_key_twice_in_flight_gets_one_decision() {
    let server = Server::start("");
    let mut sub = server.client_on(ACME, 0);
    sub.subscribe(&[CHANNEL]);
    let mut producer = server.client_on(ACME, 1);
    producer.send(ingest(CHANNEL, "twice", decision("acme")));
    producer.send(ingest(CHANNEL, "twice", decision("acme")));
    let first = producer.recv_type("ACK");
    let second = producer.recv_type("ACK");
    assert_eq!(first["dedup"], false);
    assert_eq!(second["dedup"], true);
    assert_eq!(first["decisionId"], second["decisionId"]);
    // One DECISION, then the marker: nothing in between.
    producer.send(json!({"type":"PUBLISH","channel":CHANNEL,"data":"marker","id":"m"}));
    assert_eq!(sub.recv()["type"], "DECISION");
    assert_eq!(sub.recv()["data"], "marker");
}

/// The outage: `role` may no longer log in and its connections are cut (or it may again).
fn lock_out(admin: &mut postgres::Client, role: &str, out: bool) {
    let sql = if out {
        format!(
            "ALTER ROLE {role} NOLOGIN;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}';"
        )
    } else {
        format!("ALTER ROLE {role} LOGIN")
    };
    admin.batch_execute(&sql).unwrap();
}

/// INGEST `key` until it is stored: refused with storage_unavailable until the server reaches
/// the database again (its writer reconnects on a backoff), never anything else.
fn ingest_until_stored(producer: &mut Client, key: &str) -> Value {
    loop {
        let answer = ingest_one(producer, key);
        if answer["type"] == "ACK" {
            return answer;
        }
        assert_eq!(answer["code"], "storage_unavailable", "{answer}");
    }
}

#[test]
fn postgres_outage_refuses_decisions_without_false_acks_then_recovers() {
    let Some(mut admin) = common::postgres_admin("postgres_outage") else {
        return;
    };
    // A role and schema of this test's own: locking the role out is the outage.
    let role = format!("shardcast_outage_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {role} CASCADE; DROP ROLE IF EXISTS {role};
             CREATE ROLE {role} LOGIN; CREATE SCHEMA {role} AUTHORIZATION {role};"
        ))
        .unwrap();
    let url = format!("postgres://{role}@127.0.0.1:5432/test?options=-csearch_path%3D{role}");
    let server = Server::start(&format!("[storage]\nurl = \"{url}\"\n"));
    let mut producer = server.client_on(ACME, 0);
    assert_eq!(ingest_one(&mut producer, "before")["type"], "ACK");

    lock_out(&mut admin, &role, true);
    let refused = ingest_one(&mut producer, "during");
    assert_eq!(refused["type"], "ERROR", "{refused}");
    assert_eq!(refused["code"], "storage_unavailable");
    assert_eq!(refused["id"], "during");
    let (status, body) = server.get("/health/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("storage_unavailable"), "{body}");
    // Everything that does not need the database keeps working.
    producer.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":1,"id":"p"}));
    assert_eq!(producer.recv_type("ACK")["id"], "p");

    lock_out(&mut admin, &role, false);
    // The writer reconnects on its backoff; until then the same key keeps being refused.
    let stored = ingest_until_stored(&mut producer, "during");
    assert_eq!(stored["dedup"], false);
    server.wait_ready();
    drop(producer);

    // Restarted while the database is down: the server starts without it, refuses decisions,
    // serves everything else, and catches up (sequences, keys) once the database is back.
    lock_out(&mut admin, &role, true);
    let server = server.kill_and_restart();
    let mut producer = server.client_on(ACME, 1);
    assert_eq!(
        ingest_one(&mut producer, "after")["code"],
        "storage_unavailable"
    );
    let (status, body) = server.get("/health/ready");
    assert_eq!(status, 503, "{body}");
    producer.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":2,"id":"p2"}));
    assert_eq!(producer.recv_type("ACK")["id"], "p2");
    lock_out(&mut admin, &role, false);
    let after = ingest_until_stored(&mut producer, "after");
    // The channel's sequence continues after the stored maximum.
    let next = stored["seq"].as_u64().map(|s| s + 1);
    assert_eq!(
        (after["dedup"].as_bool(), after["seq"].as_u64()),
        (Some(false), next)
    );
    let again = ingest_one(&mut producer, "before");
    assert_eq!(
        (again["dedup"].as_bool(), again["seq"].as_u64()),
        (Some(true), Some(1))
    );
    server.wait_ready();
    drop(producer);
    drop(server);

    let keys: Vec<String> = admin
        .query(
            &format!("SELECT idempotency_key FROM {role}.decisions ORDER BY seq"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keys, ["before", "during", "after"]);
    admin
        .batch_execute(&format!("DROP SCHEMA {role} CASCADE; DROP ROLE {role};"))
        .unwrap();
}
