//! Shared by the end-to-end tests: the real `sluice-ingress` binary as a child process on
//! 127.0.0.1 ports, a manifest directory in a temp dir, backends that are real HTTP servers on
//! 127.0.0.x saying who they are, and real clients (reqwest over rustls, verifying hostnames
//! against a test CA). No root needed.

// Each test binary uses a part of these.
#![allow(dead_code)]

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

pub const WAIT: Duration = Duration::from_secs(20);

pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A backend: answers every request with its name and what it received.
pub struct BackendServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a test backend speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1; a WebSocket upgrade request gets 101 and an echo of what follows.
    Plain,
    /// HTTP/1.1 over TLS (self-signed).
    Tls,
    /// HTTP/2 without TLS (h2c), as gRPC backends speak.
    H2c,
}

pub async fn backend(name: &'static str, ip: [u8; 4]) -> BackendServer {
    backend_with(name, ip, Mode::Plain).await
}

/// What a backend answers: who it is and what it received.
fn describe(name: &str, req: &Request<hyper::body::Incoming>) -> String {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let path = req.uri().path_and_query().map_or("", |p| p.as_str());
    format!(
        "backend={name}\npath={path}\nhost={}\nxff={}\nxfp={}\nxfh={}\nrid={}\nversion={:?}\n",
        h("host"),
        h("x-forwarded-for"),
        h("x-forwarded-proto"),
        h("x-forwarded-host"),
        h("x-request-id"),
        req.version(),
    )
}

async fn answer(
    name: &'static str,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = describe(name, &req);
    let upgrade = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if upgrade {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(upgraded) = on.await else { return };
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(
            "upgrade",
            hyper::header::HeaderValue::from_static("websocket"),
        );
        resp.headers_mut().insert(
            "connection",
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        return Ok(resp);
    }
    // `sleep=MS` in the query: answer that much later (a slow backend).
    let sleep = req
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("sleep=")?.parse::<u64>().ok());
    if let Some(ms) = sleep {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // Drain the body so its size can be told back.
    let received = http_body_util::BodyExt::collect(req.into_body())
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    Ok(Response::new(Full::new(Bytes::from(format!(
        "{body}received={received}\n"
    )))))
}

pub async fn backend_with(name: &'static str, ip: [u8; 4], mode: Mode) -> BackendServer {
    install_provider();
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("backend listens");
    let addr = listener.local_addr().expect("backend address");
    let acceptor = (mode == Mode::Tls).then(|| {
        let c = rcgen::generate_simple_self_signed(vec!["backend.internal".to_string()])
            .expect("backend certificate");
        let key = rustls::pki_types::PrivateKeyDer::try_from(c.signing_key.serialize_der())
            .expect("backend key");
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![c.cert.der().clone()], key)
            .expect("backend TLS config");
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    });
    let task = tokio::spawn(async move {
        // Connections live in this set: dropping the server (aborting this task) closes them
        // too, as a pod that goes away would.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Reap finished connections so the set does not grow with the test.
            while connections.try_join_next().is_some() {}
            let acceptor = acceptor.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(name, req));
                match (mode, acceptor) {
                    (Mode::Tls, Some(acceptor)) => {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                    }
                    (Mode::H2c, _) => {
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                    }
                    _ => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    }
                }
            });
        }
    });
    BackendServer { addr, task }
}

/// The parsed answer of a backend.
pub fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("")
}

/// The test CA and leaf certificates it signs.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new() -> Ca {
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
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
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
pub fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

pub fn tls_secret(name: &str, (cert, key): &(String, String)) -> String {
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
pub fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

pub const CLASS: &str = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: sluice}\nspec: {controller: sluice.dev/ingress}\n";

/// A Service without selector and its EndpointSlice with `addrs` (all on one port).
pub fn service_with_slice(name: &str, addrs: &[SocketAddr]) -> String {
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

/// A Service without selector and one EndpointSlice per endpoint (each with its own port, so
/// backends on different ports can serve one Service).
pub fn service_with_slices(name: &str, addrs: &[SocketAddr]) -> String {
    let mut yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"
    );
    for (n, addr) in addrs.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{n}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: ['{}']}}]\n",
            addr.port(),
            addr.ip()
        ));
    }
    yaml
}

/// An Ingress of class sluice: one host, one path of `path_type` to Service `svc` port 80.
pub fn ingress_yaml(
    name: &str,
    annotations: &str,
    host: &str,
    path_type: &str,
    path: &str,
    svc: &str,
) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\n\
         spec:\n  ingressClassName: sluice\n  rules:\n  - host: {host}\n    http: {{paths: [{{path: '{path}', pathType: {path_type}, \
         backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}]}}\n"
    )
}

/// A Service with a selector and its Pod (the directory source derives the slice), named port.
pub fn service_with_pod(name: &str, addr: SocketAddr) -> String {
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
pub struct Ingress {
    pub child: Child,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Drop for Ingress {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ingress {
    /// Starts on the manifest directory `dir` (its log next to it).
    pub async fn start(dir: &Path) -> Ingress {
        let source = [std::ffi::OsString::from("--manifests"), dir.into()];
        Ingress::start_with(&source, &dir.with_extension("log")).await
    }

    /// Starts with the source arguments `source`, logging to `log`.
    pub async fn start_with(source: &[std::ffi::OsString], log: &Path) -> Ingress {
        Ingress::start_opts(source, log, &[]).await
    }

    /// Starts on the manifest directory `dir` with `extra` flags (a `--settle-ms` there replaces
    /// the harness's).
    pub async fn start_dir_with(dir: &Path, extra: &[&str]) -> Ingress {
        let source = [std::ffi::OsString::from("--manifests"), dir.into()];
        Ingress::start_opts(&source, &dir.with_extension("log"), extra).await
    }

    /// Starts with the source arguments `source` and `extra` flags, logging to `log`.
    pub async fn start_opts(source: &[std::ffi::OsString], log: &Path, extra: &[&str]) -> Ingress {
        // reqwest (even for plain HTTP) needs the process's rustls provider.
        install_provider();
        let local = |p| SocketAddr::from(([127, 0, 0, 1], p));
        let (http, https, metrics) = (local(free_port()), local(free_port()), local(free_port()));
        let log = log.to_path_buf();
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-ingress"))
            .args(source)
            .args(["--http-listen", &http.to_string()])
            .args(["--https-listen", &https.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(if extra.contains(&"--settle-ms") {
                &[][..]
            } else {
                &["--settle-ms", "50"][..]
            })
            .args(["--threads", "1"])
            .args(extra)
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client for the HTTPS port that resolves `hosts` to it and trusts only `ca`.
    pub fn https_client(&self, ca: &str, hosts: &[&str]) -> reqwest::Client {
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
    pub async fn get(&self, host: &str, path: &str) -> (u16, String, reqwest::header::HeaderMap) {
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
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> Option<()>
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
pub async fn get_tls(
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

impl Ingress {
    pub fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
