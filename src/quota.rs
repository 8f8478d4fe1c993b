//! Limits over many connections: how many sessions each org, API key and token user holds
//! (the [`Census`], process-wide, touched when a session opens or closes and once a second
//! per shard, never per message), and the message buckets of keys, users and orgs
//! ([`Quotas`], one per shard, each bucket holding the shard's share of the configured rate).
//!
//! A tenant's rate is shared out by where its sessions are: a shard holding `local` of its
//! `total` sessions gets `local / total` of the rate; a shard holding none (server API
//! requests land anywhere) gets `1 / shards` of it. Shares are rebalanced every second, so
//! the whole is exact for a tenant whose sessions stay put and approximate while they move.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use indexmap::{Equivalent, IndexMap};

use crate::auth::Principal;
use crate::rate::{Rate, TokenBucket};

/// Who a limit counts: an org, an API key, or a token's user (of an org).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenant {
    /// An org, every key and user of it together.
    Org(Box<str>),
    /// An API key, by id.
    Key(Box<str>),
    /// A token's user: org and `sub`.
    User(Box<str>, Box<str>),
}

/// A [`Tenant`] borrowed from a principal: found in the buckets without allocating.
#[derive(Debug, Clone, Copy)]
enum TenantRef<'a> {
    Org(&'a str),
    Key(&'a str),
    User(&'a str, &'a str),
}

impl TenantRef<'_> {
    fn hash_into<H: Hasher>(self, state: &mut H) {
        match self {
            TenantRef::Org(org) => (0u8, org).hash(state),
            TenantRef::Key(id) => (1u8, id).hash(state),
            TenantRef::User(org, user) => (2u8, org, user).hash(state),
        }
    }

    fn owned(self) -> Tenant {
        match self {
            TenantRef::Org(org) => Tenant::Org(org.into()),
            TenantRef::Key(id) => Tenant::Key(id.into()),
            TenantRef::User(org, user) => Tenant::User(org.into(), user.into()),
        }
    }
}

impl Tenant {
    fn borrowed(&self) -> TenantRef<'_> {
        match self {
            Tenant::Org(org) => TenantRef::Org(org),
            Tenant::Key(id) => TenantRef::Key(id),
            Tenant::User(org, user) => TenantRef::User(org, user),
        }
    }

    /// Its name in the cluster's census (`o\nORG`, `k\nID`, `u\nORG\nSUB`).
    pub fn name(&self) -> String {
        match self {
            Tenant::Org(org) => format!("o\n{org}"),
            Tenant::Key(id) => format!("k\n{id}"),
            Tenant::User(org, user) => format!("u\n{org}\n{user}"),
        }
    }

    /// The tenant [`Tenant::name`] names.
    pub fn parse(name: &str) -> Option<Tenant> {
        let mut parts = name.splitn(3, '\n');
        match (parts.next()?, parts.next()?, parts.next()) {
            ("o", org, None) => Some(Tenant::Org(org.into())),
            ("k", id, None) => Some(Tenant::Key(id.into())),
            ("u", org, Some(user)) => Some(Tenant::User(org.into(), user.into())),
            _ => None,
        }
    }

    /// The org and the key or user `principal` counts against.
    pub fn of(principal: &Principal) -> [Tenant; 2] {
        let [org, who] = tenants(principal);
        [org.owned(), who.owned()]
    }
}

impl Hash for Tenant {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.borrowed().hash_into(state);
    }
}

impl Hash for TenantRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.hash_into(state);
    }
}

impl Equivalent<Tenant> for TenantRef<'_> {
    fn equivalent(&self, key: &Tenant) -> bool {
        match (*self, key) {
            (TenantRef::Org(a), Tenant::Org(b)) | (TenantRef::Key(a), Tenant::Key(b)) => a == &**b,
            (TenantRef::User(o, u), Tenant::User(p, v)) => o == &**p && u == &**v,
            _ => false,
        }
    }
}

