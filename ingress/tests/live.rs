//! Live changes under load: keep-alive HTTP/1.1 and HTTP/2 clients over TLS run for several
//! seconds while the manifest directory is rewritten many times a second (routes of other hosts,
//! the served Service's endpoints, the TLS Secret). Not one request may fail, every change must
//! show, and an open WebSocket keeps echoing throughout.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

const RUN: Duration = Duration::from_secs(6);
/// Between two rewrites of the directory (each rewrite changes one of three things in turn).
const TICK: Duration = Duration::from_millis(40);
const CLIENTS_PER_PROTOCOL: usize = 8;

fn ingress_yaml(extra_host: bool, extra_ws_path: bool) -> String {
    let rule = |host: &str, svc: &str| {
        format!(
            "  - host: {host}\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}]}}\n"
        )
    };
    let mut yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: web}}\nspec:\n  ingressClassName: sluice\n  \
         tls: [{{hosts: [live.example], secretName: live-tls}}]\n  rules:\n{}",
        rule("live.example", "web")
    );
    // The WebSocket's own host gets a path added and removed: its route changes under it.
    yaml.push_str(&format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: ws}}\nspec:\n  ingressClassName: sluice\n  rules:\n  - host: ws.example\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: ws, port: {{number: 80}}}}}}}}\n{}",
        if extra_ws_path {
            "      - {path: /extra, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n"
        } else {
            ""
        }
    ));
    if extra_host {
        yaml.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: other}}\nspec:\n  ingressClassName: sluice\n  rules:\n{}",
            rule("other.example", "ws")
        ));
    }
    yaml
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    backends: Mutex<BTreeSet<String>>,
}

impl Tally {
    async fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().await;
        if errors.len() < 10 {
            errors.push(what);
        }
    }
}

