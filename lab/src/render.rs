//! Rendering the cluster as the API server would serve it: the manifests' objects with what
//! kubelet, the scheduler, the IP allocators and the endpoint-slice controller add (pod status and
//! node, node pod CIDR and addresses, cluster IPs and node ports, EndpointSlices with pod IPs).
//!
//! Pure: snapshot + lab state in, file contents out. The supervisor writes them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use cluster_model::k8s_openapi::api::core::v1::{
    HostIP, Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, Pod, PodCondition, PodIP,
    PodStatus, Service,
};
use cluster_model::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use cluster_model::{ClusterSnapshot, Object, ObjectKey};
use ipnet::Ipv4Net;

use crate::addr::{IpPool, Protocol};
use crate::names;
use crate::state::{
    LabState, NodeState, PodPhase, PodState, PortSpec, ServicePortState, ServiceState,
};

/// The NodePort range.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<i32> = 30000..=32767;

/// Addresses the lab handed out for objects that did not name their own; kept while the object
/// exists so that they do not move.
#[derive(Clone, Debug, Default)]
pub struct Allocations {
    pub service_ips: BTreeMap<ObjectKey, Ipv4Addr>,
    /// (Service, index of the port) → node port.
    pub node_ports: BTreeMap<(ObjectKey, usize), i32>,
}

/// What rendering produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rendered {
    /// File name → JSON.
    pub files: BTreeMap<String, Vec<u8>>,
    pub services: Vec<ServiceState>,
    /// Pod → whether it is Ready as rendered.
    pub pod_ready: BTreeMap<ObjectKey, bool>,
    /// Objects of kinds the lab cannot render yet ("Kind ns/name").
    pub unrendered: Vec<String>,
}

/// The container ports a pod declares (TCP and UDP; others are left out), sorted, without
/// duplicates.
pub fn pod_ports(pod: &Pod) -> Vec<PortSpec> {
    let mut ports = BTreeSet::new();
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    for port in spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
    {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => continue,
        };
        let Ok(number) = u16::try_from(port.container_port) else {
            continue;
        };
        if number == 0 {
            continue;
        }
        ports.insert(PortSpec {
            name: port.name.clone(),
            port: number,
            protocol,
        });
    }
    ports.into_iter().collect()
}

/// Whether the manifest itself gives the pod a Ready condition (then it is kept as given).
pub fn manifest_ready(pod: &Pod) -> Option<bool> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
}

/// Renders every object. `alloc` is updated (new objects get addresses, gone ones lose them).
pub fn render(snapshot: &ClusterSnapshot, state: &LabState, alloc: &mut Allocations) -> Rendered {
    let mut snap = snapshot.clone();
    let mut out = Rendered::default();

    // Nodes: the manifests' (or the implicit one) with pod CIDR, addresses and Ready.
    for node in &state.nodes {
        let base = snapshot
            .nodes
            .get(&node.name)
            .cloned()
            .unwrap_or_else(|| Node {
                metadata: ObjectMeta {
                    name: Some(node.name.clone()),
                    ..Default::default()
                },
                ..Default::default()
            });
        snap.nodes
            .insert(node.name.clone(), render_node(base, node));
    }

    let pods: BTreeMap<(String, String), &PodState> = state
        .pods
        .iter()
        .map(|p| ((p.namespace.clone(), p.name.clone()), p))
        .collect();
    for (key, pod) in &snapshot.pods {
        let st = pods
            .get(&(key.namespace.clone(), key.name.clone()))
            .copied();
        let node = st
            .and_then(|p| p.node.as_deref())
            .and_then(|n| state.node(n));
        let (rendered, ready) = render_pod(pod.clone(), st, node);
        out.pod_ready.insert(key.clone(), ready);
        snap.pods.insert(key.clone(), rendered);
    }

    let services = render_services(snapshot, state.service_cidr, alloc);
    for (key, service) in services {
        out.services.push(service_state(&key, &service));
        snap.services.insert(key, service);
    }

    snap.rederive_endpoint_slices();
    for object in snap.objects() {
        let key = object.key();
        let file = names::rendered_file(object.kind().name(), &key.namespace, &key.name);
        match to_json(&object) {
            Some(json) => {
                out.files.insert(file, json);
            }
            None => out.unrendered.push(object.describe()),
        }
    }
    out
}

