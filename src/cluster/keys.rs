//! Where a channel lives in Redis, and what its PUB/SUB messages carry.

use crate::dialect::{Change, Kind, Member, Status};

use super::ClusterError;

/// The names of every channel's Redis keys under one prefix (several shardcast clusters may
/// share a Redis with different prefixes).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The channel's meta hash: `e` its epoch, `s` its top seq.
    pub fn meta(&self, channel: &str) -> String {
        format!("{}.meta.{channel}", self.prefix)
    }

    /// The channel's history stream (entry ids are seqs).
    pub fn stream(&self, channel: &str) -> String {
        format!("{}.stream.{channel}", self.prefix)
    }

    /// The remembered outcome of a publish with idempotency key `key`.
    pub fn result(&self, channel: &str, key: &str) -> String {
        format!("{}.result.{channel}.{key}", self.prefix)
    }

    /// The PUB/SUB channel the channel's messages go out on.
    pub fn pubsub(&self, channel: &str) -> String {
        format!("{}.ch.{channel}", self.prefix)
    }

    /// The channel's presence keys, in `presence.lua`'s order: members, expiry times, ids
    /// for paging, connections per user.
    pub fn presence(&self, channel: &str) -> [String; 4] {
        ["m", "x", "i", "u"].map(|part| format!("{}.presence.{part}.{channel}", self.prefix))
    }

    /// The lock of exclusive session `key`.
    pub fn session(&self, key: &str) -> String {
        format!("{}.session.{key}", self.prefix)
    }

    /// What a dropped Socket.IO connection left for its client to recover, by pid.
    pub fn record(&self, pid: &str) -> String {
        format!("{}.recovery.{pid}", self.prefix)
    }

    /// The PUB/SUB channel of node `node` (its boot id in hex): kill switches.
    pub fn node(&self, node: &str) -> String {
        format!("{}.node.{node}", self.prefix)
    }

    /// The PUB/SUB channel every node hears: server API commands for every node
    /// ([`super::control::Control`]).
    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// The start of users' keys, for `users.lua` and `publish.lua`, which name them:
    /// `{prefix}.online.{user}`, `{prefix}.queue.{user}`, `{prefix}.queued`,
    /// `{prefix}.queues`.
    pub fn users(&self) -> String {
        format!("{}.", self.prefix)
    }

    /// The prefix, for scripts that name keys themselves.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The shardcast channel of a PUB/SUB channel name, if it is one of ours.
    pub fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix(".ch."))
    }
}

/// Which of `n` Redis instances holds `channel` (client-side sharding): FNV-1a of its name,
/// so that every node, of whatever build, agrees (std's hashers promise no stability). A
/// user's channels (`user:{id}:…`) all go by `user:{id}`, with the user's keys
/// ([`user_redis`]): a message to a user is told or kept in one script call.
pub fn redis_for(channel: &str, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let name = match channel
        .strip_prefix("user:")
        .and_then(|rest| rest.find(':'))
    {
        Some(end) => &channel[..5 + end],
        None => channel,
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in name.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % n as u64) as usize
}

/// Which of `n` Redis instances holds `user`'s keys (and channels).
pub fn user_redis(user: &str, n: usize) -> usize {
    redis_for(&format!("user:{user}:_"), n)
}

/// The kind's one-letter name in Redis.
pub fn kind_code(kind: Kind) -> &'static str {
    match kind {
        Kind::Message => "m",
        Kind::Decision => "d",
    }
}

/// The kind a one-letter name stands for.
pub fn kind_of(code: &[u8]) -> Result<Kind, ClusterError> {
    match code {
        b"m" => Ok(Kind::Message),
        b"d" => Ok(Kind::Decision),
        _ => Err(ClusterError::Protocol(format!(
            "unknown message kind {:?}",
            String::from_utf8_lossy(code)
        ))),
    }
}

/// A member as Redis keeps it and `presence.lua` sends it: `{status}{ulen}:{user}{clen}:{id}
/// {meta}` (status `o`, `a` or `b`; lengths in bytes), so the script can find the user.
pub fn member_bytes(member: &Member) -> Vec<u8> {
    let status = match member.status {
        Status::Online => 'o',
        Status::Away => 'a',
        Status::Busy => 'b',
    };
    let (user, id) = (&member.user, &member.connection_id);
    let mut out = format!("{status}{}:{user}{}:{id}", user.len(), id.len()).into_bytes();
    out.extend_from_slice(&member.meta);
    out
}

