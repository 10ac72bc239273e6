use super::*;
use crate::manifest::{ManifestFormat, parse_manifests};
use crate::object::Object;

/// Parses `yaml` (which must be valid) and derives the slices.
fn derive(yaml: &str) -> Vec<EndpointSlice> {
    let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
    assert_eq!(problems, vec![], "test input must be valid");
    let mut services = BTreeMap::new();
    let mut pods = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    for object in objects {
        let key = object.key();
        match object {
            Object::Service(s) => {
                services.insert(key, s);
            }
            Object::Pod(p) => {
                pods.insert(key, p);
            }
            Object::Node(n) => {
                nodes.insert(key.name, n);
            }
            _ => {}
        }
    }
    derive_endpoint_slices(&services, &pods, &nodes)
}

/// A pod document: name, labels (flow map), IP ("" for none), ready, extra YAML under spec.
fn pod(name: &str, labels: &str, ip: &str, ready: bool, spec_extra: &str) -> String {
    let ip = if ip.is_empty() {
        String::new()
    } else {
        format!("\n  podIP: {ip}")
    };
    let ready = if ready { "True" } else { "False" };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {labels}}}\nspec:\n  \
         containers:\n  - name: c\n    ports: [{{name: web, containerPort: 8080}}, {{name: dns, \
         containerPort: 53, protocol: UDP}}]\n{spec_extra}\nstatus:\n  phase: Running{ip}\n  \
         conditions: [{{type: Ready, status: \"{ready}\"}}]\n"
    )
}

const WEB: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, labels: {tier: front}}\n\
                   spec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

fn names(slice: &EndpointSlice) -> Vec<String> {
    slice
        .endpoints
        .iter()
        .map(|e| {
            e.target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default()
        })
        .collect()
}

fn addresses(slice: &EndpointSlice) -> Vec<String> {
    slice
        .endpoints
        .iter()
        .map(|e| e.addresses.join(","))
        .collect()
}

fn ports(slice: &EndpointSlice) -> Vec<(String, i32, String)> {
    slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or(0),
                p.protocol.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn conditions(ep: &Endpoint) -> (Option<bool>, Option<bool>, Option<bool>) {
    let c = ep.conditions.clone().unwrap_or_default();
    (c.ready, c.serving, c.terminating)
}

#[test]
fn several_pods_one_slice() {
    let yaml = [
        WEB,
        &pod("web-b", "{app: web, v: \"2\"}", "10.0.0.10", true, ""),
        &pod("web-a", "{app: web}", "10.0.0.9", true, ""),
        &pod("other", "{app: other}", "10.0.0.11", true, ""),
        // Same labels, other namespace: not selected.
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: prod, labels: {app: web}}\n\
         spec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.12}\n",
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 1);
    let s = &slices[0];
    assert_eq!(s.address_type, "IPv4");
    // Sorted by address numerically, not as text.
    assert_eq!(addresses(s), ["10.0.0.9", "10.0.0.10"]);
    assert_eq!(names(s), ["web-a", "web-b"]);
    assert_eq!(ports(s), [("http".to_string(), 8080, "TCP".to_string())]);

    let meta = &s.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    let name = meta.name.as_deref().unwrap_or_default();
    assert!(
        name.starts_with("web-") && name.len() == "web-".len() + 10,
        "{name}"
    );
    assert!(
        name["web-".len()..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}"
    );
    let labels = meta.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(LABEL_SERVICE_NAME).map(String::as_str),
        Some("web")
    );
    assert_eq!(
        labels.get(LABEL_MANAGED_BY).map(String::as_str),
        Some(MANAGED_BY_CONTROLLER)
    );
    assert_eq!(
        labels.get("tier").map(String::as_str),
        Some("front"),
        "Service labels copied"
    );

    let ep = &s.endpoints[0];
    assert_eq!(conditions(ep), (Some(true), Some(true), Some(false)));
    let target = ep.target_ref.as_ref().expect("targetRef");
    assert_eq!(target.kind.as_deref(), Some("Pod"));
    assert_eq!(target.namespace.as_deref(), Some("default"));

    // Deterministic: the same input gives the same output.
    assert_eq!(derive(&yaml), slices);
}

