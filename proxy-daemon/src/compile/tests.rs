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
fn every_cluster_ip_of_both_families_gets_a_frontend() {
    let mut svc = service("dual", "10.96.0.40", json!([{"port": 80}]));
    svc["spec"]["clusterIPs"] = json!(["10.96.0.40", "fd00:96::40"]);
    let s = snapshot(vec![svc], vec![]);
    let t = compile(&s, NODE).table;
    assert_eq!(
        t.frontends.keys().copied().collect::<Vec<_>>(),
        [
            fe("10.96.0.40", 80, Protocol::Tcp),
            fe("fd00:96::40", 80, Protocol::Tcp)
        ]
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

fn with_node(mut s: ClusterSnapshot, name: &str, ip: &str, zone: Option<&str>) -> ClusterSnapshot {
    let labels = zone.map(|z| json!({"topology.kubernetes.io/zone": z}));
    let node: cluster_model::k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    }))
    .expect("test Node");
    s.nodes.insert(name.into(), node);
    s
}

fn ep_on(ip: &str, node: &str, conditions: Value) -> Value {
    json!({"addresses": [ip], "conditions": conditions, "nodeName": node})
}

fn ext(ip: &str, port: u16) -> Frontend {
    Frontend {
        scope: Scope::External,
        ..fe(ip, port, Protocol::Tcp)
    }
}

/// A NodePort Service `name` with backends 10.244.0.2 (on NODE) and 10.244.1.2 (on node-b).
fn node_port_snapshot(spec_extra: Value) -> ClusterSnapshot {
    let mut svc = service("np", "10.96.0.60", json!([{"port": 80, "nodePort": 30080}]));
    svc["spec"]["type"] = json!("NodePort");
    for (k, v) in spec_extra.as_object().unwrap() {
        svc["spec"][k] = v.clone();
    }
    let s = snapshot(
        vec![svc],
        vec![slice(
            "np-a",
            "np",
            json!([{"port": 8080}]),
            json!([
                ep_on("10.244.0.2", NODE, json!({})),
                ep_on("10.244.1.2", "node-b", json!({}))
            ]),
        )],
    );
    with_node(s, NODE, "172.18.0.2", None)
}

#[test]
fn a_node_port_serves_on_the_node_addresses_inside_and_out() {
    let t = compile(&node_port_snapshot(json!({})), NODE).table;
    let all = ["10.244.0.2:8080", "10.244.1.2:8080"];
    assert_eq!(backends(&t, fe("172.18.0.2", 30080, Protocol::Tcp)), all);
    assert_eq!(backends(&t, ext("172.18.0.2", 30080)), all);
    // The local backend is marked so outside traffic to it keeps the client's address.
    let locals: Vec<bool> = t.frontends[&ext("172.18.0.2", 30080)]
        .backends
        .iter()
        .map(|b| b.local)
        .collect();
    assert_eq!(locals, [true, false]);
    // The cluster IP has no external entry.
    assert!(!t.frontends.contains_key(&ext("10.96.0.60", 80)));
}

#[test]
fn a_node_port_on_a_cluster_ip_service_or_without_a_node_address_is_not_served() {
    let mut s = node_port_snapshot(json!({"type": "ClusterIP"}));
    let t = compile(&s, NODE).table;
    assert!(!t.frontends.keys().any(|f| f.port == 30080), "{t:?}");
    s.nodes.clear();
    let mut svc = s.services.values().next().unwrap().clone();
    svc.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    s.services.insert(key("np"), svc);
    let out = compile(&s, NODE);
    assert!(!out.table.frontends.keys().any(|f| f.port == 30080));
    assert!(
        out.warnings
            .iter()
            .any(|w| w.message.contains("no InternalIP or ExternalIP")),
        "{:?}",
        out.warnings
    );
}

