//! Self-tests of the lab: pods reach each other by pod IP over TCP and UDP, the test servers
//! answer with the right names and see the client's address, `exec` runs inside the pod, the
//! manifests are followed live, and nothing of a lab survives `down`, a panicking test or a
//! crashed supervisor. Several nodes, the underlay and the external client: multinode.rs.
//!
//! They need root (network namespaces, cgroups); without it they print SKIPPED and pass.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sluice_e2e::{
    Manifests, lab_options, lab_traces, node_yaml, pod_yaml, proxy_available, skip_unless_root,
    two_nodes_yaml, unique_name,
};
use sluice_lab::client::Ask;
use sluice_lab::process::ProcRef;
use sluice_lab::{Lab, LabState, Outcome, PodPhase, Protocol, TargetSpec};

/// One node, three serving pods (TCP 8080 + UDP 5353) and a client pod.
fn three_pods() -> Result<Manifests> {
    let m = Manifests::new()?;
    m.write("node.yaml", &node_yaml("node-1", Some("10.244.0.0/24")))?;
    let mut pods = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        pods.push(pod_yaml(
            name,
            &[("app", "web")],
            None,
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
        ));
    }
    pods.push(pod_yaml(
        "client",
        &[("app", "client")],
        Some("node-1"),
        &[],
    ));
    m.write("pods.yaml", &pods.join("---\n"))?;
    Ok(m)
}

fn up(prefix: &str, m: &Manifests) -> Result<Lab> {
    let name = unique_name(prefix);
    if !proxy_available() {
        eprintln!("note: sluice-proxy not built; lab {name} runs without node agents");
    }
    Lab::up(lab_options(&name, m.path()))
}

/// Every process the lab recorded (supervisor, node agents, test servers).
fn recorded_processes(state: &LabState) -> Vec<ProcRef> {
    state
        .supervisor
        .iter()
        .copied()
        .chain(state.nodes.iter().filter_map(|n| n.proxy))
        .chain(state.pods.iter().filter_map(|p| p.server))
        .collect()
}

fn assert_gone(name: &str, processes: &[ProcRef]) {
    let traces = lab_traces(name);
    assert!(traces.is_empty(), "lab {name} left: {traces:#?}");
    let alive: Vec<_> = processes.iter().filter(|p| p.alive()).collect();
    assert!(
        alive.is_empty(),
        "lab {name} left processes running: {alive:?}"
    );
}

#[test]
fn pods_reach_each_other_by_pod_ip_over_tcp_and_udp() -> Result<()> {
    if skip_unless_root("pods_reach_each_other_by_pod_ip_over_tcp_and_udp") {
        return Ok(());
    }
    let m = three_pods()?;
    let lab = up("pods", &m)?;
    let state = lab.state()?;
    assert_eq!(state.nodes.len(), 1);
    assert_eq!(state.pods.len(), 4);
    for pod in &state.pods {
        assert_eq!(pod.phase, PodPhase::Running, "{pod:?}");
        assert!(pod.ready, "{} not ready", pod.key());
        let ip = pod.ip.context("no pod IP")?;
        assert!(
            "10.244.0.0/24".parse::<ipnet::Ipv4Net>()?.contains(&ip),
            "{ip}"
        );
    }

    for name in ["web-1", "web-2", "web-3"] {
        let ip = lab.pod_ip(name)?;
        let tcp = lab.probe("client", &format!("{ip}:8080"), Protocol::Tcp)?;
        assert_eq!(
            (tcp.outcome, tcp.answer.as_deref()),
            (Outcome::Answered, Some(name)),
            "{tcp:?}"
        );
        assert_eq!(
            tcp.peer,
            Some(format!("{ip}:8080").parse()?),
            "getpeername is the pod"
        );
        let udp = lab.probe("client", &format!("{ip}:5353"), Protocol::Udp)?;
        assert_eq!(
            (udp.outcome, udp.answer.as_deref()),
            (Outcome::Answered, Some(name)),
            "{udp:?}"
        );
        assert_eq!(
            udp.peer,
            Some(format!("{ip}:5353").parse()?),
            "reply source is the pod"
        );
    }
    // Pod to pod, not only from the client; and by pod name.
    let r = lab.probe("web-1", "web-2:8080", Protocol::Tcp)?;
    assert_eq!(r.answer.as_deref(), Some("web-2"), "{r:?}");

    // Nothing listens on 9999: refused at once, TCP and UDP (ICMP port unreachable).
    let r = lab.probe("client", "web-1:9999", Protocol::Tcp)?;
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    let r = lab.probe("client", "web-1:9999", Protocol::Udp)?;
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    // Outside every lab range: no route, nothing leaves the machine.
    let r = lab.probe("client", "192.0.2.1:80", Protocol::Tcp)?;
    assert_eq!(r.outcome, Outcome::Unreachable, "{r:?}");
    Ok(())
}

