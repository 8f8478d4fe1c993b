//! One client connection: HTTP requests (keep-alive, pipelined), the upgrade, then the
//! WebSocket session. Which path answers what is `routes/`.
//!
//! A connection is a single hand-written state machine polled by one task: it reads into the
//! shard's scratch buffer (only inside a poll, so no connection holds a read buffer while it
//! waits), decodes and handles what arrived, and writes everything queued for it with one
//! `send`. The socket's readiness comes from the shard's [`Poller`]: the shard's readiness
//! task records it in the peer's `readiness` bits and wakes the task (see [`on_ready`]).

use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::auth::Principal;
use crate::clock::Now;
use crate::codec::{self, Decoder, Event, Flow};
use crate::codes::{Close, ErrorCode};
use crate::config::RefuseWith;
use crate::config::Scope;
use crate::dialect::{Dialect, Refusal, Reply, Request};
use crate::http::{self, Response};
use crate::metrics::{Counter, Task};
use crate::poller::{self, Poller, Watched};
use crate::queue::ReplyBudget;
use crate::rate::TokenBucket;
use crate::routes::{self, Pending, Route};
use crate::shard::{Handled, Peer, Phase, Shard, Stall};
use crate::socketio::session::{Cx, Outcome, Session};

/// Reads handled per poll before yielding to other connections.
const READ_BUDGET: usize = 16;
/// Most bytes read and dropped from a client after the last response, before closing.
const LINGER_BYTES: usize = 1 << 20;
/// Bytes gathered for one send (whole frames; at least one).
const WRITE_CHUNK: usize = 128 * 1024;
/// Plaintext taken out of TLS records at a time (a record holds at most 16 KiB).
const SCRATCH_PLAIN: usize = 16 * 1024;

enum Mode {
    /// Reading HTTP requests: the bytes read and not yet used (an incomplete request, or
    /// pipelined ones behind the one being answered).
    Http(Vec<u8>),
    /// The last HTTP response is queued; once it is written, the connection lingers.
    HttpReply,
    /// The last response is written and our side shut: what the client still sends (the
    /// rest of a body refused with 413, say) is read and dropped until it closes, so that
    /// the kernel does not answer it with a reset that could destroy the response unread.
    /// At most `left` more bytes, and the handshake timeout.
    Lingering { left: usize },
    /// A request is being answered elsewhere (a storage reader, the channel's owner).
    HttpWait(Box<Waiting>),
    /// An authenticated WebSocket session.
    Session,
    /// An Engine.IO session over WebSocket (its Socket.IO state is `Conn::sio`).
    SocketIo,
    /// The diagnostic echo endpoint.
    Echo,
    /// Upgraded only to deliver a close code for refused credentials.
    Refused,
    /// Handed to another shard (`Conn::move_to`): nothing more happens here.
    Moved,
}

/// An HTTP request being answered elsewhere, and what follows it.
struct Waiting {
    response: Pending,
    /// The connection stays open after the response.
    keep_alive: bool,
    /// Bytes read after the request (pipelined requests), served once it is answered.
    rest: Vec<u8>,
}

/// `Peer::readiness` bits.
mod ready {
    /// The socket may have bytes to read (cleared when a read comes back short).
    pub const READABLE: u8 = 1;
    /// The poller dropped the read watch: the connection must watch again.
    pub const REWATCH: u8 = 2;
    /// A writability watch is armed.
    pub const WRITE_WATCHED: u8 = 4;
    /// The peer closed its side: a short read does not mean the socket is drained (the EOF
    /// may have come with the last bytes, in one readiness event), so read on to the end.
    pub const HUNG_UP: u8 = 8;
}

/// Log a line about connection `$conn` (a `Conn`), with who it is as fields: shard,
/// connection id, org and principal (`key:ID` or `user:SUB`). The fields are worked out only
/// when the line is written.
macro_rules! conn_log {
    ($level:ident, $conn:expr, $($rest:tt)+) => {
        tracing::$level!(
            shard = $conn.shard.id,
            conn = %$conn.shard.connection_id($conn.peer.id),
            org = $conn.peer.principal().map(|p| p.org.to_string()),
            principal = $conn.peer.principal().map(|p| who(&p)),
            $($rest)+
        )
    };
}

/// A principal as logs name it.
fn who(principal: &Principal) -> String {
    match (&principal.key_id, &principal.user) {
        (Some(key), _) => format!("key:{key}"),
        (None, Some(user)) => format!("user:{user}"),
        (None, None) => "anonymous".into(),
    }
}

/// Record what the shard's poller reported for `peer`'s socket and wake its task.
pub fn on_ready(peer: &Peer, event: poller::Event) {
    let bits = peer.readiness.get();
    let bits = if event.writable {
        bits & !ready::WRITE_WATCHED
    } else {
        let rewatch = if event.ended { ready::REWATCH } else { 0 };
        let hung_up = if event.hangup { ready::HUNG_UP } else { 0 };
        bits | ready::READABLE | rewatch | hung_up
    };
    peer.readiness.set(bits);
    peer.wake();
}

/// Serve one accepted connection (a non-blocking socket) until it closes.
///
/// Returns the connection's state machine as the task's whole future. (An `async fn` would
/// also keep its arguments next to the state built from them: 128 B more per connection.)
pub fn serve(
    shard: Rc<Shard>,
    poller: Rc<Poller>,
    fd: OwnedFd,
    tls: bool,
) -> io::Result<impl std::future::Future<Output = ()>> {
    let tls = match shard.tls().filter(|_| tls) {
        Some(acceptor) => Some(crate::tls::accept(&acceptor).map_err(io::Error::other)?),
        None if tls => return Err(io::Error::other("no TLS certificate")),
        None => None,
    };
    let _ = socket2::SockRef::from(&fd).set_tcp_nodelay(true);
    let mut conn = Conn::open(shard, poller, fd, tls)?;
    Ok(std::future::poll_fn(move |cx| conn.poll(cx)))
}

