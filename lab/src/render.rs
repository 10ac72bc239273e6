//! Rendering the cluster as the API server would serve it: the manifests' objects with what
//! kubelet, the scheduler, the IP allocators and the endpoint-slice controller add (pod status and
//! node, node pod CIDR and addresses, cluster IPs and node ports, EndpointSlices with pod IPs).
//!
//! Pure: snapshot + lab state in, file contents out. The supervisor writes them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cluster_model::k8s_openapi::api::core::v1::{
    HostIP, Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, Pod, PodCondition, PodIP,
    PodStatus, Service,
};
use cluster_model::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use cluster_model::{ClusterSnapshot, Object, ObjectKey, Problem};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::addr::{Ip6Pool, IpPool, Protocol};
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
    pub service_ips6: BTreeMap<ObjectKey, Ipv6Addr>,
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
    /// Objects the API server would refuse as they are (left out of `files`).
    pub problems: Vec<Problem>,
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

    let services = render_services(snapshot, state, alloc, &mut out.problems);
    // A Service the API server would refuse does not exist for the node agents.
    snap.services.clear();
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
    // Dual-stack: one pod CIDR per family, the primary (IPv4) first, as the node IPAM sets it.
    let cidrs = spec.pod_cidrs.get_or_insert_with(Vec::new);
    let has_family = |list: &[String], v4: bool| {
        list.iter()
            .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
            .any(|c| c.addr().is_ipv4() == v4)
    };
    if !has_family(cidrs, true) {
        cidrs.insert(0, st.pod_cidr.to_string());
    }
    if let Some(cidr6) = st.pod_cidr6
        && !has_family(cidrs, false)
    {
        cidrs.push(cidr6.to_string());
    }
    let status = node.status.get_or_insert_with(NodeStatus::default);
    let addresses = status.addresses.get_or_insert_with(Vec::new);
    let has_internal = |list: &[NodeAddress], v4: bool| {
        list.iter()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .any(|ip| ip.is_ipv4() == v4)
    };
    // An InternalIP per family (kubelet's --node-ip with both), IPv4 first.
    if !has_internal(addresses, true) {
        let at = addresses
            .iter()
            .position(|a| a.type_ == "InternalIP")
            .unwrap_or(addresses.len());
        addresses.insert(
            at,
            NodeAddress {
                type_: "InternalIP".into(),
                address: st.ip.to_string(),
            },
        );
    }
    if let Some(ip6) = st.ip6
        && !has_internal(addresses, false)
    {
        let after_v4 = addresses
            .iter()
            .rposition(|a| a.type_ == "InternalIP")
            .map_or(addresses.len(), |i| i + 1);
        addresses.insert(
            after_v4,
            NodeAddress {
                type_: "InternalIP".into(),
                address: ip6.to_string(),
            },
        );
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

/// The IPv6 node address a Node object names (an IPv6 InternalIP), if any.
pub fn node_internal_ip6(node: &Node) -> Option<Ipv6Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The IPv6 pod CIDR a Node object names (in `spec.podCIDRs` or `spec.podCIDR`), if any.
pub fn node_pod_cidr6(node: &Node) -> Option<Ipv6Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .find_map(|c| c.parse::<Ipv6Net>().ok())
        .map(|c| c.trunc())
}

/// The addresses a Pod manifest asks for in `status.podIPs` and `status.podIP` (at most one
/// per family is used), unparsable ones left out.
pub fn manifest_pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    status
        .pod_ip
        .iter()
        .chain(status.pod_ips.iter().flatten().map(|p| &p.ip))
        .filter_map(|ip| ip.parse().ok())
        .collect()
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
            // kubelet: podIP is the primary (IPv4) address, podIPs every family's.
            let ip = p.ip.map(|ip| ip.to_string()).unwrap_or_default();
            status.phase = Some("Running".into());
            status.pod_ip = Some(ip.clone());
            let mut pod_ips = vec![PodIP { ip }];
            pod_ips.extend(p.ip6.map(|ip| PodIP { ip: ip.to_string() }));
            status.pod_ips = Some(pod_ips);
            status.host_ip = Some(node.ip.to_string());
            let mut host_ips = vec![HostIP {
                ip: node.ip.to_string(),
            }];
            host_ips.extend(node.ip6.map(|ip| HostIP { ip: ip.to_string() }));
            status.host_ips = Some(host_ips);
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

