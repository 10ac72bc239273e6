//! Connection tracking upkeep and what the agent learns from the data path's counters, on a
//! thread of its own (walking a table of 262,144 entries takes a while; the async runtime
//! must not wait for it):
//!
//! - **Garbage collection** of `NAT_CONNTRACK` and `POLICY_CONNTRACK`, as Cilium's CT GC:
//!   entries the programs already treat as over (idle longer than the timeouts both share,
//!   [`proxy_common::idle_limit_ns`]) are deleted, so they stop occupying the LRU tables.
//! - **Live entries** of both tables, counted by the same walk.
//! - **Evictions**: the programs count every entry they create under a new key
//!   (`CONNTRACK_CREATED`); entries leave a table only by this GC or by LRU eviction (nothing
//!   else deletes them), so since the agent's first walk
//!   `evictions = created − gc_deleted − (live − live_at_first_walk)`. See [`Evictions`].
//! - **Connections per Service**: the per-frontend counters of `SERVICE_COUNTERS`, summed over
//!   CPUs and attributed to Services through the compiled table ([`ServiceCounting`]).

use std::collections::{HashMap as StdHashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use proxy_common::{
    CONNTRACK_NAT, CONNTRACK_POLICY, ConntrackKey, ConntrackValue, NAT_ORIGINAL, NAT_REPLY, NatKey,
    NatValue, ServiceCounters, ServiceKey, idle_limit_ns,
};
use tracing::warn;

use crate::metrics::Metrics;

/// How often the tables are walked by default (ms).
pub const DEFAULT_INTERVAL_MS: u64 = 10_000;

/// The maps the walk reads, opened from their pins (fds of their own, so the thread owns
/// them).
pub struct StatsMaps {
    pub nat: Map,
    pub policy: Map,
    pub created: Map,
    pub service_counters: Map,
    /// Capacities: a walk never takes more steps than this (an LRU eviction of the key a walk
    /// stands on restarts it from the first key).
    pub nat_capacity: u32,
    pub policy_capacity: u32,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Whether a NAT entry of the original direction is over for the programs (`alive` in
/// nodeport.rs: idle ≥ limit).
pub fn nat_expired(value: &NatValue, proto: u8, now: u64) -> bool {
    now.saturating_sub(value.last_seen_ns) >= idle_limit_ns(value.closing != 0, proto)
}

/// Whether a policy entry is over for the programs (`tracked` in policy.rs: idle > limit).
pub fn policy_expired(key: &ConntrackKey, value: &ConntrackValue, now: u64) -> bool {
    now.saturating_sub(value.last_seen_ns) > idle_limit_ns(value.closing != 0, key.proto)
}

/// The original-direction key a reply entry belongs to, and the backend (address, port) that
/// original must name for the reply to be in use (`refresh_original` in nodeport.rs).
pub fn original_of(reply_key: &NatKey, reply: &NatValue) -> NatKey {
    let snat = reply.nat_addr != [0; 4];
    NatKey {
        saddr: if snat {
            reply.nat_addr
        } else {
            reply_key.daddr
        },
        daddr: reply.addr,
        sport: if snat {
            reply.nat_port
        } else {
            reply_key.dport
        },
        dport: reply.port,
        proto: reply_key.proto,
        direction: NAT_ORIGINAL,
        _pad: 0,
    }
}

/// Whether the programs would still use a reply entry whose original is `original`.
pub fn reply_in_use(reply_key: &NatKey, original: Option<&NatValue>, now: u64) -> bool {
    original.is_some_and(|o| {
        !nat_expired(o, reply_key.proto, now)
            && o.addr == reply_key.saddr
            && o.port == reply_key.sport
    })
}

/// One bpf(2) map element command on `map` with `key`, `value` and `flags`.
fn elem_command<K, V>(
    cmd: libc::c_long,
    map: &MapData,
    key: &K,
    value: *mut V,
    flags: u64,
) -> bool {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
        _rest: [u64; 4],
    }
    let mut attr = Attr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as u64,
        flags,
        _rest: [0; 4],
    };
    // SAFETY: the kernel reads key_size bytes at `key` and reads or writes value_size bytes
    // at `value`; K and V are the map's key and value types (the maps were checked when
    // typed), and both buffers outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_long,
        )
    };
    ret == 0
}

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM: deletes an entry and returns what it held at that moment,
/// so a deletion racing with a program's rewrite can be undone. aya 0.14 lacks it for hashes.
fn lookup_and_delete<K, V: Copy>(map: &MapData, key: &K) -> Option<V> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let done = elem_command(
        BPF_MAP_LOOKUP_AND_DELETE_ELEM,
        map,
        key,
        value.as_mut_ptr(),
        0,
    );
    // SAFETY: on success the kernel wrote the whole value.
    done.then(|| unsafe { value.assume_init() })
}

