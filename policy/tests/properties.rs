//! Properties over random clusters and policies, valid or not (snapshots built by hand, so
//! nothing the API server would reject is filtered out).
//!
//! 1. `explain` never panics, resolves every peer that exists, and its `allowed` is the AND of
//!    its two directions.
//! 3. The compiled node tables (the data path's lookups) decide every connection as `explain`
//!    does, wherever both ends have addresses of their own.
//! 2. Adding a policy Q changes a direction's verdict only if Q selects that pod for that
//!    direction; and a connection allowed before can be denied after only because Q *newly
//!    isolates* a side: that side was not isolated in that direction before, and Q is the only
//!    policy isolating it after. Where a side was already isolated, Q can only add allowing
//!    rules (policies add up). This is as far as monotonicity holds: a new policy can isolate a
//!    pod and so take away what it was allowed while unisolated.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cluster_model::k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, NodeAddress, NodeStatus, Pod, PodSpec, PodStatus,
};
use cluster_model::k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use cluster_model::k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use cluster_model::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use cluster_model::{ClusterSnapshot, ObjectKey};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use sluice_policy::{DirectionVerdict, Peer, PolicySet, Protocol, compiled_verdict};

const NAMESPACES: [&str; 2] = ["ns1", "ns2"];
const NODES: [(&str, &str); 2] = [("n1", "192.168.0.1"), ("n2", "192.168.0.2")];
const POD_ADDRS: [&str; 5] = ["10.0.1.1", "10.0.1.2", "10.0.2.1", "fd00::1", "10.0.1.1"];
const OTHER_ADDRS: [&str; 3] = ["203.0.113.7", "10.0.1.200", "fd00::99"];

fn label_key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["app", "tier", "x"]).prop_map(String::from)
}

fn label_value() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from)
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(label_key(), label_value(), 0..3)
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    let operator = prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist", "Bogus"]);
    let expression = (label_key(), operator, option::of(vec(label_value(), 0..3))).prop_map(
        |(key, operator, values)| LabelSelectorRequirement {
            key,
            operator: operator.to_string(),
            values,
        },
    );
    (option::of(labels()), option::of(vec(expression, 0..3))).prop_map(
        |(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        },
    )
}

fn cidr() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "10.0.0.0/8",
        "10.0.1.0/24",
        "10.0.1.1/32",
        "10.0.1.7/24",
        "0.0.0.0/0",
        "192.168.0.0/16",
        "fd00::/64",
        "::/0",
        "bogus",
        "10.0.0.0/33",
    ])
    .prop_map(String::from)
}

fn peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    let ip_block =
        (cidr(), option::of(vec(cidr(), 0..3))).prop_map(|(cidr, except)| IPBlock { cidr, except });
    (
        option::weighted(0.3, ip_block),
        option::of(selector()),
        option::of(selector()),
    )
        .prop_map(
            |(ip_block, pod_selector, namespace_selector)| NetworkPolicyPeer {
                ip_block,
                namespace_selector,
                pod_selector,
            },
        )
}

fn port() -> impl Strategy<Value = NetworkPolicyPort> {
    let protocol = option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP"]));
    let number = prop_oneof![
        prop::sample::select(vec![0, 53, 80, 8080, 70000, -1]).prop_map(IntOrString::Int),
        prop::sample::select(vec!["http", "dns", "nope"])
            .prop_map(|s| IntOrString::String(s.to_string())),
    ];
    let end_port = option::weighted(0.3, prop::sample::select(vec![52, 80, 8090, 70000]));
    (protocol, option::of(number), end_port).prop_map(|(protocol, port, end_port)| {
        NetworkPolicyPort {
            end_port,
            port,
            protocol: protocol.map(String::from),
        }
    })
}

fn peers() -> impl Strategy<Value = Option<Vec<NetworkPolicyPeer>>> {
    option::of(vec(peer(), 0..3))
}

fn ports() -> impl Strategy<Value = Option<Vec<NetworkPolicyPort>>> {
    option::of(vec(port(), 0..3))
}

