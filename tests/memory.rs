//! Heap bytes per idle connection, counted exactly by a counting allocator around an
//! in-process server (RSS is too coarse and noisy to assert on). Idle connections must stay
//! cheap: this fails if one grows past the budget.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use shardcast::config::{ApiKey, Config, Scope};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The heap counter is process-wide: one measurement at a time.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Heap bytes one idle, authenticated WebSocket connection may hold on the server. c9a1c9c
/// measured 520 on one machine and 521 on another (the count is the whole process's, test
/// side included): 8 bytes of slack, while a field added to `Peer` still shows as 16.
const BUDGET: isize = 528;

fn open(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /ws?key=mem-secret HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    // Read until READY (the 101 head, then one text frame mentioning READY).
    let mut buf = [0u8; 512];
    let mut got = 0;
    while !buf[..got].windows(5).any(|w| w == b"READY") {
        let n = s.read(&mut buf[got..]).unwrap();
        assert!(n > 0, "server closed during handshake");
        got += n;
    }
    s
}

/// Live heap bytes once they stop changing (the sweeper frees idle queue slots).
fn settled() -> isize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = LIVE.load(Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = LIVE.load(Relaxed);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn config() -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        ..Config::default()
    };
    // Idle connections are the subject: nothing to store.
    config.storage.url = "memory".into();
    // A short handshake timeout makes the sweeper run every 10 ms.
    config.websocket.handshake_timeout_ms = 40;
    config.api_keys.push(ApiKey {
        id: "mem".into(),
        secret: "mem-secret".into(),
        org: "mem".into(),
        scopes: vec![Scope::Subscribe],
        session: Default::default(),
    });
    config
}

#[test]
fn idle_connection_heap_stays_within_budget() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let server = shardcast::server::start(config()).expect("server starts");
    let addr = server.local_addr();
    const N: usize = 1000;
    let mut warm: Vec<TcpStream> = (0..100).map(|_| open(addr)).collect();
    let mut held: Vec<TcpStream> = Vec::with_capacity(N);
    let before = settled();
    for _ in 0..N {
        held.push(open(addr));
    }
    let after = settled();
    let per_connection = (after - before) / N as isize;
    println!("heap per idle connection: {per_connection} B");
    assert!(
        per_connection <= BUDGET,
        "each idle connection holds {per_connection} B of heap (budget {BUDGET} B)"
    );
    warm.clear();
    held.clear();
    server.stopper().stop();
    server.join();
}

/// Heap bytes one subscription (one connection on one channel of its own) may hold.
const SUBSCRIPTION_BUDGET: isize = 640;

/// Send one masked text frame.
fn send_text(s: &mut TcpStream, text: &str) {
    let payload = text.as_bytes();
    let mut frame = vec![0x81u8];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    s.write_all(&frame).unwrap();
}

/// Read until `needle` has been seen `times` times in what the server sent.
fn read_until(s: &mut TcpStream, needle: &[u8], times: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.windows(needle.len()).filter(|w| *w == needle).count() < times {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "server closed");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// What a subscription costs is stated (README, BENCHMARKS) and bounded by
/// `limits.max_subscriptions`: this measures it and checks the cap.
#[test]
fn subscription_heap_is_bounded_and_capped() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let mut config = config();
    config.limits.max_subscriptions = 2_000;
    config.api_keys[0].scopes = vec![Scope::Admin];
    let server = shardcast::server::start(config).expect("server starts");
    let mut s = open(server.local_addr());
    let sub = |from: usize| {
        let names: Vec<String> = (from..from + 100)
            .map(|i| format!("\"org:o{i}:usage\""))
            .collect();
        format!(r#"{{"type":"SUB","channels":[{}]}}"#, names.join(","))
    };
    send_text(&mut s, &sub(0));
    read_until(&mut s, b"SUBSCRIBED", 1);
    let before = settled();
    for batch in 1..20 {
        send_text(&mut s, &sub(batch * 100));
    }
    read_until(&mut s, b"SUBSCRIBED", 19);
    let after = settled();
    let per_subscription = (after - before) / 1_900;
    println!("heap per subscription: {per_subscription} B");
    assert!(
        per_subscription <= SUBSCRIPTION_BUDGET,
        "each subscription holds {per_subscription} B (budget {SUBSCRIPTION_BUDGET} B)"
    );
    // At the cap: refused by name, the connection stays.
    send_text(&mut s, &sub(2_000));
    let refused = read_until(&mut s, b"too_many_subscriptions", 100);
    assert!(!refused.windows(10).any(|w| w == b"SUBSCRIBED"));
    server.stopper().stop();
    server.join();
}

/// What the owner keeps for a channel is freed once nobody needs it (no subscribers, nothing
/// held, history expired): memory follows the channels in use, not every name ever seen.
#[test]
fn unused_channels_give_their_memory_back() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let mut config = config();
    config.api_keys[0].scopes = vec![Scope::Admin];
    config.history.size = 10;
    config.history.ttl_secs = 1;
    let server = shardcast::server::start(config).expect("server starts");
    let mut s = open(server.local_addr());
    let baseline = settled();
    const BATCHES: usize = 50;
    for batch in 0..BATCHES {
        let names: Vec<String> = (0..100)
            .map(|i| format!("\"org:o{batch}x{i}:usage\""))
            .collect();
        let list = names.join(",");
        send_text(&mut s, &format!(r#"{{"type":"SUB","channels":[{list}]}}"#));
        for name in &names {
            send_text(
                &mut s,
                &format!(r#"{{"type":"PUBLISH","channel":{name},"data":1,"id":1}}"#),
            );
        }
        send_text(
            &mut s,
            &format!(r#"{{"type":"UNSUB","channels":[{list}]}}"#),
        );
        read_until(&mut s, b"UNSUBSCRIBED", 1);
    }
    let used = LIVE.load(Relaxed) - baseline;
    println!("heap with {} channels in history: {used} B", BATCHES * 100);
    assert!(
        used > 1_000_000,
        "the channels were kept while in use ({used} B)"
    );
    // Freed within a sweep of their history's expiry.
    let deadline = Instant::now() + Duration::from_secs(10);
    let slack = 64 * 1024;
    let left = loop {
        let left = settled() - baseline;
        if left <= slack || Instant::now() > deadline {
            break left;
        }
    };
    println!("heap left once their history expired: {left} B");
    assert!(left <= slack, "{left} B still held by channels nobody uses");
    server.stopper().stop();
    server.join();
}
