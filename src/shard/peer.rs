//! A connection as the rest of the shard sees it: its outbound queue, its subscriptions and
//! what the sweeper watches; and the registry of a shard's connections. Everything else about a
//! connection lives in its task (`conn.rs`).

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::Waker;

use smallvec::SmallVec;

use crate::auth::Principal;
use crate::codec::Frame;
use crate::codes::Close;
use crate::dialect::Dialect;
use crate::queue::OutQueue;

/// Lifecycle of a connection, as the sweeper sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request.
    Http,
    /// WebSocket open.
    Open,
    /// Close frame queued or sent; waiting for the peer.
    Closing,
}

/// The half of a connection the rest of the shard can reach: its outbound queue and the
/// bookkeeping the sweeper needs. Everything else lives in the connection task.
pub struct Peer {
    /// Connection id (unique on this shard).
    pub id: u64,
    pub(super) out: RefCell<OutQueue>,
    pub(super) waker: Cell<Option<Waker>>,
    /// Close requested by the shard (boxed: rare, and a connection waits without one).
    pub(super) close: Cell<Option<Box<CloseRequest>>>,
    /// Who the connection authenticated as, once its session is open.
    /// (A `Cell`, taken and put back: 8 bytes less than a `RefCell` on every connection.)
    principal: Cell<Option<Rc<Principal>>>,
    /// Its socket, for the remote address the server API lists (`-1`: none).
    pub fd: Cell<i32>,
    /// Set to drop the connection without a closing handshake.
    pub abort: Cell<bool>,
    /// Current phase.
    pub phase: Cell<Phase>,
    /// Shard clock (ms) when the phase began.
    pub phase_since: Cell<u64>,
    /// Shard clock (ms) when the client was last heard from.
    pub last_heard: Cell<u64>,
    /// Shard clock (ms) of the last ping sent.
    pub last_ping: Cell<u64>,
    /// Channels subscribed on this connection.
    pub channels: RefCell<SmallVec<[Rc<str>; 2]>>,
    /// Frames dropped from this connection's queue.
    pub dropped: Cell<u64>,
    /// Socket readiness bits, kept by the connection's I/O (see `conn::on_ready`).
    pub readiness: Cell<u8>,
    /// What the connection is waiting for the client to do (see [`Stall`]).
    pub stall: Cell<Stall>,
    /// Shard clock (ms) when that wait began (or last made progress).
    pub stall_since: Cell<u64>,
    /// Shard clock (ms) of the next step of the connection's token lifetime: its expiry, then
    /// the end of the grace for a REFRESH (`u64::MAX`: never, as for API keys).
    pub token_deadline: Cell<u64>,
    /// The token has expired: requests other than REFRESH and PING are refused.
    pub token_expired: Cell<bool>,
    /// The wire format its replies and messages are encoded in (set by its route).
    dialect: Cell<Dialect>,
    /// Answers other shards owe this connection (a PUBLISH with an id or an INGEST on a
    /// channel owned elsewhere): they count against its reply budget before they arrive.
    pub owed: Cell<u32>,
    /// A Socket.IO connection's recovery state (`None` for every other connection).
    recovery: Cell<Option<Box<super::recovery::Recoverable>>>,
}

/// A close the shard asked a connection to make.
#[derive(Debug)]
pub struct CloseRequest {
    /// The code.
    pub close: Close,
    /// The reason sent with it.
    pub reason: Cow<'static, str>,
    /// Queued frames are dropped first.
    pub discard: bool,
}

/// What an open connection is waiting for its client to do; the sweeper closes it with 4408
/// when the wait lasts too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Nothing.
    None,
    /// The rest of a message whose first bytes have arrived (`websocket.message_timeout_ms`).
    Message,
    /// Reading its replies: its reply budget is spent, so its requests are not being read
    /// (`websocket.reply_timeout_ms`, counted from the last byte written to it).
    Replies,
    /// A Socket.IO connection's first CONNECT (`socketio.connect_timeout_ms`).
    Connect,
}

impl Peer {
    /// A new connection's shared half.
    pub fn new(id: u64, now: u64) -> Self {
        Self {
            id,
            out: RefCell::default(),
            waker: Cell::new(None),
            close: Cell::new(None),
            principal: Cell::new(None),
            fd: Cell::new(-1),
            abort: Cell::new(false),
            phase: Cell::new(Phase::Http),
            phase_since: Cell::new(now),
            last_heard: Cell::new(now),
            last_ping: Cell::new(now),
            channels: RefCell::default(),
            dropped: Cell::new(0),
            readiness: Cell::new(0),
            stall: Cell::new(Stall::None),
            stall_since: Cell::new(now),
            token_deadline: Cell::new(u64::MAX),
            token_expired: Cell::new(false),
            owed: Cell::new(0),
            dialect: Cell::new(Dialect::default()),
            recovery: Cell::new(None),
        }
    }

    /// The connection's wire format.
    pub fn dialect(&self) -> Dialect {
        self.dialect.get()
    }

