//! AI-governance decisions: validation, ids, timestamps and the idempotency table.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use simd_json::prelude::*;
use simd_json::tape::Value;

use crate::json;

/// The only decision schema accepted.
pub const SCHEMA: &str = "decision.v1";
/// Accepted `direction` values.
pub const DIRECTIONS: [&str; 2] = ["precheck", "postcheck"];
/// Accepted `decision` values.
pub const OUTCOMES: [&str; 5] = ["allow", "deny", "confirm", "redact", "block"];

/// The checked fields of a decision (the rest of `data` travels as raw JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Organization the decision belongs to.
    pub org_id: String,
    /// precheck or postcheck.
    pub direction: String,
    /// The outcome (allow, deny, …).
    pub decision: String,
    /// Hash of the governed payload.
    pub payload_hash: String,
    /// The tool governed, when given.
    pub tool: Option<String>,
    /// Scope, when given.
    pub scope: Option<String>,
    /// Correlation id, when given.
    pub correlation_id: Option<String>,
    /// How long the decision took, when given.
    pub latency_ms: Option<f64>,
    /// Tags as a JSON array, when given.
    pub tags: Option<String>,
}

impl Decision {
    /// Check a decision's `data` object; the error names the offending field.
    pub fn from_value(data: Value<'_, '_>) -> Result<Self, String> {
        if data.as_object().is_none() {
            return Err("\"data\" must be an object".into());
        }
        let string = |name: &str| -> Result<Option<String>, String> {
            match data.get(name) {
                None => Ok(None),
                Some(v) => match v.as_str() {
                    Some(s) => Ok(Some(s.to_string())),
                    None => Err(format!("data.{name} must be a string")),
                },
            }
        };
        let required = |name: &str| -> Result<String, String> {
            match string(name)? {
                Some(s) if !s.is_empty() => Ok(s),
                _ => Err(format!("data.{name} is required")),
            }
        };
        let org_id = required("orgId")?;
        let direction = required("direction")?;
        if !DIRECTIONS.contains(&direction.as_str()) {
            return Err(format!("data.direction must be one of {DIRECTIONS:?}"));
        }
        let decision = required("decision")?;
        if !OUTCOMES.contains(&decision.as_str()) {
            return Err(format!("data.decision must be one of {OUTCOMES:?}"));
        }
        let payload_hash = required("payloadHash")?;
        let (tool, scope) = (string("tool")?, string("scope")?);
        let correlation_id = string("correlationId")?;
        let latency_ms = match data.get("latencyMs") {
            None => None,
            Some(latency) => match latency.cast_f64() {
                Some(l) if l >= 0.0 => Some(l),
                _ => return Err("data.latencyMs must be a non-negative number".into()),
            },
        };
        let tags = match data.get("tags") {
            None => None,
            Some(tags) => {
                let Some(list) = tags.as_array().filter(|t| t.iter().all(|t| t.is_str())) else {
                    return Err("data.tags must be an array of strings".into());
                };
                let mut json = b"[".to_vec();
                for (i, tag) in list.iter().enumerate() {
                    if i > 0 {
                        json.push(b',');
                    }
                    crate::json::push_str(&mut json, tag.as_str().unwrap_or_default());
                }
                json.push(b']');
                Some(String::from_utf8(json).unwrap_or_default())
            }
        };
        Ok(Decision {
            org_id,
            direction,
            decision,
            payload_hash,
            tool,
            scope,
            correlation_id,
            latency_ms,
            tags,
        })
    }
}

/// Makes decision ids: `dec_` + 26 Crockford base32 characters (48-bit milliseconds, then 80
/// bits from a per-shard generator), so ids sort by time and do not collide across shards or
/// restarts.
#[derive(Debug)]
pub struct IdGenerator {
    state: u64,
    /// The last id made: ids of one millisecond count up from it (monotonic ULIDs), so one
    /// shard's decisions sort in the order they were made.
    last: u128,
}

