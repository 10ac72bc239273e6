//! Sync: apply the difference between the desired service table and what is
//! programmed, in an order that never shows a half-written service.
//!
//! Invariants kept after every single map operation:
//! - every slot 1..=count of a master points at a backend entry that exists;
//! - a frontend gains its slots before its master, and loses its master
//!   before its slots.
//!
//! The mirror below records what the maps hold, updated after each successful
//! write, so a failed write (a full map, say) leaves a state the next sync can
//! continue from.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use proxy_common::{AffinityMatchKey, Backend, ServiceKey, ServiceValue};

use crate::compile::{BackendAddr, Frontend, FrontendTarget, Protocol, ServiceTable};

/// The maps sync writes to. Implemented by the real BPF maps and, in tests,
/// by a model that checks the invariants after each operation.
pub trait ServiceMaps {
    type Error: fmt::Display;
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), Self::Error>;
    fn delete_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Self::Error>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), Self::Error>;
    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), Self::Error>;
    fn delete_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), Self::Error>;
}

/// A backend as the maps identify it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendIdentity {
    addr: BackendAddr,
    protocol: Protocol,
}

/// What the maps hold for one frontend.
#[derive(Clone, Debug, Default)]
struct ProgrammedFrontend {
    /// Master count as written (None: no master entry).
    count: Option<u16>,
    /// Affinity timeout as written in the master.
    affinity_timeout_s: u32,
    /// Slot i+1 holds slots[i].
    slots: Vec<u32>,
    /// Backends with an affinity match entry for this frontend.
    matches: BTreeSet<u32>,
}

/// Counts of what one sync did, and what it could not do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub map_writes: usize,
    pub map_deletes: usize,
    pub errors: Vec<SyncError>,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.map_writes + self.map_deletes > 0
    }
}

/// A frontend that could not be (fully) programmed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncError {
    pub frontend: Frontend,
    /// `ns/name` of the Service, when the frontend is still desired.
    pub service: Option<String>,
    pub message: String,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.service {
            Some(service) => write!(f, "Service {service} {}: {}", self.frontend, self.message),
            None => write!(f, "removed frontend {}: {}", self.frontend, self.message),
        }
    }
}

/// The map key of `frontend`'s entry `slot` (0: the master).
fn service_key(frontend: Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(
        u32::from(frontend.ip).to_be(),
        frontend.port.to_be(),
        frontend.protocol.ip_proto(),
        slot,
    )
}

/// The affinity match key of (`frontend`, backend `id`).
fn match_key(frontend: Frontend, backend_id: u32) -> AffinityMatchKey {
    AffinityMatchKey {
        addr: u32::from(frontend.ip).to_be(),
        port: frontend.port.to_be(),
        proto: frontend.protocol.ip_proto(),
        _pad: 0,
        backend_id,
    }
}

/// Most backends one frontend can have (the master count is 16 bits).
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

/// Remembers what is programmed and brings the maps to a desired table.
#[derive(Debug, Default)]
pub struct Syncer {
    frontends: BTreeMap<Frontend, ProgrammedFrontend>,
    backend_ids: HashMap<BackendIdentity, u32>,
    free_ids: Vec<u32>,
    next_id: u32,
    /// A backend delete failed: collect again at the next sync.
    backends_to_retry: bool,
}

impl Syncer {
    pub fn new() -> Self {
        Self {
            next_id: 1,
            ..Self::default()
        }
    }

    /// Number of frontends and backends currently programmed.
    pub fn programmed_counts(&self) -> (usize, usize) {
        (self.frontends.len(), self.backend_ids.len())
    }

    pub fn sync<M: ServiceMaps>(&mut self, desired: &ServiceTable, maps: &mut M) -> SyncReport {
        let mut report = SyncReport::default();

        // Removals first: they free room in the maps for what is added.
        let removed: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|f| !desired.frontends.contains_key(f))
            .copied()
            .collect();
        for frontend in removed {
            if let Err(message) = self.remove_frontend(frontend, maps, &mut report) {
                report.errors.push(SyncError {
                    frontend,
                    service: None,
                    message,
                });
            }
        }