/// Puts an entry back unless a program wrote the key again meanwhile (BPF_NOEXIST).
fn restore<K, V: Copy>(map: &MapData, key: &K, mut value: V) {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_NOEXIST: u64 = 1;
    elem_command(
        BPF_MAP_UPDATE_ELEM,
        map,
        key,
        &mut value as *mut V,
        BPF_NOEXIST,
    );
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::LruHashMap(data) | Map::HashMap(data) => Some(data),
        _ => None,
    }
}

/// One walk of NAT_CONNTRACK: (entries left, entries deleted).
fn collect_nat(maps: &StatsMaps, previous_orphans: &mut HashSet<NatKey>) -> (u64, u64) {
    let now = monotonic_ns();
    let Ok(table) = HashMap::<_, NatKey, NatValue>::try_from(&maps.nat) else {
        return (0, 0);
    };
    let mut seen = 0u64;
    let mut doomed = Vec::new();
    let mut orphans = HashSet::new();
    // Deleting while walking would restart the walk (the next key of a deleted key is the
    // first): the doomed keys are deleted after it.
    for item in table.iter().take(maps.nat_capacity as usize) {
        let Ok((key, value)) = item else { continue };
        seen += 1;
        if key.direction == NAT_ORIGINAL {
            if nat_expired(&value, key.proto, now) {
                doomed.push((key, value));
            }
        } else if key.direction == NAT_REPLY {
            let original = table.get(&original_of(&key, &value), 0).ok();
            if let Some(o) = &original
                && nat_expired(o, key.proto, now)
            {
                // Its original goes in this round: so does it.
                doomed.push((key, value));
            } else if !reply_in_use(&key, original.as_ref(), now) {
                // No original, or one of another backend: a new connection writes its reply
                // entry before its original, so only one orphaned for a whole round goes.
                if previous_orphans.contains(&key) {
                    doomed.push((key, value));
                } else {
                    orphans.insert(key);
                }
            }
        }
    }
    *previous_orphans = orphans;
    let Some(data) = map_data(&maps.nat) else {
        return (seen, 0);
    };
    let mut deleted = 0u64;
    for (key, walked) in doomed {
        let Some(value) = lookup_and_delete::<NatKey, NatValue>(data, &key) else {
            continue;
        };
        let now = monotonic_ns();
        // Rewritten since the walk (a new connection reusing the tuple), or in use again.
        let still_used = value != walked
            || if key.direction == NAT_ORIGINAL {
                !nat_expired(&value, key.proto, now)
            } else {
                let original = table.get(&original_of(&key, &value), 0).ok();
                reply_in_use(&key, original.as_ref(), now)
            };
        if still_used {
            // A program rewrote it since the walk: put it back.
            restore(data, &key, value);
            continue;
        }
        deleted += 1;
    }
    (seen.saturating_sub(deleted), deleted)
}

