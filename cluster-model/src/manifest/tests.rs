use super::*;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn parse(yaml: &str) -> (Vec<Object>, Vec<Problem>) {
    parse_manifests(yaml, ManifestFormat::Yaml, None)
}

/// A Service document with `spec` (YAML flow or block text indented by 2).
fn service(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n{spec}\n")
}

fn pod(spec_and_status: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n{spec_and_status}\n")
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: np\nspec:\n{spec}\n"
    )
}

fn slice(body: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n  labels:\n    \
         kubernetes.io/service-name: web\n{body}\n"
    )
}

#[test]
fn multi_document_yaml() {
    let yaml = r#"
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec: {ports: [{port: 80}]}
---
# a comment-only document
---
apiVersion: v1
kind: Pod
metadata: {name: web-1}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, namespace: ignored}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny}
spec: {podSelector: {}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
"#;
    let (objects, problems) = parse(yaml);
    assert_eq!(problems, vec![]);
    let described: Vec<String> = objects.iter().map(Object::describe).collect();
    assert_eq!(
        described,
        [
            "Service prod/web",
            "Pod default/web-1",
            "Node node-a",
            "NetworkPolicy default/deny"
        ]
    );
    // Namespace defaulted for namespaced kinds, dropped for cluster-scoped ones.
    assert_eq!(objects[1].metadata().namespace.as_deref(), Some("default"));
    assert_eq!(objects[2].metadata().namespace, None);
}

#[test]
fn lists_and_json() {
    let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a}
  spec: {ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: b}
  spec: {ports: [{port: 0}]}
---
apiVersion: v1
kind: ServiceList
items:
- apiVersion: v1
  kind: Service
  metadata: {name: c}
  spec: {ports: [{port: 80}]}
"#;
    let (objects, problems) = parse(yaml);
    let described: Vec<String> = objects.iter().map(Object::describe).collect();
    assert_eq!(described, ["Service default/a", "Service default/c"]);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].object.as_deref(), Some("Service default/b"));
    assert_eq!(problems[0].field.as_deref(), Some("spec.ports[0].port"));

    let json = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"}, "spec": {"ports": [{"port": 53, "protocol": "UDP"}]}}"#;
    let (objects, problems) = parse_manifests(json, ManifestFormat::Json, None);
    assert_eq!(problems, vec![]);
    assert_eq!(objects[0].describe(), "Service default/j");
}

#[test]
fn unparseable_file_is_one_problem_with_line() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n   bad: [\n";
    let err = parse_text(yaml, ManifestFormat::Yaml, Some(Path::new("x/web.yaml"))).unwrap_err();
    assert_eq!(err.file.as_deref(), Some(Path::new("x/web.yaml")));
    assert_eq!(err.object, None);
    assert!(err.message.starts_with("invalid YAML: "), "{err}");
    assert!(err.message.contains("line "), "{err}");

    // A later document's syntax error breaks the whole file.
    let yaml = format!("{}---\nkey: [unclosed\n", service("  ports: [{port: 80}]"));
    assert!(parse_text(&yaml, ManifestFormat::Yaml, None).is_err());

    let err = parse_text("{\"a\": ", ManifestFormat::Json, Some(Path::new("a.json"))).unwrap_err();
    assert!(err.message.starts_with("invalid JSON: "), "{err}");
    assert!(err.message.contains("line 1"), "{err}");
}

#[test]
fn type_errors_name_the_field_path() {
    let (objects, problems) = parse(&service("  ports:\n  - port: \"80\""));
    assert!(objects.is_empty());
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].object.as_deref(), Some("Service default/web"));
    assert_eq!(problems[0].field.as_deref(), Some("spec.ports[0].port"));
    assert!(
        problems[0].message.contains("invalid type"),
        "{}",
        problems[0]
    );

    // k8s-openapi reads a missing required number as 0, which validation then names.
    let (_, problems) = parse(&service("  ports:\n  - name: a\n  - name: b\n    port: 80"));
    assert_eq!(problems[0].field.as_deref(), Some("spec.ports[0].port"));
    assert_eq!(problems[0].message, "must be between 1 and 65535, got 0");

    let (_, problems) = parse(&service("  ports:\n  - port: 99999999999"));
    assert_eq!(problems[0].field.as_deref(), Some("spec.ports[0].port"));
}

