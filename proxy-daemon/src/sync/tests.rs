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

/// What a restarted agent reads back from the maps.
fn read_back(maps: &CheckedMaps) -> ProgrammedState {
    ProgrammedState {
        services: maps.services.iter().map(|(k, v)| (*k, *v)).collect(),
        backends: maps.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        affinity_matches: maps.matches.iter().copied().collect(),
        source_ranges: maps.source_ranges.iter().copied().collect(),
    }
}

fn with_ranges(mut t: ServiceTable, f: Frontend, ranges: &[&str]) -> ServiceTable {
    let target = t.frontends.get_mut(&f).expect("frontend in table");
    target.source_ranges = Some(ranges.iter().map(|r| r.parse().unwrap()).collect());
    t
}

#[test]
fn an_adopted_mirror_makes_the_first_sync_write_nothing() {
    let mut maps = CheckedMaps::default();
    let lb = Frontend {
        scope: Scope::External,
        ..frontend(3, 80)
    };
    let t = with_ranges(
        table(&[
            (frontend(1, 80), &[1, 2]),
            (frontend(2, 53), &[3]),
            (lb, &[1]),
        ]),
        lb,
        &["172.18.0.0/16", "192.0.2.7/32"],
    );
    let t = {
        let mut t = t;
        t.frontends
            .get_mut(&frontend(2, 53))
            .unwrap()
            .affinity_timeout_s = 30;
        t
    };
    let mut before = Syncer::new();
    assert!(before.sync(&t, &mut maps).errors.is_empty());

    let (mut after, report) = Syncer::adopt(&read_back(&maps));
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!((report.frontends, report.backends), (3, 3));
    maps.ops.clear();
    let sync = after.sync(&t, &mut maps);
    assert!(!sync.changed(), "{:?} {:?}", sync, maps.ops);
    assert_eq!(after.service_entries(), before.service_entries());
}

