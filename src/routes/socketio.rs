//! `/socket.io/` (the path is `[socketio] path`): Engine.IO's handshake and its long-polling
//! requests; a WebSocket upgrade goes to the connection (`conn.rs`).

use std::rc::Rc;

use super::Route;
use crate::clock::Now;
use crate::dialect::Dialect;
use crate::http::Request;
use crate::shard::{MeshMsg, Shard};
use crate::socketio::polling::{self, refusal, Exchange};

/// Whether `path` is the Socket.IO endpoint's (with or without its final `/`).
pub fn serves(shard: &Shard, path: &str) -> bool {
    let sio = &shard.config().socketio;
    sio.enabled && (path == sio.path || Some(path) == sio.path.strip_suffix('/'))
}

/// What a request to the Socket.IO path gets.
pub fn route(shard: &Rc<Shard>, request: &Request) -> Route {
    let params = super::api::params(&request.query);
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if param("EIO") != Some("4") {
        return Route::Respond(refusal(5, "Unsupported protocol version"));
    }
    let post = match request.method.as_str() {
        "GET" => false,
        "POST" => true,
        _ => return Route::Respond(refusal(2, "Bad handshake method")),
    };
    match (param("transport"), param("sid")) {
        (Some("websocket"), _) if request.upgrade && !post => Route::Upgrade(Dialect::SocketIo),
        (Some("websocket"), _) => Route::Respond(refusal(3, "Bad request")),
        (Some("polling"), None) if post => Route::Respond(refusal(2, "Bad handshake method")),
        (Some("polling"), None) => Route::Respond(polling::handshake(shard, request)),
        (Some("polling"), Some(sid)) => {
            let Some((owner, conn)) = polling::parse_sid(shard, sid) else {
                return Route::Respond(refusal(1, "Session ID unknown"));
            };
            let (reply, answer) = flume::bounded(1);
            let exchange = Exchange {
                conn,
                post,
                body: if post {
                    request.body.clone()
                } else {
                    Vec::new()
                },
                reply,
            };
            if owner == shard.id {
                polling::exchange(shard, exchange);
            } else {
                shard.to_shard(owner, MeshMsg::Polling(Box::new(exchange)), Now::read());
            }
            Route::Wait(Box::pin(async move {
                let gone = || refusal(1, "Session ID unknown");
                answer.recv_async().await.unwrap_or_else(|_| gone())
            }))
        }
        _ => Route::Respond(refusal(0, "Transport unknown")),
    }
}
