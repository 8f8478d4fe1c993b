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
                    frame(&mut self.output, READY);
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
        while let Some((opcode, start, end)) = parse(&self.input[at..]) {
            let (start, end) = (at + start, at + end);
            match opcode {
                0x8 => {
                    self.output.extend_from_slice(&[0x88, 0]);
                    self.closing = true;
                }
                0x1 if self.broadcast => {
                    frame(fanout, &unmask(&self.input, start, end));
                }
                0x1 | 0x2 => {
                    // The first bytes are enough to tell a SUB from the rest.
                    let head = unmask(&self.input, start, end.min(start + 12));
                    let answer = if head.starts_with(br#"{"type":"SUB""#) {
                        SUBSCRIBED
                    } else {
                        ACK
                    };
                    frame(&mut self.output, answer);
                }
                _ => {}
            }
            at = end;
        }
        self.input.drain(..at);
    }
}

/// One masked client frame at the start of `input`: its opcode and the payload's range.
fn parse(input: &[u8]) -> Option<(u8, usize, usize)> {
    let (&b0, &b1) = (input.first()?, input.get(1)?);
    let (len, header) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes([*input.get(2)?, *input.get(3)?]) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(input.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let start: usize = header + 4;
    let end = start.checked_add(len)?;
    (input.len() >= end).then_some((b0 & 0x0f, start, end))
}

/// The payload bytes `start..end` of the frame whose 4-byte mask precedes `start`, unmasked.
fn unmask(input: &[u8], start: usize, end: usize) -> Vec<u8> {
    let mask = &input[start - 4..start];
    input[start..end]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect()
}

/// Append an unmasked text frame.
fn frame(out: &mut Vec<u8>, text: &[u8]) {
    out.push(0x81);
    if text.len() < 126 {
        out.push(text.len() as u8);
    } else if let Ok(len) = u16::try_from(text.len()) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(text.len() as u64).to_be_bytes());
    }
    out.extend_from_slice(text);
}