#[test]
fn servers_see_the_client_pod_address() -> Result<()> {
    if skip_unless_root("servers_see_the_client_pod_address") {
        return Ok(());
    }
    let m = three_pods()?;
    let lab = up("cip", &m)?;
    let client_ip = lab.pod_ip("client")?;
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let port = if protocol == Protocol::Tcp {
            8080
        } else {
            5353
        };
        let target = TargetSpec {
            host: "web-3".into(),
            port,
            protocol,
        };
        let r = lab.probe_asking("client", &target, Ask::ClientIp, Duration::from_secs(2))?;
        assert_eq!(r.outcome, Outcome::Answered, "{r:?}");
        let seen: std::net::SocketAddr = r
            .answer
            .as_deref()
            .unwrap_or("")
            .parse()
            .context("clientip answer")?;
        assert_eq!(seen.ip(), client_ip, "{protocol}: server saw {seen}");
        // The very socket the client used (UDP: unconnected, bound to 0.0.0.0:port).
        assert_eq!(
            Some(seen.port()),
            r.local.map(|l| l.port()),
            "{protocol}: the very socket the client used"
        );
    }
    Ok(())
}

#[test]
fn load_counts_every_answer() -> Result<()> {
    if skip_unless_root("load_counts_every_answer") {
        return Ok(());
    }
    let m = three_pods()?;
    let lab = up("load", &m)?;
    for (target, protocol) in [("web-2:8080", Protocol::Tcp), ("web-2:5353", Protocol::Udp)] {
        let r = lab.load("client", target, protocol, 50)?;
        assert_eq!(r.answered, 50, "{r:?}");
        assert_eq!(r.answers.get("web-2"), Some(&50));
        assert_eq!(r.samples_us.len(), 50);
        assert!(r.latency_us.p50 <= r.latency_us.p99 && r.latency_us.p99 <= r.latency_us.max);
    }
    Ok(())
}

#[test]
fn exec_runs_inside_the_pod() -> Result<()> {
    if skip_unless_root("exec_runs_inside_the_pod") {
        return Ok(());
    }
    let m = three_pods()?;
    let lab = up("exec", &m)?;
    let pod = lab.pod("web-1")?;
    let ip = pod.ip.context("no IP")?;

    let out = lab.exec_output("web-1", &["ip", "-4", "addr"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&format!("{ip}/32")),
        "ip -4 addr in the pod:\n{text}"
    );

    // Only the lab's routes: no default route.
    let out = lab.exec_output("default/web-1", &["ip", "-4", "route"])?;
    let routes = String::from_utf8_lossy(&out.stdout);
    assert!(
        routes.contains("169.254.1.1 dev eth0 scope link"),
        "{routes}"
    );
    assert!(routes.contains("10.244.0.0/16 via 169.254.1.1"), "{routes}");
    assert!(!routes.contains("default"), "{routes}");

    // In the pod's cgroup (cgroup2 visible: no `ip netns exec`).
    let out = lab.exec_output("web-1", &["cat", "/proc/self/cgroup"])?;
    let cg = String::from_utf8_lossy(&out.stdout);
    let expected = pod.cgroup.context("no cgroup")?;
    let rel = expected.to_string_lossy().into_owned();
    assert!(
        cg.lines()
            .any(|l| l.starts_with("0::") && rel.ends_with(&l[3..])),
        "cgroup of a process in the pod: {cg} (expected {rel})"
    );

    assert_eq!(
        lab.exec("web-1", &["sh", "-c", "exit 7"])?,
        7,
        "exit code propagated"
    );
    assert!(lab.exec("web-1", &["/nonexistent/program"]).is_err());
    Ok(())
}

