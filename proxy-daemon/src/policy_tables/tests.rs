use std::collections::HashMap;

use cluster_model::ClusterSnapshot;
use proxy_common::{POLICY_CLASS_UNKNOWN, RULE_PREFIX_FULL};
use sluice_policy::{Endpoint, Peer, PolicySet, compile_node};

use super::*;
use crate::policy_test_support::{
    Kernel, Rng, endpoint, interface, namespace, network_policy, node, plain_pod, pod,
    prefix_matches, routes, rule, snapshot, v4,
};

// ---------------------------------------------------------------------------
// port_prefixes
// ---------------------------------------------------------------------------

/// The number of ports in a block of `bits` prefix bits.
fn block_size(bits: u8) -> u32 {
    1u32 << (16 - u32::from(bits))
}

/// The fewest aligned blocks covering `first..=last`, counted on the binary trie of ports:
/// a node inside the range is one block, a node outside none, a straddling one its children.
fn fewest_blocks(first: u32, last: u32, start: u32, size: u32) -> usize {
    let end = start + size - 1;
    if last < start || end < first {
        0
    } else if first <= start && end <= last {
        1
    } else {
        let half = size / 2;
        fewest_blocks(first, last, start, half) + fewest_blocks(first, last, start + half, half)
    }
}

/// Checks that the blocks of `first..=last` are aligned, disjoint, cover exactly the range, and
/// are as few as possible.
fn check_port_blocks(first: u16, last: u16) {
    let blocks = port_prefixes(first, last);
    let what = format!("port_prefixes({first}, {last}) = {blocks:?}");
    if first > last {
        assert!(blocks.is_empty(), "{what}: an empty range has no blocks");
        return;
    }
    let mut next = u32::from(first);
    for &(start, bits) in &blocks {
        assert!(bits <= 16, "{what}: more than 16 prefix bits");
        let size = block_size(bits);
        assert_eq!(
            u32::from(start) % size,
            0,
            "{what}: block ({start}, {bits}) is not aligned"
        );
        // Each block starts where the previous ended: no gap, no overlap.
        assert_eq!(
            u32::from(start),
            next,
            "{what}: gap or overlap before ({start}, {bits})"
        );
        next = u32::from(start) + size;
    }
    assert_eq!(next, u32::from(last) + 1, "{what}: does not end at {last}");
    assert_eq!(
        blocks.len(),
        fewest_blocks(u32::from(first), u32::from(last), 0, 1 << 16),
        "{what}: not the fewest blocks"
    );
}

#[test]
fn port_prefixes_of_well_known_ranges() {
    assert_eq!(
        port_prefixes(0, 65535),
        vec![(0, 0)],
        "every port: one block"
    );
    assert_eq!(port_prefixes(0, 0), vec![(0, 16)]);
    assert_eq!(port_prefixes(80, 80), vec![(80, 16)], "one port: 16 bits");
    assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
    assert_eq!(port_prefixes(0, 32767), vec![(0, 1)]);
    assert_eq!(port_prefixes(32768, 65535), vec![(32768, 1)]);
    assert_eq!(port_prefixes(80, 90), vec![(80, 13), (88, 15), (90, 16)]);
    // 1..=65535 (what `port: 1, endPort: 65535` means): 1, 2-3, 4-7, ..., 32768-65535.
    let expected: Vec<(u16, u8)> = (0..16).map(|i| (1u16 << i, 16 - i as u8)).collect();
    assert_eq!(port_prefixes(1, 65535), expected);
    assert_eq!(port_prefixes(0, 65534).len(), 16);
    assert_eq!(port_prefixes(2, 1), vec![], "first above last");
    assert_eq!(port_prefixes(65535, 0), vec![]);
}

#[test]
fn port_prefixes_are_aligned_disjoint_and_cover_exactly_the_range() {
    // Bounds around every power of two, pairwise.
    let mut edges: Vec<u16> = vec![
        0, 1, 2, 3, 5, 7, 80, 90, 443, 1000, 3333, 8080, 65534, 65535,
    ];
    for i in 1..16 {
        let p = 1u16 << i;
        edges.extend([p - 1, p, p + 1]);
    }
    for &first in &edges {
        for &last in &edges {
            check_port_blocks(first, last);
        }
    }
    // Every single port, and every range from or to an end of the port space in steps.
    for port in 0..=u16::MAX {
        check_port_blocks(port, port);
    }
    for bound in (0..=u16::MAX).step_by(97) {
        check_port_blocks(0, bound);
        check_port_blocks(bound, u16::MAX);
        check_port_blocks(1, bound);
    }
    // Random ranges, wide and narrow.
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for _ in 0..3000 {
        let (a, b) = (rng.port(), rng.port());
        check_port_blocks(a.min(b), a.max(b));
        let width = rng.port() % 300;
        check_port_blocks(a, a.saturating_add(width));
    }
}