    /// Speak `dialect` from now on (chosen by the route, before anything is sent).
    pub fn set_dialect(&self, dialect: Dialect) {
        self.dialect.set(dialect);
    }

    /// Whether it is a Socket.IO connection its client may recover.
    pub fn recoverable(&self) -> bool {
        self.with_recovery(|_| ()).is_some()
    }

    /// The outbound queue (for the connection's writer).
    pub fn out(&self) -> &RefCell<OutQueue> {
        &self.out
    }

    /// Remember the connection task's waker.
    pub fn set_waker(&self, waker: &Waker) {
        let current = self.waker.take();
        match current {
            Some(w) if w.will_wake(waker) => self.waker.set(Some(w)),
            _ => self.waker.set(Some(waker.clone())),
        }
    }

    /// Wake the connection task.
    pub fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Ask the connection to close with `code` (discarding queued frames when `discard`);
    /// the first request wins.
    pub fn request_close(&self, code: Close, reason: impl Into<Cow<'static, str>>, discard: bool) {
        let pending = self.close.take();
        let first = pending.is_none();
        self.close.set(pending.or_else(|| {
            Some(Box::new(CloseRequest {
                close: code,
                reason: reason.into(),
                discard,
            }))
        }));
        if first {
            self.wake();
        }
    }

    /// Take a pending close request.
    pub fn take_close_request(&self) -> Option<Box<CloseRequest>> {
        self.close.take()
    }

    /// Who the connection authenticated as (`None` before its session opens).
    pub fn principal(&self) -> Option<Rc<Principal>> {
        let principal = self.principal.take();
        self.principal.set(principal.clone());
        principal
    }

    /// Its session opens (or runs on a refreshed credential) as `principal`.
    pub(super) fn set_principal(&self, principal: Option<Rc<Principal>>) {
        self.principal.set(principal);
    }

    /// Its principal, which it no longer has.
    pub(super) fn take_principal(&self) -> Option<Rc<Principal>> {
        self.principal.take()
    }

    /// `f` on its recovery state, if it is recoverable.
    pub(super) fn with_recovery<R>(
        &self,
        f: impl FnOnce(&mut super::recovery::Recoverable) -> R,
    ) -> Option<R> {
        let mut recovery = self.recovery.take()?;
        let result = f(&mut recovery);
        self.recovery.set(Some(recovery));
        Some(result)
    }

    /// Make it recoverable with `state`, or not (`None`); what it had.
    pub(super) fn replace_recovery(
        &self,
        state: Option<Box<super::recovery::Recoverable>>,
    ) -> Option<Box<super::recovery::Recoverable>> {
        self.recovery.replace(state)
    }

    /// Enter (or leave, with [`Stall::None`]) a wait for the client, as of `now`.
    pub fn set_stall(&self, stall: Stall, now: u64) {
        if self.stall.get() != stall {
            self.stall.set(stall);
            self.stall_since.set(now);
        }
    }

    /// Queue a control frame ahead of ordinary traffic (pongs, pings); never dropped.
    pub fn send_urgent(&self, frame: Frame) {
        let mut out = self.out.borrow_mut();
        let was_empty = out.is_empty();
        out.push_urgent(frame);
        drop(out);
        if was_empty {
            self.wake();
        }
    }
}

/// The shard's open connections, by id.
#[derive(Default)]
pub(super) struct Registry {
    conns: std::collections::HashMap<u64, Rc<Peer>>,
    /// Ids are never reused while the shard runs (a late reply for a closed connection must
    /// not reach a new one).
    last_id: u64,
}

impl Registry {
    /// Register a new connection, as of shard time `now`.
    pub fn add(&mut self, now: u64) -> Rc<Peer> {
        self.last_id += 1;
        let peer = Rc::new(Peer::new(self.last_id, now));
        self.conns.insert(self.last_id, peer.clone());
        peer
    }

    /// Forget connection `id`.
    pub fn remove(&mut self, id: u64) {
        self.conns.remove(&id);
    }

    /// The connection with this id, if it is still open.
    pub fn get(&self, id: u64) -> Option<Rc<Peer>> {
        self.conns.get(&id).cloned()
    }

    /// Number of connections (any phase).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Connections past their HTTP request (open or closing WebSockets).
    pub fn websockets(&self) -> usize {
        self.conns
            .values()
            .filter(|peer| peer.phase.get() != Phase::Http)
            .count()
    }

    /// A snapshot of the connections (for shutdown).
    pub fn all(&self) -> Vec<Rc<Peer>> {
        self.conns.values().cloned().collect()
    }

    /// A snapshot of slice `slice` of `slices` of the connections (by id), for a sweep that
    /// visits them a slice at a time.
    pub fn slice(&self, slice: u64, slices: u64) -> Vec<Rc<Peer>> {
        let slices = slices.max(1);
        self.conns
            .iter()
            .filter(|(id, _)| **id % slices == slice)
            .map(|(_, peer)| peer.clone())
            .collect()
    }
}
