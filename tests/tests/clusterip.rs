//! ClusterIP end to end: real eBPF programs in the real kernel, real TCP and
//! UDP between network namespaces, driven by manifests in a directory.
//!
//! Each test brings up its own lab (unique name), which is taken down when
//! the test ends, also when it fails or panics.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use sluice_e2e::{lab_options, skip_unless_root, sluice_bin, unique_name};
use sluice_lab::{Lab, Outcome, Protocol, ProxyMode};

fn root_or_skip(test: &str) -> bool {
    !skip_unless_root(test)
}

fn up(prefix: &str, manifests: &Path) -> Lab {
    let mut opts = lab_options(&unique_name(prefix), manifests);
    // These tests are about the node agent: it must run.
    opts.proxy = ProxyMode::Required;
    Lab::up(opts).unwrap_or_else(|e| panic!("lab {prefix} did not come up: {e:#}"))
}

fn write(dir: &Path, file: &str, yaml: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).expect("write manifest");
    std::fs::rename(&tmp, dir.join(file)).expect("rename manifest");
}

/// A pod with labels and named container ports ("name:port[/UDP]").
fn pod(name: &str, app: &str, ports: &[&str]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: {app}\n\
         spec:\n  containers:\n    - name: main\n      image: agnhost\n"
    );
    if !ports.is_empty() {
        out.push_str("      ports:\n");
        for port in ports {
            let (name, rest) = port.split_once(':').expect("name:port");
            let (number, protocol) = rest.split_once('/').unwrap_or((rest, "TCP"));
            out.push_str(&format!(
                "        - name: {name}\n          containerPort: {number}\n          protocol: {protocol}\n"
            ));
        }
    }
    out
}

/// A Service selecting `app`, with ports "name:port->target[/UDP]".
fn service(name: &str, cluster_ip: &str, app: &str, ports: &[&str]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  clusterIP: {cluster_ip}\n  selector:\n    app: {app}\n  ports:\n"
    );
    for port in ports {
        let (name, rest) = port.split_once(':').expect("name:port->target");
        let (rest, protocol) = rest.split_once('/').unwrap_or((rest, "TCP"));
        let (port, target) = rest.split_once("->").expect("port->target");
        out.push_str(&format!(
            "    - name: {name}\n      port: {port}\n      targetPort: {target}\n      protocol: {protocol}\n"
        ));
    }
    out
}