        for (frontend, target) in &desired.frontends {
            if let Err(message) = self.program_frontend(*frontend, target, maps, &mut report) {
                report.errors.push(SyncError {
                    frontend: *frontend,
                    service: Some(target.service.to_string()),
                    message,
                });
            }
        }

        // Backends become unused only through this sync's changes (or a
        // delete that failed before): otherwise there is nothing to walk.
        if report.changed() || !report.errors.is_empty() || self.backends_to_retry {
            self.collect_unused_backends(maps, &mut report);
        }
        report
    }

    fn program_frontend<M: ServiceMaps>(
        &mut self,
        frontend: Frontend,
        target: &FrontendTarget,
        maps: &mut M,
        report: &mut SyncReport,
    ) -> Result<(), String> {
        let wanted = &target.backends[..target.backends.len().min(MAX_BACKENDS_PER_FRONTEND)];
        let mut ids = Vec::with_capacity(wanted.len());
        for addr in wanted {
            ids.push(self.backend_id(*addr, frontend.protocol, maps, report)?);
        }

        let programmed = self.frontends.entry(frontend).or_default();
        let affinity = target.affinity_timeout_s;
        let wanted_matches: BTreeSet<u32> = if affinity != 0 {
            ids.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        let unchanged = programmed.count == Some(ids.len() as u16)
            && programmed.affinity_timeout_s == affinity
            && programmed.slots == ids
            && programmed.matches == wanted_matches;
        if unchanged {
            return Ok(());
        }
        let key = |slot: u16| service_key(frontend, slot);

        // 0. Affinity may point at a backend only once it is valid here.
        let added: Vec<u32> = wanted_matches
            .difference(&programmed.matches)
            .copied()
            .collect();
        for id in added {
            maps.put_affinity_match(match_key(frontend, id))
                .map_err(|e| format!("writing affinity match: {e}"))?;
            report.map_writes += 1;
            programmed.matches.insert(id);
        }

        // 1. Slots first: every slot a reader may pick points at a live backend.
        for (index, id) in ids.iter().enumerate() {
            if programmed.slots.get(index) == Some(id) {
                continue;
            }
            maps.put_service(key(index as u16 + 1), ServiceValue::slot(*id))
                .map_err(|e| format!("writing backend slot {}: {e}", index + 1))?;
            report.map_writes += 1;
            if index < programmed.slots.len() {
                programmed.slots[index] = *id;
            } else {
                programmed.slots.push(*id);
            }
        }
        // 2. Then the master, which makes the new slots visible.
        let count = ids.len() as u16;
        if programmed.count != Some(count) || programmed.affinity_timeout_s != affinity {
            maps.put_service(key(0), ServiceValue::master(count, affinity))
                .map_err(|e| format!("writing service entry: {e}"))?;
            report.map_writes += 1;
            programmed.count = Some(count);
            programmed.affinity_timeout_s = affinity;
        }
        // 3. Slots past the new count are no longer reachable: drop them.
        while programmed.slots.len() > ids.len() {
            let slot = programmed.slots.len() as u16;
            maps.delete_service(key(slot))
                .map_err(|e| format!("deleting backend slot {slot}: {e}"))?;
            report.map_deletes += 1;
            programmed.slots.pop();
        }
        // 4. Clients remembered on a backend that left go elsewhere next time.
        let gone: Vec<u32> = programmed
            .matches
            .difference(&wanted_matches)
            .copied()
            .collect();
        for id in gone {
            maps.delete_affinity_match(match_key(frontend, id))
                .map_err(|e| format!("deleting affinity match: {e}"))?;
            report.map_deletes += 1;
            programmed.matches.remove(&id);
        }
        report.frontends_written += 1;
        if target.backends.len() > MAX_BACKENDS_PER_FRONTEND {
            return Err(format!(
                "has {} backends; only the first {MAX_BACKENDS_PER_FRONTEND} are used",
                target.backends.len()
            ));
        }
        Ok(())
    }

    fn remove_frontend<M: ServiceMaps>(
        &mut self,
        frontend: Frontend,
        maps: &mut M,
        report: &mut SyncReport,
    ) -> Result<(), String> {
        let Some(programmed) = self.frontends.get_mut(&frontend) else {
            return Ok(());
        };
        let key = |slot: u16| service_key(frontend, slot);
        // Master first: from then on no reader looks at the slots.
        if programmed.count.is_some() {
            maps.delete_service(key(0))
                .map_err(|e| format!("deleting service entry: {e}"))?;
            report.map_deletes += 1;
            programmed.count = None;
        }
        while let Some(_id) = programmed.slots.last() {
            let slot = programmed.slots.len() as u16;
            maps.delete_service(key(slot))
                .map_err(|e| format!("deleting backend slot {slot}: {e}"))?;
            report.map_deletes += 1;
            programmed.slots.pop();
        }
        while let Some(&id) = programmed.matches.first() {
            maps.delete_affinity_match(match_key(frontend, id))
                .map_err(|e| format!("deleting affinity match: {e}"))?;
            report.map_deletes += 1;
            programmed.matches.remove(&id);
        }
        self.frontends.remove(&frontend);
        report.frontends_removed += 1;
        Ok(())
    }

    fn backend_id<M: ServiceMaps>(
        &mut self,
        addr: BackendAddr,
        protocol: Protocol,
        maps: &mut M,
        report: &mut SyncReport,
    ) -> Result<u32, String> {
        let identity = BackendIdentity { addr, protocol };
        if let Some(id) = self.backend_ids.get(&identity) {
            return Ok(*id);
        }
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None => {
                let id = self.next_id;
                self.next_id = self.next_id.checked_add(1).ok_or("backend ids exhausted")?;
                id
            }
        };
        let backend = Backend::new(
            u32::from(addr.ip).to_be(),
            addr.port.to_be(),
            protocol.ip_proto(),
        );
        if let Err(e) = maps.put_backend(id, backend) {
            self.free_ids.push(id);
            return Err(format!("writing backend {addr}: {e}"));
        }
        report.map_writes += 1;
        self.backend_ids.insert(identity, id);
        Ok(id)
    }

    /// Deletes backend entries no slot refers to any more. Runs last, so a
    /// backend outlives every slot that pointed at it.
    fn collect_unused_backends<M: ServiceMaps>(&mut self, maps: &mut M, report: &mut SyncReport) {
        let used: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|f| f.slots.iter().copied())
            .collect();
        let unused: Vec<(BackendIdentity, u32)> = self
            .backend_ids
            .iter()
            .filter(|(_, id)| !used.contains(id))
            .map(|(identity, id)| (*identity, *id))
            .collect();
        self.backends_to_retry = false;
        for (identity, id) in unused {
            // A failed delete leaves a harmless orphan entry; try again next sync.
            if maps.delete_backend(id).is_err() {
                self.backends_to_retry = true;
            } else {
                report.map_deletes += 1;
                self.backend_ids.remove(&identity);
                self.free_ids.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_model::ObjectKey;
    use std::net::Ipv4Addr;

    /// A model of the BPF maps that checks, after every operation, that a
    /// reader following master → slot → backend never finds a hole.
    #[derive(Default)]
    struct CheckedMaps {
        services: HashMap<ServiceKey, ServiceValue>,
        backends: HashMap<u32, Backend>,
        matches: BTreeSet<AffinityMatchKey>,
        capacity: Option<usize>,
        ops: Vec<String>,
    }

    impl CheckedMaps {
        fn check(&self) {
            for (key, value) in &self.services {
                if key.slot != 0 {
                    continue;
                }
                for slot in 1..=value.count {
                    let slot_key = ServiceKey { slot, ..*key };
                    let slot_value = self.services.get(&slot_key).unwrap_or_else(|| {
                        panic!(
                            "master {key:?} count {} but slot {slot} missing after {:?}",
                            value.count,
                            self.ops.last()
                        )
                    });
                    assert!(
                        self.backends.contains_key(&slot_value.backend_id),
                        "slot {slot} of {key:?} points at missing backend {}",
                        slot_value.backend_id
                    );
                    if value.affinity_timeout_s != 0 {
                        let m = AffinityMatchKey {
                            addr: key.addr,
                            port: key.port,
                            proto: key.proto,
                            _pad: 0,
                            backend_id: slot_value.backend_id,
                        };
                        assert!(
                            self.matches.contains(&m),
                            "slot {slot} of sticky {key:?} has no affinity match"
                        );
                    }
                }
            }
        }
    }

    impl ServiceMaps for CheckedMaps {
        type Error = String;
        fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), String> {
            self.ops.push(format!("put backend {id}"));
            self.backends.insert(id, backend);
            self.check();
            Ok(())
        }
        fn delete_backend(&mut self, id: u32) -> Result<(), String> {
            self.ops.push(format!("delete backend {id}"));
            self.backends.remove(&id);
            self.check();
            Ok(())
        }
        fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), String> {
            if let Some(cap) = self.capacity
                && !self.services.contains_key(&key)
                && self.services.len() >= cap
            {
                return Err("map is full".into());
            }
            self.ops.push(format!("put service slot {}", key.slot));
            self.services.insert(key, value);
            self.check();
            Ok(())
        }
        fn delete_service(&mut self, key: ServiceKey) -> Result<(), String> {
            self.ops.push(format!("delete service slot {}", key.slot));
            self.services.remove(&key);
            self.check();
            Ok(())
        }
        fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), String> {
            self.ops.push(format!("put match {}", key.backend_id));
            self.matches.insert(key);
            self.check();
            Ok(())
        }
        fn delete_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), String> {
            self.ops.push(format!("delete match {}", key.backend_id));
            self.matches.remove(&key);
            self.check();
            Ok(())
        }
    }

    fn frontend(last: u8, port: u16) -> Frontend {
        Frontend {
            ip: Ipv4Addr::new(10, 96, 0, last),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn table(entries: &[(Frontend, &[u8])]) -> ServiceTable {
        let mut t = ServiceTable::default();
        for (f, backends) in entries {
            t.frontends.insert(
                *f,
                FrontendTarget {
                    service: ObjectKey {
                        namespace: "default".into(),
                        name: format!("svc{}", f.ip.octets()[3]),
                    },
                    port_name: String::new(),
                    backends: backends
                        .iter()
                        .map(|b| BackendAddr {
                            ip: Ipv4Addr::new(10, 244, 0, *b),
                            port: 8080,
                        })
                        .collect(),
                    affinity_timeout_s: 0,
                },
            );
        }
        t
    }

    fn sticky(mut t: ServiceTable, timeout: u32) -> ServiceTable {
        for target in t.frontends.values_mut() {
            target.affinity_timeout_s = timeout;
        }
        t
    }

    #[test]
    fn affinity_matches_follow_the_backends_of_sticky_frontends() {
        let mut maps = CheckedMaps::default();
        let mut syncer = Syncer::new();
        let a = frontend(1, 80);
        syncer.sync(&sticky(table(&[(a, &[1, 2, 3])]), 60), &mut maps);
        assert_eq!(maps.matches.len(), 3);
        let master = maps.services[&service_key(a, 0)];
        assert_eq!((master.count, master.affinity_timeout_s), (3, 60));

        // Backend 2 leaves: only its match goes, so only its clients move.
        syncer.sync(&sticky(table(&[(a, &[1, 3])]), 60), &mut maps);
        let ids: BTreeSet<u8> = maps
            .matches
            .iter()
            .map(|m| u32::from_be(maps.backends[&m.backend_id].addr).to_be_bytes()[3])
            .collect();
        assert_eq!(ids, BTreeSet::from([1, 3]));

        // Affinity switched off: the master says so and the matches go.
        syncer.sync(&table(&[(a, &[1, 3])]), &mut maps);
        assert_eq!(maps.services[&service_key(a, 0)].affinity_timeout_s, 0);
        assert!(maps.matches.is_empty());

        syncer.sync(&sticky(table(&[(a, &[1])]), 10), &mut maps);
        syncer.sync(&ServiceTable::default(), &mut maps);
        assert!(maps.matches.is_empty() && maps.services.is_empty() && maps.backends.is_empty());
    }

    /// The backends a reader of the maps would pick from for `f`.
    fn visible(maps: &CheckedMaps, f: Frontend) -> Option<Vec<u8>> {
        let key = |slot| service_key(f, slot);
        let master = maps.services.get(&key(0))?;
        let mut out: Vec<u8> = (1..=master.count)
            .map(|s| {
                let id = maps.services[&key(s)].backend_id;
                u32::from_be(maps.backends[&id].addr).to_be_bytes()[3]
            })
            .collect();
        out.sort();
        Some(out)
    }

    #[test]
    fn grows_shrinks_and_removes_without_holes() {
        let mut maps = CheckedMaps::default();
        let mut syncer = Syncer::new();
        let a = frontend(1, 80);
        for step in [
            table(&[(a, &[1, 2, 3])]),
            table(&[(a, &[2, 3, 4, 5])]),
            table(&[(a, &[5])]),
            table(&[(a, &[])]),
            table(&[(a, &[6, 7])]),
        ] {
            let report = syncer.sync(&step, &mut maps);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            let want: Vec<u8> = step.frontends[&a]
                .backends
                .iter()
                .map(|b| b.ip.octets()[3])
                .collect();
            assert_eq!(visible(&maps, a), Some(want));
        }
        syncer.sync(&ServiceTable::default(), &mut maps);
        assert!(maps.services.is_empty(), "{:?}", maps.services);
        assert!(maps.backends.is_empty(), "{:?}", maps.backends);
    }

    #[test]
    fn unchanged_table_writes_nothing() {
        let mut maps = CheckedMaps::default();
        let mut syncer = Syncer::new();
        let t = table(&[(frontend(1, 80), &[1, 2]), (frontend(2, 53), &[3])]);
        assert!(syncer.sync(&t, &mut maps).changed());
        let report = syncer.sync(&t, &mut maps);
        assert!(!report.changed(), "{report:?}");
    }

    #[test]
    fn one_endpoint_change_touches_only_its_service() {
        let mut maps = CheckedMaps::default();
        let mut syncer = Syncer::new();
        syncer.sync(
            &table(&[(frontend(1, 80), &[1, 2]), (frontend(2, 80), &[3])]),
            &mut maps,
        );
        let report = syncer.sync(
            &table(&[(frontend(1, 80), &[1, 2]), (frontend(2, 80), &[4])]),
            &mut maps,
        );
        // New backend, its slot, and the old backend's removal.
        assert_eq!(
            (report.map_writes, report.map_deletes),
            (2, 1),
            "{:?}",
            maps.ops
        );
        assert_eq!(report.frontends_written, 1);
    }

    #[test]
    fn shared_backends_are_kept_until_no_service_uses_them() {
        let mut maps = CheckedMaps::default();
        let mut syncer = Syncer::new();
        syncer.sync(
            &table(&[(frontend(1, 80), &[1]), (frontend(2, 80), &[1])]),
            &mut maps,
        );
        assert_eq!(maps.backends.len(), 1);
        syncer.sync(&table(&[(frontend(2, 80), &[1])]), &mut maps);
        assert_eq!(maps.backends.len(), 1);
        assert_eq!(visible(&maps, frontend(2, 80)), Some(vec![1]));
    }

    #[test]
    fn a_full_map_fails_one_service_and_keeps_the_rest() {
        let mut maps = CheckedMaps {
            capacity: Some(4),
            ..CheckedMaps::default()
        };
        let mut syncer = Syncer::new();
        // svc1 needs 3 entries (master + 2 slots); svc2 needs 3 more: no room.
        let t = table(&[(frontend(1, 80), &[1, 2]), (frontend(2, 80), &[3, 4])]);
        let report = syncer.sync(&t, &mut maps);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        assert_eq!(report.errors[0].service.as_deref(), Some("default/svc2"));
        assert_eq!(visible(&maps, frontend(1, 80)), Some(vec![1, 2]));
        assert_eq!(visible(&maps, frontend(2, 80)), None);

        // Room appears (svc1 goes away): the retry programs svc2.
        let report = syncer.sync(&table(&[(frontend(2, 80), &[3, 4])]), &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(visible(&maps, frontend(2, 80)), Some(vec![3, 4]));
    }
}