/// One walk of POLICY_CONNTRACK: (entries left, entries deleted).
fn collect_policy(maps: &StatsMaps) -> (u64, u64) {
    let now = monotonic_ns();
    let Ok(table) = HashMap::<_, ConntrackKey, ConntrackValue>::try_from(&maps.policy) else {
        return (0, 0);
    };
    let mut seen = 0u64;
    let mut doomed = Vec::new();
    for item in table.iter().take(maps.policy_capacity as usize) {
        let Ok((key, value)) = item else { continue };
        seen += 1;
        if policy_expired(&key, &value, now) {
            doomed.push((key, value));
        }
    }
    let Some(data) = map_data(&maps.policy) else {
        return (seen, 0);
    };
    let mut deleted = 0u64;
    for (key, walked) in doomed {
        let Some(value) = lookup_and_delete::<ConntrackKey, ConntrackValue>(data, &key) else {
            continue;
        };
        if value != walked || !policy_expired(&key, &value, monotonic_ns()) {
            restore(data, &key, value);
            continue;
        }
        deleted += 1;
    }
    (seen.saturating_sub(deleted), deleted)
}

/// Entries created so far in each table (`CONNTRACK_*` index), summed over CPUs.
fn created(maps: &StatsMaps) -> [u64; 2] {
    let Ok(array) = PerCpuArray::<_, u64>::try_from(&maps.created) else {
        return [0; 2];
    };
    let sum = |index: u32| {
        array
            .get(&index, 0)
            .map(|v| v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .unwrap_or(0)
    };
    [sum(CONNTRACK_NAT), sum(CONNTRACK_POLICY)]
}

/// Every frontend's counters, summed over CPUs.
fn service_counters(maps: &StatsMaps) -> Vec<(ServiceKey, ServiceCounters)> {
    let Ok(map) = PerCpuHashMap::<_, ServiceKey, ServiceCounters>::try_from(&maps.service_counters)
    else {
        return Vec::new();
    };
    map.iter()
        .filter_map(Result::ok)
        .map(|(key, per_cpu)| {
            let sum = per_cpu
                .iter()
                .fold(ServiceCounters::default(), |a, b| ServiceCounters {
                    connections: a.connections.wrapping_add(b.connections),
                    no_endpoints: a.no_endpoints.wrapping_add(b.no_endpoints),
                });
            (key, sum)
        })
        .collect()
}

/// The eviction estimate of one table.
///
/// Entries leave a table only by the agent's GC or by LRU eviction, so between two walks
/// `evicted = Δcreated − Δgc_deleted − Δlive`. The programs' counter is read before each
/// walk (entries created during the walk count in `live` but not yet in `created`), and after
/// the first one, so every error of a busy table makes the estimate low, never high; the
/// next walk catches up, and the exported counter never goes down.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evictions {
    /// (created, gc_deleted, live) at the first walk.
    baseline: Option<(u64, u64, u64)>,
    total: u64,
}

impl Evictions {
    /// Takes one walk's figures (`created_before` read before the walk, `created_after`
    /// after it, `gc_deleted` the agent's deletions so far, `live` the entries left) and
    /// returns the evictions since the first walk.
    pub fn observe(
        &mut self,
        created_before: u64,
        created_after: u64,
        gc_deleted: u64,
        live: u64,
    ) -> u64 {
        let Some((c0, g0, l0)) = self.baseline else {
            self.baseline = Some((created_after, gc_deleted, live));
            return 0;
        };
        let raw = i128::from(created_before)
            - i128::from(c0)
            - (i128::from(gc_deleted) - i128::from(g0))
            - (i128::from(live) - i128::from(l0));
        let raw = u64::try_from(raw.max(0)).unwrap_or(u64::MAX);
        self.total = self.total.max(raw);
        self.total
    }
}

/// Attribution of the per-frontend counters to Services: the increase of each frontend's
/// counters since the last read goes to the Service that owns the frontend now.
#[derive(Debug, Default)]
pub struct ServiceCounting {
    last: Option<StdHashMap<ServiceKey, ServiceCounters>>,
}

/// A Service by (namespace, name).
pub type ServiceName = (String, String);

