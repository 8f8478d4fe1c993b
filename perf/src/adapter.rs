//! Protocol adapters: how a scenario subscribes, publishes and recognises deliveries on each
//! kind of server, so the same scenario runs against all of them.

use crate::ws::{digits, field_u64, memfind};

/// The server's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// shardcast's own protocol: SUB, PUBLISH with ACK, MESSAGE.
    Shardcast,
    /// A plain broadcast server: every text message goes to every connection.
    Broadcast,
    /// Socket.IO 4 (Engine.IO v4 over WebSocket): `42["msg",…]` broadcast to everyone.
    Socketio,
    /// shardcast's Socket.IO dialect: `subscribe` to channels, `room:send` with an ack,
    /// deliveries as `message` events.
    ShardcastSocketio,
}

/// What a server frame means to a scenario.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A delivered message; the slice is its data (containing `"t":`, `"p":`, `"s":`).
    Delivery(&'a [u8]),
    /// An acknowledgement of a PUBLISH or INGEST.
    Ack,
    /// A refusal (shardcast's ERROR), e.g. storage_unavailable: the request is over, unacked.
    Refused,
    /// The connection may start its role (READY, SUBSCRIBED, or Socket.IO's namespace ack).
    Ready,
    /// The protocol needs this text sent back (Socket.IO ping).
    Reply(&'static [u8]),
    /// Anything else.
    Other,
}

impl Proto {
    /// The request path, with credentials where the protocol has them.
    pub fn path(self, key: &str) -> String {
        match self {
            Proto::Shardcast => format!("/ws?key={key}"),
            Proto::Broadcast => "/".into(),
            Proto::Socketio => "/socket.io/?EIO=4&transport=websocket".into(),
            Proto::ShardcastSocketio => format!("/socket.io/?EIO=4&transport=websocket&key={key}"),
        }
    }

    /// Texts to send once the upgrade is done; `subscribe` names the channel to join.
    pub fn on_open(self, subscribe: Option<&str>, out: &mut dyn FnMut(&[u8])) {
        match self {
            Proto::Shardcast => {
                if let Some(channel) = subscribe {
                    out(format!(r#"{{"type":"SUB","channels":["{channel}"]}}"#).as_bytes());
                }
            }
            Proto::Broadcast => {}
            Proto::Socketio => {}
            Proto::ShardcastSocketio => {
                // Pipelined: the server reads them after its open packet, in order.
                out(b"40");
                if let Some(channel) = subscribe {
                    let sub = format!(r#"421["subscribe",{{"channels":["{channel}"]}}]"#);
                    out(sub.as_bytes());
                }
            }
        }
    }

    /// Whether publications go to named channels (the others broadcast to everyone).
    pub fn has_channels(self) -> bool {
        matches!(self, Proto::Shardcast | Proto::ShardcastSocketio)
    }

    /// How many `Ready` signals a connection waits for before it counts as ready.
    pub fn readies_needed(self, subscriber: bool) -> u32 {
        match self {
            Proto::Shardcast => 1 + u32::from(subscriber), // READY, then SUBSCRIBED
            Proto::Broadcast => 0,
            Proto::Socketio => 1,
            // CONNECT's answer, then the subscription's ack.
            Proto::ShardcastSocketio => 1 + u32::from(subscriber),
        }
    }

    /// True when a publisher receives its own messages (then they serve as its acks).
    pub fn echoes_to_sender(self) -> bool {
        !self.has_channels()
    }

    /// Append the text of one publish of `data` (a JSON object) to `channel`.
    pub fn publish(self, out: &mut Vec<u8>, channel: &str, data: &[u8], ack: bool) {
        match self {
            Proto::Shardcast => {
                out.extend_from_slice(br#"{"type":"PUBLISH","channel":""#);
                out.extend_from_slice(channel.as_bytes());
                out.extend_from_slice(if ack {
                    br#"","id":1,"data":"#
                } else {
                    br#"","data":"#
                });
                out.extend_from_slice(data);
                out.push(b'}');
            }
            Proto::Broadcast => out.extend_from_slice(data),
            Proto::Socketio => {
                out.extend_from_slice(br#"42["msg","#);
                out.extend_from_slice(data);
                out.push(b']');
            }
            Proto::ShardcastSocketio => {
                out.extend_from_slice(if ack { b"421" } else { b"42" });
                out.extend_from_slice(br#"["room:send",{"room":""#);
                out.extend_from_slice(channel.as_bytes());
                out.extend_from_slice(br#"","payload":"#);
                out.extend_from_slice(data);
                out.extend_from_slice(b"}]");
            }
        }
    }

    /// Classify a text frame from the server.
    pub fn classify(self, text: &[u8]) -> Incoming<'_> {
        match self {
            Proto::Shardcast => {
                const MESSAGE: &[u8] = br#"{"type":"MESSAGE","channel":""#;
                if let Some(rest) = text.strip_prefix(MESSAGE) {
                    // The channel name ends at the first quote (bench channels have no escapes).
                    let after_channel = memchr::memchr(b'"', rest).map_or(0, |i| i + 1);
                    let rest = &rest[after_channel..];
                    // Fast path: `,"seq":N,"data":` follows the channel; search only if not.
                    let data = rest
                        .strip_prefix(br#","seq":"#)
                        .and_then(|r| digits(r).map(|(_, n)| &r[n..]))
                        .and_then(|r| r.strip_prefix(br#","data":"#))
                        .or_else(|| memfind(rest, br#","data":"#).map(|at| &rest[at + 8..]));
                    return data.map_or(Incoming::Other, Incoming::Delivery);
                }
                if text.starts_with(br#"{"type":"ACK""#) {
                    Incoming::Ack
                } else if text.starts_with(br#"{"type":"ERROR""#) {
                    Incoming::Refused
                } else if text.starts_with(br#"{"type":"READY""#)
                    || text.starts_with(br#"{"type":"SUBSCRIBED""#)
                {
                    Incoming::Ready
                } else {
                    Incoming::Other
                }
            }
            Proto::Broadcast => Incoming::Delivery(text),
            Proto::Socketio => match text {
                [b'4', b'2', ..] => Incoming::Delivery(&text[2..]),
                [b'4', b'0', ..] => Incoming::Ready,
                [b'0', ..] => Incoming::Reply(b"40"), // open packet: join the default namespace
                [b'2'] => Incoming::Reply(b"3"),      // ping: pong
                _ => Incoming::Other,
            },
            Proto::ShardcastSocketio => match text {
                [b'4', b'2', b'[', b'"', b'm', ..] => Incoming::Delivery(&text[2..]),
                [b'4', b'0', ..] => Incoming::Ready,
                // room:send's ack carries its seq; subscribe's its channels.
                [b'4', b'3', ..] if memfind(text, br#""seq":"#).is_some() => Incoming::Ack,
                [b'4', b'3', ..] if memfind(text, br#""success":true"#).is_some() => {
                    Incoming::Ready
                }
                [b'4', b'3', ..] => Incoming::Refused,
                [b'2'] => Incoming::Reply(b"3"),
                _ => Incoming::Other,
            },
        }
    }
}

/// The timing fields every published payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, nanoseconds since the run's epoch.
    pub t: u64,
    /// Publisher index.
    pub p: u64,
    /// Publisher's sequence number (from 1).
    pub s: u64,
}

/// Write a payload of about `size` bytes carrying `stamp`.
pub fn payload(out: &mut Vec<u8>, stamp: Stamp, size: usize) {
    let start = out.len();
    out.extend_from_slice(
        format!(r#"{{"t":{},"p":{},"s":{},"x":""#, stamp.t, stamp.p, stamp.s).as_bytes(),
    );
    let used = out.len() - start + 2;
    out.extend(std::iter::repeat_n(b'x', size.saturating_sub(used)));
    out.extend_from_slice(b"\"}");
}

/// Read the stamp from a delivered payload: straight through when it starts the way
/// [`payload`] writes it, by search otherwise.
pub fn stamp(data: &[u8]) -> Option<Stamp> {
    if let Some(rest) = data.strip_prefix(br#"{"t":"#) {
        let (t, n) = digits(rest)?;
        let rest = rest[n..].strip_prefix(br#","p":"#)?;
        let (p, n) = digits(rest)?;
        let rest = rest[n..].strip_prefix(br#","s":"#)?;
        let (s, _) = digits(rest)?;
        return Some(Stamp { t, p, s });
    }
    Some(Stamp {
        t: field_u64(data, br#""t":"#)?,
        p: field_u64(data, br#""p":"#)?,
        s: field_u64(data, br#""s":"#)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_requested_size_and_round_trip() {
        let mut out = Vec::new();
        let st = Stamp {
            t: 123456789,
            p: 2,
            s: 77,
        };
        payload(&mut out, st, 100);
        assert_eq!(out.len(), 100);
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        assert_eq!(stamp(&out), Some(st));
    }

    #[test]
    fn classifies_each_protocol() {
        let msg = br#"{"type":"MESSAGE","channel":"c","seq":3,"data":{"t":1,"p":0,"s":1,"x":""}}"#;
        match Proto::Shardcast.classify(msg) {
            Incoming::Delivery(d) => assert_eq!(stamp(d).unwrap().t, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Proto::Shardcast.classify(br#"{"type":"ACK","id":1,"seq":3}"#),
            Incoming::Ack
        );
        assert_eq!(Proto::Socketio.classify(b"2"), Incoming::Reply(b"3"));
        assert_eq!(
            Proto::Socketio.classify(b"40{\"sid\":\"x\"}"),
            Incoming::Ready
        );
        let mut out = Vec::new();
        Proto::Socketio.publish(&mut out, "c", b"{}", false);
        assert_eq!(out, b"42[\"msg\",{}]");

        let sio = Proto::ShardcastSocketio;
        let delivery =
            br#"42["message",{"channel":"c","seq":1,"data":{"payload":{"t":5,"p":0,"s":1}}}]"#;
        match sio.classify(delivery) {
            Incoming::Delivery(d) => assert_eq!(stamp(d).unwrap().t, 5),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            sio.classify(br#"431[{"success":true,"seq":3}]"#),
            Incoming::Ack
        );
        assert_eq!(
            sio.classify(br#"431[{"success":true,"channels":["c"]}]"#),
            Incoming::Ready
        );
        assert_eq!(
            sio.classify(br#"431[{"success":false,"code":"forbidden"}]"#),
            Incoming::Refused
        );
        assert_eq!(sio.classify(br#"42["connected",{}]"#), Incoming::Other);
        out.clear();
        sio.publish(&mut out, "c", b"{}", true);
        assert_eq!(out, br#"421["room:send",{"room":"c","payload":{}}]"#);
    }
}
