use super::*;
use serde_json::{Value, json};

/// The node whose table the tests compile.
const NODE: &str = "node-a";

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
        scope: Scope::Socket,
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
    let t = compile(&s, NODE).table;
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
    let t = compile(&s, NODE).table;
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
    let t = compile(&s, NODE).table;
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
    let t = compile(&s, NODE).table;
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
    let t = compile(&s, NODE).table;
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
    let t = compile(&s, NODE).table;
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
    let t = compile(&s, NODE).table;
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
    let t = compile(&s, NODE).table;
    assert!(backends(&t, fe("10.96.0.10", 80, Protocol::Tcp)).is_empty());
}

#[test]
fn headless_and_external_name_services_are_not_proxied() {
    let headless = service("db", "None", json!([{"port": 5432}]));
    let external = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "ext", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "example.org", "ports": [{"port": 80}]}});
    let s = snapshot(vec![headless, external], vec![]);
    assert!(compile(&s, NODE).table.frontends.is_empty());
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
    let out = compile(&s, NODE);
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
    let t = compile(&s, NODE).table;
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
    let t = compile(&snapshot(vec![sticky, custom, none], vec![]), NODE).table;
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
    let first = compile(&s, NODE).table;
    assert_eq!(first, compile(&s, NODE).table);
    assert_eq!(
        backends(&first, fe("10.96.0.10", 80, Protocol::Tcp)),
        ["10.244.0.2:80", "10.244.0.9:80"]
    );
}
