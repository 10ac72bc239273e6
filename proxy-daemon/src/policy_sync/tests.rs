use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use proxy_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    POLICY_CLASS_ANY, POLICY_CLASS_OWN_NODE, RULE_PREFIX_ANY_PORT, RULE_PREFIX_ANY_PROTOCOL,
};
use sluice_policy::compile_node;

use super::*;
use crate::policy_tables::{ClassNumbers, build, port_prefixes};
use crate::policy_test_support::{
    Kernel, Rng, endpoint, net, network_policy, node, plain_pod, pod, routes, rule, snapshot, v4,
};

// ---------------------------------------------------------------------------
// A model of the maps
// ---------------------------------------------------------------------------

/// One call the syncer made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    PutRule(RuleEntry),
    DeleteRule(RuleEntry),
    PutPeer(Ipv4Net, u32),
    DeletePeer(Ipv4Net),
    PutEndpoint(u32, PolicyEndpoint),
    DeleteEndpoint(u32),
}

impl Op {
    /// Its place in the safe order: new rules; endpoints isolating less (`before` is what the
    /// maps held for it) and endpoints gone; addresses written, then removed; endpoints
    /// isolating more and new ones; old rules.
    fn phase(self, before: &PolicyTables) -> u8 {
        match self {
            Op::PutRule(_) => 0,
            Op::PutEndpoint(ifindex, value) => {
                let relaxes = before.endpoints.get(&ifindex).is_some_and(|had| {
                    [DIRECTION_INGRESS, DIRECTION_EGRESS]
                        .iter()
                        .all(|&d| had.isolated(d) || !value.isolated(d))
                });
                if relaxes { 1 } else { 4 }
            }
            Op::DeleteEndpoint(_) => 1,
            Op::PutPeer(..) => 2,
            Op::DeletePeer(_) => 3,
            Op::DeleteRule(_) => 5,
        }
    }

    fn is_put(self) -> bool {
        matches!(self, Op::PutRule(_) | Op::PutPeer(..) | Op::PutEndpoint(..))
    }
}

/// One logged call: what, whether it succeeded, and what the maps held after it.
struct Step {
    op: Op,
    ok: bool,
    after: PolicyTables,
}

/// The three policy maps in memory, recording every call.
#[derive(Default)]
struct ModelMaps {
    state: PolicyTables,
    log: Vec<Step>,
    /// Calls (indexes into `log`) that fail.
    fail_calls: BTreeSet<usize>,
    /// Every delete fails.
    fail_deletes: bool,
    /// Entries the rules map holds at most: new keys past it fail, as a full BPF map does.
    rule_capacity: Option<usize>,
    /// Calls that found nothing to do: deletes of absent keys, puts of what is there.
    wasted: Vec<Op>,
}

impl ModelMaps {
    fn holding(state: PolicyTables) -> ModelMaps {
        ModelMaps {
            state,
            ..ModelMaps::default()
        }
    }

    /// The calls from the `start`th on.
    fn ops_since(&self, start: usize) -> Vec<Op> {
        self.log[start..].iter().map(|s| s.op).collect()
    }

    fn call(&mut self, op: Op) -> Result<(), String> {
        let index = self.log.len();
        let result = if self.fail_calls.contains(&index) {
            Err(format!("injected failure of call {index}"))
        } else if self.fail_deletes && !op.is_put() {
            Err("injected delete failure".to_string())
        } else {
            self.change(op)
        };
        self.log.push(Step {
            op,
            ok: result.is_ok(),
            after: self.state.clone(),
        });
        result
    }

    fn change(&mut self, op: Op) -> Result<(), String> {
        let changed = match op {
            Op::PutRule(rule) => {
                let full = self
                    .rule_capacity
                    .is_some_and(|c| self.state.rules.len() >= c);
                if full && !self.state.rules.contains(&rule) {
                    return Err("map full".to_string());
                }
                self.state.rules.insert(rule)
            }
            Op::DeleteRule(rule) => self.state.rules.remove(&rule),
            Op::PutPeer(prefix, class) => self.state.peers.insert(prefix, class) != Some(class),
            Op::DeletePeer(prefix) => self.state.peers.remove(&prefix).is_some(),
            Op::PutEndpoint(ifindex, value) => {
                self.state.endpoints.insert(ifindex, value) != Some(value)
            }
            Op::DeleteEndpoint(ifindex) => self.state.endpoints.remove(&ifindex).is_some(),
        };
        if !changed {
            self.wasted.push(op);
        }
        Ok(())
    }
}