/// An object as JSON (with apiVersion and kind), None for a kind this lab cannot write yet.
fn to_json(object: &Object) -> Option<Vec<u8>> {
    let value = match object {
        Object::Node(o) => serde_json::to_vec_pretty(o),
        Object::Namespace(o) => serde_json::to_vec_pretty(o),
        Object::Pod(o) => serde_json::to_vec_pretty(o),
        Object::Service(o) => serde_json::to_vec_pretty(o),
        Object::EndpointSlice(o) => serde_json::to_vec_pretty(o),
        Object::NetworkPolicy(o) => serde_json::to_vec_pretty(o),
        Object::Ingress(o) => serde_json::to_vec_pretty(o),
        Object::IngressClass(o) => serde_json::to_vec_pretty(o),
        Object::Secret(o) => serde_json::to_vec_pretty(o),
        // Kinds the model learns later: rendered once listed above.
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    let mut bytes = value.ok()?;
    bytes.push(b'\n');
    Some(bytes)
}

fn render_node(mut node: Node, st: &NodeState) -> Node {
    let spec = node.spec.get_or_insert_with(NodeSpec::default);
    if spec.pod_cidr.as_deref().unwrap_or("").is_empty() {
        spec.pod_cidr = Some(st.pod_cidr.to_string());
    }
    if spec.pod_cidrs.as_ref().is_none_or(|c| c.is_empty()) {
        spec.pod_cidrs = spec.pod_cidr.clone().map(|c| vec![c]);
    }
    let status = node.status.get_or_insert_with(NodeStatus::default);
    let addresses = status.addresses.get_or_insert_with(Vec::new);
    if !addresses.iter().any(|a| a.type_ == "InternalIP") {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: st.ip.to_string(),
        });
    }
    if !addresses.iter().any(|a| a.type_ == "Hostname") {
        addresses.push(NodeAddress {
            type_: "Hostname".into(),
            address: st.name.clone(),
        });
    }
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    if !conditions.iter().any(|c| c.type_ == "Ready") {
        conditions.push(NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("KubeletReady".into()),
            ..Default::default()
        });
    }
    node
}

/// The node address a Node object names (InternalIP, IPv4), if any.
pub fn node_internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The pod CIDR a Node object names (IPv4), if any.
pub fn node_pod_cidr(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .find_map(|c| c.parse::<Ipv4Net>().ok())
        .map(|c| c.trunc())
}

/// A pod with the status kubelet would give it, and whether it is Ready.
fn render_pod(mut pod: Pod, st: Option<&PodState>, node: Option<&NodeState>) -> (Pod, bool) {
    let running = st.filter(|p| p.phase == PodPhase::Running && p.ip.is_some());
    let declared_ready = manifest_ready(&pod);
    let ready = match running {
        Some(p) => declared_ready.unwrap_or(p.listening),
        None => false,
    };
    if let (Some(p), Some(spec)) = (st, pod.spec.as_mut())
        && let Some(node) = &p.node
    {
        spec.node_name = Some(node.clone());
    }
    let status = pod.status.get_or_insert_with(PodStatus::default);
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    let has = |conditions: &Vec<PodCondition>, t: &str| conditions.iter().any(|c| c.type_ == t);
    let cond = |t: &str, v: bool| PodCondition {
        type_: t.to_string(),
        status: if v { "True" } else { "False" }.to_string(),
        ..Default::default()
    };
    match (running, node) {
        (Some(p), Some(node)) => {
            let ip = p.ip.map(|ip| ip.to_string()).unwrap_or_default();
            status.phase = Some("Running".into());
            status.pod_ip = Some(ip.clone());
            status.pod_ips = Some(vec![PodIP { ip }]);
            status.host_ip = Some(node.ip.to_string());
            status.host_ips = Some(vec![HostIP {
                ip: node.ip.to_string(),
            }]);
            for (t, v) in [
                ("PodScheduled", true),
                ("Initialized", true),
                ("ContainersReady", ready),
                ("Ready", ready),
            ] {
                if !has(conditions, t) {
                    conditions.push(cond(t, v));
                }
            }
        }
        _ => {
            status.phase = Some("Pending".into());
            status.pod_ip = None;
            status.pod_ips = None;
            status.host_ip = None;
            status.host_ips = None;
            let scheduled = st.and_then(|p| p.node.as_ref()).is_some();
            conditions.retain(|c| c.type_ != "Ready" && c.type_ != "ContainersReady");
            if !has(conditions, "PodScheduled") {
                let mut c = cond("PodScheduled", scheduled);
                if !scheduled {
                    c.reason = Some("Unschedulable".into());
                    c.message =
                        Some("the node named by spec.nodeName does not exist in the lab".into());
                }
                conditions.push(c);
            }
            conditions.push(cond("Ready", false));
        }
    }
    (pod, ready)
}