#[test]
fn named_target_port_resolving_differently_gives_several_slices() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  \
         ports: [{name: http, port: 80, targetPort: web}]\n",
        &pod("a", "{app: web}", "10.0.0.1", true, ""),
        &pod("b", "{app: web}", "10.0.0.2", true, ""),
        // This one names port 9090 "web".
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: c, labels: {app: web}}\nspec:\n  containers:\n  \
         - name: c\n    ports: [{name: web, containerPort: 9090}]\nstatus: {podIP: 10.0.0.3}\n",
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 2, "{slices:#?}");
    let mut by_port: Vec<(i32, Vec<String>)> =
        slices.iter().map(|s| (ports(s)[0].1, names(s))).collect();
    by_port.sort();
    assert_eq!(
        by_port,
        [
            (8080, vec!["a".to_string(), "b".to_string()]),
            (9090, vec!["c".to_string()])
        ]
    );
    assert_ne!(slices[0].metadata.name, slices[1].metadata.name);
}

#[test]
fn conditions_of_not_ready_and_terminating_pods() {
    let terminating = "  terminationGracePeriodSeconds: 30\n";
    let yaml = [
        WEB,
        &pod("ready", "{app: web}", "10.0.0.1", true, ""),
        &pod("not-ready", "{app: web}", "10.0.0.2", false, ""),
        &pod("terminating", "{app: web}", "10.0.0.3", true, terminating).replace(
            "name: terminating,",
            "name: terminating, deletionTimestamp: \"2026-01-01T00:00:00Z\",",
        ),
        &pod("terminating-not-ready", "{app: web}", "10.0.0.4", false, "").replace(
            "name: terminating-not-ready,",
            "name: terminating-not-ready, deletionTimestamp: \"2026-01-01T00:00:00Z\",",
        ),
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 1);
    let got: Vec<_> = slices[0].endpoints.iter().map(conditions).collect();
    assert_eq!(
        got,
        [
            (Some(true), Some(true), Some(false)),
            (Some(false), Some(false), Some(false)),
            (Some(false), Some(true), Some(true)),
            (Some(false), Some(false), Some(true)),
        ]
    );

    // publishNotReadyAddresses: every endpoint ready; serving still reflects the pod.
    let publish = yaml.replace(
        "selector: {app: web}",
        "selector: {app: web}\n  publishNotReadyAddresses: true",
    );
    let slices = derive(&publish);
    let got: Vec<_> = slices[0].endpoints.iter().map(conditions).collect();
    assert_eq!(
        got,
        [
            (Some(true), Some(true), Some(false)),
            (Some(true), Some(false), Some(false)),
            (Some(true), Some(true), Some(true)),
            (Some(true), Some(false), Some(true)),
        ]
    );
}

#[test]
fn pods_without_ip_or_finished_are_excluded() {
    let yaml = [
        WEB,
        &pod("no-ip", "{app: web}", "", true, ""),
        &pod("done", "{app: web}", "10.0.0.2", false, "")
            .replace("phase: Running", "phase: Succeeded"),
        &pod("failed", "{app: web}", "10.0.0.3", false, "")
            .replace("phase: Running", "phase: Failed"),
        &pod("pending", "{app: web}", "10.0.0.4", false, "")
            .replace("phase: Running", "phase: Pending"),
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 1);
    assert_eq!(names(&slices[0]), ["pending"]);
}

#[test]
fn no_endpoints_gives_one_empty_slice() {
    let slices = derive(WEB);
    assert_eq!(slices.len(), 1);
    assert!(slices[0].endpoints.is_empty());
    assert_eq!(ports(&slices[0]), []);
    assert_eq!(
        slices[0]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .map(String::as_str),
        Some("web")
    );
}

#[test]
fn unresolvable_named_port_is_left_out_for_that_pod() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  \
         - {name: http, port: 80, targetPort: web}\n  - {name: admin, port: 81, targetPort: admin}\n  \
         - {name: dns, port: 53, protocol: UDP, targetPort: dns}\n  - {name: dns-tcp, port: 54, targetPort: dns}\n",
        &pod("a", "{app: web}", "10.0.0.1", true, ""),
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 1);
    // "admin" names no container port; "dns" exists only for UDP, so dns-tcp (TCP) does not resolve.
    assert_eq!(
        ports(&slices[0]),
        [
            ("http".to_string(), 8080, "TCP".to_string()),
            ("dns".to_string(), 53, "UDP".to_string())
        ]
    );
    assert_eq!(names(&slices[0]), ["a"]);

    // A pod where nothing resolves is still an endpoint, in a slice without ports.
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  \
         ports: [{name: admin, port: 81, targetPort: admin}]\n",
        &pod("a", "{app: web}", "10.0.0.1", true, ""),
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 1);
    assert_eq!(ports(&slices[0]), []);
    assert_eq!(names(&slices[0]), ["a"]);
}