#[test]
fn down_leaves_nothing() -> Result<()> {
    if skip_unless_root("down_leaves_nothing") {
        return Ok(());
    }
    let m = three_pods()?;
    let lab = up("down", &m)?;
    let name = lab.name().to_string();
    let state = lab.state()?;
    let processes = recorded_processes(&state);
    assert!(
        processes.len() >= 5,
        "supervisor and four servers: {processes:?}"
    );
    assert!(processes.iter().all(|p| p.alive()));
    assert!(!lab_traces(&name).is_empty());
    // Something started inside a pod by the user is the lab's too.
    let mut sleeper = lab.command("web-2", "sleep")?;
    let mut sleeper = sleeper.arg("600").spawn()?;
    let sleeper_ref = ProcRef::of(sleeper.id()).context("sleeper")?;

    lab.down()?;
    let _ = sleeper.wait();
    assert_gone(&name, &processes);
    assert!(!sleeper_ref.alive());
    Ok(())
}

#[test]
fn a_panicking_test_leaves_nothing() -> Result<()> {
    if skip_unless_root("a_panicking_test_leaves_nothing") {
        return Ok(());
    }
    let m = three_pods()?;
    let name = unique_name("panic");
    let opts = lab_options(&name, m.path());
    let seen = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::up(opts).expect("lab up");
        *seen.lock().unwrap() = recorded_processes(&lab.state().expect("state"));
        panic!("a test failing with the lab up");
    }));
    assert!(result.is_err());
    let processes = seen.into_inner().unwrap_or_default();
    assert!(!processes.is_empty());
    assert_gone(&name, &processes);
    Ok(())
}

#[test]
fn up_after_a_crash_cleans_the_leftovers() -> Result<()> {
    if skip_unless_root("up_after_a_crash_cleans_the_leftovers") {
        return Ok(());
    }
    let m = three_pods()?;
    let name = unique_name("crash");
    let first = Lab::up(lab_options(&name, m.path()))?;
    let before = first.state()?;
    let supervisor = before.supervisor.context("no supervisor")?;
    // The supervisor dies without cleaning up; servers and namespaces stay behind.
    assert!(supervisor.signal(libc::SIGKILL));
    assert!(supervisor.wait_gone(Duration::from_secs(5)));
    let orphans: Vec<ProcRef> = before.pods.iter().filter_map(|p| p.server).collect();
    assert!(
        orphans.iter().all(|p| p.alive()),
        "servers outlive their supervisor"
    );
    drop(first.keep()); // as if the process that ran `up` had gone

    let second = Lab::up(lab_options(&name, m.path()))?;
    assert!(!second.cleaned().is_empty(), "nothing reported cleaned");
    assert!(
        orphans.iter().all(|p| !p.alive()),
        "the crashed run's servers were not killed"
    );
    let r = second.probe("client", "web-1:8080", Protocol::Tcp)?;
    assert_eq!(r.answer.as_deref(), Some("web-1"), "{r:?}");
    let after = recorded_processes(&second.state()?);
    second.down()?;
    assert_gone(&name, &after);
    Ok(())
}

#[test]
fn refuses_a_second_up_of_a_running_lab() -> Result<()> {
    if skip_unless_root("refuses_a_second_up_of_a_running_lab") {
        return Ok(());
    }
    let m = three_pods()?;
    let lab = up("twice", &m)?;
    let err = Lab::up(lab_options(lab.name(), m.path())).expect_err("second up of a running lab");
    assert!(err.to_string().contains("already up"), "{err:#}");
    let r = lab.probe("client", "web-1:8080", Protocol::Tcp)?;
    assert_eq!(
        r.outcome,
        Outcome::Answered,
        "the running lab was disturbed: {r:?}"
    );
    Ok(())
}

