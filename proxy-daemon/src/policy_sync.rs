//! Sync for the policy maps: apply the difference between the desired
//! [`PolicyTables`] and what is programmed, in an order under which a
//! connection allowed both before and after a sync is allowed at every step
//! of it (what only the new state allows may start a moment late, what only
//! the old allowed may last a moment longer): new rules; endpoints that
//! isolate less; address → class entries, longest prefix first, removals
//! shortest first; endpoints that isolate more; old rules. The mirror records
//! what the maps hold after each successful operation, so a failed one
//! leaves a state the next sync continues from.

use std::fmt;

use ipnet::Ipv4Net;
use proxy_common::{DIRECTION_EGRESS, DIRECTION_INGRESS, PolicyEndpoint};

use crate::policy_tables::{PolicyTables, RuleEntry};

/// The maps policy sync writes to: the real BPF maps, or a model in tests.
pub trait PolicyMaps {
    type Error: fmt::Display;
    fn put_rule(&mut self, rule: RuleEntry) -> Result<(), Self::Error>;
    fn delete_rule(&mut self, rule: RuleEntry) -> Result<(), Self::Error>;
    fn put_peer(&mut self, prefix: Ipv4Net, class: u32) -> Result<(), Self::Error>;
    fn delete_peer(&mut self, prefix: Ipv4Net) -> Result<(), Self::Error>;
    fn put_endpoint(&mut self, ifindex: u32, value: PolicyEndpoint) -> Result<(), Self::Error>;
    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), Self::Error>;
}

/// What one policy sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySyncReport {
    pub writes: usize,
    pub deletes: usize,
    /// Entries that could not be written or deleted (a full map, say).
    pub errors: Vec<String>,
}

impl PolicySyncReport {
    pub fn changed(&self) -> bool {
        self.writes + self.deletes > 0
    }
}

#[derive(Debug, Default)]
pub struct PolicySyncer {
    programmed: PolicyTables,
}

impl PolicySyncer {
    /// A syncer whose mirror is what the (pinned) policy maps hold after a restart, so the
    /// next sync moves them to the desired state in the same safe order as any other change.
    pub fn adopt(programmed: PolicyTables) -> Self {
        Self { programmed }
    }

    pub fn programmed(&self) -> &PolicyTables {
        &self.programmed
    }

