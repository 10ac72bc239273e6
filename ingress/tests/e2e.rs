//! The real `sluice-ingress` binary as a child process on 127.0.0.1 ports, a manifest directory
//! in a temp dir, backends that are real HTTP servers on 127.0.0.x saying who they are, and real
//! clients (reqwest over rustls, verifying hostnames against a test CA). No root needed.

mod common;

use std::net::SocketAddr;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_404_headers_and_retry_on_connect_failure() {
    let a = backend("a", [127, 0, 0, 2]).await;
    let b = backend("b", [127, 0, 0, 3]).await;
    let c = backend("c", [127, 0, 0, 4]).await;
    // A second endpoint of "a" where nothing listens: connect fails, another endpoint serves.
    let dead = SocketAddr::from(([127, 0, 0, 5], a.addr.port()));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    write(
        &dir,
        "10-backends.yaml",
        &format!(
            "{}{}{}",
            service_with_slice("a", &[a.addr, dead]),
            service_with_slice("b", &[b.addr]),
            service_with_pod("c", c.addr)
        ),
    );
    write(
        &dir,
        "20-ingress.yaml",
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
spec:
  ingressClassName: sluice
  rules:
  - host: a.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}
      - {path: /b, pathType: Prefix, backend: {service: {name: b, port: {name: http}}}}
      - {path: /exact, pathType: Exact, backend: {service: {name: c, port: {name: web}}}}
  - host: "*.wild.example"
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: c, port: {number: 8080}}}}
  - host: missing.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: missing, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: not-ours}