impl ServiceCounting {
    /// Increases per Service since the last read: (Service, connections, refusals). The
    /// first read only sets the baseline (the counters are "since this agent started"); a
    /// frontend's counter smaller than last time was evicted and recreated, so all of it is
    /// new. Frontends no Service owns (removed, or not yet recorded) give nothing.
    pub fn observe(
        &mut self,
        read: Vec<(ServiceKey, ServiceCounters)>,
        owners: &StdHashMap<ServiceKey, ServiceName>,
    ) -> Vec<(ServiceName, u64, u64)> {
        let now: StdHashMap<ServiceKey, ServiceCounters> = read.into_iter().collect();
        let Some(last) = self.last.replace(now.clone()) else {
            return Vec::new();
        };
        let mut out: std::collections::BTreeMap<ServiceName, (u64, u64)> = Default::default();
        for (key, counters) in &now {
            let before = last.get(key).copied().unwrap_or_default();
            let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
            let connections = delta(counters.connections, before.connections);
            let refusals = delta(counters.no_endpoints, before.no_endpoints);
            if connections == 0 && refusals == 0 {
                continue;
            }
            let Some(owner) = owners.get(key) else {
                continue;
            };
            let sum = out.entry(owner.clone()).or_default();
            sum.0 += connections;
            sum.1 += refusals;
        }
        out.into_iter().map(|(s, (c, r))| (s, c, r)).collect()
    }
}

/// The walker's state across rounds.
#[derive(Default)]
struct Walker {
    nat_evictions: Evictions,
    policy_evictions: Evictions,
    nat_gc: u64,
    policy_gc: u64,
    nat_orphans: HashSet<NatKey>,
    services: ServiceCounting,
    /// Created counts already exported, per table.
    created_exported: [Option<u64>; 2],
}

impl Walker {
    fn round(&mut self, maps: &StatsMaps, metrics: &Metrics) {
        let before = created(maps);
        let (nat_live, nat_deleted) = collect_nat(maps, &mut self.nat_orphans);
        let (policy_live, policy_deleted) = collect_policy(maps);
        let after = created(maps);
        self.nat_gc += nat_deleted;
        self.policy_gc += policy_deleted;
        let nat_evicted = self
            .nat_evictions
            .observe(before[0], after[0], self.nat_gc, nat_live);
        let policy_evicted =
            self.policy_evictions
                .observe(before[1], after[1], self.policy_gc, policy_live);
        for (i, (table, live, gc, evicted)) in [
            ("nat", nat_live, self.nat_gc, nat_evicted),
            ("policy", policy_live, self.policy_gc, policy_evicted),
        ]
        .into_iter()
        .enumerate()
        {
            let live = i64::try_from(live).unwrap_or(i64::MAX);
            metrics
                .conntrack_entries
                .with_label_values(&[table])
                .set(live);
            // The map pressure thread leaves these two maps to this walk.
            metrics
                .map_entries
                .with_label_values(&[&format!("{table}_conntrack")])
                .set(live);
            raise_to(&metrics.conntrack_gc_deleted, table, gc);
            raise_to(&metrics.conntrack_evictions, table, evicted);
            // Created since the first walk, as the other counters.
            let base = *self.created_exported[i].get_or_insert(after[i]);
            raise_to(
                &metrics.conntrack_created,
                table,
                before[i].saturating_sub(base),
            );
        }
        let owners = metrics.frontend_owners();
        for ((namespace, name), connections, refusals) in
            self.services.observe(service_counters(maps), &owners)
        {
            let labels = [namespace.as_str(), name.as_str()];
            if connections > 0 {
                metrics
                    .service_connections
                    .with_label_values(&labels)
                    .inc_by(connections);
            }
            if refusals > 0 {
                metrics
                    .service_no_endpoint_refusals
                    .with_label_values(&labels)
                    .inc_by(refusals);
            }
        }
    }
}

/// Raises a counter to `value` (counters never go down).
fn raise_to(counter: &prometheus::IntCounterVec, table: &str, value: u64) {
    let c = counter.with_label_values(&[table]);
    let have = c.get();
    if value > have {
        c.inc_by(value - have);
    }
}

/// Walks the tables now (the baseline) and then every `interval`, on a thread of its own,
/// for as long as the process runs.
pub fn spawn(maps: StatsMaps, metrics: Arc<Metrics>, interval: Duration) -> Result<()> {
    std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            let mut walker = Walker::default();
            loop {
                walker.round(&maps, &metrics);
                std::thread::sleep(interval);
            }
        })
        .context("starting the conntrack thread")?;
    Ok(())
}