#[test]
fn port_prefix_blocks_match_exactly_the_ports_of_the_range_as_the_kernel_sees_them() {
    // The LPM view: a port matches a block when its top `bits` bits (big-endian) agree.
    let mut rng = Rng(0x0dd_ba11);
    let mut ranges = vec![(1000, 3333), (1, 65535), (53, 54), (8000, 8100)];
    for _ in 0..20 {
        let (a, b) = (rng.port(), rng.port());
        ranges.push((a.min(b), a.max(b)));
    }
    for (first, last) in ranges {
        let blocks = port_prefixes(first, last);
        for port in 0..=u16::MAX {
            let matched = blocks.iter().any(|&(start, bits)| {
                prefix_matches(&start.to_be_bytes(), &port.to_be_bytes(), u32::from(bits))
            });
            assert_eq!(
                matched,
                (first..=last).contains(&port),
                "port {port} against {first}..={last}: {blocks:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// A two-node cluster
// ---------------------------------------------------------------------------

/// | pod | labels | node | address | named ports |
/// | --- | --- | --- | --- | --- |
/// | default/web | app=web, tier=front | n1 | 10.244.1.2 | http 8080, dns 53/UDP, metrics 9090 |
/// | default/client | app=client | n1 | 10.244.1.3 | |
/// | prod/api | app=api | n1 | 10.244.1.4 | http 8081, sidecar admin 9901 |
/// | dev/client | app=client | n1 | 10.244.1.5 | |
/// | default/agent | hostNetwork | n1 | 172.18.0.2 | |
/// | default/db | app=db, tier=back | n2 | 10.244.2.2 | pg 5432, http 8000 |
/// | prod/client | app=client | n2 | 10.244.2.3 | |
/// | dev/worker | app=worker | n2 | 10.244.2.4 | stats 8125/UDP, http 8082 |
/// | prod/web | app=web | n2 | 10.244.2.5 | http 8080, dns 5353/UDP |
fn cluster_yaml() -> String {
    [
        node("n1", "172.18.0.2"),
        node("n2", "172.18.0.3"),
        namespace("prod", "{team: a, env: prod}"),
        namespace("dev", "{team: b}"),
        pod(
            "web",
            "{app: web, tier: front}",
            "10.244.1.2",
            "\
nodeName: n1
containers:
- name: app
  ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]
- name: exporter
  ports: [{name: metrics, containerPort: 9090}]",
        ),
        plain_pod("client", "{app: client}", "n1", "10.244.1.3"),
        pod(
            "prod/api",
            "{app: api}",
            "10.244.1.4",
            "\
nodeName: n1
initContainers:
- {name: proxy, restartPolicy: Always, ports: [{name: admin, containerPort: 9901}]}
containers: [{name: api, ports: [{name: http, containerPort: 8081}]}]",
        ),
        plain_pod("dev/client", "{app: client}", "n1", "10.244.1.5"),
        pod(
            "agent",
            "{app: agent}",
            "172.18.0.2",
            "{nodeName: n1, hostNetwork: true, containers: [{name: a}]}",
        ),
        pod(
            "db",
            "{app: db, tier: back}",
            "10.244.2.2",
            "\
nodeName: n2
containers:
- {name: pg, ports: [{name: pg, containerPort: 5432}, {name: http, containerPort: 8000}]}",
        ),
        plain_pod("prod/client", "{app: client}", "n2", "10.244.2.3"),
        pod(
            "dev/worker",
            "{app: worker}",
            "10.244.2.4",
            "\
nodeName: n2
containers:
- name: w
  ports: [{name: stats, containerPort: 8125, protocol: UDP}, {name: http, containerPort: 8082}]",
        ),
        pod(
            "prod/web",
            "{app: web}",
            "10.244.2.5",
            "\
nodeName: n2
containers:
- name: app
  ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]",
        ),
    ]
    .concat()
}

fn policies() -> String {
    [
        network_policy(
            "web-in",
            "\
podSelector: {matchLabels: {app: web}}
ingress:
- from: [{podSelector: {matchLabels: {app: client}}}]
  ports: [{port: http}]
- from: [{namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchLabels: {app: api}}}]
  ports: [{port: 9000, endPort: 9100}, {protocol: UDP, port: dns}, {port: metrics}]
- from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24, 10.244.1.5/32]}}]
  ports: [{protocol: UDP, port: 1000, endPort: 3333}]