fn tenants(principal: &Principal) -> [TenantRef<'_>; 2] {
    let org = TenantRef::Org(&principal.org);
    let who = match (&principal.key_id, &principal.user) {
        (Some(id), _) => TenantRef::Key(id),
        (None, Some(user)) => TenantRef::User(&principal.org, user),
        (None, None) => TenantRef::Key(""),
    };
    [org, who]
}

/// Sessions per tenant and shard, process-wide; in a cluster, also the other nodes'.
#[derive(Debug, Default)]
pub struct Census {
    counts: HashMap<Tenant, Box<[u32]>>,
    /// In a cluster: each tenant's sessions on the other nodes, as of the exchange numbered
    /// beside it.
    others: HashMap<Tenant, (u32, u64)>,
    /// Nodes of the cluster (0: alone, or not heard yet).
    nodes: u32,
    /// Exchanges begun.
    round: u64,
}

impl Census {
    /// A session of `tenants` (its org first) opens on `shard` of `shards`, unless its org
    /// holds `org_max` sessions already (0: any). False when refused.
    pub fn open(
        &mut self,
        shard: usize,
        shards: usize,
        tenants: &[Tenant],
        org_max: usize,
    ) -> bool {
        if let Some(org) = tenants.first().filter(|_| org_max > 0) {
            // This node's sessions, and in a cluster the others' as last heard.
            let (_, held) = self.held(shard, org);
            if held as usize >= org_max {
                return false;
            }
        }
        for tenant in tenants {
            let counts = self
                .counts
                .entry(tenant.clone())
                .or_insert_with(|| vec![0; shards].into());
            if let Some(n) = counts.get_mut(shard) {
                *n += 1;
            }
        }
        true
    }

    /// A session of `tenants` on `shard` closed.
    pub fn close(&mut self, shard: usize, tenants: &[Tenant]) {
        for tenant in tenants {
            if let Some(counts) = self.counts.get_mut(tenant) {
                if let Some(n) = counts.get_mut(shard) {
                    *n = n.saturating_sub(1);
                }
                if counts.iter().all(|n| *n == 0) {
                    self.counts.remove(tenant);
                }
            }
        }
    }

    /// `tenant`'s sessions on `shard`, and everywhere (on every node, in a cluster).
    pub fn held(&self, shard: usize, tenant: &Tenant) -> (u32, u32) {
        let (local, node) = self.counts.get(tenant).map_or((0, 0), |c| {
            (c.get(shard).copied().unwrap_or(0), c.iter().sum())
        });
        let others = self.others.get(tenant).map_or(0, |o| o.0);
        (local, node + others)
    }

    /// Nodes the last census heard of (0: none yet, or alone).
    pub fn nodes_heard(&self) -> u32 {
        self.nodes
    }

    /// Nodes sharing the rates (1 when alone).
    pub fn nodes(&self) -> u32 {
        self.nodes.max(1)
    }

    /// This node's sessions of the tenants `wanted` says have a rate, to tell the other
    /// nodes; begins an exchange (what no exchange since the one before answered is
    /// forgotten).
    pub fn to_tell(&mut self, wanted: impl Fn(&Tenant) -> bool) -> Vec<(String, u32)> {
        self.round += 1;
        let stale = self.round.saturating_sub(2);
        self.others.retain(|_, (_, round)| *round >= stale);
        let tell = self.counts.iter().filter(|(t, _)| wanted(t));
        tell.map(|(t, c)| (t.name(), c.iter().sum())).collect()
    }

    /// What the cluster's census said: `nodes` alive, and per tenant this node's sessions as
    /// told and everyone's.
    pub fn heard(&mut self, nodes: u32, counts: &[(String, u32, u32)]) {
        self.nodes = nodes;
        for (name, mine, all) in counts {
            if let Some(tenant) = Tenant::parse(name) {
                self.others
                    .insert(tenant, (all.saturating_sub(*mine), self.round));
            }
        }
    }

