//! The shardcast JSON protocol: client requests in, server frames out. No I/O, no shard
//! state.

use simd_json::prelude::*;
use simd_json::tape::{Tape, Value};

use super::{Change, Ingest, Kind, Member, Notice, Publication, Refusal, Reply, Request, Status};
use crate::codec::{Frame, FrameBuilder};
use crate::codes::ErrorCode;
use crate::json;

/// Most channels in one SUB or UNSUB.
pub const MAX_CHANNELS_PER_REQUEST: usize = 10_000;
/// Longest request id or idempotency key.
pub const MAX_ID_LEN: usize = 256;

/// Reusable parse buffers (one per shard): simd-json rewrites its input, so requests are parsed
/// from a copy, onto a tape (a flat list of nodes: no tree of maps to build and free).
pub struct Parser {
    copy: Vec<u8>,
    buffers: simd_json::Buffers,
    tape: Tape<'static>,
}

impl Default for Parser {
    fn default() -> Self {
        Self {
            copy: Vec::new(),
            buffers: simd_json::Buffers::default(),
            tape: Tape(Vec::new()),
        }
    }
}

impl std::fmt::Debug for Parser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parser").finish_non_exhaustive()
    }
}

/// A tape left this large by one big message is given back rather than kept.
const TAPE_KEPT: usize = 4096;

impl Parser {
    /// Parse one text message.
    pub fn parse<'a>(&mut self, raw: &'a [u8]) -> Result<Request<'a>, Refusal> {
        self.parse_as(raw, None)
    }

    /// Parse an HTTP request body as a request of type `kind` (`"PUBLISH"`, `"INGEST"`):
    /// the same fields and checks as the WebSocket message, without its `type`.
    pub fn parse_body<'a>(&mut self, kind: &str, raw: &'a [u8]) -> Result<Request<'a>, Refusal> {
        self.parse_as(raw, Some(kind))
    }

    /// Check that `raw` is one JSON value, nested no deeper than [`json::MAX_DEPTH`], with no
    /// name twice in one object: what every request passes before its spans are trusted.
    pub fn validate(&mut self, raw: &[u8]) -> Result<(), Refusal> {
        if json::too_deep(raw) {
            let message = format!("nested deeper than {} levels", json::MAX_DEPTH);
            return Err(Refusal::bad_request(message));
        }
        self.with_tape(raw, |tape| match json::duplicate_key(&tape.0) {
            Some(key) => Err(duplicate(key)),
            None => Ok(()),
        })
    }

    fn parse_as<'a>(&mut self, raw: &'a [u8], kind: Option<&str>) -> Result<Request<'a>, Refusal> {
        // The raw scan goes first: deep nesting is refused before simd-json makes anything of
        // it, and it finds the raw spans (`data` is forwarded byte for byte).
        let scanned = json::scan_object(raw);
        if let Some(deep) = scanned.as_ref().filter(|s| s.too_deep) {
            let message = format!("nested deeper than {} levels", json::MAX_DEPTH);
            let id = json::member(raw, &deep.members, "id");
            return Err(Refusal::bad_request(message).with_id(id));
        }
        self.with_tape(raw, |tape| parse_tape(tape, raw, scanned, kind))
    }

    /// Run `f` on the tape of `raw` (an error if it is not JSON).
    fn with_tape<T>(
        &mut self,
        raw: &[u8],
        f: impl FnOnce(&Tape<'_>) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        self.copy.clear();
        self.copy.extend_from_slice(raw);
        // The node list moves out and back (no allocation): its nodes borrow this call's copy.
        let mut tape = Tape(std::mem::take(&mut self.tape.0)).reset();
        let result = match simd_json::fill_tape(&mut self.copy, &mut self.buffers, &mut tape) {
            Ok(()) => f(&tape),
            Err(e) => Err(Refusal::bad_request(format!("invalid JSON: {e}"))),
        };
        self.tape = if tape.0.capacity() > TAPE_KEPT {
            Tape(Vec::new())
        } else {
            tape.reset()
        };
        result
    }
}

fn duplicate(key: &str) -> Refusal {
    let message = format!(
        "duplicate key {}: a name may appear once per object",
        json::echo(key)
    );
    Refusal::bad_request(message)
}

