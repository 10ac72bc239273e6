//! The real `sluice-ingress` binary as a child process on 127.0.0.1 ports, a manifest directory
//! in a temp dir, backends that are real HTTP servers on 127.0.0.x saying who they are, and real
//! clients (reqwest over rustls, verifying hostnames against a test CA). No root needed.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

const WAIT: Duration = Duration::from_secs(20);

fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A backend: answers every request with its name and what it received.
struct BackendServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(name: &'static str, ip: [u8; 4]) -> BackendServer {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("backend listens");
    let addr = listener.local_addr().expect("backend address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let body = format!(
                            "backend={name}\npath={}\nhost={}\nxff={}\nxfp={}\nxfh={}\nrid={}\n",
                            req.uri().path(),
                            h("host"),
                            h("x-forwarded-for"),
                            h("x-forwarded-proto"),
                            h("x-forwarded-host"),
                            h("x-request-id"),
                        );
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    BackendServer { addr, task }
}

/// The parsed answer of a backend.
fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("")
}

/// The test CA and leaf certificates it signs.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(ToString::to_string).collect::<Vec<_>>())
                .expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// The DER of the first certificate in PEM text.
fn der_of(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

fn tls_secret(name: &str, (cert, key): &(String, String)) -> String {
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(cert),
        indent(key)
    )
}

/// Writes a manifest file whole (a temp name the source ignores, then a rename), so the watcher
/// never reads half a file.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

const CLASS: &str = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: sluice}\nspec: {controller: sluice.dev/ingress}\n";

/// A Service without selector and its EndpointSlice with `addrs` (all on one port).
fn service_with_slice(name: &str, addrs: &[SocketAddr]) -> String {
    let port = addrs.first().map_or(80, |a| a.port());
    let endpoints: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{addresses: ['{}']}}", a.ip()))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// A Service with a selector and its Pod (the directory source derives the slice), named port.
fn service_with_pod(name: &str, addr: SocketAddr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{selector: {{app: {name}}}, ports: [{{name: web, port: 8080, targetPort: http}}]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-1, labels: {{app: {name}}}}}\n\
         spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {}}}]}}]}}\n\
         status: {{podIP: '{}', conditions: [{{type: Ready, status: 'True'}}]}}\n",
        addr.port(),
        addr.ip()
    )
}

/// The running controller; killed (its PID only) when dropped, panics included.
struct Ingress {
    child: Child,
    http: SocketAddr,
    https: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Drop for Ingress {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ingress {
    async fn start(dir: &Path) -> Ingress {
        // reqwest (even for plain HTTP) needs the process's rustls provider.
        install_provider();
        let local = |p| SocketAddr::from(([127, 0, 0, 1], p));
        let (http, https, metrics) = (local(free_port()), local(free_port()), local(free_port()));
        let log = dir.with_extension("log");
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-ingress"))
            .arg("--manifests")
            .arg(dir)
            .args(["--http-listen", &http.to_string()])
            .args(["--https-listen", &https.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--settle-ms", "50", "--threads", "1"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("sluice-ingress starts");
        let ingress = Ingress {
            child,
            http,
            https,
            metrics,
            log,
        };
        let client = reqwest::Client::new();
        let ready = format!("http://{metrics}/readyz");
        eventually("ready", || async {
            let ok = client
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            // The proxy listeners bind after the health port: wait for them too.
            ok && tokio::net::TcpStream::connect(http).await.is_ok()
                && tokio::net::TcpStream::connect(https).await.is_ok()
        })
        .await
        .unwrap_or_else(|| panic!("not ready; log:\n{}", ingress.log_text()));
        ingress
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client for the HTTPS port that resolves `hosts` to it and trusts only `ca`.
    fn https_client(&self, ca: &str, hosts: &[&str]) -> reqwest::Client {
        install_provider();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA"))
            .tls_info(true)
            .redirect(reqwest::redirect::Policy::none())
            // A new connection per request; certificate checks also take a new client, as a
            // resumed TLS session shows the certificate of the session it resumes.
            .pool_max_idle_per_host(0);
        for host in hosts {
            builder = builder.resolve(host, self.https);
        }
        builder.build().expect("client")
    }

    /// A plain HTTP request with `host`.
    async fn get(&self, host: &str, path: &str) -> (u16, String, reqwest::header::HeaderMap) {
        let resp = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client")
            .get(format!("http://{}{path}", self.http))
            .header("Host", host)
            .send()
            .await
            .expect("HTTP request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, resp.text().await.unwrap_or_default(), headers)
    }
}

/// Polls `check` until it holds (Some) or WAIT passes (None).
async fn eventually<F, Fut>(what: &str, mut check: F) -> Option<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check().await {
            return Some(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("gave up waiting for {what}");
    None
}

/// GET over HTTPS: (status, body, served certificate DER, HTTP version).
async fn get_tls(
    client: &reqwest::Client,
    https: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, String, Vec<u8>, reqwest::Version), reqwest::Error> {
    let resp = client
        .get(format!("https://{host}:{}{path}", https.port()))
        .send()
        .await?;
    let cert = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let status = resp.status().as_u16();
    let version = resp.version();
    Ok((status, resp.text().await?, cert, version))
}

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
        log.contains("event=\"connect_failed\"") && log.contains(&dead.to_string()),
        "the dead endpoint was tried and logged:\n{log}"
    );

    // Health on the metrics port.
    let health = reqwest::get(format!("http://{}/healthz", ingress.metrics))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
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

impl Ingress {
    fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
