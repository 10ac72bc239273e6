//! sluice-ingress against nginx (Debian's package) serving the same Ingress routes and
//! certificates, side by side in one run. Every host has its own certificate (ECDSA P-256,
//! signed by one bench CA), for both systems.
//!
//! - Traffic, with 1 and 1,000 hosts: keep-alive HTTP/1.1 and HTTP/2 over TLS driven by h2load
//!   (Debian's nghttp2-client), and a new TLS connection (full handshake) per request with the
//!   SNI spread over the hosts, driven by [`crate::tls_client`]. Rounds alternate which system
//!   goes first; ratios (Sluice ÷ nginx) are per round, then the median, min and max.
//! - Memory with 10,000 hosts and certificates: resident memory of each system (nginx: master
//!   and workers summed) idle and after one request to each of 100 hosts, next to the same with
//!   one host.
//!
//! Everything runs on 127.0.0.x.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::process_stats::{self, ProcessMemory};
use crate::progress::Progress;
use crate::stats::{Summary, median, summarize_us};
use crate::tls_client;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum System {
    Sluice,
    Nginx,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::Sluice => "sluice-ingress",
            System::Nginx => "nginx",
        }
    }
}

const SYSTEMS: [System; 2] = [System::Sluice, System::Nginx];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    Http1,
    Http2,
    /// One HTTP/1.1 request per new TLS connection.
    NewTls,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1 keep-alive, TLS",
            Protocol::Http2 => "HTTP/2, TLS",
            Protocol::NewTls => "new TLS connection per request",
        }
    }
}

/// What the scenario runs; [`Plan::steps`] is what it reports progress against.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Host counts for the traffic cases.
    pub hosts: Vec<usize>,
    pub rounds: usize,
    /// Measured seconds per system and round (after 1 s of warm-up).
    pub seconds: u64,
    /// Hosts (each with its certificate) for the memory case.
    pub memory_hosts: usize,
    /// Hosts that get one request each before the second memory reading.
    pub memory_requests: usize,
}

impl Plan {
    pub fn steps(&self) -> usize {
        // Certificates; per host count: start + 3 protocols; memory: 1 host, N hosts, requests.
        1 + self.hosts.len() * 4 + 3
    }
}

/// Requests in flight for keep-alive: 64 connections, or 8 with 8 streams each.
const H1_CONNECTIONS: usize = 64;
const H2_CONNECTIONS: usize = 8;
const H2_STREAMS: usize = 8;
/// New connections in flight: client threads, each connecting, requesting and closing.
const NEW_TLS_CONCURRENCY: usize = 32;
const WARM_UP: Duration = Duration::from_secs(1);
/// Both systems run with two workers: nginx processes, sluice-ingress threads.
const WORKERS: usize = 2;

/// Sluice ÷ nginx per round, and its median, min and max.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub by_round: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Ratio {
    fn of(sluice: &[f64], nginx: &[f64]) -> Ratio {
        let by_round: Vec<f64> = sluice.iter().zip(nginx).map(|(s, n)| s / n).collect();
        Ratio {
            median: median(&by_round),
            min: by_round.iter().copied().fold(f64::NAN, f64::min),
            max: by_round.iter().copied().fold(f64::NAN, f64::max),
            by_round,
        }
    }

    fn cell(&self) -> String {
        format!("{:.3} ({:.3}–{:.3})", self.median, self.min, self.max)
    }
}

