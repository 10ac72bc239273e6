//! The data path's counters as a user reads them on `/metrics`: connections per Service
//! (socket hooks and NodePort), refusals for want of endpoints, live connection tracking
//! entries of both tables, their garbage collection once expired, and LRU evictions of a
//! table too small. Real programs on real traffic: socket clients are processes in the
//! agent's cgroup; outside traffic comes from a network namespace (`ext`) over a veth to the
//! node's address; a "pod" namespace behind a veth with a host route gets the policy
//! programs, which track its connections.
//!
//! Needs root (BPF, cgroups, network namespaces); without it prints SKIPPED and passes.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_run, output_in_cgroup, start, wait_event};

const NODE: &str = "node-m";

/// Runs `ip ARGS`, panicking with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces, each joined to this host by a veth; removed on drop.
struct Net {
    ext_ns: String,
    pod_ns: String,
    ext_host: String,
    pod_host: String,
    /// This host's address towards ext (the node address), ext's own, the host's towards the
    /// pod, the pod's.
    node_ip: Ipv4Addr,
    ext_ip: Ipv4Addr,
    pod_gw: Ipv4Addr,
    pod_ip: Ipv4Addr,
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        // Two /30s of TEST-NET-2 per test process.
        let base = (pid % 32) as u8 * 8;
        let a = |last: u8| Ipv4Addr::new(198, 51, 100, base + last);
        let net = Net {
            ext_ns: format!("sluice-ctm-e{pid}"),
            pod_ns: format!("sluice-ctm-p{pid}"),
            ext_host: format!("ctme{pid}"),
            pod_host: format!("ctmp{pid}"),
            node_ip: a(1),
            ext_ip: a(2),
            pod_gw: a(5),
            pod_ip: a(6),
        };
        for (ns, host, host_ip, inner_ip) in [
            (&net.ext_ns, &net.ext_host, net.node_ip, net.ext_ip),
            (&net.pod_ns, &net.pod_host, net.pod_gw, net.pod_ip),
        ] {
            ip(&["netns", "add", ns]);
            ip(&[
                "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            ip(&["addr", "add", &format!("{host_ip}/30"), "dev", host]);
            ip(&["link", "set", host, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{inner_ip}/30"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // The pod's host route, as a CNI plugin installs it: how the agent finds its interface.
        ip(&[
            "route",
            "add",
            &format!("{}/32", net.pod_ip),
            "dev",
            &net.pod_host,
        ]);
        net
    }

    /// A command run in namespace `ns`.
    fn command(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.ext_ns, &self.pod_ns] {
            // Deleting the namespace deletes its veth end, and so the pair.
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for link in [&self.ext_host, &self.pod_host] {
            let _ = Command::new("ip")
                .args(["link", "del", link])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Kills a client we started, by its PID.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Accepts connections on `listener` and closes them at once, in the background.
fn accept_and_close(listener: TcpListener) {
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    // Read until the client closes, so the client closes first.
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 64];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => return,
            }
        }
    });
}

fn manifests(net: &Net, tcp_port: u16, udp_port: u16, nodeport_backend: u16) -> String {
    let node_ip = net.node_ip;
    let pod_ip = net.pod_ip;
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: {NODE}}}
status: {{addresses: [{{type: InternalIP, address: {node_ip}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default}}
spec: {{nodeName: {NODE}, containers: [{{name: c, image: none}}]}}
status: {{phase: Running, podIP: {pod_ip}, podIPs: [{{ip: {pod_ip}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: 10.96.203.10
  ports:
  - {{name: http, port: 80, targetPort: {tcp_port}}}
  - {{name: dns, port: 53, targetPort: {udp_port}, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: {tcp_port}}}, {{name: dns, port: {udp_port}, protocol: UDP}}]
endpoints: [{{addresses: [127.0.0.1]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty}}
spec:
  clusterIP: 10.96.203.11
  ports: [{{port: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: np}}
spec:
  type: NodePort
  clusterIP: 10.96.203.12
  ports: [{{port: 80, targetPort: {nodeport_backend}, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: np-1, labels: {{kubernetes.io/service-name: np}}}}
addressType: IPv4
ports: [{{port: {nodeport_backend}}}]
endpoints: [{{addresses: [{node_ip}], nodeName: {NODE}}}]
"#
    )
}

/// The metrics page.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of one series (0 when absent: a counter not yet incremented).
fn sample(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn value(addr: SocketAddr, series: &str) -> u64 {
    sample(&scrape(addr), series)
}

/// Waits until `series` satisfies `want`; its value.
fn wait_for(addr: SocketAddr, series: &str, what: &str, want: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = value(addr, series);
        if want(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {series} is {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects from a process in `cgroup` to `ip:port` (TCP); whether it succeeded.
fn connect_in(cgroup: &Path, ip: &str, port: u16) -> bool {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
        .stderr(Stdio::null());
    output_in_cgroup(cgroup, &mut cmd).status.success()
}

/// Connects from namespace `ns` to `to` and closes; whether it succeeded.
fn connect_from_ns(ns: &str, to: SocketAddr) -> bool {
    Net::command(ns, "bash")
        .args(["-c", &format!("exec 3<>/dev/tcp/{}/{}", to.ip(), to.port())])
        .stderr(Stdio::null())
        .status()
        .expect("run bash")
        .success()
}

const WEB: &str = r#"sluice_service_connections_total{name="web",namespace="default"}"#;
const NP: &str = r#"sluice_service_connections_total{name="np",namespace="default"}"#;
const EMPTY_REFUSED: &str =
    r#"sluice_service_no_endpoint_refusals_total{name="empty",namespace="default"}"#;
const NAT_LIVE: &str = r#"sluice_conntrack_entries{table="nat"}"#;
const NAT_CREATED: &str = r#"sluice_conntrack_created_total{table="nat"}"#;
const NAT_GC: &str = r#"sluice_conntrack_gc_deleted_total{table="nat"}"#;
const NAT_EVICTED: &str = r#"sluice_conntrack_evictions_total{table="nat"}"#;
const POLICY_LIVE: &str = r#"sluice_conntrack_entries{table="policy"}"#;
const POLICY_CREATED: &str = r#"sluice_conntrack_created_total{table="policy"}"#;
const POLICY_GC: &str = r#"sluice_conntrack_gc_deleted_total{table="policy"}"#;

#[test]
fn connections_conntrack_entries_gc_and_evictions_show_on_the_metrics_page() {
    let Some(cgroup_root) =
        can_run("connections_conntrack_entries_gc_and_evictions_show_on_the_metrics_page")
    else {
        return;
    };
    let net = Net::new();
    let tcp = TcpListener::bind("127.0.0.1:0").expect("listen");
    let tcp_port = tcp.local_addr().expect("addr").port();
    accept_and_close(tcp);
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let udp_port = udp.local_addr().expect("addr").port();
    // The NodePort backend is this node itself (a local endpoint on the node's address), and
    // so is what the pod connects to.
    let np_backend = TcpListener::bind(SocketAddr::new(net.node_ip.into(), 0)).expect("listen");
    let np_port = np_backend.local_addr().expect("addr").port();
    accept_and_close(np_backend);
    let gw_listener = TcpListener::bind(SocketAddr::new(net.pod_gw.into(), 0)).expect("listen");
    let gw_port = gw_listener.local_addr().expect("addr").port();
    accept_and_close(gw_listener);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("all.yaml"),
        manifests(&net, tcp_port, udp_port, np_port),
    )
    .expect("write");
    let metrics_addr = TcpListener::bind("127.0.0.1:0")
        .expect("probe port")
        .local_addr()
        .expect("addr");
    let (guard, events) = start(
        &cgroup_root,
        "ctmetrics",
        &[
            "--manifests",
            dir.path().to_str().expect("utf-8"),
            "--node",
            NODE,
            "--device",
            &net.ext_host,
            "--metrics-listen",
            &metrics_addr.to_string(),
            // Small enough to overflow with a few connections held open.
            "--max-nat-connections",
            "8",
            "--conntrack-gc-interval-ms",
            "300",
        ],
    );
    wait_event(&events, "north_south_attached", "NodePort programs", |_| {
        true
    });
    wait_event(
        &events,
        "policy_attached",
        "policy programs at the pod",
        |_| true,
    );
    // The walker has run once: its baseline is taken, the gauges exist.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !scrape(metrics_addr).contains(NAT_LIVE) {
        assert!(Instant::now() < deadline, "no {NAT_LIVE} on the page");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Socket hooks: 5 connections, 3 unconnected datagrams, 3 refusals.
    let web_before = value(metrics_addr, WEB);
    for _ in 0..5 {
        assert!(
            connect_in(&guard.cgroup, "10.96.203.10", 80),
            "connect to web"
        );
    }
    let script = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor _ in range(3): s.sendto(b'x',('10.96.203.10',53))\n";
    let out = output_in_cgroup(&guard.cgroup, Command::new("python3").args(["-c", script]));
    assert!(out.status.success(), "udp client: {out:?}");
    for _ in 0..3 {
        assert!(
            !connect_in(&guard.cgroup, "10.96.203.11", 80),
            "a Service without endpoints refuses"
        );
    }
    wait_for(metrics_addr, WEB, "web connections", |v| {
        v >= web_before + 8
    });
    wait_for(metrics_addr, EMPTY_REFUSED, "refusals", |v| v >= 3);
    // Exactly: one count per connect() and per datagram, nothing counted twice.
    std::thread::sleep(Duration::from_millis(700));
    let page = scrape(metrics_addr);
    assert_eq!(sample(&page, WEB), web_before + 8, "{page}");
    assert_eq!(sample(&page, EMPTY_REFUSED), 3, "{page}");

    // NodePort: 3 connections from outside, each two NAT entries; closed by the client, so
    // they expire 10 s after their last packet and the GC takes them.
    let nodeport = SocketAddr::new(net.node_ip.into(), 30080);
    let np_before = value(metrics_addr, NP);
    let created_before = value(metrics_addr, NAT_CREATED);
    for _ in 0..3 {
        assert!(connect_from_ns(&net.ext_ns, nodeport), "NodePort connect");
    }
    wait_for(metrics_addr, NAT_LIVE, "NAT entries", |v| v == 6);
    wait_for(metrics_addr, NP, "NodePort connections", |v| {
        v == np_before + 3
    });
    assert_eq!(value(metrics_addr, NAT_CREATED), created_before + 6);

    // The pod's connections to its node are tracked by the policy programs.
    let gw = SocketAddr::new(net.pod_gw.into(), gw_port);
    for _ in 0..4 {
        assert!(connect_from_ns(&net.pod_ns, gw), "pod connect");
    }
    wait_for(metrics_addr, POLICY_LIVE, "policy entries", |v| v >= 4);
    assert!(value(metrics_addr, POLICY_CREATED) >= 4);

    // Expired (closing + 10 s): collected, in both tables.
    let started = Instant::now();
    wait_for(metrics_addr, NAT_LIVE, "NAT entries collected", |v| v == 0);
    wait_for(metrics_addr, NAT_GC, "NAT GC", |v| v >= 6);
    wait_for(metrics_addr, POLICY_GC, "policy GC", |v| v >= 4);
    wait_for(metrics_addr, POLICY_LIVE, "policy entries collected", |v| {
        v == 0
    });
    // Not before the programs' own timeout.
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "collected after {:?}, before the entries expired",
        started.elapsed()
    );
    assert_eq!(value(metrics_addr, NAT_EVICTED), 0, "nothing evicted yet");

    // Eviction: 6 connections held open need 12 entries of a table of 8.
    let script = format!(
        "import socket,sys,time\nss=[]\nfor _ in range(6):\n  s=socket.socket()\n  s.settimeout(2)\n  try:\n    s.connect(('{}',30080)); ss.append(s)\n  except OSError: pass\nprint('done',flush=True)\ntime.sleep(60)\n",
        net.node_ip
    );
    let mut holder = Net::command(&net.ext_ns, "python3");
    holder
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut holder = ChildGuard(holder.spawn().expect("start holder"));
    let mut line = [0u8; 5];
    holder
        .0
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut line)
        .expect("holder output");
    let evicted = wait_for(metrics_addr, NAT_EVICTED, "evictions", |v| v >= 4);
    // Quiet table: the estimate is exact.
    std::thread::sleep(Duration::from_millis(700));
    let page = scrape(metrics_addr);
    let (created, gc, live, evicted_now) = (
        sample(&page, NAT_CREATED),
        sample(&page, NAT_GC),
        sample(&page, NAT_LIVE),
        sample(&page, NAT_EVICTED),
    );
    assert!(evicted_now >= evicted);
    assert!(live <= 8, "{page}");
    assert_eq!(evicted_now, created - gc - live, "{page}");
    drop(holder);
    drop(guard);
    drop(net);
}