- from: [{ipBlock: {cidr: 172.18.0.0/24}}]",
        ),
        network_policy(
            "db",
            "\
podSelector: {matchLabels: {app: db}}
policyTypes: [Ingress, Egress]
ingress:
- from: [{podSelector: {}}]
  ports: [{port: pg}]
- from: [{namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a]}]}}]
  ports: [{port: http}, {port: 5432}]
egress:
- to: [{podSelector: {matchLabels: {app: web}}, namespaceSelector: {}}]
  ports: [{port: http}]",
        ),
        network_policy(
            "client-egress",
            "\
podSelector: {matchLabels: {app: client}}
policyTypes: [Egress]
egress:
- to: [{podSelector: {matchLabels: {app: db}}}]
  ports: [{port: pg}]
- to: [{ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.4/32]}}]
  ports: [{port: 1, endPort: 65535}, {protocol: UDP}]
- ports: [{protocol: UDP, port: 53}]",
        ),
        network_policy(
            "prod/egress",
            "\
podSelector: {}
policyTypes: [Egress]
egress:
- to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]
  ports: [{port: http}, {protocol: UDP, port: dns}]
- to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.244.0.0/16, 172.18.0.0/24]}}]
  ports: [{port: 443}, {port: 1000, endPort: 3333}]
- to: [{podSelector: {matchLabels: {app: client}}}]
- to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}}]
  ports: [{protocol: UDP, port: stats}, {protocol: SCTP, port: 7000, endPort: 7010}]",
        ),
        network_policy("dev/deny-in", "{podSelector: {}, policyTypes: [Ingress]}"),
        network_policy(
            "dev/allow-prod",
            "\
podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [client]}]}
ingress:
- from: [{namespaceSelector: {matchLabels: {env: prod}}}]
  ports: [{protocol: UDP, port: 8125}, {port: 8082, endPort: 8082}]",
        ),
    ]
    .concat()
}

/// Interface indexes of the pods' host routes, per node (made up).
const ROUTES: &[(&str, &str, u32)] = &[
    ("n1", "10.244.1.2", 11),
    ("n1", "10.244.1.3", 12),
    ("n1", "10.244.1.4", 13),
    ("n1", "10.244.1.5", 14),
    ("n2", "10.244.2.2", 21),
    ("n2", "10.244.2.3", 22),
    ("n2", "10.244.2.4", 23),
    ("n2", "10.244.2.5", 24),
];

/// Connection ends: every pod, both nodes, and outside addresses in and out of the ipBlocks.
const ADDRESSES: &[&str] = &[
    "10.244.1.2",
    "10.244.1.3",
    "10.244.1.4",
    "10.244.1.5",
    "10.244.2.2",
    "10.244.2.3",
    "10.244.2.4",
    "10.244.2.5",
    "172.18.0.2",
    "172.18.0.3",
    "172.18.0.9",
    "10.244.1.77",
    "10.244.2.200",
    "10.244.3.1",
    "8.8.8.8",
    "192.168.1.1",
];

/// Destination ports: the named ports' numbers, the range bounds and their neighbours.
const PORTS: &[u16] = &[
    0, 1, 52, 53, 54, 80, 443, 999, 1000, 1001, 2047, 2048, 3333, 3334, 5353, 5432, 6999, 7000,
    7005, 7010, 7011, 8000, 8080, 8081, 8082, 8125, 8999, 9000, 9050, 9090, 9100, 9101, 9901,
    65535,
];

fn cluster() -> ClusterSnapshot {
    snapshot(&format!("{}{}", cluster_yaml(), policies()))
}

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name)
}

fn routes_of(node: &str) -> BTreeMap<Ipv4Addr, Interface> {
    routes(
        ROUTES
            .iter()
            .filter(|(n, _, _)| *n == node)
            .map(|&(_, addr, index)| (addr, index)),
    )
}

/// One node as its agent sees it.
struct NodeUnderTest {
    routes: BTreeMap<Ipv4Addr, Interface>,
    policy: NodePolicy,
    built: BuiltTables,
}

impl NodeUnderTest {
    fn new(snapshot: &ClusterSnapshot, node: &str) -> NodeUnderTest {
        let routes = routes_of(node);
        let policy = compile_node(snapshot, node, &[]);
        let built = build(&policy, &routes, &mut ClassNumbers::default());
        NodeUnderTest {
            routes,
            policy,
            built,
        }
    }
}

