//! Decisions on a cluster node (docs/CLUSTER.md): committed to PostgreSQL first, without a
//! seq, then numbered and delivered by Redis under their decision id, then acknowledged.
//!
//! The owner shard of the channel on this node takes the decision through three answers,
//! each under a token of its own while the decision waits in `Decisions` (so that the same
//! key sent again meanwhile joins it): the commit ([`Shard::stored_clustered`]), the
//! winner's row when another node stored the key first ([`Shard::found_original`]), and
//! Redis's number ([`Shard::decision_numbered`]). A second publish of the same decision, by
//! this node or another, gets the same seq back from Redis and delivers nothing, which is
//! what makes two nodes racing on one key give one decision.

use std::collections::HashMap;
use std::rc::Rc;

use super::{ingest_ack, storage_unavailable, Origin, Shard};
use crate::codes::ErrorCode;
use crate::decision::{self, Decision, DecisionId, Original};
use crate::dialect::Answer;
use crate::engine::Numbered;
use crate::metrics::Counter;
use crate::storage::{self, reader};

use super::ingest::Unconfirmed;

impl Shard {
    /// An INGEST on a channel this shard owns, on a cluster node: deduplicate it among the
    /// node's own requests, then commit it without a seq.
    pub(super) fn ingest_clustered(
        &self,
        channel: &str,
        decision: &Decision,
        key: &str,
        data: &[u8],
        origin: Origin,
    ) {
        let Some(link) = &self.storage else {
            let why = "decisions in cluster mode need PostgreSQL storage ([storage] url)";
            return self.reply(&origin, not_numbered(key, why));
        };
        let org = decision.org_id.as_str();
        // Always waits for its commit: the number comes after it.
        let Some((origin, pending_key)) = self.admit(org, key, true, origin) else {
            return;
        };
        let Some(pending_key) = pending_key.filter(|_| self.recovered.get()) else {
            return self.reply(&origin, storage_unavailable(key));
        };
        let ms = self.now().unix_ms;
        let decision_id = self.decisions.borrow_mut().next_id(ms);
        let id = decision_id.text();
        let data = decision::enrich(data, id.as_str(), &decision::rfc3339(ms));
        let shared: Rc<[u8]> = Rc::from(&data[..]);
        let record = super::record(channel, decision, key, id.as_str(), 0, data, ms);
        let token = self.token();
        let reply = link.completions.clone();
        let request = storage::Request {
            record,
            token,
            reply,
        };
        if let Err(e) = link.writer.submit(request) {
            tracing::warn!(shard = self.id, "decision refused: {e}");
            return self.reply(&origin, storage_unavailable(key));
        }
        let unconfirmed = Unconfirmed {
            pending_key,
            channel: channel.into(),
            org: org.into(),
            key: key.into(),
            decision_id,
            seq: 0,
            origin,
            waiters: Vec::new(),
            data: Some(shared),
            original: None,
        };
        self.decisions.borrow_mut().hold(token, unconfirmed);
    }

    /// The commit of a clustered decision was answered: number it (or the winner of its
    /// key) through Redis, or tell everyone waiting for it why not.
    pub(super) fn stored_clustered(&self, mut u: Unconfirmed, outcome: storage::Outcome) {
        match outcome {
            storage::Outcome::Stored => {
                // Always there on this path; without it there is nothing to publish.
                let Some(data) = u.data.clone() else {
                    return self.refuse_decision(&u, "the decision's data is missing");
                };
                let id = u.decision_id.text();
                self.publish_decision(u, id.as_str(), data);
            }
            storage::Outcome::Duplicate { id, seq } if seq > 0 => {
                u.original = Some(id.into());
                self.acknowledge(u, Ok(seq), false);
            }
            storage::Outcome::Duplicate { id, .. } => {
                // Stored first by another node (or this one, earlier) and not numbered yet:
                // number it here from its stored row, under its id.
                let Some(link) = &self.storage else {
                    return self.refuse_decision(&u, "the original decision cannot be read");
                };
                u.original = Some(id.into());
                let token = self.token();
                let query = reader::Query::Find {
                    org: u.org.to_string(),
                    key: u.key.to_string(),
                };
                let loaded = link.loaded.clone();
                let reply =
                    Box::new(move |result| drop(loaded.send(super::Loaded { token, result })));
                if link.reader.submit(query, reply).is_err() {
                    return self.refuse_decision(&u, "the store's readers are busy");
                }
                self.decisions.borrow_mut().hold(token, u);
            }
            storage::Outcome::Unavailable(reason) | storage::Outcome::Failed(reason) => {
                tracing::debug!(shard = self.id, "decision not stored: {reason}");
                for to in u.everyone() {
                    self.reply(to, storage_unavailable(&u.key));
                }
            }
        }
    }