#[test]
fn kind_and_api_version_problems() {
    let cases: &[(&str, Option<&str>, Option<&str>, &str)] = &[
        (
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []",
            Some("EndpointSlice default/s"),
            Some("apiVersion"),
            "unsupported apiVersion \"discovery.k8s.io/v1beta1\" for kind EndpointSlice (expected \"discovery.k8s.io/v1\")",
        ),
        (
            "apiVersion: v1\nmetadata: {name: s}",
            Some("document 1"),
            Some("kind"),
            "required value",
        ),
        (
            "kind: Service\nmetadata: {name: s}",
            Some("Service (document 1)"),
            Some("apiVersion"),
            "required value",
        ),
        (
            "apiVersion: v1\nkind: service\nmetadata: {name: s}",
            Some("document 1"),
            Some("kind"),
            "unknown kind \"service\" (did you mean Service?)",
        ),
        (
            "just a string",
            None,
            None,
            "document 1 is not an object (a mapping)",
        ),
    ];
    for (yaml, object, field, message) in cases {
        let (objects, problems) = parse(yaml);
        assert!(objects.is_empty(), "{yaml}");
        assert_eq!(problems.len(), 1, "{yaml}: {problems:?}");
        assert_eq!(problems[0].object.as_deref(), *object, "{yaml}");
        assert_eq!(problems[0].field.as_deref(), *field, "{yaml}");
        assert_eq!(problems[0].message, *message, "{yaml}");
    }
}

/// Each case: a document, then the one expected problem's field path and a part of its message.
fn check_invalid(cases: &[(String, &str, &str)]) {
    for (yaml, field, message) in cases {
        let (objects, problems) = parse(yaml);
        assert!(objects.is_empty(), "should be invalid:\n{yaml}");
        let fields: Vec<_> = problems
            .iter()
            .map(|p| p.field.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(fields, [*field], "\n{yaml}\n{problems:#?}");
        assert!(
            problems[0].message.contains(message),
            "{:?} should contain {message:?}\n{yaml}",
            problems[0].message
        );
    }
}

#[test]
fn metadata_rules() {
    let cases = vec![
        ("apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {ports: [{port: 80}]}".to_string(), "metadata.name", "required value"),
        ("apiVersion: v1\nkind: Service\nspec: {ports: [{port: 80}]}".to_string(), "metadata.name", "required value"),
        // Services need an RFC 1035 label: no leading digit, no dots.
        ("apiVersion: v1\nkind: Service\nmetadata: {name: 1web}\nspec: {ports: [{port: 80}]}".to_string(), "metadata.name", "RFC 1035"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: web.x}\nspec: {ports: [{port: 80}]}".to_string(), "metadata.name", "RFC 1035"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: Web}\nspec: {ports: [{port: 80}]}".to_string(), "metadata.name", "got \"Web\""),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: Prod}\nspec: {ports: [{port: 80}]}".to_string(), "metadata.namespace", "RFC 1123 label"),
        // Namespaces need an RFC 1123 label; pods, nodes and slices a subdomain.
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}".to_string(), "metadata.name", "RFC 1123 label"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a_b}\nspec: {containers: [{name: c}]}".to_string(), "metadata.name", "RFC 1123 subdomain"),
        ("apiVersion: v1\nkind: Node\nmetadata: {name: Node-A}".to_string(), "metadata.name", "RFC 1123 subdomain"),
        (format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}", "a".repeat(254)), "metadata.name", "no more than 253"),
        ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: -s, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []".to_string(), "metadata.name", "subdomain"),
    ];
    check_invalid(&cases);

    // Valid names of each rule.
    let ok = [
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a.example.com}",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1.x}\nspec: {containers: [{name: c}]}",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: 0prod}",
    ];
    for yaml in ok {
        let (objects, problems) = parse(yaml);
        assert_eq!(problems, vec![], "{yaml}");
        assert_eq!(objects.len(), 1);
    }
}