/// One keep-alive client looping requests until `stop`.
async fn load(
    client: reqwest::Client,
    url: String,
    version: reqwest::Version,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    while !stop.load(Ordering::Relaxed) {
        match client.get(&url).send().await {
            Ok(resp) if resp.status() == 200 && resp.version() == version => {
                match resp.text().await {
                    Ok(body) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        tally
                            .backends
                            .lock()
                            .await
                            .insert(field(&body, "backend").to_string());
                    }
                    Err(e) => tally.fail(format!("{version:?} body: {e:?}")).await,
                }
            }
            Ok(resp) => {
                let status = resp.status();
                let v = resp.version();
                let body = resp.text().await.unwrap_or_default();
                tally.fail(format!("{v:?} status {status}: {body}")).await;
            }
            Err(e) => tally.fail(format!("{version:?}: {e:?}")).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_routes_endpoints_and_certificates_change() {
    let a = backend("a", [127, 0, 0, 21]).await;
    let b = backend("b", [127, 0, 0, 22]).await;
    let c = backend("c", [127, 0, 0, 23]).await;
    // Served at first, then removed from the endpoints and, a little later, gone (a pod that
    // terminates after its endpoint is withdrawn).
    let mut d = Some(backend("d", [127, 0, 0, 25]).await);
    let d_addr = d.as_ref().map(|d| d.addr).expect("d");
    let ws = backend("ws", [127, 0, 0, 24]).await;
    let ca = Ca::new();
    let certs = [ca.leaf(&["live.example"]), ca.leaf(&["live.example"])];
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    let sets = [
        vec![a.addr, b.addr],
        vec![b.addr, c.addr],
        vec![c.addr, a.addr],
    ];
    let first = vec![a.addr, b.addr, d_addr];
    let endpoints = |i: Option<usize>| {
        // The backends listen on different ports: one slice per endpoint, each with its port.
        let mut yaml = String::from(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{name: http, port: 80}]}\n",
        );
        let set = i.map_or(&first, |i| &sets[i % sets.len()]);
        for (n, addr) in set.iter().enumerate() {
            yaml.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-{n}, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: ['{}']}}]\n",
                addr.port(),
                addr.ip()
            ));
        }
        yaml.push_str(&service_with_slice("ws", &[ws.addr]));
        yaml
    };
    write(&dir, "10-backends.yaml", &endpoints(None));
    write(&dir, "20-ingress.yaml", &ingress_yaml(false, false));
    write(&dir, "30-secret.yaml", &tls_secret("live-tls", &certs[0]));
    let mut ingress = Ingress::start_dir_with(&dir, &["--settle-ms", "10"]).await;
    let url = format!("https://live.example:{}/load", ingress.https.port());
    let https = ingress.https;
    let keep_alive = |h2: bool| {
        let builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).expect("CA"))
            .resolve("live.example", https)
            .timeout(Duration::from_secs(10));
        let builder = if h2 {
            builder.http2_prior_knowledge()
        } else {
            builder.http1_only()
        };
        builder.build().expect("client")
    };
    // The served endpoints work before the churn starts.
    let (status, _, _, _) = get_tls(&keep_alive(false), https, "live.example", "/")
        .await
        .expect("first request");
    assert_eq!(status, 200);

    // The WebSocket, opened before the churn.
    let mut socket = tokio::net::TcpStream::connect(ingress.http)
        .await
        .expect("connect");
    socket
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("upgrade");
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf))
            .await
            .expect("101 in time")
            .expect("read");
        assert!(n > 0, "closed before the upgrade");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for i in 0..CLIENTS_PER_PROTOCOL * 2 {
        let h2 = i % 2 == 1;
        // Half the clients' requests take 30 ms at the backend, so requests are in flight
        // across every change.
        let url = if i % 4 < 2 {
            format!("{url}?sleep=30")
        } else {
            url.clone()
        };
        let version = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        tasks.push(tokio::spawn(load(
            keep_alive(h2),
            url,
            version,
            Arc::clone(&stop),
            Arc::clone(&tally),
        )));
    }

    // Probes that the changes take effect: the other host appears and goes; new connections see
    // both certificates.
    let probe = {
        let stop = Arc::clone(&stop);
        let http = ingress.http;
        tokio::spawn(async move {
            let plain = reqwest::Client::new();
            let mut other = BTreeSet::new();
            let mut served = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(resp) = plain
                    .get(format!("http://{http}/"))
                    .header("Host", "other.example")
                    .send()
                    .await
                {
                    other.insert(resp.status().as_u16());
                }
                // A new client per probe: no session resumption, so the certificate is current.
                if let Ok((_, _, cert, _)) = get_tls(
                    &reqwest::Client::builder()
                        .use_rustls_tls()
                        .tls_built_in_root_certs(false)
                        .add_root_certificate(
                            reqwest::Certificate::from_pem(ca.pem.as_bytes()).expect("CA"),
                        )
                        .tls_info(true)
                        .resolve("live.example", https)
                        .build()
                        .expect("probe client"),
                    https,
                    "live.example",
                    "/probe",
                )
                .await
                {
                    served.insert(cert);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (other, served)
        })
    };

    let start = Instant::now();
    let mut withdrawn: Option<Instant> = None;
    let mut changes = 0u32;
    let mut echoes = 0u32;
    while start.elapsed() < RUN {
        let n = changes as usize;
        match n % 3 {
            0 => write(
                &dir,
                "20-ingress.yaml",
                &ingress_yaml((n / 3).is_multiple_of(2), !(n / 3).is_multiple_of(2)),
            ),
            1 => {
                write(&dir, "10-backends.yaml", &endpoints(Some(n / 3 + 1)));
                withdrawn.get_or_insert_with(Instant::now);
            }
            _ => write(
                &dir,
                "30-secret.yaml",
                &tls_secret("live-tls", &certs[(n / 3 + 1) % 2]),
            ),
        }
        changes += 1;
        if withdrawn.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
            // Requests it had in flight are done; its pooled connections close with it.
            d = None;
        }
        // The WebSocket echoes across every change.
        let message = format!("message {changes}");
        socket
            .write_all(message.as_bytes())
            .await
            .expect("ws write");
        let mut echoed = Vec::new();
        while echoed.len() < message.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
                .await
                .expect("echo in time")
                .expect("ws read");
            assert!(n > 0, "the WebSocket closed after {changes} changes");
            echoed.extend_from_slice(&buf[..n]);
        }
        assert_eq!(echoed, message.as_bytes());
        echoes += 1;
        tokio::time::sleep(TICK).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    let (other, served) = probe.await.expect("probe task");
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let errors = tally.errors.lock().await.clone();
    let backends = tally.backends.lock().await.clone();
    let reloads = ingress
        .log_text()
        .lines()
        .filter(|l| l.contains("event=\"reloaded\"") || l.contains("configuration applied"))
        .count();
    eprintln!(
        "{ok} requests, {failed} failed, {changes} changes, {reloads} reloads, {echoes} echoes, \
         backends {backends:?}, other host {other:?}, {} certificates",
        served.len()
    );
    assert!(ingress.child_alive(), "{}", ingress.log_text());
    assert_eq!(failed, 0, "failures: {errors:#?}");
    assert!(ok > 500, "only {ok} requests");
    assert!(
        changes as f64 / RUN.as_secs_f64() >= 10.0,
        "{changes} changes"
    );
    assert!(reloads >= 30, "only {reloads} reloads");
    assert!(d.is_none(), "the withdrawn endpoint was stopped");
    assert_eq!(
        backends,
        ["a", "b", "c", "d"].map(String::from).into(),
        "every endpoint set served"
    );
    assert_eq!(other, [200, 404].into(), "the other host came and went");
    assert_eq!(
        served,
        [der_of(&certs[0].0), der_of(&certs[1].0)].into(),
        "both certificates served"
    );
}