    /// Sessions `org` holds.
    pub fn org_sessions(&self, org: &str) -> u32 {
        let found = self.counts.get(&TenantRef::Org(org).owned());
        found.map_or(0, |c| c.iter().sum())
    }
}

/// The part of `rate` a shard holding `local` of a tenant's `total` sessions gets, of
/// `shards` shards on each of `nodes` nodes.
pub fn share(rate: Rate, (local, total): (u32, u32), shards: usize, nodes: u32) -> Rate {
    let part = |n: u32| -> u32 {
        if n == 0 {
            return 0;
        }
        let part = if local == 0 || total == 0 {
            u64::from(n).div_ceil(shards.max(1) as u64 * u64::from(nodes.max(1)))
        } else {
            (u64::from(n) * u64::from(local)).div_ceil(u64::from(total))
        };
        part.clamp(1, u64::from(n)) as u32
    };
    Rate {
        per_second: part(rate.per_second),
        burst: part(rate.burst),
    }
}

/// A tenant's bucket on one shard, and its share of the rate.
#[derive(Debug)]
struct Held {
    bucket: TokenBucket,
    rate: Rate,
}

/// One shard's buckets for keys, users and orgs.
#[derive(Debug, Default)]
pub struct Quotas {
    buckets: IndexMap<Tenant, Held>,
}

/// Which limit refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// The key's or user's rate.
    Key,
    /// The org's rate.
    Org,
}

impl Quotas {
    /// Take `n` messages from `principal`'s key (or user) and org buckets, the rates being
    /// `key` and `org` (0 per second: none); `share` gives a new bucket's part of a rate.
    /// When refused: which limit, and how many milliseconds until it would pass.
    pub fn take(
        &mut self,
        principal: &Principal,
        (key, org): (Rate, Rate),
        n: u64,
        now_ms: u64,
        share: impl Fn(&Tenant, Rate) -> Rate,
    ) -> Result<(), (Over, u64)> {
        let [org_tenant, who] = tenants(principal);
        let mut took_key = false;
        if key.per_second > 0 {
            let held = self.held(who, key, now_ms, &share);
            held.bucket
                .take_n(held.rate, now_ms, n)
                .map_err(|wait| (Over::Key, wait))?;
            took_key = true;
        }
        if org.per_second > 0 {
            let held = self.held(org_tenant, org, now_ms, &share);
            if let Err(wait) = held.bucket.take_n(held.rate, now_ms, n) {
                if took_key {
                    // Nothing was sent: the key's tokens go back.
                    let held = self.held(who, key, now_ms, &share);
                    for _ in 0..n {
                        held.bucket.give_back(held.rate);
                    }
                }
                return Err((Over::Org, wait));
            }
        }
        Ok(())
    }

    fn held(
        &mut self,
        tenant: TenantRef<'_>,
        rate: Rate,
        now_ms: u64,
        share: &impl Fn(&Tenant, Rate) -> Rate,
    ) -> &mut Held {
        let index = match self.buckets.get_index_of(&tenant) {
            Some(index) => index,
            None => {
                let tenant = tenant.owned();
                let part = share(&tenant, rate);
                let held = Held {
                    bucket: TokenBucket::full(part, now_ms),
                    rate: part,
                };
                self.buckets.insert_full(tenant, held).0
            }
        };
        &mut self.buckets[index]
    }