spec:
  ingressClassName: other
  rules:
  - host: other.example
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}]}
"#,
    );
    let ingress = Ingress::start(&dir).await;

    let cases = [
        ("a.example", "/", 200, "a"),
        ("A.EXAMPLE:80", "/anything", 200, "a"),
        ("a.example", "/b", 200, "b"),
        ("a.example", "/b/deeper", 200, "b"),
        ("a.example", "/bb", 200, "a"),
        ("a.example", "/exact", 200, "c"),
        ("a.example", "/exact/no", 200, "a"),
        ("x.wild.example", "/", 200, "c"),
        ("y.x.wild.example", "/", 404, ""),
        ("wild.example", "/", 404, ""),
        ("other.example", "/", 404, ""),
        ("nothing.example", "/", 404, ""),
        ("missing.example", "/", 503, ""),
    ];
    for (host, path, status, who) in cases {
        let (got, body, _) = ingress.get(host, path).await;
        assert_eq!(got, status, "{host}{path}: {body}");
        assert_eq!(field(&body, "backend"), who, "{host}{path}");
        if status == 200 {
            assert_eq!(
                field(&body, "path"),
                path,
                "the path goes upstream unchanged"
            );
        }
    }

    // Forwarding headers, and the client's request ID kept.
    let (_, body, headers) = ingress.get("a.example", "/hdr").await;
    assert_eq!(field(&body, "xff"), "127.0.0.1");
    assert_eq!(field(&body, "xfp"), "http");
    assert_eq!(field(&body, "xfh"), "a.example");
    assert_eq!(field(&body, "host"), "a.example");
    let rid = field(&body, "rid");
    assert_eq!(rid.len(), 32, "a generated request ID: {body}");
    assert_eq!(
        headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some(rid)
    );
    let resp = reqwest::Client::new()
        .get(format!("http://{}/", ingress.http))
        .header("Host", "a.example")
        .header("X-Request-ID", "given-id-1")
        .header("X-Forwarded-For", "192.0.2.7")
        .send()
        .await
        .expect("request");
    let body = resp.text().await.expect("body");
    assert_eq!(field(&body, "rid"), "given-id-1");
    assert_eq!(field(&body, "xff"), "192.0.2.7, 127.0.0.1");

    // Round-robin lands on the dead endpoint half the time: every request must still succeed.
    for i in 0..6 {
        let (status, body, _) = ingress.get("a.example", &format!("/retry/{i}")).await;
        assert_eq!((status, field(&body, "backend")), (200, "a"), "{body}");
    }
    // One access line per request (written after the response: wait for the last ones).
    let requests = cases.len() + 8;
    let access = |log: &str| {
        log.lines()
            .filter(|l| l.contains("event=\"access\""))
            .count()
    };
    eventually("access lines", || async {
        access(&ingress.log_text()) >= requests
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "fewer than {requests} access lines:\n{}",
            ingress.log_text()
        )
    });
    let log = ingress.log_text();
    assert_eq!(access(&log), requests, "{log}");
    assert!(
        log.lines().any(|l| l.contains("event=\"access\"")
            && l.contains("status=404")
            && l.contains("host=nothing.example")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("config_problem")
            && l.contains("Ingress default/web")
            && l.contains("Service default/missing not found")),
        "the missing Service is reported:\n{log}"
    );
    assert!(
        log.contains("event=\"connect_failed\"") && log.contains(&dead.to_string()),
        "the dead endpoint was tried and logged:\n{log}"
    );

    // Health on the metrics port.
    let health = reqwest::get(format!("http://{}/healthz", ingress.metrics))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    // Prometheus metrics count what was served.
    let metrics = reqwest::get(format!("http://{}/metrics", ingress.metrics))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let value = |series: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    // Labelled by the matched rule's host and path as the Ingress writes them; unmatched
    // requests have empty labels, and no request's own host or path becomes a label.
    let requests = |host: &str, path: &str, ingress: &str, status: u16| {
        value(&format!(
            "sluice_ingress_requests_total{{host=\"{host}\",ingress=\"{ingress}\",listener=\"http\",path=\"{path}\",status=\"{status}\"}}"
        ))
    };
    assert_eq!(requests("", "", "", 404), Some(4.0), "{metrics}");
    assert_eq!(
        value("sluice_ingress_config_problems"),
        Some(1.0),
        "{metrics}"
    );
    // "/", "/anything", "/bb", "/exact/no", "/hdr", the request with an ID, 6 retries.
    assert_eq!(
        requests("a.example", "/", "default/web", 200),
        Some(12.0),
        "{metrics}"
    );
    assert_eq!(
        requests("a.example", "/b", "default/web", 200),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        requests("a.example", "/exact", "default/web", 200),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        requests("*.wild.example", "/", "default/web", 200),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        requests("missing.example", "/", "default/web", 503),
        Some(1.0),
        "{metrics}"
    );
    for raw in [
        "anything",
        "A.EXAMPLE",
        "x.wild.example",
        "nothing.example",
        "/hdr",
        "/retry",
    ] {
        assert!(!metrics.contains(raw), "{raw} is a label: {metrics}");
    }
    assert!(
        value(
            "sluice_ingress_request_duration_seconds_count{host=\"a.example\",ingress=\"default/web\",path=\"/b\"}"
        ) == Some(2.0),
        "{metrics}"
    );
    assert!(
        value("sluice_ingress_upstream_connect_failures_total").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert_eq!(
        value("sluice_ingress_reloads_total"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_by_sni_http2_redirects_and_hot_reload_of_routes_and_certificates() {
    let a = backend("a", [127, 0, 0, 6]).await;
    let b = backend("b", [127, 0, 0, 7]).await;
    let ca = Ca::new();
    let a_cert = ca.leaf(&["a.example"]);
    let wild_cert = ca.leaf(&["*.wild.example"]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    write(
        &dir,
        "10-backends.yaml",
        &format!(
            "{}{}",
            service_with_slice("a", &[a.addr]),
            service_with_slice("b", &[b.addr])
        ),
    );
    write(
        &dir,
        "30-secrets.yaml",
        &format!(
            "{}{}",
            tls_secret("a-tls", &a_cert),
            tls_secret("wild-tls", &wild_cert)
        ),
    );
    let ingress_yaml = |b_path: &str| {
        format!(
            r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web}}
spec:
  ingressClassName: sluice
  tls:
  - {{hosts: [a.example], secretName: a-tls}}
  - {{hosts: ["*.wild.example"], secretName: wild-tls}}
  rules:
  - host: a.example
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: a, port: {{number: 80}}}}}}}}
      - {{path: {b_path}, pathType: Prefix, backend: {{service: {{name: b, port: {{number: 80}}}}}}}}
  - host: "*.wild.example"
    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: b, port: {{number: 80}}}}}}}}]}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: plain, annotations: {{nginx.ingress.kubernetes.io/ssl-redirect: "false"}}}}