impl IdGenerator {
    /// A generator seeded from the clock, the shard and the process.
    pub fn new(shard: usize) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = nanos ^ ((shard as u64) << 56) ^ (u64::from(std::process::id()) << 32);
        Self {
            state: seed | 1,
            last: 0,
        }
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64: fast, and every seed gives a full-period sequence.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A new id for a decision made at `unix_ms`.
    pub fn next(&mut self, unix_ms: u64) -> DecisionId {
        let time = u128::from(unix_ms & 0xFFFF_FFFF_FFFF) << 80;
        let same_ms = self.last >> 80 == time >> 80;
        // The random part leaves headroom above it (top bit clear), so counting up within a
        // millisecond never carries into the time.
        self.last = if same_ms && self.last & ((1 << 80) - 1) < (1 << 80) - 1 {
            self.last + 1
        } else {
            let random = (u128::from(self.next_u64()) << 16) | u128::from(self.next_u64() >> 48);
            time | (random & ((1 << 79) - 1))
        };
        DecisionId(self.last)
    }
}

/// A decision id as a number (16 bytes, no allocation); [`DecisionId::text`] spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionId(u128);

/// A decision id spelled out: `dec_` and 26 Crockford base32 characters.
#[derive(Debug, Clone, Copy)]
pub struct DecisionIdText([u8; 30]);

impl DecisionId {
    /// The id as text.
    pub fn text(self) -> DecisionIdText {
        const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let mut out = *b"dec_00000000000000000000000000";
        for (i, byte) in out[4..].iter_mut().enumerate() {
            *byte = ALPHABET[((self.0 >> ((25 - i) * 5)) & 31) as usize];
        }
        DecisionIdText(out)
    }
}

impl DecisionId {
    /// Read an id back from its text (as stored).
    pub fn parse(text: &str) -> Option<Self> {
        const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let digits = text.strip_prefix("dec_").filter(|d| d.len() == 26)?;
        let mut value: u128 = 0;
        for c in digits.bytes() {
            let digit = ALPHABET.iter().position(|&a| a == c)?;
            value = (value << 5) | digit as u128;
        }
        Some(Self(value))
    }
}

impl DecisionIdText {
    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII from ALPHABET and the "dec_" prefix is ever written.
        std::str::from_utf8(&self.0).unwrap_or("dec_")
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    crate::clock::unix_ms()
}

/// RFC 3339 UTC timestamp with milliseconds, e.g. `2024-01-01T00:00:00.000Z`.
pub fn rfc3339(unix_ms: u64) -> String {
    let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.3}"),
        // Past 9999-12-30: no clock reads that, and no client could parse more.
        Err(_) => "9999-12-30T22:00:00.000Z".into(),
    }
}

/// The decision as fanned out: the client's `data` members, byte for byte, after the server's
/// `id` and `timestamp` (client-sent `id`/`timestamp` members are replaced, not duplicated).
pub fn enrich(data: &[u8], decision_id: &str, timestamp: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 80);
    out.extend_from_slice(br#"{"id":"#);
    json::push_str(&mut out, decision_id);
    out.extend_from_slice(br#","timestamp":"#);
    json::push_str(&mut out, timestamp);
    for (key, value) in json::object_members(data).unwrap_or_default() {
        // Compared decoded: "\u0069d" is "id" to every parser downstream.
        let name = &data[key.clone()];
        if json::key_is(name, "id") || json::key_is(name, "timestamp") {
            continue;
        }
        out.push(b',');
        out.extend_from_slice(&data[key.start - 1..key.end + 1]);
        out.push(b':');
        out.extend_from_slice(&data[value]);
    }
    out.push(b'}');
    out
}

/// What an idempotency key resolved to the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Original {
    /// The decision id given then.
    pub decision_id: DecisionId,
    /// The channel sequence number given then.
    pub seq: u64,
}

