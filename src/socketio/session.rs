//! One Engine.IO session's Socket.IO state, whichever transport carries it: the namespaces
//! joined, a binary packet waiting for its attachments, the credentials its HTTP request
//! carried; and what each packet from the client does. The transport (`conn.rs` for
//! WebSocket, [`super::polling`]) reads frames or records, calls [`Session::on_text`] and
//! [`Session::on_binary`], and acts on the [`Outcome`].

use std::rc::Rc;

use smallvec::SmallVec;

use crate::auth::Credentials;
use crate::clock::Now;
use crate::codec::{self, opcode};
use crate::dialect::socketio as dialect;
use crate::dialect::socketio::packet::{self, Engine, Kind, Packet};
use crate::dialect::{Refusal, Request};
use crate::json;
use crate::shard::recovery::ConnectIds;
use crate::shard::{Peer, Shard, Stall};

/// What the transport does after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handled (or nothing to do).
    Handled,
    /// Refused: counts toward the connection's bad messages.
    Refused,
    /// The client closed the session, or broke the protocol: close the transport.
    Close,
    /// `5`: the client completed its upgrade to this WebSocket.
    Upgrade,
}

/// A binary packet whose attachments are still arriving.
struct Binary {
    /// The packet's text (placeholders where the attachments go).
    text: String,
    /// Attachments so far.
    attachments: Vec<Vec<u8>>,
    /// How many it has.
    want: usize,
}

/// A session's Socket.IO state.
#[derive(Default)]
pub struct Session {
    /// Namespaces joined.
    joined: SmallVec<[Box<str>; 1]>,
    /// A binary packet waiting for its attachments.
    binary: Option<Box<Binary>>,
    /// What the HTTP request that opened the session carried, tried when a CONNECT's auth
    /// payload has none.
    credentials: Option<Credentials>,
    /// Serve the protocol suite's reference app instead of the gateway.
    conformance: bool,
    /// A WebSocket probing to take over this long-polling session (`2probe`, then `5`).
    takeover: Option<Rc<super::polling::Polling>>,
}

/// The shard and the connection a packet came from.
pub struct Cx<'a> {
    /// The shard.
    pub shard: &'a Shard,
    /// The connection (or polling session).
    pub peer: &'a Rc<Peer>,
}

impl Cx<'_> {
    fn send(&self, text: &[u8]) {
        self.shard
            .answer_frame(self.peer, codec::frame(opcode::TEXT, text));
    }

    fn send_binary(&self, bytes: &[u8]) {
        self.shard
            .answer_frame(self.peer, codec::frame(opcode::BINARY, bytes));
    }
}

impl Session {
    /// A session opened by an HTTP request that carried `credentials` (query or headers).
    pub fn new(credentials: Credentials, conformance: bool) -> Self {
        let given = credentials.key.is_some() || credentials.token.is_some();
        Self {
            credentials: given.then_some(credentials),
            conformance,
            ..Self::default()
        }
    }

    /// The state of a WebSocket probing to take over `polling` (`?sid=` of a long-polling
    /// session): only pings and the final `5` mean anything on it until then.
    pub fn takeover(polling: Rc<super::polling::Polling>) -> Self {
        Self {
            takeover: Some(polling),
            ..Self::default()
        }
    }

    /// The long-polling session this WebSocket probes to take over, once it says `5`.
    pub fn taking_over(&mut self) -> Option<Rc<super::polling::Polling>> {
        self.takeover.take()
    }

    /// The open packet for session `sid`.
    pub fn open_packet(shard: &Shard, sid: &str, upgrade: bool) -> String {
        let config = shard.config();
        packet::Open {
            sid,
            upgrade,
            ping_interval_ms: config.socketio.ping_interval_ms,
            ping_timeout_ms: config.socketio.ping_timeout_ms,
            max_payload: config.limits.max_message_bytes,
        }
        .text()
    }

