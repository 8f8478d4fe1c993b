//! Micro-benchmarks of the per-message path: framing, request parsing, routing, queues,
//! handling a message that crossed from another shard, and the channel history (keeping a
//! message, finding a replay). `cargo bench --bench core`.

use std::hint::black_box;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use shardcast::auth::{Principal, Scopes};
use shardcast::clock::Now;
use shardcast::codec::{self, Decoder};
use shardcast::config::{Config, Scope};
use shardcast::dialect::shardcast::{self as wire, Parser};
use shardcast::dialect::{Kind, Publication};
use shardcast::engine::history::{Limits, Ring};
use shardcast::metrics::Global;
use shardcast::queue::{Bounds, OutQueue};
use shardcast::shard::{owner_of, MeshMsg, Shard};

const DATA: &[u8] = br#"{"t":123456789012,"p":0,"s":42,"x":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;

fn masked(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![0x81, 0x80 | 126];
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A MESSAGE numbered `seq` carrying [`DATA`].
fn message(seq: u64) -> Publication {
    Publication {
        seq,
        kind: Kind::Message,
        data: Rc::from(DATA),
    }
}

fn framing(c: &mut Criterion) {
    let publication = message(42);
    c.bench_function("encode MESSAGE frame (100 B data)", |b| {
        b.iter(|| wire::publication(black_box("org:acme:usage"), black_box(&publication)))
    });
    let publish = format!(
        r#"{{"type":"PUBLISH","channel":"org:acme:usage","data":{}}}"#,
        std::str::from_utf8(DATA).unwrap()
    );
    let wire = masked(publish.as_bytes());
    c.bench_function("decode masked client frame (170 B)", |b| {
        let mut decoder = Decoder::default();
        b.iter_batched_ref(
            || wire.clone(),
            |buf| {
                decoder.decode(buf, 65536, &mut |e| {
                    black_box(e);
                    codec::Flow::Continue
                })
            },
            BatchSize::SmallInput,
        )
    });
}

fn parsing(c: &mut Criterion) {
    let data = std::str::from_utf8(DATA).unwrap();
    let requests = [
        ("SUB", r#"{"type":"SUB","channels":["org:acme:decisions","org:acme:usage"],"id":"s1"}"#.to_string()),
        ("PUBLISH", format!(r#"{{"type":"PUBLISH","channel":"org:acme:usage","id":"p1","data":{data}}}"#)),
        ("INGEST", r#"{"type":"INGEST","channel":"org:acme:decisions","schema":"decision.v1","idempotencyKey":"k-1","data":{"orgId":"acme","direction":"precheck","decision":"allow","tool":"web.fetch","scope":"https://x","payloadHash":"sha256:abc","latencyMs":45,"tags":["a"]}}"#.to_string()),
        ("PING", r#"{"type":"PING","timestamp":"2024-01-01T00:00:00Z"}"#.to_string()),
        // The worst a client can send for the duplicate-key check: one object of short keys.
        ("PUBLISH of 6,000 keys (61 KB)", {
            let keys: Vec<String> = (0..6_000).map(|i| format!(r#""{i:x}":0"#)).collect();
            format!(r#"{{"type":"PUBLISH","channel":"org:acme:usage","data":{{{}}}}}"#, keys.join(","))
        }),
    ];
    let mut parser = Parser::default();
    for (name, text) in &requests {
        c.bench_function(&format!("parse {name}"), |b| {
            b.iter(|| black_box(parser.parse(black_box(text.as_bytes())).is_ok()))
        });
    }
}

fn routing(c: &mut Criterion) {
    c.bench_function("owner_of channel (8 shards)", |b| {
        b.iter(|| owner_of(black_box("org:acme:decisions"), 8))
    });
}

fn queues(c: &mut Criterion) {
    let frame = wire::publication("org:acme:usage", &message(1));
    let bounds = Bounds {
        messages: 1024,
        bytes: 4 << 20,
        drop_oldest: true,
    };
    c.bench_function("queue push + write out 64 frames", |b| {
        let mut q = OutQueue::default();
        let mut buf = Vec::with_capacity(64 * 1024);
        b.iter(|| {
            for _ in 0..64 {
                q.push(frame.clone(), bounds);
            }
            buf.clear();
            let n = q.gather(&mut buf, usize::MAX);
            q.consume(n)
        })
    });
    c.bench_function("queue push at capacity (drop oldest)", |b| {
        let mut q = OutQueue::default();
        for _ in 0..1024 {
            q.push(frame.clone(), bounds);
        }
        b.iter(|| q.push(black_box(frame.clone()), bounds))
    });
}

fn shard_with_subscribers(n: usize) -> (Shard, Vec<Rc<shardcast::shard::Peer>>, String) {
    let mut config = Config::default();
    config.limits.outbound_queue_messages = 16;
    let shard = Shard::new(
        0,
        2,
        Arc::new(config),
        Arc::new(Global::new(2)),
        Now::read(),
    );
    // A channel owned by the other shard: its messages arrive here as Deliver.
    let channel = (0..)
        .map(|i| format!("org:o{i}:usage"))
        .find(|c| owner_of(c, 2) == 1)
        .unwrap();
    let admin = Principal {
        org: "ops".into(),
        user: None,
        key_id: None,
        scopes: Scopes::from_list(&[Scope::Admin]),
        exclusive: false,
        expires_ms: None,
        grant: None,
    };
    let mut parser = Parser::default();
    let sub = format!(r#"{{"type":"SUB","channels":["{channel}"]}}"#);
    let peers = (0..n)
        .map(|_| {
            let peer = shard.add_conn(Now::read());
            let request = parser.parse(sub.as_bytes()).unwrap();
            let handled = shard.request(&peer, &admin, request, Now::read());
            assert_eq!(handled, shardcast::shard::Handled::Done);
            peer
        })
        .collect();
    (shard, peers, channel)
}

fn cross_shard(c: &mut Criterion) {
    let (shard, _peers, channel) = shard_with_subscribers(1000);
    let publication = message(1).to_sendable();
    let now = Now::read();
    // Queues are bounded at 16 frames: after warm-up every delivery also drops the oldest,
    // the steady state of a subscriber that is not reading.
    c.bench_function(
        "deliver a forwarded message to 1,000 local subscribers",
        |b| {
            b.iter(|| {
                shard.handle(
                    1,
                    MeshMsg::Deliver {
                        channel: channel.as_str().into(),
                        publication: publication.clone(),
                        t0: Instant::now(),
                    },
                    now,
                )
            })
        },
    );
}

fn history(c: &mut Criterion) {
    let limits = Limits {
        size: 1_000,
        ttl_ms: 3_600_000,
    };
    let mut ring = Ring::new(0);
    let mut seq = 0;
    for _ in 0..1_000 {
        seq += 1;
        ring.push(&message(seq), 0, limits);
    }
    let mut kept = message(seq);
    c.bench_function("history: keep a message (full ring of 1,000)", |b| {
        b.iter(|| {
            kept.seq += 1;
            ring.push(black_box(&kept), 0, limits)
        })
    });
    c.bench_function("history: find a replay of 1,000 messages", |b| {
        b.iter(|| ring.since(black_box(ring.last() - 1_000), 0, limits))
    });
}

criterion_group!(
    benches,
    framing,
    parsing,
    routing,
    queues,
    cross_shard,
    history
);
criterion_main!(benches);
