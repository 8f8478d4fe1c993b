//! Where a channel lives in Redis, and what its PUB/SUB messages carry.

use crate::dialect::Kind;

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

    /// The shardcast channel of a PUB/SUB channel name, if it is one of ours.
    pub fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix(".ch."))
    }
}

/// Which of `n` Redis instances holds `channel` (client-side sharding): FNV-1a of its name,
/// so that every node, of whatever build, agrees (std's hashers promise no stability).
pub fn redis_for(channel: &str, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in channel.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % n as u64) as usize
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
        assert_eq!(fixed, [0, 2, 0]);
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
