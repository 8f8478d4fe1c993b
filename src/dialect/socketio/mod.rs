//! The Socket.IO v4 dialect (`/socket.io/`): how the core's replies and publications reach
//! an unmodified socket.io-client, as the events the services it replaces sent.
//!
//! - [`packet`]: Engine.IO and Socket.IO packets as text.
//!
//! Client events become [`Request`](super::Request)s in `crate::socketio` (the edge, which
//! also holds the Engine.IO session); a request that owes the client an answer carries an id
//! made by [`request_id`]: a tag saying which event asked, and the client's ack id. The core
//! echoes it, and [`reply`] turns the answer into that event's answer (`room:joined`, an ack
//! `{success, …}`, …).
//!
//! Publications are one frame for every Socket.IO subscriber of a flavour. The document
//! service's ([`publication`]): a message whose data is an object with an `"event"` string
//! member is emitted as that event with the data as its argument (`analysis_progress`,
//! `notification`, …); any other as `message` with `{channel, seq, data}`. The
//! intelligence-graph service's ([`room_message`]): `room:message {id, room, from, payload,
//! timestamp}`.
//!
//! Channels are shown as the rooms their clients named: what follows the category of a
//! four-part name (`org:acme:rooms:investigation:123` is `investigation:123`, see
//! `socketio::events`), the whole name otherwise.

pub mod binary;
pub mod packet;

use super::{Change, Kind as PublicationKind, Member, Notice, Publication, Reply};
use crate::codec::{self, Frame, FrameBuilder};
use crate::codes::ErrorCode;
use crate::json;

use packet::Kind;

/// Which client event a request id answers (its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// `subscribe {channels}` (document service).
    Subscribe,
    /// `unsubscribe {channels}`.
    Unsubscribe,
    /// `room:join {room}` (intelligence-graph service).
    Join,
    /// `room:leave {room}`.
    Leave,
    /// `room:send {room, payload}`.
    Send,
    /// `query:presence {room}`.
    Presence,
    /// `query:rooms`.
    Rooms,
}

impl Asked {
    const ALL: [Asked; 7] = [
        Asked::Subscribe,
        Asked::Unsubscribe,
        Asked::Join,
        Asked::Leave,
        Asked::Send,
        Asked::Presence,
        Asked::Rooms,
    ];

    fn tag(self) -> u8 {
        b"sujlmpr"[self as usize]
    }

    /// Whether it comes from the intelligence-graph service's event set (errors go out as
    /// `system:error`, not `error`).
    fn graph(self) -> bool {
        !matches!(self, Asked::Subscribe | Asked::Unsubscribe)
    }
}

/// The request id for event `asked`, with the client's ack id if it wants one.
pub fn request_id(asked: Asked, ack: Option<u64>) -> Vec<u8> {
    let mut id = vec![asked.tag()];
    if let Some(ack) = ack {
        json::push_u64(&mut id, ack);
    }
    id
}

/// The request id of a CONNECT answered by the core (a recovery's SUB): the answer is
/// `40{"sid","pid"}` with `recovered` as the pid when every replay is complete, else `fresh`.
pub fn connect_id(sid: &str, recovered: &str, fresh: &str) -> Vec<u8> {
    format!("{CONNECT_TAG}{sid}\n{recovered}\n{fresh}").into_bytes()
}

/// The first byte of [`connect_id`]s (no [`Asked`] has it).
const CONNECT_TAG: char = 'c';

/// `40{"sid":SID,"pid":PID}`: the main namespace joined, recoverable as `pid`.
pub fn connect_answer(sid: &str, pid: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + sid.len() + pid.len());
    packet::push_head(&mut out, Kind::Connect, 0, "/", None);
    out.extend_from_slice(br#"{"sid":"#);
    json::push_str(&mut out, sid);
    out.extend_from_slice(br#","pid":"#);
    json::push_str(&mut out, pid);
    out.push(b'}');
    out
}

/// What a request id says: the event that asked, and its ack id.
fn parse_id(id: Option<&[u8]>) -> Option<(Asked, Option<u64>)> {
    let (&tag, digits) = id?.split_first()?;
    let asked = Asked::ALL.into_iter().find(|a| a.tag() == tag)?;
    let ack = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok());
    Some((asked, ack))
}

/// A text frame holding the Engine.IO message `4` + a Socket.IO packet of the main
/// namespace, its payload written by `payload`.
fn packet_frame(kind: Kind, ack: Option<u64>, payload: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    packet::push_head(&mut out, kind, 0, "/", ack);
    payload(&mut out);
    out
}