#[test]
fn service_rules() {
    let s = |spec: &str| service(spec);
    let cases = vec![
        (
            s("  clusterIP: 10.0.0.300\n  ports: [{port: 80}]"),
            "spec.clusterIP",
            "must be empty, \"None\" or a valid IP address, got \"10.0.0.300\"",
        ),
        (
            s("  clusterIPs: [10.0.0.1, nope]\n  ports: [{port: 80}]"),
            "spec.clusterIPs[1]",
            "got \"nope\"",
        ),
        (
            s("  clusterIP: 10.0.0.1\n  clusterIPs: [10.0.0.2]\n  ports: [{port: 80}]"),
            "spec.clusterIPs[0]",
            "must match spec.clusterIP",
        ),
        (
            s("  clusterIPs: [10.0.0.1, 10.0.0.2]\n  ports: [{port: 80}]"),
            "spec.clusterIPs[1]",
            "different IP family",
        ),
        (
            s("  ports: [{port: 80}, {name: b, port: 81}]"),
            "spec.ports[0].name",
            "required when the Service has more than one port",
        ),
        (
            s("  ports: [{name: a, port: 80}, {name: b, port: 0}]"),
            "spec.ports[1].port",
            "must be between 1 and 65535, got 0",
        ),
        (
            s("  ports: [{port: 65536}]"),
            "spec.ports[0].port",
            "must be between 1 and 65535, got 65536",
        ),
        (
            s("  ports: [{port: 80, targetPort: 0}]"),
            "spec.ports[0].targetPort",
            "must be between 1 and 65535, got 0",
        ),
        (
            s("  ports: [{port: 80, targetPort: 70000}]"),
            "spec.ports[0].targetPort",
            "got 70000",
        ),
        (
            s("  ports: [{port: 80, targetPort: \"8080\"}]"),
            "spec.ports[0].targetPort",
            "at least one letter",
        ),
        (
            s("  ports: [{port: 80, targetPort: HTTP}]"),
            "spec.ports[0].targetPort",
            "only lowercase",
        ),
        (
            s("  ports: [{port: 80, targetPort: very-long-port-name}]"),
            "spec.ports[0].targetPort",
            "at most 15",
        ),
        (
            s("  ports: [{port: 80, targetPort: -http}]"),
            "spec.ports[0].targetPort",
            "no leading, trailing or doubled",
        ),
        (
            s("  ports: [{port: 80, targetPort: ht--tp}]"),
            "spec.ports[0].targetPort",
            "no leading, trailing or doubled",
        ),
        (
            s("  type: NodePort\n  ports: [{port: 80, nodePort: 70000}]"),
            "spec.ports[0].nodePort",
            "must be between 0 and 65535, got 70000",
        ),
        (
            s("  ports: [{port: 80, nodePort: 30080}]"),
            "spec.ports[0].nodePort",
            "may not be used when type is ClusterIP",
        ),
        (
            s("  ports: [{port: 80, protocol: HTTP}]"),
            "spec.ports[0].protocol",
            "must be one of TCP, UDP, SCTP, got \"HTTP\"",
        ),
        (
            s("  ports: [{port: 80, protocol: tcp}]"),
            "spec.ports[0].protocol",
            "got \"tcp\"",
        ),
        (
            s("  ports: [{name: http, port: 80}, {name: http, port: 81}]"),
            "spec.ports[1].name",
            "duplicate value \"http\"",
        ),
        (
            s("  ports: [{name: Http, port: 80}]"),
            "spec.ports[0].name",
            "RFC 1123 label",
        ),
        (s("  ports: []"), "spec.ports", "required value"),
        (s("  selector: {app: web}"), "spec.ports", "required value"),
        (s("  type: NodePort"), "spec.ports", "required value"),
        (
            s("  type: Foo\n  ports: [{port: 80}]"),
            "spec.type",
            "must be one of ClusterIP, NodePort, LoadBalancer, ExternalName, got \"Foo\"",
        ),
        (
            s("  type: ExternalName"),
            "spec.externalName",
            "required for type ExternalName",
        ),
        (
            s("  type: ExternalName\n  externalName: Not_A_Name"),
            "spec.externalName",
            "subdomain",
        ),
        (
            s("  type: ExternalName\n  externalName: db.example.com\n  clusterIP: 10.0.0.1"),
            "spec.clusterIP",
            "must be empty for type ExternalName",
        ),
        (
            s("  sessionAffinity: Sticky\n  ports: [{port: 80}]"),
            "spec.sessionAffinity",
            "must be one of None, ClientIP",
        ),
        (
            s(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n  ports: [{port: 80}]",
            ),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "between 1 and 86400",
        ),
        (
            s("  externalTrafficPolicy: Nearest\n  type: NodePort\n  ports: [{port: 80}]"),
            "spec.externalTrafficPolicy",
            "must be one of Cluster, Local",
        ),
        (
            s("  ipFamilies: [IPv5]\n  ports: [{port: 80}]"),
            "spec.ipFamilies[0]",
            "must be one of IPv4, IPv6",
        ),
    ];
    check_invalid(&cases);

    let valid = [
        "  clusterIP: None",                        // headless: no ports needed
        "  clusterIP: None\n  selector: {app: db}", // headless with selector
        "  type: ExternalName\n  externalName: db.example.com.", // ExternalName: no ports needed
        "  clusterIP: \"\"\n  ports: [{port: 80}]",
        "  clusterIP: fd00::1\n  clusterIPs: [fd00::1, 10.0.0.1]\n  ports: [{port: 80}]",
        "  type: LoadBalancer\n  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 443, nodePort: 0, targetPort: https}]",
        "  ports: [{port: 80, targetPort: 8080, protocol: UDP}]",
        "  ports: [{port: 65535, targetPort: h2c}]",
    ];
    for spec in valid {
        let (objects, problems) = parse(&service(spec));
        assert_eq!(problems, vec![], "{spec}");
        assert_eq!(objects.len(), 1, "{spec}");
    }
}

