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

use crate::compile::{
    BackendAddr, Frontend, FrontendTarget, Protocol, Scope, ServiceTable, TableDelta,
};

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
    /// Backend entries found in adopted maps that no identity owns (a duplicate, or one
    /// that does not decode): deleted once no slot points at them.
    orphan_backends: BTreeSet<u32>,
    /// Entries found in adopted maps that name no frontend we could decode: deleted by
    /// the next sync.
    junk: Junk,
    /// The [`TableDelta::revision`] of the table last synced in full or through its deltas
    /// (None: a table of unknown lineage, or none yet).
    synced_revision: Option<u64>,
    /// Frontends the last sync could not (fully) program or remove: looked at again by every
    /// sync, whatever changed.
    failed: BTreeSet<Frontend>,
    /// How many slots point at each backend id, so unused backends are found without walking
    /// every slot.
    slot_refs: HashMap<u32, u32>,
    /// Backend ids that may have become unused since the last collection.
    maybe_unused: BTreeSet<u32>,
    /// The inverse of `backend_ids`.
    backend_by_id: HashMap<u32, BackendIdentity>,
}

/// Counts a slot now pointing at `id`.
fn slot_ref(refs: &mut HashMap<u32, u32>, id: u32) {
    *refs.entry(id).or_default() += 1;
}

/// Counts a slot no longer pointing at `id`.
fn slot_unref(refs: &mut HashMap<u32, u32>, maybe_unused: &mut BTreeSet<u32>, id: u32) {
    if let Some(count) = refs.get_mut(&id) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            refs.remove(&id);
            maybe_unused.insert(id);
        }
    }
}

/// Entries of adopted maps that do not decode (a foreign or corrupted map).
#[derive(Debug, Default)]
struct Junk {
    services: Vec<ServiceKey>,
    matches: Vec<AffinityMatchKey>,
    source_ranges: Vec<(SourceRangeKey, u32)>,
}

/// What the service maps hold, read back from pinned maps after a restart.
#[derive(Clone, Debug, Default)]
pub struct ProgrammedState {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(u32, Backend)>,
    pub affinity_matches: Vec<AffinityMatchKey>,
    /// Source range keys with their prefix length in bits.
    pub source_ranges: Vec<(SourceRangeKey, u32)>,
}

/// What [`Syncer::adopt`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// Frontends with a master entry.
    pub frontends: usize,
    pub backends: usize,
    /// Entries that did not make sense (removed by the next sync), in words.
    pub warnings: Vec<String>,
}

