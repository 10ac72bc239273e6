//! Restarts drop nothing: the node agent's programs and maps are pinned, a restarted agent
//! adopts them, and neither established nor new connections fail while it is down. And
//! `sluice-proxy cleanup` removes every trace.
//!
//! They need root (network namespaces, cgroups, BPF); without it they print SKIPPED and pass.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sluice_e2e::{
    Manifests, bin_dir, lab_options, node_yaml, pod_yaml, service_yaml, skip_unless_root,
    unique_name,
};
use sluice_lab::cleanup::pin_dir;
use sluice_lab::state::LabState;
use sluice_lab::supervisor::request_proxy_restart;
use sluice_lab::{Lab, LoadReport, Outcome, PROXY_BIN, Protocol, ProxyMode, TargetSpec, names};

const NODE: &str = "node-a";
const WEB: &str = "10.96.0.10";
const OLD: &str = "10.96.0.20";
const NODE_PORT: u16 = 30080;

fn web_pod(name: &str) -> String {
    pod_yaml(
        name,
        &[("app", "web")],
        Some(NODE),
        &[("http", 8080, "TCP")],
    )
}

fn up(prefix: &str) -> Result<(Lab, Manifests)> {
    let m = Manifests::new()?;
    m.write("node.yaml", &node_yaml(NODE, None))?;
    m.write(
        "client.yaml",
        &pod_yaml("client", &[("app", "client")], Some(NODE), &[]),
    )?;
    m.write("web-1.yaml", &web_pod("web-1"))?;
    m.write("web-2.yaml", &web_pod("web-2"))?;
    let web = service_yaml(
        "web",
        Some(WEB),
        &[("app", "web")],
        &[("http", 80, 8080, "TCP")],
    )
    .replace("spec:\n", "spec:\n  type: NodePort\n")
    .replace(
        "targetPort: 8080,",
        &format!("targetPort: 8080, nodePort: {NODE_PORT},"),
    );
    m.write("web-svc.yaml", &web)?;
    m.write(
        "old-svc.yaml",
        &service_yaml(
            "old",
            Some(OLD),
            &[("app", "web")],
            &[("http", 80, 8080, "TCP")],
        ),
    )?;
    let mut opts = lab_options(&unique_name(prefix), m.path());
    opts.proxy = ProxyMode::Required;
    let lab = Lab::up(opts)?;
    Ok((lab, m))
}

fn target(host: &str, port: u16) -> TargetSpec {
    TargetSpec {
        host: host.into(),
        port,
        protocol: Protocol::Tcp,
    }
}

/// One HTTP/1.1 request on an open keep-alive connection: the body.
fn http_get<S: Read + Write>(stream: &mut S, path: &str) -> Result<String> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).context("reading the answer")?;
        if n == 0 {
            bail!("connection closed after {} bytes", buf.len());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("no content-length")?;
        if body.len() >= length {
            return Ok(body[..length].to_string());
        }
    }
}

/// Keeps exchanging data on one established connection until `stop`: (exchanges, failures).
fn keep_talking(mut stream: impl Read + Write, stop: &AtomicBool) -> (u64, Vec<String>) {
    let mut ok = 0;
    let mut failures = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let msg = format!("m{ok}");
        match http_get(&mut stream, &format!("/echo?msg={msg}")) {
            Ok(body) if body == msg => ok += 1,
            Ok(body) => failures.push(format!("answer {body:?} to {msg:?}")),
            Err(e) => {
                failures.push(format!("{e:#}"));
                break;
            }
        }
        sleep(Duration::from_millis(20));
    }
    (ok, failures)
}

/// New connections from `from` to `to` in batches until `stop`; the batches' reports summed.
fn keep_connecting(lab: &Lab, from: &str, to: &TargetSpec, stop: &AtomicBool) -> Result<Load> {
    let mut total = Load::default();
    while !stop.load(Ordering::Relaxed) {
        let r = lab.load_target(from, to, 25, Duration::from_secs(2))?;
        total.add(&r);
    }
    Ok(total)
}

#[derive(Debug, Default)]
struct Load {
    count: u64,
    answered: u64,
    failures: Vec<String>,
}

impl Load {
    fn add(&mut self, r: &LoadReport) {
        self.count += r.count;
        self.answered += r.answered;
        if r.answered != r.count {
            self.failures
                .push(format!("{:?} {:?}", r.failures, r.errors));
        }
    }
}