    /// The stored row of a key another request stored first was read: number it.
    pub(super) fn found_original(&self, u: Unconfirmed, result: Result<reader::Answer, String>) {
        match result {
            Ok(reader::Answer::Found(Some(original))) if original.seq > 0 => {
                self.acknowledge(u, Ok(original.seq), false)
            }
            Ok(reader::Answer::Found(Some(original))) => {
                let data: Rc<[u8]> = Rc::from(original.data.as_bytes());
                self.publish_decision(u, &original.id, data);
            }
            Ok(other) => {
                tracing::warn!(shard = self.id, "the original decision is gone: {other:?}");
                self.refuse_decision(&u, "the original decision cannot be read");
            }
            Err(e) => {
                tracing::warn!(shard = self.id, "the original decision cannot be read: {e}");
                self.refuse_decision(&u, "the original decision cannot be read");
            }
        }
    }

    /// Redis numbered the decision of `token` (or could not): acknowledge it.
    pub(super) fn decision_numbered(&self, u: Unconfirmed, result: Result<u64, String>) {
        self.acknowledge(u, result, true);
    }

    /// Hand the committed decision `id` to Redis, `u` waiting for the number.
    fn publish_decision(&self, u: Unconfirmed, id: &str, data: Rc<[u8]>) {
        let token = self.token();
        let channel = u.channel.clone();
        self.decisions.borrow_mut().hold(token, u);
        let numbered = self
            .engine
            .borrow_mut()
            .publish_stored(&channel, id, data, token);
        if let Numbered::Later = numbered {
            // An engine that could not even send it has answered already.
            self.deliver_events();
        }
    }

    /// Answer everyone waiting for `u` with its seq, and (when Redis just gave it, `number`)
    /// write the seq to its row. Without a seq (Redis cannot be reached) the ACK says
    /// `"seq":null`: the decision is stored, so it is numbered and delivered when Redis is
    /// back (see [`Shard::look_for_orphans`]), and a retry of its key then gets the seq.
    fn acknowledge(&self, u: Unconfirmed, result: Result<u64, String>, number: bool) {
        let seq = result.unwrap_or_else(|reason| {
            // Not a warning each: an outage would flood the log (health and metrics say it).
            tracing::debug!(
                shard = self.id,
                "decision stored, not numbered yet: {reason}"
            );
            0
        });
        let mine = u.decision_id.text();
        let id = u.original.as_deref().unwrap_or(mine.as_str());
        // One without a seq is not remembered: a retry reads its seq from the store.
        if let Some(decision_id) = DecisionId::parse(id).filter(|_| seq > 0) {
            let original = Original { decision_id, seq };
            let now = self.now().instant;
            self.decisions
                .borrow_mut()
                .remember(&u.org, &u.key, original, now);
        }
        if u.original.is_none() {
            self.counters.add(Counter::DecisionsProcessed, 1);
        }
        if let Some(link) = self.storage.as_ref().filter(|_| number && seq > 0) {
            if let Err(e) = link.writer.number(id.into(), seq) {
                // Left unnumbered in the store: numbered again, to the same seq, later.
                tracing::warn!(shard = self.id, "decision's seq not written: {e}");
            }
        }
        for (n, to) in u.everyone().enumerate() {
            let dedup = u.original.is_some() || n > 0;
            self.counters
                .add(Counter::DecisionsDuplicate, u64::from(dedup));
            self.reply(to, ingest_ack(&u.key, id, dedup, seq));
        }
    }

