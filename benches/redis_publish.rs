//! Publishes with history through one Redis, as the cluster's link thread sends them: how many
//! per second, how many per round trip, and Redis's own CPU per publish (`INFO cpu`).
//!
//! `cargo bench --bench redis_publish` against 127.0.0.1:6379 (`SHARDCAST_TEST_REDIS` says
//! otherwise). Pin it like the other benchmarks: `taskset -c 1 cargo bench --bench
//! redis_publish` with Redis on core 0 (`taskset -cp 0 $(pidof redis-server)`). Window sizes
//! are requests in flight from the shards (several nodes' shards look alike to Redis).

use std::time::{Duration, Instant};

use shardcast::cluster::{Completion, Link, Op, Publish, Request, Retention, Settings};
use shardcast::dialect::Kind;

fn redis_cpu(conn: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query(conn).expect("INFO cpu");
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| *k == "used_cpu_sys" || *k == "used_cpu_user")
        .map(|(_, v)| v.trim().parse::<f64>().unwrap_or(0.0))
        .sum()
}

fn run(url: &str, window: usize, total: u64, channels: u64, size: usize) {
    let prefix = format!("scbench.{}.{window}", std::process::id());
    let settings = Settings {
        url: url.into(),
        prefix: prefix.clone(),
        retention: Retention {
            history_size: 1000,
            history_ttl_s: 60,
            meta_ttl_s: 60,
            result_ttl_s: 60,
            kept: Default::default(),
        },
        timeout: Duration::from_secs(5),
        backoff: Duration::from_millis(100),
        probe: Duration::from_secs(1),
        suspect: Default::default(),
        floors: None,
        node: "bench".into(),
        presence_ttl_ms: 30_000,
        session_ttl_ms: 15_000,
    };
    let (to, from) = flume::unbounded();
    let link = Link::spawn(settings, vec![to]).expect("link");
    let mut admin = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("Redis");
    let data = format!(
        "{{\"payload\":\"{}\"}}",
        "x".repeat(size.saturating_sub(14))
    );
    let request = |token: u64| Request {
        shard: 0,
        token,
        op: Op::Publish(Publish {
            channel: format!("org:bench:c{}", token % channels),
            kind: Kind::Message,
            data: data.as_bytes().to_vec(),
            idempotency_key: None,
            floor: Some(0),
            to_user: None,
        }),
    };
    let cpu_before = redis_cpu(&mut admin);
    let started = Instant::now();
    let (mut sent, mut done, mut failed) = (0u64, 0u64, 0u64);
    while done < total {
        while sent < total && sent - done < window as u64 {
            link.requests.send(request(sent)).expect("link running");
            sent += 1;
        }
        if let Completion::Published { result, .. } = from.recv().expect("an answer") {
            failed += u64::from(result.is_err());
        }
        done += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = redis_cpu(&mut admin) - cpu_before;
    let trips = link
        .stats
        .publish_round_trips
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "window {window:5}: {:8.0} publishes/s, {:6.1} per round trip, Redis CPU {:5.2} µs per publish, {failed} failed",
        total as f64 / elapsed,
        total as f64 / trips.max(1) as f64,
        cpu * 1e6 / total as f64,
    );
    link.join();
    // The benchmark's keys expire in 60 s; delete them now all the same.
    for c in 0..channels {
        let channel = format!("org:bench:c{c}");
        let _: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(format!("{prefix}.meta.{channel}"))
            .arg(format!("{prefix}.stream.{channel}"))
            .query(&mut admin);
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let url =
        std::env::var("SHARDCAST_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    println!("publish with history (1,000 kept) through one Redis at {url}: 100-byte messages");
    for channels in [1, 100] {
        for window in [1, 64, 1024, 4096] {
            let total = if window == 1 { 20_000 } else { 200_000 };
            print!("{channels:3} channels, ");
            run(&url, window, total, channels, 100);
        }
    }
}
