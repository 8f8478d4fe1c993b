//! Engine.IO over HTTP long-polling: a session is a connection without a socket. Its peer
//! sits in the shard like any other (subscriptions, queue, sweeper); GETs take what its
//! queue holds, POSTs bring the client's packets, and a task per session answers a waiting
//! GET when something is queued and ends the session when it closes.
//!
//! The session id is the peer's connection id, `{boot}-{shard}-{conn}`: it names the shard
//! that holds the session. SO_REUSEPORT hands a request to any shard; one for a session of
//! another shard is sent to it through the mesh ([`crate::shard::MeshMsg::Polling`]) and
//! answered from there, and a WebSocket upgrade moves to it (`conn.rs`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::task::Poll;

use base64::Engine as _;

use super::session::{Cx, Outcome, Session};
use crate::clock::Now;
use crate::codec::opcode;
use crate::dialect::Dialect;
use crate::http::Response;
use crate::metrics::Counter;
use crate::shard::{Peer, Phase, Shard, Stall};

/// Most bytes of packets one GET takes (socket.io-client accepts any; the bound keeps one
/// answer from holding a slow consumer's whole queue).
const MAX_GET_BYTES: usize = 1 << 20;

/// A polling request for a session, as it crosses to the shard that holds it.
#[derive(Debug)]
pub struct Exchange {
    /// The session's connection id on that shard.
    pub conn: u64,
    /// `POST` (packets in) or `GET` (packets out).
    pub post: bool,
    /// A POST's body.
    pub body: Vec<u8>,
    /// Where the response goes.
    pub reply: flume::Sender<Response>,
}

/// One long-polling session.
pub struct Polling {
    peer: Rc<Peer>,
    sio: RefCell<Option<Session>>,
    /// The GET waiting for packets.
    get: RefCell<Option<flume::Sender<Response>>>,
    /// A WebSocket took the session over: the task ends and leaves the peer to it.
    upgraded: Cell<bool>,
    /// The client closed the session (a pending GET gets a noop, not a close).
    client_closed: Cell<bool>,
    /// A WebSocket probed to take the session over: GETs are answered at once (the client
    /// pauses polling, and waits for its GET, before it completes the upgrade).
    probed: Cell<bool>,
    /// Its message and byte rates, when `[limits]` sets either (as a WebSocket's).
    rates: RefCell<Option<Box<crate::conn::Rates>>>,
    /// Refused packets in a row (`limits.max_bad_messages` end the session).
    bad: Cell<u32>,
    /// Rate-limited packets in a row (`limits.max_rate_limited` end the session).
    limited: Cell<u32>,
}

/// A shard's polling sessions, by connection id.
#[derive(Default)]
pub struct Sessions {
    by_conn: RefCell<HashMap<u64, Rc<Polling>>>,
    /// Sessions the client closed while no GET was waiting, and until when (shard clock) the
    /// GET it may have had in flight gets the noop it would have had: a GET sent before the
    /// close can arrive after it, through the mesh or another connection.
    closed: RefCell<HashMap<u64, u64>>,
}

impl Sessions {
    /// The session of connection `conn`.
    pub fn get(&self, conn: u64) -> Option<Rc<Polling>> {
        self.by_conn.borrow().get(&conn).cloned()
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.by_conn.borrow().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.by_conn.borrow().is_empty()
    }
}

