//! sluice-ingress against nginx (Debian's package) serving the same Ingress routes and
//! certificate, side by side in one run: keep-alive HTTP/1.1 and HTTP/2 over TLS, with 1 and
//! 1,000 hosts, driven by h2load (Debian's nghttp2-client). Rounds alternate which system goes
//! first; ratios (Sluice ÷ nginx) are per round, then the median. Everything runs on 127.0.0.x.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::stats::{Summary, median, summarize_us};

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1 keep-alive, TLS",
            Protocol::Http2 => "HTTP/2, TLS",
        }
    }
}

/// One system's figures for one protocol and host count, over every round.
#[derive(Debug, Serialize)]
pub struct SystemResult {
    pub system: System,
    pub requests_per_second: Vec<f64>,
    pub p99_us: Vec<f64>,
    /// Latency over the requests of every round.
    pub latency: Summary,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct Case {
    pub hosts: usize,
    pub protocol: Protocol,
    pub connections: usize,
    pub streams_per_connection: usize,
    pub systems: Vec<SystemResult>,
    /// Sluice ÷ nginx per round, median over rounds.
    pub ratio_rps_median: f64,
    pub ratio_p99_median: f64,
}

#[derive(Debug, Serialize)]
pub struct IngressResult {
    pub rounds: usize,
    pub seconds_per_run: u64,
    pub nginx_version: String,
    pub h2load_version: String,
    pub sluice_build: &'static str,
    pub cases: Vec<Case>,
}

/// A child process stopped (by its PID) when dropped, panics included: SIGTERM first, so nginx's
/// master takes its workers with it (SIGKILL would orphan them), then SIGKILL after 5 s.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child's PID, which we have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
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

/// The manifests: one Ingress per host (TLS by one wildcard Secret), one Service with the
/// backend as its endpoint.
fn write_manifests(
    dir: &Path,
    hosts: usize,
    backend: SocketAddr,
    cert: &str,
    key: &str,
) -> Result<()> {
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let mut yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {{name: sluice}}\nspec: {{controller: sluice.dev/ingress}}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: bench-tls}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: backend}}\nspec: {{ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: backend-1, labels: {{kubernetes.io/service-name: backend}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{{addresses: ['{ip}']}}]\n",
        indent(cert),
        indent(key),
        port = backend.port(),
        ip = backend.ip(),
    );
    for i in 0..hosts {
        let h = host(i);
        yaml.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i{i}}}\nspec:\n  ingressClassName: sluice\n  \
             tls: [{{hosts: [{h}], secretName: bench-tls}}]\n  rules: [{{host: {h}, http: {{paths: [{{path: /, pathType: Prefix, \
             backend: {{service: {{name: backend, port: {{number: 80}}}}}}}}]}}}}]\n"
        ));
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bench.yaml"), yaml)?;
    Ok(())
}

/// nginx for the same routes: one server block per host, same certificate, a keep-alive pool to
/// the backend, the headers ingress-nginx sets, an access log as Sluice writes one.
fn write_nginx_conf(
    dir: &Path,
    hosts: usize,
    listen: SocketAddr,
    backend: SocketAddr,
) -> Result<PathBuf> {
    let d = dir.display();
    let mut conf = format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         keepalive_requests 100000;\n  server_names_hash_bucket_size 128;\n  server_names_hash_max_size 4096;\n  \
         ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_certificate {d}/tls.crt;\n  ssl_certificate_key {d}/tls.key;\n  \
         upstream backend {{ server {backend}; keepalive 128; }}\n"
    );
    for i in 0..hosts {
        conf.push_str(&format!(
            "  server {{\n    listen {listen} ssl http2;\n    server_name {};\n    location / {{\n      proxy_pass http://backend;\n      \
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_set_header X-Real-IP $remote_addr;\n      \
             proxy_set_header X-Forwarded-Proto https;\n      proxy_set_header X-Forwarded-Host $host;\n      \
             proxy_set_header X-Request-ID $request_id;\n    }}\n  }}\n",
            host(i)
        ));
    }
    conf.push_str("}\n");
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} not ready after 60 s")
}

/// Whether a GET through `listen` for `host` answers 200 (one quick h2load request).
fn answers(listen: SocketAddr, host: &str) -> bool {
    Command::new("h2load")
        .args(["-n", "1", "-c", "1", "--connect-to", &listen.to_string()])
        .arg(format!("https://{host}:{}/", listen.port()))
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("1 succeeded"))
}

struct Run {
    rps: f64,
    latencies_us: Vec<f64>,
    failed: u64,
}

fn h2load(
    listen: SocketAddr,
    host: &str,
    protocol: Protocol,
    connections: usize,
    streams: usize,
    seconds: u64,
    log: &Path,
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
        .args(["-D", &seconds.to_string(), "--warm-up-time", "1"])
        .args(["--connect-to", &listen.to_string()])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("https://{host}:{}/", listen.port()))
        .output()
        .context("running h2load (Debian package nghttp2-client)")?;
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
        latencies_us,
        failed: failed + bad_status,
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

