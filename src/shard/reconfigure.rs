//! A new configuration taking effect on a running shard (a reload): what the shard reads
//! from its config changes at once; connections whose API key was withdrawn are closed.

use std::rc::Rc;

use crate::auth::KeyChange;
use crate::codes::Close;
use crate::config::Config;

use super::{Phase, Shard};

impl Shard {
    /// What new TLS connections are served with (`None`: no TLS listener).
    pub fn tls(&self) -> Option<crate::tls::Acceptor> {
        self.tls.borrow().clone()
    }

    /// Serve connections other shards hand over with `adopt` (the server's, at start).
    pub fn set_adopter(&self, adopt: super::Adopter) {
        *self.adopter.borrow_mut() = Some(adopt);
    }

    /// Serve new TLS connections with `acceptor` (at start, and a reloaded certificate).
    pub fn set_tls(&self, acceptor: Option<crate::tls::Acceptor>) {
        *self.tls.borrow_mut() = acceptor;
    }

    /// The configuration in force.
    pub fn config(&self) -> Rc<Config> {
        self.config.borrow().clone()
    }

    /// Take `config` from now on. The caller (the reload at the edge) has kept what cannot
    /// change live as it was. Connections on an API key that is gone, has another secret or
    /// lost rights are closed with 4401; those whose key gained scopes carry on with them.
    /// Returns how many connections were closed.
    pub fn reconfigure(&self, config: Config) -> usize {
        let changes = self.auth.reload(&config);
        self.bounds.set(config.limits.bounds());
        *self.config.borrow_mut() = Rc::new(config);
        // New rates and their shares now, not at the next second.
        self.rebalance_quotas();
        let mut closed = 0;
        for peer in self.peers() {
            let Some(principal) = peer.principal() else {
                continue;
            };
            match changes.get(&Rc::as_ptr(&principal)) {
                Some(KeyChange::Keep(now)) => self.refresh_session(&peer, now),
                Some(KeyChange::Withdrawn) if peer.phase.get() == Phase::Open => {
                    peer.request_close(Close::Unauthorized, "API key withdrawn", false);
                    closed += 1;
                }
                // Token connections keep their token until it expires or is revoked.
                _ => {}
            }
        }
        closed
    }
}