/// One system's figures for one protocol and host count, over every round.
#[derive(Debug, Serialize)]
pub struct SystemResult {
    pub system: System,
    /// Per round; for new connections also handshakes per second.
    pub requests_per_second: Vec<f64>,
    /// Per round: the server's CPU time (all its threads and processes) per request.
    pub cpu_us_per_request: Vec<f64>,
    pub p99_us: Vec<f64>,
    /// Latency over the requests of every round (new connections: connect() to the answer).
    pub latency: Summary,
    /// New connections only: connect() to the TLS handshake done, every round.
    pub handshake: Option<Summary>,
    pub failed: u64,
    /// The first few failures, if any.
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Case {
    pub hosts: usize,
    pub protocol: Protocol,
    /// Connections (keep-alive) or client threads (new connections).
    pub connections: usize,
    pub streams_per_connection: usize,
    pub systems: Vec<SystemResult>,
    pub ratio_rps: Ratio,
    pub ratio_p99: Ratio,
    pub ratio_cpu: Ratio,
}

/// One system's resident memory at one point.
#[derive(Debug, Serialize)]
pub struct MemoryReading {
    pub system: System,
    pub memory: ProcessMemory,
}

#[derive(Debug, Serialize)]
pub struct MemoryCase {
    pub hosts: usize,
    /// "idle" or "after N requests".
    pub state: String,
    pub readings: Vec<MemoryReading>,
    /// Sluice ÷ nginx of VmRSS (summed over processes) and of PSS.
    pub ratio_rss: f64,
    pub ratio_pss: f64,
}

#[derive(Debug, Serialize)]
pub struct MemoryResult {
    pub hosts: usize,
    pub requests: usize,
    /// From spawning both together to each answering for the last host, µs.
    pub ready_us: Vec<(System, f64)>,
    pub cases: Vec<MemoryCase>,
}

#[derive(Debug, Serialize)]
pub struct IngressResult {
    pub rounds: usize,
    pub seconds_per_run: u64,
    pub nginx_version: String,
    pub h2load_version: String,
    /// Cargo profile of the sluice-ingress binary measured ("debug", "release", or the
    /// directory it came from when that is not a cargo profile directory).
    pub sluice_build: String,
    /// Cargo profile of the bench itself (the new-connection client and the backend).
    pub bench_build: &'static str,
    pub certificates: usize,
    pub certificate_key: &'static str,
    pub certificate_generation_us: f64,
    pub cases: Vec<Case>,
    pub memory: MemoryResult,
}

/// The cargo profile a binary under `target/<profile>/` was built with.
pub fn build_profile(bin: &Path) -> String {
    let dir = bin
        .parent()
        .and_then(Path::file_name)
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    match dir.as_str() {
        "debug" | "release" => dir,
        _ => format!("unknown (from {})", bin.parent().unwrap_or(bin).display()),
    }
}

/// The profile this bench was built with.
pub fn own_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// A child process stopped (by its PID) when dropped, panics included: SIGINT first (fast
/// shutdown for both: nginx's master takes its workers with it, where SIGKILL would orphan
/// them; Pingora skips its graceful drain), then SIGKILL after 5 s.
struct Guard(Child);

impl Guard {
    /// Spawns `cmd` so that it also gets SIGINT if the bench dies without dropping the guard
    /// (killed, or a signal): no nginx is left listening behind a dead bench.
    fn spawn(cmd: &mut Command, what: &str) -> Result<Guard> {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
        // death signal follows the spawning thread, and spawning happens on the main thread.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Guard(
            cmd.spawn().with_context(|| format!("starting {what}"))?,
        ))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child's PID, which we have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(ip: [u8; 4]) -> Result<u16> {
    Ok(TcpListener::bind(SocketAddr::from((ip, 0)))?
        .local_addr()?
        .port())
}

/// The backend both proxies forward to: HTTP/1.1 keep-alive, a fixed 2-byte answer, a thread
/// per connection (the proxies pool a few dozen). Runs until the process exits.
fn start_backend() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.61:0").context("backend listens")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
    Ok(addr)
}

fn serve(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Answer every complete request head in the buffer (GETs: no bodies).
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            if stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
                )
                .is_err()
            {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 1 << 20 {
            return;
        }
    }
}

fn host(i: usize) -> String {
    format!("h{i}.bench.example")
}