/// The frontend a map key names, if it decodes.
pub fn decode_frontend(addr: Addr, port_be: u16, proto: u8, scope: u8) -> Option<Frontend> {
    let protocol = match proto {
        proxy_common::IPPROTO_TCP => Protocol::Tcp,
        proxy_common::IPPROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    let scope = match scope {
        proxy_common::SCOPE_SOCKET => Scope::Socket,
        proxy_common::SCOPE_EXTERNAL => Scope::External,
        _ => return None,
    };
    Some(Frontend {
        ip: decode_addr(addr),
        port: u16::from_be(port_be),
        protocol,
        scope,
    })
}

/// The inverse of [`map_addr`].
pub fn decode_addr(addr: Addr) -> IpAddr {
    if proxy_common::is_v4_mapped(&addr) {
        IpAddr::V4(u32::from_be(addr[3]).into())
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(octets.into())
    }
}

/// The inverse of [`source_range_key`]: the (External) frontend and the allowed range.
pub fn decode_source_range(key: &SourceRangeKey, prefix_len: u32) -> Option<(Frontend, IpNet)> {
    let frontend = decode_frontend(key.addr, key.port, key.proto, proxy_common::SCOPE_EXTERNAL)?;
    let bits = prefix_len.checked_sub(SOURCE_RANGE_FRONTEND_BITS)?;
    let range = match decode_addr(key.source) {
        // IPv4 ranges are stored IPv4-mapped: 96 bits of prefix before their own.
        IpAddr::V4(v4) => {
            let len = u8::try_from(bits.checked_sub(96)?)
                .ok()
                .filter(|l| *l <= 32)?;
            IpNet::V4(ipnet::Ipv4Net::new(v4, len).ok()?.trunc())
        }
        IpAddr::V6(v6) => {
            let len = u8::try_from(bits).ok().filter(|l| *l <= 128)?;
            IpNet::V6(ipnet::Ipv6Net::new(v6, len).ok()?.trunc())
        }
    };
    Some((frontend, range))
}

/// A slot that was missing in adopted maps: no backend has id 0, so sync rewrites it.
const MISSING_SLOT: u32 = 0;

impl Syncer {
    pub fn new() -> Self {
        Self {
            next_id: 1,
            ..Self::default()
        }
    }

    /// A syncer whose mirror is what the (pinned) maps hold, so the next sync writes only the
    /// difference, deletes what is stale, and never hands out a backend id already in use.
    /// Nothing read back is trusted: entries that do not decode are reported and deleted by
    /// the next sync.
    pub fn adopt(state: &ProgrammedState) -> (Self, AdoptReport) {
        let mut syncer = Self::new();
        let mut report = AdoptReport::default();
        let mut max_id = 0u32;

        for (id, backend) in &state.backends {
            max_id = max_id.max(*id);
            let identity = decode_frontend(
                backend.addr,
                backend.port,
                backend.proto,
                proxy_common::SCOPE_SOCKET,
            )
            .map(|f| BackendIdentity {
                addr: BackendAddr {
                    ip: f.ip,
                    port: f.port,
                    local: backend.flags & BACKEND_FLAG_LOCAL != 0,
                },
                protocol: f.protocol,
            });
            match identity {
                Some(identity) if *id != 0 && !syncer.backend_ids.contains_key(&identity) => {
                    syncer.backend_ids.insert(identity, *id);
                    syncer.backend_by_id.insert(*id, identity);
                }
                Some(identity) if *id != 0 => {
                    report.warnings.push(format!(
                        "backend {id} duplicates backend {} ({})",
                        syncer.backend_ids[&identity], identity.addr
                    ));
                    syncer.orphan_backends.insert(*id);
                }
                _ => {
                    report
                        .warnings
                        .push(format!("backend {id} does not decode: {backend:?}"));
                    syncer.orphan_backends.insert(*id);
                }
            }
        }

        // Slots per frontend, by slot number.
        let mut slots: BTreeMap<Frontend, BTreeMap<u16, u32>> = BTreeMap::new();
        for (key, value) in &state.services {
            let Some(frontend) = decode_frontend(key.addr, key.port, key.proto, key.scope) else {
                report
                    .warnings
                    .push(format!("service entry does not decode: {key:?}"));
                syncer.junk.services.push(*key);
                continue;
            };
            let programmed = syncer.frontends.entry(frontend).or_default();
            if key.slot == 0 {
                programmed.count = Some(value.count);
                programmed.affinity_timeout_s = value.affinity_timeout_s;
                programmed.flags = value.flags;
            } else {
                max_id = max_id.max(value.backend_id);
                slots
                    .entry(frontend)
                    .or_default()
                    .insert(key.slot, value.backend_id);
            }
        }
        for (frontend, by_slot) in slots {
            let programmed = syncer.frontends.entry(frontend).or_default();
            let last = by_slot.keys().next_back().copied().unwrap_or(0);
            programmed.slots = (1..=last)
                .map(|slot| by_slot.get(&slot).copied().unwrap_or(MISSING_SLOT))
                .collect();
            for id in &programmed.slots {
                slot_ref(&mut syncer.slot_refs, *id);
            }
        }

        for key in &state.affinity_matches {
            match decode_frontend(key.addr, key.port, key.proto, key.scope) {
                Some(frontend) => {
                    max_id = max_id.max(key.backend_id);
                    syncer
                        .frontends
                        .entry(frontend)
                        .or_default()
                        .matches
                        .insert(key.backend_id);
                }
                None => {
                    report
                        .warnings
                        .push(format!("affinity match does not decode: {key:?}"));
                    syncer.junk.matches.push(*key);
                }
            }
        }

        for (key, prefix_len) in &state.source_ranges {
            match decode_source_range(key, *prefix_len) {
                Some((frontend, range)) => {
                    syncer
                        .frontends
                        .entry(frontend)
                        .or_default()
                        .source_ranges
                        .insert(range);
                }
                None => {
                    report.warnings.push(format!(
                        "source range does not decode: {key:?}/{prefix_len}"
                    ));
                    syncer.junk.source_ranges.push((*key, *prefix_len));
                }
            }
        }

        // Ids past every id in use (backends, slots, matches): never one still referred to.
        syncer.next_id = max_id.saturating_add(1).max(1);
        // Backends no slot uses (a sync interrupted before its last step) go at the first sync.
        syncer.backends_to_retry = true;
        let (frontends, backends) = syncer.programmed_counts();
        report.frontends = frontends;
        report.backends = backends;
        (syncer, report)
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

    /// Brings the maps to `desired`, looking at every frontend.
    pub fn sync<M: ServiceMaps>(&mut self, desired: &ServiceTable, maps: &mut M) -> SyncReport {
        self.synced_revision = None;
        self.sync_frontends(desired, None, maps)
    }

    /// Brings the maps to `desired`, the table of a [`crate::compile::Compiler`] as of
    /// `delta`: when the table last synced was that compiler's revision `delta.since`, only the
    /// frontends `delta` names (and those that failed before) are looked at; otherwise every
    /// one, as [`Syncer::sync`].
    pub fn sync_delta<M: ServiceMaps>(
        &mut self,
        desired: &ServiceTable,
        delta: &TableDelta,
        maps: &mut M,
    ) -> SyncReport {
        let follows = delta.since != 0 && self.synced_revision == Some(delta.since);
        let scope = follows.then(|| {
            let mut scope = delta.frontends.clone();
            scope.extend(self.failed.iter().copied());
            scope
        });
        let report = self.sync_frontends(desired, scope.as_ref(), maps);
        self.synced_revision = Some(delta.revision);
        report
    }

    /// Syncs the frontends in `scope` (every one when None): everything outside it must
    /// already be as desired.
    fn sync_frontends<M: ServiceMaps>(
        &mut self,
        desired: &ServiceTable,
        scope: Option<&BTreeSet<Frontend>>,
        maps: &mut M,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut failed = BTreeSet::new();

        // Removals first: they free room in the maps for what is added.
        let removed: Vec<Frontend> = match scope {
            None => self
                .frontends
                .keys()
                .filter(|f| !desired.frontends.contains_key(f))
                .copied()
                .collect(),
            Some(scope) => scope
                .iter()
                .filter(|f| !desired.frontends.contains_key(f) && self.frontends.contains_key(f))
                .copied()
                .collect(),
        };
        for frontend in removed {
            if let Err(message) = self.remove_frontend(frontend, maps, &mut report) {
                failed.insert(frontend);
                report.errors.push(SyncError {
                    frontend,
                    service: None,
                    message,
                });
            }
        }

        let wanted: Vec<(&Frontend, &FrontendTarget)> = match scope {
            None => desired.frontends.iter().collect(),
            Some(scope) => scope
                .iter()
                .filter_map(|f| desired.frontends.get_key_value(f))
                .collect(),
        };
        for (frontend, target) in wanted {
            if let Err(message) = self.program_frontend(*frontend, target, maps, &mut report) {
                failed.insert(*frontend);
                report.errors.push(SyncError {
                    frontend: *frontend,
                    service: Some(target.service.to_string()),
                    message,
                });
            }
        }
        // A failed frontend may leave a backend it just wrote without a slot: look at all.
        if !failed.is_empty() {
            self.backends_to_retry = true;
        }
        self.failed = failed;

        // Backends become unused only through this sync's changes (or a
        // delete that failed before): otherwise there is nothing to walk.
        if report.changed() || !report.errors.is_empty() || self.backends_to_retry {
            self.collect_unused_backends(maps, &mut report);
        }
        self.delete_junk(maps, &mut report);
        report
    }

    /// Deletes the undecodable entries adoption found (no reader can reach them through a
    /// frontend we program); what fails is tried again next time.
    fn delete_junk<M: ServiceMaps>(&mut self, maps: &mut M, report: &mut SyncReport) {
        let mut junk = std::mem::take(&mut self.junk);
        junk.services.retain(|key| {
            let failed = maps.delete_service(*key).is_err();
            report.map_deletes += usize::from(!failed);
            failed
        });
        junk.matches.retain(|key| {
            let failed = maps.delete_affinity_match(*key).is_err();
            report.map_deletes += usize::from(!failed);
            failed
        });
        junk.source_ranges.retain(|(key, len)| {
            let failed = maps.delete_source_range(*key, *len).is_err();
            report.map_deletes += usize::from(!failed);
            failed
        });
        self.junk = junk;
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
                let old = std::mem::replace(&mut programmed.slots[index], *id);
                slot_unref(&mut self.slot_refs, &mut self.maybe_unused, old);
            } else {
                programmed.slots.push(*id);
            }
            slot_ref(&mut self.slot_refs, *id);
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
            if let Some(id) = programmed.slots.pop() {
                slot_unref(&mut self.slot_refs, &mut self.maybe_unused, id);
            }
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
        while let Some(&id) = programmed.slots.last() {
            let slot = programmed.slots.len() as u16;
            maps.delete_service(key(slot))
                .map_err(|e| format!("deleting backend slot {slot}: {e}"))?;
            report.map_deletes += 1;
            programmed.slots.pop();
            slot_unref(&mut self.slot_refs, &mut self.maybe_unused, id);
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
        self.backend_by_id.insert(id, identity);
        Ok(id)
    }

    /// Deletes one unused backend entry and frees its id. A failed delete leaves a harmless
    /// orphan entry; it is tried again at the next sync.
    fn remove_backend<M: ServiceMaps>(
        &mut self,
        maps: &mut M,
        report: &mut SyncReport,
        identity: BackendIdentity,
        id: u32,
    ) {
        if maps.delete_backend(id).is_err() {
            self.backends_to_retry = true;
        } else {
            report.map_deletes += 1;
            self.backend_ids.remove(&identity);
            self.backend_by_id.remove(&id);
            self.free_ids.push(id);
        }
    }

    /// Deletes backend entries no slot refers to any more. Runs last, so a
    /// backend outlives every slot that pointed at it.
    fn collect_unused_backends<M: ServiceMaps>(&mut self, maps: &mut M, report: &mut SyncReport) {
        if !self.backends_to_retry {
            // Only backends whose last slot went can have become unused.
            let candidates = std::mem::take(&mut self.maybe_unused);
            for id in candidates {
                if self.slot_refs.contains_key(&id) {
                    continue;
                }
                let Some(identity) = self.backend_by_id.get(&id).copied() else {
                    continue;
                };
                self.remove_backend(maps, report, identity, id);
            }
            return;
        }
        self.maybe_unused.clear();
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
        let orphans: Vec<u32> = self
            .orphan_backends
            .iter()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        for id in orphans {
            if maps.delete_backend(id).is_err() {
                self.backends_to_retry = true;
            } else {
                report.map_deletes += 1;
                self.orphan_backends.remove(&id);
                if id != 0 {
                    self.free_ids.push(id);
                }
            }
        }
        for (identity, id) in unused {
            self.remove_backend(maps, report, identity, id);
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
