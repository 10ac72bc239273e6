use super::*;
use cluster_model::{ManifestFormat, parse_manifests};

fn snapshot(yaml: &str) -> ClusterSnapshot {
    let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
    assert_eq!(problems, vec![]);
    ClusterSnapshot::from_objects(objects)
}

const CLASS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: sluice}
spec: {controller: sluice.dev/ingress}
"#;

fn addrs(compiled: &Compiled, host: &str, path: &str) -> Vec<String> {
    let backend = compiled.routes.lookup(host, path).expect("a route");
    compiled.upstreams[backend]
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn ready_endpoints_then_serving_terminating_only_when_none_ready() {
    let yaml = format!(
        r#"{CLASS}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web}}
spec:
  ingressClassName: sluice
  rules:
  - host: a.example
    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: a, port: {{number: 80}}}}}}}}]}}
  - host: b.example
    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: b, port: {{name: web}}}}}}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: a}}
spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: a-1, labels: {{kubernetes.io/service-name: a}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.0.0.2], conditions: {{ready: true}}}}
- {{addresses: [10.0.0.1]}}
- {{addresses: [10.0.0.3], conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.0.0.4], conditions: {{ready: false}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: b}}
spec: {{ports: [{{name: other, port: 81}}, {{name: web, port: 80, targetPort: 9090}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: b-1, labels: {{kubernetes.io/service-name: b}}}}
addressType: IPv4
ports: [{{name: web, port: 9090}}, {{name: other, port: 7777}}]
endpoints:
- {{addresses: [10.0.1.1], conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.0.1.2], conditions: {{ready: false, serving: false, terminating: true}}}}
"#
    );
    let (compiled, problems) = compile_snapshot(&snapshot(&yaml), &ClassConfig::default());
    assert_eq!(problems, vec![]);
    assert_eq!(
        addrs(&compiled, "a.example", "/"),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    // No ready endpoint: the serving terminating one; the port by name, its number from the slice.
    assert_eq!(addrs(&compiled, "b.example", "/x"), ["10.0.1.1:9090"]);
}

#[test]
fn named_target_port_from_pods_via_derived_slices() {
    let yaml = format!(
        r#"{CLASS}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web}}
spec: {{ingressClassName: sluice, defaultBackend: {{service: {{name: web, port: {{number: 80}}}}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: http}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, labels: {{app: web}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8081}}]}}]}}
status: {{podIP: 127.0.0.5, conditions: [{{type: Ready, status: "True"}}]}}
"#
    );
    let (compiled, problems) = compile_snapshot(&snapshot(&yaml), &ClassConfig::default());
    assert_eq!(problems, vec![]);
    assert_eq!(addrs(&compiled, "any", "/"), ["127.0.0.5:8081"]);
}

#[test]
fn missing_service_or_port_is_a_problem_and_no_endpoints() {
    let yaml = format!(
        r#"{CLASS}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: prod}}
spec:
  ingressClassName: sluice
  rules:
  - http:
      paths:
      - {{path: /a, pathType: Prefix, backend: {{service: {{name: nope, port: {{number: 80}}}}}}}}
      - {{path: /b, pathType: Prefix, backend: {{service: {{name: web, port: {{name: grpc}}}}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: prod}}
spec: {{ports: [{{name: http, port: 80}}]}}
"#
    );
    let (compiled, problems) = compile_snapshot(&snapshot(&yaml), &ClassConfig::default());
    let messages: Vec<_> = problems
        .iter()
        .map(|p| format!("{}: {}", p.ingress, p.message))
        .collect();
    assert_eq!(
        messages,
        [
            "prod/web: Service prod/nope not found (answering 503)",
            "prod/web: Service prod/web has no port with name \"grpc\" (answering 503)",
        ]
    );
    assert_eq!(addrs(&compiled, "x", "/a"), Vec::<String>::new());
}

#[test]
fn tls_hosts_exact_wildcard_and_from_rules() {
    let yaml = format!(
        r#"{CLASS}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: a}}
spec:
  ingressClassName: sluice
  tls:
  - {{hosts: [a.example, "*.wild.example"], secretName: a-tls}}
  rules:
  - host: a.example
    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: a, port: {{number: 80}}}}}}}}]}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: b}}
spec:
  ingressClassName: sluice
  tls: [{{secretName: b-tls}}]
  rules:
  - host: b.example
    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: a, port: {{number: 80}}}}}}}}]}}
  - host: a.example
    http: {{paths: [{{path: /b, pathType: Prefix, backend: {{service: {{name: a, port: {{number: 80}}}}}}}}]}}
"#
    );
    let (compiled, problems) = compile_snapshot(&snapshot(&yaml), &ClassConfig::default());
    let tls = &compiled.tls;
    let secret = |h: &str| tls.lookup(h).map(|k| k.name.clone());
    assert_eq!(secret("a.example:443").as_deref(), Some("a-tls"));
    assert_eq!(secret("x.wild.example").as_deref(), Some("a-tls"));
    assert_eq!(secret("y.x.wild.example"), None);
    assert_eq!(secret("wild.example"), None);
    assert_eq!(secret("b.example").as_deref(), Some("b-tls"));
    // a.example is a-tls's already: b's claim on it is reported.
    let messages: Vec<_> = problems.iter().map(|p| p.message.clone()).collect();
    assert!(
        messages.len() == 2
            && messages
                .iter()
                .all(|m| m.contains("already has Secret default/a-tls")
                    || m.contains("Service default/a not found")),
        "{messages:?}"
    );
}
