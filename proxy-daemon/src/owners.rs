//! Which Service owns each programmed frontend, kept up to date from the compile's
//! [`TableDelta`]s, so that a change of endpoints (the common case) costs work in proportion
//! to what changed, not to the cluster: the per-Service frontend gauges, the owners the
//! connection counters are credited to and the status file's frontends are redone only for
//! the Services whose frontends changed, or when ownership changed at all.

use std::collections::{BTreeSet, HashMap};

use cluster_model::ObjectKey;

use crate::compile::{Frontend, ServiceTable, TableDelta};

/// The owner of each frontend and the number of frontends of each Service.
#[derive(Debug, Default)]
pub struct Ownership {
    owners: HashMap<Frontend, (ObjectKey, String)>,
    per_service: HashMap<ObjectKey, usize>,
}

/// What one [`Ownership::apply`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OwnershipChange {
    /// Services whose number of frontends changed, with the new number (0: it has none now).
    pub services: Vec<(ObjectKey, usize)>,
    /// Some frontend got, lost or changed its owner (Service or port name).
    pub owners_changed: bool,
}

impl Ownership {
    /// Follows `table` for the frontends `delta` names.
    pub fn apply(&mut self, table: &ServiceTable, delta: &TableDelta) -> OwnershipChange {
        let mut touched: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut owners_changed = false;
        for frontend in &delta.frontends {
            let new = table
                .frontends
                .get(frontend)
                .map(|t| (t.service.clone(), t.port_name.clone()));
            let old = match &new {
                Some(owner) => self.owners.insert(*frontend, owner.clone()),
                None => self.owners.remove(frontend),
            };
            if old == new {
                continue;
            }
            owners_changed = true;
            if let Some((service, _)) = &old {
                let count = self.per_service.entry(service.clone()).or_default();
                *count = count.saturating_sub(1);
                touched.insert(service.clone());
            }
            if let Some((service, _)) = &new {
                *self.per_service.entry(service.clone()).or_default() += 1;
                touched.insert(service.clone());
            }
        }
        let services = touched
            .into_iter()
            .map(|service| {
                let count = self.per_service.get(&service).copied().unwrap_or(0);
                if count == 0 {
                    self.per_service.remove(&service);
                }
                (service, count)
            })
            .collect();
        OwnershipChange {
            services,
            owners_changed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{FrontendTarget, Protocol, Scope};

    fn frontend(last: u8) -> Frontend {
        Frontend {
            ip: [10, 96, 0, last].into(),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::Socket,
        }
    }

    fn target(service: &str) -> FrontendTarget {
        FrontendTarget {
            service: ObjectKey::new("default", service),
            port_name: "http".into(),
            backends: vec![],
            affinity_timeout_s: 0,
            source_ranges: None,
        }
    }

    fn delta(frontends: &[Frontend]) -> TableDelta {
        TableDelta {
            frontends: frontends.iter().copied().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn counts_follow_added_moved_and_removed_frontends() {
        let mut own = Ownership::default();
        let mut table = ServiceTable::default();
        table.frontends.insert(frontend(1), target("a"));
        table.frontends.insert(frontend(2), target("a"));
        let change = own.apply(&table, &delta(&[frontend(1), frontend(2)]));
        assert!(change.owners_changed);
        assert_eq!(change.services, [(ObjectKey::new("default", "a"), 2)]);

        // An endpoint change retargets a frontend without changing its owner.
        let change = own.apply(&table, &delta(&[frontend(1)]));
        assert_eq!(change, OwnershipChange::default());

        // Frontend 2 moves to b; then a loses its last one.
        table.frontends.insert(frontend(2), target("b"));
        let change = own.apply(&table, &delta(&[frontend(2)]));
        assert!(change.owners_changed);
        assert_eq!(
            change.services,
            [
                (ObjectKey::new("default", "a"), 1),
                (ObjectKey::new("default", "b"), 1)
            ]
        );
        table.frontends.remove(&frontend(1));
        let change = own.apply(&table, &delta(&[frontend(1)]));
        assert_eq!(change.services, [(ObjectKey::new("default", "a"), 0)]);
    }
}