    /// Give every bucket its share anew (`rate` says each tenant's configured rate, `None`
    /// when it has none any more), and forget those full again: they would start full.
    pub fn rebalance(&mut self, now_ms: u64, rate_share: impl Fn(&Tenant) -> Option<Rate>) {
        self.buckets
            .retain(|tenant, held| match rate_share(tenant) {
                Some(part) => {
                    held.rate = part;
                    !held.bucket.is_full(part, now_ms)
                }
                None => false,
            });
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_principal(org: &str, key: &str) -> Principal {
        Principal {
            org: org.into(),
            user: None,
            key_id: Some(key.into()),
            scopes: Default::default(),
            exclusive: false,
            expires_ms: None,
            grant: None,
        }
    }

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn census_counts_sessions_and_refuses_past_an_orgs_max() {
        let mut census = Census::default();
        let [org, key] = Tenant::of(&key_principal("acme", "k1"));
        let both = [org.clone(), key.clone()];
        assert!(census.open(0, 2, &both, 2));
        assert!(census.open(1, 2, &both, 2));
        assert!(!census.open(1, 2, &both, 2), "the org holds 2");
        assert_eq!(census.held(1, &key), (1, 2));
        census.close(0, &both);
        assert_eq!(census.org_sessions("acme"), 1);
        assert!(census.open(0, 2, &both, 2));
        census.close(0, &both);
        census.close(1, &both);
        assert_eq!(census.held(0, &org), (0, 0));
        assert!(census.counts.is_empty(), "nothing kept for tenants gone");
    }

    #[test]
    fn the_other_nodes_sessions_count_until_an_exchange_forgets_them() {
        let mut census = Census::default();
        let p = key_principal("acme", "k1");
        let tenants = Tenant::of(&p);
        assert!(census.open(0, 1, &tenants, 0));
        let told = census.to_tell(|t| matches!(t, Tenant::Key(_)));
        assert_eq!(told, [("k\nk1".to_string(), 1)]);
        assert_eq!(Tenant::parse(&told[0].0).as_ref(), Some(&tenants[1]));
        // Another node holds 3 of k1's sessions.
        census.heard(2, &[("k\nk1".into(), 1, 4)]);
        assert_eq!(census.held(0, &tenants[1]), (1, 4));
        assert_eq!(census.nodes(), 2);
        // Two exchanges without news of k1 from the cluster: forgotten.
        census.to_tell(|_| false);
        assert_eq!(census.held(0, &tenants[1]), (1, 4));
        census.to_tell(|_| false);
        census.to_tell(|_| false);
        assert_eq!(census.held(0, &tenants[1]), (1, 1));
    }

    #[test]
    fn shares_follow_sessions_and_sum_to_the_rate() {
        let r = rate(100, 10);
        assert_eq!(share(r, (1, 1), 2, 1), r, "all its sessions here");
        assert_eq!(share(r, (1, 4), 2, 1), rate(25, 3));
        assert_eq!(share(r, (3, 4), 2, 1), rate(75, 8));
        assert_eq!(share(r, (0, 4), 2, 1), rate(50, 5), "no session here");
        assert_eq!(share(r, (0, 4), 2, 2), rate(25, 3), "nor on this node");
        assert_eq!(
            share(rate(1, 1), (1, 4), 4, 1),
            rate(1, 1),
            "never below one"
        );
    }

    #[test]
    fn key_and_org_buckets_refuse_and_an_org_refusal_gives_the_key_tokens_back() {
        let mut quotas = Quotas::default();
        let k1 = key_principal("acme", "k1");
        let k2 = key_principal("acme", "k2");
        let whole = |_: &Tenant, r: Rate| r;
        let limits = (rate(2, 2), rate(3, 3));
        assert_eq!(quotas.take(&k1, limits, 1, 0, whole), Ok(()));
        assert_eq!(quotas.take(&k1, limits, 1, 0, whole), Ok(()));
        assert_eq!(quotas.take(&k1, limits, 1, 0, whole), Err((Over::Key, 500)));
        assert_eq!(quotas.take(&k2, limits, 1, 0, whole), Ok(()));
        // The org has given its 3: k2's next is refused by the org, and k2 keeps its token.
        assert_eq!(quotas.take(&k2, limits, 1, 0, whole), Err((Over::Org, 334)));
        let org_only = (rate(0, 0), rate(1_000, 1_000));
        assert_eq!(quotas.take(&k2, org_only, 1, 1_000, whole), Ok(()));
        assert_eq!(quotas.take(&k2, limits, 1, 1_000, whole), Ok(()));
        // A second later everything is full again and forgotten.
        quotas.rebalance(5_000, |_| Some(rate(2, 2)));
        assert!(quotas.is_empty());
    }
}
