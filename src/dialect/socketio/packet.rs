//! Engine.IO v4 and Socket.IO v5 packets as text: what a frame (or a polling payload's
//! record) holds, and how the server writes its own. No I/O, no state.
//!
//! An Engine.IO packet is a type digit and its data (`4` + a Socket.IO packet, `2` a ping).
//! A Socket.IO packet is `<type>[<attachments>-][<namespace>,][<ack id>][JSON]`, the
//! namespace left out when it is `/` (socket.io-parser's encoding, which every client uses).

/// Largest ack id a client may send (socket.io-client counts up from 0; JavaScript's exact
/// integers end at 2^53).
pub const MAX_ACK_ID: u64 = (1 << 53) - 1;
/// Longest namespace name accepted.
pub const MAX_NAMESPACE_BYTES: usize = 128;

/// An Engine.IO packet received as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine<'a> {
    /// `1`: the client closes the session.
    Close,
    /// `2`: a ping (`2probe` while upgrading).
    Ping(&'a str),
    /// `3`: the answer to the server's ping.
    Pong(&'a str),
    /// `4`: a Socket.IO packet.
    Message(&'a str),
    /// `5`: the upgrade to WebSocket is complete.
    Upgrade,
    /// `6`: nothing.
    Noop,
}

/// Why a packet is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not an Engine.IO packet a client sends.
    #[error("unknown Engine.IO packet type")]
    EngineType,
    /// Not a Socket.IO packet type, or one only servers send.
    #[error("unknown Socket.IO packet type")]
    PacketType,
    /// A binary packet without `<n>-`, or too many attachments.
    #[error("bad attachment count")]
    Attachments,
    /// The namespace is too long.
    #[error("namespace too long")]
    Namespace,
    /// The ack id is not a number Socket.IO accepts.
    #[error("bad ack id")]
    AckId,
    /// The payload is not what the packet type carries.
    #[error("bad payload")]
    Payload,
}

/// Read an Engine.IO text packet.
pub fn engine(text: &str) -> Result<Engine<'_>, Invalid> {
    // An ASCII type byte, so that the data starts on a character boundary.
    let Some(kind) = text.bytes().next().filter(u8::is_ascii) else {
        return Err(Invalid::EngineType);
    };
    let data = &text[1..];
    Ok(match kind {
        b'1' => Engine::Close,
        b'2' => Engine::Ping(data),
        b'3' => Engine::Pong(data),
        b'4' => Engine::Message(data),
        b'5' => Engine::Upgrade,
        b'6' => Engine::Noop,
        _ => return Err(Invalid::EngineType),
    })
}

/// Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `0`: join a namespace (client), or joined (server).
    Connect,
    /// `1`: leave a namespace.
    Disconnect,
    /// `2`: an event.
    Event,
    /// `3`: the answer to an event that asked for one.
    Ack,
    /// `4`: a namespace refused (server only).
    ConnectError,
    /// `5`: an event with binary attachments.
    BinaryEvent,
    /// `6`: an ack with binary attachments.
    BinaryAck,
}

impl Kind {
    fn digit(self) -> u8 {
        b'0' + self as u8
    }

    /// Whether attachments follow it.
    pub fn binary(self) -> bool {
        matches!(self, Kind::BinaryEvent | Kind::BinaryAck)
    }
}

/// A Socket.IO packet from a client. `data` is raw JSON (empty when there is none),
/// checked to be JSON by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Its type.
    pub kind: Kind,
    /// Binary attachments that follow it (binary types only).
    pub attachments: usize,
    /// Its namespace (`/` when none was written).
    pub namespace: &'a str,
    /// The ack id, when the sender wants an answer.
    pub ack: Option<u64>,
    /// Raw JSON payload, or empty.
    pub data: &'a str,
}

