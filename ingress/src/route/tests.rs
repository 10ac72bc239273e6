use super::*;

fn ing(yaml: &str) -> Ingress {
    serde_yaml::from_str(yaml).expect("test Ingress parses")
}

/// One Ingress, default namespace, routing `host` with (pathType, path, service) triples.
fn one(host: &str, paths: &[(&str, &str, &str)]) -> Ingress {
    let paths: Vec<String> = paths
        .iter()
        .map(|(ty, path, svc)| {
            format!(
                "{{pathType: {ty}, path: '{path}', backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}"
            )
        })
        .collect();
    let host = if host.is_empty() {
        String::new()
    } else {
        format!("host: '{host}', ")
    };
    ing(&format!(
        "metadata: {{name: i, namespace: default}}\nspec: {{rules: [{{{host}http: {{paths: [{}]}}}}]}}",
        paths.join(", ")
    ))
}

fn svc(table: &RouteTable, host: &str, path: &str) -> Option<String> {
    table.lookup(host, path).map(|b| b.service.clone())
}

fn table(ingresses: &[Ingress]) -> RouteTable {
    compile(ingresses).0
}

#[test]
fn exact_matches_only_the_exact_path_case_sensitively() {
    let t = table(&[one("", &[("Exact", "/foo", "a")])]);
    assert_eq!(svc(&t, "x", "/foo").as_deref(), Some("a"));
    assert_eq!(svc(&t, "x", "/foo/"), None);
    assert_eq!(svc(&t, "x", "/FOO"), None);
    assert_eq!(svc(&t, "x", "/foo/bar"), None);
}

#[test]
fn prefix_matches_by_element_with_trailing_slash_ignored() {
    let t = table(&[one("", &[("Prefix", "/foo", "a")])]);
    for yes in ["/foo", "/foo/", "/foo/bar"] {
        assert_eq!(svc(&t, "x", yes).as_deref(), Some("a"), "{yes}");
    }
    assert_eq!(svc(&t, "x", "/foobar"), None);
    assert_eq!(svc(&t, "x", "/"), None);
    let t = table(&[one("", &[("Prefix", "/foo/", "a")])]);
    assert_eq!(svc(&t, "x", "/foo").as_deref(), Some("a"));
    assert_eq!(svc(&t, "x", "/aaa/bb"), None);
}

#[test]
fn prefix_root_matches_everything() {
    let t = table(&[one("", &[("Prefix", "/", "a")])]);
    for p in ["/", "/x", "/x/y/"] {
        assert_eq!(svc(&t, "x", p).as_deref(), Some("a"), "{p}");
    }
}

#[test]
fn implementation_specific_is_prefix_here() {
    let t = table(&[one("", &[("ImplementationSpecific", "/api", "a")])]);
    assert_eq!(svc(&t, "x", "/api/v1").as_deref(), Some("a"));
    assert_eq!(svc(&t, "x", "/apiv1"), None);
}

#[test]
fn longest_match_wins_and_exact_beats_prefix_at_equal_length() {
    let t = table(&[one(
        "",
        &[
            ("Prefix", "/", "root"),
            ("Prefix", "/aaa", "aaa"),
            ("Prefix", "/aaa/bbb", "bbb"),
        ],
    )]);
    assert_eq!(svc(&t, "x", "/aaa/bbb/c").as_deref(), Some("bbb"));
    assert_eq!(svc(&t, "x", "/aaa/ccc").as_deref(), Some("aaa"));
    assert_eq!(svc(&t, "x", "/zzz").as_deref(), Some("root"));
    let t = table(&[one(
        "",
        &[("Prefix", "/foo", "prefix"), ("Exact", "/foo", "exact")],
    )]);
    assert_eq!(svc(&t, "x", "/foo").as_deref(), Some("exact"));
    assert_eq!(svc(&t, "x", "/foo/x").as_deref(), Some("prefix"));
}

#[test]
fn wildcard_host_covers_exactly_one_label() {
    let t = table(&[one("*.foo.com", &[("Prefix", "/", "a")])]);
    assert_eq!(svc(&t, "bar.foo.com", "/").as_deref(), Some("a"));
    assert_eq!(svc(&t, "baz.bar.foo.com", "/"), None);
    assert_eq!(svc(&t, "foo.com", "/"), None);
    assert_eq!(svc(&t, ".foo.com", "/"), None);
}

#[test]
fn exact_host_beats_wildcard_and_hosts_compare_without_case_or_port() {
    let mut exact = one("bar.foo.com", &[("Prefix", "/", "exact")]);
    exact.metadata.name = Some("e".into());
    let t = table(&[one("*.foo.com", &[("Prefix", "/", "wild")]), exact]);
    assert_eq!(svc(&t, "bar.foo.com", "/").as_deref(), Some("exact"));
    assert_eq!(svc(&t, "BAR.foo.com:8443", "/").as_deref(), Some("exact"));
    assert_eq!(svc(&t, "qux.foo.com", "/").as_deref(), Some("wild"));
}