fn policy() -> impl Strategy<Value = (String, NetworkPolicy)> {
    let types = prop::sample::select(vec![
        None,
        Some(vec![]),
        Some(vec!["Ingress"]),
        Some(vec!["Egress"]),
        Some(vec!["Ingress", "Egress"]),
        Some(vec!["Bogus"]),
    ]);
    let ingress = option::of(vec(
        (peers(), ports()).prop_map(|(from, ports)| NetworkPolicyIngressRule { from, ports }),
        0..3,
    ));
    let egress = option::of(vec(
        (peers(), ports()).prop_map(|(to, ports)| NetworkPolicyEgressRule { to, ports }),
        0..3,
    ));
    let spec = (option::of(selector()), types, ingress, egress).prop_map(
        |(pod_selector, types, ingress, egress)| NetworkPolicySpec {
            pod_selector,
            policy_types: types.map(|t| t.into_iter().map(String::from).collect()),
            ingress,
            egress,
        },
    );
    (
        prop::sample::select(NAMESPACES.to_vec()),
        option::weighted(0.95, spec),
    )
        .prop_map(|(namespace, spec)| {
            (
                namespace.to_string(),
                NetworkPolicy {
                    metadata: ObjectMeta {
                        namespace: Some(namespace.to_string()),
                        ..Default::default()
                    },
                    spec,
                },
            )
        })
}

fn pod() -> impl Strategy<Value = Pod> {
    let container_port = (
        prop::sample::select(vec!["http", "dns"]),
        prop::sample::select(vec![53, 80, 8080, 0]),
        option::of(prop::sample::select(vec!["TCP", "UDP"])),
    )
        .prop_map(|(name, number, protocol)| ContainerPort {
            name: Some(name.to_string()),
            container_port: number,
            protocol: protocol.map(String::from),
            ..Default::default()
        });
    (
        prop::sample::select(NAMESPACES.to_vec()),
        labels(),
        prop::sample::select(vec!["n1", "n2", ""]),
        option::of(prop::sample::select(POD_ADDRS.to_vec())),
        prop::bool::weighted(0.1),
        vec(container_port, 0..3),
    )
        .prop_map(|(namespace, labels, node, addr, host, ports)| Pod {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_string()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_string()),
                host_network: Some(host),
                containers: vec![Container {
                    name: "c".to_string(),
                    ports: Some(ports),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: addr.map(String::from),
                ..Default::default()
            }),
        })
}