/// Read a Socket.IO packet (the data of an Engine.IO message), up to its payload: the
/// payload's JSON is left to the caller, who holds the parser. `max_attachments` bounds a
/// binary packet's attachments.
pub fn packet(text: &str, max_attachments: usize) -> Result<Packet<'_>, Invalid> {
    let bytes = text.as_bytes();
    let kind = match bytes.first() {
        Some(b'0') => Kind::Connect,
        Some(b'1') => Kind::Disconnect,
        Some(b'2') => Kind::Event,
        Some(b'3') => Kind::Ack,
        Some(b'5') => Kind::BinaryEvent,
        Some(b'6') => Kind::BinaryAck,
        _ => return Err(Invalid::PacketType),
    };
    let mut at = 1;
    let mut attachments = 0;
    if kind.binary() {
        let digits = bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || bytes.get(at + digits) != Some(&b'-') {
            return Err(Invalid::Attachments);
        }
        attachments = text[at..at + digits]
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= max_attachments)
            .ok_or(Invalid::Attachments)?;
        at += digits + 1;
    }
    let mut namespace = "/";
    if bytes.get(at) == Some(&b'/') {
        let end = memchr::memchr(b',', &bytes[at..]).map_or(bytes.len(), |i| at + i);
        namespace = &text[at..end];
        if namespace.len() > MAX_NAMESPACE_BYTES {
            return Err(Invalid::Namespace);
        }
        at = (end + 1).min(bytes.len());
    }
    let digits = bytes[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let mut ack = None;
    if digits > 0 {
        let id = text[at..at + digits]
            .parse::<u64>()
            .ok()
            .filter(|id| *id <= MAX_ACK_ID)
            .ok_or(Invalid::AckId)?;
        ack = Some(id);
        at += digits;
    }
    let data = &text[at..];
    let first = data.bytes().next();
    let shape_ok = match kind {
        // An auth payload is an object; none at all is allowed.
        Kind::Connect => matches!(first, None | Some(b'{')),
        Kind::Disconnect => first.is_none(),
        Kind::Event | Kind::BinaryEvent => first == Some(b'['),
        Kind::Ack | Kind::BinaryAck => first == Some(b'[') && ack.is_some(),
        Kind::ConnectError => false,
    };
    if !shape_ok || (ack.is_some() && matches!(kind, Kind::Connect | Kind::Disconnect)) {
        return Err(Invalid::Payload);
    }
    Ok(Packet {
        kind,
        attachments,
        namespace,
        ack,
        data,
    })
}

/// The start of a Socket.IO packet the server sends, inside an Engine.IO message:
/// `4<type>[<n>-][<namespace>,][<ack id>]`. The JSON payload follows.
pub fn push_head(
    out: &mut Vec<u8>,
    kind: Kind,
    attachments: usize,
    namespace: &str,
    ack: Option<u64>,
) {
    out.push(b'4');
    out.push(kind.digit());
    if kind.binary() {
        crate::json::push_u64(out, attachments as u64);
        out.push(b'-');
    }
    if namespace != "/" {
        out.extend_from_slice(namespace.as_bytes());
        out.push(b',');
    }
    if let Some(id) = ack {
        crate::json::push_u64(out, id);
    }
}

/// The Engine.IO open packet's fields.
#[derive(Debug, Clone, Copy)]
pub struct Open<'a> {
    /// The session id.
    pub sid: &'a str,
    /// Whether the transport may upgrade to WebSocket (it is polling).
    pub upgrade: bool,
    /// Server ping interval.
    pub ping_interval_ms: u64,
    /// How long the server waits for a pong.
    pub ping_timeout_ms: u64,
    /// Largest payload the server accepts.
    pub max_payload: usize,
}