impl PolicyMaps for ModelMaps {
    type Error = String;

    fn put_rule(&mut self, rule: RuleEntry) -> Result<(), String> {
        self.call(Op::PutRule(rule))
    }

    fn delete_rule(&mut self, rule: RuleEntry) -> Result<(), String> {
        self.call(Op::DeleteRule(rule))
    }

    fn put_peer(&mut self, prefix: Ipv4Net, class: u32) -> Result<(), String> {
        self.call(Op::PutPeer(prefix, class))
    }

    fn delete_peer(&mut self, prefix: Ipv4Net) -> Result<(), String> {
        self.call(Op::DeletePeer(prefix))
    }

    fn put_endpoint(&mut self, ifindex: u32, value: PolicyEndpoint) -> Result<(), String> {
        self.call(Op::PutEndpoint(ifindex, value))
    }

    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), String> {
        self.call(Op::DeleteEndpoint(ifindex))
    }
}

// ---------------------------------------------------------------------------
// What every sync must satisfy
// ---------------------------------------------------------------------------

/// The rules of one (interface, class, direction).
fn rules_of(tables: &PolicyTables, ifindex: u32, class: u32, direction: u8) -> BTreeSet<RuleEntry> {
    tables
        .rules
        .iter()
        .filter(|r| {
            r.key.ifindex == ifindex && r.key.class == class && r.key.direction == direction
        })
        .copied()
        .collect()
}