/// Services with cluster IPs and node ports filled in where the manifest left them out.
fn render_services(
    snapshot: &ClusterSnapshot,
    service_cidr: Ipv4Net,
    alloc: &mut Allocations,
) -> Vec<(ObjectKey, Service)> {
    alloc
        .service_ips
        .retain(|k, _| snapshot.services.contains_key(k));
    alloc
        .node_ports
        .retain(|(k, _), _| snapshot.services.contains_key(k));

    let mut pool = IpPool::new(service_cidr);
    let mut used_ports: BTreeSet<i32> = BTreeSet::new();
    for service in snapshot.services.values() {
        let Some(spec) = &service.spec else { continue };
        if let Some(ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()) {
            pool.claim(ip);
        }
        used_ports.extend(spec.ports.iter().flatten().filter_map(|p| p.node_port));
        used_ports.extend(spec.health_check_node_port);
    }
    for ip in alloc.service_ips.values() {
        pool.claim(*ip);
    }
    used_ports.extend(alloc.node_ports.values().copied());

    let mut out = Vec::new();
    for (key, service) in &snapshot.services {
        let mut service = service.clone();
        let spec = service.spec.get_or_insert_with(Default::default);
        let ty = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        let named = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty())
            .is_some();
        if ty != "ExternalName" && !named {
            let ip = match alloc.service_ips.get(key) {
                Some(ip) => Some(*ip),
                None => pool.allocate_from_top(),
            };
            if let Some(ip) = ip {
                alloc.service_ips.insert(key.clone(), ip);
                spec.cluster_ip = Some(ip.to_string());
                spec.cluster_ips = Some(vec![ip.to_string()]);
            }
        }
        let has_ip = spec
            .cluster_ip
            .as_deref()
            .is_some_and(|ip| ip.parse::<Ipv4Addr>().is_ok());
        if has_ip {
            spec.ip_families.get_or_insert_with(|| vec!["IPv4".into()]);
            spec.ip_family_policy
                .get_or_insert_with(|| "SingleStack".into());
        }
        // As the API server: LoadBalancer Services get node ports unless they opt out.
        let wants_node_ports = ty == "NodePort"
            || (ty == "LoadBalancer" && spec.allocate_load_balancer_node_ports != Some(false));
        // The port allocated before for (Service, index), else the lowest free one.
        let mut allocate = |id: (ObjectKey, usize)| {
            let chosen = alloc.node_ports.get(&id).copied().or_else(|| {
                let free = NODE_PORT_RANGE.clone().find(|p| !used_ports.contains(p))?;
                used_ports.insert(free);
                Some(free)
            });
            if let Some(p) = chosen {
                alloc.node_ports.insert(id, p);
            }
            chosen
        };
        if wants_node_ports {
            for (i, port) in spec.ports.iter_mut().flatten().enumerate() {
                if port.node_port.is_none() {
                    port.node_port = allocate((key.clone(), i));
                }
            }
        }
        // And a health check port for LoadBalancers that keep traffic on the receiving node.
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        if ty == "LoadBalancer" && local && spec.health_check_node_port.is_none() {
            // Index usize::MAX: the health check, not a Service port.
            spec.health_check_node_port = allocate((key.clone(), usize::MAX));
        }
        out.push((key.clone(), service));
    }
    out
}