/// A cluster: two labelled namespaces, two nodes, up to five pods, and policies.
fn cluster() -> impl Strategy<Value = ClusterSnapshot> {
    (labels(), labels(), vec(pod(), 1..6), vec(policy(), 0..4)).prop_map(
        |(ns1, ns2, pods, policies)| {
            let mut snap = ClusterSnapshot::default();
            for (name, mut labels) in [("ns1", ns1), ("ns2", ns2)] {
                labels.insert("kubernetes.io/metadata.name".into(), name.into());
                snap.namespaces.insert(
                    name.to_string(),
                    Namespace {
                        metadata: ObjectMeta {
                            name: Some(name.to_string()),
                            labels: Some(labels),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                );
            }
            for (name, addr) in NODES {
                snap.nodes.insert(
                    name.to_string(),
                    Node {
                        metadata: ObjectMeta {
                            name: Some(name.to_string()),
                            ..Default::default()
                        },
                        status: Some(NodeStatus {
                            addresses: Some(vec![NodeAddress {
                                type_: "InternalIP".to_string(),
                                address: addr.to_string(),
                            }]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                );
            }
            for (i, mut pod) in pods.into_iter().enumerate() {
                let ns = pod.metadata.namespace.clone().unwrap_or_default();
                let name = format!("p{i}");
                pod.metadata.name = Some(name.clone());
                snap.pods.insert(ObjectKey::new(ns, name), pod);
            }
            for (i, (ns, mut policy)) in policies.into_iter().enumerate() {
                let name = format!("q{i}");
                policy.metadata.name = Some(name.clone());
                snap.network_policies
                    .insert(ObjectKey::new(ns, name), policy);
            }
            snap
        },
    )
}

/// Every peer worth trying in a snapshot: its pods, its nodes, pod, node and other addresses.
fn peers_of(snap: &ClusterSnapshot) -> Vec<Peer> {
    let addrs = POD_ADDRS
        .iter()
        .chain(OTHER_ADDRS.iter())
        .chain(NODES.iter().map(|(_, a)| a))
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(Peer::Ip);
    snap.pods
        .keys()
        .cloned()
        .map(Peer::Pod)
        .chain(snap.nodes.keys().cloned().map(Peer::Node))
        .chain(addrs)
        .collect()
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop::sample::select(Protocol::ALL.to_vec())
}

fn port_number() -> impl Strategy<Value = u16> {
    prop::sample::select(vec![0, 53, 80, 8080, 8085, 65535])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn explain_never_panics_and_ands_its_directions(
        snap in cluster(),
        port in port_number(),
        protocol in protocol(),
    ) {
        let set = PolicySet::new(&snap);
        let peers = peers_of(&snap);
        for from in &peers {
            for to in &peers {
                let verdict = set.explain(from, to, port, protocol);
                prop_assert!(verdict.is_ok(), "{from:?} -> {to:?}: {verdict:?}");
                if let Ok(v) = verdict {
                    prop_assert_eq!(v.allowed, v.egress.allows() && v.ingress.allows());
                    // Display never panics either.
                    prop_assert!(!v.to_string().is_empty());
                }
            }
        }
        for policy in set.policies() {
            // Problems are described, never fatal.
            prop_assert!(policy.problems.iter().all(|p| !p.is_empty()));
        }
    }

    #[test]
    fn the_compiled_node_tables_agree_with_explain(
        snap in cluster(),
        port in port_number(),
        protocol in protocol(),
    ) {
        let set = PolicySet::new(&snap);
        let peers = peers_of(&snap);
        for from in &peers {
            for to in &peers {
                let (Ok(v), Ok(f), Ok(t)) = (
                    set.explain(from, to, port, protocol),
                    set.resolve(from),
                    set.resolve(to),
                ) else {
                    prop_assert!(false, "explain failed for {from:?} -> {to:?}");
                    continue;
                };
                // The data path knows ends by address only: skip ends whose address another
                // pod or node claims (random snapshots share addresses; clusters do not).
                let unambiguous = |e: &sluice_policy::Endpoint| {
                    e.addr().is_some_and(|a| set.resolve(&Peer::Ip(a)).ok().as_ref() == Some(e))
                };
                if !unambiguous(&f) || !unambiguous(&t) {
                    continue;
                }
                if let Some(compiled) = compiled_verdict(&snap, &f, &t, port, protocol) {
                    prop_assert_eq!(compiled, v.allowed, "{:?} -> {:?} {}/{}: explain says\n{}", from, to, port, protocol, v);
                }
            }
        }
    }

    #[test]
    fn a_new_policy_only_takes_away_by_newly_isolating(
        snap in cluster(),
        (new_ns, new_policy) in policy(),
        port in port_number(),
        protocol in protocol(),
    ) {
        let mut after_snap = snap.clone();
        let new_key = ObjectKey::new(new_ns, "new");
        after_snap.network_policies.insert(new_key.clone(), new_policy);
        let before = PolicySet::new(&snap);
        let after = PolicySet::new(&after_snap);
        let peers = peers_of(&snap);
        for from in &peers {
            for to in &peers {
                let (Ok(b), Ok(a)) = (
                    before.explain(from, to, port, protocol),
                    after.explain(from, to, port, protocol),
                ) else {
                    prop_assert!(false, "explain failed for {from:?} -> {to:?}");
                    continue;
                };
                for (name, db, da) in [("egress", &b.egress, &a.egress), ("ingress", &b.ingress, &a.ingress)] {
                    let newly_selected = da.isolated_by().contains(&new_key);
                    if !newly_selected {
                        // Q does not select this side for this direction: nothing changes.
                        prop_assert_eq!(db, da, "{} of {:?} -> {:?}", name, from, to);
                        continue;
                    }
                    // Q joins the isolating policies; the others stay.
                    let mut expected = db.isolated_by().to_vec();
                    expected.push(new_key.clone());
                    expected.sort();
                    prop_assert_eq!(da.isolated_by(), &expected[..]);
                    // Where the side was isolated already, rules only add up.
                    if let (
                        DirectionVerdict::Isolated { allowed_by: rb, .. },
                        DirectionVerdict::Isolated { allowed_by: ra, .. },
                    ) = (db, da) {
                        prop_assert!(rb.iter().all(|r| ra.contains(r)), "{name}: {rb:?} not in {ra:?}");
                    }
                }
                if b.allowed && !a.allowed {
                    let newly_isolated = |db: &DirectionVerdict, da: &DirectionVerdict| {
                        *db == DirectionVerdict::NotIsolated && da.isolated_by() == [new_key.clone()]
                    };
                    prop_assert!(
                        newly_isolated(&b.egress, &a.egress) || newly_isolated(&b.ingress, &a.ingress),
                        "{from:?} -> {to:?} lost without new isolation:\nbefore {b}\nafter {a}"
                    );
                }
            }
        }
    }
}