/// At every step, every endpoint present has, in each direction it is isolated in, for each
/// address prefix, all the rules of the prefix's current class from the tables (old or new)
/// that gave the prefix that class; and all its any-peer rules of the old or of the new tables.
/// So an address never meets a class its pod has no rules for yet, or no longer.
fn check_rules_never_missing(
    old: &PolicyTables,
    new: &PolicyTables,
    steps: &[Step],
) -> Result<(), String> {
    for (n, step) in steps.iter().enumerate() {
        let s = &step.after;
        for (&ifindex, value) in &s.endpoints {
            for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
                if !value.isolated(direction) {
                    continue;
                }
                let has = |class| rules_of(s, ifindex, class, direction);
                let covers = |tables: &PolicyTables, class| {
                    has(class).is_superset(&rules_of(tables, ifindex, class, direction))
                };
                if !covers(old, POLICY_CLASS_ANY) && !covers(new, POLICY_CLASS_ANY) {
                    return Err(format!(
                        "after step {n} ({:?}), interface {ifindex} direction {direction} lacks \
                         any-peer rules",
                        step.op
                    ));
                }
                for (prefix, &class) in &s.peers {
                    let from_old = old.peers.get(prefix) == Some(&class) && covers(old, class);
                    let from_new = new.peers.get(prefix) == Some(&class) && covers(new, class);
                    if !from_old && !from_new {
                        return Err(format!(
                            "after step {n} ({:?}), interface {ifindex} direction {direction} \
                             meets {prefix} as class {class} with only {:?}",
                            step.op,
                            has(class)
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Syncs `want` into `maps` and checks what it did: the report counts the calls, the mirror
/// is what the maps hold, calls come in the safe order and none is wasted, and (when nothing
/// failed) no endpoint ever lacks its rules.
fn sync_checked(
    syncer: &mut PolicySyncer,
    want: &PolicyTables,
    maps: &mut ModelMaps,
) -> PolicySyncReport {
    let old = maps.state.clone();
    let start = maps.log.len();
    let report = syncer.sync(want, maps);
    let steps = &maps.log[start..];

    let count = |put: bool, ok: bool| {
        steps
            .iter()
            .filter(|s| s.op.is_put() == put && s.ok == ok)
            .count()
    };
    assert_eq!(report.writes, count(true, true), "writes counted");
    assert_eq!(report.deletes, count(false, true), "deletes counted");
    assert_eq!(
        report.errors.len(),
        count(true, false) + count(false, false),
        "one error per failed call: {:?}",
        report.errors
    );
    assert_eq!(
        syncer.programmed(),
        &maps.state,
        "the mirror is what the maps hold"
    );
    assert_eq!(maps.wasted, vec![], "calls that changed nothing");
    let phases: Vec<u8> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let before = if i == 0 { &old } else { &steps[i - 1].after };
            s.op.phase(before)
        })
        .collect();
    assert!(
        phases.is_sorted(),
        "out of order: {:?}",
        steps.iter().map(|s| s.op).collect::<Vec<_>>()
    );
    if report.errors.is_empty()
        && let Err(e) = check_rules_never_missing(&old, want, steps)
    {
        panic!("{e}");
    }
    report
}

/// A syncer and maps that both hold `old`.
fn programmed_with(old: &PolicyTables) -> (PolicySyncer, ModelMaps) {
    let syncer = PolicySyncer {
        programmed: old.clone(),
    };
    (syncer, ModelMaps::holding(old.clone()))
}

/// The maps after a checked sync from `old` to `new`, and its report.
fn sync_from(old: &PolicyTables, new: &PolicyTables) -> (PolicySyncReport, ModelMaps) {
    let (mut syncer, mut maps) = programmed_with(old);
    let report = sync_checked(&mut syncer, new, &mut maps);
    (report, maps)
}

/// A syncer and maps that `tables` were synced into, from empty.
fn synced(tables: &PolicyTables) -> (PolicySyncer, ModelMaps) {
    let mut syncer = PolicySyncer::default();
    let mut maps = ModelMaps::default();
    sync_checked(&mut syncer, tables, &mut maps);
    (syncer, maps)
}

/// Interface `ifindex` allows every protocol in from `class`.
fn ingress_from(ifindex: u32, class: u32) -> RuleEntry {
    rule(
        RULE_PREFIX_ANY_PROTOCOL,
        ifindex,
        class,
        DIRECTION_INGRESS,
        0,
        0,
    )
}

// ---------------------------------------------------------------------------
// Random tables
// ---------------------------------------------------------------------------

/// Tables over a small universe (4 interfaces, 7 classes, 8 prefixes), so consecutive ones
/// share, change and drop entries.
fn random_tables(rng: &mut Rng) -> PolicyTables {
    const PREFIXES: [&str; 7] = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.3/32",
        "10.1.2.4/32",
        "172.16.0.0/12",
        "192.168.0.1/32",
    ];
    const CLASSES: [u32; 7] = [POLICY_CLASS_OWN_NODE, 2, 3, 4, 5, 6, 7];
    let mut t = PolicyTables::default();
    t.peers.insert(net("0.0.0.0/0"), rng.pick(&CLASSES[1..]));
    for prefix in PREFIXES {
        if rng.below(2) == 0 {
            t.peers.insert(net(prefix), rng.pick(&CLASSES));
        }
    }
    for ifindex in 1..=4 {
        if rng.below(4) == 0 {
            continue;
        }
        let value = endpoint(rng.below(2) as u8, rng.below(2) as u8);
        t.endpoints.insert(ifindex, value);
        for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
            if !value.isolated(direction) {
                continue;
            }
            for _ in 0..rng.below(5) {
                let class = rng.pick(&[POLICY_CLASS_ANY, 2, 3, 4, 5, 6, 7]);
                let proto = rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
                // (prefix length, protocol, port) of each entry.
                let entries = match rng.below(3) {
                    0 => vec![(RULE_PREFIX_ANY_PROTOCOL, 0, 0)],
                    1 => vec![(RULE_PREFIX_ANY_PORT, proto, 0)],
                    _ => {
                        let first = 8000 + rng.below(100) as u16;
                        let last = first + rng.below(40) as u16;
                        port_prefixes(first, last)
                            .into_iter()
                            .map(|(port, bits)| {
                                (RULE_PREFIX_ANY_PORT + u32::from(bits), proto, port)
                            })
                            .collect()
                    }
                };
                for (prefix_len, proto, port) in entries {
                    t.rules
                        .insert(rule(prefix_len, ifindex, class, direction, proto, port));
                }
            }
        }
    }
    t
}

/// Empty, then random tables, the same ones twice in a row now and then, then empty again.
fn random_sequence(seed: u64, len: usize) -> Vec<PolicyTables> {
    let mut rng = Rng(seed);
    let mut sequence = vec![PolicyTables::default()];
    for _ in 0..len {
        let next = if rng.below(5) == 0 {
            sequence.last().unwrap().clone()
        } else {
            random_tables(&mut rng)
        };
        sequence.push(next);
    }
    sequence.push(PolicyTables::default());
    sequence
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn sync_makes_the_maps_and_the_mirror_equal_the_wanted_tables() {
    let mut syncer = PolicySyncer::default();
    let mut maps = ModelMaps::default();
    for (n, want) in random_sequence(0x5111ce, 200).iter().enumerate() {
        let report = sync_checked(&mut syncer, want, &mut maps);
        assert!(report.errors.is_empty(), "sync {n}: {:?}", report.errors);
        assert_eq!(&maps.state, want, "sync {n}");
        assert_eq!(syncer.programmed(), want, "sync {n}");
    }
    assert!(maps.state.rules.is_empty() && maps.state.peers.is_empty());
}

#[test]
fn a_second_sync_with_the_same_tables_writes_and_deletes_nothing() {
    let mut syncer = PolicySyncer::default();
    let mut maps = ModelMaps::default();
    for want in random_sequence(0xa9a1, 60) {
        let first = sync_checked(&mut syncer, &want, &mut maps);
        let calls = maps.log.len();
        let second = sync_checked(&mut syncer, &want, &mut maps);
        assert_eq!(second, PolicySyncReport::default());
        assert!(!second.changed());
        assert_eq!(maps.log.len(), calls, "no call at all");
        assert_eq!(first.changed(), first.writes + first.deletes > 0);
    }
}

/// Interface 7 isolated for ingress, allowing 10.1.2.3 (class 3); everything else class 2.
fn one_allowed_address() -> PolicyTables {
    let mut t = PolicyTables::default();
    t.peers.insert(net("0.0.0.0/0"), 2);
    t.peers.insert(net("10.1.2.3/32"), 3);
    t.endpoints.insert(7, endpoint(1, 0));
    t.rules.insert(ingress_from(7, 3));
    t
}

#[test]
fn a_changed_class_or_endpoint_value_is_one_write_and_no_delete() {
    let old = one_allowed_address();
    let (mut syncer, mut maps) = synced(&old);

    let mut new = old.clone();
    new.rules.clear();
    new.peers.insert(net("10.1.2.3/32"), 4);
    new.endpoints.insert(7, endpoint(1, 1));
    new.rules.insert(ingress_from(7, 4));
    let start = maps.log.len();
    let report = sync_checked(&mut syncer, &new, &mut maps);
    assert_eq!(
        maps.ops_since(start),
        vec![
            Op::PutRule(ingress_from(7, 4)),
            Op::PutPeer(net("10.1.2.3/32"), 4),
            Op::PutEndpoint(7, endpoint(1, 1)),
            Op::DeleteRule(ingress_from(7, 3)),
        ]
    );
    assert_eq!((report.writes, report.deletes), (3, 1));
}

#[test]
fn removals_go_endpoints_then_addresses_then_rules() {
    let (mut syncer, mut maps) = synced(&one_allowed_address());
    let start = maps.log.len();
    let report = sync_checked(&mut syncer, &PolicyTables::default(), &mut maps);
    assert_eq!(
        maps.ops_since(start),
        vec![
            Op::DeleteEndpoint(7),
            Op::DeletePeer(net("0.0.0.0/0")),
            Op::DeletePeer(net("10.1.2.3/32")),
            Op::DeleteRule(ingress_from(7, 3)),
        ]
    );
    assert_eq!((report.writes, report.deletes), (0, 4));
    assert_eq!(maps.state, PolicyTables::default());
}

#[test]
fn every_failed_call_is_reported_and_the_next_healthy_sync_converges() {
    let mut rng = Rng(0xfa11);
    let mut pairs = Vec::new();
    for _ in 0..25 {
        pairs.push((random_tables(&mut rng), random_tables(&mut rng)));
    }
    pairs.push((PolicyTables::default(), random_tables(&mut rng)));
    pairs.push((random_tables(&mut rng), PolicyTables::default()));
    for (old, new) in &pairs {
        // How many calls a healthy sync of this change makes.
        let (mut dry_syncer, mut dry) = programmed_with(old);
        dry_syncer.sync(new, &mut dry);
        let calls = dry.log.len();
        for failing in 0..calls {
            let (mut syncer, mut maps) = programmed_with(old);
            maps.fail_calls.insert(failing);
            let report = sync_checked(&mut syncer, new, &mut maps);
            assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
            assert!(
                report.errors[0].contains(&format!("injected failure of call {failing}")),
                "{:?}",
                report.errors
            );
            // A pod that could not let go of a direction is not isolated in the other one
            // either until the next sync: at most that one more call is left.
            let done = report.writes + report.deletes;
            assert!(
                done == calls - 1
                    || (done + 2 == calls && matches!(maps.log[failing].op, Op::PutEndpoint(..))),
                "{done} of {calls} calls done after one failed"
            );
            assert_ne!(&maps.state, new, "the failed call left something undone");

            // Healed: the next sync does the call that failed (and what it held back).
            maps.fail_calls.clear();
            let failed_op = maps.log[failing].op;
            let start = maps.log.len();
            let retry = sync_checked(&mut syncer, new, &mut maps);
            assert_eq!(retry.errors, Vec::<String>::new());
            let retried = maps.ops_since(start);
            assert_eq!(retried[0], failed_op);
            assert_eq!(retried.len(), 1 + calls - 1 - done, "{retried:?}");
            assert_eq!(&maps.state, new);
            assert_eq!(syncer.programmed(), new);
        }
    }
}

#[test]
fn a_sync_where_many_calls_fail_converges_once_the_maps_heal() {
    let mut rng = Rng(0xdead_beef);
    let mut syncer = PolicySyncer::default();
    let mut maps = ModelMaps::default();
    let mut failed = 0;
    for _ in 0..40 {
        let want = random_tables(&mut rng);
        // Roughly one call in three fails.
        let start = maps.log.len();
        maps.fail_calls = (start..start + 400).filter(|_| rng.below(3) == 0).collect();
        let report = sync_checked(&mut syncer, &want, &mut maps);
        failed += report.errors.len();
        maps.fail_calls.clear();
        let report = sync_checked(&mut syncer, &want, &mut maps);
        assert!(report.errors.is_empty());
        assert_eq!(maps.state, want);
        assert_eq!(syncer.programmed(), &want);
    }
    assert!(failed > 50, "only {failed} failures injected");
}

#[test]
fn a_full_rules_map_fails_new_rules_and_a_later_sync_completes_them() {
    let entries = |class| -> BTreeSet<RuleEntry> {
        (0..10)
            .map(|i| {
                rule(
                    RULE_PREFIX_ANY_PORT + 16,
                    1,
                    class,
                    DIRECTION_INGRESS,
                    IPPROTO_TCP,
                    8000 + i,
                )
            })
            .collect()
    };
    let tables = |class| PolicyTables {
        endpoints: BTreeMap::from([(1, endpoint(1, 0))]),
        peers: BTreeMap::from([(net("0.0.0.0/0"), class)]),
        rules: entries(class),
    };
    let (old, new) = (tables(2), tables(3));
    let mut syncer = PolicySyncer::default();
    let mut maps = ModelMaps {
        rule_capacity: Some(12),
        ..ModelMaps::default()
    };
    assert!(sync_checked(&mut syncer, &old, &mut maps).errors.is_empty());

    // Room for 2 of the 10 new rules until the old ones are deleted at the end.
    let report = sync_checked(&mut syncer, &new, &mut maps);
    assert_eq!(report.errors.len(), 8, "{:?}", report.errors);
    assert!(report.errors.iter().all(|e| e.contains("map full")));
    assert_eq!(maps.state.rules.len(), 2);
    assert_eq!(maps.state.peers, new.peers);

    let report = sync_checked(&mut syncer, &new, &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.writes, report.deletes), (8, 0));
    assert_eq!(maps.state, new);
    assert_eq!(syncer.programmed(), &new);
}

#[test]
fn failed_deletes_stay_in_the_mirror_and_are_retried() {
    let mut rng = Rng(0xde1e7e);
    let old = random_tables(&mut rng);
    let (mut syncer, mut maps) = synced(&old);
    maps.fail_deletes = true;
    let empty = PolicyTables::default();
    let report = sync_checked(&mut syncer, &empty, &mut maps);
    let entries = old.endpoints.len() + old.peers.len() + old.rules.len();
    assert_eq!(report.errors.len(), entries);
    assert_eq!((report.writes, report.deletes), (0, 0));
    assert_eq!(syncer.programmed(), &old, "nothing was deleted");
    maps.fail_deletes = false;
    let report = sync_checked(&mut syncer, &empty, &mut maps);
    assert_eq!((report.writes, report.deletes), (0, entries));
    assert_eq!(maps.state, empty);
}

// ---------------------------------------------------------------------------
// Connections during a sync, on tables built from a cluster
// ---------------------------------------------------------------------------

/// Every connection both the old and the new tables allow is allowed after every step, as the
/// emulated kernel decides.
fn check_no_connection_lost(
    old: &PolicyTables,
    new: &PolicyTables,
    steps: &[Step],
) -> Result<(), String> {
    let ifindexes: BTreeSet<u32> = old
        .endpoints
        .keys()
        .chain(new.endpoints.keys())
        .copied()
        .collect();
    let mut peers: BTreeSet<Ipv4Addr> = ["8.8.8.8", "10.244.9.9"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    for p in old.peers.keys().chain(new.peers.keys()) {
        peers.insert(p.network());
        peers.insert(p.broadcast());
    }
    let mut ports: BTreeSet<u16> = BTreeSet::from([0, 1, 53, 80, 443, 8080, 65535]);
    for r in old.rules.iter().chain(&new.rules) {
        if r.prefix_len >= RULE_PREFIX_ANY_PORT {
            let start = u16::from_be_bytes(r.key.port);
            let size = 1u32 << (RULE_PREFIX_ANY_PORT + 16 - r.prefix_len);
            ports.extend([start, (u32::from(start) + size - 1) as u16]);
        }
    }
    let (before, after) = (Kernel::new(old), Kernel::new(new));
    let mut kept = Vec::new();
    for &i in &ifindexes {
        for d in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
            for &peer in &peers {
                for &port in &ports {
                    for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_ICMP] {
                        if before.passes(i, d, peer, port, proto)
                            && after.passes(i, d, peer, port, proto)
                        {
                            kept.push((i, d, peer, port, proto));
                        }
                    }
                }
            }
        }
    }
    for (n, step) in steps.iter().enumerate() {
        let during = Kernel::new(&step.after);
        for &(i, d, peer, port, proto) in &kept {
            if !during.passes(i, d, peer, port, proto) {
                return Err(format!(
                    "after step {n} ({:?}): interface {i} direction {d} peer {peer} port \
                     {port} proto {proto} denied, allowed before and after",
                    step.op
                ));
            }
        }
    }
    Ok(())
}

/// Tables for one version of the cluster, numbered by `numbers` as the agent does.
fn tables_for(yaml: &str, numbers: &mut ClassNumbers) -> PolicyTables {
    let routes = routes([("10.244.1.2", 11), ("10.244.1.3", 12)]);
    let gateway = IpAddr::V4(v4("10.244.1.1"));
    let built = build(
        &compile_node(&snapshot(yaml), "n1", &[gateway]),
        &routes,
        numbers,
    );
    assert!(built.pending.is_empty());
    built.tables
}

fn versions() -> Vec<(&'static str, String)> {
    let cluster = [
        node("n1", "172.18.0.2"),
        pod(
            "web",
            "{app: web}",
            "10.244.1.2",
            "{nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}",
        ),
        plain_pod("client", "{app: client}", "n1", "10.244.1.3"),
        plain_pod("db", "{app: db}", "n2", "10.244.2.2"),
    ]
    .concat();
    let web_in = network_policy(
        "web-in",
        "\
podSelector: {matchLabels: {app: web}}
ingress:
- from: [{podSelector: {matchLabels: {app: client}}}]
  ports: [{port: http}, {port: 80}]",
    );
    let web_block = network_policy(
        "web-block",
        "\
podSelector: {matchLabels: {app: web}}
ingress:
- from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}]
  ports: [{port: 8000, endPort: 8100}]",
    );
    let client_out = network_policy(
        "client-out",
        "\
podSelector: {matchLabels: {app: client}}
policyTypes: [Egress]
egress:
- to: [{podSelector: {matchLabels: {app: web}}}]
  ports: [{port: http}]
- to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.244.0.0/16]}}]",
    );
    let relabelled = cluster.replace("{app: client}", "{app: client, v: \"2\"}");
    let without_client: String = cluster
        .split("\n---\n")
        .filter(|d| !d.contains("name: client"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    vec![
        ("no policy", cluster.clone()),
        ("web isolated", format!("{cluster}{web_in}")),
        (
            "web isolated, ipBlock",
            format!("{cluster}{web_in}{web_block}"),
        ),
        (
            "client relabelled",
            format!("{relabelled}{web_in}{web_block}"),
        ),
        (
            "client gone",
            format!("{without_client}{web_in}{web_block}"),
        ),
        (
            "client egress too",
            format!("{cluster}{web_in}{web_block}{client_out}"),
        ),
        ("client egress only", format!("{cluster}{client_out}")),
    ]
}

#[test]
fn connections_allowed_before_and_after_a_sync_stay_allowed_during_it() {
    // Every pair of cluster versions, both ways.
    let versions = versions();
    let mut checked = 0;
    for (a, old_yaml) in &versions {
        for (b, new_yaml) in &versions {
            let mut numbers = ClassNumbers::default();
            let old = tables_for(old_yaml, &mut numbers);
            let new = tables_for(new_yaml, &mut numbers);
            checked += 1;
            let (report, maps) = sync_from(&old, &new);
            assert!(report.errors.is_empty());
            assert_eq!(maps.state, new);
            if let Err(e) = check_no_connection_lost(&old, &new, &maps.log) {
                panic!("{a} -> {b}: {e}");
            }
        }
    }
    assert!(checked >= 15, "only {checked} changes checked");
}

#[test]
fn random_changes_lose_no_connection_allowed_before_and_after() {
    let mut rng = Rng(0xc0ffee);
    for _ in 0..60 {
        let old = random_tables(&mut rng);
        // Other endpoints (isolation lifted, added, or both ways), addresses and rules.
        let new = random_tables(&mut rng);
        let (_, maps) = sync_from(&old, &new);
        if let Err(e) = check_no_connection_lost(&old, &new, &maps.log) {
            panic!("{e}\nold {old:#?}\nnew {new:#?}");
        }
    }
}

#[test]
fn the_checks_catch_rules_deleted_too_early() {
    // Interface 7 allows class 3; the address moves to class 4, allowed too.
    let mut old = PolicyTables::default();
    old.peers.insert(net("0.0.0.0/0"), 3);
    old.endpoints.insert(7, endpoint(1, 0));
    old.rules.insert(ingress_from(7, 3));
    let mut new = old.clone();
    new.peers.insert(net("0.0.0.0/0"), 4);
    new.rules.clear();
    new.rules.insert(ingress_from(7, 4));
    // A wrong order: the new class first, its rule last.
    let mut maps = ModelMaps::holding(old.clone());
    maps.put_peer(net("0.0.0.0/0"), 4).unwrap();
    maps.delete_rule(*old.rules.first().unwrap()).unwrap();
    maps.put_rule(*new.rules.first().unwrap()).unwrap();
    assert_eq!(maps.state, new);
    assert!(check_rules_never_missing(&old, &new, &maps.log).is_err());
    assert!(check_no_connection_lost(&old, &new, &maps.log).is_err());
    // The syncer's order passes both.
    let (_, maps) = sync_from(&old, &new);
    assert!(check_rules_never_missing(&old, &new, &maps.log).is_ok());
    assert!(check_no_connection_lost(&old, &new, &maps.log).is_ok());
}