fn wait_answer(lab: &Lab, from: &str, target: &str, want: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = lab.probe(from, target, Protocol::Tcp);
        if let Ok(r) = &r
            && r.answer.as_deref() == Some(want)
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{from} -> {target} never answered {want}: {r:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn manifest_changes_take_effect_without_restart() -> Result<()> {
    if skip_unless_root("manifest_changes_take_effect_without_restart") {
        return Ok(());
    }
    let m = three_pods()?;
    let lab = up("watch", &m)?;
    let name = lab.name().to_string();
    let supervisor = lab.state()?.supervisor;
    let cluster = lab.paths().cluster();

    // Add a pod: it gets a netns, an IP, a server, and appears in the rendered cluster.
    m.write(
        "new.yaml",
        &pod_yaml("late", &[("app", "web")], None, &[("http", 8080, "TCP")]),
    )?;
    let late = lab.wait_pod_ready("late", Duration::from_secs(20))?;
    wait_answer(&lab, "client", "late:8080", "late")?;
    let rendered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cluster.join("pod_default_late.json"))?)?;
    assert_eq!(
        rendered["status"]["podIP"],
        late.ip.context("no ip")?.to_string()
    );
    assert_eq!(rendered["status"]["phase"], "Running");

    // Declare a pod not ready in its manifest: rendered not ready, server still up.
    m.write(
        "new.yaml",
        &format!(
            "{}status:\n  conditions: [{{type: Ready, status: \"False\"}}]\n",
            pod_yaml("late", &[("app", "web")], None, &[("http", 8080, "TCP")])
        ),
    )?;
    lab.wait_for(
        "late to be rendered not ready",
        Duration::from_secs(20),
        |st| st.find_pod("late").is_ok_and(|p| !p.ready),
    )?;

    // Remove it: gone from the rendered cluster, its netns gone, its server stopped.
    let server = late.server.context("no server")?;
    let netns = late.netns.clone().context("no netns")?;
    m.remove("new.yaml")?;
    lab.wait_for("late to go", Duration::from_secs(20), |st| {
        st.find_pod("late").is_err()
    })?;
    assert!(!cluster.join("pod_default_late.json").exists());
    // The pod leaves the state (and the rendered cluster) before its
    // namespace is torn down, so traffic stops first: wait for the rest.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sluice_lab::netns::exists(&netns) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sluice_lab::netns::exists(&netns), "{netns} still there");
    assert!(
        server.wait_gone(Duration::from_secs(5)),
        "server of a removed pod still runs"
    );

    // A broken file is a problem, not a crash: the rest keeps running.
    m.write("broken.yaml", "kind: Pod\nmetadata: [")?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.state()?.supervisor, supervisor);
    assert!(
        supervisor.is_some_and(|s| s.alive()),
        "supervisor of {name} died"
    );
    wait_answer(&lab, "client", "web-1:8080", "web-1")?;
    Ok(())
}

