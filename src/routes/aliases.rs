//! The document-analysis service's HTTP endpoints, as thin aliases over the server API (its
//! clients' scripts keep working):
//!
//! - `POST /ws/send/{userId}` → `POST /api/users/{userId}/send`
//! - `POST /ws/send/bulk` → `POST /api/users/send`
//! - `POST /ws/broadcast` → `POST /api/broadcast`
//! - `GET /ws/status/{userId}` → `GET /api/users/{userId}`
//! - `GET /ws/queue/{userId}` → `GET /api/users/{userId}/queue`
//!
//! Their bodies are that service's: `{type, payload, priority}`, where `type` names the
//! event the clients get and `payload` is its data (`priority` is accepted and not kept:
//! every message is delivered in order); `/ws/send/bulk` takes the users as `userIds` (or
//! `users`), and the message as `message: {type, payload}` or beside them. A body in the
//! server API's own form (`data`) is passed on as it is.

use std::rc::Rc;

use super::write::{bad, Body};
use super::{connections, deliver, Route};
use crate::http::{Request, Response};
use crate::json;
use crate::shard::Shard;

/// The alias `request` is, if it is one.
pub fn route(shard: &Rc<Shard>, request: &Request) -> Option<Route> {
    let path = request.path.strip_prefix("/ws/")?;
    let user = |prefix: &str| user_of(path, prefix);
    let method = request.method.as_str();
    let route = match (method, path) {
        ("POST", "send/bulk") => {
            let body = match bulk_body(shard, request) {
                Ok(body) => body,
                Err(response) => return Some(Route::Respond(response)),
            };
            deliver::send_to_users(shard, &rewritten(request, "/api/users/send", body))
        }
        ("POST", "broadcast") => {
            let body = match broadcast_body(shard, request) {
                Ok(body) => body,
                Err(response) => return Some(Route::Respond(response)),
            };
            deliver::broadcast(shard, &rewritten(request, "/api/broadcast", body))
        }
        ("POST", _) if user("send/").is_some() => {
            let path = format!("/api/users/{}/send", user("send/")?);
            let body = match message_body(shard, request) {
                Ok(body) => body,
                Err(response) => return Some(Route::Respond(response)),
            };
            deliver::send_to_user(shard, &rewritten(request, &path, body))
        }
        ("GET", _) if user("status/").is_some() => {
            let path = format!("/api/users/{}", user("status/")?);
            connections::user(shard, &rewritten(request, &path, Vec::new()))
        }
        ("GET", _) if user("queue/").is_some() => {
            let path = format!("/api/users/{}/queue", user("queue/")?);
            deliver::queue(shard, &rewritten(request, &path, Vec::new()))
        }
        _ => return None,
    };
    Some(route)
}

/// Whether `path` is an alias that takes POST.
pub fn posted(path: &str) -> bool {
    let Some(path) = path.strip_prefix("/ws/") else {
        return false;
    };
    matches!(path, "send/bulk" | "broadcast") || user_of(path, "send/").is_some()
}

/// Whether `path` is an alias that takes GET.
pub fn read(path: &str) -> bool {
    let Some(path) = path.strip_prefix("/ws/") else {
        return false;
    };
    user_of(path, "status/").is_some() || user_of(path, "queue/").is_some()
}

/// The user of alias path `path` (after `/ws/`) under `prefix`.
fn user_of<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)
        .filter(|u| !u.is_empty() && !u.contains('/'))
}

/// `priority`, where the body has one, must be a string (its value is not kept).
fn check_priority(body: &Body<'_>) -> Result<(), Response> {
    body.text("priority").map(drop)
}

/// `request` at `path` with `body`.
fn rewritten(request: &Request, path: &str, body: Vec<u8>) -> Request {
    let mut aliased = request.clone();
    aliased.path = path.to_string();
    aliased.content_length = body.len();
    if !body.is_empty() {
        aliased.content_type = Some("application/json".into());
    }
    aliased.body = body;
    aliased
}

/// `{type, payload}` as the server API's `{event, data}` (a body with `data` as it is).
fn message_body(shard: &Shard, request: &Request) -> Result<Vec<u8>, Response> {
    let body = Body::read(shard, request)?;
    check_priority(&body)?;
    if body.raw("data").is_some() {
        return Ok(request.body.clone());
    }
    translate(&body, None)
}

/// `{type, payload}` as the server API's `{data: {event, payload}}`: what every connection
/// gets (Socket.IO clients as the event `type` names).
fn broadcast_body(shard: &Shard, request: &Request) -> Result<Vec<u8>, Response> {
    let body = Body::read(shard, request)?;
    check_priority(&body)?;
    if body.raw("data").is_some() {
        return Ok(request.body.clone());
    }
    let payload = body
        .raw("payload")
        .ok_or_else(|| bad("missing \"payload\""))?;
    let mut out = br#"{"data":{"#.to_vec();
    if let Some(kind) = body.text("type")? {
        out.extend_from_slice(br#""event":"#);
        json::push_str(&mut out, &kind);
        out.push(b',');
    }
    out.extend_from_slice(br#""payload":"#);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"}}");
    Ok(out)
}

/// `{userIds, type, payload}` or `{userIds, message: {type, payload}}` as `{users, event,
/// data}`.
fn bulk_body(shard: &Shard, request: &Request) -> Result<Vec<u8>, Response> {
    let body = Body::read(shard, request)?;
    check_priority(&body)?;
    // Beside `message` it is not used, but it is still the service's field.
    body.text("type")?;
    if body.raw("data").is_some() {
        return Ok(request.body.clone());
    }
    let users = body
        .raw("userIds")
        .or_else(|| body.raw("users"))
        .ok_or_else(|| bad("missing \"userIds\""))?;
    match body.raw("message") {
        Some(message) => {
            let members = json::object_members(message)
                .ok_or_else(|| bad("\"message\" must be an object"))?;
            let field = |name| json::member(message, &members, name);
            message_json(field("type"), field("payload"), Some(users))
        }
        None => translate(&body, Some(users)),
    }
}

fn translate(body: &Body<'_>, users: Option<&[u8]>) -> Result<Vec<u8>, Response> {
    message_json(body.raw("type"), body.raw("payload"), users)
}

/// `{"users":…,"event":TYPE,"data":PAYLOAD}`.
fn message_json(
    kind: Option<&[u8]>,
    payload: Option<&[u8]>,
    users: Option<&[u8]>,
) -> Result<Vec<u8>, Response> {
    let payload = payload.ok_or_else(|| bad("missing \"payload\""))?;
    let mut out = b"{".to_vec();
    if let Some(users) = users {
        out.extend_from_slice(br#""users":"#);
        out.extend_from_slice(users);
        out.push(b',');
    }
    if let Some(kind) = kind {
        if json::string(kind).is_none() {
            return Err(bad("\"type\" must be a string"));
        }
        out.extend_from_slice(br#""event":"#);
        out.extend_from_slice(kind);
        out.push(b',');
    }
    out.extend_from_slice(br#""data":"#);
    out.extend_from_slice(payload);
    out.push(b'}');
    Ok(out)
}