#[test]
fn multi_port_service() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  \
         - {name: http, port: 80, targetPort: web, appProtocol: http}\n  - {name: https, port: 443}\n  \
         - {name: dns, port: 53, protocol: UDP, targetPort: 5353}\n",
        &pod("a", "{app: web}", "10.0.0.1", true, ""),
        &pod("b", "{app: web}", "10.0.0.2", true, ""),
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 1);
    assert_eq!(
        ports(&slices[0]),
        [
            ("http".to_string(), 8080, "TCP".to_string()),
            ("https".to_string(), 443, "TCP".to_string()),
            ("dns".to_string(), 5353, "UDP".to_string()),
        ]
    );
    let app: Vec<_> = slices[0]
        .ports
        .iter()
        .flatten()
        .map(|p| p.app_protocol.clone())
        .collect();
    assert_eq!(app, [Some("http".to_string()), None, None]);
    assert_eq!(names(&slices[0]), ["a", "b"]);
}

#[test]
fn node_zone_hostname_and_uid() {
    let yaml = [
        WEB,
        "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}\n",
        &pod("a", "{app: web}", "10.0.0.1", true, "  nodeName: node-a\n  hostname: a0\n  subdomain: web")
            .replace("name: a,", "name: a, uid: 1234-abcd,"),
        &pod("b", "{app: web}", "10.0.0.2", true, "  nodeName: node-b\n  hostname: b0\n  subdomain: other"),
    ]
    .concat();
    let slices = derive(&yaml);
    let eps = &slices[0].endpoints;
    assert_eq!(eps[0].node_name.as_deref(), Some("node-a"));
    assert_eq!(eps[0].zone.as_deref(), Some("z1"));
    assert_eq!(eps[0].hostname.as_deref(), Some("a0"));
    assert_eq!(
        eps[0].target_ref.as_ref().and_then(|r| r.uid.as_deref()),
        Some("1234-abcd")
    );
    assert_eq!(eps[1].node_name.as_deref(), Some("node-b"));
    assert_eq!(eps[1].zone, None, "unknown node: no zone");
    assert_eq!(eps[1].hostname, None, "subdomain is not the Service");
    assert_eq!(
        eps[1].target_ref.as_ref().and_then(|r| r.uid.as_deref()),
        None
    );
}

#[test]
fn address_families() {
    let dual = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: d, labels: {app: web}}\nspec: {containers: [{name: c}]}\n\
                status:\n  podIP: 10.0.0.1\n  podIPs: [{ip: 10.0.0.1}, {ip: \"fd00::1\"}]\n";
    let v4_only = pod("v4", "{app: web}", "10.0.0.2", true, "");

    let yaml = [
        &WEB.replace("selector:", "ipFamilies: [IPv6, IPv4]\n  selector:"),
        dual,
        &v4_only,
    ]
    .concat();
    let slices = derive(&yaml);
    let mut got: Vec<(String, Vec<String>)> = slices
        .iter()
        .map(|s| (s.address_type.clone(), addresses(s)))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "IPv4".to_string(),
                vec!["10.0.0.1".to_string(), "10.0.0.2".to_string()]
            ),
            ("IPv6".to_string(), vec!["fd00::1".to_string()]),
        ]
    );

    // No ipFamilies: the cluster IP's family; no cluster IP: IPv4.
    let yaml = [
        &WEB.replace("selector:", "clusterIP: \"fd00::10\"\n  selector:"),
        dual,
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].address_type, "IPv6");
    assert_eq!(addresses(&slices[0]), ["fd00::1"]);
}

#[test]
fn services_without_slices() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: manual}\nspec: {ports: [{port: 80}]}\n",
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec: {selector: {}, ports: [{port: 80}]}\n",
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com, selector: {app: web}}\n",
        &pod("a", "{app: web}", "10.0.0.1", true, ""),
    ]
    .concat();
    assert_eq!(derive(&yaml), vec![]);
}

