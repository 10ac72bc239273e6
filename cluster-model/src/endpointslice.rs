//! EndpointSlices derived from Services and Pods the way the endpoint-slice controller does it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ContainerPort, Node, ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::object::ObjectKey;

/// The label naming the Service a slice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label naming who manages a slice.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Its value on slices the endpoint-slice controller (here: the derivation) made.
pub const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// The label the controller puts on slices of headless Services.
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Derives the EndpointSlices of every Service with a non-empty selector that is not
/// ExternalName, from the Pods (and Nodes, for zones), as the endpoint-slice controller would:
///
/// - candidate pods: same namespace, labels matching the selector, an IP of the slice's family,
///   phase not Succeeded/Failed;
/// - each Service port's `targetPort` is resolved per pod (absent: the port; a number: itself; a
///   name: the pod's container port with that name and the Service port's protocol); a port that
///   does not resolve on a pod is left out for that pod;
/// - endpoints are grouped by resolved port list and address family, one slice per group, named
///   `<service>-<hash of family and ports>`; a Service with no endpoints in a family gets one
///   empty slice for it (the controller's placeholder).
///
/// Pods and Services are keyed by their snapshot keys (namespace defaulted); nodes by name.
/// The result is deterministic: slices ordered by Service then name, endpoints by address.
pub fn derive_endpoint_slices(
    services: &BTreeMap<ObjectKey, Service>,
    pods: &BTreeMap<ObjectKey, Pod>,
    nodes: &BTreeMap<String, Node>,
) -> Vec<EndpointSlice> {
    let index = PodIndex::new(pods);
    let mut out = Vec::new();
    for (key, service) in services {
        out.extend(slices_for_service(key, service, &index, nodes));
    }
    out
}

/// [`derive_endpoint_slices`] for the Services of one namespace only (they select Pods of their
/// own namespace only, so this looks at no other).
pub(crate) fn derive_endpoint_slices_in(
    namespace: &str,
    services: &BTreeMap<ObjectKey, Service>,
    pods: &BTreeMap<ObjectKey, Pod>,
    nodes: &BTreeMap<String, Node>,
) -> Vec<EndpointSlice> {
    let index = PodIndex::new(in_namespace(pods, namespace));
    let mut out = Vec::new();
    for (key, service) in in_namespace(services, namespace) {
        out.extend(slices_for_service(key, service, &index, nodes));
    }
    out
}

/// The derived slice with key `key`, if the Services of its namespace derive one: only those
/// whose name and a '-' start the slice's name can (derived slices are named
/// `<service>-<hash>`), and the first of them in key order wins, as in
/// [`derive_endpoint_slices`].
pub(crate) fn derived_slice_named(
    key: &ObjectKey,
    services: &BTreeMap<ObjectKey, Service>,
    pods: &BTreeMap<ObjectKey, Pod>,
    nodes: &BTreeMap<String, Node>,
) -> Option<EndpointSlice> {
    let mut candidates: Vec<(&ObjectKey, &Service)> = key
        .name
        .match_indices('-')
        .filter_map(|(at, _)| {
            services.get_key_value(&ObjectKey::new(key.namespace.clone(), &key.name[..at]))
        })
        .collect();
    candidates.sort_by(|a, b| a.0.cmp(b.0));
    let mut index = None;
    for (service_key, service) in candidates {
        let index = index.get_or_insert_with(|| PodIndex::new(in_namespace(pods, &key.namespace)));
        let found = slices_for_service(service_key, service, index, nodes)
            .into_iter()
            .find(|s| ObjectKey::of(&s.metadata) == *key);
        if found.is_some() {
            return found;
        }
    }
    None
}

/// The entries of a map keyed by [`ObjectKey`] in one namespace, in key order.
pub(crate) fn in_namespace<'a, T>(
    map: &'a BTreeMap<ObjectKey, T>,
    namespace: &'a str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a T)> + 'a {
    map.range(ObjectKey::new(namespace, "")..)
        .take_while(move |(k, _)| k.namespace == namespace)
}

/// Pods by namespace, label key and value, each list in key order: a selector's candidates are
/// then the shortest list among its pairs, filtered, instead of every pod of the namespace.
struct PodIndex<'a> {
    /// (namespace, label key, label value) → pods.
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<KeyedPod<'a>>>,
}

type KeyedPod<'a> = (&'a ObjectKey, &'a Pod);

