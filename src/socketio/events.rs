//! The gateway's client events: what the two Socket.IO services shardcast replaces accepted,
//! as requests to the core. Answers come back through the core's replies, encoded by
//! `dialect::socketio` for the event that asked (its tag in the request id).
//!
//! - Document-analysis service: `subscribe {channels}`, `unsubscribe {channels}`, `ping`.
//! - Intelligence-graph service: `room:join {room, metadata}`, `room:leave {room}`,
//!   `room:send {room, payload}`, `query:presence {room}`, `query:rooms`,
//!   `presence:status {status, metadata}`, `presence:heartbeat`.
//!
//! Rooms are channels: a room named like a channel (`org:acme:usage`) is that channel; any
//! other name `R` is `org:{org}:{room_category}:R`, in the client's own org, and shown to
//! Socket.IO clients as `R` again ([`crate::dialect::socketio::room`]).

use crate::auth::Principal;
use crate::clock::Now;
use crate::dialect::socketio::{request_id, Asked};
use crate::dialect::{Refusal, Reply, Request, Status};
use crate::json;
use crate::shard::Handled;

use super::session::{Cx, Outcome};

/// Carry out client event `name` with its first argument `arg` (raw JSON) and the client's
/// ack id. Unknown events are ignored, as a Socket.IO server without a listener does.
pub fn handle(
    cx: &Cx<'_>,
    principal: &Principal,
    name: &str,
    arg: Option<&[u8]>,
    ack: Option<u64>,
) -> Outcome {
    let asked = match name {
        "subscribe" => Asked::Subscribe,
        "unsubscribe" => Asked::Unsubscribe,
        "room:join" => Asked::Join,
        "room:leave" => Asked::Leave,
        "room:send" => Asked::Send,
        "query:presence" => Asked::Presence,
        "query:rooms" => Asked::Rooms,
        "ping" => return request(cx, principal, Request::Ping { timestamp: None }),
        "presence:status" => return status(cx, principal, arg, ack),
        // Its connection being alive is all a heartbeat says.
        "presence:heartbeat" => return Outcome::Handled,
        _ => return Outcome::Handled,
    };
    let id = request_id(asked, ack);
    let refuse = |message: &str| {
        let refusal = Refusal::bad_request(message).with_id(Some(&id));
        cx.shard.answer(cx.peer, &Reply::refusal(&refusal));
        Outcome::Refused
    };
    let field = |name: &str| {
        let raw = arg.filter(|a| a.first() == Some(&b'{'))?;
        let members = json::object_members(raw)?;
        json::member(raw, &members, name)
    };
    let room = || {
        field("room")
            .and_then(json::string)
            .map(|r| channel_of(cx, principal, &r))
    };
    let id = Some(&id[..]);
    match asked {
        Asked::Subscribe | Asked::Unsubscribe => {
            let Some(rooms) = channels(arg) else {
                return refuse("expected {\"channels\": [names]}");
            };
            let channels = rooms.iter().map(|r| channel_of(cx, principal, r)).collect();
            let wanted = if asked == Asked::Subscribe {
                subscribe(cx, channels, id, false)
            } else {
                Request::Unsub { channels, id }
            };
            request(cx, principal, wanted)
        }
        Asked::Join => {
            let Some(channel) = room() else {
                return refuse("expected {\"room\": name}");
            };
            if let Some(meta) = field("metadata").filter(|m| m.first() == Some(&b'{')) {
                let status = Request::Status {
                    status: Status::Online,
                    meta: Some(meta),
                };
                if request(cx, principal, status) == Outcome::Refused {
                    return Outcome::Refused;
                }
            }
            // Its room messages come as `room:message` from now on.
            cx.peer.set_dialect(crate::dialect::Dialect::SocketIoRooms);
            request(cx, principal, subscribe(cx, vec![channel], id, true))
        }
        Asked::Leave => match room() {
            Some(channel) => request(
                cx,
                principal,
                Request::Unsub {
                    channels: vec![channel],
                    id,
                },
            ),
            None => refuse("expected {\"room\": name}"),
        },
        Asked::Send => {
            let (Some(channel), Some(payload)) = (room(), field("payload")) else {
                return refuse("expected {\"room\": name, \"payload\": …}");
            };
            // What the intelligence-graph service kept of a message: who sent it, and when.
            let from = principal
                .user
                .as_deref()
                .or(principal.key_id.as_deref())
                .unwrap_or("");
            let mut data = Vec::with_capacity(payload.len() + 64);
            data.extend_from_slice(br#"{"from":"#);
            json::push_str(&mut data, from);
            data.extend_from_slice(br#","timestamp":"#);
            json::push_u64(&mut data, crate::decision::unix_ms());
            data.extend_from_slice(br#","payload":"#);
            data.extend_from_slice(payload);
            data.push(b'}');
            let publish = Request::Publish {
                channel,
                data: &data,
                // An ACK only when the client asked for one.
                id: id.filter(|_| ack.is_some()),
                key: None,
            };
            request(cx, principal, publish)
        }
        Asked::Presence => match room() {
            Some(channel) => {
                let query = Request::Presence {
                    channel,
                    id,
                    cursor: None,
                };
                request(cx, principal, query)
            }
            None => refuse("expected {\"room\": name}"),
        },
        Asked::Rooms => request(cx, principal, Request::Channels { id }),
    }
}

/// `presence:status {status, metadata}`: this connection's status in every room it is in.
fn status(cx: &Cx<'_>, principal: &Principal, arg: Option<&[u8]>, ack: Option<u64>) -> Outcome {
    let raw = arg.unwrap_or(b"{}");
    let members = json::object_members(raw).unwrap_or_default();
    let name = json::member(raw, &members, "status").and_then(json::string);
    let Some(status) = name.as_deref().and_then(Status::parse) else {
        let id = request_id(Asked::Presence, ack);
        let message = "status must be \"online\", \"away\" or \"busy\"";
        let refusal = Refusal::bad_request(message).with_id(Some(&id));
        cx.shard.answer(cx.peer, &Reply::refusal(&refusal));
        return Outcome::Refused;
    };
    let meta = json::member(raw, &members, "metadata").filter(|m| m.first() == Some(&b'{'));
    request(cx, principal, Request::Status { status, meta })
}

fn subscribe<'a>(
    cx: &Cx<'_>,
    channels: Vec<String>,
    id: Option<&'a [u8]>,
    presence: bool,
) -> Request<'a> {
    // A recoverable connection learns where each channel stands: its trail starts there.
    let since = if cx.peer.recoverable() {
        let top = crate::shard::recovery::TOP;
        channels.iter().map(|c| (c.clone(), top)).collect()
    } else {
        Vec::new()
    };
    Request::Sub {
        channels,
        id,
        since,
        epoch: None,
        epochs: Vec::new(),
        presence,
    }
}

fn request(cx: &Cx<'_>, principal: &Principal, request: Request<'_>) -> Outcome {
    match cx.shard.request(cx.peer, principal, request, Now::read()) {
        Handled::Done => Outcome::Handled,
        Handled::Refused => Outcome::Refused,
    }
}

/// The channel a room name means for `principal` (see the module's documentation).
pub fn channel_of(cx: &Cx<'_>, principal: &Principal, room: &str) -> String {
    let config = cx.shard.config();
    if crate::auth::Channel::parse(room, &config.channels.categories).is_ok() {
        return room.to_string();
    }
    format!(
        "org:{}:{}:{room}",
        principal.org, config.socketio.room_category
    )
}

/// `{"channels": [names]}` (or a bare array, or one name).
fn channels(arg: Option<&[u8]>) -> Option<Vec<String>> {
    let arg = arg?;
    let list = match arg.first() {
        Some(b'{') => {
            let members = json::object_members(arg)?;
            json::member(arg, &members, "channels")?
        }
        _ => arg,
    };
    if list.first() == Some(&b'"') {
        return Some(vec![json::string(list)?]);
    }
    let items = json::array_items(list)?;
    items
        .into_iter()
        .map(|r| json::string(&list[r]))
        .collect::<Option<Vec<_>>>()
        .filter(|c| !c.is_empty())
}