/// The request in a parsed message, with `scanned` its raw top-level members.
fn parse_tape<'a>(
    tape: &Tape<'_>,
    raw: &'a [u8],
    scanned: Option<json::Scanned>,
    kind: Option<&str>,
) -> Result<Request<'a>, Refusal> {
    let value = tape.as_value();
    let scanned = scanned.ok_or_else(|| Refusal::bad_request("message must be a JSON object"))?;
    let members = scanned.members;
    // Parsers differ on which duplicate wins (JavaScript takes the last, others the first): a
    // duplicate would let what the server checks differ from what subscribers read. One
    // rule: no name twice in one object.
    if let Some(key) = json::duplicate_key(&tape.0) {
        // Echo what the client will match the answer by (an INGEST's is its key).
        let echo = match kind.or_else(|| value.get("type").and_then(|t| t.into_string())) {
            Some("INGEST") => "idempotencyKey",
            _ => "id",
        };
        return Err(duplicate(key).with_id(json::member(raw, &members, echo)));
    }
    let id = json::member(raw, &members, "id");
    if let Some(id) = id {
        if !matches!(id.first(), Some(b'"' | b'0'..=b'9' | b'-')) || id.len() > MAX_ID_LEN {
            return Err(Refusal::bad_request("id must be a string or number"));
        }
    }
    let kind = kind
        .or_else(|| value.get("type").and_then(|t| t.into_string()))
        .ok_or_else(|| Refusal::bad_request("missing \"type\"").with_id(id))?;
    parse_request(kind, value, raw, &members, id).map_err(|r| {
        if r.id.is_none() {
            r.with_id(id)
        } else {
            r
        }
    })
}

/// The request of type `kind` (its refusals carry no id yet: the caller adds it).
fn parse_request<'a>(
    kind: &str,
    value: Value<'_, '_>,
    raw: &'a [u8],
    members: &[json::Member],
    id: Option<&'a [u8]>,
) -> Result<Request<'a>, Refusal> {
    match kind {
        "SUB" => {
            let channels = channel_list(value)?;
            let since = since_map(value, &channels)?;
            let epoch = match value.get("epoch") {
                None => None,
                Some(e) => Some(
                    e.as_u64()
                        .ok_or_else(|| Refusal::bad_request("\"epoch\" must be a number"))?,
                ),
            };
            let epochs = epochs_map(value, &channels)?;
            let presence = match value.get("presence") {
                None => false,
                Some(p) => p
                    .as_bool()
                    .ok_or_else(|| Refusal::bad_request("\"presence\" must be true or false"))?,
            };
            Ok(Request::Sub {
                channels,
                id,
                since,
                epoch,
                epochs,
                presence,
            })
        }
        "UNSUB" => Ok(Request::Unsub {
            channels: channel_list(value)?,
            id,
        }),
        "PUBLISH" => {
            let channel = str_field(value, "channel")?;
            let data = json::member(raw, members, "data")
                .ok_or_else(|| Refusal::bad_request("missing \"data\""))?;
            let key = match value.get("idempotencyKey") {
                None => None,
                Some(_) => Some(idempotency_key(value)?),
            };
            Ok(Request::Publish {
                channel,
                data,
                id,
                key,
            })
        }
        "INGEST" => parse_ingest(value, raw, members),
        "REFRESH" => Ok(Request::Refresh {
            token: str_field(value, "token")?,
            id,
        }),
        "PING" => Ok(Request::Ping {
            timestamp: json::member(raw, members, "timestamp"),
        }),
        "CHANNELS" => Ok(Request::Channels { id }),
        "PRESENCE" => {
            let cursor = match value.get("cursor") {
                None => None,
                Some(c) => Some(
                    c.into_string()
                        .ok_or_else(|| Refusal::bad_request("\"cursor\" must be a string"))?
                        .to_string(),
                ),
            };
            Ok(Request::Presence {
                channel: str_field(value, "channel")?,
                id,
                cursor,
            })
        }
        "STATUS" => {
            let name = str_field(value, "status")?;
            let status = Status::parse(&name).ok_or_else(|| {
                Refusal::bad_request("\"status\" must be \"online\", \"away\" or \"busy\"")
            })?;
            let meta = match value.get("meta") {
                None => None,
                Some(m) if m.as_object().is_some() => json::member(raw, members, "meta"),
                Some(_) => return Err(Refusal::bad_request("\"meta\" must be an object")),
            };
            Ok(Request::Status { status, meta })
        }
        other => Err(Refusal::bad_request(format!(
            "unknown message type {}; expected SUB, UNSUB, PUBLISH, INGEST, REFRESH, PING, \
             CHANNELS, PRESENCE or STATUS",
            json::echo(other)
        ))),
    }
}

/// `idempotencyKey`: a string of 1 to [`MAX_ID_LEN`] bytes.
fn idempotency_key(value: Value<'_, '_>) -> Result<String, Refusal> {
    let key = str_field(value, "idempotencyKey")?;
    if key.is_empty() || key.len() > MAX_ID_LEN {
        let message = format!("\"idempotencyKey\" must be 1 to {MAX_ID_LEN} bytes");
        return Err(Refusal::bad_request(message));
    }
    Ok(key)
}

fn str_field(value: Value<'_, '_>, name: &str) -> Result<String, Refusal> {
    match value.get(name).map(|v| v.into_string()) {
        Some(Some(s)) => Ok(s.to_string()),
        Some(None) => Err(Refusal::bad_request(format!("\"{name}\" must be a string"))),
        None => Err(Refusal::bad_request(format!("missing \"{name}\""))),
    }
}

