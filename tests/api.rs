//! The HTTP read API against a real server and its SQLite store: filters, paging, org scoping.

mod common;

use common::{decision, http_get, ingest, Server, ACME, ACME_READONLY, ADMIN};
use serde_json::{json, Value};

const DECISIONS: &str = "org:acme:decisions";

fn get(server: &Server, path: &str, key: &str) -> (u16, Value) {
    let (status, body) = http_get(server.addr, path, &format!("X-API-Key: {key}\r\n"));
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {body:?}: {e}"));
    (status, v)
}

fn keys(page: &Value) -> Vec<String> {
    page["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .map(|d| d["idempotencyKey"].as_str().expect("key").to_string())
        .collect()
}

/// Ingest `k1..=kN` on acme's decisions channel (odd: allow, even: deny), plus one decision of
/// another org; returns the ACKs.
fn ingest_some(server: &Server, n: u64) -> Vec<Value> {
    let mut producer = server.client_on(ACME, 0);
    let acks = (1..=n)
        .map(|i| {
            let mut data = decision("acme");
            data["decision"] = json!(if i % 2 == 1 { "allow" } else { "deny" });
            producer.send(ingest(DECISIONS, &format!("k{i}"), data));
            producer.recv_type("ACK")
        })
        .collect();
    let mut admin = server.client_on(ADMIN, 1);
    admin.send(ingest("org:beta:decisions", "b1", decision("beta")));
    assert_eq!(admin.recv_type("ACK")["dedup"], false);
    acks
}

#[test]
fn decisions_are_queried_by_org_with_filters_and_pages() {
    decisions_query(&Server::start(""));
}

#[test]
fn decisions_are_queried_from_postgresql_too() {
    let Some(schema) = common::postgres_schema("api") else {
        return;
    };
    let server = Server::start(&format!("[storage]\nurl = \"{}\"\n", schema.url));
    decisions_query(&server);
    drop(server);
}

fn decisions_query(server: &Server) {
    let acks = ingest_some(server, 7);

    let (status, all) = get(server, "/api/decisions", ACME);
    assert_eq!(status, 200, "{all}");
    let newest_first: Vec<String> = (1..=7).rev().map(|i| format!("k{i}")).collect();
    assert_eq!(keys(&all), newest_first, "only acme's, newest first");
    let first = &all["decisions"][6];
    assert_eq!(first["id"], acks[0]["decisionId"]);
    assert_eq!(first["seq"], 1);
    assert_eq!(first["channel"], DECISIONS);
    assert_eq!(first["data"]["orgId"], "acme");
    assert_eq!(first["tags"], json!(["test"]));
    assert!(all["nextCursor"].is_null(), "one page holds everything");

    let (_, denies) = get(server, "/api/decisions?decision=deny&order=oldest", ACME);
    assert_eq!(keys(&denies), ["k2", "k4", "k6"]);

    // Pages of 3 by cursor: every decision once, in order.
    let mut seen = Vec::new();
    let mut path = "/api/decisions?limit=3&order=oldest".to_string();
    loop {
        let (status, page) = get(server, &path, ACME_READONLY);
        assert_eq!(status, 200, "{page}");
        seen.extend(keys(&page));
        match page["nextCursor"].as_str() {
            Some(cursor) => path = format!("/api/decisions?limit=3&order=oldest&cursor={cursor}"),
            None => break,
        }
    }
    let oldest_first: Vec<String> = (1..=7).map(|i| format!("k{i}")).collect();
    assert_eq!(seen, oldest_first);

    // Time window: nothing before the epoch, nothing after now.
    let (_, none) = get(server, "/api/decisions?until=1970-01-02T00:00:00Z", ACME);
    assert_eq!(keys(&none), Vec::<String>::new());
    let (_, since) = get(server, "/api/decisions?since=2000-01-01T00:00:00Z", ACME);
    assert_eq!(keys(&since).len(), 7);

    // Another org is invisible: asking is refused, and a key of another org sees none of
    // acme's (the admin key belongs to org "ops").
    let (status, refused) = get(server, "/api/decisions?org=beta", ACME);
    assert_eq!(
        (status, refused["error"].as_str()),
        (403, Some("forbidden"))
    );
    let (_, ops) = get(server, "/api/decisions", ADMIN);
    assert_eq!(keys(&ops), Vec::<String>::new());
    let (_, beta) = get(server, "/api/decisions?org=beta", ADMIN);
    assert_eq!(keys(&beta), ["b1"]);

    let (status, _) = get(server, "/api/decisions", "wrong-key");
    assert_eq!(status, 401);
    let (status, bad) = get(server, "/api/decisions?limit=0", ACME);
    assert_eq!((status, bad["error"].as_str()), (400, Some("bad_request")));
    let (status, _) = get(server, "/api/nothing", ACME);
    assert_eq!(status, 404);
}

#[test]
fn channel_history_pages_through_the_ring_and_the_store() {
    // A ring of 2: most of the history comes from the store.
    let server = Server::start("[history]\nsize = 2\n");
    ingest_some(&server, 7);
    let history = |since: u64, limit: u64| {
        let path = format!("/api/channels/{DECISIONS}/history?since={since}&limit={limit}");
        let (status, page) = get(&server, &path, ACME);
        assert_eq!(status, 200, "{page}");
        page
    };
    let seqs = |page: &Value| -> Vec<u64> {
        page["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                assert_eq!(m["type"], "DECISION", "{m}");
                m["seq"].as_u64().expect("seq")
            })
            .collect()
    };
    let page = history(1, 3);
    assert_eq!(seqs(&page), [2, 3, 4]);
    assert_eq!(
        (page["complete"].as_bool(), page["more"].as_bool()),
        (Some(true), Some(true))
    );
    let page = history(page["nextSince"].as_u64().unwrap(), 3);
    assert_eq!(seqs(&page), [5, 6, 7], "store, then ring");
    assert_eq!(page["more"], false);
    assert_eq!(seqs(&history(7, 3)), Vec::<u64>::new());

    // Ephemeral messages come from the ring, and a channel of another org is refused.
    let mut publisher = server.client_on(ACME, 1);
    for n in 1..=3 {
        publisher.send(json!({"type":"PUBLISH","channel":"org:acme:usage","data":{"n":n},"id":n}));
        publisher.recv_type("ACK");
    }
    let (_, usage) = get(&server, "/api/channels/org:acme:usage/history", ACME);
    assert_eq!(seqs_of_messages(&usage), [2, 3]);
    assert_eq!(usage["complete"], false, "seq 1 left the ring of 2");
    let (status, _) = get(&server, "/api/channels/org:beta:decisions/history", ACME);
    assert_eq!(status, 403);
}

fn seqs_of_messages(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}
