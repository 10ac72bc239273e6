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

use ipnet::IpNet;
use proxy_common::{
    Addr, AffinityMatchKey, BACKEND_FLAG_LOCAL, Backend, SERVICE_FLAG_SOURCE_RANGES,
    SOURCE_RANGE_FRONTEND_BITS, ServiceKey, ServiceValue, SourceRangeKey, addr_from_octets,
    v4_mapped,
};
use std::net::IpAddr;

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
    /// An allowed source prefix of a frontend with [`SERVICE_FLAG_SOURCE_RANGES`]: the key
    /// with its prefix length in bits.
    fn put_source_range(&mut self, key: SourceRangeKey, prefix_len: u32)
    -> Result<(), Self::Error>;
    fn delete_source_range(
        &mut self,
        key: SourceRangeKey,
        prefix_len: u32,
    ) -> Result<(), Self::Error>;
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
    /// Master flags as written.
    flags: u16,
    /// Allowed source prefixes written.
    source_ranges: BTreeSet<IpNet>,
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
        map_addr(frontend.ip),
        frontend.port.to_be(),
        frontend.protocol.ip_proto(),
        frontend.scope.map_value(),
        slot,
    )
}

/// An address as the maps hold it: IPv4 as IPv4-mapped IPv6.
pub fn map_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from(v4).to_be()),
        IpAddr::V6(v6) => addr_from_octets(v6.octets()),
    }
}

/// The source range entry of (`frontend`, `range`) and its prefix length. An IPv4 range is
/// IPv4-mapped like every address in the maps, so its prefix is 96 bits longer.
pub fn source_range_key(frontend: Frontend, range: IpNet) -> (SourceRangeKey, u32) {
    let mapped_bits = if range.addr().is_ipv4() { 96 } else { 0 };
    let key = SourceRangeKey {
        addr: map_addr(frontend.ip),
        port: frontend.port.to_be(),
        proto: frontend.protocol.ip_proto(),
        _pad: 0,
        source: map_addr(range.network()),
    };
    let bits = SOURCE_RANGE_FRONTEND_BITS + mapped_bits + u32::from(range.prefix_len());
    (key, bits)
}

/// The affinity match key of (`frontend`, backend `id`).
fn match_key(frontend: Frontend, backend_id: u32) -> AffinityMatchKey {
    AffinityMatchKey {
        addr: map_addr(frontend.ip),
        port: frontend.port.to_be(),
        proto: frontend.protocol.ip_proto(),
        scope: frontend.scope.map_value(),
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

    /// Entries written in the service map: a master and its slots per frontend.
    pub fn service_entries(&self) -> usize {
        self.frontends
            .values()
            .map(|f| usize::from(f.count.is_some()) + f.slots.len())
            .sum()
    }

    /// Number of frontends and backends currently programmed.
    /// A frontend counts once its master entry is written (one whose slots a full map
    /// interrupted is not reachable, so not programmed).
    pub fn programmed_counts(&self) -> (usize, usize) {
        let frontends = self
            .frontends
            .values()
            .filter(|f| f.count.is_some())
            .count();
        (frontends, self.backend_ids.len())
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
        let wanted_ranges: BTreeSet<IpNet> =
            target.source_ranges.iter().flatten().copied().collect();
        let flags = if target.source_ranges.is_some() {
            SERVICE_FLAG_SOURCE_RANGES
        } else {
            0
        };
        let unchanged = programmed.count == Some(ids.len() as u16)
            && programmed.affinity_timeout_s == affinity
            && programmed.flags == flags
            && programmed.slots == ids
            && programmed.matches == wanted_matches
            && programmed.source_ranges == wanted_ranges;
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

        // 0b. Allowed sources before the master that says to check them.
        let added: Vec<IpNet> = wanted_ranges
            .difference(&programmed.source_ranges)
            .copied()
            .collect();
        for range in added {
            let (k, len) = source_range_key(frontend, range);
            maps.put_source_range(k, len)
                .map_err(|e| format!("writing source range {range}: {e}"))?;
            report.map_writes += 1;
            programmed.source_ranges.insert(range);
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
        if programmed.count != Some(count)
            || programmed.affinity_timeout_s != affinity
            || programmed.flags != flags
        {
            maps.put_service(key(0), ServiceValue::master(count, affinity, flags))
                .map_err(|e| format!("writing service entry: {e}"))?;
            report.map_writes += 1;
            programmed.count = Some(count);
            programmed.affinity_timeout_s = affinity;
            programmed.flags = flags;
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
        // 5. Sources no longer allowed.
        remove_source_ranges(frontend, programmed, Some(&wanted_ranges), maps, report)?;
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
        remove_source_ranges(frontend, programmed, None, maps, report)?;
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
        let flags = if addr.local { BACKEND_FLAG_LOCAL } else { 0 };
        let backend = Backend::new(
            map_addr(addr.ip),
            addr.port.to_be(),
            protocol.ip_proto(),
            flags,
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

/// Deletes the source ranges of a frontend that are not in `keep` (all when None).
fn remove_source_ranges<M: ServiceMaps>(
    frontend: Frontend,
    programmed: &mut ProgrammedFrontend,
    keep: Option<&BTreeSet<IpNet>>,
    maps: &mut M,
    report: &mut SyncReport,
) -> Result<(), String> {
    let gone: Vec<IpNet> = programmed
        .source_ranges
        .iter()
        .filter(|r| keep.is_none_or(|k| !k.contains(r)))
        .copied()
        .collect();
    for range in gone {
        let (k, len) = source_range_key(frontend, range);
        maps.delete_source_range(k, len)
            .map_err(|e| format!("deleting source range {range}: {e}"))?;
        report.map_deletes += 1;
        programmed.source_ranges.remove(&range);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