/// A host's own certificate (the leaf alone; the bench CA is not served).
pub struct HostCert {
    pub host: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub const CERT_KEY: &str = "ECDSA P-256";

/// One CA and a leaf certificate for each of `hosts` hosts (ECDSA P-256: fast to generate
/// with ring; RSA keys would take minutes, and ring cannot generate them). Two threads.
fn generate_certs(hosts: usize) -> Result<Vec<HostCert>> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sluice bench CA");
    let ca = rcgen::Issuer::new(ca_params, rcgen::KeyPair::generate()?);
    let leaf = |i: usize| -> Result<HostCert> {
        let host = host(i);
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![host.clone()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host.as_str());
        let cert = params.signed_by(&key, &ca)?;
        Ok(HostCert {
            host,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    };
    let half = hosts / 2;
    std::thread::scope(|s| {
        let first = s.spawn(|| (0..half).map(leaf).collect::<Result<Vec<_>>>());
        let mut certs = first
            .join()
            .map_err(|_| anyhow::anyhow!("certificate thread panicked"))
            .and_then(|r| r)?;
        let second = (half..hosts).map(leaf).collect::<Result<Vec<_>>>()?;
        certs.extend(second);
        Ok(certs)
    })
}

/// The manifests: one TLS Secret and one Ingress per host, one Service with the backend as
/// its endpoint.
fn write_manifests(dir: &Path, certs: &[HostCert], backend: SocketAddr) -> Result<()> {
    use std::fmt::Write as _;
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let mut yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {{name: sluice}}\nspec: {{controller: sluice.dev/ingress}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: backend}}\nspec: {{ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: backend-1, labels: {{kubernetes.io/service-name: backend}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{{addresses: ['{ip}']}}]\n",
        port = backend.port(),
        ip = backend.ip(),
    );
    for (i, c) in certs.iter().enumerate() {
        let h = &c.host;
        write!(
            yaml,
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: tls-{i}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}\
             ---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i{i}}}\nspec:\n  ingressClassName: sluice\n  \
             tls: [{{hosts: [{h}], secretName: tls-{i}}}]\n  rules: [{{host: {h}, http: {{paths: [{{path: /, pathType: Prefix, \
             backend: {{service: {{name: backend, port: {{number: 80}}}}}}}}]}}}}]\n",
            indent(&c.cert_pem),
            indent(&c.key_pem),
        )?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bench.yaml"), yaml)?;
    Ok(())
}

/// nginx for the same routes: one server block per host with its certificate, a keep-alive
/// pool to the backend, the headers ingress-nginx sets, an access log as Sluice writes one.
fn write_nginx_conf(
    dir: &Path,
    certs: &[HostCert],
    listen: SocketAddr,
    backend: SocketAddr,
) -> Result<PathBuf> {
    use std::fmt::Write as _;
    let d = dir.display();
    std::fs::create_dir_all(dir.join("certs"))?;
    // Big enough for 10,000 names (nginx refuses to start when the hash cannot be built).
    let hash_max = (certs.len() * 2).next_power_of_two().max(4096);
    let mut conf = format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes {WORKERS};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         keepalive_requests 100000;\n  server_names_hash_bucket_size 128;\n  server_names_hash_max_size {hash_max};\n  \
         ssl_protocols TLSv1.2 TLSv1.3;\n  \
         upstream backend {{ server {backend}; keepalive 128; }}\n"
    );
    for (i, c) in certs.iter().enumerate() {
        let (crt, key) = (
            dir.join(format!("certs/{i}.crt")),
            dir.join(format!("certs/{i}.key")),
        );
        std::fs::write(&crt, &c.cert_pem)?;
        std::fs::write(&key, &c.key_pem)?;
        write!(
            conf,
            "  server {{\n    listen {listen} ssl http2;\n    server_name {};\n    ssl_certificate {};\n    \
             ssl_certificate_key {};\n    location / {{\n      proxy_pass http://backend;\n      \
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_set_header X-Real-IP $remote_addr;\n      \
             proxy_set_header X-Forwarded-Proto https;\n      proxy_set_header X-Forwarded-Host $host;\n      \
             proxy_set_header X-Request-ID $request_id;\n    }}\n  }}\n",
            c.host,
            crt.display(),
            key.display(),
        )?;
    }
    conf.push_str("}\n");
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// Both systems serving the same hosts, started together; stopped, and their directory
/// removed, when dropped (the field order is the drop order: processes first).
struct Pair {
    sluice: Guard,
    nginx: Guard,
    sluice_listen: SocketAddr,
    nginx_listen: SocketAddr,
    /// From spawning both to each answering for the last host.
    ready: [Duration; 2],
    hosts: Vec<String>,
    root: tempfile::TempDir,
}