#[test]
fn rule_without_host_matches_every_host() {
    let t = table(&[one("", &[("Prefix", "/", "a")])]);
    assert_eq!(svc(&t, "anything.example", "/").as_deref(), Some("a"));
    assert_eq!(svc(&t, "", "/").as_deref(), Some("a"));
}

#[test]
fn default_backend_serves_what_no_rule_matches_else_none() {
    let i = ing(r#"
metadata: {name: i, namespace: web}
spec:
  defaultBackend: {service: {name: fallback, port: {name: http}}}
  rules: [{host: a.com, http: {paths: [{pathType: Exact, path: /x, backend: {service: {name: a, port: {number: 80}}}}]}}]
"#);
    let t = table(&[i]);
    let b = t.lookup("a.com", "/y").expect("default backend");
    assert_eq!(
        b,
        &Backend {
            namespace: "web".into(),
            service: "fallback".into(),
            port: PortRef::Name("http".into())
        }
    );
    assert_eq!(svc(&t, "other.com", "/x").as_deref(), Some("fallback"));
    assert_eq!(svc(&t, "a.com", "/x").as_deref(), Some("a"));
    let t = table(&[one("a.com", &[("Exact", "/x", "a")])]);
    assert_eq!(t.lookup("a.com", "/y"), None, "404 when nothing matches");
}

#[test]
fn rules_for_one_host_merge_across_ingresses() {
    let mut a = one("h.com", &[("Prefix", "/a", "a")]);
    a.metadata.name = Some("a".into());
    let mut b = one("h.com", &[("Prefix", "/b", "b")]);
    b.metadata.name = Some("b".into());
    let (t, problems) = compile(&[a, b]);
    assert_eq!(problems, vec![]);
    assert_eq!(svc(&t, "h.com", "/a").as_deref(), Some("a"));
    assert_eq!(svc(&t, "h.com", "/b").as_deref(), Some("b"));
}

#[test]
fn conflict_goes_to_the_oldest_then_namespace_and_name_whatever_the_order() {
    let at = |name: &str, ns: &str, ts: &str, svc: &str| {
        ing(&format!(
            "metadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{ts}'}}\n\
             spec: {{rules: [{{host: h.com, http: {{paths: [{{pathType: Prefix, path: /, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}]}}}}]}}"
        ))
    };
    let old = at("z", "z", "2020-01-01T00:00:00Z", "old");
    let new = at("a", "a", "2024-01-01T00:00:00Z", "new");
    for list in [
        vec![old.clone(), new.clone()],
        vec![new.clone(), old.clone()],
    ] {
        let (t, problems) = compile(&list);
        assert_eq!(svc(&t, "h.com", "/").as_deref(), Some("old"));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].ingress, "a/a");
    }
    // Same time: namespace/name decides.
    let x = at("x", "b", "2020-01-01T00:00:00Z", "bx");
    let y = at("y", "a", "2020-01-01T00:00:00Z", "ay");
    for list in [vec![x.clone(), y.clone()], vec![y.clone(), x.clone()]] {
        assert_eq!(svc(&table(&list), "h.com", "/").as_deref(), Some("ay"));
    }
}

#[test]
fn resource_backends_are_reported_unsupported_and_the_rest_applies() {
    let i = ing(r#"
metadata: {name: r, namespace: default}
spec:
  rules:
  - http:
      paths:
      - {pathType: Prefix, path: /static, backend: {resource: {apiGroup: k8s.example.com, kind: StorageBucket, name: assets}}}
      - {pathType: Prefix, path: /, backend: {service: {name: web, port: {number: 80}}}}
"#);
    let (t, problems) = compile(&[i]);
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0]
            .message
            .contains("resource backends are not supported"),
        "{problems:?}"
    );
    assert!(
        problems[0]
            .message
            .starts_with("spec.rules[0].http.paths[0].backend.resource")
    );
    assert_eq!(svc(&t, "x", "/static/a").as_deref(), Some("web"));
}