fn answers(report: &sluice_lab::LoadReport) -> BTreeSet<String> {
    report.answers.keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The demo's shape: a client, three web pods on a named port (one of them
/// on a different number), a UDP Service with two pods.
fn web_and_udp(dir: &Path) {
    write(dir, "client.yaml", &pod("client", "client", &[]));
    write(dir, "web-1.yaml", &pod("web-1", "web", &["http:8080"]));
    write(dir, "web-2.yaml", &pod("web-2", "web", &["http:8080"]));
    write(dir, "web-3.yaml", &pod("web-3", "web", &["http:9090"]));
    write(
        dir,
        "web-svc.yaml",
        &service("web", "10.96.0.10", "web", &["http:80->http"]),
    );
    write(
        dir,
        "echo-1.yaml",
        &pod("echo-1", "echo", &["dns:5353/UDP"]),
    );
    write(
        dir,
        "echo-2.yaml",
        &pod("echo-2", "echo", &["dns:5353/UDP"]),
    );
    write(
        dir,
        "echo-svc.yaml",
        &service("echo", "10.96.0.53", "echo", &["dns:53->dns/UDP"]),
    );
}

#[test]
fn tcp_to_a_cluster_ip_reaches_all_three_pods_through_a_named_port() {
    if !root_or_skip("tcp_to_a_cluster_ip_reaches_all_three_pods_through_a_named_port") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    web_and_udp(dir.path());
    let lab = up("ctcp", dir.path());

    let report = lab
        .load("client", "10.96.0.10:80", Protocol::Tcp, 60)
        .unwrap();
    assert_eq!(report.answered, 60, "every connection answered: {report:?}");
    // web-3 serves the named port on 9090: reaching it proves per-pod resolution.
    assert_eq!(
        answers(&report),
        set(&["web-1", "web-2", "web-3"]),
        "{report:?}"
    );
}

#[test]
fn udp_to_a_cluster_ip_reaches_every_pod_and_replies_come_from_the_service() {
    if !root_or_skip("udp_to_a_cluster_ip_reaches_every_pod_and_replies_come_from_the_service") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    web_and_udp(dir.path());
    let lab = up("cudp", dir.path());

    let report = lab
        .load("client", "10.96.0.53:53", Protocol::Udp, 60)
        .unwrap();
    assert_eq!(report.answered, 60, "every datagram answered: {report:?}");
    assert_eq!(answers(&report), set(&["echo-1", "echo-2"]), "{report:?}");

    // recvmsg4 shows the reply as coming from the Service address.
    let probe = lab.probe("client", "10.96.0.53:53", Protocol::Udp).unwrap();
    assert_eq!(probe.outcome, Outcome::Answered, "{probe:?}");
    assert_eq!(
        probe.peer,
        Some("10.96.0.53:53".parse::<SocketAddr>().unwrap()),
        "{probe:?}"
    );
}

#[test]
fn getpeername_returns_the_service_address_and_the_pod_sees_the_client() {
    if !root_or_skip("getpeername_returns_the_service_address_and_the_pod_sees_the_client") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    web_and_udp(dir.path());
    let lab = up("cpeer", dir.path());

    let probe = lab.probe("client", "10.96.0.10:80", Protocol::Tcp).unwrap();
    assert_eq!(probe.outcome, Outcome::Answered, "{probe:?}");
    assert_eq!(
        probe.peer,
        Some("10.96.0.10:80".parse::<SocketAddr>().unwrap()),
        "{probe:?}"
    );

    // The connection really went to a pod, which saw the client's own
    // address (socket-level translation keeps the source). Asked through
    // the CLI, as a user would.
    let client_ip = lab.pod_ip("client").unwrap();
    let out = std::process::Command::new(sluice_bin())
        .args([
            "lab",
            "probe",
            "--name",
            lab.name(),
            "client",
            "10.96.0.10:80",
            "--ask",
            "clientip",
        ])
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe --ask clientip: {seen} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        seen.trim().starts_with(&format!("{client_ip}:")),
        "pod saw {seen}, client is {client_ip}"
    );
}

#[test]
fn a_multi_port_service_sends_each_port_to_its_own_target() {
    if !root_or_skip("a_multi_port_service_sends_each_port_to_its_own_target") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "client.yaml", &pod("client", "client", &[]));
    // Each pod declares only one of the two named ports, so each Service
    // port has exactly one endpoint: the pod that declares its name.
    write(dir.path(), "api.yaml", &pod("api", "multi", &["api:8080"]));
    write(
        dir.path(),
        "admin.yaml",
        &pod("admin", "multi", &["admin:9000"]),
    );
    write(
        dir.path(),
        "svc.yaml",
        &service(
            "multi",
            "10.96.0.20",
            "multi",
            &["api:80->api", "admin:81->admin"],
        ),
    );
    let lab = up("cmulti", dir.path());

    let api = lab
        .load("client", "10.96.0.20:80", Protocol::Tcp, 20)
        .unwrap();
    assert_eq!(answers(&api), set(&["api"]), "{api:?}");
    assert_eq!(api.answered, 20, "{api:?}");
    let admin = lab
        .load("client", "10.96.0.20:81", Protocol::Tcp, 20)
        .unwrap();
    assert_eq!(answers(&admin), set(&["admin"]), "{admin:?}");
    assert_eq!(admin.answered, 20, "{admin:?}");
}

