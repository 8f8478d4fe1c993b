//! Exclusive sessions: one connection at a time per session key (the credential's user and
//! the URL's `?session=NAME`). The key's owner shard keeps who holds it; a connection of an
//! exclusive credential claims it there before it is READY, and the owner, which sees claims
//! one at a time, grants it, replacing the holder (`[sessions] policy = "replace"`: the
//! holder is told `session_replaced` and closed with 4408) or refusing the newcomer
//! ("reject": closed with 4402). Two claims at the same moment: one holder, whatever the
//! order.
//!
//! In a cluster the owner asks the engine first: a lock per session key in Redis, held by
//! the connection's id and refreshed by its node, decides between nodes, and a holder on
//! another node is told to go by a kill switch on its node's channel
//! ([`crate::engine::Event::Kill`]). The owner's holders are then the node's share of them;
//! while Redis cannot be asked, they decide alone (exclusive on the node only).

use std::collections::HashMap;

use super::presence::Place;
use super::{owner_of, MeshMsg, Peer, Shard};
use crate::auth::Principal;
use crate::codes::Close;
use crate::config::SessionPolicy;
use crate::dialect::Reply;
use crate::metrics::Counter;

/// Longest `?session=NAME`.
pub const MAX_SESSION_NAME: usize = 64;

/// Who holds each session key this shard owns.
#[derive(Debug, Default)]
pub(super) struct Holders(HashMap<Box<str>, Place>);

/// How a claim ended for the connection at its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It holds the session: READY.
    Granted,
    /// A newer connection took it.
    Replaced,
    /// Another connection holds it (policy "reject").
    Refused,
}

/// The session key of `principal`'s connection named `name`.
pub fn session_key(principal: &Principal, name: &str) -> Box<str> {
    let user = principal.user.as_deref().or(principal.key_id.as_deref());
    format!(
        "{}\u{0}{}\u{0}{name}",
        principal.org,
        user.unwrap_or_default()
    )
    .into()
}

impl Holders {
    /// `place` claims `key` under `policy`: who is told what.
    fn claim(&mut self, key: &str, place: Place, policy: SessionPolicy) -> Vec<(Place, Outcome)> {
        match self.0.get(key).copied() {
            Some(held) if held != place && policy == SessionPolicy::Reject => {
                vec![(place, Outcome::Refused)]
            }
            Some(held) if held != place => {
                self.0.insert(key.into(), place);
                vec![(held, Outcome::Replaced), (place, Outcome::Granted)]
            }
            _ => {
                self.0.insert(key.into(), place);
                vec![(place, Outcome::Granted)]
            }
        }
    }

    /// `place` is gone: `key` is free, if `place` held it (then true).
    fn release(&mut self, key: &str, place: Place) -> bool {
        let held = self.0.get(key) == Some(&place);
        if held {
            self.0.remove(key);
        }
        held
    }
}

impl Shard {
    /// `peer` opens exclusive session `key`: READY once its owner grants it.
    pub fn claim_session(&self, peer: &Peer, key: Box<str>) {
        self.session_keys.borrow_mut().insert(peer.id, key.clone());
        let place = (self.id as u16, peer.id);
        // Placed as a channel name is: the same answer on every shard.
        let owner = owner_of(&key, self.nshards);
        if owner == self.id {
            return self.session_claimed(&key, place);
        }
        self.route(owner, MeshMsg::SessionClaim { key, place });
    }

    /// Connection `conn` is gone: the session it held, if any, is free.
    pub(super) fn release_session(&self, conn: u64) {
        let Some(key) = self.session_keys.borrow_mut().remove(&conn) else {
            return;
        };
        self.send_release(key, conn);
    }

    /// Tell `key`'s owner that connection `conn` of this shard no longer holds it.
    fn send_release(&self, key: Box<str>, conn: u64) {
        let place = (self.id as u16, conn);
        let owner = owner_of(&key, self.nshards);
        if owner == self.id {
            return self.session_released(&key, place);
        }
        self.route(owner, MeshMsg::SessionRelease { key, place });
    }

    /// On the key's owner: a claim, asked of the engine first (in a cluster).
    pub(super) fn session_claimed(&self, key: &str, place: Place) {
        let policy = self.config().sessions.policy;
        let (token, holder) = (self.token(), self.place_id(place));
        let replace = policy == SessionPolicy::Replace;
        if self.engine.borrow_mut().claim(key, &holder, replace, token) {
            self.claims.borrow_mut().insert(token, (key.into(), place));
            return;
        }
        self.decide(key, place, policy);
    }

    /// The engine's answer to the claim of `token`: granted across the cluster (the holders
    /// here are replaced too), refused, or not known (Redis could not be asked: the node's
    /// holders decide).
    pub(super) fn claim_answered(&self, token: u64, result: Result<bool, String>) {
        let Some((key, place)) = self.claims.borrow_mut().remove(&token) else {
            return;
        };
        match result {
            Ok(true) => self.decide(&key, place, SessionPolicy::Replace),
            Ok(false) => self.tell_outcomes(&key, vec![(place, Outcome::Refused)]),
            Err(e) => {
                tracing::warn!(shard = self.id, "session decided on this node only: {e}");
                self.decide(&key, place, self.config().sessions.policy);
            }
        }
    }