    pub fn sync<M: PolicyMaps>(&mut self, want: &PolicyTables, maps: &mut M) -> PolicySyncReport {
        let mut step = Step {
            have: &mut self.programmed,
            maps,
            report: PolicySyncReport::default(),
        };

        // 1. Rules of the new state; the old ones stay until the end.
        let new: Vec<RuleEntry> = want.rules.difference(&step.have.rules).copied().collect();
        for rule in new {
            step.put_rule(rule);
        }

        // 2. Pods that stop being isolated in a direction, and pods that are
        // gone, let go first: while classes change below, a direction
        // isolated now is one isolated both before and after, so it has the
        // rules of both the old and the new classes.
        let relaxed: Vec<(u32, PolicyEndpoint)> = step
            .have
            .endpoints
            .iter()
            .filter_map(|(ifindex, have)| {
                let want = want.endpoints.get(ifindex)?;
                let both = |d| u8::from(have.isolated(d) && want.isolated(d));
                let both = PolicyEndpoint {
                    ingress_isolated: both(DIRECTION_INGRESS),
                    egress_isolated: both(DIRECTION_EGRESS),
                    _pad: 0,
                };
                (both != *have).then_some((*ifindex, both))
            })
            .collect();
        // One that could not let go is retried by the next sync, not below.
        let mut not_relaxed = Vec::new();
        for (ifindex, value) in relaxed {
            if !step.put_endpoint(ifindex, value) {
                not_relaxed.push(ifindex);
            }
        }
        let gone: Vec<u32> = step
            .have
            .endpoints
            .keys()
            .filter(|i| !want.endpoints.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            step.delete_endpoint(ifindex);
        }

        // 3. Address → class, so that each address moves once, straight from
        // its old class to its new one: writes longest prefix first (a
        // prefix's more specific ones already hold their new classes), then
        // removals shortest first (what an address falls back to is new).
        let mut puts: Vec<(Ipv4Net, u32)> = want
            .peers
            .iter()
            .filter(|(prefix, class)| step.have.peers.get(prefix) != Some(class))
            .map(|(p, c)| (*p, *c))
            .collect();
        puts.sort_by_key(|(p, _)| std::cmp::Reverse(p.prefix_len()));
        for (prefix, class) in puts {
            step.put_peer(prefix, class);
        }
        let mut gone: Vec<Ipv4Net> = step
            .have
            .peers
            .keys()
            .filter(|p| !want.peers.contains_key(p))
            .copied()
            .collect();
        gone.sort_by_key(Ipv4Net::prefix_len);
        for prefix in gone {
            step.delete_peer(prefix);
        }

        // 4. Endpoints as wanted: new pods, and directions newly isolated
        // (every address now has its new class, whose rules are in).
        for (ifindex, value) in &want.endpoints {
            if step.have.endpoints.get(ifindex) != Some(value) && !not_relaxed.contains(ifindex) {
                step.put_endpoint(*ifindex, *value);
            }
        }

        // 5. Rules nothing refers to any more.
        let gone: Vec<RuleEntry> = step.have.rules.difference(&want.rules).copied().collect();
        for rule in gone {
            step.delete_rule(rule);
        }
        step.report
    }
}

/// One sync in progress: each map operation, recorded in the mirror when it
/// succeeds and in the report either way.
struct Step<'a, M> {
    have: &'a mut PolicyTables,
    maps: &'a mut M,
    report: PolicySyncReport,
}

impl<M: PolicyMaps> Step<'_, M> {
    fn done(
        &mut self,
        result: Result<(), M::Error>,
        delete: bool,
        what: impl FnOnce() -> String,
    ) -> bool {
        match result {
            Ok(()) if delete => self.report.deletes += 1,
            Ok(()) => self.report.writes += 1,
            Err(e) => {
                self.report.errors.push(format!("{}: {e}", what()));
                return false;
            }
        }
        true
    }

    fn put_rule(&mut self, rule: RuleEntry) {
        let result = self.maps.put_rule(rule);
        if self.done(result, false, || format!("allow entry {rule:?}")) {
            self.have.rules.insert(rule);
        }
    }

    fn delete_rule(&mut self, rule: RuleEntry) {
        let result = self.maps.delete_rule(rule);
        if self.done(result, true, || format!("allow entry {rule:?}")) {
            self.have.rules.remove(&rule);
        }
    }

    fn put_peer(&mut self, prefix: Ipv4Net, class: u32) {
        let result = self.maps.put_peer(prefix, class);
        if self.done(result, false, || format!("address {prefix}")) {
            self.have.peers.insert(prefix, class);
        }
    }

    fn delete_peer(&mut self, prefix: Ipv4Net) {
        let result = self.maps.delete_peer(prefix);
        if self.done(result, true, || format!("address {prefix}")) {
            self.have.peers.remove(&prefix);
        }
    }

    fn put_endpoint(&mut self, ifindex: u32, value: PolicyEndpoint) -> bool {
        let result = self.maps.put_endpoint(ifindex, value);
        let ok = self.done(result, false, || format!("interface {ifindex}"));
        if ok {
            self.have.endpoints.insert(ifindex, value);
        }
        ok
    }

    fn delete_endpoint(&mut self, ifindex: u32) {
        let result = self.maps.delete_endpoint(ifindex);
        if self.done(result, true, || format!("interface {ifindex}")) {
            self.have.endpoints.remove(&ifindex);
        }
    }
}

#[cfg(test)]
mod tests;