#[test]
fn external_traffic_policy_local_narrows_only_outside_traffic() {
    let t = compile(
        &node_port_snapshot(json!({"externalTrafficPolicy": "Local"})),
        NODE,
    )
    .table;
    assert_eq!(backends(&t, ext("172.18.0.2", 30080)), ["10.244.0.2:8080"]);
    assert_eq!(
        backends(&t, fe("172.18.0.2", 30080, Protocol::Tcp)),
        ["10.244.0.2:8080", "10.244.1.2:8080"]
    );
    // On a node with no endpoint of it, outside traffic has no backend (dropped).
    let s = with_node(
        node_port_snapshot(json!({"externalTrafficPolicy": "Local"})),
        "node-c",
        "172.18.0.4",
        None,
    );
    let t = compile(&s, "node-c").table;
    assert!(backends(&t, ext("172.18.0.4", 30080)).is_empty());
}

#[test]
fn internal_traffic_policy_local_narrows_the_cluster_ip() {
    let t = compile(
        &node_port_snapshot(json!({"internalTrafficPolicy": "Local"})),
        NODE,
    )
    .table;
    assert_eq!(
        backends(&t, fe("10.96.0.60", 80, Protocol::Tcp)),
        ["10.244.0.2:8080"]
    );
    let t = compile(
        &node_port_snapshot(json!({"internalTrafficPolicy": "Local"})),
        "node-c",
    )
    .table;
    assert!(backends(&t, fe("10.96.0.60", 80, Protocol::Tcp)).is_empty());
}

#[test]
fn local_endpoints_fall_back_to_terminating_ones_of_the_node() {
    let mut s = node_port_snapshot(json!({"externalTrafficPolicy": "Local"}));
    let slice = s.endpoint_slices.values_mut().next().unwrap();
    slice.endpoints[0].conditions = Some(
        serde_json::from_value(json!({"ready": false, "serving": true, "terminating": true}))
            .unwrap(),
    );
    let t = compile(&s, NODE).table;
    // Outside: the node's only endpoint is terminating but serving: used.
    assert_eq!(backends(&t, ext("172.18.0.2", 30080)), ["10.244.0.2:8080"]);
    // Inside: a ready one exists elsewhere, so the terminating one is not used.
    assert_eq!(
        backends(&t, fe("172.18.0.2", 30080, Protocol::Tcp)),
        ["10.244.1.2:8080"]
    );
}

#[test]
fn load_balancer_ips_external_ips_and_source_ranges() {
    let mut svc = service("lb", "10.96.0.70", json!([{"port": 80, "nodePort": 30070}]));
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["externalIPs"] = json!(["198.18.0.21", "2001:db8::1", "bogus"]);
    svc["spec"]["loadBalancerSourceRanges"] = json!(["172.18.255.254/32", "10.0.0.1/8", "nope"]);
    svc["status"] = json!({"loadBalancer": {"ingress": [
        {"ip": "198.18.0.20"}, {"ip": "198.18.0.22", "ipMode": "Proxy"}, {"hostname": "lb.example"},
        {"ip": "2001:db8::20"}
    ]}});
    let s = with_node(snapshot(vec![svc], vec![]), NODE, "172.18.0.2", None);
    let out = compile(&s, NODE);
    let t = &out.table;
    let ranges = |f: Frontend| {
        t.frontends[&f]
            .source_ranges
            .as_ref()
            .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>())
    };
    assert_eq!(
        ranges(ext("198.18.0.20", 80)).unwrap(),
        ["10.0.0.0/8", "172.18.255.254/32"]
    );
    // Source ranges are for the load balancer's addresses only.
    assert_eq!(ranges(ext("198.18.0.21", 80)), None);
    assert_eq!(ranges(ext("2001:db8::1", 80)), None);
    assert_eq!(ranges(ext("172.18.0.2", 30070)), None);
    assert_eq!(ranges(fe("198.18.0.20", 80, Protocol::Tcp)), None);
    // The IPv6 load balancer address: no IPv6 range was given, so no outside client passes
    // (ranges narrow, never widen), and the user is told.
    assert_eq!(ranges(ext("2001:db8::20", 80)), Some(vec![]));
    // ipMode Proxy: the load balancer delivers to node addresses itself.
    assert!(
        !t.frontends
            .keys()
            .any(|f| f.ip == "198.18.0.22".parse::<Ipv4Addr>().unwrap())
    );
    let fields: Vec<&str> = out.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.externalIPs[2]",
            "spec.loadBalancerSourceRanges",
            "spec.loadBalancerSourceRanges[2]"
        ]
    );
    assert!(out.warnings[1].message.contains("2001:db8::20"));
}

