//! Presence on one node with 2 shards: JOIN, LEAVE and STATUS reach a channel's presence
//! members on every shard, PRESENCE pages through the members.

mod common;

use common::*;
use serde_json::{json, Value};

/// The next presence change of `kind` (JOIN, LEAVE, STATUS) a client hears.
fn change(client: &mut Client, kind: &str) -> Value {
    client.recv_type(kind)
}

#[test]
fn members_on_every_shard_hear_joins_status_and_leaves() {
    let server = Server::start("[presence]\nmax_members = 1\n");
    // Members on both shards, one of them the channel's owner.
    let channel = "org:acme:usage".to_owned();
    let owner = shardcast::shard::owner_of(&channel, 2);
    let mut ann = server.client_on(ADMIN, 1 - owner);
    ann.join_presence(&channel);
    let own = change(&mut ann, "JOIN");
    assert_eq!(own["member"]["connectionId"], ann.connection_id.as_str());
    // A subscriber without presence hears messages, not presence.
    let mut quiet = server.client_on(ADMIN, owner);
    quiet.subscribe(&[&channel]);

    let mut bob = server.client_on(ACME, owner);
    bob.join_presence(&channel);
    let joined = change(&mut ann, "JOIN");
    assert_eq!(
        joined,
        json!({"type":"JOIN","channel":channel,"member":{
            "user":"acme-key","connectionId":bob.connection_id,"status":"online","meta":{}}})
    );

    bob.send(json!({"type":"STATUS","status":"away","meta":{"doc":"q3.pdf"}}));
    let away = change(&mut ann, "STATUS");
    assert_eq!(away["member"]["status"], "away", "{away}");
    assert_eq!(away["member"]["meta"], json!({"doc":"q3.pdf"}), "{away}");
    assert_eq!(away["member"]["connectionId"], bob.connection_id.as_str());

    // Two members, one per page.
    let first = ann.presence(&channel, None);
    assert_eq!(
        (&first["total"], &first["users"]),
        (&json!(2), &json!(2)),
        "{first}"
    );
    assert_eq!(
        first["members"].as_array().map(Vec::len),
        Some(1),
        "{first}"
    );
    let cursor = first["cursor"].as_str().expect("a cursor: there is more");
    let second = ann.presence(&channel, Some(cursor));
    assert_eq!(
        second["members"].as_array().map(Vec::len),
        Some(1),
        "{second}"
    );
    assert!(second.get("cursor").is_none(), "the last page: {second}");
    let mut ids = vec![
        first["members"][0]["connectionId"].clone(),
        second["members"][0]["connectionId"].clone(),
    ];
    ids.sort_by_key(|v| v.to_string());
    let mut expected = vec![json!(ann.connection_id), json!(bob.connection_id)];
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(ids, expected);

    // Bob goes: ann is told, and presence says so.
    drop(bob);
    let left = change(&mut ann, "LEAVE");
    assert_eq!(left["member"]["user"], "acme-key", "{left}");
    let after = ann.presence(&channel, None);
    assert_eq!(
        (&after["total"], &after["users"]),
        (&json!(1), &json!(1)),
        "{after}"
    );
    // An UNSUB leaves too; the quiet subscriber heard none of it.
    ann.send(json!({"type":"UNSUB","channels":[channel]}));
    ann.recv_type("UNSUBSCRIBED");
    let mut watcher = server.client_on(ADMIN, 0);
    assert_eq!(watcher.presence(&channel, None)["total"], 0);
    quiet.send(json!({"type":"PING","timestamp":"t"}));
    let next = quiet.recv();
    assert_eq!(
        next["type"], "PONG",
        "no presence for a plain subscriber: {next}"
    );
}

#[test]
fn presence_needs_the_subscribe_scope_and_bounded_valid_requests() {
    let server = Server::start("[presence]\nmax_meta_bytes = 16\n");
    let mut client = server.client_on(ACME, 0);
    client.send(json!({"type":"PRESENCE","channel":"org:other:usage","id":"p"}));
    let refused = client.recv();
    assert_eq!(
        (&refused["type"], &refused["code"], &refused["id"]),
        (&json!("ERROR"), &json!("forbidden"), &json!("p")),
        "{refused}"
    );
    for (bad, why) in [
        (json!({"type":"STATUS","status":"asleep"}), "status"),
        (json!({"type":"STATUS","status":"away","meta":[1]}), "meta"),
        (
            json!({"type":"STATUS","status":"away","meta":{"x":"0123456789abcdef"}}),
            "max_meta_bytes",
        ),
        (
            json!({"type":"PRESENCE","channel":"org:acme:usage","cursor":"nope"}),
            "cursor",
        ),
        (
            json!({"type":"SUB","channels":["org:acme:usage"],"presence":1}),
            "presence",
        ),
    ] {
        client.send(bad.clone());
        let answer = client.recv();
        assert_eq!(answer["code"], "bad_request", "{bad}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(why),
            "{bad}: {answer}"
        );
    }
    client.ping();
}

#[test]
fn past_max_announced_members_changes_are_not_told_but_presence_lists_everyone() {
    let server = Server::start("[presence]\nmax_announced = 2\n");
    let channel = "org:acme:usage";
    let mut ann = server.client_on(ADMIN, 0);
    ann.join_presence(channel);
    let mut bob = server.client_on(ACME, 1);
    bob.join_presence(channel);
    let joined = change(&mut ann, "JOIN");
    let joined = if joined["member"]["connectionId"] == ann.connection_id.as_str() {
        change(&mut ann, "JOIN")
    } else {
        joined
    };
    assert_eq!(joined["member"]["connectionId"], bob.connection_id.as_str());
    // A third member: more than 2, so nobody is told, and the server counts it.
    let mut carol = server.client_on(ACME, 0);
    carol.join_presence(channel);
    server.wait_metric("shardcast_presence_untold_total", 1);
    let page = ann.presence(channel, None);
    assert_eq!(page["total"], 3, "{page}");
    ann.send(json!({"type":"PING","timestamp":"t"}));
    let next = ann.recv();
    assert_eq!(next["type"], "PONG", "no JOIN past the bound: {next}");
    // Back to 2: told again.
    drop(carol);
    server.wait_metric("shardcast_presence_untold_total", 2);
    drop(bob);
    assert_eq!(change(&mut ann, "LEAVE")["member"]["user"], "acme-key");
}
