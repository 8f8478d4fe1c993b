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
        let (held, nodes) = (census.held(self.id, tenant), census.nodes());
        drop(census);
        crate::quota::share(rate, held, self.nshards, nodes)
    }

    /// Give the buckets their shares as the sessions now are (and the rates as configured
    /// now), forgetting those full again. Once a second, from the timers.
    pub fn rebalance_quotas(&self) {
        let config = self.config();
        let limits = &config.limits;
        self.quota_active
            .set(limits.key_messages_per_second > 0 || limits.any_org_rate());
        let mut census = self.global.census.lock().unwrap_or_else(|e| e.into_inner());
        let rate_of = |tenant: &Tenant| match tenant {
            Tenant::Org(org) => limits.org_rate(org),
            Tenant::Key(_) | Tenant::User(..) => limits.key_rate(),
        };
        let capped = limits.any_org_max();
        let clustered = !self.engine.borrow().numbers_locally();
        if self.id == 0 && (self.quota_active.get() || capped) && clustered {
            // In a cluster, shard 0 tells the other nodes how many sessions of each tenant
            // with a rate or a cap this node holds, and hears theirs (`Event::Census`).
            let tell = census.to_tell(|t| {
                let org_cap = matches!(t, Tenant::Org(org) if limits.org_connections(org) > 0);
                org_cap || rate_of(t).per_second > 0
            });
            if !tell.is_empty() {
                self.engine.borrow_mut().census(tell);
            }
        }
        if self.quotas.borrow().is_empty() {
            return;
        }
        let nodes = census.nodes();
        let share_of = |tenant: &Tenant| {
            let rate = rate_of(tenant);
            let held = census.held(self.id, tenant);
            (rate.per_second > 0).then(|| crate::quota::share(rate, held, self.nshards, nodes))
        };
        self.quotas.borrow_mut().rebalance(self.now_ms(), share_of);
    }

    /// What the cluster's census said (shard 0 hears it for the node).
    pub(super) fn census_heard(&self, nodes: u32, counts: &[(String, u32, u32)]) {
        let mut census = self.global.census.lock().unwrap_or_else(|e| e.into_inner());
        census.heard(nodes, counts);
    }
}