/// `{"code":N,"message":…}` with 400: Engine.IO's refusals (its codes: 0 transport unknown,
/// 1 session id unknown, 2 bad handshake method, 3 bad request, 5 unsupported protocol
/// version).
pub fn refusal(code: u8, message: &str) -> Response {
    let mut body = format!(r#"{{"code":{code},"message":"#).into_bytes();
    crate::json::push_str(&mut body, message);
    body.push(b'}');
    Response::json(400, body)
}

fn text(body: impl Into<Vec<u8>>) -> Response {
    Response::new(200, "text/plain; charset=UTF-8", body)
}

/// Open a session: the open packet is the answer. A new session is a new connection, held
/// to the same per-address rate (`[limits] connections_per_ip_per_second`).
pub fn handshake(shard: &Rc<Shard>, request: &crate::http::Request) -> Response {
    if let Some(refused) = crate::conn::refuse_address(shard, request.socket) {
        return refused;
    }
    if let Err(refused) = crate::conn::take_slot(shard) {
        return refused;
    }
    let credentials = request.credentials.clone();
    let peer = shard.add_conn(Now::read());
    peer.set_dialect(Dialect::SocketIo);
    peer.phase.set(Phase::Open);
    peer.set_stall(Stall::Connect, shard.now_ms());
    let conformance = shard.config().diagnostics.socketio_conformance;
    let session = Rc::new(Polling {
        peer: peer.clone(),
        sio: RefCell::new(Some(Session::new(credentials, conformance))),
        get: RefCell::new(None),
        upgraded: Cell::new(false),
        client_closed: Cell::new(false),
        probed: Cell::new(false),
        rates: RefCell::new(crate::conn::Rates::of(
            &shard.config().limits,
            shard.now_ms(),
        )),
        bad: Cell::new(0),
        limited: Cell::new(0),
    });
    shard
        .polls
        .by_conn
        .borrow_mut()
        .insert(peer.id, session.clone());
    glommio::spawn_local(run(shard.clone(), session)).detach();
    let sid = shard.connection_id(peer.id);
    text(Session::open_packet(shard, &sid, true))
}

/// The connection id in `sid`, and the shard that holds it, if it is one of this node's.
pub fn parse_sid(shard: &Shard, sid: &str) -> Option<(usize, u64)> {
    let mut parts = sid.split('-');
    let (boot, owner, conn) = (parts.next()?, parts.next()?, parts.next()?);
    let boot = u64::from_str_radix(boot, 16).ok()?;
    let owner: usize = owner.parse().ok()?;
    (boot == shard.global.boot_id && owner < shard.nshards && parts.next().is_none())
        .then_some((owner, conn.parse().ok()?))
}

/// The shard holding the session a WebSocket upgrade names (`?sid=`), when it is not this
/// one.
pub fn held_elsewhere(shard: &Shard, request: &crate::http::Request) -> Option<usize> {
    let params = crate::routes::api::params(&request.query);
    let sid = params.iter().find(|(k, _)| k == "sid")?;
    parse_sid(shard, &sid.1)
        .map(|(owner, _)| owner)
        .filter(|owner| *owner != shard.id)
}

/// Serve a GET or POST for session `conn` of this shard.
pub fn exchange(shard: &Shard, exchange: Exchange) {
    let answer = |response| {
        let _ = exchange.reply.send(response);
    };
    let Some(session) = shard.polls.get(exchange.conn).filter(|s| !s.upgraded.get()) else {
        let mut closed = shard.polls.closed.borrow_mut();
        let late = closed
            .remove(&exchange.conn)
            .is_some_and(|until| shard.now_ms() <= until);
        if late && !exchange.post {
            return answer(text(&b"6"[..]));
        }
        return answer(refusal(1, "Session ID unknown"));
    };
    let peer = &session.peer;
    if super::silent_too_long(peer, &shard.config().socketio, shard.now_ms()) {
        // Past its pong's deadline, though the sweep has not closed it yet.
        session.end(shard);
        return answer(refusal(1, "Session ID unknown"));
    }
    if !exchange.post {
        if session.get.borrow().is_some() {
            // Two GETs at once: Engine.IO ends the session.
            session.end(shard);
            return answer(refusal(3, "overlapping GET requests"));
        }
        *session.get.borrow_mut() = Some(exchange.reply);
        if session.probed.get() && peer.out().borrow().is_empty() {
            session.release_get();
        }
        peer.wake();
        return;
    }
    peer.last_heard.set(shard.now_ms());
    if exchange.body.len() > shard.config().limits.max_message_bytes {
        session.end(shard);
        return answer(Response::error(
            413,
            crate::codes::ErrorCode::PayloadTooLarge,
            "payload over maxPayload",
        ));
    }
    let Some(mut sio) = session.sio.borrow_mut().take() else {
        return answer(refusal(1, "Session ID unknown"));
    };
    let cx = Cx { shard, peer };
    let mut outcome = Outcome::Handled;
    // The client's own close (`1`), rather than one for its conduct.
    let mut said_close = false;
    for record in exchange.body.split(|b| *b == 0x1e) {
        said_close = record == b"1";
        if !session.admit(shard, record.len()) {
            outcome = if session.limited.get() >= shard.config().limits.max_rate_limited {
                Outcome::Close
            } else {
                Outcome::Handled
            };
            if outcome == Outcome::Close {
                break;
            }
            continue;
        }
        outcome = match record.split_first() {
            Some((b'b', b64)) => match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(bytes) => sio.on_binary(&cx, &bytes),
                Err(_) => Outcome::Close,
            },
            _ => match std::str::from_utf8(record) {
                Ok(text) => sio.on_text(&cx, text),
                Err(_) => Outcome::Close,
            },
        };
        match outcome {
            Outcome::Refused => {
                session.bad.set(session.bad.get() + 1);
                if session.bad.get() >= shard.config().limits.max_bad_messages {
                    outcome = Outcome::Close;
                }
            }
            Outcome::Handled => session.bad.set(0),
            Outcome::Close | Outcome::Upgrade => {}
        }
        if matches!(outcome, Outcome::Close | Outcome::Upgrade) {
            break;
        }
    }
    *session.sio.borrow_mut() = Some(sio);
    if matches!(outcome, Outcome::Close | Outcome::Upgrade) {
        session.client_closed.set(said_close);
        if said_close && session.get.borrow().is_none() {
            let now = shard.now_ms();
            let mut closed = shard.polls.closed.borrow_mut();
            closed.retain(|_, until| *until >= now);
            let until = now.saturating_add(shard.config().socketio.ping_timeout_ms);
            closed.insert(peer.id, until);
        }
        session.end(shard);
    }
    answer(Response::new(200, "text/html", &b"ok"[..]));
}