#[test]
fn after_adoption_a_change_writes_the_difference_and_removes_what_is_stale() {
    let mut maps = CheckedMaps::default();
    let (a, b) = (frontend(1, 80), frontend(2, 80));
    let mut before = Syncer::new();
    before.sync(&table(&[(a, &[1, 2, 3]), (b, &[4])]), &mut maps);
    let ids_before: BTreeSet<u32> = maps.backends.keys().copied().collect();

    let (mut after, _) = Syncer::adopt(&read_back(&maps));
    // While it was down: backend 2 left, backend 5 came, Service b went.
    let t = table(&[(a, &[1, 3, 5])]);
    let report = after.sync(&t, &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(visible(&maps, a), Some(vec![1, 3, 5]));
    assert_eq!(visible(&maps, b), None);
    // Only a's entries are left (master + 3 slots), and backends 1, 3 and 5.
    assert_eq!(maps.services.len(), 4, "{:?}", maps.services);
    assert_eq!(maps.backends.len(), 3, "{:?}", maps.backends);
    // Backend 1 and 3 kept their ids; 5 got a new one, not one in use before.
    let new_id = *maps
        .backends
        .iter()
        .find(|(_, be)| be.addr[3].to_ne_bytes()[3] == 5)
        .unwrap()
        .0;
    assert!(!ids_before.contains(&new_id), "id {new_id} reused");
    // Written: backend 5 and slots 2 and 3 (slots are positional: 1 3 5 where 1 2 3 was);
    // deleted: b's master and slot, backends 2 and 4. Nothing else is touched.
    assert_eq!(report.map_writes, 3, "{:?}", maps.ops);
    assert_eq!(report.map_deletes, 4, "{:?}", maps.ops);
}

#[test]
fn adoption_survives_holes_duplicates_and_junk() {
    let mut maps = CheckedMaps::default();
    let a = frontend(1, 80);
    Syncer::new().sync(&table(&[(a, &[1, 2])]), &mut maps);
    let mut state = read_back(&maps);
    // An interrupted sync left slot 3 without slot 2's neighbour, a duplicate backend,
    // an unused backend and entries that decode to nothing.
    let slot1 = state
        .services
        .iter()
        .find(|(k, _)| k.slot == 1)
        .map(|(_, v)| *v)
        .unwrap();
    state.services.retain(|(k, _)| k.slot != 2);
    state.services.push((service_key(a, 3), slot1));
    let dup = state.backends[0].1;
    state.backends.push((90, dup));
    state.backends.push((
        91,
        Backend::new(
            map_addr(Ipv4Addr::new(10, 244, 0, 9).into()),
            80u16.to_be(),
            6,
            0,
        ),
    ));
    state.backends.push((92, Backend::new([0; 4], 0, 99, 0)));
    let mut junk = service_key(a, 1);
    junk.scope = 7;
    state.services.push((junk, ServiceValue::slot(1)));
    // The model holds what was read back.
    maps.services = state.services.iter().copied().collect();
    maps.backends = state.backends.iter().copied().collect();

    let (mut syncer, report) = Syncer::adopt(&state);
    assert_eq!(report.warnings.len(), 3, "{:?}", report.warnings);
    let sync = syncer.sync(&table(&[(a, &[1, 2])]), &mut maps);
    assert!(sync.errors.is_empty(), "{:?}", sync.errors);
    assert_eq!(visible(&maps, a), Some(vec![1, 2]));
    assert_eq!(maps.services.len(), 3, "{:?}", maps.services);
    assert_eq!(maps.backends.len(), 2, "{:?}", maps.backends);
    // Ids go on past the highest one seen.
    assert!(syncer.next_id > 92);
}

#[test]
fn decoding_inverts_encoding() {
    for ip in ["10.96.0.1", "fd00::1"] {
        let ip: IpAddr = ip.parse().unwrap();
        let f = Frontend {
            ip,
            port: 8443,
            protocol: Protocol::Udp,
            scope: Scope::External,
        };
        let k = service_key(f, 0);
        assert_eq!(decode_frontend(k.addr, k.port, k.proto, k.scope), Some(f));
    }
    let f = Frontend {
        scope: Scope::External,
        ..frontend(9, 80)
    };
    for range in ["172.18.0.0/16", "2001:db8:1::/48"] {
        let range: IpNet = range.parse().unwrap();
        let (k, len) = source_range_key(f, range);
        assert_eq!(decode_source_range(&k, len), Some((f, range)));
        assert_eq!(decode_source_range(&k, 10), None);
        assert_eq!(decode_source_range(&k, 400), None);
    }
}

/// Everything the maps hold, as a reader sees it: per frontend its backends (address, port,
/// flags) in slot order, its affinity and source ranges.
fn contents(maps: &CheckedMaps) -> BTreeMap<Frontend, (Vec<String>, u32, Vec<String>)> {
    let state = read_back(maps);
    let (syncer, report) = Syncer::adopt(&state);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let by_id: HashMap<u32, &Backend> = maps.backends.iter().map(|(id, b)| (*id, b)).collect();
    syncer
        .frontends
        .iter()
        .map(|(f, p)| {
            let backends = p
                .slots
                .iter()
                .map(|id| format!("{:?}", by_id[id]))
                .collect();
            let ranges = p.source_ranges.iter().map(ToString::to_string).collect();
            (*f, (backends, p.affinity_timeout_s, ranges))
        })
        .collect()
}

/// A manifest directory changed step by step (Services, slices, Pods, Nodes added, changed
/// and removed): the incremental compile gives what a full compile of the same snapshot gives,
/// its delta names every frontend that changed, and syncing only the delta leaves the maps as
/// a full sync does.
#[test]
fn incremental_compile_and_delta_sync_equal_full_ones_through_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let write = |name: &str, text: &str| {
        std::fs::write(d.join(name), text).expect("write");
    };
    let remove = |name: &str| std::fs::remove_file(d.join(name)).expect("rm");
    let svc = |name: &str, ip: &str, extra: &str| {
        let node_port = if extra.contains("NodePort") {
            ", nodePort: 30080"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80{node_port}}}]{extra}}}\n"
        )
    };
    let slice = |name: &str, service: &str, ips: &[&str], node: &str| {
        let eps: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [\"{ip}\"], nodeName: {node}}}"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            eps.join(", ")
        )
    };
    let pod = |name: &str, app: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: node-a, containers: [{{name: c}}]}}\n\
             status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        )
    };
    let node = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\n\
             status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
        )
    };
    let steps: Vec<Box<dyn Fn()>> = vec![
        Box::new(|| {
            write("a.yaml", &svc("a", "10.96.0.1", ""));
            write(
                "a-slice.yaml",
                &slice("a-1", "a", &["10.244.0.1", "10.244.0.2"], "node-a"),
            );
            write("b.yaml", &svc("b", "10.96.0.2", ", type: NodePort"));
            write(
                "b-slice.yaml",
                &slice("b-1", "b", &["10.244.1.1"], "node-b"),
            );
        }),
        // One endpoint changes.
        Box::new(|| {
            write(
                "a-slice.yaml",
                &slice("a-1", "a", &["10.244.0.1", "10.244.0.3"], "node-a"),
            )
        }),
        // The node gets an address: NodePorts appear.
        Box::new(|| write("node.yaml", &node("172.18.0.2"))),
        Box::new(|| write("node.yaml", &node("172.18.0.3"))),
        // A Service with a selector and its pods.
        Box::new(|| {
            write("c.yaml", &svc("c", "10.96.0.3", ", selector: {app: c}"));
            write("pod1.yaml", &pod("c-1", "c", "10.244.2.1"));
        }),
        Box::new(|| write("pod2.yaml", &pod("c-2", "c", "10.244.2.2"))),
        Box::new(|| remove("pod1.yaml")),
        // A second Service claims a's cluster IP; then a goes and it takes over.
        Box::new(|| write("z.yaml", &svc("z", "10.96.0.1", ""))),
        Box::new(|| remove("a.yaml")),
        // A slice moves to another Service, then goes.
        Box::new(|| {
            write(
                "b-slice.yaml",
                &slice("b-1", "z", &["10.244.1.1"], "node-b"),
            )
        }),
        Box::new(|| remove("b-slice.yaml")),
        Box::new(|| remove("node.yaml")),
        Box::new(|| {}),
    ];
    let mut source = cluster_model::ManifestSource::new(d);
    let mut compiler = crate::compile::Compiler::default();
    let (mut delta_syncer, mut delta_maps) = (Syncer::new(), CheckedMaps::default());
    let (mut full_syncer, mut full_maps) = (Syncer::new(), CheckedMaps::default());
    let mut previous = ServiceTable::default();
    for (i, step) in steps.iter().enumerate() {
        step();
        // Past the source's racy margin: unchanged files are then not read again, and the
        // snapshot names only what changed.
        std::thread::sleep(cluster_model::RACY_MARGIN * 2);
        let reload = source.reload();
        assert!(reload.new_problems.is_empty(), "{:?}", reload.new_problems);
        let snapshot = reload.snapshot;
        let delta = compiler.update(&snapshot, "node-a");
        let full = crate::compile::compile(&snapshot, "node-a");
        assert_eq!(compiler.table(), &full.table, "step {i}");
        assert_eq!(compiler.warnings(), &full.warnings[..], "step {i}");
        let differing: BTreeSet<Frontend> = previous
            .frontends
            .keys()
            .chain(full.table.frontends.keys())
            .filter(|f| previous.frontends.get(f) != full.table.frontends.get(f))
            .copied()
            .collect();
        assert_eq!(delta.frontends, differing, "step {i}");
        let report = delta_syncer.sync_delta(compiler.table(), &delta, &mut delta_maps);
        assert!(report.errors.is_empty(), "step {i}: {:?}", report.errors);
        full_syncer.sync(&full.table, &mut full_maps);
        assert_eq!(contents(&delta_maps), contents(&full_maps), "step {i}");
        assert_eq!(
            delta_maps.backends.len(),
            full_maps.backends.len(),
            "step {i}"
        );
        previous = full.table;
    }
    assert!(!previous.frontends.is_empty());
}