/// `42["name",ARG]`.
pub fn event(name: &str, arg: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    packet_frame(Kind::Event, None, |out| {
        out.push(b'[');
        json::push_str(out, name);
        out.push(b',');
        arg(out);
        out.push(b']');
    })
}

/// `43<id>[ARG]`.
fn ack(id: u64, arg: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    packet_frame(Kind::Ack, Some(id), |out| {
        out.push(b'[');
        arg(out);
        out.push(b']');
    })
}

/// One text frame per packet, sent together.
fn frames(packets: &[Vec<u8>]) -> Frame {
    let mut all = Vec::with_capacity(packets.iter().map(|p| p.len() + 10).sum());
    for p in packets {
        all.extend_from_slice(&codec::frame(codec::opcode::TEXT, p));
    }
    Frame::from(all)
}

fn one(packet: Vec<u8>) -> Frame {
    codec::frame(codec::opcode::TEXT, &packet)
}

/// The room `channel` is to a Socket.IO client (see the module's documentation).
pub fn room(channel: &str) -> &str {
    channel
        .match_indices(':')
        .nth(2)
        .map_or(channel, |(i, _)| &channel[i + 1..])
}

/// `publication` of `channel` as `room:message` (see the module's documentation). A message
/// sent with `room:send` carries `{from, timestamp, payload}`; any other is all payload.
pub fn room_message(channel: &str, publication: &Publication<impl AsRef<[u8]>>) -> Frame {
    const NO_ONE: &[u8] = b"\"\"";
    let data = publication.data.as_ref();
    let sent = (data.first() == Some(&b'{'))
        .then(|| json::object_members(data))
        .flatten()
        .and_then(|members| {
            let payload = json::member(data, &members, "payload")?;
            let from = json::member(data, &members, "from").filter(|f| f.first() == Some(&b'"'));
            let at = json::member(data, &members, "timestamp")
                .filter(|t| t.first().is_some_and(u8::is_ascii_digit));
            Some((payload, from, at))
        });
    let (payload, from, at) = sent.unwrap_or((data, None, None));
    let binary = binary::extract(payload);
    let (payload, attachments) = match &binary {
        Some((text, attachments)) => (&text[..], attachments.len()),
        None => (payload, 0),
    };
    let mut f = FrameBuilder::new(codec::opcode::TEXT, 128 + 2 * channel.len() + data.len());
    let out = f.payload_mut();
    push_event_head(out, attachments);
    out.extend_from_slice(br#"["room:message",{"id":""#);
    json::push_u64(out, publication.seq);
    out.extend_from_slice(br#"","room":"#);
    json::push_str(out, room(channel));
    out.extend_from_slice(br#","channel":"#);
    json::push_str(out, channel);
    out.extend_from_slice(br#","seq":"#);
    json::push_u64(out, publication.seq);
    out.extend_from_slice(br#","from":"#);
    out.extend_from_slice(from.unwrap_or(NO_ONE));
    out.extend_from_slice(br#","payload":"#);
    out.extend_from_slice(payload);
    out.extend_from_slice(br#","timestamp":"#);
    match at {
        Some(at) => out.extend_from_slice(at),
        None => json::push_u64(out, crate::decision::unix_ms()),
    }
    out.push(b'}');
    push_offset(out, channel, publication.seq);
    out.push(b']');
    with_attachments(f.finish(), binary)
}

/// The head of an EVENT, or of a BINARY_EVENT when it has `attachments`.
fn push_event_head(out: &mut Vec<u8>, attachments: usize) {
    let kind = if attachments > 0 {
        Kind::BinaryEvent
    } else {
        Kind::Event
    };
    packet::push_head(out, kind, attachments, "/", None);
}

/// `text` followed by the binary frames of `binary`'s attachments, if any.
fn with_attachments(text: Frame, binary: Option<(Vec<u8>, Vec<Vec<u8>>)>) -> Frame {
    let Some((_, attachments)) = binary else {
        return text;
    };
    let mut all = text.to_vec();
    for attachment in &attachments {
        all.extend_from_slice(&codec::frame(codec::opcode::BINARY, attachment));
    }
    Frame::from(all)
}

/// `,"{seq}:{channel}"`: the offset a Socket.IO 4.6+ client keeps of the last message it
/// handled and sends back to recover its session (see `shard::recovery`).
fn push_offset(out: &mut Vec<u8>, channel: &str, seq: u64) {
    out.extend_from_slice(b",\"");
    json::push_u64(out, seq);
    out.push(b':');
    // The channel as a JSON string less its opening quote (the offset's is above): no
    // allocation per encoding.
    let quote = out.len();
    json::push_str(out, channel);
    out.remove(quote);
}

/// `publication` of `channel` as an event (see the module's documentation).
pub fn publication(channel: &str, publication: &Publication<impl AsRef<[u8]>>) -> Frame {
    let original = publication.data.as_ref();
    let binary = binary::extract(original);
    let (data, attachments) = match &binary {
        Some((text, attachments)) => (&text[..], attachments.len()),
        None => (original, 0),
    };
    let mut f = FrameBuilder::new(codec::opcode::TEXT, 72 + 2 * channel.len() + data.len());
    let out = f.payload_mut();
    push_event_head(out, attachments);
    out.push(b'[');
    match named_event(data) {
        Some(name) => {
            json::push_str(out, &name);
            out.push(b',');
            out.extend_from_slice(data);
        }
        None => {
            out.extend_from_slice(br#""message",{"channel":"#);
            json::push_str(out, room(channel));
            out.extend_from_slice(br#","seq":"#);
            json::push_u64(out, publication.seq);
            if publication.kind == PublicationKind::Decision {
                out.extend_from_slice(br#","decision":true"#);
            }
            out.extend_from_slice(br#","data":"#);
            out.extend_from_slice(data);
            out.push(b'}');
        }
    }
    push_offset(out, channel, publication.seq);
    out.push(b']');
    with_attachments(f.finish(), binary)
}

/// Events a publication may not be emitted as: Socket.IO's own (a client library would take
/// them for its connection's) and the gateway's.
const RESERVED: [&str; 6] = [
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// The `"event"` a message's data names, if it is an object naming one that may be emitted.
fn named_event(data: &[u8]) -> Option<String> {
    if data.first() != Some(&b'{') {
        return None;
    }
    let members = json::object_members(data)?;
    let name = json::string(json::member(data, &members, "event")?)?;
    (!name.is_empty() && name.len() <= 128 && !RESERVED.contains(&name.as_str())).then_some(name)
}

/// `{"success":false,"error":MESSAGE,"code":CODE}`, the acks' refusal.
fn push_failure(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    out.extend_from_slice(br#"{"success":false,"error":"#);
    json::push_str(out, message);
    out.extend_from_slice(br#","code":"#);
    json::push_str(out, code.as_str());
    out.push(b'}');
}

/// `{"code":CODE,"message":MESSAGE}`, the argument of `error` and `system:error`.
fn push_error(out: &mut Vec<u8>, code: ErrorCode, message: &str, channel: Option<&str>) {
    out.extend_from_slice(br#"{"code":"#);
    json::push_str(out, code.as_str());
    out.extend_from_slice(br#","message":"#);
    json::push_str(out, message);
    if let Some(channel) = channel {
        out.extend_from_slice(br#","channel":"#);
        json::push_str(out, channel);
    }
    out.push(b'}');
}

fn push_member(out: &mut Vec<u8>, member: &Member) {
    super::shardcast::push_member(out, member);
}

/// The frame(s) of `reply`.
pub fn reply(reply: &Reply<'_>) -> Frame {
    match *reply {
        Reply::Ready { connection_id, .. } => one(event("connected", |out| {
            out.extend_from_slice(br#"{"connectionId":"#);
            json::push_str(out, connection_id);
            out.push(b'}');
        })),
        Reply::Subscribed {
            id: Some(id),
            recovered,
            ..
        } if id.first() == Some(&(CONNECT_TAG as u8)) => {
            let text = std::str::from_utf8(&id[1..]).unwrap_or_default();
            let mut parts = text.split('\n');
            let (sid, pid, fresh) = (parts.next(), parts.next(), parts.next());
            let complete = recovered.iter().all(|(_, complete)| *complete);
            let pid = if complete { pid } else { fresh };
            one(connect_answer(
                sid.unwrap_or_default(),
                pid.unwrap_or_default(),
            ))
        }
        Reply::Subscribed { channels, id, .. } => {
            let (asked, ack_id) = parse_id(id).unwrap_or((Asked::Subscribe, None));
            let mut packets = Vec::new();
            if asked == Asked::Join {
                for channel in channels {
                    packets.push(event("room:joined", |out| push_room(out, channel)));
                }
            }
            if let Some(id) = ack_id {
                packets.push(ack(id, |out| {
                    out.extend_from_slice(br#"{"success":true,"channels":"#);
                    push_rooms(out, channels);
                    out.push(b'}');
                }));
            }
            frames(&packets)
        }
        Reply::Unsubscribed { channels, id } => {
            let (asked, ack_id) = parse_id(id).unwrap_or((Asked::Unsubscribe, None));
            let mut packets = Vec::new();
            if asked == Asked::Leave {
                for channel in channels {
                    packets.push(event("room:left", |out| push_room(out, channel)));
                }
            }
            if let Some(id) = ack_id {
                packets.push(ack(id, |out| out.extend_from_slice(br#"{"success":true}"#)));
            }
            frames(&packets)
        }
        Reply::Channels { channels, id } => match parse_id(id) {
            Some((_, Some(id))) => one(ack(id, |out| {
                out.extend_from_slice(br#"{"rooms":"#);
                push_rooms(out, channels);
                out.push(b'}');
            })),
            _ => frames(&[]),
        },
        Reply::Presence {
            channel,
            id,
            members,
            total,
            ..
        } => match parse_id(id) {
            Some((_, Some(id))) => one(ack(id, |out| {
                out.extend_from_slice(br#"{"room":"#);
                json::push_str(out, room(channel));
                out.extend_from_slice(br#","total":"#);
                json::push_u64(out, total as u64);
                out.extend_from_slice(br#","presence":["#);
                for (i, member) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    push_member(out, member);
                }
                out.extend_from_slice(b"]}");
            })),
            _ => frames(&[]),
        },
        Reply::PresenceChange {
            channel,
            change,
            member,
        } => {
            let name = match change {
                Change::Join => "presence:join",
                Change::Leave => "presence:leave",
                Change::Status => "presence:update",
            };
            one(event(name, |out| {
                out.extend_from_slice(br#"{"room":"#);
                json::push_str(out, room(channel));
                out.extend_from_slice(br#","userId":"#);
                json::push_str(out, &member.user);
                out.extend_from_slice(br#","user":"#);
                push_member(out, member);
                if change == Change::Status {
                    // The intelligence-graph service's `presence:update` carried a list.
                    out.extend_from_slice(br#","presence":["#);
                    push_member(out, member);
                    out.push(b']');
                }
                out.push(b'}');
            }))
        }
        Reply::SessionReplaced => one(event("system:error", |out| {
            out.extend_from_slice(
                br#"{"code":"session_replaced","message":"a newer connection took this session"}"#,
            );
        })),
        Reply::PublishAck { id, seq, local } => match parse_id(Some(id)) {
            Some((_, Some(ack_id))) => one(ack(ack_id, |out| {
                // `messageId` is the id its `room:message` carries.
                out.extend_from_slice(br#"{"success":true,"messageId":""#);
                json::push_u64(out, seq);
                out.extend_from_slice(br#"","seq":"#);
                json::push_u64(out, seq);
                if local {
                    out.extend_from_slice(br#","local":true"#);
                }
                out.push(b'}');
            })),
            _ => frames(&[]),
        },
        Reply::IngestAck { .. } | Reply::StorageUnavailable { .. } => frames(&[]),
        Reply::Error {
            code,
            message,
            id,
            channel,
        } => {
            let asked = parse_id(id);
            let mut packets = Vec::new();
            let graph = asked.is_none_or(|(a, _)| a.graph());
            let name = if graph { "system:error" } else { "error" };
            packets.push(event(name, |out| push_error(out, code, message, channel)));
            if let Some((_, Some(id))) = asked {
                packets.push(ack(id, |out| push_failure(out, code, message)));
            }
            frames(&packets)
        }
        Reply::SlowConsumer { dropped } => one(event("system:error", |out| {
            out.extend_from_slice(br#"{"code":"slow_consumer","dropped":"#);
            json::push_u64(out, dropped);
            out.extend_from_slice(
                br#","message":"messages were dropped because this connection reads too slowly"}"#,
            );
        })),
        Reply::RateLimited { retry_after_ms } => one(event("system:error", |out| {
            out.extend_from_slice(br#"{"code":"rate_limited","retryAfterMs":"#);
            json::push_u64(out, retry_after_ms);
            out.extend_from_slice(br#","message":"rate limit exceeded"}"#);
        })),
        Reply::Pong { .. } => one(event("pong", |out| {
            out.extend_from_slice(br#"{"timestamp":"#);
            json::push_u64(out, crate::decision::unix_ms());
            out.push(b'}');
        })),
        Reply::Refreshed { expires_ms, .. } => one(event("token:refreshed", |out| {
            out.extend_from_slice(br#"{"expiresAt":"#);
            json::push_u64(out, expires_ms);
            out.push(b'}');
        })),
        Reply::TokenExpired { grace_ms } => one(event("system:error", |out| {
            out.extend_from_slice(br#"{"code":"token_expired","graceMs":"#);
            json::push_u64(out, grace_ms);
            out.extend_from_slice(
                br#","message":"the token has expired: reconnect with a new one"}"#,
            );
        })),
        Reply::Restart { reconnect_in_ms } => one(event("system:restart", |out| {
            out.extend_from_slice(br#"{"reason":"server restarting","reconnectIn":"#);
            json::push_u64(out, reconnect_in_ms);
            out.push(b'}');
        })),
        // A broadcast naming an event is that event; any other a `system_alert`.
        Reply::Broadcast { data } => {
            let name = named_event(data);
            let name = name.as_deref().unwrap_or("system_alert");
            one(event(name, |out| out.extend_from_slice(data)))
        }
        Reply::Channel { channel, notice } => one(event("system:error", |out| match notice {
            Notice::Lost { from, to } => {
                out.extend_from_slice(br#"{"code":"messages_lost","room":"#);
                json::push_str(out, room(channel));
                out.extend_from_slice(br#","from":"#);
                json::push_u64(out, *from);
                out.extend_from_slice(br#","to":"#);
                json::push_u64(out, *to);
                out.push(b'}');
            }
            Notice::Reset { epoch } => {
                out.extend_from_slice(br#"{"code":"channel_reset","room":"#);
                json::push_str(out, room(channel));
                out.extend_from_slice(br#","epoch":"#);
                json::push_str(out, epoch);
                out.push(b'}');
            }
        })),
    }
}

/// `{"room":ROOM}`.
fn push_room(out: &mut Vec<u8>, channel: &str) {
    out.extend_from_slice(br#"{"room":"#);
    json::push_str(out, room(channel));
    out.push(b'}');
}

/// `[ROOM,…]`.
fn push_rooms(out: &mut Vec<u8>, channels: &[impl AsRef<str>]) {
    out.push(b'[');
    for (i, channel) in channels.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json::push_str(out, room(channel.as_ref()));
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn payloads(frame: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = frame;
        while !rest.is_empty() {
            let (len, head) = match rest[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
                127 => unreachable!("test frames are small"),
                n => (usize::from(n), 2),
            };
            out.push(String::from_utf8(rest[head..head + len].to_vec()).unwrap());
            rest = &rest[head + len..];
        }
        out
    }

    #[test]
    fn publications_are_named_events_or_messages() {
        let named = Publication {
            seq: 3,
            kind: PublicationKind::Message,
            data: Rc::from(&br#"{"event":"analysis_progress","payload":{"p":50}}"#[..]),
        };
        assert_eq!(
            payloads(&publication("org:a:x", &named)),
            [
                r#"42["analysis_progress",{"event":"analysis_progress","payload":{"p":50}},"3:org:a:x"]"#
            ]
        );
        let plain = Publication {
            seq: 4,
            kind: PublicationKind::Message,
            data: Rc::from(&b"[1]"[..]),
        };
        assert_eq!(
            payloads(&publication("org:a:x", &plain)),
            [r#"42["message",{"channel":"org:a:x","seq":4,"data":[1]},"4:org:a:x"]"#]
        );
        let reserved = Publication {
            data: Rc::from(&br#"{"event":"disconnect"}"#[..]),
            ..plain
        };
        assert!(payloads(&publication("c:d", &reserved))[0].starts_with(r#"42["message""#));
    }

    #[test]
    fn answers_reach_the_event_that_asked() {
        let channels = ["org:a:room".to_string()];
        let id = request_id(Asked::Join, Some(7));
        let joined = Reply::Subscribed {
            channels: &channels,
            id: Some(&id),
            epoch: 1,
            epochs: &[],
            recovered: &[],
        };
        assert_eq!(
            payloads(&reply(&joined)),
            [
                r#"42["room:joined",{"room":"org:a:room"}]"#,
                r#"437[{"success":true,"channels":["org:a:room"]}]"#
            ]
        );
        let id = request_id(Asked::Subscribe, None);
        let refused = Reply::Error {
            code: ErrorCode::Forbidden,
            message: "no",
            id: Some(&id),
            channel: None,
        };
        assert_eq!(
            payloads(&reply(&refused)),
            [r#"42["error",{"code":"forbidden","message":"no"}]"#]
        );
        assert_eq!(parse_id(Some(b"x1")), None);
    }
}