fn service_state(key: &ObjectKey, service: &Service) -> ServiceState {
    let spec = service.spec.clone().unwrap_or_default();
    ServiceState {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        type_: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
        cluster_ip: spec.cluster_ip.and_then(|ip| ip.parse().ok()),
        ports: spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                Some(ServicePortState {
                    name: p.name.filter(|n| !n.is_empty()),
                    port: u16::try_from(p.port).ok()?,
                    protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                    node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Phase, STATE_VERSION};
    use cluster_model::{ManifestFormat, parse_manifests};

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: auto}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 81, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec:
  containers:
  - name: c
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 53, protocol: UDP}
    - {name: sctp, containerPort: 9, protocol: SCTP}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, labels: {app: web}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status:
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Pod
metadata: {name: lost, labels: {app: web}}
spec:
  nodeName: node-9
  containers: [{name: c}]
"#;

    fn snapshot() -> ClusterSnapshot {
        let (objects, problems) = parse_manifests(MANIFESTS, ManifestFormat::Yaml, None);
        assert_eq!(problems, vec![]);
        ClusterSnapshot::from_objects(objects)
    }

    fn pod_state(name: &str, ip: u8, listening: bool) -> PodState {
        PodState {
            namespace: "default".into(),
            name: name.into(),
            phase: PodPhase::Running,
            node: Some("node-1".into()),
            netns: Some(format!("sl-t-p.default.{name}")),
            cgroup: None,
            ip: Some(Ipv4Addr::new(10, 244, 0, ip)),
            host_veth: Some("slv0".into()),
            ports: vec![],
            server: None,
            listening,
            ready: false,
            log: None,
        }
    }

    fn state() -> LabState {
        LabState {
            version: STATE_VERSION,
            name: "t".into(),
            manifests_dir: "/m".into(),
            service_cidr: "10.96.0.0/16".parse().unwrap(),
            cgroup: "/cg".into(),
            netns_prefix: "sl-t-".into(),
            proxy: None,
            phase: Phase::Ready,
            error: None,
            error_log: None,
            supervisor: None,
            underlay: None,
            external: None,
            nodes: vec![NodeState {
                name: "node-1".into(),
                netns: "sl-t-n.node-1".into(),
                cgroup: "/cg/node.node-1".into(),
                pod_cidr: "10.244.0.0/24".parse().unwrap(),
                ip: Ipv4Addr::new(172, 18, 0, 2),
                index: 0,
                proxy: None,
                proxy_ready: false,
                proxy_log: None,
                next_veth: 0,
                underlay_port: None,
            }],
            pods: vec![pod_state("web-1", 2, true), pod_state("web-2", 3, true)],
            services: vec![],
            ingress: None,
        }
    }

    fn json(r: &Rendered, file: &str) -> serde_json::Value {
        serde_json::from_slice(
            r.files
                .get(file)
                .unwrap_or_else(|| panic!("no {file} in {:?}", r.files.keys())),
        )
        .unwrap()
    }

    #[test]
    fn ports_tcp_and_udp_only() {
        let snap = snapshot();
        let ports = pod_ports(&snap.pods[&ObjectKey::new("default", "web-1")]);
        let got: Vec<(u16, Protocol)> = ports.iter().map(|p| (p.port, p.protocol)).collect();
        assert_eq!(got, [(53, Protocol::Udp), (8080, Protocol::Tcp)]);
    }

    #[test]
    fn renders_like_the_api_would() {
        let mut alloc = Allocations::default();
        let r = render(&snapshot(), &state(), &mut alloc);

        let node = json(&r, "node_node-1.json");
        assert_eq!(node["kind"], "Node");
        assert_eq!(node["spec"]["podCIDR"], "10.244.0.0/24");
        assert_eq!(node["status"]["addresses"][0]["address"], "172.18.0.2");

        let web1 = json(&r, "pod_default_web-1.json");
        assert_eq!(web1["apiVersion"], "v1");
        assert_eq!(web1["spec"]["nodeName"], "node-1");
        assert_eq!(web1["status"]["phase"], "Running");
        assert_eq!(web1["status"]["podIP"], "10.244.0.2");
        assert_eq!(web1["status"]["podIPs"][0]["ip"], "10.244.0.2");
        assert_eq!(web1["status"]["hostIP"], "172.18.0.2");
        let ready = |v: &serde_json::Value| {
            v["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()["status"]
                .clone()
        };
        assert_eq!(ready(&web1), "True");
        // The manifest declared web-2 not ready: kept although its server listens.
        let web2 = json(&r, "pod_default_web-2.json");
        assert_eq!(ready(&web2), "False");
        assert!(!r.pod_ready[&ObjectKey::new("default", "web-2")]);
        // A pod whose node does not exist is Pending without an IP.
        let lost = json(&r, "pod_default_lost.json");
        assert_eq!(lost["status"]["phase"], "Pending");
        assert!(lost["status"]["podIP"].is_null());

        // Services: the named IP kept, the other allocated from the top, node port allocated.
        let auto = json(&r, "service_default_auto.json");
        assert_eq!(auto["spec"]["clusterIP"], "10.96.255.254");
        assert_eq!(auto["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(
            json(&r, "service_default_web.json")["spec"]["clusterIP"],
            "10.96.0.10"
        );
        let web = r.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));

        // Derived slices carry the pod IPs now; web-2 is listed not ready.
        let slices: Vec<serde_json::Value> = r
            .files
            .iter()
            .filter(|(f, _)| f.starts_with("endpointslice_default_web-"))
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(slices.len(), 1, "{:?}", r.files.keys());
        let endpoints = slices[0]["endpoints"].as_array().unwrap();
        let addrs: Vec<&str> = endpoints
            .iter()
            .map(|e| e["addresses"][0].as_str().unwrap())
            .collect();
        assert_eq!(addrs, ["10.244.0.2", "10.244.0.3"]);
        assert_eq!(endpoints[1]["conditions"]["ready"], false);
        assert_eq!(slices[0]["ports"][0]["port"], 8080);
        assert!(r.files.contains_key("namespace_default.json"));
    }

    #[test]
    fn allocations_are_sticky_and_released() {
        let mut alloc = Allocations::default();
        let snap = snapshot();
        let first = render(&snap, &state(), &mut alloc);
        let again = render(&snap, &state(), &mut alloc);
        assert_eq!(first, again, "rendering is deterministic");
        let mut without = snap.clone();
        without.services.remove(&ObjectKey::new("default", "auto"));
        render(&without, &state(), &mut alloc);
        assert!(alloc.service_ips.is_empty());
        assert!(alloc.node_ports.is_empty());
    }

    #[test]
    fn load_balancers_get_node_ports_unless_they_opt_out_and_local_ones_a_health_check() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: lb-local}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: lb-no-ports}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  ports: [{port: 80}]
