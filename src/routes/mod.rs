//! The HTTP side of the port, in one table: what each method and path gets. A WebSocket
//! endpoint answers with an upgrade (the connection, `conn.rs`, does the handshake and owns
//! the session); everything else with a response, made at once or by another thread or
//! shard. The `Origin` allow-list and CORS apply to every route here.
//!
//! - [`health`]: `/health`, `/health/live`, `/health/ready`, `/metrics`, `/info`.
//! - [`api`]: the REST read API (`/api/decisions`, `/api/channels/{channel}/history`).
//! - [`write`]: the server API's writes (`/api/publish`, `/api/publish/batch`, `/api/ingest`).
//! - [`deliver`]: messages to users, broadcasts, offline queues (`/api/users/…`,
//!   `/api/broadcast`).
//! - [`connections`]: who is connected, and disconnects (`/api/connections`,
//!   `/api/users/{id}`, `/api/channels`).
//! - [`tokens`]: `/api/tokens` and `/api/tokens/revoke`.
//! - [`socketio`]: `/socket.io/`, Engine.IO's handshake and long-polling.
//! - [`aliases`]: the document-analysis service's `/ws/send/…`, `/ws/broadcast`,
//!   `/ws/status/…`, `/ws/queue/…`, over the server API.
//!
//! docs/API.md describes them; docs/openapi.yaml is their contract.
//! - [`cors`]: which origins may use the server, and the headers that let them.

pub mod aliases;
pub mod api;
pub mod connections;
pub mod cors;
pub mod deliver;
pub mod health;
pub mod socketio;
pub mod tokens;
pub mod write;

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use crate::codes::ErrorCode;
use crate::dialect::Dialect;
use crate::http::{Request, Response};
use crate::shard::Shard;

use cors::Verdict;

/// A response being made elsewhere (a storage reader, a channel's owner).
pub type Pending = Pin<Box<dyn Future<Output = Response>>>;

/// What a request gets.
pub enum Route {
    /// This response, now.
    Respond(Response),
    /// The response this future makes.
    Wait(Pending),
    /// A WebSocket session speaking this dialect.
    Upgrade(Dialect),
    /// The diagnostic echo endpoint (WebSocket, no auth).
    Echo,
}

/// Where `request` goes.
pub fn route(shard: &Rc<Shard>, request: &Request) -> Route {
    let origins = &shard.config().http.allowed_origins;
    let verdict = cors::judge(origins, request.origin.as_deref());
    if verdict == Verdict::Refused {
        let message = "this origin is not in the server's allowed_origins";
        return Route::Respond(Response::error(403, ErrorCode::OriginNotAllowed, message));
    }
    let (method, path) = (request.method.as_str(), request.path.as_str());
    let route = match (method, path) {
        ("GET", "/ws") => return Route::Upgrade(Dialect::Shardcast),
        ("GET", "/echo") if shard.config().diagnostics.echo => return Route::Echo,
        ("OPTIONS", _) if request.preflight => Route::Respond(cors::preflight(origins, verdict)),
        _ if socketio::serves(shard, path) => socketio::route(shard, request),
        _ if path.starts_with("/ws/") => {
            aliases::route(shard, request).unwrap_or_else(|| Route::Respond(unserved(method, path)))
        }
        ("GET", "/health") => Route::Respond(health::health(shard)),
        ("GET", "/health/live") => Route::Respond(health::live()),
        ("GET", "/health/ready") => Route::Respond(health::ready(shard)),
        ("GET", "/metrics") => Route::Respond(health::metrics(shard)),
        ("GET", "/info") => Route::Respond(health::info(shard)),
        ("GET", "/api/decisions") => api::decisions(shard, request),
        ("POST", "/api/publish") => write::publish(shard, request),
        ("POST", "/api/publish/batch") => write::publish_batch(shard, request),
        ("POST", "/api/ingest") => write::ingest(shard, request),
        ("POST", "/api/users/send") => deliver::send_to_users(shard, request),
        ("POST", "/api/broadcast") => deliver::broadcast(shard, request),
        ("POST", "/api/tokens") => tokens::issue(shard, request),
        ("POST", "/api/tokens/revoke") => tokens::revoke(shard, request),
        ("GET", "/api/connections") => connections::list(shard, request),
        ("GET", "/api/channels") => connections::channels(shard, request),
        ("POST", _) if deliver::path_user(path, "/send").is_some() => {
            deliver::send_to_user(shard, request)
        }
        ("DELETE", _) if deliver::path_user(path, "/connections").is_some() => {
            connections::disconnect_user(shard, request)
        }
        ("GET" | "DELETE", _) if deliver::path_user(path, "/queue").is_some() => {
            deliver::queue(shard, request)
        }
        ("GET", _) if deliver::path_user(path, "").is_some() => connections::user(shard, request),
        ("DELETE", _) if connection_path(path) => connections::disconnect(shard, request),
        ("GET", _) if api::history_channel(path).is_some() => api::history(shard, request),
        (_, _) => Route::Respond(unserved(method, path)),
    };
    let exposed = cors::exposing(origins, verdict);
    match route {
        Route::Respond(response) => Route::Respond(response.raw_headers(&exposed)),
        Route::Wait(pending) => {
            Route::Wait(Box::pin(async move { pending.await.raw_headers(&exposed) }))
        }
        upgrade => upgrade,
    }
}

/// The answer to `method` on `path` when nothing serves it: the methods that do, or 404.
fn unserved(method: &str, path: &str) -> Response {
    match methods(path) {
        Some(allow) if method == "OPTIONS" => Response::empty(204).header("Allow", allow),
        Some(allow) => {
            let message = format!("use {allow}");
            Response::error(405, ErrorCode::MethodNotAllowed, &message).header("Allow", allow)
        }
        None => Response::error(404, ErrorCode::NotFound, "no such endpoint"),
    }
}

/// `/api/connections/{id}`.
fn connection_path(path: &str) -> bool {
    path.strip_prefix("/api/connections/")
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// The methods `path` answers (for `405` and `OPTIONS`), if it is served at all.
fn methods(path: &str) -> Option<&'static str> {
    let get = matches!(
        path,
        "/ws" | "/health" | "/health/live" | "/health/ready" | "/metrics" | "/info"
    ) || path == "/api/decisions"
        || api::history_channel(path).is_some();
    let post = matches!(
        path,
        "/api/publish"
            | "/api/publish/batch"
            | "/api/ingest"
            | "/api/users/send"
            | "/api/broadcast"
            | "/api/tokens"
            | "/api/tokens/revoke"
    ) || deliver::path_user(path, "/send").is_some();
    if post || aliases::posted(path) {
        return Some("POST, OPTIONS");
    }
    if aliases::read(path) {
        return Some("GET, OPTIONS");
    }
    if deliver::path_user(path, "/queue").is_some() {
        return Some("GET, DELETE, OPTIONS");
    }
    if connection_path(path) || deliver::path_user(path, "/connections").is_some() {
        return Some("DELETE, OPTIONS");
    }
    if matches!(path, "/api/connections" | "/api/channels")
        || deliver::path_user(path, "").is_some()
    {
        return Some("GET, OPTIONS");
    }
    get.then_some("GET, OPTIONS")
}