impl<'a> PodIndex<'a> {
    fn new(pods: impl IntoIterator<Item = KeyedPod<'a>>) -> Self {
        let mut by_label: HashMap<_, Vec<_>> = HashMap::new();
        for (key, pod) in pods {
            for (k, v) in pod.metadata.labels.iter().flatten() {
                by_label
                    .entry((key.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push((key, pod));
            }
        }
        PodIndex { by_label }
    }

    /// The pods of `namespace` a non-empty selector selects, in key order.
    fn selected(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<KeyedPod<'a>> {
        let lists: Option<Vec<&Vec<_>>> = selector
            .iter()
            .map(|(k, v)| self.by_label.get(&(namespace, k.as_str(), v.as_str())))
            .collect();
        let Some(shortest) = lists.and_then(|l| l.into_iter().min_by_key(|l| l.len())) else {
            return Vec::new(); // some pair matches no pod
        };
        shortest
            .iter()
            .filter(|(_, pod)| pod_selected(pod, selector))
            .copied()
            .collect()
    }
}

/// One resolved slice port; slices group endpoints by the list of these.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortKey {
    name: String,
    port: i32,
    protocol: String,
    app_protocol: Option<String>,
}

fn slices_for_service(
    key: &ObjectKey,
    service: &Service,
    pods: &PodIndex<'_>,
    nodes: &BTreeMap<String, Node>,
) -> Vec<EndpointSlice> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let service_ports = spec.ports.as_deref().unwrap_or(&[]);
    let candidates = pods.selected(&key.namespace, selector);

    let mut slices = Vec::new();
    let mut used_names = BTreeSet::new();
    for family in address_types(service) {
        let mut groups: BTreeMap<Vec<PortKey>, Vec<(IpAddr, Endpoint)>> = BTreeMap::new();
        for (pod_key, pod) in &candidates {
            let Some(addr) = pod_address(pod, family) else {
                continue;
            };
            let ports: Vec<PortKey> = service_ports
                .iter()
                .filter_map(|sp| resolve_port(sp, pod))
                .collect();
            let mut endpoint = endpoint_for(pod_key, pod, addr, key, publish_not_ready, nodes);
            endpoint.hints = hints_for(spec.traffic_distribution.as_deref(), &endpoint);
            groups.entry(ports).or_default().push((addr, endpoint));
        }
        if groups.is_empty() {
            groups.insert(Vec::new(), Vec::new());
        }
        for (ports, mut endpoints) in groups {
            endpoints.sort_by(|a, b| {
                let name = |e: &Endpoint| e.target_ref.as_ref().and_then(|r| r.name.clone());
                a.0.cmp(&b.0).then_with(|| name(&a.1).cmp(&name(&b.1)))
            });
            let mut name = format!("{}-{}", key.name, port_hash(family, &ports));
            let mut n = 2;
            while !used_names.insert(name.clone()) {
                name = format!("{}-{}-{n}", key.name, port_hash(family, &ports));
                n += 1;
            }
            slices.push(EndpointSlice {
                metadata: slice_metadata(key, service, name),
                address_type: family.to_string(),
                endpoints: endpoints.into_iter().map(|(_, e)| e).collect(),
                ports: Some(
                    ports
                        .into_iter()
                        .map(|p| EndpointPort {
                            name: Some(p.name),
                            port: Some(p.port),
                            protocol: Some(p.protocol),
                            app_protocol: p.app_protocol,
                        })
                        .collect(),
                ),
            });
        }
    }
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    slices
}

fn pod_selected(pod: &Pod, selector: &BTreeMap<String, String>) -> bool {
    let labels = pod.metadata.labels.as_ref();
    let selected = selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    selected && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The address families (slice address types) of a Service, as the controller's
/// `getAddressTypesForService`: `spec.ipFamilies`; else (an object from an API server that did
/// not default them) the family of its cluster IP; else, for a headless Service, both families
/// (the controller cannot tell which the pods use); else IPv4.
fn address_types(service: &Service) -> Vec<&'static str> {
    let Some(spec) = &service.spec else {
        return vec!["IPv4"];
    };
    let mut families: Vec<&'static str> = Vec::new();
    for family in spec.ip_families.iter().flatten() {
        let f = match family.as_str() {
            "IPv4" => "IPv4",
            "IPv6" => "IPv6",
            _ => continue,
        };
        if !families.contains(&f) {
            families.push(f);
        }
    }
    if families.is_empty()
        && let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|s| s.parse::<IpAddr>().ok())
    {
        families.push(if ip.is_ipv4() { "IPv4" } else { "IPv6" });
    }
    if families.is_empty() && spec.cluster_ip.as_deref() == Some("None") {
        families.extend(["IPv4", "IPv6"]);
    }
    if families.is_empty() {
        families.push("IPv4");
    }
    families
}