#[test]
fn service_defaults() {
    let (objects, _) = parse(&service(
        "  clusterIP: 10.0.0.1\n  sessionAffinity: ClientIP\n  ports: [{port: 80}, {name: b, port: 81, targetPort: web}]",
    ));
    // Two ports, one unnamed: invalid. Name both.
    assert!(objects.is_empty());
    let (objects, problems) = parse(&service(
        "  type: NodePort\n  clusterIP: 10.0.0.1\n  sessionAffinity: ClientIP\n  ports: [{name: a, port: 80}, {name: b, port: 81, targetPort: web}]",
    ));
    assert_eq!(problems, vec![]);
    let Object::Service(svc) = &objects[0] else {
        panic!("not a service")
    };
    let spec = svc.spec.as_ref().expect("spec");
    assert_eq!(
        spec.cluster_ips.as_deref(),
        Some(&["10.0.0.1".to_string()][..])
    );
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    assert_eq!(timeout, Some(10800));
    let ports = spec.ports.as_deref().expect("ports");
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(80)));
    assert_eq!(
        ports[1].target_port,
        Some(IntOrString::String("web".into()))
    );

    let (objects, _) = parse(&service("  ports: [{port: 80}]"));
    let Object::Service(svc) = &objects[0] else {
        panic!("not a service")
    };
    let spec = svc.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.external_traffic_policy, None);
}

#[test]
fn pod_rules() {
    let c = |ports: &str| {
        pod(&format!(
            "spec:\n  containers:\n  - name: c\n    ports: {ports}"
        ))
    };
    let cases = vec![
        (
            c("[{containerPort: 0}]"),
            "spec.containers[0].ports[0].containerPort",
            "must be between 1 and 65535, got 0",
        ),
        (
            c("[{containerPort: 65536}]"),
            "spec.containers[0].ports[0].containerPort",
            "got 65536",
        ),
        (
            c("[{containerPort: 80, protocol: ICMP}]"),
            "spec.containers[0].ports[0].protocol",
            "must be one of TCP, UDP, SCTP",
        ),
        (
            c("[{containerPort: 80, name: HTTP}]"),
            "spec.containers[0].ports[0].name",
            "IANA_SVC_NAME",
        ),
        (
            c("[{containerPort: 80, name: \"80\"}]"),
            "spec.containers[0].ports[0].name",
            "at least one letter",
        ),
        (
            c("[{containerPort: 80, name: http}, {containerPort: 81, name: http}]"),
            "spec.containers[0].ports[1].name",
            "duplicate value \"http\"",
        ),
        (
            c("[{containerPort: 80, hostPort: -1}]"),
            "spec.containers[0].ports[0].hostPort",
            "between 0 and 65535",
        ),
        (
            pod(
                "spec:\n  containers: [{name: c}]\n  initContainers: [{name: i, ports: [{containerPort: 0}]}]",
            ),
            "spec.initContainers[0].ports[0].containerPort",
            "got 0",
        ),
        (
            pod("spec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.256}"),
            "status.podIP",
            "must be a valid IP address, got \"10.0.0.256\"",
        ),
        (
            pod("spec: {containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.0.0.1}, {ip: x}]}"),
            "status.podIPs[1].ip",
            "valid IP",
        ),
        (
            pod(
                "spec: {containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.0.0.1}, {ip: 10.0.0.2}]}",
            ),
            "status.podIPs[1].ip",
            "different IP family",
        ),
    ];
    check_invalid(&cases);

    // The same port name in two containers: the API only warns; the pod applies.
    let yaml = pod(
        "spec:\n  containers:\n  - name: a\n    ports: [{containerPort: 80, name: http}]\n  - name: b\n    ports: [{containerPort: 81, name: http}]",
    );
    let (objects, problems) = parse(&yaml);
    assert_eq!(objects.len(), 1);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        problems[0].field.as_deref(),
        Some("spec.containers[1].ports[0].name")
    );
    assert!(
        problems[0].message.contains("applied anyway"),
        "{}",
        problems[0]
    );

    let (objects, problems) = parse(&pod(
        "spec:\n  containers:\n  - name: c\n    ports: [{containerPort: 8080, name: http}]\nstatus: {podIP: fd00::1}",
    ));
    assert_eq!(problems, vec![]);
    let Object::Pod(p) = &objects[0] else {
        panic!("not a pod")
    };
    let port = &p.spec.as_ref().expect("spec").containers[0]
        .ports
        .as_ref()
        .expect("ports")[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"), "protocol defaulted");
}

