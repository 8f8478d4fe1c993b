//! The server API across two nodes through Redis: broadcasts, messages to a user and
//! disconnects reach the other node's connections, and a token revoked on one node is refused
//! and closed on the other.

mod common;

use common::*;
use serde_json::{json, Value};

/// A node of 2 shards on Redis `url` under `prefix`.
fn node(url: &str, prefix: &str) -> Server {
    Server::start_with(
        2,
        &format!("[cluster]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\n\n[storage]\nurl = \"memory\"\n"),
    )
}

/// Two nodes under a fresh prefix, each hearing Redis, or `None` when Redis is not here.
fn two_nodes(test: &str) -> Option<(Server, Server)> {
    let url = redis_url(test)?;
    let prefix = format!("sctest.{test}.{}.{}", std::process::id(), unix_now());
    let nodes = (node(&url, &prefix), node(&url, &prefix));
    for n in [&nodes.0, &nodes.1] {
        n.wait_health("pubsub up", |h| h["cluster"]["redis"][0]["pubsub"] == "up");
    }
    Some(nodes)
}

/// A connection of `user` of org acme, with a token.
fn user_client(server: &Server, user: &str) -> Client {
    let token = jwt_with(
        json!({"sub": user, "org": "acme", "exp": unix_now() + 3600, "jti": format!("{user}-jti")}),
    );
    server.client(&format!("/ws?token={token}"))
}

#[test]
fn broadcasts_and_messages_to_a_user_reach_the_other_node() {
    let Some((a, b)) = two_nodes("cluster_api_send") else {
        return;
    };
    let mut on_a = user_client(&a, "u1");
    let mut on_b = user_client(&b, "u1");
    let (status, sent) = post(a.addr, "/api/broadcast", ACME, &json!({"data": {"m": 1}}));
    assert_eq!(
        (status, &sent["reached"]),
        (200, &json!(1)),
        "{sent}: this node's count"
    );
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            client.recv(),
            json!({"type": "SYSTEM", "event": "broadcast", "data": {"m": 1}})
        );
    }
    for n in 1..=3 {
        let (status, sent) = post(a.addr, "/api/users/u1/send", ACME, &json!({"data": n}));
        assert_eq!(status, 200, "{sent}");
        assert_eq!(sent["seq"], n, "{sent}");
    }
    for client in [&mut on_a, &mut on_b] {
        for n in 1..=3 {
            let m = client.recv_type("MESSAGE");
            assert_eq!(
                (&m["channel"], &m["seq"], &m["data"]),
                (&json!("user:u1:notifications"), &json!(n), &json!(n))
            );
        }
    }
}

#[test]
fn disconnects_and_revocations_reach_the_other_node() {
    let Some((a, b)) = two_nodes("cluster_api_close") else {
        return;
    };
    // By user: both nodes' connections.
    let mut on_a = user_client(&a, "u2");
    let mut on_b = user_client(&b, "u2");
    let headers = format!("X-API-Key: {ACME}\r\n");
    let (status, text) = http_request(
        a.addr,
        "DELETE",
        "/api/users/u2/connections?code=4001",
        &headers,
        "",
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(on_a.recv_close(), Some(4001));
    assert_eq!(on_b.recv_close(), Some(4001));

    // By id: the node that has it closes it.
    let mut on_b = user_client(&b, "u3");
    let path = format!(
        "/api/connections/{}?code=4002&reason=moved",
        on_b.connection_id
    );
    let (status, text) = http_request(a.addr, "DELETE", &path, &headers, "");
    assert_eq!(status, 202, "{text}");
    let forwarded: Value = serde_json::from_str(&text).unwrap();
    assert!(
        on_b.connection_id
            .starts_with(forwarded["forwarded"].as_str().unwrap()),
        "{text}"
    );
    assert_eq!(on_b.recv_close(), Some(4002));

    // A token revoked on A: closed on B, and refused there from then on.
    let mut on_b = user_client(&b, "u4");
    let (status, revoked) = post(
        a.addr,
        "/api/tokens/revoke",
        ADMIN,
        &json!({"jti": "u4-jti"}),
    );
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(on_b.recv_close(), Some(4403));
    let token =
        jwt_with(json!({"sub": "u4", "org": "acme", "exp": unix_now() + 3600, "jti": "u4-jti"}));
    let mut again = Client::connect(b.addr, &format!("/ws?token={token}")).expect("upgrade");
    assert_eq!(again.recv_close(), Some(4403));
}