/// Outcomes of the comparison: disagreements, and how many cases each (direction, isolated,
/// allowed) combination had.
struct Comparison {
    failures: Vec<String>,
    outcomes: BTreeMap<(Direction, bool, bool), usize>,
}

/// Decides every connection between [`ADDRESSES`] on every port of [`PORTS`] and protocol
/// with the emulated kernel over each node's tables, and compares each direction with
/// [`PolicySet::explain`].
fn compare_with_oracle(
    snap: &ClusterSnapshot,
    nodes: &BTreeMap<&str, NodeUnderTest>,
) -> Comparison {
    let set = PolicySet::new(snap);
    let kernels: BTreeMap<&str, Kernel<'_>> = nodes
        .iter()
        .map(|(n, t)| (*n, Kernel::new(&t.built.tables)))
        .collect();

    // The kernel's verdict at one end: `end` is the pod whose interface the packet crosses.
    let side = |end: &Endpoint, direction: Direction, me: Ipv4Addr, peer: Ipv4Addr, port, proto| {
        let Endpoint::Pod {
            key,
            node: Some(node),
            ..
        } = end
        else {
            return (true, true); // not a pod: no interface of ours
        };
        let under_test = &nodes[node.as_str()];
        let ifindex = under_test.routes[&me].index;
        let kernel = kernels[node.as_str()].passes(
            ifindex,
            direction_code(direction),
            peer,
            port,
            protocol_number(proto),
        );
        let compiled = under_test
            .policy
            .allows(key, direction, IpAddr::V4(peer), port, proto);
        (kernel, compiled)
    };

    let mut failures = Vec::new();
    let mut outcomes: BTreeMap<(Direction, bool, bool), usize> = BTreeMap::new();
    for from in ADDRESSES.iter().map(|a| v4(a)) {
        for to in ADDRESSES.iter().map(|a| v4(a)) {
            if from == to {
                continue;
            }
            for &port in PORTS {
                for protocol in Protocol::ALL {
                    let v = set
                        .explain(
                            &Peer::Ip(IpAddr::V4(from)),
                            &Peer::Ip(IpAddr::V4(to)),
                            port,
                            protocol,
                        )
                        .unwrap();
                    let checks = [
                        (Direction::Egress, &v.from, from, to, &v.egress),
                        (Direction::Ingress, &v.to, to, from, &v.ingress),
                    ];
                    for (direction, end, me, peer, oracle) in checks {
                        let (kernel, compiled) = side(end, direction, me, peer, port, protocol);
                        let isolated = !oracle.isolated_by().is_empty();
                        *outcomes
                            .entry((direction, isolated, oracle.allows()))
                            .or_default() += 1;
                        if kernel != oracle.allows() {
                            failures.push(format!(
                                "{from} -> {to} {port}/{protocol} {direction}: maps say \
                                 allowed={kernel}, NodePolicy::allows={compiled}, oracle: {oracle}"
                            ));
                        }
                    }
                }
            }
        }
    }
    Comparison { failures, outcomes }
}

fn both_nodes(snap: &ClusterSnapshot) -> BTreeMap<&'static str, NodeUnderTest> {
    ["n1", "n2"]
        .into_iter()
        .map(|n| (n, NodeUnderTest::new(snap, n)))
        .collect()
}