fn channel_list(value: Value<'_, '_>) -> Result<Vec<String>, Refusal> {
    let list = value
        .get("channels")
        .and_then(|c| c.as_array())
        .ok_or_else(|| Refusal::bad_request("\"channels\" must be an array of channel names"))?;
    if list.is_empty() || list.len() > MAX_CHANNELS_PER_REQUEST {
        return Err(Refusal::bad_request(format!(
            "\"channels\" must hold 1 to {MAX_CHANNELS_PER_REQUEST} names"
        )));
    }
    list.iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .ok_or_else(|| Refusal::bad_request("channel names must be strings"))
        })
        .collect()
}

/// `since`: an object of channel name to last seen seq, naming only channels being subscribed.
fn since_map(value: Value<'_, '_>, channels: &[String]) -> Result<Vec<(String, u64)>, Refusal> {
    let Some(since) = value.get("since") else {
        return Ok(Vec::new());
    };
    let since = since.as_object().ok_or_else(|| {
        Refusal::bad_request("\"since\" must be an object of channel name to last seq")
    })?;
    since
        .iter()
        .map(|(name, seq)| {
            if !channels.iter().any(|c| c == name) {
                return Err(Refusal::bad_request(format!(
                    "\"since\" names {}, which is not in \"channels\"",
                    json::echo(name)
                )));
            }
            let seq = seq.as_u64().ok_or_else(|| {
                let name = json::echo(name);
                Refusal::bad_request(format!("\"since\".{name} must be a seq (0 or more)"))
            })?;
            Ok((name.to_string(), seq))
        })
        .collect()
}

/// Longest channel epoch accepted in `epochs` (a cluster's are 16 hex digits).
const MAX_EPOCH_LEN: usize = 64;

/// `epochs`: per channel of the SUB, the epoch string an earlier SUBSCRIBED gave.
fn epochs_map(value: Value<'_, '_>, channels: &[String]) -> Result<Vec<(String, String)>, Refusal> {
    let Some(epochs) = value.get("epochs") else {
        return Ok(Vec::new());
    };
    let epochs = epochs.as_object().ok_or_else(|| {
        Refusal::bad_request("\"epochs\" must be an object of channel name to epoch")
    })?;
    epochs
        .iter()
        .map(|(name, epoch)| {
            if !channels.iter().any(|c| c == name) {
                return Err(Refusal::bad_request(format!(
                    "\"epochs\" names {}, which is not in \"channels\"",
                    json::echo(name)
                )));
            }
            match epoch.as_str() {
                Some(e) if e.len() <= MAX_EPOCH_LEN => Ok((name.to_string(), e.to_string())),
                _ => Err(Refusal::bad_request(format!(
                    "\"epochs\".{} must be a string of at most {MAX_EPOCH_LEN} bytes",
                    json::echo(name)
                ))),
            }
        })
        .collect()
}

fn parse_ingest<'a>(
    value: Value<'_, '_>,
    raw: &'a [u8],
    members: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
) -> Result<Request<'a>, Refusal> {
    let raw_key = json::member(raw, members, "idempotencyKey");
    let key = idempotency_key(value).map_err(|r| r.with_id(raw_key))?;
    let channel = str_field(value, "channel").map_err(|r| r.with_id(raw_key))?;
    match value.get("schema").and_then(|s| s.into_string()) {
        Some(crate::decision::SCHEMA) => {}
        _ => {
            return Err(Refusal {
                code: ErrorCode::InvalidDecision,
                message: format!("\"schema\" must be \"{}\"", crate::decision::SCHEMA),
                id: raw_key.map(<[u8]>::to_vec),
            })
        }
    }
    let data = json::member(raw, members, "data");
    let (Some(data), Some(fields)) = (data, value.get("data")) else {
        return Err(Refusal::bad_request("missing \"data\"").with_id(raw_key));
    };
    let decision = crate::decision::Decision::from_value(fields).map_err(|message| Refusal {
        code: ErrorCode::InvalidDecision,
        message,
        id: raw_key.map(<[u8]>::to_vec),
    })?;
    Ok(Request::Ingest(Ingest {
        channel,
        key,
        // str_field found a string member, so the raw span exists.
        raw_key: raw_key.unwrap_or(b"null"),
        data,
        decision: Box::new(decision),
    }))
}

fn text() -> FrameBuilder {
    FrameBuilder::text()
}

fn push_opt_raw(out: &mut Vec<u8>, name: &str, raw: Option<&[u8]>) {
    if let Some(raw) = raw {
        out.push(b',');
        json::push_str(out, name);
        out.push(b':');
        out.extend_from_slice(raw);
    }
}

pub(super) fn push_channels(out: &mut Vec<u8>, channels: &[impl AsRef<str>]) {
    out.push(b'[');
    for (i, c) in channels.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json::push_str(out, c.as_ref());
    }
    out.push(b']');
}

