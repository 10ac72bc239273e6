//! A service map too small for every Service: the agent names the Service it could not
//! program, every other Service keeps working, and the left-out one is programmed as soon as
//! room appears. Real maps and real connections: clients are processes in the agent's cgroup
//! connecting to cluster IPs whose backends listen on this host's loopback.
//!
//! Needs root (BPF, cgroups); without it prints SKIPPED and passes.

mod common;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_run, output_in_cgroup, start, wait_event};

fn service(name: &str, ip: &str, backend_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
         spec: {{clusterIP: {ip}, ports: [{{port: 80, targetPort: {backend_port}}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: {backend_port}}}]\n\
         endpoints: [{{addresses: [127.0.0.1]}}]\n"
    )
}

/// Whether a process in `cgroup` (so the socket programs translate it) can connect to `ip:80`.
fn connect_from(cgroup: &Path, ip: &str) -> bool {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("exec 3<>/dev/tcp/{ip}/80")])
        .stderr(Stdio::null());
    output_in_cgroup(cgroup, &mut cmd).status.success()
}

/// One GET over plain HTTP/1.1: (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample line of a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_service_map_names_the_service_left_out_and_programs_it_when_room_appears() {
    let Some(cgroup_root) =
        can_run("a_full_service_map_names_the_service_left_out_and_programs_it_when_room_appears")
    else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    // Accept and drop connections in the background.
    std::thread::spawn(move || {
        loop {
            match listener.accept() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => return,
            }
        }
    });

    let dir = tempfile::tempdir().expect("tempdir");
    for (name, ip) in [
        ("a", "10.96.201.1"),
        ("b", "10.96.201.2"),
        ("c", "10.96.201.3"),
    ] {
        std::fs::write(
            dir.path().join(format!("{name}.yaml")),
            service(name, ip, port),
        )
        .expect("write");
    }
    let manifests = dir.path().to_str().expect("utf-8");
    // A free port for the metrics (released just before the agent binds it).
    let metrics_addr = TcpListener::bind("127.0.0.1:0")
        .expect("probe port")
        .local_addr()
        .expect("addr");
    let metrics_arg = metrics_addr.to_string();
    // Each Service needs two entries (its master and one backend slot): room for two.
    let (guard, events) = start(
        &cgroup_root,
        "capacity",
        &[
            "--manifests",
            manifests,
            "--node",
            "n1",
            "--service-cidr",
            "10.96.0.0/16",
            "--max-service-entries",
            "4",
            "--retry-seconds",
            "1",
            "--metrics-listen",
            &metrics_arg,
        ],
    );
    let error = wait_event(&events, "sync_error", "the Service left out", |e| {
        e["error"]
            .as_str()
            .is_some_and(|m| m.contains("Service default/c"))
    });
    assert!(
        error["error"]
            .as_str()
            .unwrap_or_default()
            .contains("10.96.201.3:80"),
        "{error}"
    );
    let cgroup = guard.cgroup.clone();
    // What the metrics say: the map is full, a sync failed, which Services have frontends.
    // Ready once the first sync is through, even though it left one Service out.
    eventually("ready", || http_get(metrics_addr, "/readyz").0 == 200);
    assert_eq!(http_get(metrics_addr, "/healthz").0, 200);
    let (status, page) = http_get(metrics_addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&page, r#"sluice_map_entries{map="services"}"#),
        Some(4.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, r#"sluice_map_capacity_entries{map="services"}"#),
        Some(4.0),
        "{page}"
    );
    assert!(
        sample(&page, r#"sluice_sync_errors_total{part="services"}"#) >= Some(1.0),
        "{page}"
    );
    // Every map's pressure is there, counted from the kernel: e.g. the service CIDR trie
    // holds the one --service-cidr, the policy maps their default sizes.
    assert_eq!(
        sample(&page, r#"sluice_map_entries{map="service_cidrs"}"#),
        Some(1.0),
        "{page}"
    );
    for map in [
        "policy_peers",
        "policy_rules",
        "nat_conntrack",
        "sock_revnat",
    ] {
        assert!(
            sample(
                &page,
                &format!("sluice_map_capacity_entries{{map=\"{map}\"}}")
            ) > Some(0.0),
            "capacity of {map}: {page}"
        );
    }
    assert_eq!(sample(&page, "sluice_frontends"), Some(2.0), "{page}");
    assert!(
        page.contains("sluice_programming_duration_seconds_bucket"),
        "{page}"
    );
    assert!(connect_from(&cgroup, "10.96.201.1"), "a works");
    assert!(connect_from(&cgroup, "10.96.201.2"), "b works");
    // The one left out is in the service CIDR: refused at once, not sent anywhere.
    assert!(!connect_from(&cgroup, "10.96.201.3"), "c is not programmed");

    // Room appears: c is programmed by the retry, a is gone.
    std::fs::remove_file(dir.path().join("a.yaml")).expect("remove a");
    eventually("c programmed after a left", || {
        connect_from(&cgroup, "10.96.201.3")
    });
    assert!(connect_from(&cgroup, "10.96.201.2"), "b still works");
    assert!(!connect_from(&cgroup, "10.96.201.1"), "a is gone");
    drop(guard);
}