#[test]
fn the_built_maps_decide_every_connection_as_the_policy_oracle_does() {
    let snap = cluster();
    let nodes = both_nodes(&snap);
    for node in nodes.values() {
        assert!(node.built.pending.is_empty(), "{:?}", node.built.pending);
        assert_eq!(node.built.tables.endpoints.len(), 4);
    }
    let Comparison { failures, outcomes } = compare_with_oracle(&snap, &nodes);
    assert!(
        failures.is_empty(),
        "{} disagreements, first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
    // The fixture exercises both verdicts of isolated pods in both directions.
    for direction in [Direction::Ingress, Direction::Egress] {
        for allowed in [true, false] {
            let n = outcomes
                .get(&(direction, true, allowed))
                .copied()
                .unwrap_or(0);
            assert!(
                n > 100,
                "only {n} isolated {direction} cases with allowed={allowed}"
            );
        }
    }
}

#[test]
fn the_oracle_comparison_catches_damaged_tables() {
    let snap = cluster();
    type Damage = fn(&mut PolicyTables);
    let damages: [(&str, Damage); 5] = [
        ("one rule missing", |t| {
            let first = *t.rules.iter().next().unwrap();
            t.rules.remove(&first);
        }),
        ("single ports in host byte order", |t| {
            t.rules = t
                .rules
                .iter()
                .map(|r| {
                    let mut r = *r;
                    if r.prefix_len == RULE_PREFIX_FULL {
                        r.key.port.reverse();
                    }
                    r
                })
                .collect();
        }),
        ("whole-protocol rules narrowed to half the ports", |t| {
            t.rules = t
                .rules
                .iter()
                .map(|r| RuleEntry {
                    prefix_len: if r.prefix_len == RULE_PREFIX_ANY_PORT {
                        RULE_PREFIX_ANY_PORT + 1
                    } else {
                        r.prefix_len
                    },
                    ..*r
                })
                .collect();
        }),
        ("an address in the wrong class", |t| {
            let web = Ipv4Net::from(v4("10.244.1.3"));
            let other = t.peers[&Ipv4Net::from(v4("10.244.1.4"))];
            t.peers.insert(web, other);
        }),
        ("an isolation flag lost", |t| {
            t.endpoints.insert(11, PolicyEndpoint::default());
        }),
    ];
    for (what, damage) in damages {
        let mut nodes = both_nodes(&snap);
        damage(&mut nodes.get_mut("n1").unwrap().built.tables);
        let found = compare_with_oracle(&snap, &nodes).failures;
        assert!(!found.is_empty(), "{what}: not noticed");
    }
}

#[test]
fn the_built_maps_honour_named_ports_end_ports_ip_block_exceptions_and_combined_selectors() {
    let snap = cluster();
    let n1 = NodeUnderTest::new(&snap, "n1");
    let kernel = Kernel::new(&n1.built.tables);
    let (tcp, udp, sctp) = (Protocol::Tcp, Protocol::Udp, Protocol::Sctp);
    let passes = |direction, pod: &str, peer: &str, port, proto| {
        let ifindex = n1.routes[&v4(pod)].index;
        kernel.passes(ifindex, direction, v4(peer), port, protocol_number(proto))
    };
    let ingress = |pod, peer, port, proto| passes(DIRECTION_INGRESS, pod, peer, port, proto);
    let egress = |pod, peer, port, proto| passes(DIRECTION_EGRESS, pod, peer, port, proto);
    let (web, client, api, dev_client) = ("10.244.1.2", "10.244.1.3", "10.244.1.4", "10.244.1.5");
    let (db, prod_client, worker, prod_web) =
        ("10.244.2.2", "10.244.2.3", "10.244.2.4", "10.244.2.5");

    // Ingress named port: web's own http is 8080.
    assert!(ingress(web, client, 8080, tcp));
    assert!(
        !ingress(web, prod_client, 8080, tcp),
        "a podSelector alone means web's own namespace"
    );
    assert!(!ingress(web, client, 8081, tcp));
    assert!(!ingress(web, client, 8080, udp));
    // namespaceSelector AND podSelector, with an endPort range.
    assert!(ingress(web, api, 9000, tcp));
    assert!(ingress(web, api, 9100, tcp));
    assert!(!ingress(web, api, 9101, tcp));
    assert!(ingress(web, api, 53, udp), "dns is web's UDP 53");
    assert!(!ingress(web, api, 53, tcp));
    assert!(
        ingress(web, api, 9090, tcp),
        "metrics, another container's port"
    );
    // ipBlock with exceptions (a /24 and a /32).
    assert!(ingress(web, client, 2000, udp));
    assert!(ingress(web, "10.244.3.1", 1000, udp));
    assert!(!ingress(web, "10.244.3.1", 3334, udp));
    assert!(!ingress(web, dev_client, 2000, udp), "excepted /32");
    assert!(!ingress(web, db, 2000, udp), "excepted /24");
    assert!(!ingress(web, "10.244.2.200", 2000, udp), "excepted /24");
    assert!(!ingress(web, "8.8.8.8", 2000, udp));
    // A rule without ports: every protocol.
    assert!(ingress(web, "172.18.0.3", 7000, sctp));
    // Egress named ports resolve on the destination.
    assert!(egress(api, web, 8080, tcp));
    assert!(egress(api, prod_web, 8080, tcp));
    assert!(egress(api, web, 53, udp));
    assert!(!egress(api, web, 5353, udp));
    assert!(egress(api, prod_web, 5353, udp));
    assert!(!egress(api, prod_web, 53, udp));
    assert!(!egress(api, db, 8080, tcp));
    assert!(egress(api, worker, 8125, udp));
    assert!(egress(api, worker, 7010, sctp));
    assert!(!egress(api, worker, 7011, sctp));
    assert!(egress(api, "8.8.8.8", 3333, tcp));
    assert!(!egress(api, "10.244.3.1", 443, tcp), "excepted /16");
    assert!(egress(api, prod_client, 7, sctp), "a rule without ports");
    // Not isolated for ingress: everything passes; its own node always does.
    assert!(ingress(api, "8.8.8.8", 1, tcp));
    assert!(egress(api, "172.18.0.2", 1, tcp));
    assert!(ingress(dev_client, "172.18.0.2", 22, tcp));
    assert!(!ingress(dev_client, "172.18.0.3", 22, tcp), "deny-all");
    assert!(
        !ingress(dev_client, api, 8082, tcp),
        "allow-prod skips app=client"
    );
    // client egress: 1..=65535 TCP to its /24 minus api; UDP 53 anywhere.
    assert!(egress(client, web, 65535, tcp));
    assert!(!egress(client, web, 0, tcp));
    assert!(egress(client, web, 0, udp));
    assert!(!egress(client, api, 80, tcp), "excepted /32");
    assert!(egress(client, "8.8.8.8", 53, udp));
    assert!(!egress(client, "8.8.8.8", 53, tcp));
    assert!(egress(client, db, 5432, tcp));
}

// ---------------------------------------------------------------------------
// Which pods the tables cover
// ---------------------------------------------------------------------------

#[test]
fn local_pods_without_a_host_route_are_pending_and_other_nodes_pods_are_not_managed() {
    let snap = cluster();
    let policy = compile_node(&snap, "n1", &[]);
    let mut routes = routes_of("n1");
    routes.remove(&v4("10.244.1.5")); // dev/client's veth is not up yet
    routes.insert(v4("10.244.2.2"), interface(99)); // a route to a pod of n2
    routes.insert(v4("10.244.1.77"), interface(98)); // a stale route, no pod
    let built = build(&policy, &routes, &mut ClassNumbers::default());

    assert_eq!(built.pending, vec![key("dev", "client")]);
    assert_eq!(
        built.tables.endpoints.keys().copied().collect::<Vec<_>>(),
        vec![11, 12, 13]
    );
    let managed: Vec<(u32, ObjectKey)> = built
        .managed
        .iter()
        .map(|(i, m)| (*i, m.pod.clone()))
        .collect();
    assert_eq!(
        managed,
        vec![
            (11, key("default", "web")),
            (12, key("default", "client")),
            (13, key("prod", "api")),
        ],
        "n2's db (routed via 99) and the host-network agent are not managed"
    );
    assert_eq!(built.managed[&11].interface, interface(11));
    assert_eq!(
        built.managed[&11].isolated_by,
        BTreeMap::from([(Direction::Ingress, vec![key("default", "web-in")])])
    );
    assert_eq!(
        built.managed[&13].isolated_by,
        BTreeMap::from([(Direction::Egress, vec![key("prod", "egress")])])
    );
    assert_eq!(built.tables.endpoints[&11], endpoint(1, 0));
    assert_eq!(built.tables.endpoints[&12], endpoint(0, 1));
    assert_eq!(built.tables.endpoints[&13], endpoint(0, 1));
    // Rules only for managed interfaces, and only in the directions they are isolated in.
    for rule in &built.tables.rules {
        let endpoint = built.tables.endpoints.get(&rule.key.ifindex);
        assert!(
            endpoint.is_some_and(|e| e.isolated(rule.key.direction)),
            "{rule:?} for an interface not isolated in that direction"
        );
    }
    // Once the route shows up, the pod is managed and no longer pending.
    routes.insert(v4("10.244.1.5"), interface(14));
    let built = build(&policy, &routes, &mut ClassNumbers::default());
    assert!(built.pending.is_empty());
    assert_eq!(built.managed[&14].pod, key("dev", "client"));
    assert_eq!(built.tables.endpoints[&14], endpoint(1, 0));
}

#[test]
fn pods_not_isolated_still_get_an_endpoint_entry_and_no_rules() {
    let built = NodeUnderTest::new(&snapshot(&cluster_yaml()), "n1").built;
    assert_eq!(built.tables.endpoints.len(), 4);
    assert!(
        built
            .tables
            .endpoints
            .values()
            .all(|e| !e.isolated(DIRECTION_INGRESS) && !e.isolated(DIRECTION_EGRESS))
    );
    assert!(built.tables.rules.is_empty());
    let kernel = Kernel::new(&built.tables);
    assert!(kernel.passes(12, DIRECTION_INGRESS, v4("8.8.8.8"), 1, IPPROTO_UDP));
}

#[test]
fn two_local_pods_claiming_one_route_leave_the_second_pending() {
    // default/stale outlived an address change: it still lists client's address.
    let stale = plain_pod("stale", "{app: stale}", "n1", "10.244.1.3");
    let snap = snapshot(&format!("{}{}{stale}", cluster_yaml(), policies()));
    let built = NodeUnderTest::new(&snap, "n1").built;
    assert_eq!(built.managed[&12].pod, key("default", "client"));
    assert_eq!(built.pending, vec![key("default", "stale")]);
    assert!(built.tables.endpoints[&12].isolated(DIRECTION_EGRESS));
}

#[test]
fn the_nodes_own_addresses_are_always_allowed() {
    let snap = cluster();
    let gateway = v4("10.244.1.1");
    let built = build(
        &compile_node(&snap, "n1", &[IpAddr::V4(gateway)]),
        &routes_of("n1"),
        &mut ClassNumbers::default(),
    );
    let peers = &built.tables.peers;
    assert_eq!(peers[&Ipv4Net::from(gateway)], POLICY_CLASS_OWN_NODE);
    assert_eq!(
        peers[&Ipv4Net::from(v4("172.18.0.2"))],
        POLICY_CLASS_OWN_NODE
    );
    assert_ne!(
        peers[&Ipv4Net::from(v4("172.18.0.3"))],
        POLICY_CLASS_OWN_NODE
    );
    assert!(peers.contains_key(&"0.0.0.0/0".parse().unwrap()));
    for (prefix, class) in peers {
        assert!(
            *class == POLICY_CLASS_OWN_NODE
                || (POLICY_CLASS_FIRST..POLICY_CLASS_UNKNOWN).contains(class),
            "{prefix} has the reserved class {class}"
        );
    }
    for rule in &built.tables.rules {
        assert!(
            rule.key.class != POLICY_CLASS_OWN_NODE && rule.key.class != POLICY_CLASS_UNKNOWN,
            "{rule:?}"
        );
    }
    let kernel = Kernel::new(&built.tables);
    // dev/client (14) is isolated for ingress with nothing allowed.
    for port in [1, 22, 8080, 65535] {
        for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, 1] {
            assert!(kernel.passes(14, DIRECTION_INGRESS, gateway, port, proto));
            assert!(kernel.passes(14, DIRECTION_INGRESS, v4("172.18.0.2"), port, proto));
            assert!(!kernel.passes(14, DIRECTION_INGRESS, v4("172.18.0.3"), port, proto));
        }
    }
    // A rule with no peers is one ANY entry, not one per class.
    let any_dns = rule(
        RULE_PREFIX_FULL,
        12,
        POLICY_CLASS_ANY,
        DIRECTION_EGRESS,
        IPPROTO_UDP,
        53,
    );
    assert!(built.tables.rules.contains(&any_dns));
}

