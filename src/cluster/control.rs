//! What the server API asks of the other nodes of a cluster, on the control channel (every
//! node) or a node's own channel (one node): commands (a broadcast, a message to a user,
//! disconnects, revocations) and questions, whose answers come back on the asking node's
//! channel. Published by the node that took the request, which does its own part itself; a
//! node ignores what it published.
//!
//! On the wire: `!`, then JSON (a kill switch on a node's channel starts with a hex digit).
//! These are rare, and some carry listings: serde keeps the format in the types.

use serde::{Deserialize, Serialize};

use super::ClusterError;
use crate::shard::directory::{Filter, Listing};

/// What starts a control message on a node's channel.
const CONTROL_MARK: u8 = b'!';

/// A command or question for other nodes, or an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// `SYSTEM broadcast` with `data` to every connection (of `org`).
    Broadcast {
        /// Only this org's connections.
        org: Option<String>,
        /// Raw JSON.
        #[serde(with = "raw")]
        data: Vec<u8>,
    },
    /// Close every connection of `user` (of `org`) with `code` and `reason`.
    CloseUser {
        /// The user.
        user: String,
        /// Only this org's connections.
        org: Option<String>,
        /// The close code.
        code: u16,
        /// The reason.
        reason: String,
    },
    /// Close connection `conn` of shard `shard` (if of `org`) with `code` and `reason`.
    CloseConn {
        /// Its shard on the node.
        shard: usize,
        /// Its id on the shard.
        conn: u64,
        /// Only if of this org.
        org: Option<String>,
        /// The close code.
        code: u16,
        /// The reason.
        reason: String,
    },
    /// A token revocation: refuse the tokens it covers, close their connections.
    Revoke(crate::auth::Revocation),
    /// A message numbered `seq` on `user`'s channel `channel`: to the user's connections
    /// (of `org`) that are not its subscribers (those have it from Redis already).
    ToUser {
        /// The user.
        user: String,
        /// Only this org's connections.
        org: Option<String>,
        /// The user's channel.
        channel: String,
        /// Its seq.
        seq: u64,
        /// Raw JSON.
        #[serde(with = "raw")]
        data: Vec<u8>,
    },
    /// A question: every node that hears it answers to `to`.
    Ask {
        /// Where the answers go.
        to: ReplyTo,
        /// What is asked.
        question: Question,
    },
    /// One node's answer to an [`Control::Ask`].
    Answer {
        /// The question's reply address.
        to: ReplyTo,
        /// The answer.
        answer: NodeAnswer,
    },
}

/// Where a question's answers go: the asking node's channel, then the asking shard, which
/// knows the question by `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    /// The node's boot id in hex.
    pub node: String,
    /// The shard that asked.
    pub shard: u16,
    /// The question's number on that shard.
    pub id: u64,
}

/// What a node is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Question {
    /// Do this command, and say how many connections it reached or closed.
    Count(Box<Control>),
    /// The node's open sessions that match `filter`, after connection id `after` in
    /// (node, shard, connection) order, at most `limit`; with its totals.
    Connections {
        /// Which.
        filter: Filter,
        /// The last connection id of the page before.
        after: Option<String>,
        /// At most this many.
        limit: usize,
    },
    /// The node's channels with subscribers named `prefix…` after `after` that `org` may see
    /// (any, when `None`), at most `limit`, by name.
    Channels {
        /// The names' start.
        prefix: String,
        /// The last name of the page before.
        after: String,
        /// Only this org's channels.
        org: Option<String>,
        /// At most this many.
        limit: usize,
    },
}

/// One node's answer to a [`Question`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeAnswer {
    /// Connections reached or closed.
    Count(usize),
    /// The node (boot id in hex) and a page of each of its shards' sessions.
    Connections {
        /// The node.
        node: String,
        /// Per shard, in shard order.
        shards: Vec<Listing>,
    },
    /// Channels and their subscribers on the node, by name.
    Channels(Vec<(String, usize)>),
}

#[derive(Serialize)]
struct Outgoing<'a> {
    from: &'a str,
    control: &'a Control,
}

#[derive(Deserialize)]
struct Incoming {
    from: String,
    control: Control,
}

impl Control {
    /// The payload, from node `from` (boot id in hex).
    pub fn encode(&self, from: &str) -> Vec<u8> {
        let mut out = vec![CONTROL_MARK];
        let message = Outgoing {
            from,
            control: self,
        };
        // Only the writer can fail, and a Vec does not.
        if let Err(e) = simd_json::serde::to_writer(&mut out, &message) {
            tracing::error!("a control message could not be encoded: {e}");
        }
        out
    }