#[test]
fn only_ready_pods_get_traffic_and_a_service_with_none_refuses_at_once() {
    if !root_or_skip("only_ready_pods_get_traffic_and_a_service_with_none_refuses_at_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "client.yaml", &pod("client", "client", &[]));
    write(
        dir.path(),
        "ready.yaml",
        &pod("ready", "web", &["http:8080"]),
    );
    // A pod whose manifest declares it not Ready (the lab keeps that).
    let not_ready = format!(
        "{}status:\n  conditions:\n    - type: Ready\n      status: \"False\"\n",
        pod("not-ready", "web", &["http:8080"])
    );
    write(dir.path(), "not-ready.yaml", &not_ready);
    write(
        dir.path(),
        "svc.yaml",
        &service("web", "10.96.0.10", "web", &["http:80->http"]),
    );
    write(
        dir.path(),
        "lonely.yaml",
        &format!(
            "{}---\n{}",
            pod("lonely", "lonely", &["http:8080"]).replace(
                "spec:\n",
                "status:\n  conditions:\n    - type: Ready\n      status: \"False\"\nspec:\n"
            ),
            service("lonely", "10.96.0.30", "lonely", &["http:80->http"])
        ),
    );
    let lab = up("cready", dir.path());

    let report = lab
        .load("client", "10.96.0.10:80", Protocol::Tcp, 40)
        .unwrap();
    assert_eq!(answers(&report), set(&["ready"]), "{report:?}");
    assert_eq!(report.answered, 40, "{report:?}");

    let probe = lab.probe("client", "10.96.0.30:80", Protocol::Tcp).unwrap();
    assert_eq!(
        probe.outcome,
        Outcome::Refused,
        "no ready endpoint: refused, not a hang: {probe:?}"
    );
    let udp = lab.probe("client", "10.96.0.30:80", Protocol::Udp).unwrap();
    assert_ne!(udp.outcome, Outcome::Answered, "{udp:?}");
}

/// Polls until `check` holds, for at most `limit`; returns how long it took.
fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return Some(started.elapsed());
        }
        sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn removing_a_pods_manifest_stops_new_connections_to_it_within_a_second() {
    if !root_or_skip("removing_a_pods_manifest_stops_new_connections_to_it_within_a_second") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    web_and_udp(dir.path());
    let lab = up("cremove", dir.path());
    let before = lab
        .load("client", "10.96.0.10:80", Protocol::Tcp, 60)
        .unwrap();
    assert!(before.answers.contains_key("web-3"), "{before:?}");

    std::fs::remove_file(dir.path().join("web-3.yaml")).unwrap();
    // The deadline is part of the behaviour asked for: within one second of
    // the file going away, no new connection may reach web-3.
    sleep(Duration::from_secs(1));
    let after = lab
        .load("client", "10.96.0.10:80", Protocol::Tcp, 60)
        .unwrap();
    assert_eq!(after.answered, 60, "the others keep serving: {after:?}");
    assert_eq!(answers(&after), set(&["web-1", "web-2"]), "{after:?}");
}