#[test]
fn endpoint_slice_rules() {
    let cases = vec![
        (
            slice("addressType: IPv5\nendpoints: []"),
            "addressType",
            "must be one of IPv4, IPv6, FQDN, got \"IPv5\"",
        ),
        (
            slice("addressType: IPv4\nendpoints: [{addresses: [fd00::1]}]"),
            "endpoints[0].addresses[0]",
            "must be a valid IPv4 address, got \"fd00::1\"",
        ),
        (
            slice(
                "addressType: IPv6\nendpoints: [{addresses: [fd00::1]}, {addresses: [fd00::2, 10.0.0.1]}]",
            ),
            "endpoints[1].addresses[1]",
            "must be a valid IPv6 address",
        ),
        (
            slice("addressType: FQDN\nendpoints: [{addresses: [Not_Valid]}]"),
            "endpoints[0].addresses[0]",
            "subdomain",
        ),
        (
            slice("addressType: IPv4\nendpoints: [{addresses: []}]"),
            "endpoints[0].addresses",
            "at least 1 address",
        ),
        (
            slice("addressType: IPv4\nendpoints: []\nports: [{port: 0}]"),
            "ports[0].port",
            "must be between 1 and 65535, got 0",
        ),
        (
            slice(
                "addressType: IPv4\nendpoints: []\nports: [{name: a, port: 80}, {name: a, port: 81}]",
            ),
            "ports[1].name",
            "duplicate value \"a\"",
        ),
        (
            slice("addressType: IPv4\nendpoints: []\nports: [{port: 80, protocol: ICMP}]"),
            "ports[0].protocol",
            "must be one of TCP, UDP, SCTP",
        ),
        (
            slice("addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], nodeName: Node_A}]"),
            "endpoints[0].nodeName",
            "subdomain",
        ),
    ];
    check_invalid(&cases);

    // Port absent is fine.
    let (objects, problems) = parse(&slice(
        "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\nports: [{name: x}]",
    ));
    assert_eq!(problems, vec![]);
    assert_eq!(objects.len(), 1);

    // A slice without the service-name label: a warning, applied anyway.
    let yaml = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan}\naddressType: IPv4\nendpoints: []";
    let (objects, problems) = parse(yaml);
    assert_eq!(objects.len(), 1);
    assert_eq!(problems.len(), 1);
    assert_eq!(
        problems[0].object.as_deref(),
        Some("EndpointSlice default/orphan")
    );
    assert_eq!(
        problems[0].field.as_deref(),
        Some("metadata.labels[kubernetes.io/service-name]")
    );
    assert!(problems[0].message.contains("belongs to no Service"));
}

#[test]
fn one_problem_per_bad_field() {
    let (_, problems) = parse(&service(
        "  clusterIP: x\n  ports: [{name: a, port: 0, targetPort: 0}, {name: a, port: 80, protocol: X}]",
    ));
    let fields: Vec<_> = problems.iter().filter_map(|p| p.field.as_deref()).collect();
    assert_eq!(
        fields,
        [
            "spec.clusterIP",
            "spec.ports[0].port",
            "spec.ports[0].targetPort",
            "spec.ports[1].name",
            "spec.ports[1].protocol"
        ]
    );
    assert!(
        problems
            .iter()
            .all(|p| p.object.as_deref() == Some("Service default/web"))
    );
}