/// The member [`member_bytes`] wrote.
pub fn parse_member(bytes: &[u8]) -> Result<Member, ClusterError> {
    let bad = || ClusterError::Protocol("bad presence member".into());
    let (&status, rest) = bytes.split_first().ok_or_else(bad)?;
    let status = match status {
        b'o' => Status::Online,
        b'a' => Status::Away,
        b'b' => Status::Busy,
        _ => return Err(bad()),
    };
    let text = |bytes: &[u8]| -> Result<(Box<str>, usize), ClusterError> {
        let colon = bytes.iter().position(|&b| b == b':').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&bytes[..colon])
            .ok()
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        let field = bytes.get(colon + 1..colon + 1 + len).ok_or_else(bad)?;
        let field = std::str::from_utf8(field).map_err(|_| bad())?;
        Ok((field.into(), colon + 1 + len))
    };
    let (user, used) = text(rest)?;
    let rest = &rest[used..];
    let (connection_id, used) = text(rest)?;
    Ok(Member {
        user,
        connection_id,
        status,
        meta: rest[used..].into(),
    })
}

/// What a channel's PUB/SUB carries: a numbered message, or a presence change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard<'a> {
    /// A message `publish.lua` numbered.
    Message(Envelope<'a>),
    /// `p:{j|l|s}:{node}:{member}` from `presence.lua`.
    Presence {
        /// What happened.
        change: Change,
        /// The node whose connection it was (its boot id in hex), `-` for an expiry.
        node: &'a str,
        /// The member, as [`member_bytes`] wrote it.
        member: &'a [u8],
    },
}

impl<'a> Heard<'a> {
    /// Read a channel's PUB/SUB payload.
    pub fn parse(payload: &'a [u8]) -> Result<Self, ClusterError> {
        let Some(rest) = payload.strip_prefix(b"p:") else {
            return Envelope::parse(payload).map(Heard::Message);
        };
        let bad = || ClusterError::Protocol("bad presence payload".into());
        let mut parts = rest.splitn(3, |&b| b == b':');
        let change = match parts.next().ok_or_else(bad)? {
            b"j" => Change::Join,
            b"l" => Change::Leave,
            b"s" => Change::Status,
            _ => return Err(bad()),
        };
        let node = parts.next().ok_or_else(bad)?;
        let node = std::str::from_utf8(node).map_err(|_| bad())?;
        let member = parts.next().ok_or_else(bad)?;
        Ok(Heard::Presence {
            change,
            node,
            member,
        })
    }
}

/// The node (boot id in hex), shard and connection of a connection id
/// (`{boot}-{shard}-{conn}`, as `Shard::connection_id` makes it).
pub fn connection_place(id: &str) -> Option<(&str, usize, u64)> {
    let mut parts = id.splitn(3, '-');
    let node = parts.next()?;
    let shard = parts.next()?.parse().ok()?;
    let conn = parts.next()?.parse().ok()?;
    Some((node, shard, conn))
}

/// A kill switch, as `session.lua` sends it on a node's channel: `{holder} {unix ms} {key}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    /// The holder's shard on its node.
    pub shard: usize,
    /// Its connection on that shard.
    pub conn: u64,
    /// When the newer connection took the session (Redis's clock, unix ms).
    pub at_ms: u64,
    /// The session key.
    pub key: String,
}

impl Kill {
    /// Read a node channel's payload.
    pub fn parse(payload: &[u8]) -> Result<Self, ClusterError> {
        let bad = || ClusterError::Protocol("bad kill switch".into());
        let text = std::str::from_utf8(payload).map_err(|_| bad())?;
        let mut parts = text.splitn(3, ' ');
        let holder = parts.next().ok_or_else(bad)?;
        let at_ms = parts.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let key = parts.next().ok_or_else(bad)?.to_owned();
        let (_, shard, conn) = connection_place(holder).ok_or_else(bad)?;
        Ok(Self {
            shard,
            conn,
            at_ms,
            key,
        })
    }
}