    /// Decide `place`'s claim of `key` among this node's holders.
    fn decide(&self, key: &str, place: Place, policy: SessionPolicy) {
        let told = self.holders.borrow_mut().claim(key, place, policy);
        self.tell_outcomes(key, told);
    }

    fn tell_outcomes(&self, key: &str, told: Vec<(Place, Outcome)>) {
        for (to, outcome) in told {
            match outcome {
                Outcome::Replaced => self.counters.add(Counter::SessionsReplaced, 1),
                Outcome::Refused => self.counters.add(Counter::SessionsRefused, 1),
                Outcome::Granted => {}
            }
            let (shard, conn) = (usize::from(to.0), to.1);
            if shard == self.id {
                self.session_outcome(key, conn, outcome);
            } else {
                let key = key.into();
                self.route(shard, MeshMsg::SessionOutcome { key, conn, outcome });
            }
        }
    }

    /// On the key's owner: a holder left.
    pub(super) fn session_released(&self, key: &str, place: Place) {
        if self.holders.borrow_mut().release(key, place) {
            let holder = self.place_id(place);
            self.engine.borrow_mut().release(key, &holder);
        }
    }

    /// On the keys' owner: the engine found these locks held by others (taken while this
    /// node could not hear of it): their holders here go.
    pub(super) fn locks_lost(&self, locks: Vec<(String, String)>) {
        for (key, holder) in locks {
            let held = self.holders.borrow().0.get(key.as_str()).copied();
            if let Some(place) = held.filter(|&p| self.place_id(p) == holder) {
                self.holders.borrow_mut().release(&key, place);
                self.tell_outcomes(&key, vec![(place, Outcome::Replaced)]);
            }
        }
    }

    /// On the connection's shard: a newer connection took `key`, held by connection `conn`,
    /// at `at_ms` (unix ms): it goes, unless it went already.
    pub(super) fn killed(&self, conn: u64, key: &str, at_ms: u64) {
        if self.session_keys.borrow().get(&conn).map(|k| &**k) != Some(key) {
            return;
        }
        let waited = self.now().unix_ms.saturating_sub(at_ms);
        self.counters
            .record_kill(std::time::Duration::from_millis(waited));
        self.counters.add(Counter::SessionsReplaced, 1);
        self.session_outcome(key, conn, Outcome::Replaced);
        // The owner's holders forget it (Redis has the newer one already).
        self.send_release(key.into(), conn);
    }

    /// Keep the locks of the sessions this shard holds (in a cluster, Redis frees a lock its
    /// node stops refreshing).
    pub(super) fn refresh_sessions(&self) {
        let locks: Vec<(String, String)> = self
            .holders
            .borrow()
            .0
            .iter()
            .map(|(key, &place)| (key.to_string(), self.place_id(place)))
            .collect();
        if !locks.is_empty() {
            self.engine.borrow_mut().refresh_locks(locks);
        }
    }

    /// On the connection's shard: what its claim of `key` (or a later one) decided.
    pub(super) fn session_outcome(&self, key: &str, conn: u64, outcome: Outcome) {
        let claiming = self
            .session_keys
            .borrow()
            .get(&conn)
            .is_some_and(|k| &**k == key);
        let peer = self.peer(conn).filter(|_| claiming);
        let Some(peer) = peer else {
            if outcome == Outcome::Granted {
                // Gone (or replaced) while its claim was being decided in Redis: its
                // release may have reached the owner first, so it is sent again.
                self.send_release(key.into(), conn);
            }
            return;
        };
        match outcome {
            Outcome::Granted => {
                let id = self.connection_id(conn);
                let ready = Reply::Ready {
                    connection_id: &id,
                    shard: self.id,
                };
                self.answer(&peer, &ready);
            }
            Outcome::Replaced => {
                // No longer the holder: its close must not free the newer one's session.
                self.session_keys.borrow_mut().remove(&conn);
                self.answer(&peer, &Reply::SessionReplaced);
                peer.request_close(Close::SessionReplaced, "session replaced", false);
            }
            Outcome::Refused => {
                self.session_keys.borrow_mut().remove(&conn);
                peer.request_close(Close::SessionConflict, "session conflict", false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_claim_replaces_or_the_first_stays() {
        let mut holders = Holders::default();
        let replace = SessionPolicy::Replace;
        assert_eq!(
            holders.claim("k", (0, 1), replace),
            [((0, 1), Outcome::Granted)]
        );
        assert_eq!(
            holders.claim("k", (1, 2), replace),
            [((0, 1), Outcome::Replaced), ((1, 2), Outcome::Granted)]
        );
        // The replaced one's release frees nothing; the holder's does.
        assert!(!holders.release("k", (0, 1)));
        assert_eq!(
            holders.claim("k", (0, 3), SessionPolicy::Reject),
            [((0, 3), Outcome::Refused)]
        );
        assert!(holders.release("k", (1, 2)));
        assert_eq!(
            holders.claim("k", (0, 3), SessionPolicy::Reject),
            [((0, 3), Outcome::Granted)]
        );
    }
}