/// `hosts_counts` host sets, each with both protocols, `rounds` alternating rounds of
/// `seconds` per system.
pub fn run(
    bins: &Path,
    hosts_counts: &[usize],
    rounds: usize,
    seconds: u64,
) -> Result<IngressResult> {
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
    let cert = rcgen::generate_simple_self_signed(vec!["*.bench.example".to_string()])
        .context("certificate")?;
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let mut cases = Vec::new();
    for &hosts in hosts_counts {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path();
        write_manifests(&root.join("manifests"), hosts, backend, &cert_pem, &key_pem)?;
        let nginx_dir = root.join("nginx");
        std::fs::create_dir_all(&nginx_dir)?;
        std::fs::write(nginx_dir.join("tls.crt"), &cert_pem)?;
        std::fs::write(nginx_dir.join("tls.key"), &key_pem)?;
        let ip = [127, 0, 0, 1];
        let sluice_listen = SocketAddr::from((ip, free_port(ip)?));
        let nginx_listen = SocketAddr::from((ip, free_port(ip)?));
        let conf = write_nginx_conf(&nginx_dir, hosts, nginx_listen, backend)?;

        let log = std::fs::File::create(root.join("sluice.log"))?;
        let _sluice = Guard(
            Command::new(&sluice_bin)
                .arg("--manifests")
                .arg(root.join("manifests"))
                .args([
                    "--http-listen",
                    &SocketAddr::from((ip, free_port(ip)?)).to_string(),
                ])
                .args(["--https-listen", &sluice_listen.to_string()])
                .args([
                    "--metrics-listen",
                    &SocketAddr::from((ip, free_port(ip)?)).to_string(),
                ])
                .args(["--threads", "2"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting sluice-ingress")?,
        );
        let _nginx = Guard(
            Command::new("nginx")
                .arg("-p")
                .arg(&nginx_dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(nginx_dir.join("error.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting nginx")?,
        );
        // The last host: the one the route table holds longest to look up, if anything.
        let target = host(hosts - 1);
        wait_for("sluice-ingress", || answers(sluice_listen, &target))?;
        wait_for("nginx", || answers(nginx_listen, &target)).with_context(|| {
            std::fs::read_to_string(nginx_dir.join("error.log")).unwrap_or_default()
        })?;

        for protocol in [Protocol::Http1, Protocol::Http2] {
            // 64 requests in flight either way: 64 connections, or 8 with 8 streams each.
            let (connections, streams) = match protocol {
                Protocol::Http1 => (64, 1),
                Protocol::Http2 => (8, 8),
            };
            eprintln!(
                "ingress: {hosts} hosts, {}, {rounds} rounds…",
                protocol.label()
            );
            let mut per = [
                (System::Sluice, sluice_listen),
                (System::Nginx, nginx_listen),
            ]
            .map(|(system, listen)| (system, listen, Vec::<Run>::new()));
            for round in 0..rounds {
                let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    let (_, listen, runs) = &mut per[i];
                    let log = root.join(format!("h2load-{i}-{round}.log"));
                    runs.push(h2load(
                        *listen,
                        &target,
                        protocol,
                        connections,
                        streams,
                        seconds,
                        &log,
                    )?);
                }
            }
            let p99 = |r: &Run| summarize_us(&r.latencies_us).p99_us;
            let ratios_rps: Vec<f64> = per[0]
                .2
                .iter()
                .zip(&per[1].2)
                .map(|(s, n)| s.rps / n.rps)
                .collect();
            let ratios_p99: Vec<f64> = per[0]
                .2
                .iter()
                .zip(&per[1].2)
                .map(|(s, n)| p99(s) / p99(n))
                .collect();
            let systems = per
                .iter()
                .map(|(system, _, runs)| SystemResult {
                    system: *system,
                    requests_per_second: runs.iter().map(|r| r.rps).collect(),
                    p99_us: runs.iter().map(p99).collect(),
                    latency: summarize_us(
                        &runs
                            .iter()
                            .flat_map(|r| r.latencies_us.iter().copied())
                            .collect::<Vec<_>>(),
                    ),
                    failed: runs.iter().map(|r| r.failed).sum(),
                })
                .collect();
            cases.push(Case {
                hosts,
                protocol,
                connections,
                streams_per_connection: streams,
                systems,
                ratio_rps_median: median(&ratios_rps),
                ratio_p99_median: median(&ratios_p99),
            });
        }
    }
    Ok(IngressResult {
        rounds,
        seconds_per_run: seconds,
        nginx_version: nginx_version(),
        h2load_version: h2load_version(),
        sluice_build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        cases,
    })
}

/// The report section.
pub fn report(out: &mut String, r: &IngressResult) {
    out.push_str(&format!(
        "\n## Ingress: sluice-ingress against nginx, same routes and certificate\n\n\
         h2load ({}) on 127.0.0.1, one client thread, 64 requests in flight (HTTP/1.1: 64 keep-alive \
         connections; HTTP/2: 8 connections × 8 streams), {} s per run after 1 s of warm-up, {} rounds \
         alternating which system goes first; one keep-alive backend. {}, 2 worker processes; \
         sluice-ingress ({} build), 2 threads. Ratios are Sluice ÷ nginx per round, median over rounds.\n\n\
         | hosts | protocol | system | req/s (median) | p50 | p99 (median) | failed | req/s ÷ nginx | p99 ÷ nginx |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|\n",
        r.h2load_version,
        r.seconds_per_run,
        r.rounds,
        r.nginx_version,
        r.sluice_build,
    ));
    for case in &r.cases {
        for s in &case.systems {
            let (ratio_rps, ratio_p99) = if s.system == System::Sluice {
                (
                    format!("{:.3}", case.ratio_rps_median),
                    format!("{:.3}", case.ratio_p99_median),
                )
            } else {
                (String::new(), String::new())
            };
            out.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs | {} | {ratio_rps} | {ratio_p99} |\n",
                case.hosts,
                case.protocol.label(),
                s.system.label(),
                median(&s.requests_per_second),
                s.latency.p50_us,
                median(&s.p99_us),
                s.failed,
            ));
        }
    }
}