/// Remembers idempotency keys per org (or per channel: any namespace) for a time window, up to a number of entries (oldest
/// forgotten first). One per shard: every channel of an org is owned by one shard.
///
/// Each remembered key is one allocation (`org`, a NUL, `key`), shared by the map and the
/// expiry queue; lookups compose the key in a reusable buffer and allocate nothing.
///
/// Growing must never stall the shard. One map of every key rehashes all of them, into a
/// table twice the size, inside one insert: at 250,000 keys that insert took 96 ms on these
/// VMs, where each first-touched page is dear. So the keys are spread over [`SEGMENTS`] maps,
/// unevenly: segment `i` takes a share of the keys proportional to 2^(i/64), so that, with
/// the maps' power-of-two sizes, their growths fall at evenly spaced points of each doubling
/// of the whole instead of all together (each moves under 3% of the keys). The expiry queue,
/// which fills front to back, is allocated whole at the start (its pages are touched, so
/// count in RSS, only as keys arrive).
#[derive(Debug)]
pub struct DedupTable<V = Original> {
    segments: Vec<HashMap<Rc<str>, V>>,
    /// Picks a key's segment (keyed like the maps, so that no client can aim at one).
    pick: RandomState,
    /// Segment `i` takes the hashes below `bounds[i]` (and at or above the one before).
    bounds: Vec<u64>,
    len: usize,
    order: VecDeque<(Instant, Rc<str>)>,
    key: String,
    window: Duration,
    max_entries: usize,
}

/// How many maps the keys are spread over.
const SEGMENTS: usize = 64;

/// The expiry queue is allocated whole up to this many keys; a larger bound grows it.
const PREALLOCATED: usize = 1 << 22;

impl<V: Copy> DedupTable<V> {
    /// An empty table.
    pub fn new(window: Duration, max_entries: usize) -> Self {
        let max_entries = max_entries.max(1);
        let weight = |i: usize| (i as f64 / SEGMENTS as f64).exp2();
        let total: f64 = (0..SEGMENTS).map(weight).sum();
        let mut sum = 0.0;
        let bounds = (0..SEGMENTS)
            .map(|i| {
                sum += weight(i);
                if i + 1 == SEGMENTS {
                    u64::MAX
                } else {
                    (sum / total * u64::MAX as f64) as u64
                }
            })
            .collect();
        Self {
            segments: (0..SEGMENTS).map(|_| HashMap::new()).collect(),
            pick: RandomState::new(),
            bounds,
            len: 0,
            order: VecDeque::with_capacity(max_entries.min(PREALLOCATED)),
            key: String::new(),
            window,
            max_entries,
        }
    }

    fn compose(&mut self, org: &str, key: &str) {
        self.key.clear();
        self.key.push_str(org);
        self.key.push('\0');
        self.key.push_str(key);
    }

    /// The segment that holds `key`.
    fn segment(&self, key: &str) -> usize {
        let hash = self.pick.hash_one(key);
        self.bounds
            .partition_point(|&bound| bound <= hash)
            .min(SEGMENTS - 1)
    }

    fn remove(&mut self, key: &Rc<str>) {
        let segment = self.segment(key);
        if self.segments[segment].remove(key).is_some() {
            self.len -= 1;
        }
    }

    /// The original outcome of `(org, key)`, if it is still remembered.
    pub fn get(&mut self, org: &str, key: &str, now: Instant) -> Option<V> {
        self.expire(now);
        self.compose(org, key);
        let segment = self.segment(&self.key);
        self.segments[segment].get(self.key.as_str()).copied()
    }

    /// Remember `(org, key)`.
    pub fn insert(&mut self, org: &str, key: &str, original: V, now: Instant) {
        self.expire(now);
        while self.len >= self.max_entries {
            match self.order.pop_front() {
                Some((_, old)) => self.remove(&old),
                None => break,
            }
        }
        self.compose(org, key);
        let shared: Rc<str> = Rc::from(self.key.as_str());
        let segment = self.segment(&shared);
        self.order.push_back((now, shared.clone()));
        if self.segments[segment].insert(shared, original).is_none() {
            self.len += 1;
        }
    }