/// A connection to the ClusterIP held by a process in the client pod (so the socket
/// programs translate it), exchanging a request per line written to its stdin.
struct PodConnection {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

const HOLDER: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print("peer %s:%d" % s.getpeername(), flush=True)
for line in sys.stdin:
    msg = line.strip()
    try:
        s.sendall(("GET /echo?msg=%s HTTP/1.1\r\nHost: t\r\n\r\n" % msg).encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise EOFError("connection closed")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        while len(body) < n:
            chunk = s.recv(4096)
            if not chunk:
                raise EOFError("connection closed")
            body += chunk
        print(body[:n].decode(), flush=True)
    except Exception as e:
        print("error %s" % e, flush=True)
"#;

impl PodConnection {
    fn open(lab: &Lab, pod: &str, to: &str, port: u16) -> Result<Option<PodConnection>> {
        let Some(python) = sluice_lab::preflight::find_in_path("python3") else {
            eprintln!("no python3: skipping the established ClusterIP connection");
            return Ok(None);
        };
        let mut cmd = lab.command(pod, python)?;
        cmd.args(["-c", HOLDER, to, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().context("starting the connection holder")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        // getpeername shows the Service, not the backend.
        if line.trim() != format!("peer {to}:{port}") {
            bail!("connection holder: {line:?}");
        }
        Ok(Some(PodConnection {
            child,
            stdin,
            stdout,
        }))
    }

    fn exchange(&mut self, msg: &str) -> Result<()> {
        writeln!(self.stdin, "{msg}")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim() != msg {
            bail!("sent {msg:?}, got {line:?}");
        }
        Ok(())
    }
}

impl Drop for PodConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Restarts the node agent (SIGKILL by PID, then started again by the supervisor) and
/// waits until the new one is ready; returns how long that took.
fn restart_agent(lab: &Lab) -> Result<Duration> {
    let before = lab.node(NODE)?.proxy.context("no node agent")?;
    let started = Instant::now();
    request_proxy_restart(lab.paths(), NODE, true)?;
    lab.wait_for(
        "the restarted node agent",
        Duration::from_secs(30),
        |st: &LabState| {
            st.node(NODE)
                .is_some_and(|n| n.proxy_ready && n.proxy.is_some_and(|p| p != before))
        },
    )?;
    if before.alive() {
        bail!("the old node agent {} still runs", before.pid);
    }
    Ok(started.elapsed())
}

/// Probes until the ClusterIP answers from exactly `want` (in 40 connections).
fn wait_backends(lab: &Lab, want: &[&str]) -> Result<LoadReport> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = lab.load_target("client", &target(WEB, 80), 40, Duration::from_secs(2))?;
        let got: Vec<&str> = r.answers.keys().map(String::as_str).collect();
        if r.answered == r.count && got == want {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("backends still {got:?} (want {want:?}): {r:?}");
        }
        sleep(Duration::from_millis(200));
    }
}

fn pins_of(lab: &Lab) -> PathBuf {
    pin_dir(lab.name(), NODE)
}

#[test]
fn restarts_under_load_drop_no_connection_and_the_new_agent_follows_changes() -> Result<()> {
    if skip_unless_root("restarts_under_load_drop_no_connection_and_the_new_agent_follows_changes")
    {
        return Ok(());
    }
    let (lab, m) = up("rst")?;
    let node_port = SocketAddrV4::new(lab.node_ip(NODE)?, NODE_PORT);
    let external_target = target(&node_port.ip().to_string(), NODE_PORT);
    wait_backends(&lab, &["web-1", "web-2"])?;
    assert!(pins_of(&lab).join("maps/SERVICES").exists());

    // Established: one connection through the NodePort (per-packet NAT with conntrack) and,
    // with python3, one through the ClusterIP from inside the client pod.
    let outside = lab.connect_tcp(names::EXTERNAL, node_port, Duration::from_secs(3))?;
    outside.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut inside = PodConnection::open(&lab, "client", WEB, 80)?;
    if let Some(c) = &mut inside {
        c.exchange("before")?;
    }

    let stop = AtomicBool::new(false);
    let mut restarts = Vec::new();
    let (cluster_ip, external, talk) = std::thread::scope(|s| -> Result<_> {
        let cluster_ip = s.spawn(|| keep_connecting(&lab, "client", &target(WEB, 80), &stop));
        let external = s.spawn(|| keep_connecting(&lab, names::EXTERNAL, &external_target, &stop));
        let talk = s.spawn(|| keep_talking(&outside, &stop));
        sleep(Duration::from_millis(500));
        let mut result = Ok(());
        for i in 0..3 {
            match restart_agent(&lab) {
                Ok(d) => restarts.push(d),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if let Some(c) = &mut inside
                && let Err(e) = c.exchange(&format!("after{i}"))
            {
                result = Err(e.context("the established ClusterIP connection"));
                break;
            }
            sleep(Duration::from_millis(700));
        }
        stop.store(true, Ordering::Relaxed);
        let cluster_ip = cluster_ip.join().expect("load thread")?;
        let external = external.join().expect("load thread")?;
        let talk = talk.join().expect("talk thread");
        result.map(|()| (cluster_ip, external, talk))
    })?;
    eprintln!(
        "restarts took {:?}; ClusterIP {}/{} answered, NodePort {}/{} answered, {} exchanges on the established NodePort connection",
        restarts, cluster_ip.answered, cluster_ip.count, external.answered, external.count, talk.0
    );
    assert!(cluster_ip.count > 0 && external.count > 0);
    assert_eq!(
        cluster_ip.answered, cluster_ip.count,
        "{:?}",
        cluster_ip.failures
    );
    assert_eq!(external.answered, external.count, "{:?}", external.failures);
    assert!(
        talk.1.is_empty(),
        "established NodePort connection: {:?}",
        talk.1
    );
    assert!(talk.0 > 10, "only {} exchanges", talk.0);
    // The established connections still work after the last restart. (Then they go: the
    // change below may remove the backend they are on.)
    if let Some(c) = &mut inside {
        c.exchange("last")?;
    }
    http_get(&mut &outside, "/echo?msg=last").context("the established NodePort connection")?;
    drop(inside);
    drop(outside);

    // Changed while the agent is down: web-1 goes, web-3 comes, Service old goes. The new
    // agent's first sync must add web-3, drop web-1 and old (stale in the adopted maps).
    m.write("web-3.yaml", &web_pod("web-3"))?;
    m.remove("web-1.yaml")?;
    m.remove("old-svc.yaml")?;
    restart_agent(&lab)?;
    lab.wait_pod_ready("web-3", Duration::from_secs(20))?;
    let r = wait_backends(&lab, &["web-2", "web-3"])?;
    assert_eq!(r.answered, 40);
    let old = lab.probe_target("client", &target(OLD, 80), Duration::from_secs(2))?;
    assert_ne!(
        old.outcome,
        Outcome::Answered,
        "the removed Service still answers: {old:?}"
    );

    // And a change after the restart is followed too.
    m.write("web-1.yaml", &web_pod("web-1"))?;
    lab.wait_pod_ready("web-1", Duration::from_secs(20))?;
    wait_backends(&lab, &["web-1", "web-2", "web-3"])?;

    let pins = pins_of(&lab);
    lab.down()?;
    assert!(!pins.exists(), "{} left behind", pins.display());
    Ok(())
}

#[test]
fn cleanup_detaches_everything_and_removes_the_pins() -> Result<()> {
    if skip_unless_root("cleanup_detaches_everything_and_removes_the_pins") {
        return Ok(());
    }
    let (lab, _m) = up("rcln")?;
    wait_backends(&lab, &["web-1", "web-2"])?;
    let pins = pins_of(&lab);
    let proxy = bin_dir().join(PROXY_BIN);
    let cleanup = |extra: &[&str]| -> Result<(bool, String)> {
        let out = Command::new(&proxy)
            .arg("cleanup")
            .arg("--bpffs-dir")
            .arg(&pins)
            .args(extra)
            .output()
            .context("running sluice-proxy cleanup")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    };

    // While the agent runs, cleanup refuses (and changes nothing).
    let (ok, text) = cleanup(&[])?;
    assert!(!ok && text.contains("still running"), "{text}");
    assert!(pins.join("maps/SERVICES").exists());

    // The agent dies; its pinned programs keep translating.
    let agent = lab.node(NODE)?.proxy.context("no node agent")?;
    assert!(agent.signal(libc::SIGKILL));
    assert!(agent.wait_gone(Duration::from_secs(5)));
    let r = lab.load_target("client", &target(WEB, 80), 20, Duration::from_secs(2))?;
    assert_eq!(r.answered, 20, "with the agent dead: {r:?}");

    let cgroup = lab.node(NODE)?.cgroup;
    let (ok, text) = cleanup(&["--cgroup", &cgroup.to_string_lossy()])?;
    assert!(ok, "{text}");
    assert!(text.contains("detached sluice_connect4"), "{text}");
    assert!(text.contains("removed map SERVICES"), "{text}");
    assert!(!pins.exists(), "{} still there", pins.display());
    let probe = lab.probe_target("client", &target(WEB, 80), Duration::from_secs(1))?;
    assert_ne!(
        probe.outcome,
        Outcome::Answered,
        "still translated: {probe:?}"
    );

    // Idempotent.
    let (ok, text) = cleanup(&["--cgroup", &cgroup.to_string_lossy()])?;
    assert!(ok && text.contains("nothing to remove"), "{text}");
    drop(lab);
    Ok(())
}
