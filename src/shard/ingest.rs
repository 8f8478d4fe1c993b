//! What a shard knows about the decisions of the channels it owns: recent idempotency keys
//! (answered from memory), the id generator, and the decisions sent to storage and not yet
//! committed (with any retries of the same key waiting for the same outcome).
//!
//! Plain data, no I/O: the shard numbers, stores and answers around it.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::decision::{DecisionId, DedupTable, IdGenerator, Original};
use crate::storage::RecentKey;

use super::Origin;

/// A decision sent to storage under `ack = "durable"`, waiting for its commit.
#[derive(Debug)]
pub(super) struct Unconfirmed {
    /// Its key among the decisions in flight ("org\0key").
    pub pending_key: Rc<str>,
    pub channel: Box<str>,
    pub org: Box<str>,
    pub key: Box<str>,
    pub decision_id: DecisionId,
    pub seq: u64,
    pub origin: Origin,
    /// Later INGESTs of the same key, answered with the same outcome.
    pub waiters: Vec<Origin>,
    /// In a cluster, the enriched decision, published once it is committed (on one node it
    /// waits in the channel's held queue instead).
    pub data: Option<Rc<[u8]>>,
    /// In a cluster, the id of the decision another request stored first with this key:
    /// everyone is answered with that original.
    pub original: Option<Box<str>>,
}

impl Unconfirmed {
    /// Who it answers: the first origin, then the same key's later ones.
    pub fn everyone(&self) -> impl Iterator<Item = &Origin> {
        std::iter::once(&self.origin).chain(&self.waiters)
    }
}

/// What to do with an INGEST.
pub(super) enum Admission {
    /// The key is known: answer with the original.
    Known(Original, Origin),
    /// The same key is being stored right now: the origin waits for that outcome.
    Joined,
    /// A new decision; under `ack = "durable"` it will wait for its commit as `pending_key`.
    New {
        /// Who to answer.
        origin: Origin,
        /// Its key among the decisions in flight (durable only).
        pending_key: Option<Rc<str>>,
    },
}

/// One shard's decisions.
#[derive(Debug)]
pub(super) struct Decisions {
    dedup: DedupTable,
    ids: IdGenerator,
    unconfirmed: HashMap<u64, Unconfirmed>,
    /// "org\0key" of each unconfirmed decision, to its storage token.
    by_key: HashMap<Rc<str>, u64>,
}

impl Decisions {
    /// Empty tables sized by `config`, ids made for `shard`.
    pub fn new(config: &Config, shard: usize) -> Self {
        let dedup = DedupTable::new(
            Duration::from_secs(config.ingest.dedup_window_secs),
            config.ingest.dedup_max_entries,
        );
        Self {
            dedup,
            ids: IdGenerator::new(shard),
            unconfirmed: HashMap::new(),
            by_key: HashMap::new(),
        }
    }

    /// Decide what an INGEST of `key` by `org` is. Only `durable` decisions wait for their
    /// commit, so only they can be met in flight.
    pub fn admit(
        &mut self,
        org: &str,
        key: &str,
        durable: bool,
        origin: Origin,
        now: Instant,
    ) -> Admission {
        if let Some(original) = self.dedup.get(org, key, now) {
            return Admission::Known(original, origin);
        }
        if !durable {
            let pending_key = None;
            return Admission::New {
                origin,
                pending_key,
            };
        }
        let pending_key: Rc<str> = Rc::from(format!("{org}\0{key}"));
        if let Some(first) = self
            .by_key
            .get(&pending_key)
            .and_then(|token| self.unconfirmed.get_mut(token))
        {
            first.waiters.push(origin);
            return Admission::Joined;
        }
        let pending_key = Some(pending_key);
        Admission::New {
            origin,
            pending_key,
        }
    }

    /// A new decision id for a decision made at `ms` (Unix milliseconds).
    pub fn next_id(&mut self, ms: u64) -> DecisionId {
        self.ids.next(ms)
    }

    /// Remember what `key` of `org` resolved to.
    pub fn remember(&mut self, org: &str, key: &str, original: Original, now: Instant) {
        self.dedup.insert(org, key, original, now);
    }

    /// A decision went to storage as request `token`: it waits for the commit.
    pub fn hold(&mut self, token: u64, unconfirmed: Unconfirmed) {
        self.by_key.insert(unconfirmed.pending_key.clone(), token);
        self.unconfirmed.insert(token, unconfirmed);
    }

    /// Storage answered request `token`: the decision that waited for it, if one did (not
    /// under `ack = "received"`).
    pub fn settle(&mut self, token: u64) -> Option<Unconfirmed> {
        let unconfirmed = self.unconfirmed.remove(&token)?;
        self.by_key.remove(&unconfirmed.pending_key);
        Some(unconfirmed)
    }

    /// Decisions sent to storage and not yet answered.
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed.len()
    }

    /// Know the store's recent keys (newest first), so that a retry after a restart is
    /// answered with its original.
    pub fn recover<'a>(
        &mut self,
        recent: impl DoubleEndedIterator<Item = &'a RecentKey>,
        now: Instant,
    ) {
        // Oldest first, so that a full table keeps the newest.
        for recent in recent.rev() {
            if let Some(decision_id) = DecisionId::parse(&recent.id) {
                let original = Original {
                    decision_id,
                    seq: recent.seq,
                };
                self.dedup.insert(&recent.org, &recent.key, original, now);
            }
        }
    }
}