/// `MESSAGE` / `DECISION` frame of `publication` on `channel`.
pub fn publication(channel: &str, publication: &Publication<impl AsRef<[u8]>>) -> Frame {
    let data = publication.data.as_ref();
    let mut f = FrameBuilder::new(crate::codec::opcode::TEXT, 64 + channel.len() + data.len());
    push_message(f.payload_mut(), channel, publication);
    f.finish()
}

/// The JSON text of a `MESSAGE` / `DECISION` (what the HTTP history API lists).
pub fn message_json(out: &mut Vec<u8>, channel: &str, publication: &Publication<impl AsRef<[u8]>>) {
    push_message(out, channel, publication);
}

fn push_message(out: &mut Vec<u8>, channel: &str, publication: &Publication<impl AsRef<[u8]>>) {
    out.extend_from_slice(match publication.kind {
        Kind::Message => br#"{"type":"MESSAGE","channel":"#,
        Kind::Decision => br#"{"type":"DECISION","channel":"#,
    });
    json::push_str(out, channel);
    out.extend_from_slice(br#","seq":"#);
    json::push_u64(out, publication.seq);
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(publication.data.as_ref());
    out.push(b'}');
}

/// The frame of `reply`.
pub fn reply(reply: &Reply<'_>) -> Frame {
    match *reply {
        Reply::Ready {
            connection_id,
            shard,
        } => ready(connection_id, shard),
        Reply::Subscribed {
            channels,
            id,
            epoch,
            epochs,
            recovered,
        } => subscribed(channels, id, epoch, epochs, recovered),
        Reply::Unsubscribed { channels, id } => unsubscribed(channels, id),
        Reply::Channels { channels, id } => channels_answer(channels, id),
        Reply::SessionReplaced => {
            let mut f = text();
            f.payload_mut()
                .extend_from_slice(br#"{"type":"SYSTEM","event":"session_replaced"}"#);
            f.finish()
        }
        Reply::Presence {
            channel,
            id,
            total,
            users,
            members,
            cursor,
        } => presence_answer(channel, id, (total, users), members, cursor),
        Reply::PresenceChange {
            channel,
            change,
            member,
        } => presence_change(channel, change, member),
        Reply::PublishAck { id, seq, local } => publish_ack(id, seq, local),
        Reply::IngestAck {
            key,
            decision_id,
            dedup,
            seq,
        } => ingest_ack(key, decision_id, dedup, seq),
        Reply::StorageUnavailable { key } => storage_unavailable(key),
        Reply::Error {
            code,
            message,
            id,
            channel,
        } => error(code, message, id, channel),
        Reply::SlowConsumer { dropped } => slow_consumer(dropped),
        Reply::RateLimited { retry_after_ms } => rate_limited(retry_after_ms),
        Reply::Pong { timestamp } => pong(timestamp),
        Reply::Refreshed { id, expires_ms } => refreshed(id, expires_ms),
        Reply::TokenExpired { grace_ms } => token_expired(grace_ms),
        Reply::Restart { reconnect_in_ms } => system_restart(reconnect_in_ms),
        Reply::Channel { channel, notice } => system_channel(channel, notice),
        Reply::Broadcast { data } => broadcast(data),
    }
}

/// `SYSTEM` `broadcast`, from the server API.
fn broadcast(data: &[u8]) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"SYSTEM","event":"broadcast","data":"#);
    out.extend_from_slice(data);
    out.push(b'}');
    f.finish()
}

/// `SYSTEM` `messages_lost` (with the seqs) or `channel_reset` (with the new epoch), for a
/// subscribed channel.
fn system_channel(channel: &str, notice: &Notice) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    let event: &[u8] = match notice {
        Notice::Lost { .. } => br#"{"type":"SYSTEM","event":"messages_lost","channel":"#,
        Notice::Reset { .. } => br#"{"type":"SYSTEM","event":"channel_reset","channel":"#,
    };
    out.extend_from_slice(event);
    json::push_str(out, channel);
    match notice {
        Notice::Lost { from, to } => {
            out.extend_from_slice(br#","from":"#);
            json::push_u64(out, *from);
            out.extend_from_slice(br#","to":"#);
            json::push_u64(out, *to);
        }
        Notice::Reset { epoch } => {
            out.extend_from_slice(br#","epoch":"#);
            json::push_str(out, epoch);
        }
    }
    out.push(b'}');
    f.finish()
}

/// `READY`.
fn ready(connection_id: &str, shard: usize) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"READY","connectionId":"#);
    json::push_str(out, connection_id);
    out.extend_from_slice(br#","shard":"#);
    json::push_u64(out, shard as u64);
    out.push(b'}');
    f.finish()
}

/// `UNSUBSCRIBED`.
fn unsubscribed(channels: &[impl AsRef<str>], id: Option<&[u8]>) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"UNSUBSCRIBED","channels":"#);
    push_channels(out, channels);
    push_opt_raw(out, "id", id);
    out.push(b'}');
    f.finish()
}

/// A presence member's JSON object.
pub(super) fn push_member(out: &mut Vec<u8>, member: &Member) {
    out.extend_from_slice(br#"{"user":"#);
    json::push_str(out, &member.user);
    out.extend_from_slice(br#","connectionId":"#);
    json::push_str(out, &member.connection_id);
    out.extend_from_slice(br#","status":"#);
    json::push_str(out, member.status.as_str());
    out.extend_from_slice(br#","meta":"#);
    out.extend_from_slice(&member.meta);
    out.push(b'}');
}

/// `PRESENCE`: a page of a channel's members.
fn presence_answer(
    channel: &str,
    id: Option<&[u8]>,
    (total, users): (usize, usize),
    members: &[Member],
    cursor: Option<&str>,
) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"PRESENCE","channel":"#);
    json::push_str(out, channel);
    push_opt_raw(out, "id", id);
    out.extend_from_slice(br#","total":"#);
    json::push_u64(out, total as u64);
    out.extend_from_slice(br#","users":"#);
    json::push_u64(out, users as u64);
    out.extend_from_slice(br#","members":["#);
    for (i, member) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_member(out, member);
    }
    out.push(b']');
    if let Some(cursor) = cursor {
        out.extend_from_slice(br#","cursor":"#);
        json::push_str(out, cursor);
    }
    out.push(b'}');
    f.finish()
}

/// `JOIN`, `LEAVE` or `STATUS` of `member` on `channel`.
fn presence_change(channel: &str, change: Change, member: &Member) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(match change {
        Change::Join => br#"{"type":"JOIN","channel":"#,
        Change::Leave => br#"{"type":"LEAVE","channel":"#,
        Change::Status => br#"{"type":"STATUS","channel":"#,
    });
    json::push_str(out, channel);
    out.extend_from_slice(br#","member":"#);
    push_member(out, member);
    out.push(b'}');
    f.finish()
}

/// `CHANNELS`: what the connection is subscribed to.
fn channels_answer(channels: &[impl AsRef<str>], id: Option<&[u8]>) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"CHANNELS","channels":"#);
    push_channels(out, channels);
    push_opt_raw(out, "id", id);
    out.push(b'}');
    f.finish()
}

/// `SUBSCRIBED`, with the server's `epoch` and, for channels asked with `since`, whether the
/// replay that follows is complete.
fn subscribed(
    channels: &[impl AsRef<str>],
    id: Option<&[u8]>,
    epoch: u64,
    epochs: &[(&str, &str)],
    recovered: &[(impl AsRef<str>, bool)],
) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"SUBSCRIBED","channels":"#);
    push_channels(out, channels);
    push_opt_raw(out, "id", id);
    out.extend_from_slice(br#","epoch":"#);
    json::push_u64(out, epoch);
    if !epochs.is_empty() {
        out.extend_from_slice(br#","epochs":{"#);
        for (i, (channel, epoch)) in epochs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::push_str(out, channel);
            out.push(b':');
            json::push_str(out, epoch);
        }
        out.push(b'}');
    }
    if !recovered.is_empty() {
        out.extend_from_slice(br#","recovered":{"#);
        for (i, (channel, complete)) in recovered.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::push_str(out, channel.as_ref());
            out.extend_from_slice(if *complete { b":true" } else { b":false" });
        }
        out.push(b'}');
    }
    out.push(b'}');
    f.finish()
}

/// `ERROR` with a code, a message, and optionally the request id and the channel concerned.
fn error(code: ErrorCode, message: &str, id: Option<&[u8]>, channel: Option<&str>) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"ERROR","code":"#);
    json::push_str(out, code.as_str());
    out.extend_from_slice(br#","message":"#);
    json::push_str(out, message);
    push_opt_raw(out, "id", id);
    if let Some(channel) = channel {
        out.extend_from_slice(br#","channel":"#);
        json::push_str(out, channel);
    }
    out.push(b'}');
    f.finish()
}

/// `ERROR` telling a slow consumer how many messages it lost.
fn slow_consumer(dropped: u64) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"ERROR","code":"#);
    json::push_str(out, ErrorCode::SlowConsumer.as_str());
    out.extend_from_slice(br#","dropped":"#);
    json::push_u64(out, dropped);
    out.extend_from_slice(
        br#","message":"messages were dropped because this connection reads too slowly"}"#,
    );
    f.finish()
}

/// `ERROR` for a message over the connection's rate limit (the message was not processed).
fn rate_limited(retry_after_ms: u64) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"ERROR","code":"#);
    json::push_str(out, ErrorCode::RateLimited.as_str());
    out.extend_from_slice(br#","retryAfterMs":"#);
    json::push_u64(out, retry_after_ms);
    out.extend_from_slice(
        br#","message":"message rate limit exceeded; this message was not processed"}"#,
    );
    f.finish()
}

/// `ACK` for a PUBLISH; `"local":true` when only this node's subscribers get it.
fn publish_ack(id: &[u8], seq: u64, local: bool) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"ACK","id":"#);
    out.extend_from_slice(id);
    out.extend_from_slice(br#","seq":"#);
    json::push_u64(out, seq);
    if local {
        out.extend_from_slice(br#","local":true"#);
    }
    out.push(b'}');
    f.finish()
}

/// `ACK` for an INGEST.
fn ingest_ack(key: &str, decision_id: &str, dedup: bool, seq: u64) -> Frame {
    let mut f = text();
    ingest_ack_json(f.payload_mut(), key, decision_id, dedup, seq);
    f.finish()
}

/// The JSON of an INGEST's `ACK` (also the body of `POST /api/ingest`'s answer).
pub fn ingest_ack_json(out: &mut Vec<u8>, key: &str, decision_id: &str, dedup: bool, seq: u64) {
    out.extend_from_slice(br#"{"type":"ACK","id":"#);
    json::push_str(out, key);
    out.extend_from_slice(br#","decisionId":"#);
    json::push_str(out, decision_id);
    out.extend_from_slice(if dedup {
        br#","dedup":true,"seq":"#
    } else {
        br#","dedup":false,"seq":"#
    });
    // Seqs start at 1: 0 is a decision stored but not numbered yet (a cluster whose Redis
    // is down).
    match seq {
        0 => out.extend_from_slice(b"null"),
        seq => json::push_u64(out, seq),
    }
    out.push(b'}');
}

/// `ERROR storage_unavailable` for an INGEST (never an ACK: the decision was not stored).
fn storage_unavailable(key: &str) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"ERROR","code":"#);
    json::push_str(out, ErrorCode::StorageUnavailable.as_str());
    out.extend_from_slice(br#","message":"#);
    json::push_str(
        out,
        "the decision store is unavailable; retry with the same idempotencyKey",
    );
    out.extend_from_slice(br#","id":"#);
    json::push_str(out, key);
    out.push(b'}');
    f.finish()
}

/// `PONG`, echoing the client's timestamp.
fn pong(timestamp: Option<&[u8]>) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"PONG""#);
    push_opt_raw(out, "timestamp", timestamp);
    out.push(b'}');
    f.finish()
}

/// `REFRESHED`: the connection now runs on the new token, valid until `expires_ms`.
fn refreshed(id: Option<&[u8]>, expires_ms: u64) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"REFRESHED""#);
    push_opt_raw(out, "id", id);
    out.extend_from_slice(br#","expiresAt":"#);
    json::push_u64(out, expires_ms);
    out.push(b'}');
    f.finish()
}

/// `SYSTEM token_expired`: send REFRESH within `grace_ms`, or be closed with 4403.
fn token_expired(grace_ms: u64) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"SYSTEM","event":"token_expired","graceMs":"#);
    json::push_u64(out, grace_ms);
    out.extend_from_slice(
        br#","message":"the token has expired: send REFRESH with a new one, or be closed with 4403"}"#,
    );
    f.finish()
}

/// `SYSTEM` restart notice sent before a graceful shutdown.
fn system_restart(reconnect_in_ms: u64) -> Frame {
    let mut f = text();
    let out = f.payload_mut();
    out.extend_from_slice(br#"{"type":"SYSTEM","event":"restart","reconnectIn":"#);
    json::push_u64(out, reconnect_in_ms);
    out.push(b'}');
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &[u8]) -> &str {
        let start = if frame[1] & 0x7f == 126 { 4 } else { 2 };
        std::str::from_utf8(&frame[start..]).unwrap()
    }

    #[test]
    fn publish_keeps_data_bytes_exactly() {
        let raw = br#"{"type":"PUBLISH","channel":"org:a:usage","id":"r1","data":{ "x" : 1.50, "s":"\u00e9" }}"#;
        let req = Parser::default().parse(raw).unwrap();
        assert_eq!(
            req,
            Request::Publish {
                channel: "org:a:usage".into(),
                data: br#"{ "x" : 1.50, "s":"\u00e9" }"#,
                id: Some(br#""r1""#),
                key: None,
            }
        );
        let body = br#"{"channel":"org:a:usage","idempotencyKey":"k1","data":[1]}"#;
        let req = Parser::default().parse_body("PUBLISH", body).unwrap();
        assert!(matches!(req, Request::Publish { key: Some(k), data: b"[1]", .. } if k == "k1"));
        for bad in [
            &br#"{"channel":"org:a:usage","idempotencyKey":"","data":1}"#[..],
            br#"{"channel":"org:a:usage","idempotencyKey":7,"data":1}"#,
            br#"{"channel":"org:a:usage","data":1,"data":2}"#,
        ] {
            assert!(Parser::default().parse_body("PUBLISH", bad).is_err());
        }
    }

    #[test]
    fn malformed_requests_are_refused_with_reasons() {
        let mut parser = Parser::default();
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "invalid JSON"),
            (b"[1,2]", "JSON object"),
            (br#"{"channels":[]}"#, "missing \"type\""),
            (br#"{"type":"NOPE"}"#, "unknown message type"),
            (br#"{"type":"SUB","channels":[]}"#, "1 to 100"),
            (br#"{"type":"SUB","channels":"x"}"#, "array"),
            (
                br#"{"type":"PUBLISH","channel":"org:a:usage"}"#,
                "missing \"data\"",
            ),
            (
                br#"{"type":"PUBLISH","channel":5,"data":1}"#,
                "must be a string",
            ),
            (br#"{"type":"PING","id":{"a":1}}"#, "id must be"),
            (
                br#"{"type":"SUB","channels":["a"],"since":[1]}"#,
                "must be an object",
            ),
            (
                br#"{"type":"SUB","channels":["a"],"since":{"b":1}}"#,
                "not in \"channels\"",
            ),
            (
                br#"{"type":"SUB","channels":["a"],"since":{"a":-1}}"#,
                "must be a seq",
            ),
            (
                br#"{"type":"SUB","channels":["a"],"epoch":"x"}"#,
                "\"epoch\" must be a number",
            ),
        ];
        for (raw, expect) in cases {
            let err = parser.parse(raw).unwrap_err();
            assert_eq!(err.code.as_str(), "bad_request");
            assert!(
                err.message.contains(expect),
                "{}: {}",
                String::from_utf8_lossy(raw),
                err.message
            );
        }
        // Every refusal echoes the request id, whichever check refused it.
        for raw in [
            &br#"{"type":"NOPE","id":"q"}"#[..],
            br#"{"type":"SUB","channels":[],"id":"q"}"#,
            br#"{"type":"SUB","channels":["a"],"since":{"b":1},"id":"q"}"#,
            br#"{"type":"PUBLISH","channel":1,"id":"q"}"#,
            br#"{"type":"REFRESH","id":"q"}"#,
        ] {
            let err = parser.parse(raw).unwrap_err();
            assert_eq!(err.id.as_deref(), Some(&br#""q""#[..]), "{err}");
        }
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let mut parser = Parser::default();
        let cases: &[(&[u8], &str)] = &[
            (br#"{"type":"PING","type":"SUB"}"#, r#""type""#),
            (
                br#"{"type":"PUBLISH","channel":"c","data":{"a":[{"x":1,"y":2,"x":3}]}}"#,
                r#""x""#,
            ),
            // Escaped spellings of one name are one name.
            (br#"{"type":"PING","type":"SUB"}"#, r#""type""#),
            (
                br#"{"type":"INGEST","channel":"org:demo:decisions","schema":"decision.v1","idempotencyKey":"k","id":"r","data":{"orgId":"demo","orgId":"other","direction":"precheck","decision":"allow","payloadHash":"h"}}"#,
                r#""orgId""#,
            ),
        ];
        for (raw, key) in cases {
            let err = parser.parse(raw).unwrap_err();
            assert_eq!(err.code.as_str(), "bad_request");
            assert!(
                err.message.contains(&format!("duplicate key {key}")),
                "{}",
                err.message
            );
        }
        let big: String = (0..40).map(|i| format!(r#""k{i}":{i},"#)).collect();
        let raw = format!(r#"{{"type":"PUBLISH","channel":"c","data":{{{big}"k7":0}}}}"#);
        let err = parser.parse(raw.as_bytes()).unwrap_err();
        assert!(err.message.contains(r#""k7""#), "{}", err.message);
        // The id still comes back, so the client knows which request it was.
        let err = parser
            .parse(br#"{"type":"PING","id":"q","a":1,"a":1}"#)
            .unwrap_err();
        assert_eq!(err.id.as_deref(), Some(&br#""q""#[..]));
    }

    #[test]
    fn deep_nesting_is_checked_without_recursion() {
        let depth = 30_000;
        let raw = format!(
            r#"{{"type":"PUBLISH","channel":"c","data":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let err = Parser::default().parse(raw.as_bytes()).unwrap_err();
        assert!(
            err.message.contains("nested deeper than 128"),
            "{}",
            err.message
        );
    }

    #[test]
    fn sub_carries_since_and_epoch() {
        let raw = br#"{"type":"SUB","channels":["a","b"],"since":{"a":41},"epoch":1700000000000,"epochs":{"a":"0af3"},"presence":true}"#;
        let req = Parser::default().parse(raw).unwrap();
        assert_eq!(
            req,
            Request::Sub {
                channels: vec!["a".into(), "b".into()],
                id: None,
                since: vec![("a".into(), 41)],
                epoch: Some(1_700_000_000_000),
                epochs: vec![("a".into(), "0af3".into())],
                presence: true,
            }
        );
        let mut parser = Parser::default();
        for (raw, why) in [
            (
                &br#"{"type":"SUB","channels":["a"],"epochs":{"b":"x"}}"#[..],
                "\"epochs\" names \"b\", which is not in \"channels\"",
            ),
            (
                br#"{"type":"SUB","channels":["a"],"epochs":{"a":7}}"#,
                "\"epochs\".\"a\" must be a string of at most 64 bytes",
            ),
            (
                br#"{"type":"SUB","channels":["a"],"epochs":["a"]}"#,
                "\"epochs\" must be an object of channel name to epoch",
            ),
        ] {
            let err = parser.parse(raw).unwrap_err();
            assert_eq!(err.code.as_str(), "bad_request");
            assert_eq!(err.message, why);
        }
    }

    #[test]
    fn ingest_is_validated() {
        let mut parser = Parser::default();
        let good = br#"{"type":"INGEST","channel":"org:acme:decisions","schema":"decision.v1","idempotencyKey":"k1","data":{"orgId":"acme","direction":"precheck","decision":"allow","payloadHash":"sha256:x"}}"#;
        assert!(matches!(parser.parse(good), Ok(Request::Ingest(_))));
        let bad = br#"{"type":"INGEST","channel":"org:acme:decisions","schema":"decision.v1","idempotencyKey":"k1","data":{"orgId":"acme","direction":"sideways","decision":"allow","payloadHash":"x"}}"#;
        let err = parser.parse(bad).unwrap_err();
        assert_eq!(err.code.as_str(), "invalid_decision");
        assert!(err.message.contains("direction"));
        assert_eq!(err.id.as_deref(), Some(&br#""k1""#[..]));
        let schema =
            br#"{"type":"INGEST","channel":"c","schema":"v0","idempotencyKey":"k2","data":{}}"#;
        assert_eq!(
            parser.parse(schema).unwrap_err().code.as_str(),
            "invalid_decision"
        );
    }

    #[test]
    fn server_messages_are_valid_json() {
        let message = Publication {
            seq: 7,
            kind: Kind::Message,
            data: br#"{"k":[1]}"#.to_vec(),
        };
        let channels = ["org:a:usage".to_string()];
        let members = [Member {
            user: "u\"1".into(),
            connection_id: "1a-0-7".into(),
            status: Status::Away,
            meta: br#"{"doc": "q3"}"#.to_vec().into(),
        }];
        let replies = [
            Reply::Ready {
                connection_id: "c-1",
                shard: 0,
            },
            Reply::Subscribed {
                channels: &channels,
                id: Some(b"3"),
                epoch: 17,
                epochs: &[("org:a:usage", "0af3")],
                recovered: &[("org:a:usage", false)],
            },
            Reply::Unsubscribed {
                channels: &channels,
                id: None,
            },
            Reply::Channels {
                channels: &["org:a:usage".into(), "org:a:x\"y".into()],
                id: Some(b"1"),
            },
            Reply::SessionReplaced,
            Reply::Presence {
                channel: "org:a:usage",
                id: Some(b"2"),
                total: 3,
                users: 2,
                members: &members,
                cursor: Some("0.7"),
            },
            Reply::PresenceChange {
                channel: "org:a:usage",
                change: Change::Status,
                member: &members[0],
            },
            Reply::Error {
                code: ErrorCode::Forbidden,
                message: "no \"access\"",
                id: None,
                channel: Some("org:b:usage"),
            },
            Reply::SlowConsumer { dropped: 12 },
            Reply::RateLimited { retry_after_ms: 40 },
            Reply::PublishAck {
                id: br#""x""#,
                seq: 9,
                local: false,
            },
            Reply::PublishAck {
                id: b"1",
                seq: 2,
                local: true,
            },
            Reply::IngestAck {
                key: "k",
                decision_id: "dec_1",
                dedup: true,
                seq: 4,
            },
            Reply::IngestAck {
                key: "k",
                decision_id: "dec_1",
                dedup: false,
                seq: 0,
            },
            Reply::StorageUnavailable { key: "k" },
            Reply::Pong {
                timestamp: Some(br#""2024-01-01T00:00:00Z""#),
            },
            Reply::Restart {
                reconnect_in_ms: 1000,
            },
            Reply::Refreshed {
                id: Some(b"7"),
                expires_ms: 1_800_000_000_000,
            },
            Reply::TokenExpired { grace_ms: 30_000 },
            Reply::Channel {
                channel: "org:a:usage",
                notice: &Notice::Lost { from: 3, to: 5 },
            },
            Reply::Channel {
                channel: "org:a:usage",
                notice: &Notice::Reset {
                    epoch: "0af3".into(),
                },
            },
        ];
        let mut frames = vec![publication("org:a:usage", &message)];
        frames.extend(replies.iter().map(reply));
        for f in &frames {
            let text = payload(f);
            let v: serde_json::Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(v["type"].is_string());
        }
        assert_eq!(
            payload(&frames[0]),
            r#"{"type":"MESSAGE","channel":"org:a:usage","seq":7,"data":{"k":[1]}}"#
        );
    }
}