#[test]
fn invalid_entries_keep_their_identity() {
    let entries =
        parse_text(&service("  ports: [{port: 0}]"), ManifestFormat::Yaml, None).expect("parses");
    match &entries[..] {
        [
            Entry::Invalid {
                kind: Kind::Service,
                key,
                problems,
            },
        ] => {
            assert_eq!(key, &ObjectKey::new("default", "web"));
            assert_eq!(problems.len(), 1);
        }
        other => panic!("unexpected {other:?}"),
    }
    let entries =
        parse_text(&service("  ports: [{port: x}]"), ManifestFormat::Yaml, None).expect("parses");
    assert!(
        matches!(
            &entries[..],
            [Entry::Invalid {
                kind: Kind::Service,
                ..
            }]
        ),
        "{entries:?}"
    );
    let entries = parse_text(
        "apiVersion: v1\nkind: Service\nspec: {}",
        ManifestFormat::Yaml,
        None,
    )
    .expect("parses");
    assert!(
        matches!(&entries[..], [Entry::Unusable { .. }]),
        "{entries:?}"
    );
}

#[test]
fn network_policy_rules() {
    let cases: Vec<(String, &str, &str)> = vec![
        // Selectors: In/NotIn need values, Exists/DoesNotExist take none, operators are known.
        (
            policy("  podSelector: {matchExpressions: [{key: app, operator: In}]}"),
            "spec.podSelector.matchExpressions[0].values",
            "must be non-empty when operator is In",
        ),
        (
            policy(
                "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: []}]}}]}]",
            ),
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
            "must be non-empty when operator is NotIn",
        ),
        (
            policy(
                "  podSelector: {}\n  egress: [{to: [{namespaceSelector: {matchExpressions: [{key: team, operator: Exists, values: [a]}]}}]}]",
            ),
            "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values",
            "must be empty when operator is Exists",
        ),
        (
            policy(
                "  podSelector: {matchExpressions: [{key: app, operator: DoesNotExist, values: [a]}]}",
            ),
            "spec.podSelector.matchExpressions[0].values",
            "must be empty when operator is DoesNotExist",
        ),
        (
            policy("  podSelector: {matchExpressions: [{key: app, operator: in, values: [a]}]}"),
            "spec.podSelector.matchExpressions[0].operator",
            "must be one of In, NotIn, Exists, DoesNotExist, got \"in\"",
        ),
        (
            policy("  podSelector: {matchLabels: {\"bad key!\": a}}"),
            "spec.podSelector.matchLabels",
            "must be a valid label key",
        ),
        (
            policy("  podSelector: {matchLabels: {app: \"-a\"}}"),
            "spec.podSelector.matchLabels[app]",
            "must be a valid label value",
        ),
        // Peers: ipBlock alone; something must be given.
        (
            policy(
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
            ),
            "spec.ingress[0].from[0]",
            "may not specify both ipBlock and podSelector or namespaceSelector",
        ),
        (
            policy(
                "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, namespaceSelector: {}}]}]",
            ),
            "spec.egress[0].to[0]",
            "may not specify both ipBlock",
        ),
        (
            policy("  podSelector: {}\n  ingress: [{from: [{}]}]"),
            "spec.ingress[0].from[0]",
            "must specify a peer",
        ),
        // ipBlock: valid CIDRs, except strictly inside cidr.
        (
            policy("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]"),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "must be a valid CIDR",
        ),
        (
            policy("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.1}}]}]"),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "must be a valid CIDR",
        ),
        (
            policy(
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [nonsense]}}]}]",
            ),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "must be a valid CIDR",
        ),
        (
            policy(
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 192.168.0.0/16]}}]}]",
            ),
            "spec.ingress[0].from[0].ipBlock.except[1]",
            "192.168.0.0/16 must be a strict subset of cidr 10.0.0.0/8",
        ),
        (
            policy(
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]",
            ),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "must be a strict subset",
        ),
        (
            policy(
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [\"::/64\"]}}]}]",
            ),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "must be a strict subset",
        ),
        // Ports: protocol, number or name, endPort only with a number and not below it.
        (
            policy("  podSelector: {}\n  ingress: [{ports: [{protocol: ICMP, port: 1}]}]"),
            "spec.ingress[0].ports[0].protocol",
            "must be one of TCP, UDP, SCTP, got \"ICMP\"",
        ),
        (
            policy("  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]"),
            "spec.ingress[0].ports[0].port",
            "must be between 1 and 65535, got 0",
        ),
        (
            policy("  podSelector: {}\n  egress: [{ports: [{port: HTTP}]}]"),
            "spec.egress[0].ports[0].port",
            "must be a valid port name",
        ),
        (
            policy("  podSelector: {}\n  egress: [{ports: [{port: http, endPort: 90}]}]"),
            "spec.egress[0].ports[0].endPort",
            "may not be specified when port is a name",
        ),
        (
            policy("  podSelector: {}\n  egress: [{ports: [{endPort: 90}]}]"),
            "spec.egress[0].ports[0].endPort",
            "may not be specified without port",
        ),
        (
            policy("  podSelector: {}\n  ingress: [{ports: [{port: 100, endPort: 99}]}]"),
            "spec.ingress[0].ports[0].endPort",
            "must be greater than or equal to port (100), got 99",
        ),
        (
            policy("  podSelector: {}\n  ingress: [{ports: [{port: 100, endPort: 65536}]}]"),
            "spec.ingress[0].ports[0].endPort",
            "must be between 1 and 65535, got 65536",
        ),
        // policyTypes.
        (
            policy("  podSelector: {}\n  policyTypes: [Ingress, egress]"),
            "spec.policyTypes[1]",
            "must be one of Ingress, Egress, got \"egress\"",
        ),
    ];
    check_invalid(&cases);

    // The problem names the object and the file.
    let yaml = policy("  podSelector: {matchExpressions: [{key: app, operator: In}]}");
    let (_, problems) = parse_manifests(&yaml, ManifestFormat::Yaml, Some(Path::new("np.yaml")));
    assert_eq!(
        problems[0].to_string(),
        "np.yaml: NetworkPolicy default/np: spec.podSelector.matchExpressions[0].values: must be \
         non-empty when operator is In"
    );

    // Valid ones, including every peer form and an except inside its cidr.
    let valid = policy(
        "  podSelector: {matchLabels: {app: web}, matchExpressions: [{key: tier, operator: NotIn, values: [db]}, {key: canary, operator: DoesNotExist}]}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {}
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: prod}}
    - namespaceSelector: {}
      podSelector: {matchExpressions: [{key: role, operator: Exists}]}
    - ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24, 192.168.2.7/32]}
    - ipBlock: {cidr: \"2001:db8::/32\", except: [\"2001:db8:1::/48\"]}
    ports: [{port: 80}, {port: http, protocol: TCP}, {port: 30000, endPort: 32767, protocol: UDP}, {protocol: SCTP}]
  egress:
  - {}",
    );
    let (objects, problems) = parse(&valid);
    assert_eq!(problems, vec![]);
    assert_eq!(objects[0].describe(), "NetworkPolicy default/np");
}