/// A connection moving to the shard that holds its Engine.IO session: a WebSocket upgrade of
/// a long-polling session that SO_REUSEPORT gave to another shard. Its socket (a duplicate:
/// the shard it leaves closes its own descriptor), its TLS state, and the request to answer.
pub struct Adoption {
    fd: OwnedFd,
    tls: Option<Box<rustls::ServerConnection>>,
    request: http::Request,
    rest: Vec<u8>,
}

impl std::fmt::Debug for Adoption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adoption")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

/// Serve a connection another shard handed over: its request is answered here.
pub fn adopt(
    shard: Rc<Shard>,
    poller: Rc<Poller>,
    adoption: Adoption,
) -> io::Result<impl std::future::Future<Output = ()>> {
    let mut conn = Conn::open(shard, poller, adoption.fd, adoption.tls)?;
    conn.on_request(adoption.request, adoption.rest);
    Ok(std::future::poll_fn(move |cx| conn.poll(cx)))
}

impl Conn {
    /// The state of a new connection on `fd`, watched by the shard's poller.
    fn open(
        shard: Rc<Shard>,
        poller: Rc<Poller>,
        fd: OwnedFd,
        tls: Option<Box<rustls::ServerConnection>>,
    ) -> io::Result<Self> {
        let peer = shard.add_conn(Now::read());
        let socket = match Watched::new(fd, poller, peer.id) {
            Ok(socket) => socket,
            Err(e) => {
                shard.remove_conn(&peer);
                return Err(e);
            }
        };
        // Read at once: the request may already be waiting.
        peer.readiness.set(ready::READABLE);
        peer.fd.set(socket.fd());
        let conn = Conn {
            shard,
            peer,
            socket,
            tls,
            decoder: Decoder::default(),
            mode: Mode::Http(Vec::new()),
            bad_messages: 0,
            limited_messages: 0,
            rates: None,
            holds_slot: false,
            close_queued: false,
            close_received: false,
            eof: false,
            paused: false,
            events: 0,
            reads_paused: false,
            sio: None,
            took_over: false,
        };
        Ok(conn)
    }
}

/// `429` for a new connection (an upgrade, a long-polling session) from the address of
/// `socket` past the per-address rate, else nothing.
pub(crate) fn refuse_address(shard: &Shard, socket: i32) -> Option<Response> {
    let wait_ms = shard.admit_connection(socket).err()?;
    let message = "too many new connections from this address";
    let retry = wait_ms.div_ceil(1_000).max(1).to_string();
    let refused = Response::error(429, ErrorCode::RateLimited, message);
    Some(refused.header("Retry-After", &retry))
}

/// Take one of the process's `max_connections` slots for a new connection, or the `503`
/// that refuses it (draining, or at the limit).
pub(crate) fn take_slot(shard: &Shard) -> Result<(), Response> {
    if shard.shutting_down.get() {
        return Err(draining());
    }
    if !shard.global.try_open(shard.config().max_connections) {
        let message = "server is at max_connections";
        let refused = Response::error(503, ErrorCode::OverCapacity, message);
        return Err(refused.header("Retry-After", "1"));
    }
    Ok(())
}

/// `503` while the server drains.
fn draining() -> Response {
    let refused = Response::error(503, ErrorCode::ShuttingDown, "server is restarting");
    refused.header("Retry-After", "1")
}

/// A connection's token buckets: messages and bytes per second.
pub(crate) struct Rates {
    messages: TokenBucket,
    bytes: TokenBucket,
}

impl Rates {
    /// Full buckets, when `limits` sets a rate.
    pub(crate) fn of(limits: &crate::config::Limits, now_ms: u64) -> Option<Box<Self>> {
        let (messages, bytes) = (limits.rate(), limits.byte_rate());
        (messages.per_second > 0 || bytes.per_second > 0).then(|| {
            Box::new(Self {
                messages: TokenBucket::full(messages, now_ms),
                bytes: TokenBucket::full(bytes, now_ms),
            })
        })
    }

    /// Take a message of `size` bytes; when refused, how many milliseconds until it would
    /// pass (a message refused by its size gives its message token back: nothing was done).
    pub(crate) fn take(
        &mut self,
        limits: &crate::config::Limits,
        now_ms: u64,
        size: usize,
    ) -> Result<(), u64> {
        self.messages.take(limits.rate(), now_ms)?;
        self.bytes
            .take_n(limits.byte_rate(), now_ms, size as u64)
            .inspect_err(|_| self.messages.give_back(limits.rate()))
    }
}

struct Conn {
    shard: Rc<Shard>,
    peer: Rc<Peer>,
    socket: Watched,
    /// TLS state, for a connection to the TLS listener.
    tls: Option<Box<rustls::ServerConnection>>,
    decoder: Decoder,
    mode: Mode,
    bad_messages: u32,
    /// Consecutive messages refused for exceeding the rate limit.
    limited_messages: u32,
    /// Its message and byte rates, when `[limits]` sets either (boxed: most servers set
    /// neither, and every idle connection would carry them; tests/memory.rs).
    rates: Option<Box<Rates>>,
    /// Holds one of the process's `max_connections` slots.
    holds_slot: bool,
    close_queued: bool,
    close_received: bool,
    eof: bool,
    /// The decoder holds requests not yet handled (the reply budget was spent): handle them
    /// before reading the socket again.
    paused: bool,
    /// Events decoded so far (wrapping): tells whether a read completed a message.
    events: u32,
    /// Requests are not being read (counted once per pause).
    reads_paused: bool,
    /// Socket.IO state, for an Engine.IO session (boxed: most connections have none).
    sio: Option<Box<Session>>,
    /// The connection's peer was just replaced (`take_over`): its waker is to be set.
    took_over: bool,
}