    /// Handle an Engine.IO text packet.
    pub fn on_text(&mut self, cx: &Cx<'_>, text: &str) -> Outcome {
        match packet::engine(text) {
            Ok(Engine::Ping(data)) => {
                if let Some(polling) = &self.takeover {
                    // The client pauses polling before it says `5`: its waiting GET must
                    // come back first.
                    polling.release_get();
                }
                let mut pong = b"3".to_vec();
                pong.extend_from_slice(data.as_bytes());
                cx.send(&pong);
                Outcome::Handled
            }
            Ok(Engine::Pong(_) | Engine::Noop) => Outcome::Handled,
            Ok(Engine::Close) | Err(_) => Outcome::Close,
            Ok(Engine::Upgrade) if self.takeover.is_some() => Outcome::Upgrade,
            Ok(Engine::Upgrade) => Outcome::Close,
            // Nothing but the probe before the upgrade completes.
            Ok(Engine::Message(_)) if self.takeover.is_some() => Outcome::Close,
            Ok(Engine::Message(text)) => self.on_packet(cx, text),
        }
    }

    /// Handle a binary frame (or a polling record `b<base64>`, decoded): an attachment of
    /// the binary packet before it.
    pub fn on_binary(&mut self, cx: &Cx<'_>, bytes: &[u8]) -> Outcome {
        let Some(binary) = self.binary.as_mut().filter(|_| self.takeover.is_none()) else {
            return Outcome::Close;
        };
        binary.attachments.push(bytes.to_vec());
        if binary.attachments.len() < binary.want {
            return Outcome::Handled;
        }
        let Some(binary) = self.binary.take() else {
            return Outcome::Close;
        };
        let Ok(packet) = packet::packet(&binary.text, usize::MAX) else {
            return Outcome::Close;
        };
        self.dispatch(cx, packet, &binary.attachments)
    }

    /// A Socket.IO packet (the data of an Engine.IO message).
    fn on_packet(&mut self, cx: &Cx<'_>, text: &str) -> Outcome {
        if self.binary.is_some() {
            // Its attachments were due first.
            return Outcome::Close;
        }
        let max = cx.shard.config().socketio.max_attachments;
        let Ok(packet) = packet::packet(text, max) else {
            return Outcome::Close;
        };
        if !packet.data.is_empty() {
            let valid = cx
                .shard
                .parser
                .borrow_mut()
                .validate(packet.data.as_bytes());
            if valid.is_err() {
                return Outcome::Close;
            }
        }
        if matches!(packet.kind, Kind::Event | Kind::BinaryEvent) && event_name(&packet).is_none() {
            return Outcome::Close;
        }
        if packet.kind.binary() && packet.attachments > 0 {
            self.binary = Some(Box::new(Binary {
                text: text.to_string(),
                attachments: Vec::with_capacity(packet.attachments),
                want: packet.attachments,
            }));
            return Outcome::Handled;
        }
        self.dispatch(cx, packet, &[])
    }

    fn dispatch(&mut self, cx: &Cx<'_>, packet: Packet<'_>, attachments: &[Vec<u8>]) -> Outcome {
        let joined = self.joined.iter().any(|n| **n == *packet.namespace);
        match packet.kind {
            Kind::Connect => self.connect(cx, packet.namespace, packet.data),
            Kind::Disconnect => {
                self.joined.retain(|n| **n != *packet.namespace);
                if packet.namespace == "/" && !self.conformance {
                    // A goodbye: nothing to recover.
                    cx.shard.disable_recovery(cx.peer);
                    self.leave_all(cx);
                }
                Outcome::Handled
            }
            // Socket.IO closes a connection that talks in a namespace it has not joined.
            _ if !joined => Outcome::Close,
            Kind::Ack | Kind::BinaryAck => Outcome::Handled,
            Kind::Event | Kind::BinaryEvent if self.conformance => {
                reference_app(cx, &packet, attachments);
                Outcome::Handled
            }
            Kind::Event | Kind::BinaryEvent => self.event(cx, &packet, attachments),
            Kind::ConnectError => Outcome::Close,
        }
    }

