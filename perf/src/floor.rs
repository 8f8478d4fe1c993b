//! The floor under shardcast's paced-load figures: the least a server can do for the load
//! tool's `ingest` scenario. One thread, epoll (through mio), no JSON, no storage, no
//! executor: it upgrades every WebSocket request, says READY, and answers each client frame
//! with one fixed ACK, every answer a read produced going out in one `send`. What it costs per
//! ack at a paced rate is what the kernel (receive, send, the loopback delivery, waking the
//! client on the other core) and sleeping between requests cost; shardcast's CPU per ack at
//! the same rate, less this, is its own.
//!
//! A WebSocket request for any other path than `/ws` joins the plain broadcast the load
//! tool's `--proto broadcast` expects: every text frame goes to every such connection, framed
//! once, one `send` per connection for all a read produced. That is the floor under fan-out.
//!
//! `taskset -c 0 target/release/shardcast-floor 127.0.0.1:PORT`, then the load tool against it
//! as against shardcast (`/health` and `/metrics` answer 200 with an empty body).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use shardcast_bench::ws::{parse_frame, push_server_frame};

const LISTENER: Token = Token(usize::MAX);
/// The size of a shardcast ACK to a bench INGEST, give or take a digit.
const ACK: &[u8] = br#"{"type":"ACK","channel":"org:bench0:usage","decisionId":"0193a5b2-7c1e-7d3f-9a4b-000000000000","dedup":false,"seq":123456}"#;
const READY: &[u8] = br#"{"type":"READY","connectionId":"c-0000000000000000","shard":0}"#;
const SUBSCRIBED: &[u8] = br#"{"type":"SUBSCRIBED","channels":["org:bench0:usage"]}"#;

struct Conn {
    stream: TcpStream,
    upgraded: bool,
    /// Joined the broadcast (upgraded on a path other than `/ws`).
    broadcast: bool,
    input: Vec<u8>,
    output: Vec<u8>,
    closing: bool,
}

fn main() -> io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut poll = Poll::new()?;
    // shardcast's own backlog (`backlog = 4096`): with mio's 1,024 a connect storm overflows it
    // and clients wait a second for their SYN to be sent again.
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(socket.into());
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut next = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        poll.poll(&mut events, None)?;
        for event in &events {
            if event.token() == LISTENER {
                while let Ok((mut stream, _)) = listener.accept() {
                    stream.set_nodelay(true)?;
                    next += 1;
                    poll.registry().register(
                        &mut stream,
                        Token(next),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    conns.insert(
                        next,
                        Conn {
                            stream,
                            upgraded: false,
                            broadcast: false,
                            input: Vec::new(),
                            output: Vec::new(),
                            closing: false,
                        },
                    );
                }
                continue;
            }
            let id = event.token().0;
            let Some(conn) = conns.get_mut(&id) else {
                continue;
            };
            let mut done = false;
            let mut fanout = Vec::new();
            if event.is_readable() {
                loop {
                    match conn.stream.read(&mut buf) {
                        Ok(0) => {
                            done = true;
                            break;
                        }
                        Ok(n) => {
                            conn.input.extend_from_slice(&buf[..n]);
                            if n < buf.len() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            done = true;
                            break;
                        }
                    }
                }
                conn.handle(&mut fanout);
            }
            done |= conn.write().is_err();
            if !fanout.is_empty() {
                for other in conns.values_mut().filter(|c| c.broadcast) {
                    other.output.extend_from_slice(&fanout);
                    // A failed receiver is dropped when its own events say so.
                    let _ = other.write();
                }
            }
            let Some(conn) = conns.get_mut(&id) else {
                continue;
            };
            if done || (conn.closing && conn.output.is_empty()) {
                if let Some(mut conn) = conns.remove(&id) {
                    let _ = poll.registry().deregister(&mut conn.stream);
                }
            }
        }
    }
}

impl Conn {
    /// Send what is queued, as far as the socket takes it.
    fn write(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Answer whatever whole requests and frames the input holds; frames for the broadcast go
    /// to `fanout`.
    fn handle(&mut self, fanout: &mut Vec<u8>) {
        if !self.upgraded {
            let Some(end) = memchr::memmem::find(&self.input, b"\r\n\r\n") else {
                return;
            };
            if memchr::memmem::find(&self.input[..end], b"Upgrade: websocket").is_some() {
                self.output.extend_from_slice(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                );
                self.broadcast = !self.input.starts_with(b"GET /ws");
                if !self.broadcast {
                    push_server_frame(&mut self.output, 0x1, READY);
                }
                self.upgraded = true;
                self.input.drain(..end + 4);
            } else {
                self.output.extend_from_slice(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                self.closing = true;
                self.input.clear();
                return;
            }
        }
        let mut at = 0;
        while let Some((frame, len)) = parse_frame(&self.input[at..]) {
            at += len;
            match frame.opcode {
                0x8 => {
                    self.output.extend_from_slice(&[0x88, 0]);
                    self.closing = true;
                }
                0x1 if self.broadcast => {
                    push_server_frame(fanout, 0x1, &unmask(frame.payload, frame.mask));
                }
                0x1 | 0x2 => {
                    // The first bytes are enough to tell a SUB from the rest.
                    let head = &frame.payload[..frame.payload.len().min(12)];
                    let answer = if unmask(head, frame.mask).starts_with(br#"{"type":"SUB""#) {
                        SUBSCRIBED
                    } else {
                        ACK
                    };
                    push_server_frame(&mut self.output, 0x1, answer);
                }
                _ => {}
            }
        }
        self.input.drain(..at);
    }
}

/// A client frame's payload, unmasked.
fn unmask(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mask = mask.unwrap_or_default();
    payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect()
}
