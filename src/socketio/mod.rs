//! Socket.IO at the edge: Engine.IO sessions over WebSocket (`conn.rs`) and HTTP
//! long-polling ([`polling`]), what their packets do ([`session`]), and the seed services'
//! client events as requests to the core ([`events`]). The wire format itself is
//! `dialect::socketio`.

pub mod events;
pub mod polling;
pub mod session;

use crate::config::SocketIo;
use crate::shard::Peer;

/// Whether `peer` has been silent past its pong's deadline: nothing heard for a ping
/// interval and a ping timeout (shard clock `now`).
pub fn silent_too_long(peer: &Peer, sio: &SocketIo, now: u64) -> bool {
    let quiet = now.saturating_sub(peer.last_heard.get());
    quiet > sio.ping_interval_ms.saturating_add(sio.ping_timeout_ms)
}