    /// CONNECT to `namespace`, with `auth` its raw auth payload (or empty).
    fn connect(&mut self, cx: &Cx<'_>, namespace: &str, auth: &str) -> Outcome {
        if !cx.shard.config().socketio.serves(namespace) {
            connect_error(cx, namespace, "Invalid namespace", None);
            return Outcome::Handled;
        }
        if !self.conformance && cx.peer.principal().is_none() {
            if let Err(refusal) = self.authenticate(cx, auth) {
                connect_error(cx, namespace, &refusal.message, Some(refusal.code.as_str()));
                return Outcome::Handled;
            }
        }
        if !self.joined.iter().any(|n| **n == *namespace) {
            self.joined.push(namespace.into());
        }
        cx.peer.set_stall(Stall::None, cx.shard.now_ms());
        let sid = cx.shard.connection_id(cx.peer.id);
        let recovery = cx.shard.config().socketio.recovery_ms > 0;
        if namespace == "/" && recovery && !self.conformance {
            // Channels live on the main namespace: its session is the one recovered.
            let pid = cx.shard.enable_recovery(cx.peer);
            let raw = auth.as_bytes();
            let members = json::object_members(raw).unwrap_or_default();
            let field = |name| json::member(raw, &members, name).and_then(json::string);
            match field("pid") {
                Some(old) => {
                    // Answered by the core once the channels are resumed (or not).
                    let ids = ConnectIds {
                        recovered: dialect::connect_id(&sid, &old, &pid).into(),
                        fresh: dialect::connect_id(&sid, &pid, &pid).into(),
                        pid: old.as_str().into(),
                    };
                    let offset = field("offset");
                    cx.shard
                        .recover_session(cx.peer, &old, offset.as_deref(), ids);
                }
                None => cx.send(&dialect::connect_answer(&sid, &pid)),
            }
        } else {
            let mut out = Vec::with_capacity(64);
            packet::push_head(&mut out, Kind::Connect, 0, namespace, None);
            out.extend_from_slice(br#"{"sid":"#);
            json::push_str(&mut out, &sid);
            out.push(b'}');
            cx.send(&out);
        }
        if self.conformance {
            // The reference app: `socket.emit("auth", socket.handshake.auth)`.
            let mut out = Vec::with_capacity(32 + auth.len());
            packet::push_head(&mut out, Kind::Event, 0, namespace, None);
            out.extend_from_slice(br#"["auth","#);
            out.extend_from_slice(if auth.is_empty() {
                b"{}"
            } else {
                auth.as_bytes()
            });
            out.push(b']');
            // Written apart from the CONNECT answer: the suite's client (ws 8.5) emits every
            // message of one read at once and waits for each with a fresh listener, so a
            // second message in the same read is lost to it. Node's socket.io writes them
            // apart; so does this, a moment later.
            let peer = cx.peer.clone();
            let frame = codec::frame(opcode::TEXT, &out);
            glommio::spawn_local(async move {
                glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
                if peer.phase.get() == crate::shard::Phase::Open {
                    peer.out().borrow_mut().push_reply(frame);
                    peer.wake();
                }
            })
            .detach();
        } else if namespace == "/" {
            let Some(principal) = cx.peer.principal() else {
                return Outcome::Handled;
            };
            cx.send(&dialect::event("connected", |out| {
                out.extend_from_slice(br#"{"connectionId":"#);
                json::push_str(out, &sid);
                out.extend_from_slice(br#","shard":"#);
                json::push_u64(out, cx.shard.id as u64);
                out.push(b'}');
            }));
            cx.send(&dialect::event("connection:established", |out| {
                out.extend_from_slice(br#"{"connectionId":"#);
                json::push_str(out, &sid);
                out.extend_from_slice(br#","tenantId":"#);
                json::push_str(out, &principal.org);
                out.push(b'}');
            }));
        }
        Outcome::Handled
    }

    /// Open the gateway session: credentials from the auth payload (`token` or `key`), else
    /// from the HTTP request.
    fn authenticate(&mut self, cx: &Cx<'_>, auth: &str) -> Result<(), Refusal> {
        let shard = cx.shard;
        let raw = auth.as_bytes();
        let members = json::object_members(raw).unwrap_or_default();
        let field = |name| json::member(raw, &members, name).and_then(json::string);
        let given = Credentials {
            key: field("key"),
            token: field("token"),
        };
        let credentials = if given.key.is_some() || given.token.is_some() {
            given
        } else {
            self.credentials.take().unwrap_or(given)
        };
        let principal = shard.auth.authenticate(&credentials).map_err(|e| {
            shard.global.auth_failed(e.code());
            Refusal {
                code: e.code(),
                message: e.to_string(),
                id: None,
            }
        })?;
        if !shard.admit_session(&principal) {
            return Err(Refusal {
                code: crate::codes::ErrorCode::TooManyConnections,
                message: format!("org {:?} holds all the connections it may", principal.org),
                id: None,
            });
        }
        self.credentials = None;
        let deadline = match principal.expires_ms {
            Some(expires) => {
                let left = expires.saturating_sub(crate::decision::unix_ms());
                shard.now_ms().saturating_add(left)
            }
            None => u64::MAX,
        };
        cx.peer.token_deadline.set(deadline);
        shard.open_session(cx.peer, &principal);
        Ok(())
    }

    /// Leave every channel (the main namespace was left).
    fn leave_all(&mut self, cx: &Cx<'_>) {
        let Some(principal) = cx.peer.principal() else {
            return;
        };
        let channels: Vec<String> = cx
            .peer
            .channels
            .borrow()
            .iter()
            .map(|c| c.to_string())
            .collect();
        if !channels.is_empty() {
            let unsub = Request::Unsub { channels, id: None };
            let _ = cx.shard.request(cx.peer, &principal, unsub, Now::read());
        }
    }

    /// A gateway event: the seed services' client events, as requests to the core.
    fn event(&mut self, cx: &Cx<'_>, packet: &Packet<'_>, attachments: &[Vec<u8>]) -> Outcome {
        let Some(principal) = cx.peer.principal() else {
            return Outcome::Close;
        };
        if packet.namespace != "/" {
            // Channels are served on the main namespace: one encoding for every subscriber.
            return Outcome::Handled;
        }
        // Binary values go into channel data as `{"_binary":"BASE64"}`.
        let embedded;
        let raw = if packet.kind == Kind::BinaryEvent {
            match dialect::binary::embed(packet.data.as_bytes(), attachments) {
                Some(data) => {
                    embedded = data;
                    &embedded[..]
                }
                // A placeholder for an attachment the packet does not have.
                None => return Outcome::Close,
            }
        } else {
            packet.data.as_bytes()
        };
        let Some(items) = json::array_items(raw) else {
            return Outcome::Close;
        };
        let Some(name) = items.first().and_then(|r| json::string(&raw[r.clone()])) else {
            return Outcome::Close;
        };
        let arg = items.get(1).map(|r| &raw[r.clone()]);
        super::events::handle(cx, &principal, &name, arg, packet.ack)
    }
}

/// The event name of an EVENT packet: its array's first item, a string.
fn event_name(packet: &Packet<'_>) -> Option<String> {
    let raw = packet.data.as_bytes();
    let first = json::array_items(raw)?.into_iter().next()?;
    json::string(&raw[first])
}

/// `44[namespace,]{"message":…}`: the namespace refused.
fn connect_error(cx: &Cx<'_>, namespace: &str, message: &str, code: Option<&str>) {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"44");
    if namespace != "/" {
        out.extend_from_slice(namespace.as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(br#"{"message":"#);
    json::push_str(&mut out, message);
    if let Some(code) = code {
        out.extend_from_slice(br#","data":{"code":"#);
        json::push_str(&mut out, code);
        out.push(b'}');
    }
    out.push(b'}');
    cx.send(&out);
}

/// The protocol suite's reference app: `message` is emitted back as `message-back`,
/// `message-with-ack` answered with an ack of the same arguments, attachments and all.
fn reference_app(cx: &Cx<'_>, packet: &Packet<'_>, attachments: &[Vec<u8>]) {
    let raw = packet.data.as_bytes();
    let Some(items) = json::array_items(raw) else {
        return;
    };
    let args = match (items.get(1), items.last()) {
        (Some(first), Some(last)) => &raw[first.start..last.end],
        _ => &[][..],
    };
    let name = event_name(packet);
    let binary = packet.kind == Kind::BinaryEvent;
    let mut out = Vec::with_capacity(32 + raw.len());
    match (name.as_deref(), packet.ack) {
        (Some("message"), _) => {
            let kind = if binary {
                Kind::BinaryEvent
            } else {
                Kind::Event
            };
            packet::push_head(&mut out, kind, attachments.len(), packet.namespace, None);
            out.extend_from_slice(br#"["message-back""#);
            if !args.is_empty() {
                out.push(b',');
            }
        }
        (Some("message-with-ack"), Some(id)) => {
            let kind = if binary { Kind::BinaryAck } else { Kind::Ack };
            packet::push_head(
                &mut out,
                kind,
                attachments.len(),
                packet.namespace,
                Some(id),
            );
            out.push(b'[');
        }
        _ => return,
    }
    out.extend_from_slice(args);
    out.push(b']');
    cx.send(&out);
    for attachment in attachments {
        cx.send_binary(attachment);
    }
}