enum Step {
    Progress,
    Pending,
    Done,
}

impl Conn {
    /// One poll, timed for the event-loop metrics (two clock reads a wake-up, not a message).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let start = Instant::now();
        let done = self.poll_once(cx);
        let took = start.elapsed();
        self.shard.counters.record_poll(Task::Connection, took);
        done
    }

    fn poll_once(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.peer.set_waker(cx.waker());
        if self.peer.readiness.get() & ready::REWATCH != 0 {
            self.clear(ready::REWATCH);
            let socket = &self.socket;
            if socket.poller().watch(socket.fd(), self.peer.id).is_err() {
                return Poll::Ready(());
            }
        }
        for _ in 0..READ_BUDGET {
            if self.took_over {
                // A WebSocket that took over a long-polling session has its peer now.
                self.took_over = false;
                self.peer.set_waker(cx.waker());
            }
            if self.peer.abort.get() {
                return Poll::Ready(());
            }
            // Polled in the loop: the request that started the wait was read in this poll,
            // and only a poll registers the waker its answer will use.
            if let Mode::HttpWait(waiting) = &mut self.mode {
                match waiting.response.as_mut().poll(cx) {
                    Poll::Ready(response) => {
                        let keep_alive = waiting.keep_alive;
                        let rest = std::mem::take(&mut waiting.rest);
                        self.respond(&response, keep_alive, rest);
                        self.serve_http();
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if let Some(request) = self.peer.take_close_request() {
                let (code, discard) = (request.close.code(), request.discard);
                self.start_close(code, &request.reason, discard);
            }
            if self.flush().is_err() {
                return Poll::Ready(());
            }
            if self.finished() {
                return Poll::Ready(());
            }
            match self.read(cx) {
                Step::Progress => {}
                Step::Pending => return Poll::Pending,
                Step::Done => return Poll::Ready(()),
            }
        }
        // Fairness: let the shard's other connections run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn finished(&mut self) -> bool {
        let sealed = self.tls.as_ref().is_none_or(|tls| !tls.wants_write());
        let flushed = self.peer.out().borrow().is_empty() && sealed;
        match self.mode {
            Mode::HttpReply if flushed && !self.eof => {
                // Our side is done: the client sees the end of the response, and its own
                // unread bytes are drained rather than reset.
                if let Some(tls) = &mut self.tls {
                    tls.send_close_notify();
                    let _ = crate::tls::send_records(tls, self.socket.fd());
                }
                // SAFETY: shutting down one direction of the socket this connection owns.
                unsafe { libc::shutdown(self.socket.fd(), libc::SHUT_WR) };
                self.mode = Mode::Lingering { left: LINGER_BYTES };
                false
            }
            Mode::HttpReply => flushed,
            Mode::Lingering { .. } => self.eof,
            Mode::Http(_) => self.eof && flushed,
            _ => self.eof || (self.close_queued && self.close_received && flushed),
        }
    }

    fn read(&mut self, cx: &mut Context<'_>) -> Step {
        if self.eof || matches!(self.mode, Mode::HttpReply | Mode::HttpWait(_)) {
            return Step::Pending;
        }
        if matches!(self.mode, Mode::Http(_)) {
            let budget = self.shard.config().limits.reply_budget();
            if self.peer.out().borrow().replies_over(budget) {
                // Pipelined requests whose responses are not read: read no more of them.
                return Step::Pending;
            }
        }
        if matches!(self.mode, Mode::Session | Mode::SocketIo)
            && !self.close_queued
            && self.shard.congested()
        {
            self.shard.wait_uncongested(cx.waker());
            return Step::Pending;
        }
        if self.is_websocket() && !self.close_queued {
            let (queued_over, over) = self.reply_debt();
            if over {
                // Its answers are not being read, or are still owed by other shards: read none
                // of its requests (TCP pushes back on this client alone). Writing the replies,
                // or one arriving, wakes this task.
                if !self.reads_paused {
                    self.reads_paused = true;
                    self.shard.counters.add(Counter::ReadsPaused, 1);
                }
                // Only unread answers are the client's doing (and can time it out).
                if queued_over && self.peer.stall.get() != Stall::Replies {
                    self.peer.set_stall(Stall::Replies, self.shard.now_ms());
                }
                return Step::Pending;
            }
            self.reads_paused = false;
            if self.peer.stall.get() == Stall::Replies {
                self.peer.set_stall(Stall::None, self.peer.last_heard.get());
            }
            if self.paused {
                self.paused = false;
                self.on_frames(&mut []);
                return Step::Progress;
            }
        }
        if self.peer.readiness.get() & ready::READABLE == 0 {
            return Step::Pending;
        }
        let shard = self.shard.clone();
        let mut scratch = shard.scratch.borrow_mut();
        // SAFETY: `scratch` is a live buffer of `scratch.len()` bytes.
        let n = unsafe {
            libc::recv(
                self.socket.fd(),
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock => {
                    self.clear(ready::READABLE);
                    Step::Pending
                }
                io::ErrorKind::Interrupted => Step::Progress,
                _ => Step::Done,
            };
        }
        let n = n as usize;
        if n == 0 {
            self.eof = true;
            return Step::Progress;
        }
        // A short read emptied the socket; the poller reports the next arrival.
        if n < scratch.len() && self.peer.readiness.get() & ready::HUNG_UP == 0 {
            self.clear(ready::READABLE);
        }
        self.peer.last_heard.set(shard.now_ms());
        let Some(mut tls) = self.tls.take() else {
            self.on_bytes(&mut scratch[..n]);
            return Step::Progress;
        };
        let mut plain = shard.plain.borrow_mut();
        if plain.is_empty() {
            plain.resize(SCRATCH_PLAIN, 0);
        }
        let received = crate::tls::receive(&mut tls, &scratch[..n], &mut plain, |data| {
            self.on_bytes(data)
        });
        self.tls = Some(tls);
        match received {
            Ok(ended) => {
                self.eof |= ended;
                Step::Progress
            }
            Err(e) => {
                conn_log!(debug, self, "TLS refused: {e}");
                // The alert rustls queued for it, if the socket takes it.
                if let Some(tls) = &mut self.tls {
                    let _ = crate::tls::send_records(tls, self.socket.fd());
                }
                Step::Done
            }
        }
    }

    /// The connection's answers against its reply budget: over it with the queued ones alone,
    /// and over it counting those other shards still owe. Counting the owed ones bounds how
    /// many requests a client can have in flight without reading (and so how many replies
    /// its queue can ever hold).
    fn reply_debt(&self) -> (bool, bool) {
        let budget = self.shard.config().limits.reply_budget();
        let out = self.peer.out().borrow();
        let queued = out.replies_over(budget);
        let owed = self.peer.owed.get() as usize;
        let less = ReplyBudget {
            messages: budget.messages.saturating_sub(owed),
            ..budget
        };
        // `less` is `budget` with fewer messages: over `budget` is over `less` too.
        (queued, out.replies_over(less))
    }

    fn clear(&self, bits: u8) {
        self.peer.readiness.set(self.peer.readiness.get() & !bits);
    }

    /// Write queued frames. They are gathered into the shard's write buffer (whole frames, up
    /// to `WRITE_CHUNK`) and sent with one `send`. Against `writev` of the same frames,
    /// interleaved runs of fanout -n 1000 -w 64 showed the same spread of server CPU per
    /// delivery; the single buffer is simpler and needs no iovec bookkeeping.
    fn flush(&mut self) -> io::Result<()> {
        let fd = self.socket.fd();
        let shard = self.shard.clone();
        let mut buf = shard.write_buf.borrow_mut();
        loop {
            if let Some(tls) = &mut self.tls {
                // Records first (the handshake's, then what was encrypted before): what the
                // socket cannot take yet waits in rustls, bounded by its buffer limit.
                if !crate::tls::send_records(tls, fd)? {
                    return self.wait_writable();
                }
            }
            {
                let mut out = self.peer.out().borrow_mut();
                if out.is_empty() {
                    return Ok(());
                }
                if !self.close_queued {
                    let dialect = self.peer.dialect();
                    out.queue_notice(|dropped| dialect.reply(&Reply::SlowConsumer { dropped }));
                }
                buf.clear();
                out.gather(&mut buf, WRITE_CHUNK);
            }
            let written = if let Some(tls) = &mut self.tls {
                // Encrypted into rustls's buffer; sent at the top of the next turn.
                io::Write::write(&mut tls.writer(), &buf)?
            } else {
                // MSG_DONTWAIT whatever the socket's mode: one blocked send would stall the
                // shard.
                let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
                // SAFETY: `buf` is a live, initialised buffer of `buf.len()` bytes.
                let sent = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
                shard.counters.add(Counter::Writes, 1);
                if sent >= 0 {
                    sent as usize
                } else {
                    let err = io::Error::last_os_error();
                    match err.kind() {
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::WouldBlock => return self.wait_writable(),
                        _ => return Err(err),
                    }
                }
            };
            let messages = self.peer.out().borrow_mut().consume(written);
            shard.counters.add(Counter::MessagesSent, messages as u64);
            if written > 0 && self.peer.stall.get() == Stall::Replies {
                // Reading its replies, however slowly: not stuck.
                self.peer.stall_since.set(shard.now_ms());
            }
        }
    }

    /// The socket is full: have the poller say when it is not.
    fn wait_writable(&self) -> io::Result<()> {
        let bits = self.peer.readiness.get();
        if bits & ready::WRITE_WATCHED == 0 {
            let fd = self.socket.fd();
            self.socket.poller().watch_writable(fd, self.peer.id)?;
            self.peer.readiness.set(bits | ready::WRITE_WATCHED);
        }
        Ok(())
    }

    fn on_bytes(&mut self, data: &mut [u8]) {
        match &mut self.mode {
            Mode::Http(buffered) => {
                buffered.extend_from_slice(data);
                self.serve_http();
            }
            Mode::Lingering { left } => {
                *left = left.saturating_sub(data.len());
                if *left == 0 {
                    self.eof = true;
                }
            }
            Mode::HttpReply | Mode::HttpWait(_) | Mode::Moved => {}
            Mode::Session | Mode::SocketIo | Mode::Echo | Mode::Refused => self.on_frames(data),
        }
    }

    /// Serve the complete HTTP requests read so far, in order (pipelining: each one is
    /// answered before the next is looked at).
    fn serve_http(&mut self) {
        loop {
            let Mode::Http(buffered) = &mut self.mode else {
                return;
            };
            let (mut request, len) = match http::parse(buffered) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return,
                Err(e) => {
                    let status = match e {
                        http::HeadError::TooLarge => 431,
                        http::HeadError::Malformed | http::HeadError::BadLength => 400,
                    };
                    let response = Response::error(status, ErrorCode::BadRequest, &e.to_string());
                    return self.respond(&response, false, Vec::new());
                }
            };
            let max_body = self.shard.config().http.max_body_bytes;
            if request.transfer_encoding {
                let message = "request bodies need Content-Length (no Transfer-Encoding)";
                let response = Response::error(411, ErrorCode::LengthRequired, message);
                return self.respond(&response, false, Vec::new());
            }
            if request.content_length > max_body {
                let message = format!("request bodies are limited to {max_body} bytes");
                let response = Response::error(413, ErrorCode::PayloadTooLarge, &message);
                return self.respond(&response, false, Vec::new());
            }
            let end = len + request.content_length;
            if buffered.len() < end {
                return; // The rest of the body is on its way.
            }
            let rest = buffered.split_off(end);
            request.body = buffered.split_off(len);
            self.on_request(request, rest);
        }
    }

    fn is_websocket(&self) -> bool {
        matches!(
            self.mode,
            Mode::Session | Mode::SocketIo | Mode::Echo | Mode::Refused
        )
    }

    /// Queue an HTTP response; with `keep_alive` the connection goes on to `rest` (the next
    /// request), otherwise it closes once the response is written.
    fn respond(&mut self, response: &Response, keep_alive: bool, rest: Vec<u8>) {
        let keep_alive = keep_alive && !self.shard.shutting_down.get();
        let bytes = response.to_bytes(keep_alive);
        self.shard.answer_http(&self.peer, Rc::from(bytes));
        if keep_alive {
            self.mode = Mode::Http(rest);
            // The handshake timeout now times the wait for the next request.
            self.enter(Phase::Http);
        } else {
            self.mode = Mode::HttpReply;
        }
    }

    fn on_request(&mut self, mut request: http::Request, mut rest: Vec<u8>) {
        request.socket = self.peer.fd.get();
        let keep_alive = request.keep_alive;
        match routes::route(&self.shard, &request) {
            Route::Respond(response) => self.respond(&response, keep_alive, rest),
            Route::Wait(response) => {
                let waiting = Waiting {
                    response,
                    keep_alive,
                    rest,
                };
                self.mode = Mode::HttpWait(Box::new(waiting));
            }
            Route::Upgrade(Dialect::SocketIo) => {
                if let Some(owner) = crate::socketio::polling::held_elsewhere(&self.shard, &request)
                {
                    return self.move_to(owner, request, rest);
                }
                self.peer.set_dialect(Dialect::SocketIo);
                self.upgrade_socketio(request);
                if !rest.is_empty() && self.is_websocket() {
                    self.on_frames(&mut rest);
                }
            }
            Route::Upgrade(dialect) => {
                self.peer.set_dialect(dialect);
                self.upgrade(request, false);
                // Bytes after the head are the client's first frames.
                if !rest.is_empty() && self.is_websocket() {
                    self.on_frames(&mut rest);
                }
            }
            Route::Echo => {
                self.upgrade(request, true);
                if !rest.is_empty() && self.is_websocket() {
                    self.on_frames(&mut rest);
                }
            }
        }
    }

    /// Hand this connection to shard `owner`, which holds the session its request names:
    /// the socket goes on there, and this side ends without a word to the client.
    fn move_to(&mut self, owner: usize, request: http::Request, rest: Vec<u8>) {
        // SAFETY: the descriptor is this connection's own, open for as long as `self.socket`.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.socket.fd()) };
        let fd = match fd.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                conn_log!(
                    warn,
                    self,
                    "could not hand the connection to shard {owner}: {e}"
                );
                let refused = Response::error(503, ErrorCode::Overloaded, "try again");
                return self.respond(&refused.header("Retry-After", "1"), false, Vec::new());
            }
        };
        let adoption = Adoption {
            fd,
            tls: self.tls.take(),
            request,
            rest,
        };
        conn_log!(debug, self, owner, "moving");
        let msg = crate::shard::MeshMsg::Adopt(Box::new(adoption));
        self.shard.to_shard(owner, msg, Now::read());
        self.mode = Mode::Moved;
        self.peer.abort.set(true);
    }

    /// The WebSocket handshake: checks, credentials, a connection slot, then `101`.
    fn upgrade(&mut self, request: http::Request, echo: bool) {
        let shard = self.shard.clone();
        let key = match http::check_upgrade(&request) {
            Ok(key) => key,
            Err(refused) => return self.respond(&refused, false, Vec::new()),
        };
        // Before the credentials: checking a token costs more than refusing.
        if let Some(refused) = refuse_address(&shard, self.peer.fd.get()) {
            return self.respond(&refused, false, Vec::new());
        }
        let principal = if echo {
            None
        } else {
            match shard.auth.authenticate(&request.credentials) {
                Ok(p) => Some(p),
                Err(e) => {
                    shard.global.auth_failed(e.code());
                    if shard.config().auth.refuse_with == RefuseWith::Http {
                        let refused = Response::error(401, e.code(), &e.to_string());
                        return self.respond(&refused, false, Vec::new());
                    }
                    shard.answer_http(&self.peer, Rc::from(http::upgrade_response(key)));
                    self.mode = Mode::Refused;
                    self.enter(Phase::Open);
                    return self.start_close(e.close_code().code(), e.code().as_str(), false);
                }
            }
        };
        // An exclusive credential's session: its user and `?session=NAME`.
        let session = match &principal {
            Some(p) if p.exclusive => {
                let name = crate::routes::api::params(&request.query)
                    .into_iter()
                    .find_map(|(k, v)| (k == "session").then_some(v))
                    .unwrap_or_default();
                let max = crate::shard::sessions::MAX_SESSION_NAME;
                if name.len() > max {
                    let message = format!("\"session\" is over {max} bytes");
                    let refused = Response::error(400, ErrorCode::BadRequest, &message);
                    return self.respond(&refused, false, Vec::new());
                }
                Some(crate::shard::sessions::session_key(p, &name))
            }
            _ => None,
        };
        if let Err(refused) = take_slot(&shard) {
            return self.respond(&refused, false, Vec::new());
        }
        if let Some(p) = principal.as_ref().filter(|p| !shard.admit_session(p)) {
            shard.global.close();
            let message = format!("org {:?} holds all the connections it may", p.org);
            let refused = Response::error(429, ErrorCode::TooManyConnections, &message);
            return self.respond(&refused, false, Vec::new());
        }
        self.holds_slot = true;
        shard.answer_http(&self.peer, Rc::from(http::upgrade_response(key)));
        self.enter(Phase::Open);
        match principal {
            Some(principal) => {
                if let Some(key) = session {
                    // READY once the session's owner grants it.
                    shard.claim_session(&self.peer, key);
                } else {
                    let id = shard.connection_id(self.peer.id);
                    let ready = Reply::Ready {
                        connection_id: &id,
                        shard: shard.id,
                    };
                    shard.answer(&self.peer, &ready);
                }
                self.set_token_deadline(&principal);
                self.rates = Rates::of(&shard.config().limits, shard.now_ms());
                shard.open_session(&self.peer, &principal);
                self.mode = Mode::Session;
                conn_log!(debug, self, tls = self.tls.is_some(), "session opened");
            }
            None => self.mode = Mode::Echo,
        }
    }

    fn enter(&self, phase: Phase) {
        self.peer.phase.set(phase);
        self.peer.phase_since.set(self.shard.now_ms());
    }

    fn on_frames(&mut self, data: &mut [u8]) {
        let mut decoder = std::mem::take(&mut self.decoder);
        let max = self.shard.config().limits.max_message_bytes;
        let events = self.events;
        let result = decoder.decode(data, max, &mut |event| self.on_event(event));
        let idle = decoder.is_idle();
        self.decoder = decoder;
        if let Err(violation) = result {
            // Fail the connection (RFC 6455 7.1.7): close frame, then close TCP without
            // waiting for the peer's answer.
            self.shard.counters.add(Counter::BadMessages, 1);
            self.start_close(violation.code, violation.reason, false);
            self.close_received = true;
            return;
        }
        if self.paused || self.close_queued {
            return;
        }
        // A message has begun to arrive: it must end within the message timeout, counted
        // from the last message completed (a trickling client cannot hold a buffer for ever).
        let stall = self.peer.stall.get();
        if idle {
            if stall == Stall::Message {
                self.peer.set_stall(Stall::None, 0);
            }
        } else if stall != Stall::Connect && (stall != Stall::Message || self.events != events) {
            // The clock, not last_heard: bytes read long ago may be decoded only now (after a
            // pause for unread replies), and must not start the wait already expired.
            self.peer.stall.set(Stall::Message);
            self.peer.stall_since.set(self.shard.now_ms());
        }
    }

    /// Handle one decoded event and say whether to decode the next.
    fn on_event(&mut self, event: Event<'_>) -> Flow {
        self.events = self.events.wrapping_add(1);
        if self.close_queued {
            // After our close frame only the peer's close matters (RFC 6455 5.5.1).
            if let Event::Close(_) = event {
                self.close_received = true;
                return Flow::Stop;
            }
            return Flow::Continue;
        }
        match event {
            Event::Text(text) if self.sio.is_some() => {
                self.on_sio(text.len(), |sio, cx| sio.on_text(cx, text))
            }
            Event::Binary(bytes) if self.sio.is_some() => {
                self.on_sio(bytes.len(), |sio, cx| sio.on_binary(cx, bytes))
            }
            Event::Text(text) => self.on_text(text),
            Event::Binary(bytes) => {
                if matches!(self.mode, Mode::Echo) {
                    self.shard
                        .answer_frame(&self.peer, codec::frame(codec::opcode::BINARY, bytes));
                } else {
                    let refusal = Refusal::bad_request(
                        "binary frames are not supported: send JSON in text frames",
                    );
                    self.refuse(&refusal);
                }
            }
            Event::Ping(payload) => self
                .peer
                .send_urgent(codec::frame(codec::opcode::PONG, payload)),
            Event::Pong(_) => {}
            Event::Close(close) => {
                self.close_received = true;
                let code = close.map_or(Close::Normal.code(), |(code, _)| code);
                self.start_close(code, "", false);
                return Flow::Stop;
            }
        }
        if self.close_queued {
            Flow::Stop
        } else if self.reply_debt().1 {
            // The rest waits in the decoder until the replies are read.
            self.paused = true;
            Flow::Pause
        } else {
            Flow::Continue
        }
    }

    fn on_text(&mut self, text: &str) {
        let shard = self.shard.clone();
        let principal = match &self.mode {
            // The shard's copy: a reload may have replaced it.
            Mode::Session => match self.peer.principal() {
                Some(p) => p,
                None => return,
            },
            Mode::Echo => {
                return shard.answer_frame(
                    &self.peer,
                    codec::frame(codec::opcode::TEXT, text.as_bytes()),
                )
            }
            _ => return,
        };
        if !self.take_rate(Some(&principal), text.len()) {
            return;
        }
        let parsed = shard.parser.borrow_mut().parse(text.as_bytes());
        match parsed {
            Ok(Request::Refresh { token, id }) => self.refresh(&principal, token, id),
            Ok(request)
                if self.peer.token_expired.get() && !matches!(request, Request::Ping { .. }) =>
            {
                let message = "the token has expired: send REFRESH with a new one";
                let id = match &request {
                    Request::Ingest(ingest) => Some(ingest.raw_key),
                    Request::Sub { id, .. }
                    | Request::Unsub { id, .. }
                    | Request::Publish { id, .. } => *id,
                    _ => None,
                };
                let reply = Reply::Error {
                    code: ErrorCode::TokenExpired,
                    message,
                    id,
                    channel: None,
                };
                shard.answer(&self.peer, &reply);
            }
            Ok(request) => match shard.request(&self.peer, &principal, request, Now::read()) {
                Handled::Done => self.bad_messages = 0,
                Handled::Refused => self.count_bad(),
            },
            Err(refusal) => self.refuse(&refusal),
        }
    }

    /// Count a message of `size` bytes against the connection's rates and its principal's
    /// quota; when over, answer `RateLimited` (and close after too many in a row) and say
    /// it is not to be handled.
    fn take_rate(&mut self, principal: Option<&Principal>, size: usize) -> bool {
        let shard = self.shard.clone();
        shard.counters.add(Counter::MessagesReceived, 1);
        let config = shard.config();
        let limits = &config.limits;
        if self.rates.is_none() && (limits.messages_per_second | limits.bytes_per_second) > 0 {
            // A reload set a rate since the connection opened.
            self.rates = Rates::of(limits, shard.now_ms());
        }
        let taken = match &mut self.rates {
            Some(rates) => rates
                .take(limits, shard.now_ms(), size)
                .inspect_err(|_| shard.counters.add(Counter::LimitConnectionRate, 1)),
            None => Ok(()),
        };
        let taken = match principal {
            Some(principal) => taken.and_then(|()| shard.take_quota(principal, 1)),
            None => taken,
        };
        if let Err(retry_after_ms) = taken {
            shard.answer(&self.peer, &Reply::RateLimited { retry_after_ms });
            self.limited_messages += 1;
            if self.limited_messages >= limits.max_rate_limited {
                self.start_close(Close::RateLimited.code(), "rate limit exceeded", false);
            }
            return false;
        }
        self.limited_messages = 0;
        true
    }

    /// Hand a Socket.IO frame of `size` bytes to the session, and act on what it says.
    fn on_sio(&mut self, size: usize, handle: impl FnOnce(&mut Session, &Cx<'_>) -> Outcome) {
        let principal = self.peer.principal();
        if !self.take_rate(principal.as_deref(), size) {
            return;
        }
        let Some(mut sio) = self.sio.take() else {
            return;
        };
        let (shard, peer) = (self.shard.clone(), self.peer.clone());
        let outcome = handle(
            &mut sio,
            &Cx {
                shard: &shard,
                peer: &peer,
            },
        );
        self.sio = Some(sio);
        match outcome {
            Outcome::Handled => self.bad_messages = 0,
            Outcome::Refused => self.count_bad(),
            Outcome::Close => self.start_close(Close::Normal.code(), "", false),
            Outcome::Upgrade => self.take_over(),
        }
    }

    /// The probe said `5`: this WebSocket carries the long-polling session from now on. Its
    /// peer (subscriptions, queue, Socket.IO state, connection slot) becomes this
    /// connection's, and the socket is watched under that peer's id.
    fn take_over(&mut self) {
        let shard = self.shard.clone();
        let polling = self.sio.as_mut().and_then(|sio| sio.taking_over());
        let Some((peer, sio)) = polling.and_then(|p| p.take_over(&shard)) else {
            return self.start_close(Close::Normal.code(), "session gone", false);
        };
        let probe = std::mem::replace(&mut self.peer, peer);
        // What the probe's peer still holds (its `3probe`) goes first.
        {
            let mut old = probe.out().borrow_mut();
            let mut new = self.peer.out().borrow_mut();
            let mut pending = Vec::new();
            let n = old.gather(&mut pending, usize::MAX);
            old.consume(n);
            if !pending.is_empty() {
                new.push_urgent(Rc::from(pending));
            }
        }
        shard.remove_conn(&probe);
        let fd = self.socket.fd();
        let rewatched = self
            .socket
            .poller()
            .forget(fd)
            .and_then(|()| self.socket.poller().watch(fd, self.peer.id));
        if let Err(e) = rewatched {
            conn_log!(
                warn,
                self,
                "could not watch the socket after an upgrade: {e}"
            );
            self.peer.abort.set(true);
        }
        self.peer.fd.set(fd);
        self.peer.readiness.set(ready::READABLE);
        self.holds_slot = true;
        self.sio = Some(Box::new(sio));
        self.took_over = true;
        conn_log!(debug, self, "Socket.IO session upgraded to WebSocket");
    }

    /// An Engine.IO session over WebSocket: checks and a connection slot, then `101` and the
    /// open packet. Credentials are not required here: a CONNECT's auth payload may bring
    /// them, and a refusal is the namespace's CONNECT_ERROR, as Socket.IO clients expect.
    fn upgrade_socketio(&mut self, request: http::Request) {
        let shard = self.shard.clone();
        let key = match http::check_upgrade(&request) {
            Ok(key) => key,
            Err(refused) => return self.respond(&refused, false, Vec::new()),
        };
        if let Some(refused) = refuse_address(&shard, self.peer.fd.get()) {
            return self.respond(&refused, false, Vec::new());
        }
        if shard.shutting_down.get() {
            return self.respond(&draining(), false, Vec::new());
        }
        let params = crate::routes::api::params(&request.query);
        let sid = params
            .iter()
            .find(|(k, _)| k == "sid")
            .map(|(_, v)| v.as_str());
        if let Some(sid) = sid {
            // An upgrade of a long-polling session of this shard (one of another shard's was
            // handed to it: `move_to`).
            let conn = crate::socketio::polling::parse_sid(&shard, sid)
                .filter(|(owner, _)| *owner == shard.id)
                .map(|(_, conn)| conn);
            let polling = conn
                .and_then(|conn| shard.polls.get(conn))
                .filter(|p| !p.is_upgraded());
            let Some(polling) = polling else {
                if conn.and_then(|conn| shard.peer(conn)).is_some() {
                    // Upgraded already: as Engine.IO does, accept this one and close it.
                    shard.answer_http(&self.peer, Rc::from(http::upgrade_response(key)));
                    self.mode = Mode::Refused;
                    self.enter(Phase::Open);
                    return self.start_close(Close::Normal.code(), "session upgraded", false);
                }
                let refused = crate::socketio::polling::refusal(1, "Session ID unknown");
                return self.respond(&refused, false, Vec::new());
            };
            shard.answer_http(&self.peer, Rc::from(http::upgrade_response(key)));
            self.enter(Phase::Open);
            self.mode = Mode::SocketIo;
            conn_log!(debug, self, sid, "probing");
            self.sio = Some(Box::new(Session::takeover(polling)));
            self.peer.set_stall(Stall::Connect, shard.now_ms());
            return;
        }
        if let Err(refused) = take_slot(&shard) {
            return self.respond(&refused, false, Vec::new());
        }
        self.holds_slot = true;
        shard.answer_http(&self.peer, Rc::from(http::upgrade_response(key)));
        self.enter(Phase::Open);
        self.mode = Mode::SocketIo;
        let config = shard.config();
        let conformance = config.diagnostics.socketio_conformance;
        self.sio = Some(Box::new(Session::new(request.credentials, conformance)));
        let sid = shard.connection_id(self.peer.id);
        let open = Session::open_packet(&shard, &sid, false);
        shard.answer_frame(
            &self.peer,
            codec::frame(codec::opcode::TEXT, open.as_bytes()),
        );
        self.peer.set_stall(Stall::Connect, shard.now_ms());
        self.rates = Rates::of(&config.limits, shard.now_ms());
        conn_log!(
            debug,
            self,
            tls = self.tls.is_some(),
            "Socket.IO session opened"
        );
    }

    /// Take a fresh token for this connection: the same user and org, new scopes and expiry
    /// at once (channels it may no longer read are unsubscribed first).
    fn refresh(&mut self, current: &Principal, token: String, id: Option<&[u8]>) {
        let shard = self.shard.clone();
        if current.expires_ms.is_none() {
            let refusal = Refusal::bad_request(
                "this connection authenticated with an API key: there is no token to refresh",
            );
            return self.refuse(&refusal.with_id(id));
        }
        let credentials = crate::auth::Credentials {
            key: None,
            token: Some(token),
        };
        let fresh = match shard.auth.authenticate(&credentials) {
            Ok(fresh) => fresh,
            Err(e) => {
                shard.global.auth_failed(e.code());
                let refusal = Refusal {
                    code: e.code(),
                    message: e.to_string(),
                    id: None,
                };
                return self.refuse(&refusal.with_id(id));
            }
        };
        if fresh.user != current.user || fresh.org != current.org {
            let refusal = Refusal {
                code: ErrorCode::Forbidden,
                message: "a refreshed token must name the same user (sub) and org".into(),
                id: None,
            };
            return self.refuse(&refusal.with_id(id));
        }
        let categories = &shard.config().channels.categories;
        let revoked: Vec<String> = self
            .peer
            .channels
            .borrow()
            .iter()
            .filter(|name| {
                let allowed = crate::auth::Channel::parse(name, categories)
                    .is_ok_and(|c| fresh.may(Scope::Subscribe, &c));
                !allowed
            })
            .map(|name| name.to_string())
            .collect();
        if !revoked.is_empty() {
            let unsub = Request::Unsub {
                channels: revoked,
                id: None,
            };
            let _ = shard.request(&self.peer, &fresh, unsub, Now::read());
        }
        self.set_token_deadline(&fresh);
        let expires = fresh.expires_ms.unwrap_or(u64::MAX);
        shard.refresh_session(&self.peer, &fresh);
        self.mode = Mode::Session;
        self.bad_messages = 0;
        let expires_ms = expires;
        shard.answer(&self.peer, &Reply::Refreshed { id, expires_ms });
    }

    /// Schedule the token's expiry on the shard clock (the sweeper acts on it).
    fn set_token_deadline(&self, principal: &Principal) {
        let deadline = match principal.expires_ms {
            Some(expires) => {
                let left = expires.saturating_sub(crate::decision::unix_ms());
                self.shard.now_ms().saturating_add(left)
            }
            None => u64::MAX,
        };
        self.peer.token_deadline.set(deadline);
        self.peer.token_expired.set(false);
    }

    /// Answer a malformed message; a client that keeps sending garbage is closed with 4400.
    fn refuse(&mut self, refusal: &Refusal) {
        let shard = self.shard.clone();
        shard.answer(&self.peer, &Reply::refusal(refusal));
        match refusal.code {
            ErrorCode::InvalidDecision => shard.counters.add(Counter::DecisionsRejected, 1),
            _ => self.count_bad(),
        }
    }

    /// One more malformed or refused message in a row; too many close the connection.
    fn count_bad(&mut self) {
        self.shard.counters.add(Counter::BadMessages, 1);
        self.bad_messages += 1;
        if self.bad_messages >= self.shard.config().limits.max_bad_messages {
            self.start_close(
                Close::BadMessages.code(),
                "too many malformed or refused messages",
                false,
            );
        }
    }

    /// Queue a close frame (after what is queued, unless `discard`) and stop taking messages.
    fn start_close(&mut self, code: u16, reason: &str, discard: bool) {
        if !self.is_websocket() {
            self.peer.abort.set(true);
            return;
        }
        if self.close_queued {
            return;
        }
        // Closes for the client's conduct or rights (4400-4499, 1008, 1009) are worth an
        // operator's attention; the others (normal, going away) are routine.
        if (4400..4500).contains(&code) || code == 1008 || code == 1009 {
            conn_log!(info, self, code, reason, "closing the connection");
        } else {
            conn_log!(debug, self, code, reason, "closing the connection");
        }
        let mut out = self.peer.out().borrow_mut();
        if discard {
            out.clear();
        }
        out.push_reply(codec::close_frame(code, reason));
        drop(out);
        self.close_queued = true;
        self.enter(Phase::Closing);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shard.remove_conn(&self.peer);
        if self.holds_slot {
            self.shard.global.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-connection memory is mostly these structs: keep them from growing unnoticed.
    #[test]
    fn connection_state_stays_small() {
        let conn = std::mem::size_of::<Conn>();
        let peer = std::mem::size_of::<Peer>();
        println!("Conn {conn} B, Peer {peer} B");
        assert!(conn <= 256, "Conn is {conn} bytes");
        assert!(peer <= 256, "Peer is {peer} bytes");
    }
}