/// An IP family, as `spec.ipFamilies` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    fn parse(s: &str) -> Option<Family> {
        match s {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    fn other(self) -> Family {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// A Service the API server would refuse: the field and why.
struct Refusal {
    field: String,
    message: String,
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> Refusal {
    Refusal {
        field: field.into(),
        message: message.into(),
    }
}

/// The families a Service gets cluster IPs of, primary first, as the API server decides them
/// from `ipFamilyPolicy` (default SingleStack), `ipFamilies` and the `clusterIPs` the user gave;
/// `dual` is whether the cluster has IPv6.
fn service_families(
    policy: &str,
    families: &[String],
    given: &[IpAddr],
    dual: bool,
) -> Result<Vec<Family>, Refusal> {
    let mut wanted = Vec::new();
    for (i, f) in families.iter().enumerate() {
        // Validation of the manifests already refused anything but IPv4/IPv6 and duplicates.
        let f = Family::parse(f).ok_or_else(|| {
            refuse(
                format!("spec.ipFamilies[{i}]"),
                format!("unknown family {f:?}"),
            )
        })?;
        wanted.push(f);
    }
    for (i, ip) in given.iter().enumerate() {
        if let Some(f) = wanted.get(i)
            && *f != Family::of(ip)
        {
            return Err(refuse(
                format!("spec.clusterIPs[{i}]"),
                format!("{ip} is not of family {} (spec.ipFamilies[{i}])", f.name()),
            ));
        }
    }
    let primary = wanted
        .first()
        .copied()
        .or_else(|| given.first().map(Family::of))
        .unwrap_or(Family::V4);
    let out = match policy {
        "SingleStack" => {
            if wanted.len() > 1 || given.len() > 1 {
                return Err(refuse(
                    "spec.ipFamilyPolicy",
                    "SingleStack allows one IP family; use PreferDualStack or RequireDualStack for two",
                ));
            }
            vec![primary]
        }
        "PreferDualStack" if !dual => {
            if given.len() > 1 || wanted.len() > 1 {
                return Err(refuse(
                    "spec.ipFamilies",
                    "this lab has no IPv6 (the kernel has none), so one family only",
                ));
            }
            vec![primary]
        }
        "PreferDualStack" | "RequireDualStack" => {
            if !dual {
                return Err(refuse(
                    "spec.ipFamilyPolicy",
                    "RequireDualStack: this lab has no IPv6 (the kernel has none)",
                ));
            }
            vec![primary, primary.other()]
        }
        other => {
            return Err(refuse(
                "spec.ipFamilyPolicy",
                format!("unknown policy {other:?}"),
            ));
        }
    };
    if out.contains(&Family::V6) && !dual {
        return Err(refuse(
            "spec.ipFamilies",
            "IPv6: this lab has no IPv6 (the kernel has none)",
        ));
    }
    Ok(out)
}

/// Services with cluster IPs and node ports filled in where the manifest left them out, as the
/// API server's allocators would; a Service it would refuse is left out, with a problem.
fn render_services(
    snapshot: &ClusterSnapshot,
    state: &LabState,
    alloc: &mut Allocations,
    problems: &mut Vec<Problem>,
) -> Vec<(ObjectKey, Service)> {
    alloc
        .service_ips
        .retain(|k, _| snapshot.services.contains_key(k));
    alloc
        .service_ips6
        .retain(|k, _| snapshot.services.contains_key(k));
    alloc
        .node_ports
        .retain(|(k, _), _| snapshot.services.contains_key(k));

    let mut pool = IpPool::new(state.service_cidr);
    let mut pool6 = state.service_cidr6.map(Ip6Pool::new);
    let mut used_ports: BTreeSet<i32> = BTreeSet::new();
    for service in snapshot.services.values() {
        let Some(spec) = &service.spec else { continue };
        for ip in given_cluster_ips(spec) {
            match (ip, pool6.as_mut()) {
                (IpAddr::V4(ip), _) => {
                    pool.claim(ip);
                }
                (IpAddr::V6(ip), Some(pool6)) => {
                    pool6.claim(ip);
                }
                (IpAddr::V6(_), None) => {}
            }
        }
        used_ports.extend(spec.ports.iter().flatten().filter_map(|p| p.node_port));
        used_ports.extend(spec.health_check_node_port);
    }
    for ip in alloc.service_ips.values() {
        pool.claim(*ip);
    }
    if let Some(pool6) = pool6.as_mut() {
        for ip in alloc.service_ips6.values() {
            pool6.claim(*ip);
        }
    }
    used_ports.extend(alloc.node_ports.values().copied());

    let mut out = Vec::new();
    for (key, service) in &snapshot.services {
        let mut service = service.clone();
        let spec = service.spec.get_or_insert_with(Default::default);
        let ty = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        let headless = spec.cluster_ip.as_deref() == Some("None");
        // Headless and ExternalName Services have nothing to allocate. As the API server, a
        // headless Service with a selector gets the primary family (so its EndpointSlices
        // list IPv4 addresses, as before dual-stack).
        let selects = spec.selector.as_ref().is_some_and(|s| !s.is_empty());
        if ty != "ExternalName" && headless && selects && spec.ip_families.is_none() {
            spec.ip_families = Some(vec!["IPv4".into()]);
            spec.ip_family_policy
                .get_or_insert_with(|| "SingleStack".into());
        }
        if ty != "ExternalName" && !headless {
            let ips = cluster_ips_for(key, spec, state, alloc, &mut pool, pool6.as_mut());
            match ips {
                Ok((families, ips)) => {
                    let shown: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
                    spec.cluster_ip = shown.first().cloned();
                    spec.cluster_ips = Some(shown);
                    spec.ip_families = Some(families.iter().map(|f| f.name().into()).collect());
                    spec.ip_family_policy
                        .get_or_insert_with(|| "SingleStack".into());
                }
                Err(r) => {
                    problems.push(
                        Problem::new(format!(
                            "{}; the Service is left out, as the API server would refuse it",
                            r.message
                        ))
                        .for_object(format!("Service {key}"))
                        .at_field(r.field),
                    );
                    continue;
                }
            }
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

/// The cluster IPs a Service spec names (`clusterIPs`, else `clusterIP`), unparsable ones
/// and "None" left out.
fn given_cluster_ips(spec: &cluster_model::k8s_openapi::api::core::v1::ServiceSpec) -> Vec<IpAddr> {
    let listed: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    let all: Vec<&String> = if listed.is_empty() {
        spec.cluster_ip.iter().collect()
    } else {
        listed
    };
    all.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// A Service's families and cluster IPs (one per family, primary first): the ones it names if
/// they lie in the service CIDR of their family, else the ones allocated to it before, else
/// new ones from the top of the CIDR.
fn cluster_ips_for(
    key: &ObjectKey,
    spec: &cluster_model::k8s_openapi::api::core::v1::ServiceSpec,
    state: &LabState,
    alloc: &mut Allocations,
    pool: &mut IpPool,
    mut pool6: Option<&mut Ip6Pool>,
) -> Result<(Vec<Family>, Vec<IpAddr>), Refusal> {
    let listed = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter());
    for (i, ip) in listed.enumerate() {
        if !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            // Validation refuses these; never trust it to have run.
            return Err(refuse(
                format!("spec.clusterIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            ));
        }
    }
    let given = given_cluster_ips(spec);
    let policy = spec.ip_family_policy.as_deref().unwrap_or("SingleStack");
    let families = service_families(
        policy,
        spec.ip_families.as_deref().unwrap_or(&[]),
        &given,
        state.service_cidr6.is_some(),
    )?;
    let mut ips = Vec::new();
    for (i, family) in families.iter().enumerate() {
        let named = given.get(i).copied();
        let ip = match (family, named) {
            (Family::V4, Some(IpAddr::V4(ip))) => {
                if !state.service_cidr.contains(&ip) {
                    return Err(refuse(
                        format!("spec.clusterIPs[{i}]"),
                        format!("{ip} is not in the service CIDR {}", state.service_cidr),
                    ));
                }
                alloc.service_ips.remove(key);
                IpAddr::V4(ip)
            }
            (Family::V6, Some(IpAddr::V6(ip))) => {
                let cidr = state
                    .service_cidr6
                    .unwrap_or(crate::addr::DEFAULT_SERVICE_CIDR6);
                if !cidr.contains(&ip) {
                    return Err(refuse(
                        format!("spec.clusterIPs[{i}]"),
                        format!("{ip} is not in the IPv6 service CIDR {cidr}"),
                    ));
                }
                alloc.service_ips6.remove(key);
                IpAddr::V6(ip)
            }
            (Family::V4, _) => {
                let ip = match alloc.service_ips.get(key) {
                    Some(ip) => Some(*ip),
                    None => pool.allocate_from_top(),
                }
                .ok_or_else(|| {
                    refuse(
                        "spec.clusterIP",
                        format!("no free address in the service CIDR {}", state.service_cidr),
                    )
                })?;
                alloc.service_ips.insert(key.clone(), ip);
                IpAddr::V4(ip)
            }
            (Family::V6, _) => {
                let pool6 = pool6
                    .as_deref_mut()
                    .ok_or_else(|| refuse("spec.ipFamilies", "this lab has no IPv6"))?;
                let ip = match alloc.service_ips6.get(key) {
                    Some(ip) => Some(*ip),
                    None => pool6.allocate_from_top(),
                }
                .ok_or_else(|| {
                    refuse(
                        "spec.clusterIPs",
                        format!("no free address in the IPv6 service CIDR {}", pool6.cidr()),
                    )
                })?;
                alloc.service_ips6.insert(key.clone(), ip);
                IpAddr::V6(ip)
            }
        };
        ips.push(ip);
    }
    // A family the Service no longer has gives its address back.
    if !families.contains(&Family::V4) {
        alloc.service_ips.remove(key);
    }
    if !families.contains(&Family::V6) {
        alloc.service_ips6.remove(key);
    }
    Ok((families, ips))
}

fn service_state(key: &ObjectKey, service: &Service) -> ServiceState {
    let spec = service.spec.clone().unwrap_or_default();
    ServiceState {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        type_: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
        cluster_ip: spec.cluster_ip.and_then(|ip| ip.parse().ok()),
        cluster_ips: spec
            .cluster_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect(),
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
            ip6: Some(Ipv6Addr::new(
                0xfd00,
                0x10,
                0x244,
                0,
                0,
                0,
                0,
                u16::from(ip),
            )),
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
            service_cidr6: Some(crate::addr::DEFAULT_SERVICE_CIDR6),
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
                pod_cidr6: Some("fd00:10:244::/64".parse().unwrap()),
                ip6: Some("fd00:172:18::2".parse().unwrap()),
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
            render_problems: vec![],
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
        assert_eq!(web.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10).into()));
        assert_eq!(
            json(&r, "service_default_web.json")["spec"]["ipFamilies"],
            serde_json::json!(["IPv4"]),
            "SingleStack by default, IPv4 as before"
        );

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

    fn render_yaml(yaml: &str, st: &LabState) -> Rendered {
        let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        assert_eq!(problems, vec![]);
        let mut alloc = Allocations::default();
        render(&ClusterSnapshot::from_objects(objects), st, &mut alloc)
    }

    #[test]
    fn nodes_and_pods_get_both_families_ipv4_first() {
        let r = render(&snapshot(), &state(), &mut Allocations::default());
        let node = json(&r, "node_node-1.json");
        assert_eq!(
            node["spec"]["podCIDRs"],
            serde_json::json!(["10.244.0.0/24", "fd00:10:244::/64"])
        );
        let internal: Vec<&str> = node["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["type"] == "InternalIP")
            .map(|a| a["address"].as_str().unwrap())
            .collect();
        assert_eq!(internal, ["172.18.0.2", "fd00:172:18::2"]);
        let web1 = json(&r, "pod_default_web-1.json");
        assert_eq!(web1["status"]["podIP"], "10.244.0.2");
        assert_eq!(
            web1["status"]["podIPs"],
            serde_json::json!([{"ip": "10.244.0.2"}, {"ip": "fd00:10:244::2"}])
        );
        assert_eq!(
            web1["status"]["hostIPs"],
            serde_json::json!([{"ip": "172.18.0.2"}, {"ip": "fd00:172:18::2"}])
        );
        // An IPv4-only lab renders as before.
        let mut v4 = state();
        v4.service_cidr6 = None;
        v4.nodes[0].pod_cidr6 = None;
        v4.nodes[0].ip6 = None;
        for p in &mut v4.pods {
            p.ip6 = None;
        }
        let r = render(&snapshot(), &v4, &mut Allocations::default());
        let node = json(&r, "node_node-1.json");
        assert_eq!(
            node["spec"]["podCIDRs"],
            serde_json::json!(["10.244.0.0/24"])
        );
        assert_eq!(
            json(&r, "pod_default_web-1.json")["status"]["podIPs"],
            serde_json::json!([{"ip": "10.244.0.2"}])
        );
    }

    #[test]
    fn a_node_manifest_keeps_its_own_addresses_and_gets_the_other_family() {
        let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
spec: {podCIDR: 10.244.0.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}, {type: Hostname, address: node-1}]}
"#;
        let r = render_yaml(yaml, &state());
        let node = json(&r, "node_node-1.json");
        assert_eq!(
            node["spec"]["podCIDRs"],
            serde_json::json!(["10.244.0.0/24", "fd00:10:244::/64"])
        );
        let addresses = node["status"]["addresses"].as_array().unwrap();
        let shown: Vec<String> = addresses
            .iter()
            .map(|a| {
                format!(
                    "{}={}",
                    a["type"].as_str().unwrap(),
                    a["address"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "InternalIP=172.18.0.2",
                "InternalIP=fd00:172:18::2",
                "Hostname=node-1"
            ]
        );

        let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: n}
spec: {podCIDRs: [10.50.1.0/24, "fd00:50:1::/64"]}
status: {addresses: [{type: InternalIP, address: 192.168.5.5}, {type: InternalIP, address: "fd00:99::5"}]}
"#;
        let (objects, _) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        let Object::Node(node) = &objects[0] else {
            panic!("not a node")
        };
        assert_eq!(
            node_pod_cidr6(node),
            Some("fd00:50:1::/64".parse().unwrap())
        );
        assert_eq!(node_internal_ip6(node), Some("fd00:99::5".parse().unwrap()));
        assert_eq!(node_internal_ip(node), Some(Ipv4Addr::new(192, 168, 5, 5)));
        assert_eq!(node_pod_cidr(node), Some("10.50.1.0/24".parse().unwrap()));
        assert_eq!(node_internal_ip6(&Node::default()), None);
    }

    const FAMILIES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: single}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: prefer}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: v6-first}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: v6-only}
spec:
  ipFamilies: [IPv6]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: named}
spec:
  ipFamilyPolicy: RequireDualStack
  clusterIPs: [10.96.0.20, "fd00:10:96::20"]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: half-named}
spec:
  ipFamilyPolicy: PreferDualStack
  clusterIP: "fd00:10:96::21"
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: alias}
spec: {type: ExternalName, externalName: example.com}
"#;

    fn spec_of(r: &Rendered, name: &str) -> serde_json::Value {
        json(r, &format!("service_default_{name}.json"))["spec"].clone()
    }

    #[test]
    fn services_get_cluster_ips_per_family_policy() {
        let mut st = state();
        st.pods = vec![pod_state("web-1", 2, true)];
        let (objects, problems) = parse_manifests(
            &format!("{MANIFESTS}\n---\n{FAMILIES}").replace(
                "kind: Service\nmetadata: {name: web}",
                "kind: Service\nmetadata: {name: web0}",
            ),
            ManifestFormat::Yaml,
            None,
        );
        assert_eq!(problems, vec![]);
        let mut alloc = Allocations::default();
        let snap = ClusterSnapshot::from_objects(objects);
        let r = render(&snap, &st, &mut alloc);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        let ips = |name: &str| spec_of(&r, name)["clusterIPs"].clone();
        let families = |name: &str| spec_of(&r, name)["ipFamilies"].clone();
        use serde_json::json as j;
        assert_eq!(families("single"), j!(["IPv4"]));
        assert_eq!(spec_of(&r, "single")["ipFamilyPolicy"], "SingleStack");
        assert_eq!(families("prefer"), j!(["IPv4", "IPv6"]));
        let prefer = ips("prefer");
        assert_eq!(spec_of(&r, "prefer")["clusterIP"], prefer[0]);
        assert!(
            prefer[0].as_str().unwrap().starts_with("10.96."),
            "{prefer}"
        );
        assert!(
            prefer[1].as_str().unwrap().starts_with("fd00:10:96::"),
            "{prefer}"
        );
        assert_eq!(families("v6-first"), j!(["IPv6", "IPv4"]));
        assert!(ips("v6-first")[0].as_str().unwrap().contains(':'));
        assert_eq!(families("v6-only"), j!(["IPv6"]));
        assert_eq!(ips("v6-only").as_array().unwrap().len(), 1);
        assert_eq!(ips("named"), j!(["10.96.0.20", "fd00:10:96::20"]));
        assert_eq!(families("half-named"), j!(["IPv6", "IPv4"]));
        assert_eq!(ips("half-named")[0], "fd00:10:96::21");
        // Allocated addresses are distinct, from the top of each CIDR.
        let mut all: Vec<String> = ["single", "prefer", "v6-first", "v6-only", "half-named"]
            .iter()
            .flat_map(|n| ips(n).as_array().unwrap().clone())
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert!(all.contains(&"fd00:10:96::fffe".to_string()), "{all:?}");
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "an address given twice");
        // Headless and ExternalName are left as they are.
        let headless = spec_of(&r, "headless");
        assert_eq!(headless["clusterIP"], "None");
        assert!(
            headless
                .get("clusterIPs")
                .is_none_or(|ips| ips == &j!(["None"])),
            "{headless}"
        );
        assert_eq!(
            headless["ipFamilies"],
            j!(["IPv4"]),
            "as the API server defaults it"
        );
        let headless_slices = r
            .files
            .keys()
            .filter(|f| f.starts_with("endpointslice_default_headless-"))
            .count();
        assert_eq!(headless_slices, 1, "IPv4 only, as before");
        assert!(spec_of(&r, "alias").get("clusterIPs").is_none());
        // The state knows every cluster IP, primary first.
        let v6_only = r.services.iter().find(|s| s.name == "v6-only").unwrap();
        assert!(v6_only.cluster_ip.is_some_and(|ip| ip.is_ipv6()));
        let prefer = r.services.iter().find(|s| s.name == "prefer").unwrap();
        assert_eq!(prefer.cluster_ips.len(), 2);
        assert!(prefer.cluster_ips[0].is_ipv4() && prefer.cluster_ips[1].is_ipv6());

        // One EndpointSlice per family, with the pods' address of that family.
        let slices: Vec<serde_json::Value> = r
            .files
            .iter()
            .filter(|(f, _)| f.starts_with("endpointslice_default_prefer-"))
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect();
        let mut got: Vec<(String, String)> = slices
            .iter()
            .map(|s| {
                (
                    s["addressType"].as_str().unwrap().to_string(),
                    s["endpoints"][0]["addresses"][0]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("IPv4".to_string(), "10.244.0.2".to_string()),
                ("IPv6".to_string(), "fd00:10:244::2".to_string())
            ]
        );

        // Sticky across renders; a family dropped gives its address back.
        assert_eq!(render(&snap, &st, &mut alloc), r);
        assert!(
            alloc
                .service_ips6
                .contains_key(&ObjectKey::new("default", "prefer"))
        );
    }

    #[test]
    fn services_the_api_would_refuse_are_left_out_with_the_field_named() {
        let bad = r#"
apiVersion: v1
kind: Service
metadata: {name: outside}
spec:
  ipFamilies: [IPv6]
  clusterIP: "fd00:99::1"
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: outside4}
spec:
  clusterIP: 10.200.0.1
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: contradiction}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6]
  clusterIPs: [10.96.0.30]
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: two-single}
spec:
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv4, IPv6]
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: fine}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {app: web}
  ports: [{port: 80}]