"#;
        let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        assert_eq!(problems, vec![]);
        let mut alloc = Allocations::default();
        let r = render(
            &ClusterSnapshot::from_objects(objects),
            &state(),
            &mut alloc,
        );
        let local = json(&r, "service_default_lb-local.json");
        assert_eq!(local["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(local["spec"]["healthCheckNodePort"], 30001);
        let none = json(&r, "service_default_lb-no-ports.json");
        assert!(none["spec"]["ports"][0].get("nodePort").is_none(), "{none}");
        assert!(none["spec"].get("healthCheckNodePort").is_none(), "{none}");
    }

    #[test]
    fn other_kinds_pass_through() {
        let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: prod}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#;
        let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        assert_eq!(problems, vec![]);
        let r = render(
            &ClusterSnapshot::from_objects(objects),
            &state(),
            &mut Allocations::default(),
        );
        assert!(r.unrendered.is_empty(), "{:?}", r.unrendered);
        let policy = json(&r, "networkpolicy_prod_deny.json");
        assert_eq!(policy["kind"], "NetworkPolicy");
        assert_eq!(policy["spec"]["policyTypes"][0], "Ingress");
        assert!(r.files.contains_key("namespace_prod.json"));
    }

    #[test]
    fn implicit_node_is_rendered() {
        let mut alloc = Allocations::default();
        let r = render(&ClusterSnapshot::default(), &state(), &mut alloc);
        assert_eq!(
            r.files.keys().cloned().collect::<Vec<_>>(),
            ["node_node-1.json"]
        );
    }

    #[test]
    fn node_fields_from_manifests() {
        let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: n}
spec: {podCIDR: 10.50.1.7/24}
status: {addresses: [{type: Hostname, address: n}, {type: InternalIP, address: 192.168.5.5}]}
"#;
        let (objects, _) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        let Object::Node(node) = &objects[0] else {
            panic!("not a node")
        };
        assert_eq!(node_pod_cidr(node), Some("10.50.1.0/24".parse().unwrap()));
        assert_eq!(node_internal_ip(node), Some(Ipv4Addr::new(192, 168, 5, 5)));
        assert_eq!(node_pod_cidr(&Node::default()), None);
    }
}