#[test]
fn service_port_by_number_or_name() {
    let i = ing(r#"
metadata: {name: p, namespace: default}
spec:
  rules:
  - http:
      paths:
      - {pathType: Exact, path: /n, backend: {service: {name: a, port: {number: 8080}}}}
      - {pathType: Exact, path: /s, backend: {service: {name: a, port: {name: http}}}}
      - {pathType: Exact, path: /bad, backend: {service: {name: a, port: {}}}}
"#);
    let (t, problems) = compile(&[i]);
    assert_eq!(
        t.lookup("x", "/n").map(|b| &b.port),
        Some(&PortRef::Number(8080))
    );
    assert_eq!(
        t.lookup("x", "/s").map(|b| &b.port),
        Some(&PortRef::Name("http".into()))
    );
    assert_eq!(t.lookup("x", "/bad"), None);
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn regex_paths_match_from_the_start_case_insensitively_and_bad_ones_are_reported() {
    let i = ing(r#"
metadata: {name: r, namespace: default, annotations: {nginx.ingress.kubernetes.io/use-regex: "true"}}
spec:
  rules:
  - host: r.example
    http:
      paths:
      - {pathType: ImplementationSpecific, path: '/api/v[0-9]+', backend: {service: {name: api, port: {number: 80}}}}
      - {pathType: Prefix, path: '/', backend: {service: {name: web, port: {number: 80}}}}
      - {pathType: ImplementationSpecific, path: '/bad(', backend: {service: {name: x, port: {number: 80}}}}
      - {pathType: Exact, path: '/exact.txt', backend: {service: {name: file, port: {number: 80}}}}
"#);
    let (t, problems) = compile(&[i]);
    assert_eq!(
        svc(&t, "r.example", "/api/v2/users").as_deref(),
        Some("api")
    );
    assert_eq!(svc(&t, "r.example", "/API/V10").as_deref(), Some("api"));
    assert_eq!(
        svc(&t, "r.example", "/x/api/v2").as_deref(),
        Some("web"),
        "anchored"
    );
    assert_eq!(svc(&t, "r.example", "/api/vx").as_deref(), Some("web"));
    // Exact stays exact (a '.' is no wildcard there).
    assert_eq!(svc(&t, "r.example", "/exact.txt").as_deref(), Some("file"));
    assert_eq!(svc(&t, "r.example", "/exactXtxt").as_deref(), Some("web"));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].message.contains("regular expression"),
        "{problems:?}"
    );
}

#[test]
fn use_regex_on_one_ingress_applies_to_every_path_of_its_host() {
    let plain = one("r.example", &[("Prefix", "/v[0-9]", "other")]);
    let regex = ing(r#"
metadata: {name: r, namespace: default, annotations: {nginx.ingress.kubernetes.io/use-regex: "true"}}
spec: {rules: [{host: r.example, http: {paths: [{pathType: Prefix, path: '/api/.*', backend: {service: {name: api, port: {number: 80}}}}]}}]}
"#);
    let elsewhere = one("s.example", &[("Prefix", "/v[0-9]", "s")]);
    let t = table(&[plain, regex, elsewhere]);
    assert_eq!(svc(&t, "r.example", "/v2").as_deref(), Some("other"));
    assert_eq!(svc(&t, "r.example", "/api/x").as_deref(), Some("api"));
    // Other hosts keep element-wise prefixes.
    assert_eq!(svc(&t, "s.example", "/v2"), None);
    assert_eq!(svc(&t, "s.example", "/v[0-9]/x").as_deref(), Some("s"));
}

#[test]
fn canaries_attach_to_the_main_rule_or_are_reported() {
    let main = one("c.example", &[("Prefix", "/", "stable")]);
    let canary = ing(r#"
metadata: {name: c, namespace: default, annotations: {nginx.ingress.kubernetes.io/canary: "true", nginx.ingress.kubernetes.io/canary-weight: "20"}}
spec:
  rules:
  - host: c.example
    http:
      paths:
      - {pathType: Prefix, path: '/', backend: {service: {name: next, port: {number: 80}}}}
      - {pathType: Prefix, path: '/nomain', backend: {service: {name: next, port: {number: 80}}}}
"#);
    let (t, problems) = compile(&[canary, main]);
    let route = t.lookup_route("c.example", "/x").expect("route");
    assert_eq!(
        route.backend.service, "stable",
        "the canary never becomes the main rule"
    );
    let c = route.canary.expect("canary attached");
    assert_eq!(c.backend.service, "next");
    assert_eq!(c.options.canary.as_ref().map(|c| c.weight), Some(20));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].message.contains("needs a main Ingress"));
    // Its backend is resolved too.
    assert!(t.routes().any(|(b, _)| b.service == "next"));
}

#[test]
fn a_route_names_the_rule_host_and_path_as_written_never_the_request() {
    let i = ing(r#"
metadata: {name: i, namespace: web}
spec:
  defaultBackend: {service: {name: fallback, port: {number: 80}}}
  rules:
  - {host: '*.Example.com', http: {paths: [{pathType: Prefix, path: /api, backend: {service: {name: a, port: {number: 80}}}}]}}
  - {host: exact.example.com, http: {paths: [{pathType: Exact, path: /x, backend: {service: {name: b, port: {number: 80}}}}]}}
  - {http: {paths: [{pathType: Prefix, path: /, backend: {service: {name: c, port: {number: 80}}}}]}}
"#);
    let t = table(&[i]);
    let labels = |host: &str, path: &str| {
        let r = t.lookup_route(host, path).expect("a route");
        (
            r.rule_host.to_string(),
            r.rule_path.unwrap_or("").to_string(),
        )
    };
    assert_eq!(
        labels("Foo.EXAMPLE.com:8443", "/api/v1/users/42"),
        ("*.example.com".into(), "/api".into())
    );
    assert_eq!(
        labels("exact.example.com", "/x"),
        ("exact.example.com".into(), "/x".into())
    );
    assert_eq!(
        labels("random-123.test", "/anything"),
        ("".into(), "/".into())
    );
    // No path of the exact host matches: the default backend, no rule.
    assert_eq!(labels("exact.example.com", "/y"), ("".into(), "".into()));
}