// ---------------------------------------------------------------------------
// Class numbers
// ---------------------------------------------------------------------------

/// Records which class each number stood for, failing if one number ever meant two classes.
fn record_numbers(
    seen: &mut HashMap<u32, PeerClass>,
    policy: &NodePolicy,
    tables: &PolicyTables,
) -> BTreeMap<Ipv4Net, u32> {
    let mut by_prefix = BTreeMap::new();
    for (prefix, index) in &policy.addresses {
        let IpNet::V4(prefix) = prefix else { continue };
        let number = tables.peers[prefix];
        let class = &policy.classes[*index];
        if class.kind != PeerKind::OwnNode {
            let earlier = seen.entry(number).or_insert_with(|| class.clone());
            assert_eq!(earlier, class, "class number {number} reused");
        }
        by_prefix.insert(*prefix, number);
    }
    by_prefix
}

/// The rules with every class number mapped through `f`.
fn renumbered(rules: &BTreeSet<RuleEntry>, f: impl Fn(u32) -> u32) -> BTreeSet<RuleEntry> {
    rules
        .iter()
        .map(|r| RuleEntry {
            key: PolicyRuleKey {
                class: f(r.key.class),
                ..r.key
            },
            ..*r
        })
        .collect()
}

#[test]
fn class_numbers_stay_stable_across_rebuilds_and_are_never_reused() {
    let plain = cluster();
    // db (on n2, a peer only for n1) gets one more label: its class changes, nothing else.
    let relabelled = snapshot(&format!("{}{}", cluster_yaml(), policies()).replace(
        "{app: db, tier: back}",
        "{app: db, tier: back, version: \"2\"}",
    ));
    let routes = routes_of("n1");
    let mut numbers = ClassNumbers::default();
    let mut seen = HashMap::new();
    let mut step = |snap: &ClusterSnapshot, numbers: &mut ClassNumbers| {
        let policy = compile_node(snap, "n1", &[]);
        let built = build(&policy, &routes, numbers);
        let by_prefix = record_numbers(&mut seen, &policy, &built.tables);
        (built.tables, by_prefix)
    };

    let (first, first_numbers) = step(&plain, &mut numbers);
    assert!(first.peers.values().all(|c| *c != POLICY_CLASS_ANY));
    let (again, _) = step(&plain, &mut numbers);
    assert_eq!(again, first, "the same input gives the same tables");

    let db = Ipv4Net::from(v4("10.244.2.2"));
    let old_db = first.peers[&db];
    assert!(
        first.rules.iter().any(|r| r.key.class == old_db),
        "client's egress to db"
    );
    let (second, second_numbers) = step(&relabelled, &mut numbers);
    let new_db = second.peers[&db];
    assert!(
        !first.peers.values().any(|c| *c == new_db),
        "db's new class has a fresh number"
    );
    assert_eq!(second.endpoints, first.endpoints);
    for (prefix, number) in &second_numbers {
        if *prefix != db {
            assert_eq!(first_numbers[prefix], *number, "{prefix} renumbered");
        }
    }
    let swap = |c| if c == old_db { new_db } else { c };
    assert_eq!(
        second.rules,
        renumbered(&first.rules, swap),
        "only db's entries change"
    );

    // Back to the old labels: the old number was freed, so db gets yet another one.
    let (third, _) = step(&plain, &mut numbers);
    let newest_db = third.peers[&db];
    assert!(newest_db != old_db && newest_db != new_db);
    let swap = |c| if c == old_db { newest_db } else { c };
    assert_eq!(third.rules, renumbered(&first.rules, swap));
    let mut expected_peers = first.peers.clone();
    expected_peers.insert(db, newest_db);
    assert_eq!(third.peers, expected_peers);
}

