//! The shard's side of the channel mesh: per peer shard, the messages waiting for the mesh
//! sender, and the publishers waiting for the mesh to drain.
//!
//! Pushing never blocks (see `mesh.rs` for why); a full outbox makes the shard "congested",
//! and its connections stop reading publishers until it drains.

use std::cell::{Cell, RefCell};
use std::task::{Context, Poll, Waker};

use super::MeshMsg;

/// Messages waiting to be sent to one peer shard.
#[derive(Default)]
struct Outbox {
    msgs: RefCell<Vec<MeshMsg>>,
    /// The mesh sender for that shard, parked until there is something to send.
    waker: Cell<Option<Waker>>,
}

/// One outbox per shard (this shard's own stays empty: its messages are handled at once).
pub(super) struct Outboxes {
    boxes: Vec<Outbox>,
    /// Messages waiting for one shard at which the mesh counts as congested.
    max_pending: usize,
    congestion_waiters: RefCell<Vec<Waker>>,
}

impl Outboxes {
    /// Outboxes for `nshards` shards, congested at `max_pending` messages for one.
    pub fn new(nshards: usize, max_pending: usize) -> Self {
        Self {
            boxes: (0..nshards).map(|_| Outbox::default()).collect(),
            max_pending,
            congestion_waiters: RefCell::default(),
        }
    }

    /// Queue `msg` for shard `to`, waking its sender when the outbox was empty.
    pub fn push(&self, to: usize, msg: MeshMsg) {
        let outbox = &self.boxes[to];
        let mut msgs = outbox.msgs.borrow_mut();
        msgs.push(msg);
        if msgs.len() == 1 {
            drop(msgs);
            if let Some(w) = outbox.waker.take() {
                w.wake();
            }
        }
    }

    /// Wait for messages for shard `to`, then take them all (one mesh send per batch).
    pub fn poll(&self, to: usize, cx: &mut Context<'_>) -> Poll<Vec<MeshMsg>> {
        let outbox = &self.boxes[to];
        let mut msgs = outbox.msgs.borrow_mut();
        if msgs.is_empty() {
            outbox.waker.set(Some(cx.waker().clone()));
            return Poll::Pending;
        }
        let batch = std::mem::take(&mut *msgs);
        drop(msgs);
        if !self.congested() {
            for w in self.congestion_waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
        Poll::Ready(batch)
    }

    /// True when some peer shard has too much waiting for it: publishers should pause.
    pub fn congested(&self) -> bool {
        self.boxes
            .iter()
            .any(|o| o.msgs.borrow().len() >= self.max_pending)
    }

    /// Wake `waker` once the mesh is no longer congested.
    pub fn wait_uncongested(&self, waker: &Waker) {
        self.congestion_waiters.borrow_mut().push(waker.clone());
    }
}
