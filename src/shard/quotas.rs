//! The shard's side of the limits over many connections (`crate::quota`): sessions admitted
//! against their org's `max_connections`, messages taken from key, user and org buckets, and
//! the buckets' shares rebalanced every second.

use crate::auth::Principal;
use crate::metrics::Counter;
use crate::quota::{Over, Tenant};
use crate::rate::Rate;

use super::Shard;

impl Shard {
    /// Count `principal`'s new session, unless its org holds its `max_connections` on the
    /// node already (false).
    pub fn admit_session(&self, principal: &Principal) -> bool {
        let max = self.config().limits.org_connections(&principal.org);
        let tenants = Tenant::of(principal);
        let mut census = self.global.census.lock().unwrap_or_else(|e| e.into_inner());
        let admitted = census.open(self.id, self.nshards, &tenants, max);
        drop(census);
        if !admitted {
            self.counters.add(Counter::LimitOrgConnections, 1);
        }
        admitted
    }

    /// `principal`'s session (admitted by [`Shard::admit_session`]) closed.
    pub(super) fn leave_census(&self, principal: &Principal) {
        let tenants = Tenant::of(principal);
        let mut census = self.global.census.lock().unwrap_or_else(|e| e.into_inner());
        census.close(self.id, &tenants);
    }

    /// Take `n` messages from `principal`'s key (or user) and org rates; when over one, how
    /// many milliseconds until they would pass.
    pub fn take_quota(&self, principal: &Principal, n: u64) -> Result<(), u64> {
        if !self.quota_active.get() {
            return Ok(());
        }
        let config = self.config();
        let rates = (
            config.limits.key_rate(),
            config.limits.org_rate(&principal.org),
        );
        let taken =
            self.quotas
                .borrow_mut()
                .take(principal, rates, n, self.now_ms(), |tenant, rate| {
                    self.share_of(tenant, rate)
                });
        taken.map_err(|(over, wait)| {
            let counter = match over {
                Over::Key => Counter::LimitKeyRate,
                Over::Org => Counter::LimitOrgRate,
            };
            self.counters.add(counter, 1);
            wait
        })
    }

    /// This shard's part of `tenant`'s `rate`, by where its sessions are.
    fn share_of(&self, tenant: &Tenant, rate: Rate) -> Rate {
        let census = self.global.census.lock().unwrap_or_else(|e| e.into_inner());
        let held = census.held(self.id, tenant);
        drop(census);
        crate::quota::share(rate, held, self.nshards)
    }

    /// Give the buckets their shares as the sessions now are (and the rates as configured
    /// now), forgetting those full again. Once a second, from the timers.
    pub fn rebalance_quotas(&self) {
        let config = self.config();
        let limits = &config.limits;
        self.quota_active
            .set(limits.key_messages_per_second > 0 || limits.any_org_rate());
        if self.quotas.borrow().is_empty() {
            return;
        }
        let census = self.global.census.lock().unwrap_or_else(|e| e.into_inner());
        let rate_of = |tenant: &Tenant| {
            let rate = match tenant {
                Tenant::Org(org) => limits.org_rate(org),
                Tenant::Key(_) | Tenant::User(..) => limits.key_rate(),
            };
            (rate.per_second > 0)
                .then(|| crate::quota::share(rate, census.held(self.id, tenant), self.nshards))
        };
        self.quotas.borrow_mut().rebalance(self.now_ms(), rate_of);
    }
}