impl Pair {
    fn start(sluice_bin: &Path, certs: &[HostCert], backend: SocketAddr) -> Result<Pair> {
        let root = tempfile::Builder::new()
            .prefix("sluice-bench-ingress-")
            .tempdir()?;
        let dir = root.path();
        write_manifests(&dir.join("manifests"), certs, backend)?;
        let ip = [127, 0, 0, 1];
        let sluice_listen = SocketAddr::from((ip, free_port(ip)?));
        let nginx_listen = SocketAddr::from((ip, free_port(ip)?));
        let nginx_dir = dir.join("nginx");
        let conf = write_nginx_conf(&nginx_dir, certs, nginx_listen, backend)?;

        let log = std::fs::File::create(dir.join("sluice.log"))?;
        let started = Instant::now();
        let sluice = Guard::spawn(
            Command::new(sluice_bin)
                .arg("--manifests")
                .arg(dir.join("manifests"))
                .args([
                    "--http-listen",
                    &SocketAddr::from((ip, free_port(ip)?)).to_string(),
                ])
                .args(["--https-listen", &sluice_listen.to_string()])
                .args([
                    "--metrics-listen",
                    &SocketAddr::from((ip, free_port(ip)?)).to_string(),
                ])
                .args(["--threads", &WORKERS.to_string()])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log),
            "sluice-ingress",
        )?;
        let nginx = Guard::spawn(
            Command::new("nginx")
                .arg("-p")
                .arg(&nginx_dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(nginx_dir.join("error.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "nginx",
        )?;
        let mut pair = Pair {
            sluice,
            nginx,
            sluice_listen,
            nginx_listen,
            ready: [Duration::ZERO; 2],
            hosts: certs.iter().map(|c| c.host.clone()).collect(),
            root,
        };
        pair.wait_ready(started)?;
        Ok(pair)
    }

    fn listen(&self, system: System) -> SocketAddr {
        match system {
            System::Sluice => self.sluice_listen,
            System::Nginx => self.nginx_listen,
        }
    }

    fn pid(&self, system: System) -> u32 {
        match system {
            System::Sluice => self.sluice.pid(),
            System::Nginx => self.nginx.pid(),
        }
    }

    /// Polls both until each answers 200 for the last host with that host's certificate (the
    /// last one written: loaded last, if anything). 3 minutes at most: nginx takes a while to
    /// load 10,000 certificates.
    fn wait_ready(&mut self, started: Instant) -> Result<()> {
        let config = tls_client::config()?;
        let last = self.hosts.last().context("no hosts")?.clone();
        let deadline = started + Duration::from_secs(180);
        let mut ready = [None; 2];
        while ready.iter().any(Option::is_none) {
            for (i, system) in SYSTEMS.into_iter().enumerate() {
                if ready[i].is_none()
                    && tls_client::request(&config, self.listen(system), &last).is_ok()
                {
                    ready[i] = Some(started.elapsed());
                }
            }
            if Instant::now() > deadline {
                let logs = format!(
                    "sluice-ingress log (tail):\n{}\nnginx error.log:\n{}",
                    tail(&self.root.path().join("sluice.log")),
                    tail(&self.root.path().join("nginx/error.log")),
                );
                bail!(
                    "not answering for {last} after 180 s: {}\n{logs}",
                    SYSTEMS
                        .iter()
                        .zip(ready)
                        .filter(|(_, r)| r.is_none())
                        .map(|(s, _)| s.label())
                        .collect::<Vec<_>>()
                        .join(" and ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.ready = ready.map(Option::unwrap_or_default);
        Ok(())
    }

    fn memory(&self, system: System) -> Result<ProcessMemory> {
        process_stats::of_tree(self.pid(system))
            .with_context(|| format!("memory of {}", system.label()))
    }
}

/// "1 host", "1000 hosts".
fn hosts_text(n: usize) -> String {
    if n == 1 {
        "1 host".into()
    } else {
        format!("{n} hosts")
    }
}

/// A latency for the report: µs below 10 ms, else ms.
fn latency_text(us: f64) -> String {
    if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// The last 20 lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One system's run: requests per second, latency of every request, failures.
struct Run {
    rps: f64,
    /// The server's CPU time (user + system, all its processes) per request in the window.
    cpu_us_per_request: f64,
    latencies_us: Vec<f64>,
    /// New connections only.
    handshake_us: Vec<f64>,
    failed: u64,
    errors: Vec<String>,
}

/// h2load for `seconds` after its warm-up, with `(connections, streams per connection)` in
/// flight; `mark` is called as the measured window opens and closes.
fn h2load(
    listen: SocketAddr,
    host: &str,
    protocol: Protocol,
    (connections, streams): (usize, usize),
    seconds: u64,
    log: &Path,
    mark: &mut dyn FnMut(),
) -> Result<Run> {
    let mut cmd = Command::new("h2load");
    if protocol == Protocol::Http1 {
        cmd.arg("--h1");
    }
    let out = cmd
        .args([
            "-t",
            "1",
            "-c",
            &connections.to_string(),
            "-m",
            &streams.to_string(),
        ])
        .args(["-D", &seconds.to_string()])
        .args(["--warm-up-time", &WARM_UP.as_secs().to_string()])
        .args(["--connect-to", &listen.to_string()])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("https://{host}:{}/", listen.port()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running h2load (Debian package nghttp2-client)")?;
    // The measured window opens after h2load's warm-up and closes as it exits (to within
    // the few ms it takes to start and to stop).
    std::thread::sleep(WARM_UP);
    mark();
    let out = out.wait_with_output().context("waiting for h2load")?;
    mark();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "h2load failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wanted = match protocol {
        Protocol::Http1 => "Application protocol: http/1.1",
        Protocol::Http2 => "Application protocol: h2",
        Protocol::NewTls => bail!("new connections are the bench's own client, not h2load"),
    };
    if !text.contains(wanted) {
        bail!("h2load did not negotiate {wanted}: {text}");
    }
    // "finished in 5.00s, 12345.67 req/s, ..."
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.parse::<f64>().ok())
        .with_context(|| format!("no req/s in h2load's output: {text}"))?;
    // "requests: N total, N started, N done, N succeeded, F failed, E errored, T timeout"
    let counts = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_default();
    let count = |what: &str| -> u64 {
        counts
            .split(", ")
            .find_map(|p| p.trim_start_matches("requests: ").strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let failed = count(" failed") + count(" errored") + count(" timeout");
    // The log: start (µs since the epoch), status, duration (µs), tab-separated.
    let mut latencies_us = Vec::new();
    let mut bad_status = 0;
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let mut cols = line.split('\t');
        let (_, status, dur) = (cols.next(), cols.next(), cols.next());
        if status != Some("200") {
            bad_status += 1;
        }
        if let Some(d) = dur.and_then(|d| d.trim().parse::<f64>().ok()) {
            latencies_us.push(d);
        }
    }
    Ok(Run {
        rps,
        cpu_us_per_request: f64::NAN,
        latencies_us,
        handshake_us: Vec::new(),
        failed: failed + bad_status,
        errors: Vec::new(),
    })
}

fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

fn h2load_version() -> String {
    Command::new("h2load")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs the plan: traffic cases for every host count, then memory.
pub fn run(bins: &Path, plan: &Plan, progress: &mut Progress) -> Result<IngressResult> {
    let sluice_bin = bins.join("sluice-ingress");
    if !sluice_bin.exists() {
        bail!(
            "{} missing: build it with `cargo build -p sluice-ingress` (same profile as the bench)",
            sluice_bin.display()
        );
    }
    for tool in ["nginx", "h2load"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            bail!("{tool} not found: apt-get install nginx nghttp2-client");
        }
    }
    let backend = start_backend()?;
    let most = plan
        .hosts
        .iter()
        .copied()
        .chain([plan.memory_hosts])
        .max()
        .unwrap_or(1);
    progress.step(format!(
        "generating a CA and {most} host certificates ({CERT_KEY})"
    ));
    let started = Instant::now();
    let certs = generate_certs(most)?;
    let certificate_generation = started.elapsed();

    let mut cases = Vec::new();
    for &hosts in &plan.hosts {
        progress.step(format!(
            "{}: starting both, waiting for the last host",
            hosts_text(hosts)
        ));
        let pair = Pair::start(&sluice_bin, &certs[..hosts], backend)?;
        for protocol in [Protocol::Http1, Protocol::Http2, Protocol::NewTls] {
            progress.step(format!(
                "{}, {}: {} round(s) × 2 systems × {} s",
                hosts_text(hosts),
                protocol.label(),
                plan.rounds,
                plan.seconds + WARM_UP.as_secs()
            ));
            cases.push(traffic(&pair, protocol, plan)?);
        }
    }
    let memory = memory(&sluice_bin, &certs, backend, plan, progress)?;
    Ok(IngressResult {
        rounds: plan.rounds,
        seconds_per_run: plan.seconds,
        nginx_version: nginx_version(),
        h2load_version: h2load_version(),
        sluice_build: build_profile(&sluice_bin),
        bench_build: own_profile(),
        certificates: most,
        certificate_key: CERT_KEY,
        certificate_generation_us: crate::stats::micros(certificate_generation),
        cases,
        memory,
    })
}

/// One protocol against both systems of `pair`, in rounds alternating which goes first.
fn traffic(pair: &Pair, protocol: Protocol, plan: &Plan) -> Result<Case> {
    let hosts = pair.hosts.len();
    // Keep-alive goes to one host (h2load sends one authority per run): the last, the one
    // written last; new connections go round-robin over all of them.
    let target = pair.hosts.last().context("no hosts")?;
    let (connections, streams) = match protocol {
        Protocol::Http1 => (H1_CONNECTIONS, 1),
        Protocol::Http2 => (H2_CONNECTIONS, H2_STREAMS),
        Protocol::NewTls => (NEW_TLS_CONCURRENCY, 1),
    };
    let config = tls_client::config()?;
    let logs = tempfile::tempdir()?;
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 0..plan.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let listen = pair.listen(SYSTEMS[i]);
            let pid = pair.pid(SYSTEMS[i]);
            let mut cpu = Vec::with_capacity(2);
            let mut mark = || cpu.push(process_stats::cpu_us_of_tree(pid));
            let mut run = match protocol {
                Protocol::Http1 | Protocol::Http2 => h2load(
                    listen,
                    target,
                    protocol,
                    (connections, streams),
                    plan.seconds,
                    &logs.path().join(format!("h2load-{i}-{round}.log")),
                    &mut mark,
                )?,
                Protocol::NewTls => {
                    let r = tls_client::load(
                        &config,
                        listen,
                        &pair.hosts,
                        connections,
                        WARM_UP,
                        Duration::from_secs(plan.seconds),
                        &mut mark,
                    );
                    Run {
                        rps: r.per_second,
                        cpu_us_per_request: f64::NAN,
                        latencies_us: r.total_us,
                        handshake_us: r.handshake_us,
                        failed: r.failed,
                        errors: r.errors,
                    }
                }
            };
            let [before, after] = <[Result<f64>; 2]>::try_from(cpu)
                .map_err(|_| anyhow::anyhow!("the measured window was not marked twice"))?;
            let requests = run.rps * plan.seconds as f64;
            run.cpu_us_per_request = (after? - before?) / requests;
            runs[i].push(run);
        }
    }
    let p99 = |r: &Run| summarize_us(&r.latencies_us).p99_us;
    let rps = |i: usize| runs[i].iter().map(|r| r.rps).collect::<Vec<_>>();
    let p99s = |i: usize| runs[i].iter().map(p99).collect::<Vec<_>>();
    let cpus = |i: usize| {
        runs[i]
            .iter()
            .map(|r| r.cpu_us_per_request)
            .collect::<Vec<_>>()
    };
    let systems = SYSTEMS
        .into_iter()
        .zip(&runs)
        .map(|(system, runs)| {
            let all = |f: fn(&Run) -> &Vec<f64>| {
                runs.iter()
                    .flat_map(|r| f(r).iter().copied())
                    .collect::<Vec<_>>()
            };
            SystemResult {
                system,
                requests_per_second: runs.iter().map(|r| r.rps).collect(),
                cpu_us_per_request: runs.iter().map(|r| r.cpu_us_per_request).collect(),
                p99_us: runs.iter().map(p99).collect(),
                latency: summarize_us(&all(|r| &r.latencies_us)),
                handshake: (protocol == Protocol::NewTls)
                    .then(|| summarize_us(&all(|r| &r.handshake_us))),
                failed: runs.iter().map(|r| r.failed).sum(),
                errors: runs
                    .iter()
                    .flat_map(|r| r.errors.iter().cloned())
                    .take(5)
                    .collect(),
            }
        })
        .collect();
    Ok(Case {
        hosts,
        protocol,
        connections,
        streams_per_connection: streams,
        systems,
        ratio_rps: Ratio::of(&rps(0), &rps(1)),
        ratio_p99: Ratio::of(&p99s(0), &p99s(1)),
        ratio_cpu: Ratio::of(&cpus(0), &cpus(1)),
    })
}

/// Resident memory with one host, then with `plan.memory_hosts` hosts idle and after one new
/// connection and request to each of `plan.memory_requests` hosts spread over them.
fn memory(
    sluice_bin: &Path,
    certs: &[HostCert],
    backend: SocketAddr,
    plan: &Plan,
    progress: &mut Progress,
) -> Result<MemoryResult> {
    // Settles what start-up left (allocator, threads) before reading.
    const SETTLE: Duration = Duration::from_secs(2);
    let read = |pair: &Pair, hosts: usize, state: &str| -> Result<MemoryCase> {
        let readings = SYSTEMS
            .into_iter()
            .map(|system| {
                Ok(MemoryReading {
                    system,
                    memory: pair.memory(system)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (s, n) = (&readings[0].memory, &readings[1].memory);
        Ok(MemoryCase {
            hosts,
            state: state.to_string(),
            ratio_rss: s.vm_rss_kib as f64 / n.vm_rss_kib as f64,
            ratio_pss: s.pss_kib as f64 / n.pss_kib as f64,
            readings,
        })
    };
    let mut cases = Vec::new();
    progress.step("memory: both with 1 host, idle");
    {
        let pair = Pair::start(sluice_bin, &certs[..1], backend)?;
        std::thread::sleep(SETTLE);
        cases.push(read(&pair, 1, "idle")?);
    }
    let hosts = plan.memory_hosts;
    progress.step(format!(
        "memory: both with {hosts} hosts and certificates, loading, idle"
    ));
    let pair = Pair::start(sluice_bin, &certs[..hosts], backend)?;
    std::thread::sleep(SETTLE);
    cases.push(read(&pair, hosts, "idle")?);
    let requests = plan.memory_requests.min(hosts);
    progress.step(format!(
        "memory: one request to each of {requests} of the {hosts} hosts"
    ));
    let config = tls_client::config()?;
    for system in SYSTEMS {
        for k in 0..requests {
            let host = &pair.hosts[k * hosts / requests];
            tls_client::request(&config, pair.listen(system), host)
                .with_context(|| format!("{} for {host}", system.label()))?;
        }
    }
    std::thread::sleep(SETTLE);
    cases.push(read(
        &pair,
        hosts,
        &format!("after 1 request to each of {requests} hosts"),
    )?);
    Ok(MemoryResult {
        hosts,
        requests,
        ready_us: SYSTEMS
            .into_iter()
            .zip(pair.ready)
            .map(|(s, d)| (s, crate::stats::micros(d)))
            .collect(),
        cases,
    })
}

/// The report section.
pub fn report(out: &mut String, r: &IngressResult) {
    out.push_str(&format!(
        "\n## Ingress: sluice-ingress against nginx, same routes and certificates\n\n\
         Builds: sluice-ingress **{}**, sluice-bench (the new-connection client and the backend) {}; \
         {}, {WORKERS} worker processes; sluice-ingress {WORKERS} threads. Every host has its own \
         certificate ({}, signed by one CA; {} generated in {:.1} s), the same files for both. \
         Keep-alive: h2load ({}) on 127.0.0.1, one client thread, 64 requests in flight \
         (HTTP/1.1: {H1_CONNECTIONS} connections; HTTP/2: {H2_CONNECTIONS} connections × \
         {H2_STREAMS} streams) to the last host. New connections: {NEW_TLS_CONCURRENCY} client \
         threads, each opening a TCP connection, doing a full TLS handshake (no resumption) with \
         the next host as SNI (round-robin over all hosts), one HTTP/1.1 GET with `Connection: \
         close`, and closing; so req/s is also handshakes/s, and latency is connect() to the \
         answer read. {} s per run after 1 s of warm-up, {} round(s) alternating which system goes \
         first; one keep-alive backend. \"CPU/req\" is the server's CPU time (user + system, all \
         its threads and processes, from `/proc/PID/stat`) over the measured window ÷ requests \
         answered in it: what a request costs the server, whatever else the machine is doing. \
         Ratios are Sluice ÷ nginx per round: median (min–max) over rounds.\n\n\
         | hosts | protocol | system | req/s (median) | p50 | p99 (median) | handshake p50 | CPU/req (median) | failed | req/s ÷ nginx | p99 ÷ nginx | CPU/req ÷ nginx |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.sluice_build,
        r.bench_build,
        r.nginx_version,
        r.certificate_key,
        r.certificates,
        r.certificate_generation_us / 1e6,
        r.h2load_version,
        r.seconds_per_run,
        r.rounds,
    ));
    for case in &r.cases {
        for s in &case.systems {
            let (ratio_rps, ratio_p99, ratio_cpu) = if s.system == System::Sluice {
                (
                    case.ratio_rps.cell(),
                    case.ratio_p99.cell(),
                    case.ratio_cpu.cell(),
                )
            } else {
                Default::default()
            };
            out.push_str(&format!(
                "| {} | {} | {} | {:.0} | {} | {} | {} | {:.0} µs | {} | {ratio_rps} | {ratio_p99} | {ratio_cpu} |\n",
                case.hosts,
                case.protocol.label(),
                s.system.label(),
                median(&s.requests_per_second),
                latency_text(s.latency.p50_us),
                latency_text(median(&s.p99_us)),
                s.handshake
                    .as_ref()
                    .map_or("–".to_string(), |h| latency_text(h.p50_us)),
                median(&s.cpu_us_per_request),
                s.failed,
            ));
        }
    }
    let errors: Vec<String> = r
        .cases
        .iter()
        .flat_map(|c| {
            c.systems.iter().flat_map(move |s| {
                s.errors.iter().map(move |e| {
                    format!(
                        "- {} hosts, {}, {}: {e}",
                        c.hosts,
                        c.protocol.label(),
                        s.system.label()
                    )
                })
            })
        })
        .collect();
    if !errors.is_empty() {
        out.push_str(&format!("\nFirst failures:\n\n{}\n", errors.join("\n")));
    }

    let m = &r.memory;
    let mib = |kib: u64| kib as f64 / 1024.0;
    out.push_str(&format!(
        "\n### Memory with {} hosts, each with its own certificate\n\n\
         Both started together on the same hosts and certificates; read 2 s after each answered for \
         the last host (sluice-ingress after {:.1} s, nginx after {:.1} s), then again after one new \
         TLS connection and request to each of {} hosts spread over all. From `/proc/PID/status` and \
         `/proc/PID/smaps_rollup`, summed over the process and its children (nginx: master and \
         {WORKERS} workers): VmRSS counts pages shared between nginx's processes once per process, \
         PSS divides them among the sharers; VmHWM is the sum of each process's peak. MiB; ratios \
         Sluice ÷ nginx.\n\n\
         | hosts | state | system | processes | VmRSS | PSS | VmHWM | VmRSS ÷ nginx | PSS ÷ nginx |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|\n",
        m.hosts,
        m.ready_us.first().map_or(f64::NAN, |r| r.1 / 1e6),
        m.ready_us.get(1).map_or(f64::NAN, |r| r.1 / 1e6),
        m.requests,
    ));
    for case in &m.cases {
        for reading in &case.readings {
            let (ratio_rss, ratio_pss) = if reading.system == System::Sluice {
                (
                    format!("{:.2}", case.ratio_rss),
                    format!("{:.2}", case.ratio_pss),
                )
            } else {
                (String::new(), String::new())
            };
            let p = &reading.memory;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {ratio_rss} | {ratio_pss} |\n",
                case.hosts,
                case.state,
                reading.system.label(),
                p.processes,
                mib(p.vm_rss_kib),
                mib(p.pss_kib),
                mib(p.vm_hwm_kib),
            ));
        }
    }
}
