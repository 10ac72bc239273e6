//! Compile: the cluster model in, the desired service table out.
//!
//! Pure and deterministic; this is where kube-proxy's Service semantics live.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use cluster_model::k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use cluster_model::k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use cluster_model::{ClusterSnapshot, ObjectKey};

/// Transport protocols the socket hooks translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Parses a Kubernetes `protocol` field (absent means TCP). SCTP and
    /// anything else is not translated by the socket hooks: `None`.
    pub fn from_k8s(protocol: Option<&str>) -> Option<Self> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::IPPROTO_TCP,
            Self::Udp => proxy_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// A service address clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// An endpoint address traffic is translated to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// What one frontend should do: which Service port it belongs to and the
/// backends to choose from (sorted, no duplicates; empty means refuse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendTarget {
    pub service: ObjectKey,
    pub port_name: String,
    pub backends: Vec<BackendAddr>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 when off.
    pub affinity_timeout_s: u32,
}

/// The API's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;
/// The API's maximum for it.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86400;

/// The desired state of the service maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    pub frontends: BTreeMap<Frontend, FrontendTarget>,
}

/// Something in the model that compile had to leave out, with the object and
/// field it came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CompileWarning {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for CompileWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub table: ServiceTable,
    pub warnings: Vec<CompileWarning>,
}

/// Builds the service table for every proxied Service in the snapshot.
pub fn compile(snapshot: &ClusterSnapshot) -> Compiled {
    let mut out = Compiled::default();
    // One pass over the slices; looking them up per Service is quadratic.
    let slices = snapshot.slices_by_service();
    for (key, service) in &snapshot.services {
        let own = slices.get(key).map(Vec::as_slice).unwrap_or_default();
        compile_service(key, service, own, &mut out);
    }
    out.warnings.sort();
    out
}

fn compile_service(
    key: &ObjectKey,
    service: &Service,
    slices: &[&EndpointSlice],
    out: &mut Compiled,
) {
    let Some(spec) = &service.spec else {
        return;
    };
    let object = format!("Service {key}");
    // ExternalName Services are DNS aliases; nothing to proxy.
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let cluster_ips = cluster_ipv4s(spec.cluster_ip.as_deref(), spec.cluster_ips.as_deref());
    let affinity_timeout_s = affinity_timeout(spec);
    if cluster_ips.is_empty() {
        // Headless (`None`), not yet allocated, or IPv6-only.
        return;
    }
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{index}]");
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
            out.warnings.push(CompileWarning {
                object: object.clone(),
                field: format!("{field}.protocol"),
                message: format!(
                    "{} is not translated at the socket layer; port left unproxied",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            });
            continue;
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            continue; // The source rejects such objects; stay safe regardless.
        };
        if service_port == 0 {
            continue;
        }
        let backends = backends_for_port(slices, port, protocol);
        for ip in &cluster_ips {
            out.table.frontends.insert(
                Frontend {
                    ip: *ip,
                    port: service_port,
                    protocol,
                },
                FrontendTarget {
                    service: key.clone(),
                    port_name: port.name.clone().unwrap_or_default(),
                    backends: backends.clone(),
                    affinity_timeout_s,
                },
            );
        }
    }
}

/// The session affinity timeout of a Service, 0 when it has none.
fn affinity_timeout(spec: &ServiceSpec) -> u32 {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return 0;
    }
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match configured {
        None => DEFAULT_AFFINITY_TIMEOUT_S,
        // The source rejects values outside 1..=86400; stay safe regardless.
        Some(t) => u32::try_from(t)
            .unwrap_or(0)
            .clamp(1, MAX_AFFINITY_TIMEOUT_S),
    }
}

/// The IPv4 cluster IPs of a Service (`clusterIPs` wins over `clusterIP`).
fn cluster_ipv4s(cluster_ip: Option<&str>, cluster_ips: Option<&[String]>) -> Vec<Ipv4Addr> {
    let listed: Vec<&str> = match cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => cluster_ip.into_iter().collect(),
    };
    listed
        .into_iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// The backends of one Service port, chosen as kube-proxy does: ready
