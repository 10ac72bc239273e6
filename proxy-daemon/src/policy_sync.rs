//! Sync for the policy maps: apply the difference between the desired
//! [`PolicyTables`] and what is programmed, in an order that never lets a
//! pod meet a class without its rules:
//! new rules, then address → class entries, then endpoints; removals in the
//! reverse order. The mirror records what the maps hold after each successful
//! write, so a failed write leaves a state the next sync continues from.

use std::fmt;

use ipnet::Ipv4Net;
use proxy_common::PolicyEndpoint;

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
    pub fn programmed(&self) -> &PolicyTables {
        &self.programmed
    }

    pub fn sync<M: PolicyMaps>(&mut self, want: &PolicyTables, maps: &mut M) -> PolicySyncReport {
        let mut report = PolicySyncReport::default();
        let have = &mut self.programmed;

        let new: Vec<RuleEntry> = want.rules.difference(&have.rules).copied().collect();
        for rule in new {
            match maps.put_rule(rule) {
                Ok(()) => {
                    have.rules.insert(rule);
                    report.writes += 1;
                }
                Err(e) => report.errors.push(format!("allow entry {rule:?}: {e}")),
            }
        }
        for (prefix, class) in &want.peers {
            if have.peers.get(prefix) == Some(class) {
                continue;
            }
            match maps.put_peer(*prefix, *class) {
                Ok(()) => {
                    have.peers.insert(*prefix, *class);
                    report.writes += 1;
                }
                Err(e) => report.errors.push(format!("address {prefix}: {e}")),
            }
        }
        for (ifindex, value) in &want.endpoints {
            if have.endpoints.get(ifindex) == Some(value) {
                continue;
            }
            match maps.put_endpoint(*ifindex, *value) {
                Ok(()) => {
                    have.endpoints.insert(*ifindex, *value);
                    report.writes += 1;
                }
                Err(e) => report.errors.push(format!("interface {ifindex}: {e}")),
            }
        }

        let gone: Vec<u32> = have
            .endpoints
            .keys()
            .filter(|i| !want.endpoints.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            match maps.delete_endpoint(ifindex) {
                Ok(()) => {
                    have.endpoints.remove(&ifindex);
                    report.deletes += 1;
                }
                Err(e) => report.errors.push(format!("interface {ifindex}: {e}")),
            }
        }
        let gone: Vec<Ipv4Net> = have
            .peers
            .keys()
            .filter(|p| !want.peers.contains_key(p))
            .copied()
            .collect();
        for prefix in gone {
            match maps.delete_peer(prefix) {
                Ok(()) => {
                    have.peers.remove(&prefix);
                    report.deletes += 1;
                }
                Err(e) => report.errors.push(format!("address {prefix}: {e}")),
            }
        }
        let gone: Vec<RuleEntry> = have.rules.difference(&want.rules).copied().collect();
        for rule in gone {
            match maps.delete_rule(rule) {
                Ok(()) => {
                    have.rules.remove(&rule);
                    report.deletes += 1;
                }
                Err(e) => report.errors.push(format!("allow entry {rule:?}: {e}")),
            }
        }
        report
    }
}
