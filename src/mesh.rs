//! The tasks that move [`MeshMsg`] batches between shards over glommio's channel mesh.
//!
//! Deadlock rule (compare DataDog/glommio#555): a task that drains a shard's inbound channel
//! awaits nothing but `recv()`, and nothing on the message path blocks on a full channel.
//! Shards queue outgoing messages in per-peer outboxes without waiting; one sender task per
//! peer takes the whole outbox as one batch (one hand-off per batch, not per message) and is
//! the only thing that ever waits for room. When an outbox grows past `mesh.max_pending`, the
//! connections that publish pause reading (backpressure on the publishers only).

use std::rc::Rc;

use glommio::channels::channel_mesh::{Receivers, Senders};

use crate::clock::Now;
use crate::metrics::Task;
use crate::server::timed;
use crate::shard::{MeshMsg, Shard};

/// What crosses between shards: a batch of messages.
pub type Batch = Vec<MeshMsg>;

/// Spawn one sender and one receiver task per peer shard.
pub fn spawn(shard: &Rc<Shard>, senders: Senders<Batch>, mut receivers: Receivers<Batch>) {
    let senders = Rc::new(senders);
    for peer in 0..senders.nr_consumers() {
        if peer == shard.id {
            continue;
        }
        let (shard, senders) = (shard.clone(), senders.clone());
        glommio::spawn_local(timed(shard.clone(), Task::Mesh, async move {
            loop {
                let batch = std::future::poll_fn(|cx| shard.poll_outbox(peer, cx)).await;
                if senders.send_to(peer, batch).await.is_err() {
                    return; // The peer shard has stopped.
                }
            }
        }))
        .detach();
    }
    for (from, receiver) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(timed(shard.clone(), Task::Mesh, async move {
            while let Some(batch) = receiver.recv().await {
                let now = Now::read();
                for msg in batch {
                    shard.handle(from, msg, now);
                }
            }
        }))
        .detach();
    }
}
