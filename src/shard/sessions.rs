//! Exclusive sessions: one connection at a time per session key (the credential's user and
//! the URL's `?session=NAME`). The key's owner shard keeps who holds it; a connection of an
//! exclusive credential claims it there before it is READY, and the owner, which sees claims
//! one at a time, grants it, replacing the holder (`[sessions] policy = "replace"`: the
//! holder is told `session_replaced` and closed with 4408) or refusing the newcomer
//! ("reject": closed with 4402). Two claims at the same moment: one holder, whatever the
//! order.
//!
//! On a cluster node this is the node's own: a lock in Redis is not built yet
//! (docs/CLUSTER.md).

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

    /// `place` is gone: `key` is free, if `place` held it.
    fn release(&mut self, key: &str, place: Place) {
        if self.0.get(key) == Some(&place) {
            self.0.remove(key);
        }
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
        let place = (self.id as u16, conn);
        let owner = owner_of(&key, self.nshards);
        if owner == self.id {
            return self.session_released(&key, place);
        }
        self.route(owner, MeshMsg::SessionRelease { key, place });
    }

    /// On the key's owner: a claim.
    pub(super) fn session_claimed(&self, key: &str, place: Place) {
        let policy = self.config.sessions.policy;
        let told = self.holders.borrow_mut().claim(key, place, policy);
        for (to, outcome) in told {
            match outcome {
                Outcome::Replaced => self.counters.add(Counter::SessionsReplaced, 1),
                Outcome::Refused => self.counters.add(Counter::SessionsRefused, 1),
                Outcome::Granted => {}
            }
            let (shard, conn) = (usize::from(to.0), to.1);
            if shard == self.id {
                self.session_outcome(conn, outcome);
            } else {
                self.route(shard, MeshMsg::SessionOutcome { conn, outcome });
            }
        }
    }

    /// On the key's owner: a holder left.
    pub(super) fn session_released(&self, key: &str, place: Place) {
        self.holders.borrow_mut().release(key, place);
    }

    /// On the connection's shard: what its claim (or a later one) decided.
    pub(super) fn session_outcome(&self, conn: u64, outcome: Outcome) {
        let Some(peer) = self.peer(conn) else {
            return; // Gone meanwhile: its release follows its claim to the owner.
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
        holders.release("k", (0, 1));
        assert_eq!(
            holders.claim("k", (0, 3), SessionPolicy::Reject),
            [((0, 3), Outcome::Refused)]
        );
        holders.release("k", (1, 2));
        assert_eq!(
            holders.claim("k", (0, 3), SessionPolicy::Reject),
            [((0, 3), Outcome::Granted)]
        );
    }
}
