//! A small cluster to explain connections in, written as manifests.

#![allow(dead_code)]

use std::net::IpAddr;

use cluster_model::{ClusterSnapshot, ManifestFormat, ObjectKey, parse_manifests};
use sluice_policy::{Peer, PolicySet, Protocol, Verdict, compiled_verdict};

/// Two nodes, three namespaces, pods on both nodes with named ports, one host-network pod.
///
/// | pod | labels | node | address | named ports |
/// | --- | --- | --- | --- | --- |
/// | default/web | app=web, tier=front | node-a | 10.0.1.1 | http 8080/TCP, metrics 9090/TCP, dns 53/UDP |
/// | default/db | app=db, tier=back | node-b | 10.0.2.1 | pg 5432/TCP |
/// | default/client | app=client | node-a | 10.0.1.2 | |
/// | prod/api | app=api | node-b | 10.0.2.2, fd00::2:2 | http 8081/TCP, sidecar admin 9901/TCP |
/// | prod/client | app=client | node-a | 10.0.1.3 | |
/// | dev/client | app=client | node-b | 10.0.2.3 | |
/// | default/agent | app=agent (hostNetwork) | node-a | 192.168.0.1 | |
///
/// Namespaces: prod {team: a, env: prod}, dev {team: b}, default (implied). Nodes: node-a
/// 192.168.0.1, node-b 192.168.0.2.
pub const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: Hostname, address: node-a}, {type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a, env: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {team: b}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web, tier: front}}
spec:
  nodeName: node-a
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]
  - name: exporter
    ports: [{name: metrics, containerPort: 9090}]
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, labels: {app: db, tier: back}}
spec: {nodeName: node-b, containers: [{name: pg, ports: [{name: pg, containerPort: 5432}]}]}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: prod, labels: {app: api}}
spec:
  nodeName: node-b
  initContainers:
  - {name: proxy, restartPolicy: Always, ports: [{name: admin, containerPort: 9901}]}
  - {name: setup, ports: [{name: setup, containerPort: 7000}]}
  containers: [{name: api, ports: [{name: http, containerPort: 8081}]}]
status: {podIP: 10.0.2.2, podIPs: [{ip: 10.0.2.2}, {ip: "fd00::2:2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: prod, labels: {app: client}}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: dev, labels: {app: client}}
spec: {nodeName: node-b, containers: [{name: c}]}
status: {podIP: 10.0.2.3}
---
apiVersion: v1
kind: Pod
metadata: {name: agent, labels: {app: agent}}
spec: {nodeName: node-a, hostNetwork: true, containers: [{name: a}]}
status: {podIP: 192.168.0.1}
"#;

/// A NetworkPolicy document: `spec` is YAML block text at indentation 0.
pub fn np(namespace: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )
}

/// The cluster plus these policies (which must be valid).
pub fn snapshot(policies: &[String]) -> ClusterSnapshot {
    let yaml = format!("{CLUSTER}{}", policies.concat());
    let (objects, problems) = parse_manifests(&yaml, ManifestFormat::Yaml, None);
    assert_eq!(problems, vec![], "fixture or policies invalid");
    ClusterSnapshot::from_objects(objects)
}

/// "ns/name" as a pod peer.
pub fn pod(key: &str) -> Peer {
    let (ns, name) = key.split_once('/').expect("ns/name");
    Peer::Pod(ObjectKey::new(ns, name))
}

pub fn ip(addr: &str) -> Peer {
    Peer::Ip(addr.parse::<IpAddr>().expect("address"))
}

pub fn node(name: &str) -> Peer {
    Peer::Node(name.to_string())
}

pub const TCP: Protocol = Protocol::Tcp;
pub const UDP: Protocol = Protocol::Udp;
pub const SCTP: Protocol = Protocol::Sctp;

/// One connection and whether it should be allowed.
pub struct Case {
    pub name: &'static str,
    pub from: Peer,
    pub to: Peer,
    pub port: u16,
    pub protocol: Protocol,
    pub allowed: bool,
}

pub fn case(
    name: &'static str,
    from: Peer,
    to: Peer,
    port: u16,
    protocol: Protocol,
    allowed: bool,
) -> Case {
    Case {
        name,
        from,
        to,
        port,
        protocol,
        allowed,
    }
}

pub fn verdict(set: &PolicySet<'_>, c: &Case) -> Verdict {
    set.explain(&c.from, &c.to, c.port, c.protocol)
        .unwrap_or_else(|e| panic!("{}: {e}", c.name))
}

/// Checks every case against the cluster with `policies`; `rule` names the rule tested.
pub fn check(rule: &str, policies: &[String], cases: &[Case]) {
    let snap = snapshot(policies);
    let set = PolicySet::new(&snap);
    let mut failures = Vec::new();
    for c in cases {
        let v = verdict(&set, c);
        if v.allowed != c.allowed {
            failures.push(format!(
                "{}: expected allowed={}, got\n{v}",
                c.name, c.allowed
            ));
        }
        if let Some(compiled) = compiled_verdict(&snap, &v.from, &v.to, c.port, c.protocol)
            && compiled != c.allowed
        {
            failures.push(format!(
                "{}: the compiled node tables say allowed={compiled}, expected {}",
                c.name, c.allowed
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{rule}\n{}\npolicies:\n{}",
        failures.join("\n"),
        policies.concat()
    );
}