/// The pod's address of `family` (from `status.podIPs`, else `status.podIP`).
fn pod_address(pod: &Pod, family: &str) -> Option<IpAddr> {
    let status = pod.status.as_ref()?;
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    listed
        .chain(status.pod_ip.as_deref())
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv4() == (family == "IPv4"))
}

/// Resolves one Service port against one pod; `None` when a named targetPort does not resolve.
fn resolve_port(sp: &ServicePort, pod: &Pod) -> Option<PortKey> {
    let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".to_string());
    let port = match &sp.target_port {
        None => sp.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => find_named_port(pod, name, &protocol)?,
    };
    Some(PortKey {
        name: sp.name.clone().unwrap_or_default(),
        port,
        protocol,
        app_protocol: sp.app_protocol.clone(),
    })
}

/// Every container port of a pod: regular containers first, then restartable init containers
/// (sidecars), the order the endpoint-slice controller's `FindPort` searches in.
pub fn container_ports(pod: &Pod) -> impl Iterator<Item = &ContainerPort> {
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.containers.iter());
    let sidecars = spec
        .into_iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    containers
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
}

/// The container port named `name` with `protocol`, like the controller's `FindPort`.
fn find_named_port(pod: &Pod, name: &str, protocol: &str) -> Option<i32> {
    container_ports(pod)
        .find(|p| {
            p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == protocol
        })
        .map(|p| p.container_port)
}

/// Topology hints as the endpoint-slice controller sets them for `trafficDistribution`:
/// `PreferSameZone` (and its older name `PreferClose`) hints each endpoint for its own zone;
/// `PreferSameNode` also for its own node. Endpoints without a zone get none, which (as in
/// kube-proxy) turns topology off for the whole Service.
fn hints_for(distribution: Option<&str>, endpoint: &Endpoint) -> Option<EndpointHints> {
    let same_node = match distribution? {
        "PreferClose" | "PreferSameZone" => false,
        "PreferSameNode" => true,
        _ => return None,
    };
    let zone = endpoint.zone.clone()?;
    let for_nodes = same_node
        .then(|| endpoint.node_name.clone())
        .flatten()
        .map(|name| vec![ForNode { name }]);
    Some(EndpointHints {
        for_zones: Some(vec![ForZone { name: zone }]),
        for_nodes,
    })
}

fn endpoint_for(
    pod_key: &ObjectKey,
    pod: &Pod,
    addr: IpAddr,
    service: &ObjectKey,
    publish_not_ready: bool,
    nodes: &BTreeMap<String, Node>,
) -> Endpoint {
    let serving = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let ready = publish_not_ready || (serving && !terminating);
    let spec = pod.spec.as_ref();
    let node_name = spec
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty());
    let zone = node_name
        .as_ref()
        .and_then(|n| nodes.get(n))
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(LABEL_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    let hostname = spec
        .filter(|s| s.subdomain.as_deref() == Some(service.name.as_str()))
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty());
    Endpoint {
        addresses: vec![addr.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        hostname,
        node_name,
        zone,
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_string()),
            namespace: Some(pod_key.namespace.clone()),
            name: Some(pod_key.name.clone()),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice_metadata(key: &ObjectKey, service: &Service, name: String) -> ObjectMeta {
    // The controller copies the Service's labels, then sets its own.
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.remove(LABEL_HEADLESS);
    labels.insert(LABEL_SERVICE_NAME.to_string(), key.name.clone());
    labels.insert(
        LABEL_MANAGED_BY.to_string(),
        MANAGED_BY_CONTROLLER.to_string(),
    );
    let headless = service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    if headless {
        labels.insert(LABEL_HEADLESS.to_string(), String::new());
    }
    ObjectMeta {
        name: Some(name),
        namespace: Some(key.namespace.clone()),
        labels: Some(labels),
        ..Default::default()
    }
}

/// A short hash of a slice's family and port list, stable across builds and platforms
/// (FNV-1a 64, first 10 hex digits).
fn port_hash(family: &str, ports: &[PortKey]) -> String {
    let mut text = family.to_string();
    for p in ports {
        text.push_str(&format!(
            "|{}:{}:{}:{}",
            p.name,
            p.port,
            p.protocol,
            p.app_protocol.as_deref().unwrap_or("")
        ));
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")[..10].to_string()
}

#[cfg(test)]
mod tests;