impl Open<'_> {
    /// The open packet: `0{"sid",…}`.
    pub fn text(&self) -> String {
        let mut out = b"0{\"sid\":".to_vec();
        crate::json::push_str(&mut out, self.sid);
        let upgrades = if self.upgrade {
            r#"["websocket"]"#
        } else {
            "[]"
        };
        let rest = format!(
            r#","upgrades":{upgrades},"pingInterval":{},"pingTimeout":{},"maxPayload":{}}}"#,
            self.ping_interval_ms, self.ping_timeout_ms, self.max_payload
        );
        out.extend_from_slice(rest.as_bytes());
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_packets() {
        assert_eq!(engine("2probe"), Ok(Engine::Ping("probe")));
        assert_eq!(engine("3"), Ok(Engine::Pong("")));
        assert_eq!(engine("40"), Ok(Engine::Message("0")));
        assert_eq!(engine("5"), Ok(Engine::Upgrade));
        assert_eq!(engine("0{}"), Err(Invalid::EngineType));
        assert_eq!(engine(""), Err(Invalid::EngineType));
        assert_eq!(engine("x"), Err(Invalid::EngineType));
        assert_eq!(
            engine("é"),
            Err(Invalid::EngineType),
            "a client's multi-byte first char"
        );
    }

    #[test]
    fn packets_as_socket_io_parser_reads_them() {
        let p = packet("0", 10).unwrap();
        assert_eq!(
            (p.kind, p.namespace, p.ack, p.data),
            (Kind::Connect, "/", None, "")
        );
        let p = packet(r#"0/admin,{"token":"x"}"#, 10).unwrap();
        assert_eq!((p.namespace, p.data), ("/admin", r#"{"token":"x"}"#));
        // A namespace without a comma runs to the end.
        assert_eq!(packet("0/random", 10).unwrap().namespace, "/random");
        assert_eq!(packet("1/custom", 10).unwrap().kind, Kind::Disconnect);
        let p = packet(r#"2456["message-with-ack",1]"#, 10).unwrap();
        assert_eq!((p.kind, p.ack), (Kind::Event, Some(456)));
        assert_eq!(p.data, r#"["message-with-ack",1]"#);
        let p = packet(r#"52-789["m",{"_placeholder":true,"num":0}]"#, 10).unwrap();
        assert_eq!(
            (p.kind, p.attachments, p.ack),
            (Kind::BinaryEvent, 2, Some(789))
        );
        let p = packet(r#"3/chat,12[]"#, 10).unwrap();
        assert_eq!((p.kind, p.namespace, p.ack), (Kind::Ack, "/chat", Some(12)));
    }

    #[test]
    fn invalid_packets() {
        assert_eq!(packet("abc", 10), Err(Invalid::PacketType));
        assert_eq!(packet("4{}", 10), Err(Invalid::PacketType));
        assert_eq!(packet("7", 10), Err(Invalid::PacketType));
        assert_eq!(packet("2{}", 10), Err(Invalid::Payload));
        assert_eq!(packet(r#"2abc["m"]"#, 10), Err(Invalid::Payload));
        assert_eq!(packet("2", 10), Err(Invalid::Payload));
        assert_eq!(packet("1[]", 10), Err(Invalid::Payload));
        assert_eq!(packet("3[]", 10), Err(Invalid::Payload));
        assert_eq!(packet("5[]", 10), Err(Invalid::Attachments));
        assert_eq!(packet("511-[]", 10), Err(Invalid::Attachments));
        assert_eq!(packet("299999999999999999999[]", 10), Err(Invalid::AckId));
        let long = format!("0/{}", "a".repeat(MAX_NAMESPACE_BYTES));
        assert_eq!(packet(&long, 10), Err(Invalid::Namespace));
    }

    #[test]
    fn heads() {
        let mut out = Vec::new();
        push_head(&mut out, Kind::Event, 0, "/", None);
        assert_eq!(out, b"42");
        out.clear();
        push_head(&mut out, Kind::BinaryAck, 2, "/custom", Some(789));
        assert_eq!(out, b"462-/custom,789");
        let open = Open {
            sid: "a-0-1",
            upgrade: true,
            ping_interval_ms: 300,
            ping_timeout_ms: 200,
            max_payload: 1_000_000,
        };
        assert_eq!(
            open.text(),
            r#"0{"sid":"a-0-1","upgrades":["websocket"],"pingInterval":300,"pingTimeout":200,"maxPayload":1000000}"#
        );
    }
}