/// A message as `publish.lua` sends it on PUB/SUB: `seq:epoch:kind:data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Its seq on the channel.
    pub seq: u64,
    /// The channel's epoch when it was numbered.
    pub epoch: &'a str,
    /// What it is.
    pub kind: Kind,
    /// The message's data, as published.
    pub data: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Read a PUB/SUB payload.
    pub fn parse(payload: &'a [u8]) -> Result<Self, ClusterError> {
        let bad = || {
            ClusterError::Protocol(format!(
                "bad PUB/SUB payload: {:?}",
                String::from_utf8_lossy(&payload[..payload.len().min(64)])
            ))
        };
        let mut parts = payload.splitn(4, |&b| b == b':');
        let seq = parts.next().ok_or_else(bad)?;
        let epoch = parts.next().ok_or_else(bad)?;
        let kind = parts.next().ok_or_else(bad)?;
        let data = parts.next().ok_or_else(bad)?;
        let seq = std::str::from_utf8(seq)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        let epoch = std::str::from_utf8(epoch).map_err(|_| bad())?;
        Ok(Self {
            seq,
            epoch,
            kind: kind_of(kind)?,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_channels_apart_and_pubsub_names_map_back() {
        let keys = Keys::new("sc");
        assert_eq!(keys.meta("org:a:x"), "sc.meta.org:a:x");
        assert_eq!(keys.stream("org:a:x"), "sc.stream.org:a:x");
        assert_eq!(keys.result("org:a:x", "k1"), "sc.result.org:a:x.k1");
        assert_eq!(keys.channel_of(&keys.pubsub("org:a:x")), Some("org:a:x"));
        assert_eq!(keys.channel_of("other.ch.org:a:x"), None);
        assert_eq!(keys.channel_of("sc.meta.org:a:x"), None);
    }

    #[test]
    fn channels_spread_over_redis_instances_the_same_way_everywhere() {
        // Fixed values: a node of another build must send a channel to the same Redis.
        assert_eq!(redis_for("org:acme:decisions", 1), 0);
        let fixed: Vec<usize> = [
            "org:acme:decisions",
            "org:acme:usage",
            "user:42:notifications",
        ]
        .iter()
        .map(|c| redis_for(c, 3))
        .collect();
        assert_eq!(fixed, [0, 2, 2]);
        for n in [2, 3, 5] {
            let user = user_redis("42", n);
            assert_eq!(redis_for("user:42:notifications", n), user);
            assert_eq!(redis_for("user:42:usage", n), user);
        }
        for n in [2, 3, 5] {
            let mut counts = vec![0; n];
            for i in 0..3000 {
                counts[redis_for(&format!("org:o{i}:decisions"), n)] += 1;
            }
            let even = 3000 / n;
            assert!(
                counts
                    .iter()
                    .all(|&c| c > even * 8 / 10 && c < even * 12 / 10),
                "{n}: {counts:?}"
            );
        }
    }

    #[test]
    fn envelopes_keep_colons_in_the_data() {
        let e = Envelope::parse(b"42:ab12:d:{\"a\":\"b:c\"}").unwrap();
        assert_eq!(e.seq, 42);
        assert_eq!(e.epoch, "ab12");
        assert_eq!(e.kind, Kind::Decision);
        assert_eq!(e.data, b"{\"a\":\"b:c\"}");
    }

    #[test]
    fn members_kill_switches_and_presence_payloads_read_back() {
        let member = Member {
            user: "ann:1".into(),
            connection_id: "18c-1-7".into(),
            status: Status::Away,
            meta: br#"{"a":"b:c"}"#.to_vec().into(),
        };
        let bytes = member_bytes(&member);
        assert_eq!(bytes, br#"a5:ann:17:18c-1-7{"a":"b:c"}"#);
        assert_eq!(parse_member(&bytes).unwrap(), member);
        let mut payload = b"p:s:18c:".to_vec();
        payload.extend_from_slice(&bytes);
        let heard = Heard::parse(&payload).unwrap();
        let Heard::Presence {
            change,
            node,
            member: m,
        } = heard
        else {
            panic!("{heard:?}");
        };
        assert_eq!((change, node, m), (Change::Status, "18c", &bytes[..]));
        assert!(matches!(Heard::parse(b"3:e:m:{}"), Ok(Heard::Message(_))));
        for bad in [&b"p:q:1:o1:a1:b"[..], b"p:j", b"p:j:1"] {
            assert!(Heard::parse(bad).is_err(), "{bad:?}");
        }
        for bad in [&b""[..], b"o", b"x1:a1:b", b"o1:a9:b", b"o9:a", b"o1:a-1:b"] {
            assert!(parse_member(bad).is_err(), "{bad:?}");
        }
        let kill = Kill::parse(b"18c-1-7 1700000000000 acme\0ann\0").unwrap();
        assert_eq!(
            (kill.shard, kill.conn, kill.at_ms),
            (1, 7, 1_700_000_000_000)
        );
        assert_eq!(kill.key, "acme\0ann\0");
        assert!(Kill::parse(b"18c 1 k").is_err());
    }

    #[test]
    fn malformed_envelopes_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"1",
            b"1:e",
            b"1:e:m",
            b"x:e:m:{}",
            b"1:e:q:{}",
            b"-1:e:m:{}",
        ] {
            assert!(Envelope::parse(bad).is_err(), "{:?}", bad);
        }
    }
}