#[test]
fn class_numbers_survive_policy_changes_that_leave_a_class_alone() {
    // Removing the dev policies changes no class n1 sees (they hold no ipBlock or egress
    // named port): every address keeps its number.
    let without_dev = cluster_without("deny-in", "allow-prod");
    let routes = routes_of("n1");
    let mut numbers = ClassNumbers::default();
    let a = build(&compile_node(&cluster(), "n1", &[]), &routes, &mut numbers);
    let b = build(
        &compile_node(&without_dev, "n1", &[]),
        &routes,
        &mut numbers,
    );
    assert_eq!(a.tables.peers, b.tables.peers);
    assert!(b.tables.endpoints[&14] == PolicyEndpoint::default());
    assert!(b.tables.rules.is_subset(&a.tables.rules));
}

/// The cluster without the two named policy documents.
fn cluster_without(a: &str, b: &str) -> ClusterSnapshot {
    let policies = policies();
    let kept: Vec<&str> = policies
        .split("\n---\n")
        .filter(|doc| {
            !doc.contains(&format!("name: {a},")) && !doc.contains(&format!("name: {b},"))
        })
        .collect();
    assert_eq!(kept.len(), policies.split("\n---\n").count() - 2);
    snapshot(&format!("{}{}", cluster_yaml(), kept.join("\n---\n")))
}

#[test]
fn class_numbers_that_run_out_wrap_past_reserved_and_used_numbers() {
    let class = |block: &str| PeerClass {
        kind: PeerKind::Address,
        blocks: [sluice_policy::compile::IpBlock {
            cidr: block.parse().unwrap(),
            except: Vec::new(),
        }]
        .into_iter()
        .collect(),
    };
    let mut numbers = ClassNumbers::default();
    let first = numbers.number(&class("10.0.0.0/8"));
    assert_eq!(first, POLICY_CLASS_FIRST);
    numbers.next = POLICY_CLASS_UNKNOWN - 1;
    assert_eq!(
        numbers.number(&class("10.1.0.0/16")),
        POLICY_CLASS_UNKNOWN - 1
    );
    // Past the end: not UNKNOWN, not FIRST (still in use), the next free one.
    let wrapped = numbers.number(&class("10.2.0.0/16"));
    assert_eq!(wrapped, POLICY_CLASS_FIRST + 1);
    assert_eq!(
        numbers.number(&class("10.0.0.0/8")),
        first,
        "numbers in use stay"
    );
}