impl Polling {
    /// Count a packet of `size` bytes against the session's rates and its principal's
    /// quota, as a WebSocket's messages are; over them, tell the client (`RateLimited`)
    /// and say it is not to be handled.
    fn admit(&self, shard: &Shard, size: usize) -> bool {
        let limits = &shard.config().limits;
        let now = shard.now_ms();
        let mut rates = self.rates.borrow_mut();
        if rates.is_none() && (limits.messages_per_second | limits.bytes_per_second) > 0 {
            *rates = crate::conn::Rates::of(limits, now);
        }
        shard.counters.add(Counter::MessagesReceived, 1);
        let mut taken = match rates.as_mut() {
            Some(rates) => rates
                .take(limits, now, size)
                .inspect_err(|_| shard.counters.add(Counter::LimitConnectionRate, 1)),
            None => Ok(()),
        };
        if let Some(principal) = self.peer.principal().filter(|_| taken.is_ok()) {
            taken = shard.take_quota(&principal, 1);
        }
        match taken {
            Ok(()) => {
                self.limited.set(0);
                true
            }
            Err(retry_after_ms) => {
                self.limited.set(self.limited.get() + 1);
                let limited = crate::dialect::Reply::RateLimited { retry_after_ms };
                shard.answer(&self.peer, &limited);
                false
            }
        }
    }

    /// End the session: its task answers a waiting GET and removes it.
    fn end(&self, shard: &Shard) {
        shard.polls.by_conn.borrow_mut().remove(&self.peer.id);
        self.peer.abort.set(true);
        self.peer.wake();
    }

    /// Whether a WebSocket took the session over.
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.get()
    }

    /// Hand the session to a WebSocket that completed its upgrade: a waiting GET gets a
    /// noop, and the peer and its Socket.IO state are the WebSocket's from now on.
    pub fn take_over(&self, shard: &Shard) -> Option<(Rc<Peer>, Session)> {
        let sio = self.sio.borrow_mut().take()?;
        self.upgraded.set(true);
        shard.polls.by_conn.borrow_mut().remove(&self.peer.id);
        if let Some(get) = self.get.borrow_mut().take() {
            let _ = get.send(text(&b"6"[..]));
        }
        self.peer.wake();
        Some((self.peer.clone(), sio))
    }

    /// Answer the waiting GET with a noop, if one waits (a WebSocket probes to take over).
    pub fn release_get(&self) {
        self.probed.set(true);
        if let Some(get) = self.get.borrow_mut().take() {
            let _ = get.send(text(&b"6"[..]));
        }
    }

    /// Answer the waiting GET with what the queue holds, if anything.
    fn answer_get(&self) {
        if self.peer.out().borrow().is_empty() {
            return;
        }
        let Some(get) = self.get.borrow_mut().take() else {
            return;
        };
        let mut out = self.peer.out().borrow_mut();
        out.queue_notice(|dropped| {
            Dialect::SocketIo.reply(&crate::dialect::Reply::SlowConsumer { dropped })
        });
        let mut frames = Vec::new();
        let taken = out.gather(&mut frames, MAX_GET_BYTES);
        out.consume(taken);
        drop(out);
        let _ = get.send(text(payload(&frames)));
    }
}

/// WebSocket frames (as queued for a socket) made into an Engine.IO polling payload: one
/// record per text frame, `b<base64>` per binary one, joined by 0x1e.
fn payload(frames: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frames.len());
    let mut rest = frames;
    while rest.len() >= 2 {
        let code = rest[0] & 0x0f;
        let (len, head): (usize, usize) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => {
                let mut n = [0; 8];
                n.copy_from_slice(&rest[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                    10,
                )
            }
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        let Some(body) = rest.get(head..head.saturating_add(len)) else {
            break;
        };
        let record = |out: &mut Vec<u8>| {
            if !out.is_empty() {
                out.push(0x1e);
            }
        };
        if code == u8::from(opcode::TEXT) {
            record(&mut out);
            out.extend_from_slice(body);
        } else if code == u8::from(opcode::BINARY) {
            record(&mut out);
            out.push(b'b');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(body)
                    .as_bytes(),
            );
        }
        rest = &rest[head + len..];
    }
    out
}

/// The session's task: answer GETs as packets are queued, and end it when it closes (the
/// client's close, a ping timeout, the shard's close request).
async fn run(shard: Rc<Shard>, session: Rc<Polling>) {
    std::future::poll_fn(|cx| {
        let peer = &session.peer;
        if session.upgraded.get() {
            // The peer's waker is the WebSocket's now (and may be its only one: a detached
            // task nobody can wake is dropped).
            return Poll::Ready(());
        }
        peer.set_waker(cx.waker());
        let closing = peer.take_close_request().is_some();
        if closing || peer.abort.get() {
            shard.polls.by_conn.borrow_mut().remove(&peer.id);
            if let Some(get) = session.get.borrow_mut().take() {
                let packet: &[u8] = if session.client_closed.get() {
                    b"6"
                } else {
                    b"1"
                };
                let _ = get.send(text(packet));
            }
            shard.remove_conn(peer);
            shard.global.close();
            return Poll::Ready(());
        }
        session.answer_get();
        Poll::Pending
    })
    .await
}
