//! shardcast-bench: load generator. This first scenario, `connect`, opens and holds idle
//! WebSocket connections and reports the server's memory per connection.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N connections, hold them, report connect rate, latency and server RSS per connection.
    Connect {
        /// Server address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Request path, with credentials.
        #[arg(long, default_value = "/ws?key=demo-secret")]
        path: String,
        /// Connections to open.
        #[arg(short, long, default_value_t = 1000)]
        n: usize,
        /// Connections in progress at once.
        #[arg(short, long, default_value_t = 64)]
        concurrency: usize,
        /// Server pid, to report its RSS growth.
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds to hold the connections after opening them.
        #[arg(long, default_value_t = 1)]
        hold: u64,
    },
}

fn main() {
    let args = Args::parse();
    match args.scenario {
        Scenario::Connect {
            addr,
            path,
            n,
            concurrency,
            pid,
            hold,
        } => connect(addr, &path, n, concurrency, pid, hold),
    }
}

fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Open one connection from source address `src` and wait for the server's first frame.
fn open(addr: SocketAddr, src: Ipv4Addr, path: &str) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // Spreading sources over 127.0.0.x lifts the ~28k ephemeral-port limit per address pair.
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    socket.connect(&addr.into())?;
    let mut stream: TcpStream = socket.into();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    // Read the 101 head and the first frame (READY).
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("closed during handshake"));
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if !got.starts_with(b"HTTP/1.1 101") {
                return Err(std::io::Error::other(
                    String::from_utf8_lossy(&got[..end]).into_owned(),
                ));
            }
            let frame = &got[end + 4..];
            if frame.len() >= 2 && frame.len() >= 2 + (frame[1] & 0x7f) as usize {
                return Ok(stream);
            }
        }
    }
}

fn connect(
    addr: SocketAddr,
    path: &str,
    n: usize,
    concurrency: usize,
    pid: Option<u32>,
    hold: u64,
) {
    let fd_limit = raise_fd_limit();
    eprintln!("client fd limit {fd_limit}");
    let rss_before = pid.and_then(rss_kib);
    let started = Instant::now();
    let per_thread = n.div_ceil(concurrency.max(1));
    let threads: Vec<_> = (0..concurrency.max(1))
        .map(|t| {
            let path = path.to_string();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                let mut hist = Histogram::<u64>::new(3).expect("histogram");
                let mut failed = 0usize;
                for i in 0..per_thread {
                    let k = t * per_thread + i;
                    if k >= n {
                        break;
                    }
                    let src = Ipv4Addr::new(127, 0, 0, 2 + (k % 253) as u8);
                    let t0 = Instant::now();
                    match open(addr, src, &path) {
                        Ok(s) => {
                            let _ = hist.record(t0.elapsed().as_micros() as u64);
                            held.push(s);
                        }
                        Err(e) => {
                            if failed == 0 {
                                eprintln!("connect failed: {e}");
                            }
                            failed += 1;
                        }
                    }
                }
                (held, hist, failed)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut failed = 0;
    for t in threads {
        let (h, th, f) = t.join().expect("thread");
        held.extend(h);
        hist.add(th).expect("merge");
        failed += f;
    }
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_secs(hold));
    let rss_after = pid.and_then(rss_kib);
    println!("connections ok      {}", held.len());
    println!("connections failed  {failed}");
    println!("elapsed             {:.3} s", elapsed.as_secs_f64());
    println!(
        "connect rate        {:.0} /s",
        held.len() as f64 / elapsed.as_secs_f64()
    );
    for q in [50.0, 90.0, 99.0, 99.9] {
        println!(
            "connect p{q:<5}       {:.3} ms",
            hist.value_at_quantile(q / 100.0) as f64 / 1000.0
        );
    }
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let per = (after.saturating_sub(before) * 1024) as f64 / held.len().max(1) as f64;
        println!("server RSS          {before} KiB -> {after} KiB");
        println!("server RSS per conn {per:.0} bytes");
    }
}
