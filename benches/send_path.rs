//! What one broadcast costs per socket when nothing is queued to batch: one 110-byte frame to
//! each of 1,000 loopback connections, by a `send` per socket (what shardcast does) or by one
//! io_uring submission carrying all 1,000 sends. Answers how much of a delivery's cost a batched
//! send path could save. `taskset -c 0 cargo bench --bench send_path`.
//!
//! On loopback the receiver's kernel work (TCP receive, waking the reader) runs inside the
//! sender's call, so both variants include it, as the server does in the fan-out benchmarks.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use io_uring::{opcode, types, IoUring};

const SOCKETS: usize = 1000;
const FRAME: [u8; 110] = [b'x'; 110];

/// Connected pairs: (sending side, receiving side), both non-blocking.
fn pairs() -> Vec<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    (0..SOCKETS)
        .map(|_| {
            let receiver = TcpStream::connect(addr).expect("connect");
            let (sender, _) = listener.accept().expect("accept");
            sender.set_nodelay(true).expect("nodelay");
            sender.set_nonblocking(true).expect("nonblocking");
            receiver.set_nonblocking(true).expect("nonblocking");
            (sender, receiver)
        })
        .collect()
}

/// Read everything the receivers got (outside the timed part).
fn drain(pairs: &mut [(TcpStream, TcpStream)], expected: usize) {
    let mut buf = vec![0u8; 64 * 1024];
    for (_, receiver) in pairs.iter_mut() {
        let mut got = 0;
        while got < expected {
            match receiver.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

fn send_path(c: &mut Criterion) {
    let mut pairs = pairs();
    let mut group = c.benchmark_group("broadcast 110 B to 1000 sockets");
    group.throughput(Throughput::Elements(SOCKETS as u64));

    group.bench_function("send() per socket", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                for (sender, _) in &pairs {
                    // SAFETY: FRAME is a live buffer of its length.
                    let n = unsafe {
                        libc::send(
                            sender.as_raw_fd(),
                            FRAME.as_ptr().cast(),
                            FRAME.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    };
                    assert_eq!(n, FRAME.len() as isize);
                }
                total += start.elapsed();
                drain(&mut pairs, FRAME.len());
            }
            total
        })
    });

    let mut ring = IoUring::new(SOCKETS.next_power_of_two() as u32).expect("io_uring");
    group.bench_function("io_uring, one submission", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                {
                    let mut sq = ring.submission();
                    for (sender, _) in &pairs {
                        let send = opcode::Send::new(
                            types::Fd(sender.as_raw_fd()),
                            FRAME.as_ptr(),
                            FRAME.len() as u32,
                        )
                        .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                        .build();
                        // SAFETY: FRAME is static; the queue has room for every socket.
                        unsafe { sq.push(&send) }.expect("queue has room");
                    }
                }
                ring.submit_and_wait(SOCKETS).expect("submit");
                for cqe in ring.completion() {
                    assert_eq!(cqe.result(), FRAME.len() as i32);
                }
                total += start.elapsed();
                drain(&mut pairs, FRAME.len());
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, send_path);
criterion_main!(benches);