"#;
        let r = render_yaml(bad, &state());
        let shown: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
        let has = |object: &str, field: &str| {
            shown
                .iter()
                .any(|p| p.starts_with(&format!("Service default/{object}: {field}: ")))
        };
        assert!(has("outside", "spec.clusterIPs[0]"), "{shown:#?}");
        assert!(
            shown
                .iter()
                .any(|p| p.contains("fd00:99::1") && p.contains("fd00:10:96::/112")),
            "{shown:#?}"
        );
        assert!(has("outside4", "spec.clusterIPs[0]"), "{shown:#?}");
        assert!(has("contradiction", "spec.clusterIPs[0]"), "{shown:#?}");
        assert!(has("two-single", "spec.ipFamilyPolicy"), "{shown:#?}");
        assert_eq!(shown.len(), 4, "{shown:#?}");
        for gone in ["outside", "outside4", "contradiction", "two-single"] {
            assert!(
                !r.files.keys().any(|f| f.contains(&format!("_{gone}"))),
                "{gone} rendered: {:?}",
                r.files.keys()
            );
            assert!(!r.services.iter().any(|s| s.name == gone));
        }
        // The rest still applies.
        assert_eq!(
            spec_of(&r, "fine")["clusterIPs"].as_array().unwrap().len(),
            2
        );

        // Without IPv6 in the lab: RequireDualStack and IPv6 are refused, PreferDualStack
        // falls back to one family.
        let mut v4 = state();
        v4.service_cidr6 = None;
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: req}
spec: {ipFamilyPolicy: RequireDualStack, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: six}
spec: {ipFamilies: [IPv6], selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: prefer}
spec: {ipFamilyPolicy: PreferDualStack, selector: {app: web}, ports: [{port: 80}]}
"#;
        let r = render_yaml(yaml, &v4);
        let shown: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:#?}");
        assert!(shown.iter().all(|p| p.contains("no IPv6")), "{shown:#?}");
        assert_eq!(
            spec_of(&r, "prefer")["ipFamilies"],
            serde_json::json!(["IPv4"])
        );
    }
}