    /// Whether the node that sent it acts on it too: a message to a user, which Redis
    /// tells every node of in the step that numbers it, so that every node (the sender
    /// too) hands a user's messages to its connections in seq order.
    pub fn heard_by_sender(&self) -> bool {
        matches!(self, Control::Ask { question: Question::Count(c), .. }
            if matches!(**c, Control::ToUser { .. }))
    }

    /// Whether `payload` (on a node's channel) is a control message, not a kill switch.
    pub fn is_control(payload: &[u8]) -> bool {
        payload.first() == Some(&CONTROL_MARK)
    }

    /// The node it came from and the command.
    pub fn parse(payload: &[u8]) -> Result<(String, Self), ClusterError> {
        let json = payload
            .strip_prefix(&[CONTROL_MARK])
            .ok_or_else(|| ClusterError::Protocol("not a control message".into()))?;
        let mut json = json.to_vec();
        let message: Incoming = simd_json::serde::from_slice(&mut json)
            .map_err(|e| ClusterError::Protocol(format!("bad control message: {e}")))?;
        Ok((message.from, message.control))
    }
}

/// Raw JSON (valid UTF-8, as parsed from a request) as a JSON string.
mod raw {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        String::deserialize(d).map(String::into_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::directory::ConnInfo;

    #[test]
    fn control_messages_read_back_as_written_and_bad_ones_are_refused() {
        let revocation = crate::auth::Revocation {
            what: crate::auth::Revoked::Sub {
                sub: "u1".into(),
                org: Some("acme".into()),
            },
            at_ms: 5,
            until_ms: 9,
        };
        let to = ReplyTo {
            node: "1a2b".into(),
            shard: 1,
            id: 7,
        };
        let conn = ConnInfo {
            conn: 3,
            connection_id: "1a2b-1-3".into(),
            org: "acme".into(),
            user: Some("u\"1".into()),
            key_id: None,
            channels: vec!["org:acme:x".into()],
            queued: 2,
            dropped: 1,
            since_ms: 1_700_000_000_000,
            remote: Some("127.0.0.1:5000".into()),
            dialect: crate::dialect::Dialect::Shardcast,
        };
        let broadcast = Control::Broadcast {
            org: None,
            data: "{\"a\":\"1:2\",\"é\":[]}".as_bytes().to_vec(),
        };
        let all = [
            broadcast.clone(),
            Control::CloseUser {
                user: "u1".into(),
                org: Some("acme".into()),
                code: 4001,
                reason: "bye\n:".into(),
            },
            Control::CloseConn {
                shard: 1,
                conn: 42,
                org: None,
                code: 1000,
                reason: String::new(),
            },
            Control::Revoke(revocation),
            Control::ToUser {
                user: "u1".into(),
                org: None,
                channel: "user:u1:notifications".into(),
                seq: 7,
                data: b"[]".to_vec(),
            },
            Control::Ask {
                to: to.clone(),
                question: Question::Count(Box::new(broadcast)),
            },
            Control::Ask {
                to: to.clone(),
                question: Question::Connections {
                    filter: Filter {
                        org: Some("acme".into()),
                        user: None,
                    },
                    after: Some("1a2b-0-9".into()),
                    limit: 100,
                },
            },
            Control::Answer {
                to: to.clone(),
                answer: NodeAnswer::Connections {
                    node: "1a2b".into(),
                    shards: vec![Listing {
                        shard: 1,
                        conns: vec![conn],
                        more: true,
                        total: 4,
                        orgs: vec![("acme".into(), 4)],
                    }],
                },
            },
            Control::Answer {
                to,
                answer: NodeAnswer::Channels(vec![("org:acme:x".into(), 2)]),
            },
        ];
        for control in all {
            let payload = control.encode("1a2b");
            assert!(Control::is_control(&payload));
            assert_eq!(Control::parse(&payload).unwrap(), ("1a2b".into(), control));
        }
        for bad in [
            &b"1a2b-0-1 5 key"[..],
            b"!",
            b"!{\"from\":\"1a2b\"}",
            b"!{\"from\":\"1a2b\",\"control\":{\"Nope\":{}}}",
            b"!{\"from\":\"1a2b\",\"control\":{\"CloseConn\":{\"shard\":-1}}}",
        ] {
            assert!(Control::parse(bad).is_err(), "{bad:?}");
        }
        assert!(!Control::is_control(b"1a2b-0-1 5 key"));
    }
}