#[test]
fn deleting_a_service_makes_connect_fail_fast_and_adding_it_back_works() {
    if !root_or_skip("deleting_a_service_makes_connect_fail_fast_and_adding_it_back_works") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    web_and_udp(dir.path());
    let lab = up("cdelete", dir.path());
    let probe = lab.probe("client", "10.96.0.10:80", Protocol::Tcp).unwrap();
    assert_eq!(probe.outcome, Outcome::Answered, "{probe:?}");

    let svc = std::fs::read_to_string(dir.path().join("web-svc.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("web-svc.yaml")).unwrap();
    let refused = within(Duration::from_secs(5), || {
        lab.probe("client", "10.96.0.10:80", Protocol::Tcp)
            .is_ok_and(|p| p.outcome == Outcome::Refused)
    });
    assert!(
        refused.is_some(),
        "connect() to a deleted Service's address is refused, not left hanging"
    );

    write(dir.path(), "web-svc.yaml", &svc);
    let back = within(Duration::from_secs(5), || {
        lab.probe("client", "10.96.0.10:80", Protocol::Tcp)
            .is_ok_and(|p| p.outcome == Outcome::Answered)
    });
    assert!(
        back.is_some(),
        "the Service works again once its manifest is back"
    );
}

#[test]
fn bad_input_is_skipped_and_what_was_programmed_keeps_working() {
    if !root_or_skip("bad_input_is_skipped_and_what_was_programmed_keeps_working") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    web_and_udp(dir.path());
    // An invalid Service next to valid ones: port 0.
    write(
        dir.path(),
        "bad.yaml",
        &service("bad", "10.96.0.66", "web", &["http:0->http"]),
    );
    let lab = up("cbad", dir.path());
    let problems: Vec<String> = lab.problems().iter().map(ToString::to_string).collect();
    assert!(
        problems.iter().any(|p| p.contains("bad.yaml")
            && p.contains("Service default/bad")
            && p.contains("spec.ports[0].port")),
        "the problem names file, object and field: {problems:?}"
    );
    let ok = lab
        .load("client", "10.96.0.10:80", Protocol::Tcp, 10)
        .unwrap();
    assert_eq!(ok.answered, 10, "{ok:?}");

    // Break the web Service's file: it fails to parse, and the last good
    // version stays programmed.
    write(
        dir.path(),
        "web-svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
    );
    // And make the UDP Service invalid (duplicate port names): its last
    // valid version stays.
    write(
        dir.path(),
        "echo-svc.yaml",
        &service(
            "echo",
            "10.96.0.53",
            "echo",
            &["dns:53->dns/UDP", "dns:54->dns/UDP"],
        ),
    );
    sleep(Duration::from_millis(500));
    let tcp = lab
        .load("client", "10.96.0.10:80", Protocol::Tcp, 30)
        .unwrap();
    assert_eq!(tcp.answered, 30, "{tcp:?}");
    assert_eq!(answers(&tcp), set(&["web-1", "web-2", "web-3"]), "{tcp:?}");
    let udp = lab
        .load("client", "10.96.0.53:53", Protocol::Udp, 20)
        .unwrap();
    assert_eq!(udp.answered, 20, "{udp:?}");
}

#[test]
fn sigterm_stops_the_agent_and_its_programs_stay_until_cleanup() {
    if !root_or_skip("sigterm_stops_the_agent_and_its_programs_stay_until_cleanup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    web_and_udp(dir.path());
    let lab = up("cterm", dir.path());
    let probe = lab.probe("client", "10.96.0.10:80", Protocol::Tcp).unwrap();
    assert_eq!(probe.outcome, Outcome::Answered, "{probe:?}");

    let state = lab.state().unwrap();
    let node = &state.nodes[0];
    let agent = node.proxy.expect("the node agent runs");
    assert!(agent.signal(libc::SIGTERM), "signalling sluice-proxy");
    assert!(
        agent.wait_gone(Duration::from_secs(10)),
        "sluice-proxy exits on SIGTERM"
    );
    let log = std::fs::read_to_string(node.proxy_log.as_ref().expect("agent log")).unwrap();
    assert!(
        log.contains("the programs stay attached"),
        "clean shutdown logged: {log}"
    );
    assert!(!log.contains("fatal"), "{log}");

    // The programs are pinned: the Service keeps working without the agent (what makes
    // restarts and upgrades hitless).
    let probe = lab.probe("client", "10.96.0.10:80", Protocol::Tcp).unwrap();
    assert_eq!(probe.outcome, Outcome::Answered, "{probe:?}");

    // `sluice-proxy cleanup` detaches them: nothing translates the Service address any
    // more, the connection goes to 10.96.0.10 itself, which nothing serves.
    let pins = sluice_lab::cleanup::pin_dir(lab.name(), &node.name);
    let out = std::process::Command::new(sluice_e2e::bin_dir().join(sluice_lab::PROXY_BIN))
        .arg("cleanup")
        .arg("--bpffs-dir")
        .arg(&pins)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!pins.exists());
    let probe = lab.probe("client", "10.96.0.10:80", Protocol::Tcp).unwrap();
    assert_ne!(probe.outcome, Outcome::Answered, "{probe:?}");
    // Pod to pod is untouched.
    let direct = lab.probe("client", "web-1:8080", Protocol::Tcp).unwrap();
    assert_eq!(direct.answer.as_deref(), Some("web-1"), "{direct:?}");
}

/// Three web pods behind a ClientIP-sticky Service, and three client pods.
fn sticky_lab(dir: &Path, timeout_seconds: Option<u32>) {
    for client in ["client-a", "client-b", "client-c"] {
        write(dir, &format!("{client}.yaml"), &pod(client, "client", &[]));
    }
    for web in ["web-1", "web-2", "web-3"] {
        write(
            dir,
            &format!("{web}.yaml"),
            &pod(web, "web", &["http:8080"]),
        );
    }
    let mut svc = service("sticky", "10.96.0.40", "web", &["http:80->http"]);
    svc.push_str("  sessionAffinity: ClientIP\n");
    if let Some(t) = timeout_seconds {
        svc.push_str(&format!(
            "  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n"
        ));
    }
    write(dir, "sticky.yaml", &svc);
}

/// The one pod that answered every one of `count` connections from `client`.
fn sticky_backend(lab: &Lab, client: &str, count: u64) -> String {
    let report = lab
        .load(client, "10.96.0.40:80", Protocol::Tcp, count)
        .unwrap();
    assert_eq!(report.answered, count, "{report:?}");
    assert_eq!(
        report.answers.len(),
        1,
        "{client} sticks to one pod: {report:?}"
    );
    report.answers.keys().next().cloned().unwrap_or_default()
}

#[test]
fn session_affinity_holds_and_removing_a_backend_moves_only_its_clients() {
    if !root_or_skip("session_affinity_holds_and_removing_a_backend_moves_only_its_clients") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    sticky_lab(dir.path(), None);
    let lab = up("caff", dir.path());

    let clients = ["client-a", "client-b", "client-c"];
    let before: Vec<String> = clients
        .iter()
        .map(|c| sticky_backend(&lab, c, 50))
        .collect();
    // Remove client-a's backend.
    let gone = before[0].clone();
    std::fs::remove_file(dir.path().join(format!("{gone}.yaml"))).unwrap();
    sleep(Duration::from_secs(1));

    for (client, was) in clients.iter().zip(&before) {
        let now = sticky_backend(&lab, client, 50);
        if *was == gone {
            assert_ne!(now, gone, "{client} moved off the removed backend");
        } else {
            assert_eq!(
                &now, was,
                "{client} was not on the removed backend and keeps its own"
            );
        }
    }
}

#[test]
fn session_affinity_is_released_after_the_timeout() {
    if !root_or_skip("session_affinity_is_released_after_the_timeout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    sticky_lab(dir.path(), Some(1));
    let lab = up("cafft", dir.path());

    // Within the timeout, gaps between connections do not break affinity.
    let first = sticky_backend(&lab, "client-a", 20);
    sleep(Duration::from_millis(400));
    assert_eq!(sticky_backend(&lab, "client-a", 20), first);

    // After a second without connections the choice is free again: over
    // eight idle periods, a fresh random pick among three pods comes out
    // the same every time with probability (1/3)^7 < 0.05%.
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        sleep(Duration::from_millis(1300));
        seen.insert(sticky_backend(&lab, "client-a", 1));
    }
    assert!(
        seen.len() > 1,
        "affinity was never released: always {seen:?}"
    );
}
