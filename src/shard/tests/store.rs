//! Decisions under `ack = "durable"` against the simulation's store: what waits for a commit,
//! which numbers are given back when a decision is not stored, and replays read from the store.

use super::*;
use crate::storage::{reader, Outcome};

const CHANNEL: &str = "org:o1:decisions";

fn durable(capacity: usize) -> Sim {
    Sim::with_store(1, Config::default(), true, capacity)
}

fn publish_with_id(sim: &Sim, peer: &Rc<Peer>, n: u64) {
    let json = format!(r#"{{"type":"PUBLISH","channel":"{CHANNEL}","data":{n},"id":"p{n}"}}"#);
    sim.request(0, peer, &json);
}

#[test]
fn a_decision_and_everything_after_it_wait_for_its_commit() {
    let sim = durable(16);
    let sub = subscriber(&sim, 0, CHANNEL);
    let client = sim.connect(0);
    sim.request(0, &client, &ingest_json(CHANNEL, "k1"));
    publish_with_id(&sim, &client, 2);
    sim.settle();

    let writes = sim.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].record.seq, 1, "numbered before it is stored");
    assert!(
        drain(&sub).is_empty(),
        "nothing reaches subscribers before the commit"
    );
    // The PUBLISH is numbered behind the decision and acknowledged at once; the INGEST is not.
    assert_eq!(kinds(&drain(&client)), [("ACK".into(), 2)]);

    sim.answer(&writes[0], Outcome::Stored);
    sim.settle();
    let acks = drain(&client);
    assert!(acks[0].contains(r#""dedup":false,"seq":1"#), "{acks:?}");
    assert_eq!(
        kinds(&drain(&sub)),
        [("DECISION".into(), 1), ("MESSAGE".into(), 2)],
        "released in seq order"
    );
}

#[test]
fn a_number_not_stored_is_given_back_when_nothing_came_after_it() {
    let sim = durable(16);
    let sub = subscriber(&sim, 0, CHANNEL);
    let client = sim.connect(0);
    sim.request(0, &client, &ingest_json(CHANNEL, "k1"));
    sim.request(0, &client, &ingest_json(CHANNEL, "k2"));
    let writes = sim.writes();
    assert_eq!(writes.len(), 2);

    // The store was down for the second: nothing was attempted, so seq 2 is free again.
    sim.answer(&writes[1], Outcome::Unavailable("down".into()));
    sim.settle();
    assert!(drain(&client)[0].contains("storage_unavailable"));
    sim.answer(&writes[0], Outcome::Stored);
    sim.settle();
    publish_with_id(&sim, &client, 3);
    sim.settle();
    assert_eq!(
        kinds(&drain(&sub)),
        [("DECISION".into(), 1), ("MESSAGE".into(), 2)],
        "no hole where the refused decision was"
    );
}

#[test]
fn a_failed_commit_never_gives_its_number_back() {
    // The commit may have reached the disk before the connection was lost: reusing the seq
    // could collide with a stored row.
    let sim = durable(16);
    let sub = subscriber(&sim, 0, CHANNEL);
    let client = sim.connect(0);
    sim.request(0, &client, &ingest_json(CHANNEL, "k1"));
    let writes = sim.writes();
    sim.answer(&writes[0], Outcome::Failed("connection lost".into()));
    sim.settle();
    assert!(drain(&client)[0].contains("storage_unavailable"));
    publish_with_id(&sim, &client, 2);
    sim.settle();
    assert_eq!(kinds(&drain(&sub)), [("MESSAGE".into(), 2)]);
}

#[test]
fn a_duplicate_found_by_the_store_answers_the_original_and_frees_its_number() {
    let sim = durable(16);
    let sub = subscriber(&sim, 0, CHANNEL);
    let client = sim.connect(0);
    sim.request(0, &client, &ingest_json(CHANNEL, "k1"));
    // A retry while the first is in flight waits for the same outcome.
    sim.request(0, &client, &ingest_json(CHANNEL, "k1"));
    let writes = sim.writes();
    assert_eq!(writes.len(), 1, "one write for both");
    let id = "dec_01J00000000000000000000000".to_string();
    sim.answer(&writes[0], Outcome::Duplicate { id, seq: 7 });
    sim.settle();
    let acks = drain(&client);
    assert_eq!(acks.len(), 2);
    assert!(
        acks.iter().all(|a| a.contains(r#""dedup":true,"seq":7"#)),
        "{acks:?}"
    );
    publish_with_id(&sim, &client, 1);
    sim.settle();
    assert_eq!(kinds(&drain(&sub)), [("MESSAGE".into(), 1)]);
}

#[test]
fn a_full_writer_queue_refuses_at_once_and_gives_the_number_back() {
    let sim = durable(1);
    let sub = subscriber(&sim, 0, CHANNEL);
    let client = sim.connect(0);
    sim.request(0, &client, &ingest_json(CHANNEL, "k1"));
    sim.request(0, &client, &ingest_json(CHANNEL, "k2"));
    let refused = drain(&client);
    assert!(refused[0].contains("storage_unavailable"), "{refused:?}");
    let writes = sim.writes();
    assert_eq!(writes.len(), 1);
    sim.answer(&writes[0], Outcome::Stored);
    publish_with_id(&sim, &client, 2);
    sim.settle();
    assert_eq!(
        kinds(&drain(&sub)),
        [("DECISION".into(), 1), ("MESSAGE".into(), 2)]
    );
}

#[test]
fn a_replay_older_than_the_ring_is_read_from_the_store_and_put_first() {
    let mut config = Config::default();
    config.history.size = 2;
    let sim = Sim::with_store(1, config, true, 16);
    let client = sim.connect(0);
    for n in 1..=4 {
        sim.request(0, &client, &ingest_json(CHANNEL, &format!("k{n}")));
        let writes = sim.writes();
        sim.answer(&writes[0], Outcome::Stored);
        sim.settle();
    }
    let late = sim.connect(0);
    let sub = format!(r#"{{"type":"SUB","channels":["{CHANNEL}"],"since":{{"{CHANNEL}":0}}}}"#);
    sim.request(0, &late, &sub);
    assert!(drain(&late).is_empty(), "waits for the store");
    let mut reads = sim.reads();
    assert_eq!(reads.len(), 1);
    let (query, reply) = reads.remove(0);
    let reader::Query::History { after, upto, .. } = query else {
        panic!("a history read, not {query:?}");
    };
    assert_eq!((after, upto), (0, 2), "only what the ring lost");
    let rows = (1..=2)
        .map(|seq| (seq, format!(r#"{{"n":{seq}}}"#)))
        .collect();
    reply(Ok(reader::Answer::History(rows)));
    sim.settle();
    let got = drain(&late);
    assert_eq!(recovered(&got[0]), format!(r#"{{"{CHANNEL}":true}}"#));
    let seqs: Vec<u64> = kinds(&got[1..]).into_iter().map(|(_, seq)| seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
}