    /// Tell everyone waiting for `u` that it is not acknowledged, and to send it again (with
    /// the same key: whatever was stored is found).
    fn refuse_decision(&self, u: &Unconfirmed, why: &str) {
        for to in u.everyone() {
            self.reply(to, not_numbered(&u.key, why));
        }
    }
}

/// Decisions committed without a seq that no node is numbering: their node stopped between
/// the commit and Redis's answer. Shard 0 of every node looks for them now and then and
/// numbers them under their ids (two nodes doing it at once give one seq).
#[derive(Debug, Default)]
pub(super) struct Orphans {
    /// When to look next (Unix ms).
    next_look_ms: u64,
    /// The read under way, by token.
    pub looking: Option<u64>,
    /// Those being numbered: decision id by publish token.
    pub numbering: HashMap<u64, Box<str>>,
}

/// Most orphans numbered per look.
const ORPHANS_PER_LOOK: usize = 256;

impl Shard {
    /// On a cluster node's shard 0, every `renumber_after_ms`: read the decisions committed
    /// longer ago than that and never numbered.
    pub(super) fn look_for_orphans(&self) {
        let Some(link) = self.storage.as_ref().filter(|_| self.id == 0) else {
            return;
        };
        if self.engine.borrow().numbers_locally() {
            return;
        }
        let now = self.now().unix_ms;
        let after = self.config().cluster.renumber_after_ms;
        let mut orphans = self.orphans.borrow_mut();
        if orphans.looking.is_some() || !orphans.numbering.is_empty() || now < orphans.next_look_ms
        {
            return;
        }
        orphans.next_look_ms = now + after;
        let token = self.token();
        let query = reader::Query::Unnumbered {
            before_ms: now.saturating_sub(after) as i64,
            limit: ORPHANS_PER_LOOK,
        };
        let loaded = link.loaded.clone();
        let reply = Box::new(move |result| drop(loaded.send(super::Loaded { token, result })));
        if link.reader.submit(query, reply).is_ok() {
            orphans.looking = Some(token);
        }
    }

    /// The orphans were read: number each under its id.
    pub(super) fn found_orphans(&self, result: Result<reader::Answer, String>) {
        self.orphans.borrow_mut().looking = None;
        let records = match result {
            Ok(reader::Answer::Unnumbered(records)) => records,
            Ok(other) => {
                tracing::error!(shard = self.id, "unnumbered decisions read as {other:?}");
                return;
            }
            Err(e) => {
                tracing::warn!(shard = self.id, "cannot look for unnumbered decisions: {e}");
                return;
            }
        };
        for record in records {
            tracing::info!(shard = self.id, id = %record.id, "numbering a decision its node left");
            let token = self.token();
            let id: Box<str> = record.id.as_str().into();
            self.orphans.borrow_mut().numbering.insert(token, id);
            let data: Rc<[u8]> = Rc::from(record.data.as_bytes());
            let numbered =
                self.engine
                    .borrow_mut()
                    .publish_stored(&record.channel, &record.id, data, token);
            if let Numbered::Later = numbered {
                self.deliver_events();
            }
        }
    }

    /// An orphan was numbered (or not: the next look tries again): write its seq.
    pub(super) fn orphan_numbered(&self, id: &str, result: Result<u64, String>) {
        match (result, &self.storage) {
            (Ok(seq), Some(link)) => {
                if let Err(e) = link.writer.number(id.into(), seq) {
                    tracing::warn!(shard = self.id, "decision's seq not written: {e}");
                }
            }
            (Ok(_), None) => {}
            (Err(e), _) => tracing::warn!(shard = self.id, id, "decision not numbered: {e}"),
        }
    }
}

/// `ERROR cluster_unavailable` for decision `key`: retry it with the same key.
fn not_numbered(key: &str, why: &str) -> Answer {
    let mut id = Vec::new();
    crate::json::push_str(&mut id, key);
    Answer::Error {
        code: ErrorCode::ClusterUnavailable,
        message: format!("{why}: send it again with the same idempotencyKey").into(),
        id: Some(id.into()),
        owed: true,
    }
}