#[test]
fn network_policy_defaults() {
    let policy_of = |yaml: &str| {
        let (objects, problems) = parse(yaml);
        assert_eq!(problems, vec![], "{yaml}");
        match objects.into_iter().next() {
            Some(Object::NetworkPolicy(p)) => p.spec.unwrap_or_default(),
            other => panic!("not a policy: {other:?}"),
        }
    };
    // policyTypes: Ingress always, Egress when there are egress rules.
    let spec = policy_of(&policy("  podSelector: {}"));
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    let spec = policy_of(&policy("  podSelector: {}\n  egress: [{}]"));
    assert_eq!(
        spec.policy_types,
        Some(vec!["Ingress".to_string(), "Egress".to_string()])
    );
    let spec = policy_of(&policy(
        "  podSelector: {}\n  egress: []\n  policyTypes: []",
    ));
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    let spec = policy_of(&policy(
        "  podSelector: {}\n  egress: [{}]\n  policyTypes: [Egress]",
    ));
    assert_eq!(spec.policy_types, Some(vec!["Egress".to_string()]));
    // A policy without spec selects every pod of its namespace for ingress, as the API server
    // would have it.
    let spec = policy_of(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bare}\n",
    );
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    // Port protocols default to TCP.
    let spec = policy_of(&policy(
        "  podSelector: {}\n  ingress: [{ports: [{port: 80}]}]\n  egress: [{ports: [{port: 53, protocol: UDP}, {}]}]",
    ));
    let protocols: Vec<_> = spec
        .ingress
        .iter()
        .flatten()
        .flat_map(|r| r.ports.iter().flatten())
        .chain(
            spec.egress
                .iter()
                .flatten()
                .flat_map(|r| r.ports.iter().flatten()),
        )
        .map(|p| p.protocol.clone().unwrap_or_default())
        .collect();
    assert_eq!(protocols, ["TCP", "UDP", "TCP"]);
}