    /// Number of remembered keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_704_067_199_999), "2023-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-30T22:00:00.000Z");
    }

    #[test]
    fn ids_are_unique_and_time_ordered() {
        let mut gen = IdGenerator::new(0);
        let a = gen.next(1_000).text().as_str().to_string();
        let b = gen.next(1_000).text().as_str().to_string();
        let c = gen.next(2_000).text().as_str().to_string();
        assert!(b > a, "ids of one millisecond count up");
        assert!(a.starts_with("dec_") && a.len() == 30);
        assert!(c > a && c > b);
        let mut ids: Vec<String> = (0..100)
            .map(|_| gen.next(2_000).text().as_str().to_string())
            .collect();
        let made = ids.clone();
        ids.sort();
        ids.dedup();
        assert_eq!(ids, made);
    }

    #[test]
    fn enrich_keeps_client_members_and_replaces_id() {
        let data = br#"{ "orgId":"acme", "id":"mine", "tags":["a b"] }"#;
        let out = enrich(data, "dec_1", "2024-01-01T00:00:00.000Z");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":"dec_1","timestamp":"2024-01-01T00:00:00.000Z","orgId":"acme","tags":["a b"]}"#
        );
    }

    #[test]
    fn dedup_forgets_after_window_and_capacity() {
        let t0 = Instant::now();
        let mut table = DedupTable::new(Duration::from_secs(10), 2);
        let mut ids = IdGenerator::new(0);
        let mut original = |n: u64| Original {
            decision_id: ids.next(n),
            seq: n,
        };
        table.insert("acme", "k1", original(1), t0);
        assert_eq!(table.get("acme", "k1", t0).unwrap().seq, 1);
        assert!(table.get("other", "k1", t0).is_none(), "keys are per org");
        table.insert("acme", "k2", original(2), t0);
        table.insert("acme", "k3", original(3), t0);
        assert!(
            table.get("acme", "k1", t0).is_none(),
            "oldest evicted at capacity"
        );
        assert_eq!(table.len(), 2);
        assert!(table
            .get("acme", "k3", t0 + Duration::from_secs(11))
            .is_none());
        assert!(table.is_empty());
    }

    #[test]
    fn dedup_keys_are_spread_so_that_segments_grow_one_at_a_time() {
        let now = Instant::now();
        let mut table = DedupTable::new(Duration::from_secs(10), 100_000);
        let original = Original {
            decision_id: IdGenerator::new(0).next(0),
            seq: 1,
        };
        for i in 0..50_000 {
            table.insert("org", &format!("key-{i}"), original, now);
        }
        // A retry of a remembered key is not a second entry.
        table.insert("org", "key-7", original, now);
        assert_eq!(table.len(), 50_000);
        assert!(table.get("org", "key-49999", now).is_some());
        let sizes: Vec<usize> = table.segments.iter().map(HashMap::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 50_000);
        // Shares from 1/92 to 2/92 of the keys (2^(i/64) over their sum), rising with i.
        let (first, last) = (sizes[0] as f64, sizes[SEGMENTS - 1] as f64);
        assert!((1.7..2.3).contains(&(last / first)), "{sizes:?}");
        assert!(sizes.iter().all(|&n| n < 50_000 * 3 / 100), "{sizes:?}");
    }

    #[test]
    fn decision_fields_are_checked() {
        let check = |json: &str| {
            let mut bytes = json.as_bytes().to_vec();
            let tape = simd_json::to_tape(&mut bytes).unwrap();
            Decision::from_value(tape.as_value())
        };
        let ok = check(
            r#"{"orgId":"a","direction":"postcheck","decision":"deny","payloadHash":"h","latencyMs":3,"tags":["x"]}"#,
        );
        assert_eq!(ok.unwrap().decision, "deny");
        for (json, field) in [
            (
                r#"{"direction":"precheck","decision":"allow","payloadHash":"h"}"#,
                "orgId",
            ),
            (
                r#"{"orgId":"a","direction":"precheck","decision":"maybe","payloadHash":"h"}"#,
                "decision",
            ),
            (
                r#"{"orgId":"a","direction":"precheck","decision":"allow"}"#,
                "payloadHash",
            ),
            (
                r#"{"orgId":"a","direction":"precheck","decision":"allow","payloadHash":"h","latencyMs":-1}"#,
                "latencyMs",
            ),
            (
                r#"{"orgId":"a","direction":"precheck","decision":"allow","payloadHash":"h","tags":[1]}"#,
                "tags",
            ),
        ] {
            let err = check(json).unwrap_err();
            assert!(err.contains(field), "{json}: {err}");
        }
    }
}