spec:
  ingressClassName: sluice
  tls: [{{hosts: [plain.example], secretName: a-tls}}]
  rules:
  - host: plain.example
    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: a, port: {{number: 80}}}}}}}}]}}
"#
        )
    };
    write(&dir, "20-ingress.yaml", &ingress_yaml("/old"));
    let mut ingress = Ingress::start(&dir).await;
    let hosts = [
        "a.example",
        "x.wild.example",
        "unknown.example",
        "plain.example",
    ];
    let client = ingress.https_client(&ca.pem, &hosts);

    // SNI picks the certificate (the client verifies the hostname against the test CA), and
    // HTTP/2 is negotiated by ALPN.
    let (status, body, cert, version) = get_tls(&client, ingress.https, "a.example", "/x")
        .await
        .expect("a.example over TLS");
    assert_eq!((status, field(&body, "backend")), (200, "a"));
    assert_eq!(cert, der_of(&a_cert.0));
    assert_eq!(version, reqwest::Version::HTTP_2);
    assert_eq!(field(&body, "xfp"), "https");
    let authority = format!("a.example:{}", ingress.https.port());
    assert_eq!(field(&body, "host"), authority, "Host made from :authority");
    let (status, body, cert, _) = get_tls(&client, ingress.https, "x.wild.example", "/")
        .await
        .expect("wildcard over TLS");
    assert_eq!((status, field(&body, "backend")), (200, "b"));
    assert_eq!(cert, der_of(&wild_cert.0));
    // No Secret covers it: the self-signed default, which the client rejects.
    let err = get_tls(&client, ingress.https, "unknown.example", "/")
        .await
        .expect_err("the default certificate is not trusted");
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
    // HTTP/1.1 by ALPN still works.
    install_provider();
    let h1 = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).expect("CA"))
        .resolve("a.example", ingress.https)
        .http1_only()
        .build()
        .expect("client");
    let resp = h1
        .get(format!("https://a.example:{}/", ingress.https.port()))
        .send()
        .await
        .expect("HTTP/1.1 over TLS");
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.status(), 200);

    // Plain HTTP to a TLS host: 308 to HTTPS, path and query kept; off by annotation.
    let (status, _, headers) = ingress.get("a.example", "/p?q=1").await;
    assert_eq!(status, 308);
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("https://a.example:{}/p?q=1", ingress.https.port()).as_str())
    );
    let (status, body, _) = ingress.get("plain.example", "/").await;
    assert_eq!((status, field(&body, "backend")), (200, "a"));

    // A route change applies without restart.
    let (_, body, _, _) = get_tls(&client, ingress.https, "a.example", "/new")
        .await
        .expect("tls");
    assert_eq!(field(&body, "backend"), "a");
    write(&dir, "20-ingress.yaml", &ingress_yaml("/new"));
    eventually("the new route", || async {
        get_tls(&client, ingress.https, "a.example", "/new")
            .await
            .is_ok_and(|(_, body, _, _)| field(&body, "backend") == "b")
    })
    .await
    .unwrap_or_else(|| panic!("route change not applied; log:\n{}", ingress.log_text()));
    let (_, body, _, _) = get_tls(&client, ingress.https, "a.example", "/old")
        .await
        .expect("tls");
    assert_eq!(field(&body, "backend"), "a", "the old route is gone");

    // A certificate change applies without restart.
    let a_cert2 = ca.leaf(&["a.example"]);
    write(
        &dir,
        "30-secrets.yaml",
        &format!(
            "{}{}",
            tls_secret("a-tls", &a_cert2),
            tls_secret("wild-tls", &wild_cert)
        ),
    );
    eventually("the new certificate", || async {
        get_tls(
            &ingress.https_client(&ca.pem, &hosts),
            ingress.https,
            "a.example",
            "/",
        )
        .await
        .is_ok_and(|(_, _, cert, _)| cert == der_of(&a_cert2.0))
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "certificate change not applied; log:\n{}",
            ingress.log_text()
        )
    });

    // An invalid Secret is reported by name and field, and the last good certificate stays.
    let broken = (
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".to_string(),
        a_cert2.1.clone(),
    );
    write(
        &dir,
        "30-secrets.yaml",
        &format!(
            "{}{}",
            tls_secret("a-tls", &broken),
            tls_secret("wild-tls", &wild_cert)
        ),
    );
    eventually("the invalid Secret reported", || async {
        let log = ingress.log_text();
        log.lines()
            .any(|l| l.contains("Secret default/a-tls") && l.contains("data[tls.crt]"))
    })
    .await
    .unwrap_or_else(|| panic!("invalid Secret not reported; log:\n{}", ingress.log_text()));
    let (status, _, cert, _) = get_tls(
        &ingress.https_client(&ca.pem, &hosts),
        ingress.https,
        "a.example",
        "/",
    )
    .await
    .expect("still served with the last good certificate");
    assert_eq!(status, 200);
    assert_eq!(cert, der_of(&a_cert2.0));
    assert!(ingress.child_alive(), "no restart happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_default_certificate_serves_hosts_without_a_secret() {
    let a = backend("a", [127, 0, 0, 13]).await;
    let ca = Ca::new();
    let fallback = ca.leaf(&["fallback.example"]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    write(
        &dir,
        "10-backends.yaml",
        &service_with_slice("a", &[a.addr]),
    );
    write(
        &dir,
        "20-ingress.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: any}\n\
         spec: {ingressClassName: sluice, defaultBackend: {service: {name: a, port: {number: 80}}}}\n",
    );
    let (cert, key) = (
        tmp.path().join("default.crt"),
        tmp.path().join("default.key"),
    );
    std::fs::write(&cert, &fallback.0).expect("write cert");
    std::fs::write(&key, &fallback.1).expect("write key");
    let args: Vec<std::ffi::OsString> = vec![
        "--manifests".into(),
        dir.clone().into(),
        "--default-cert".into(),
        cert.into(),
        "--default-key".into(),
        key.into(),
    ];
    let ingress = Ingress::start_with(&args, &tmp.path().join("ingress.log")).await;
    let client = ingress.https_client(&ca.pem, &["fallback.example"]);
    let (status, body, served, _) = get_tls(&client, ingress.https, "fallback.example", "/")
        .await
        .expect("the configured default certificate is trusted");
    assert_eq!(
        (status, field(&body, "backend")),
        (200, "a"),
        "spec.defaultBackend serves"
    );
    assert_eq!(served, der_of(&fallback.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_mode_logs_the_status_address_and_writes_the_status_file() {
    let web = backend("web", [127, 0, 0, 14]).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("dir");
    write(&dir, "00-class.yaml", CLASS);
    write(&dir, "web.yaml", &service_with_slice("web", &[web.addr]));
    write(
        &dir,
        "ingress.yaml",
        &common::ingress_yaml("web", "", "web.example", "Prefix", "/", "web"),
    );
    let status = tmp.path().join("status.json");
    let status_arg = status.to_string_lossy().to_string();
    let ingress = Ingress::start_dir_with(
        &dir,
        &[
            "--publish-status-address",
            "172.18.0.2",
            "--status-file",
            &status_arg,
        ],
    )
    .await;
    let read = || -> serde_json::Value {
        std::fs::read(&status)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    eventually("the status file", || async {
        read()["ingresses"]["default/web"] == serde_json::json!(["172.18.0.2"])
    })
    .await
    .unwrap_or_else(|| panic!("status file: {}; log:\n{}", read(), ingress.log_text()));
    assert!(
        ingress
            .log_text()
            .contains("Ingress default/web: status address 172.18.0.2"),
        "{}",
        ingress.log_text()
    );
}