/// Opens the maps the walk reads from their pins.
pub fn open(
    path: impl Fn(&str) -> std::path::PathBuf,
    nat_capacity: u32,
    policy_capacity: u32,
) -> Result<StatsMaps> {
    let open = |name: &str| -> Result<Map> {
        let p = path(name);
        let data =
            MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
        Map::from_map_data(data).with_context(|| format!("map {name}"))
    };
    let maps = StatsMaps {
        nat: open(proxy_common::MAP_NAT_CONNTRACK)?,
        policy: open(proxy_common::MAP_POLICY_CONNTRACK)?,
        created: open(proxy_common::MAP_CONNTRACK_CREATED)?,
        service_counters: open(proxy_common::MAP_SERVICE_COUNTERS)?,
        nat_capacity,
        policy_capacity,
    };
    if map_data(&maps.nat).is_none() || map_data(&maps.policy).is_none() {
        warn!(
            event = "conntrack_gc",
            "the conntrack maps are not hash maps: no garbage collection"
        );
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{IPPROTO_TCP, IPPROTO_UDP, SCOPE_SOCKET, SECOND_NS, v4_mapped};

    #[test]
    fn evictions_are_what_left_the_table_other_than_by_gc() {
        let mut e = Evictions::default();
        // First walk: 5 created so far, 5 live (3 more created during the walk).
        assert_eq!(e.observe(5, 8, 0, 8), 0);
        // 10 more created, GC deleted 4, 12 live: 8 + 10 - 4 = 14 expected, 2 evicted.
        assert_eq!(e.observe(18, 18, 4, 12), 2);
        // Quiet: nothing new.
        assert_eq!(e.observe(18, 18, 4, 12), 2);
        // Entries created during a walk appear live before they count as created: the
        // estimate dips, the counter does not.
        assert_eq!(e.observe(18, 21, 4, 15), 2);
        // They are counted the next time: 21 - 8 - 4 - (13 - 8) = 4 evicted.
        assert_eq!(e.observe(21, 21, 4, 13), 4);
    }

    #[test]
    fn evictions_start_at_zero_with_entries_from_before_the_counter() {
        // A table adopted from an agent that did not count: more live than created.
        let mut e = Evictions::default();
        assert_eq!(e.observe(0, 0, 0, 100), 0);
        assert_eq!(e.observe(1, 1, 0, 101), 0);
        // 2 more came, yet 1 fewer live: LRU pushed out 3.
        assert_eq!(e.observe(3, 3, 0, 100), 3);
    }

    fn frontend(last: u8, port: u16) -> ServiceKey {
        ServiceKey::new(
            v4_mapped(u32::from_ne_bytes([10, 96, 0, last])),
            port.to_be(),
            IPPROTO_TCP,
            SCOPE_SOCKET,
            0,
        )
    }

    fn counters(connections: u64, no_endpoints: u64) -> ServiceCounters {
        ServiceCounters {
            connections,
            no_endpoints,
        }
    }

    #[test]
    fn frontend_counters_are_attributed_to_their_services_from_the_first_read_on() {
        let web = ("default".to_string(), "web".to_string());
        let dns = ("kube-system".to_string(), "dns".to_string());
        let owners: StdHashMap<_, _> = [
            (frontend(1, 80), web.clone()),
            (frontend(1, 443), web.clone()),
            (frontend(2, 53), dns.clone()),
        ]
        .into_iter()
        .collect();
        let mut c = ServiceCounting::default();
        // Counts from before the agent started are the baseline.
        assert!(
            c.observe(vec![(frontend(1, 80), counters(7, 0))], &owners)
                .is_empty()
        );
        let got = c.observe(
            vec![
                (frontend(1, 80), counters(10, 0)),
                (frontend(1, 443), counters(2, 0)),
                (frontend(2, 53), counters(0, 4)),
                // Nobody owns it (a removed Service): not counted.
                (frontend(9, 80), counters(50, 0)),
            ],
            &owners,
        );
        assert_eq!(got, vec![(web.clone(), 5, 0), (dns.clone(), 0, 4)]);
        // A frontend's counter evicted and recreated: its new value is all new.
        let got = c.observe(
            vec![
                (frontend(1, 80), counters(1, 0)),
                (frontend(1, 443), counters(2, 0)),
                (frontend(2, 53), counters(0, 4)),
            ],
            &owners,
        );
        assert_eq!(got, vec![(web, 1, 0)]);
    }

    fn nat_key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, dir: u8) -> NatKey {
        NatKey {
            saddr: v4_mapped(u32::from_ne_bytes(saddr)),
            daddr: v4_mapped(u32::from_ne_bytes(daddr)),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: IPPROTO_TCP,
            direction: dir,
            _pad: 0,
        }
    }

    fn nat_value(addr: [u8; 4], port: u16, nat: Option<([u8; 4], u16)>, seen: u64) -> NatValue {
        NatValue {
            addr: v4_mapped(u32::from_ne_bytes(addr)),
            nat_addr: nat.map_or([0; 4], |(a, _)| v4_mapped(u32::from_ne_bytes(a))),
            port: port.to_be(),
            nat_port: nat.map_or(0, |(_, p)| p.to_be()),
            closing: 0,
            _pad: [0; 3],
            last_seen_ns: seen,
        }
    }

    #[test]
    fn replies_find_their_original_as_the_programs_do() {
        let (client, node, backend, snat) =
            ([192, 0, 2, 1], [10, 0, 0, 1], [10, 1, 0, 5], [10, 0, 0, 1]);
        // Source-translated: the reply (backend → node:61234) names the client.
        let original_key = nat_key(client, node, 40000, 30080, NAT_ORIGINAL);
        let original = nat_value(backend, 8080, Some((snat, 61234)), 100);
        let reply_key = nat_key(backend, snat, 8080, 61234, NAT_REPLY);
        let reply = nat_value(node, 30080, Some((client, 40000)), 0);
        assert_eq!(original_of(&reply_key, &reply), original_key);
        assert!(reply_in_use(&reply_key, Some(&original), 200));
        // Gone, or expired, or now to another backend: the programs ignore the reply.
        assert!(!reply_in_use(&reply_key, None, 200));
        assert!(!reply_in_use(
            &reply_key,
            Some(&original),
            100 + proxy_common::TCP_IDLE_NS
        ));
        let moved = nat_value([10, 1, 0, 6], 8080, Some((snat, 61234)), 100);
        assert!(!reply_in_use(&reply_key, Some(&moved), 200));
        // A local backend: the reply (backend → client) is not translated back to a client.
        let local_reply_key = nat_key(backend, client, 8080, 40000, NAT_REPLY);
        let local_reply = nat_value(node, 30080, None, 0);
        assert_eq!(original_of(&local_reply_key, &local_reply), original_key);
    }

    #[test]
    fn expiry_agrees_with_the_programs_timeouts() {
        let key = nat_key([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, NAT_ORIGINAL);
        let mut v = nat_value([3, 3, 3, 3], 80, None, SECOND_NS);
        let tcp_limit = proxy_common::TCP_IDLE_NS;
        assert!(!nat_expired(&v, key.proto, SECOND_NS + tcp_limit - 1));
        assert!(nat_expired(&v, key.proto, SECOND_NS + tcp_limit));
        v.closing = 1;
        assert!(nat_expired(&v, key.proto, SECOND_NS + 10 * SECOND_NS));
        assert!(!nat_expired(&v, key.proto, SECOND_NS + 9 * SECOND_NS));
        v.closing = 0;
        assert!(nat_expired(&v, IPPROTO_UDP, SECOND_NS + 60 * SECOND_NS));
        // The policy program expires strictly after the limit.
        let ct_key = ConntrackKey {
            ifindex: 1,
            saddr: 1,
            daddr: 2,
            sport: 1,
            dport: 2,
            proto: IPPROTO_UDP,
            _pad: [0; 3],
        };
        let ct = ConntrackValue {
            last_seen_ns: 0,
            origin: 0,
            closing: 0,
            _pad: [0; 6],
        };
        assert!(!policy_expired(&ct_key, &ct, 60 * SECOND_NS));
        assert!(policy_expired(&ct_key, &ct, 60 * SECOND_NS + 1));
    }
}
