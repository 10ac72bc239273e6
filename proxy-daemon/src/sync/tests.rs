use super::*;

/// The last byte of a test address (IPv4 in these tests).
fn last_octet(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    }
}
use crate::compile::Scope;
use cluster_model::ObjectKey;
use std::net::Ipv4Addr;

/// A model of the BPF maps that checks, after every operation, that a
/// reader following master → slot → backend never finds a hole.
#[derive(Default)]
struct CheckedMaps {
    services: HashMap<ServiceKey, ServiceValue>,
    backends: HashMap<u32, Backend>,
    matches: BTreeSet<AffinityMatchKey>,
    source_ranges: BTreeSet<(SourceRangeKey, u32)>,
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
                        scope: key.scope,
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
    fn put_source_range(&mut self, key: SourceRangeKey, prefix_len: u32) -> Result<(), String> {
        self.ops.push(format!("put source range /{prefix_len}"));
        self.source_ranges.insert((key, prefix_len));
        self.check();
        Ok(())
    }
    fn delete_source_range(&mut self, key: SourceRangeKey, prefix_len: u32) -> Result<(), String> {
        self.ops.push(format!("delete source range /{prefix_len}"));
        self.source_ranges.remove(&(key, prefix_len));
        self.check();
        Ok(())
    }
}

fn frontend(last: u8, port: u16) -> Frontend {
    Frontend {
        ip: Ipv4Addr::new(10, 96, 0, last).into(),
        port,
        protocol: Protocol::Tcp,
        scope: Scope::Socket,
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
                    name: format!("svc{}", last_octet(f.ip)),
                },
                port_name: String::new(),
                backends: backends
                    .iter()
                    .map(|b| BackendAddr {
                        ip: Ipv4Addr::new(10, 244, 0, *b).into(),
                        port: 8080,
                        local: false,
                    })
                    .collect(),
                affinity_timeout_s: 0,
                source_ranges: None,
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
        .map(|m| maps.backends[&m.backend_id].addr[3].to_ne_bytes()[3])
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
            maps.backends[&id].addr[3].to_ne_bytes()[3]
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
            .map(|b| last_octet(b.ip))
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

#[test]
fn source_range_keys_cover_the_frontend_then_the_range_in_mapped_form() {
    let v4 = Frontend {
        ip: "198.18.0.20".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        scope: Scope::External,
    };
    let (key, bits) = source_range_key(v4, "10.0.0.0/8".parse().unwrap());
    assert_eq!(key.addr, map_addr(v4.ip));
    assert_eq!(key.source, map_addr("10.0.0.0".parse().unwrap()));
    // The frontend, the 96 bits of the IPv4-mapped prefix, then the range's own 8.
    assert_eq!(bits, SOURCE_RANGE_FRONTEND_BITS + 96 + 8);

    let v6 = Frontend {
        ip: "2001:db8::30".parse().unwrap(),
        ..v4
    };
    let (key, bits) = source_range_key(v6, "2001:db8:1::/48".parse().unwrap());
    assert_eq!(key.addr, map_addr(v6.ip));
    assert_eq!(key.source, map_addr("2001:db8:1::".parse().unwrap()));
    assert_eq!(bits, SOURCE_RANGE_FRONTEND_BITS + 48);
}