/// endpoints; when there are none, serving-and-terminating ones; else none.
fn backends_for_port(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    protocol: Protocol,
) -> Vec<BackendAddr> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        // The slice port carrying this Service port: same name, same protocol.
        let Some(target_port) = slice.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or_default() == port_name;
            let same_protocol = Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol);
            (same_name && same_protocol)
                .then_some(p.port)
                .flatten()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
        }) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let state = EndpointState::of(endpoint);
            let set = if state.ready {
                &mut ready
            } else if state.serving && state.terminating {
                &mut terminating
            } else {
                continue;
            };
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<Ipv4Addr>() {
                    set.insert(BackendAddr {
                        ip,
                        port: target_port,
                    });
                }
            }
        }
    }
    let chosen = if ready.is_empty() { terminating } else { ready };
    chosen.into_iter().collect()
}

/// EndpointConditions with the API's defaults applied: `ready` absent means
/// ready, `serving` absent means the same as `ready`, `terminating` absent
/// means false.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointState {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl EndpointState {
    pub fn of(endpoint: &Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        Self {
            ready,
            serving,
            terminating,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn snapshot(services: Vec<Value>, slices: Vec<Value>) -> ClusterSnapshot {
        let mut s = ClusterSnapshot::default();
        for v in services {
            let svc: Service = serde_json::from_value(v).expect("test Service");
            let name = svc.metadata.name.clone().unwrap_or_default();
            s.services.insert(key(&name), svc);
        }
        for v in slices {
            let slice: EndpointSlice = serde_json::from_value(v).expect("test EndpointSlice");
            let name = slice.metadata.name.clone().unwrap_or_default();
            s.endpoint_slices.insert(key(&name), slice);
        }
        s
    }

    fn service(name: &str, cluster_ip: &str, ports: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"clusterIP": cluster_ip, "ports": ports}})
    }

    fn slice(name: &str, service: &str, ports: Value, endpoints: Value) -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": "default",
                            "labels": {"kubernetes.io/service-name": service}},
               "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
    }

    fn ep(ip: &str, conditions: Value) -> Value {
        json!({"addresses": [ip], "conditions": conditions})
    }

    fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            ip: ip.parse().unwrap(),
            port,
            protocol,
        }
    }

    fn backends(table: &ServiceTable, frontend: Frontend) -> Vec<String> {
        table
            .frontends
            .get(&frontend)
            .unwrap_or_else(|| panic!("no frontend {frontend} in {table:?}"))
            .backends
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn endpoints_from_several_slices_are_merged() {
        let s = snapshot(
            vec![service(
                "web",
                "10.96.0.10",
                json!([{"port": 80, "targetPort": 8080}]),
            )],
            vec![
                slice(
                    "web-a",
                    "web",
                    json!([{"port": 8080}]),
                    json!([ep("10.244.0.2", json!({}))]),
                ),
                slice(
                    "web-b",
                    "web",
                    json!([{"port": 8080}]),
                    json!([ep("10.244.0.3", json!({}))]),
                ),
            ],
        );
        let t = compile(&s).table;
        assert_eq!(
            backends(&t, fe("10.96.0.10", 80, Protocol::Tcp)),
            ["10.244.0.2:8080", "10.244.0.3:8080"]
        );
    }

    #[test]
    fn a_named_port_resolving_to_different_numbers_per_pod() {
        // The endpoint-slice controller puts pods whose named port resolves
        // to different numbers in different slices.
        let s = snapshot(
            vec![service(
                "web",
                "10.96.0.10",
                json!([{"name": "http", "port": 80, "targetPort": "web"}]),
            )],
            vec![
                slice(
                    "web-1",
                    "web",
                    json!([{"name": "http", "port": 8080}]),
                    json!([ep("10.244.0.2", json!({}))]),
                ),
                slice(
                    "web-2",
                    "web",
                    json!([{"name": "http", "port": 9090}]),
                    json!([ep("10.244.0.3", json!({}))]),
                ),
            ],
        );
        let t = compile(&s).table;
        assert_eq!(
            backends(&t, fe("10.96.0.10", 80, Protocol::Tcp)),
            ["10.244.0.2:8080", "10.244.0.3:9090"]
        );
    }

    #[test]
    fn only_ready_endpoints_serve_while_any_is_ready() {
        let s = snapshot(
            vec![service("web", "10.96.0.10", json!([{"port": 80}]))],
            vec![slice(
                "web-a",
                "web",
                json!([{"port": 80}]),
                json!([
                    ep("10.244.0.2", json!({"ready": true})),
                    ep("10.244.0.3", json!({"ready": false})),
                    ep(
                        "10.244.0.4",
                        json!({"ready": false, "serving": true, "terminating": true})
                    ),
                    ep("10.244.0.5", json!(null)),
                ]),
            )],
        );
        let t = compile(&s).table;
        // Absent conditions mean ready.
        assert_eq!(
            backends(&t, fe("10.96.0.10", 80, Protocol::Tcp)),
            ["10.244.0.2:80", "10.244.0.5:80"]
        );
    }

    #[test]
    fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
        let s = snapshot(
            vec![service("web", "10.96.0.10", json!([{"port": 80}]))],
            vec![slice(
                "web-a",
                "web",
                json!([{"port": 80}]),
                json!([
                    ep("10.244.0.3", json!({"ready": false})),
                    ep(
                        "10.244.0.4",
                        json!({"ready": false, "serving": true, "terminating": true})
                    ),
                    ep(
                        "10.244.0.5",
                        json!({"ready": false, "serving": false, "terminating": true})
                    ),
                ]),
            )],
        );
        let t = compile(&s).table;
        assert_eq!(
            backends(&t, fe("10.96.0.10", 80, Protocol::Tcp)),
            ["10.244.0.4:80"]
        );
    }

    #[test]
    fn no_usable_endpoint_leaves_an_empty_frontend_that_refuses() {
        let s = snapshot(
            vec![service("web", "10.96.0.10", json!([{"port": 80}]))],
            vec![slice(
                "web-a",
                "web",
                json!([{"port": 80}]),
                json!([ep("10.244.0.3", json!({"ready": false}))]),
            )],
        );
        let t = compile(&s).table;
        assert!(backends(&t, fe("10.96.0.10", 80, Protocol::Tcp)).is_empty());
    }

    #[test]
    fn ports_are_matched_by_name_and_protocol() {
        // Same number, two protocols (like DNS); the slice names both ports.
        let s = snapshot(
            vec![service(
                "dns",
                "10.96.0.53",
                json!([
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5354},
                ]),
            )],
            vec![slice(
                "dns-a",
                "dns",
                json!([
                    {"name": "dns", "port": 5353, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
                ]),
                json!([ep("10.244.0.9", json!({}))]),
            )],
        );
        let t = compile(&s).table;
        assert_eq!(
            backends(&t, fe("10.96.0.53", 53, Protocol::Udp)),
            ["10.244.0.9:5353"]
        );
        assert_eq!(
            backends(&t, fe("10.96.0.53", 53, Protocol::Tcp)),
            ["10.244.0.9:5354"]
        );
        assert_eq!(t.frontends.len(), 2);
    }

    #[test]
    fn a_service_without_selector_uses_hand_written_slices() {
        let mut svc = service(
            "external-db",
            "10.96.0.20",
            json!([{"name": "pg", "port": 5432}]),
        );
        svc["spec"]["selector"] = Value::Null;
        let s = snapshot(
            vec![svc],
            vec![slice(
                "external-db-1",
                "external-db",
                json!([{"name": "pg", "port": 5432}]),
                json!([ep("10.244.1.7", json!({"ready": true}))]),
            )],
        );
        let t = compile(&s).table;
        assert_eq!(
            backends(&t, fe("10.96.0.20", 5432, Protocol::Tcp)),
            ["10.244.1.7:5432"]
        );
        assert_eq!(
            t.frontends[&fe("10.96.0.20", 5432, Protocol::Tcp)].port_name,
            "pg"
        );
    }

    #[test]
    fn slices_of_other_services_and_families_are_ignored() {
        let mut v6 = slice(
            "web-v6",
            "web",
            json!([{"port": 80}]),
            json!([ep("fd00::2", json!({}))]),
        );
        v6["addressType"] = json!("IPv6");
        let s = snapshot(
            vec![service("web", "10.96.0.10", json!([{"port": 80}]))],
            vec![
                v6,
                slice(
                    "other-a",
                    "other",
                    json!([{"port": 80}]),
                    json!([ep("10.244.0.8", json!({}))]),
                ),
            ],
        );
        let t = compile(&s).table;
        assert!(backends(&t, fe("10.96.0.10", 80, Protocol::Tcp)).is_empty());
    }

    #[test]
    fn headless_and_external_name_services_are_not_proxied() {
        let headless = service("db", "None", json!([{"port": 5432}]));
        let external = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.org", "ports": [{"port": 80}]}});
        let s = snapshot(vec![headless, external], vec![]);
        assert!(compile(&s).table.frontends.is_empty());
    }

    #[test]
    fn sctp_ports_are_reported_and_left_out() {
        let s = snapshot(
            vec![service(
                "mixed",
                "10.96.0.30",
                json!([{"name": "a", "port": 80}, {"name": "b", "port": 9000, "protocol": "SCTP"}]),
            )],
            vec![],
        );
        let out = compile(&s);
        assert_eq!(out.table.frontends.len(), 1);
        assert_eq!(out.warnings.len(), 1);
        assert_eq!(out.warnings[0].field, "spec.ports[1].protocol");
        assert_eq!(out.warnings[0].object, "Service default/mixed");
    }

    #[test]
    fn every_ipv4_cluster_ip_gets_a_frontend() {
        let mut svc = service("dual", "10.96.0.40", json!([{"port": 80}]));
        svc["spec"]["clusterIPs"] = json!(["10.96.0.40", "fd00:96::40"]);
        let s = snapshot(vec![svc], vec![]);
        let t = compile(&s).table;
        assert_eq!(
            t.frontends.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.0.40", 80, Protocol::Tcp)]
        );
    }

    #[test]
    fn client_ip_affinity_carries_its_timeout_with_the_api_default() {
        let mut sticky = service("sticky", "10.96.0.50", json!([{"port": 80}]));
        sticky["spec"]["sessionAffinity"] = json!("ClientIP");
        let mut custom = service("custom", "10.96.0.51", json!([{"port": 80}]));
        custom["spec"]["sessionAffinity"] = json!("ClientIP");
        custom["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 30}});
        let mut none = service("plain", "10.96.0.52", json!([{"port": 80}]));
        none["spec"]["sessionAffinity"] = json!("None");
        let t = compile(&snapshot(vec![sticky, custom, none], vec![])).table;
        let timeout = |ip| t.frontends[&fe(ip, 80, Protocol::Tcp)].affinity_timeout_s;
        assert_eq!(timeout("10.96.0.50"), 10800);
        assert_eq!(timeout("10.96.0.51"), 30);
        assert_eq!(timeout("10.96.0.52"), 0);
    }

    #[test]
    fn compile_is_deterministic() {
        let s = snapshot(
            vec![service("web", "10.96.0.10", json!([{"port": 80}]))],
            vec![slice(
                "web-a",
                "web",
                json!([{"port": 80}]),
                json!([
                    ep("10.244.0.9", json!({})),
                    ep("10.244.0.2", json!({})),
                    ep("10.244.0.2", json!({}))
                ]),
            )],
        );
        let first = compile(&s).table;
        assert_eq!(first, compile(&s).table);
        assert_eq!(
            backends(&first, fe("10.96.0.10", 80, Protocol::Tcp)),
            ["10.244.0.2:80", "10.244.0.9:80"]
        );
    }
}