#[test]
fn network_policy_cidr_with_host_bits_is_a_warning() {
    let (objects, problems) = parse(&policy(
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/8}}]}]",
    ));
    assert_eq!(objects.len(), 1);
    assert_eq!(problems.len(), 1);
    assert_eq!(
        problems[0].field.as_deref(),
        Some("spec.ingress[0].from[0].ipBlock.cidr")
    );
    assert!(
        problems[0].message.contains("means 10.0.0.0/8"),
        "{}",
        problems[0]
    );
}

#[test]
fn ingress_kinds_parse_with_annotations_and_only_tls_secrets() {
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: sluice, annotations: {ingressclass.kubernetes.io/is-default-class: "true"}}
spec: {controller: sluice.dev/ingress}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, annotations: {nginx.ingress.kubernetes.io/ssl-redirect: "false"}}
spec:
  rules:
  - host: "*.example.com"
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}]}
  tls: [{hosts: ["*.example.com"], secretName: web-tls}]
---
apiVersion: v1
kind: Secret
metadata: {name: web-tls}
type: kubernetes.io/tls
stringData: {tls.crt: CERT, tls.key: KEY}
---
apiVersion: v1
kind: Secret
metadata: {name: password}
stringData: {password: hunter2}
---
apiVersion: v1
kind: Secret
metadata: {name: token}
type: kubernetes.io/service-account-token
"#;
    let (objects, problems) = parse(yaml);
    assert_eq!(problems, vec![]);
    let kinds: Vec<String> = objects.iter().map(Object::describe).collect();
    assert_eq!(
        kinds,
        [
            "IngressClass sluice",
            "Ingress default/web",
            "Secret default/web-tls"
        ]
    );
    let annotations = |o: &Object| o.metadata().annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations(&objects[0])["ingressclass.kubernetes.io/is-default-class"],
        "true"
    );
    assert_eq!(
        annotations(&objects[1])["nginx.ingress.kubernetes.io/ssl-redirect"],
        "false"
    );
    let Object::Secret(secret) = &objects[2] else {
        panic!("a Secret: {:?}", objects[2]);
    };
    let data = secret.data.as_ref().expect("stringData merged into data");
    assert_eq!(data["tls.crt"].0, b"CERT");
    assert_eq!(data["tls.key"].0, b"KEY");
    assert!(secret.string_data.is_none());
}

#[test]
fn bad_ingress_objects_name_object_and_field_and_the_rest_still_applies() {
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: bad}
spec:
  rules:
  - host: 10.0.0.1
    http:
      paths:
      - {path: foo, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
      - {path: /x, pathType: Regex, backend: {service: {name: web, port: {number: 80, name: http}}}}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: nocontroller}
spec: {}
---
apiVersion: v1
kind: Secret
metadata: {name: half}
type: kubernetes.io/tls
data: {tls.crt: Q0VSVA==}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: good}
spec: {defaultBackend: {service: {name: web, port: {number: 80}}}}
"#;
    let (objects, problems) = parse(yaml);
    let described: Vec<String> = objects.iter().map(Object::describe).collect();
    assert_eq!(described, ["Ingress default/good"]);
    let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let expect = [
        "Ingress default/bad: spec.rules[0].host: ",
        "Ingress default/bad: spec.rules[0].http.paths[0].path: must be an absolute path",
        "Ingress default/bad: spec.rules[0].http.paths[1].pathType: must be one of",
        "Ingress default/bad: spec.rules[0].http.paths[1].backend.service.port: exactly one",
        "IngressClass nocontroller: spec.controller: required value",
        "Secret default/half: data[tls.key]: required value",
    ];
    assert_eq!(texts.len(), expect.len(), "{texts:#?}");
    for (text, want) in texts.iter().zip(expect) {
        assert!(
            text.starts_with(want),
            "{text:?} should start with {want:?}"
        );
    }
}