#[test]
fn ipv6_source_ranges_apply_to_ipv6_load_balancer_addresses() {
    let mut svc = service("lb6", "10.96.0.73", json!([{"port": 80}]));
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["loadBalancerSourceRanges"] = json!(["2001:db8:1::5/48", "10.0.0.0/8"]);
    svc["status"] =
        json!({"loadBalancer": {"ingress": [{"ip": "198.18.0.30"}, {"ip": "2001:db8::30"}]}});
    let out = compile(&snapshot(vec![svc], vec![]), NODE);
    let ranges = |f: Frontend| out.table.frontends[&f].source_ranges.clone().unwrap();
    assert_eq!(
        ranges(ext("2001:db8::30", 80)),
        ["2001:db8:1::/48".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        ranges(ext("198.18.0.30", 80)),
        ["10.0.0.0/8".parse::<IpNet>().unwrap()]
    );
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
}

#[test]
fn an_address_two_services_claim_goes_to_the_first_and_the_second_is_told() {
    let mut a = service("a", "10.96.0.71", json!([{"port": 80}]));
    a["spec"]["externalIPs"] = json!(["198.18.0.9"]);
    let mut b = service("b", "10.96.0.72", json!([{"port": 80}]));
    b["spec"]["externalIPs"] = json!(["198.18.0.9"]);
    let out = compile(&snapshot(vec![a, b], vec![]), NODE);
    assert_eq!(
        out.table.frontends[&ext("198.18.0.9", 80)].service,
        key("a")
    );
    assert!(
        out.warnings
            .iter()
            .any(|w| w.object == "Service default/b" && w.field == "spec.externalIPs"),
        "{:?}",
        out.warnings
    );
}

#[test]
fn health_check_node_ports_count_ready_local_endpoints() {
    let s = node_port_snapshot(json!({
        "type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30900
    }));
    let t = compile(&s, NODE).table;
    assert_eq!(t.health_checks[&30900].local_endpoints, 1);
    assert_eq!(t.health_checks[&30900].service, key("np"));
    assert_eq!(
        compile(&s, "node-c").table.health_checks[&30900].local_endpoints,
        0
    );
    // Cluster policy: no health check.
    let s = node_port_snapshot(json!({"type": "LoadBalancer", "healthCheckNodePort": 30900}));
    assert!(compile(&s, NODE).table.health_checks.is_empty());
}

/// Backends 10.244.0.2 in zone-a on NODE, 10.244.1.2 in zone-b on node-b, with hints.
fn zoned_snapshot(node_zone: Option<&str>, hints: [Option<Value>; 2]) -> ClusterSnapshot {
    let mut a = ep_on("10.244.0.2", NODE, json!({}));
    let mut b = ep_on("10.244.1.2", "node-b", json!({}));
    for (e, h) in [(&mut a, &hints[0]), (&mut b, &hints[1])] {
        if let Some(h) = h {
            e["hints"] = h.clone();
        }
    }
    let s = snapshot(
        vec![service("z", "10.96.0.75", json!([{"port": 80}]))],
        vec![slice("z-a", "z", json!([{"port": 8080}]), json!([a, b]))],
    );
    with_node(s, NODE, "172.18.0.2", node_zone)
}

#[test]
fn topology_hints_prefer_the_node_then_the_zone_and_fall_back_to_all() {
    let zone = |z: &str| Some(json!({"forZones": [{"name": z}]}));
    let cip = fe("10.96.0.75", 80, Protocol::Tcp);
    let both = ["10.244.0.2:8080", "10.244.1.2:8080"];
    // Hints for our zone: only that endpoint.
    let t = compile(
        &zoned_snapshot(Some("zone-a"), [zone("zone-a"), zone("zone-b")]),
        NODE,
    )
    .table;
    assert_eq!(backends(&t, cip), ["10.244.0.2:8080"]);
    // No endpoint hinted for our zone: all.
    let t = compile(
        &zoned_snapshot(Some("zone-c"), [zone("zone-a"), zone("zone-b")]),
        NODE,
    )
    .table;
    assert_eq!(backends(&t, cip), both);
    // One endpoint without hints turns topology off.
    let t = compile(
        &zoned_snapshot(Some("zone-a"), [zone("zone-a"), None]),
        NODE,
    )
    .table;
    assert_eq!(backends(&t, cip), both);
    // A node without a zone label ignores hints.
    let t = compile(
        &zoned_snapshot(None, [zone("zone-a"), zone("zone-b")]),
        NODE,
    )
    .table;
    assert_eq!(backends(&t, cip), both);
    // Node hints (PreferSameNode) win over zone hints.
    let node_hint = Some(json!({"forZones": [{"name": "zone-b"}], "forNodes": [{"name": NODE}]}));
    let t = compile(
        &zoned_snapshot(Some("zone-b"), [node_hint, zone("zone-b")]),
        NODE,
    )
    .table;
    assert_eq!(backends(&t, cip), ["10.244.0.2:8080"]);
}

#[test]
fn dual_stack_frontends_lead_to_endpoints_of_their_own_family() {
    let mut svc = service(
        "dual",
        "10.96.0.41",
        json!([{"port": 80, "nodePort": 30041}]),
    );
    svc["spec"]["clusterIPs"] = json!(["10.96.0.41", "fd00:10:96::41"]);
    svc["spec"]["type"] = json!("NodePort");
    let mut v6 = slice(
        "dual-6",
        "dual",
        json!([{"port": 8080}]),
        json!([ep_on("fd00:10:244::2", NODE, json!({}))]),
    );
    v6["addressType"] = json!("IPv6");
    let v4 = slice(
        "dual-4",
        "dual",
        json!([{"port": 8080}]),
        json!([ep_on("10.244.0.2", NODE, json!({}))]),
    );
    let s = snapshot(vec![svc], vec![v4, v6]);
    let mut node = with_node(s, NODE, "172.18.0.2", None);
    node.nodes
        .get_mut(NODE)
        .unwrap()
        .status
        .as_mut()
        .unwrap()
        .addresses
        .as_mut()
        .unwrap()
        .push(
            serde_json::from_value(json!({"type": "InternalIP", "address": "fd00:172:18::2"}))
                .unwrap(),
        );
    let t = compile(&node, NODE).table;
    assert_eq!(
        backends(&t, fe("10.96.0.41", 80, Protocol::Tcp)),
        ["10.244.0.2:8080"]
    );
    assert_eq!(
        backends(&t, fe("fd00:10:96::41", 80, Protocol::Tcp)),
        ["[fd00:10:244::2]:8080"]
    );
    assert_eq!(
        backends(&t, fe("fd00:172:18::2", 30041, Protocol::Tcp)),
        ["[fd00:10:244::2]:8080"]
    );
    // From outside, each node address leads to endpoints of its own family.
    assert_eq!(backends(&t, ext("172.18.0.2", 30041)), ["10.244.0.2:8080"]);
    assert_eq!(
        backends(&t, ext("fd00:172:18::2", 30041)),
        ["[fd00:10:244::2]:8080"]
    );
}