#[test]
fn headless_service_label_and_no_ports() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, selector: {app: web}}\n",
        &pod("a", "{app: web}", "10.0.0.1", true, ""),
    ]
    .concat();
    let slices = derive(&yaml);
    // No ipFamilies on a headless Service: the controller makes a slice for either family
    // (here the IPv6 one is the empty placeholder).
    assert_eq!(slices.len(), 2);
    let v4 = slices.iter().find(|s| s.address_type == "IPv4").unwrap();
    let v6 = slices.iter().find(|s| s.address_type == "IPv6").unwrap();
    assert_eq!(names(v4), ["a"]);
    assert_eq!(ports(v4), []);
    assert!(v6.endpoints.is_empty());
    for slice in &slices {
        let labels = slice.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels
                .get("service.kubernetes.io/headless")
                .map(String::as_str),
            Some("")
        );
    }
    // With ipFamilies (as an API server sets them): that family only.
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, ipFamilyPolicy: SingleStack, ipFamilies: [IPv4], selector: {app: web}}\n",
        &pod("a", "{app: web}", "10.0.0.1", true, ""),
    ]
    .concat();
    let slices = derive(&yaml);
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].address_type, "IPv4");
}

/// A dual-stack pod as kubelet reports it: podIP the primary, podIPs both.
fn dual_pod(name: &str, v4: &str, v6: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\n\
         spec: {{containers: [{{name: c, ports: [{{name: web, containerPort: 8080}}]}}]}}\n\
         status:\n  phase: Running\n  podIP: {v4}\n  podIPs: [{{ip: {v4}}}, {{ip: \"{v6}\"}}]\n  \
         conditions: [{{type: Ready, status: \"True\"}}]\n"
    )
}

#[test]
fn dual_stack_services_get_one_slice_per_family_from_pod_ips() {
    let pods = [
        dual_pod("a", "10.244.0.2", "fd00:10:244::2"),
        dual_pod("b", "10.244.1.2", "fd00:10:244:1::2"),
        // Only an IPv6 address (an IPv6-only pod): in the IPv6 slice only.
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: c, labels: {app: web}}\n\
         spec: {containers: [{name: c}]}\nstatus:\n  phase: Running\n  podIPs: [{ip: \"fd00:10:244::9\"}]\n\
         \x20 conditions: [{type: Ready, status: \"True\"}]\n"
            .to_string(),
    ]
    .concat();
    let dual = WEB.replace(
        "selector:",
        "ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.5, \"fd00:10:96::5\"]\n  selector:",
    );
    let slices = derive(&[dual.as_str(), &pods].concat());
    let mut got: Vec<(String, Vec<String>, Vec<String>)> = slices
        .iter()
        .map(|s| (s.address_type.clone(), addresses(s), names(s)))
        .collect();
    got.sort();
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        got,
        [
            (
                "IPv4".into(),
                v(&["10.244.0.2", "10.244.1.2"]),
                v(&["a", "b"])
            ),
            (
                "IPv6".into(),
                v(&["fd00:10:244::2", "fd00:10:244::9", "fd00:10:244:1::2"]),
                v(&["a", "c", "b"])
            ),
        ]
    );
    // Distinct names, both labelled for the Service, the same resolved ports.
    assert_ne!(slices[0].metadata.name, slices[1].metadata.name);
    for s in &slices {
        let labels = s.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(LABEL_SERVICE_NAME).map(String::as_str),
            Some("web")
        );
        assert_eq!(ports(s), [("http".to_string(), 8080, "TCP".to_string())]);
    }

    // An IPv6 single-stack Service: the pods' IPv6 addresses only.
    let v6 = WEB.replace("selector:", "ipFamilies: [IPv6]\n  selector:");
    let slices = derive(&[v6.as_str(), &pods].concat());
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].address_type, "IPv6");
    assert_eq!(addresses(&slices[0]).len(), 3);

    // A dual-stack Service whose pods have IPv4 only: the IPv6 family gets the placeholder.
    let slices = derive(
        &[
            dual.as_str(),
            &pod("p", "{app: web}", "10.244.0.7", true, ""),
        ]
        .concat(),
    );
    let mut got: Vec<(String, usize)> = slices
        .iter()
        .map(|s| (s.address_type.clone(), s.endpoints.len()))
        .collect();
    got.sort();
    assert_eq!(got, [("IPv4".to_string(), 1), ("IPv6".to_string(), 0)]);
}

#[test]
fn port_hash_is_stable() {
    // Pinned: slice names must not change between builds.
    assert_eq!(port_hash("IPv4", &[]), port_hash("IPv4", &[]));
    assert_ne!(port_hash("IPv4", &[]), port_hash("IPv6", &[]));
    assert_eq!(port_hash("IPv4", &[]), "60d0fcd10f");
}
