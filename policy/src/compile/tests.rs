use super::*;
use cluster_model::{ManifestFormat, parse_manifests};

const PODS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a1, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: a2, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.244.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: b}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.244.1.2}
"#;

fn node_policy(policies: &str) -> NodePolicy {
    let (objects, problems) = parse_manifests(
        &format!("{PODS}---\n{policies}"),
        ManifestFormat::Yaml,
        None,
    );
    assert_eq!(problems, vec![]);
    compile_node(
        &ClusterSnapshot::from_objects(objects),
        "n1",
        &["169.254.1.1".parse().unwrap()],
    )
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("default", name)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn only_the_nodes_own_pods_are_endpoints_and_equal_pods_share_a_class() {
    let np = node_policy("apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n");
    assert_eq!(
        np.endpoints.keys().cloned().collect::<Vec<_>>(),
        vec![key("a1"), key("a2")]
    );
    assert_eq!(np.class_of(ip("10.244.0.2")), np.class_of(ip("10.244.0.3")));
    assert_ne!(np.class_of(ip("10.244.0.2")), np.class_of(ip("10.244.1.2")));
    let own = np.class_of(ip("169.254.1.1")).unwrap();
    assert_eq!(np.classes[own].kind, PeerKind::OwnNode);
    assert_eq!(np.class_of(ip("172.18.0.2")), Some(own));
    // Not isolated: no entries, everything passes.
    assert!(np.endpoints[&key("a1")].ingress.is_none());
    assert!(np.allows(
        &key("a1"),
        Direction::Ingress,
        ip("8.8.8.8"),
        1,
        Protocol::Tcp
    ));
}

#[test]
fn ip_block_exceptions_split_the_address_space_into_classes() {
    let np = node_policy(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.1.0/24]}}]
    ports: [{port: 80, endPort: 90}]
"#,
    );
    let a1 = key("a1");
    let allows =
        |peer: &str, port| np.allows(&a1, Direction::Ingress, ip(peer), port, Protocol::Tcp);
    assert!(allows("10.9.9.9", 80));
    assert!(allows("10.9.9.9", 90));
    assert!(!allows("10.9.9.9", 91));
    assert!(!allows("10.244.1.7", 85), "inside the exception");
    assert!(!allows("10.244.1.2", 85), "pod b, inside the exception");
    assert!(
        allows("10.244.0.3", 85),
        "pod a2: ipBlocks match pod addresses"
    );
    assert!(!allows("11.0.0.1", 85));
    assert!(allows("172.18.0.2", 1), "its own node is always allowed");
    assert!(!np.allows(&a1, Direction::Ingress, ip("10.9.9.9"), 85, Protocol::Udp));
}

#[test]
fn egress_named_ports_resolve_on_the_destination() {
    let np = node_policy(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{port: web}]
"#,
    );
    let a1 = key("a1");
    assert!(np.allows(
        &a1,
        Direction::Egress,
        ip("10.244.0.3"),
        8080,
        Protocol::Tcp
    ));
    assert!(
        !np.allows(
            &a1,
            Direction::Egress,
            ip("10.244.1.2"),
            8080,
            Protocol::Tcp
        ),
        "b has no port named web"
    );
    assert!(!np.allows(&a1, Direction::Egress, ip("1.1.1.1"), 8080, Protocol::Tcp));
    assert!(
        np.allows(&a1, Direction::Ingress, ip("1.1.1.1"), 8080, Protocol::Tcp),
        "ingress not isolated"
    );
}