#[test]
fn several_nodes_each_get_namespace_cgroup_and_daemon() -> Result<()> {
    if skip_unless_root("several_nodes_each_get_namespace_cgroup_and_daemon") {
        return Ok(());
    }
    let m = Manifests::new()?;
    m.write("nodes.yaml", &two_nodes_yaml())?;
    let pods: Vec<String> = ["p1", "p2", "p3", "p4"]
        .iter()
        .map(|n| pod_yaml(n, &[], None, &[("http", 80, "TCP")]))
        .collect();
    m.write("pods.yaml", &pods.join("---\n"))?;
    let lab = up("nodes", &m)?;
    let st = lab.state()?;
    let a = st.node("node-a").context("node-a")?;
    let b = st.node("node-b").context("node-b")?;
    assert_eq!(
        b.pod_cidr.to_string(),
        "10.244.7.0/24",
        "Node.spec.podCIDR is used"
    );
    assert_eq!(a.pod_cidr.to_string(), "10.244.0.0/24");
    assert_ne!(a.ip, b.ip);
    for n in [a, b] {
        assert!(sluice_lab::netns::exists(&n.netns), "{}", n.netns);
        assert!(n.cgroup.exists(), "{}", n.cgroup.display());
        if st.proxy.is_some() {
            assert!(
                n.proxy.is_some_and(|p| p.alive()) && n.proxy_ready,
                "node agent of {}",
                n.name
            );
        }
    }
    // Round robin in name order.
    let placed: Vec<(String, String)> = st
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.node.clone().unwrap_or_default()))
        .collect();
    let expect = [
        ("p1", "node-a"),
        ("p2", "node-b"),
        ("p3", "node-a"),
        ("p4", "node-b"),
    ];
    assert_eq!(placed, expect.map(|(p, n)| (p.to_string(), n.to_string())));
    for p in &st.pods {
        let node = st
            .node(p.node.as_deref().unwrap_or_default())
            .context("node")?;
        let ip: Ipv4Addr = p.ip.context("ip")?;
        assert!(
            node.pod_cidr.contains(&ip),
            "{} {ip} outside {}",
            p.name,
            node.pod_cidr
        );
        assert!(
            p.cgroup
                .as_ref()
                .is_some_and(|c| c.starts_with(&node.cgroup)),
            "{} cgroup",
            p.name
        );
    }
    // Same-node and cross-node traffic (over the underlay; more in multinode.rs).
    for (from, to) in [("p1", "p3"), ("p2", "p4"), ("p1", "p2"), ("p4", "p3")] {
        let r = lab.probe(from, &format!("{to}:80"), Protocol::Tcp)?;
        assert_eq!(r.answer.as_deref(), Some(to), "{from} -> {to}: {r:?}");
    }
    Ok(())
}

/// A stand-in node agent: a shell script (`body`) in a temp dir.
fn fake_agent(dir: &tempfile::TempDir, body: &str) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.path().join("fake-proxy");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[test]
fn up_fails_with_the_agent_log_when_it_never_gets_ready_and_tears_down() -> Result<()> {
    if skip_unless_root("up_fails_with_the_agent_log_when_it_never_gets_ready_and_tears_down") {
        return Ok(());
    }
    let m = three_pods()?;
    let bin = tempfile::tempdir()?;
    let agent = fake_agent(
        &bin,
        "echo 'fake agent: stuck before the first sync' >&2\nexec sleep 600",
    )?;
    let name = unique_name("stuck");
    let mut opts = lab_options(&name, m.path());
    opts.proxy = sluice_lab::ProxyMode::Binary(agent);
    opts.ready_timeout = Duration::from_secs(2);
    let err = Lab::up(opts).expect_err("an agent that never writes its ready file");
    let msg = format!("{err:#}");
    assert!(msg.contains("ready file"), "{msg}");
    assert!(
        msg.contains("fake agent: stuck before the first sync"),
        "no log tail in: {msg}"
    );
    assert_gone(&name, &[]);
    Ok(())
}

#[test]
fn up_fails_with_the_agent_log_when_it_exits() -> Result<()> {
    if skip_unless_root("up_fails_with_the_agent_log_when_it_exits") {
        return Ok(());
    }
    let m = three_pods()?;
    let bin = tempfile::tempdir()?;
    // Also checks the arguments the lab passes.
    let agent = fake_agent(
        &bin,
        "echo \"fake agent args: $*\" >&2\necho 'fake agent: cannot attach' >&2\nexit 3",
    )?;
    let name = unique_name("dies");
    let mut opts = lab_options(&name, m.path());
    opts.proxy = sluice_lab::ProxyMode::Binary(agent);
    let err = Lab::up(opts).expect_err("an agent that exits");
    let msg = format!("{err:#}");
    assert!(msg.contains("fake agent: cannot attach"), "{msg}");
    assert!(msg.contains("--node node-1"), "{msg}");
    assert!(msg.contains("--service-cidr 10.96.0.0/16"), "{msg}");
    assert!(
        msg.contains(&format!("/sluice-lab/{name}/node.node-1 ")),
        "{msg}"
    );
    assert_gone(&name, &[]);
    Ok(())
}
