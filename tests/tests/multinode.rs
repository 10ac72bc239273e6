//! Several nodes: nodes joined by the lab's underlay (one bridge, pod CIDRs routed between the
//! nodes, no overlay, no NAT), a ClusterIP reaching backends on every node from every node, and
//! the external client outside the cluster that reaches the nodes' addresses and nothing else.
//! Nothing of it survives `down` or a crashed supervisor.
//!
//! They need root (network namespaces, cgroups); without it they print SKIPPED and pass.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sluice_e2e::{
    Manifests, host_addresses_in_lab_ranges, host_links, lab_options, lab_traces, netns_links,
    netns_routes, node_yaml, node_yaml_with_ip, pod_yaml, service_yaml, skip_unless_root,
    sluice_bin, unique_name,
};
use sluice_lab::client::Ask;
use sluice_lab::process::ProcRef;
use sluice_lab::{Lab, LabState, Outcome, Protocol, ProxyMode, TargetSpec, names};

const WEB_IP: &str = "10.96.0.80";
const NODE_B_CIDR: &str = "10.244.7.0/24";

/// Two nodes; on each a web pod (TCP 8080, UDP 5353) and a client; a Service over both web pods.
fn two_nodes() -> Result<Manifests> {
    let m = Manifests::new()?;
    m.write(
        "nodes.yaml",
        &[
            node_yaml("node-a", None),
            node_yaml("node-b", Some(NODE_B_CIDR)),
        ]
        .join("---\n"),
    )?;
    let web = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    let pods = [
        pod_yaml("web-a", &[("app", "web")], Some("node-a"), &web),
        pod_yaml("web-b", &[("app", "web")], Some("node-b"), &web),
        pod_yaml("client-a", &[("app", "client")], Some("node-a"), &[]),
        pod_yaml("client-b", &[("app", "client")], Some("node-b"), &[]),
    ];
    m.write("pods.yaml", &pods.join("---\n"))?;
    m.write(
        "service.yaml",
        &service_yaml(
            "web",
            Some(WEB_IP),
            &[("app", "web")],
            &[("http", 80, 8080, "TCP"), ("dns", 53, 5353, "UDP")],
        ),
    )?;
    Ok(m)
}

fn up(prefix: &str, m: &Manifests, proxy: Option<ProxyMode>) -> Result<Lab> {
    let mut opts = lab_options(&unique_name(prefix), m.path());
    if let Some(mode) = proxy {
        opts.proxy = mode;
    }
    Lab::up(opts)
}

fn answered(lab: &Lab, from: &str, target: &str, protocol: Protocol) -> Result<String> {
    let r = lab.probe(from, target, protocol)?;
    match (r.outcome, r.answer) {
        (Outcome::Answered, Some(a)) => Ok(a),
        _ => bail!(
            "{from} -> {target}/{protocol}: {:?} ({:?})",
            r.outcome,
            r.error
        ),
    }
}

/// The address the server at `target` saw the client at.
fn seen_client(lab: &Lab, from: &str, host: &str, port: u16, protocol: Protocol) -> Result<IpAddr> {
    let target = TargetSpec {
        host: host.into(),
        port,
        protocol,
    };
    let r = lab.probe_asking(from, &target, Ask::ClientIp, Duration::from_secs(2))?;
    let answer = r
        .answer
        .as_deref()
        .with_context(|| format!("{from} -> {target}: no answer: {r:?}"))?;
    Ok(answer
        .parse::<SocketAddr>()
        .with_context(|| format!("clientip answer {answer:?}"))?
        .ip())
}

fn outcome(lab: &Lab, from: &str, target: &str, protocol: Protocol) -> Result<Outcome> {
    Ok(lab.probe(from, target, protocol)?.outcome)
}

#[test]
fn pods_on_different_nodes_reach_each_other_by_pod_ip_without_nat() -> Result<()> {
    if skip_unless_root("pods_on_different_nodes_reach_each_other_by_pod_ip_without_nat") {
        return Ok(());
    }
    let m = two_nodes()?;
    let lab = up("mnpod", &m, None)?;
    let st = lab.state()?;
    let a = st.node("node-a").context("node-a")?;
    let b = st.node("node-b").context("node-b")?;
    for (pod, node) in [("web-a", a), ("client-a", a), ("web-b", b), ("client-b", b)] {
        let p = lab.pod(pod)?;
        assert_eq!(p.node.as_deref(), Some(node.name.as_str()), "{pod}");
        let ip = p.ip.context("no pod IP")?;
        assert!(
            node.pod_cidr.contains(&ip),
            "{pod} {ip} outside {}",
            node.pod_cidr
        );
    }
    assert_eq!(b.pod_cidr.to_string(), NODE_B_CIDR);

    // Each node routes the other's pod CIDR via the other's address on the underlay.
    let routes_a = netns_routes(&a.netns);
    assert!(
        routes_a.contains(&format!("{} via {} dev eth0", b.pod_cidr, b.ip)),
        "{}:\n{routes_a}",
        a.netns
    );
    let routes_b = netns_routes(&b.netns);
    assert!(
        routes_b.contains(&format!("{} via {} dev eth0", a.pod_cidr, a.ip)),
        "{}:\n{routes_b}",
        b.netns
    );
    for routes in [&routes_a, &routes_b] {
        assert!(!routes.contains("default"), "{routes}");
    }

    for (from, to) in [
        ("web-a", "web-b"),
        ("web-b", "web-a"),
        ("client-a", "web-b"),
        ("client-b", "web-a"),
    ] {
        let to_ip = lab.pod_ip(to)?;
        let from_ip = lab.pod_ip(from)?;
        for (port, protocol) in [(8080, Protocol::Tcp), (5353, Protocol::Udp)] {
            let r = lab.probe(from, &format!("{to_ip}:{port}"), protocol)?;
            assert_eq!(
                (r.outcome, r.answer.as_deref()),
                (Outcome::Answered, Some(to)),
                "{from} -> {to} {protocol}: {r:?}"
            );
            assert_eq!(
                r.peer,
                Some(SocketAddr::from((to_ip, port))),
                "{from} -> {to} {protocol}: the reply comes from the pod"
            );
            // No NAT between nodes: the server sees the client pod's own address.
            let seen = seen_client(&lab, from, to, port, protocol)?;
            assert_eq!(seen, IpAddr::V4(from_ip), "{from} -> {to} {protocol}");
        }
    }

    // Pods reach the other node's address too (nothing listens on port 9: refused).
    let r = lab.probe("client-a", &format!("{}:9", b.ip), Protocol::Tcp)?;
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    // Still nothing outside the lab's ranges.
    let r = lab.probe("client-a", "192.0.2.1:80", Protocol::Tcp)?;
    assert_eq!(r.outcome, Outcome::Unreachable, "{r:?}");
    Ok(())
}

#[test]
fn a_cluster_ip_from_either_node_reaches_backends_on_both_nodes() -> Result<()> {
    if skip_unless_root("a_cluster_ip_from_either_node_reaches_backends_on_both_nodes") {
        return Ok(());
    }
    let m = two_nodes()?;
    // The socket programs of the node agents do the translation: they must run.
    let lab = up("mncip", &m, Some(ProxyMode::Required))?;
    let both: BTreeSet<String> = ["web-a", "web-b"].map(String::from).into();
    for client in ["client-a", "client-b"] {
        for (port, protocol) in [(80, Protocol::Tcp), (53, Protocol::Udp)] {
            let target = format!("{WEB_IP}:{port}");
            let r = lab.load(client, &target, protocol, 60)?;
            assert_eq!(r.answered, 60, "{client} -> {target}/{protocol}: {r:?}");
            let answers: BTreeSet<String> = r.answers.keys().cloned().collect();
            assert_eq!(
                answers, both,
                "{client} -> {target}/{protocol}: backends on both nodes answer: {r:?}"
            );
        }
        // Whichever node the backend is on, it sees the client pod's address.
        let client_ip = IpAddr::V4(lab.pod_ip(client)?);
        for (port, protocol) in [(80, Protocol::Tcp), (53, Protocol::Udp)] {
            for _ in 0..10 {
                let seen = seen_client(&lab, client, "web", port, protocol)?;
                assert_eq!(seen, client_ip, "{client} -> web:{port}/{protocol}");
            }
        }
    }
    Ok(())
}

#[test]
fn the_external_client_reaches_node_addresses_and_nothing_else() -> Result<()> {
    if skip_unless_root("the_external_client_reaches_node_addresses_and_nothing_else") {
        return Ok(());
    }
    let m = two_nodes()?;
    // With the node agents running: they must not translate for the external client.
    let lab = up("mnext", &m, Some(ProxyMode::Required))?;
    let st = lab.state()?;
    let x = st.external.clone().context("no external client")?;
    assert_eq!(x.ip, sluice_lab::addr::EXTERNAL_IP);
    assert_eq!(x.netns, names::external_netns(lab.name()));

    // Every node address answers (nothing listens on port 9: refused, TCP and UDP).
    for node in &st.nodes {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let r = lab.probe(names::EXTERNAL, &format!("{}:9", node.ip), protocol)?;
            assert_eq!(
                r.outcome,
                Outcome::Refused,
                "external -> {}: {r:?}",
                node.name
            );
        }
        // Nodes by name too.
        let r = lab.probe(names::EXTERNAL, &format!("{}:9", node.name), Protocol::Tcp)?;
        assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    }
    // No pod address, no cluster IP: no route at all.
    for target in [
        format!("{}:8080", lab.pod_ip("web-a")?),
        format!("{}:8080", lab.pod_ip("web-b")?),
        format!("{WEB_IP}:80"),
        "web:80".to_string(),
    ] {
        assert_eq!(
            outcome(&lab, names::EXTERNAL, &target, Protocol::Tcp)?,
            Outcome::Unreachable,
            "external -> {target}"
        );
    }
    for target in [
        format!("{}:5353", lab.pod_ip("web-b")?),
        format!("{WEB_IP}:53"),
    ] {
        assert_eq!(
            outcome(&lab, names::EXTERNAL, &target, Protocol::Udp)?,
            Outcome::Unreachable,
            "external -> {target}/udp"
        );
    }

    // Its routes: the node network on its own link, nothing else.
    let out = lab.exec_output(names::EXTERNAL, &["ip", "-4", "route"])?;
    let routes = String::from_utf8_lossy(&out.stdout);
    let routes: Vec<&str> = routes.lines().collect();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert!(
        routes[0].starts_with("172.18.0.0/16 dev eth0"),
        "{routes:?}"
    );
    // Its own cgroup, outside every node's (no node agent's socket programs apply).
    let out = lab.exec_output(names::EXTERNAL, &["cat", "/proc/self/cgroup"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let cg = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup2 line")?;
    assert!(
        x.cgroup.to_string_lossy().ends_with(cg),
        "{cg} is not {}",
        x.cgroup.display()
    );
    for node in &st.nodes {
        assert!(!x.cgroup.starts_with(&node.cgroup), "inside {}", node.name);
    }

    // The CLI: `probe external …`, `exec external -- …`, status shows both.
    let cli = |args: &[&str]| -> Result<std::process::Output> {
        Command::new(sluice_bin())
            .args(["lab"])
            .args(args)
            .env("SLUICE_LAB", lab.name())
            .output()
            .context("running the CLI")
    };
    let a_ip = st.node("node-a").context("node-a")?.ip;
    let out = cli(&["probe", "external", &format!("{a_ip}:9")])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "refused");
    let out = cli(&["probe", "external", "web-a:8080"])?;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "unreachable");
    let out = cli(&["exec", "external", "--", "ip", "-4", "-o", "addr"])?;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{}/16", x.ip)),
        "{out:?}"
    );
    let out = cli(&["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for want in [
        names::underlay_netns(lab.name()),
        x.netns.clone(),
        x.ip.to_string(),
        "bridge br0".into(),
    ] {
        assert!(text.contains(&want), "status lacks {want}:\n{text}");
    }
    let out = cli(&["status", "-o", "json"])?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["external"]["ip"], x.ip.to_string());
    assert_eq!(json["underlay"]["bridge"], "br0");
    assert_eq!(json["nodes"][0]["underlay_port"], "n0");
    Ok(())
}

#[test]
fn nodes_that_join_and_leave_are_routed_and_unrouted() -> Result<()> {
    if skip_unless_root("nodes_that_join_and_leave_are_routed_and_unrouted") {
        return Ok(());
    }
    let m = two_nodes()?;
    let lab = up("mnjoin", &m, None)?;
    // A node whose address lies outside the node network, with a pod.
    let c_ip = Ipv4Addr::new(192, 168, 50, 5);
    m.write(
        "node-c.yaml",
        &[
            node_yaml_with_ip("node-c", None, &c_ip.to_string()),
            pod_yaml("web-c", &[], Some("node-c"), &[("http", 8080, "TCP")]),
        ]
        .join("---\n"),
    )?;
    lab.wait_pod_ready("web-c", Duration::from_secs(30))?;
    let c = lab.node("node-c")?;
    assert_eq!(c.ip, c_ip);
    let web_c = lab.pod_ip("web-c")?;
    assert!(c.pod_cidr.contains(&web_c));

    // Pods made before node-c reach it and its pod; its pod reaches the others.
    assert_eq!(
        answered(&lab, "client-a", &format!("{web_c}:8080"), Protocol::Tcp)?,
        "web-c"
    );
    assert_eq!(
        answered(&lab, "web-c", "web-b:8080", Protocol::Tcp)?,
        "web-b"
    );
    for from in ["client-a", names::EXTERNAL] {
        assert_eq!(
            outcome(&lab, from, "node-c:9", Protocol::Tcp)?,
            Outcome::Refused,
            "{from} -> node-c"
        );
    }

    // node-c goes: nobody routes to it any more, its uplink leaves the bridge.
    let st = lab.state()?;
    let port = c.underlay_port.clone().context("no underlay port")?;
    let u = st.underlay.clone().context("no underlay")?;
    assert!(netns_links(&u.netns).contains(&port));
    m.remove("node-c.yaml")?;
    lab.wait_for("node-c to go", Duration::from_secs(30), |st| {
        st.node("node-c").is_none()
    })?;
    let others: Vec<String> = st
        .nodes
        .iter()
        .filter(|n| n.name != "node-c")
        .map(|n| n.netns.clone())
        .chain([st.external.clone().context("no external")?.netns])
        .collect();
    for ns in others {
        let routes = netns_routes(&ns);
        assert!(
            !routes.contains(&c.pod_cidr.to_string()) && !routes.contains(&c_ip.to_string()),
            "{ns} still routes to node-c:\n{routes}"
        );
    }
    assert!(!netns_links(&u.netns).contains(&port), "{port} left");
    assert!(!sluice_lab::netns::exists(&c.netns));
    // The rest still works.
    assert_eq!(
        answered(&lab, "client-a", "web-b:8080", Protocol::Tcp)?,
        "web-b"
    );
    Ok(())
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

/// Links of the host's own netns named like something a lab makes.
fn lab_like_host_links() -> BTreeSet<String> {
    host_links()
        .into_iter()
        .filter(|l| {
            l.starts_with("slv")
                || l == "br0"
                || l == "ext"
                || (l.starts_with('n') && l[1..].chars().all(|c| c.is_ascii_digit()))
        })
        .collect()
}

fn assert_gone(name: &str, processes: &[ProcRef]) {
    let traces = lab_traces(name);
    assert!(traces.is_empty(), "lab {name} left: {traces:#?}");
    for ns in [names::underlay_netns(name), names::external_netns(name)] {
        assert!(!sluice_lab::netns::exists(&ns), "{ns} left");
    }
    let alive: Vec<_> = processes.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "lab {name} left processes: {alive:?}");
}

#[test]
fn down_removes_the_underlay_and_the_external_client() -> Result<()> {
    if skip_unless_root("down_removes_the_underlay_and_the_external_client") {
        return Ok(());
    }
    let links_before = lab_like_host_links();
    let m = two_nodes()?;
    let lab = up("mndown", &m, None)?;
    let name = lab.name().to_string();
    let st = lab.state()?;
    let u = st.underlay.clone().context("no underlay")?;
    let x = st.external.clone().context("no external")?;
    let links = netns_links(&u.netns);
    for want in ["br0", "n0", "n1", "ext"] {
        assert!(links.iter().any(|l| l == want), "{want} not in {links:?}");
    }
    assert!(x.cgroup.exists());
    // The lab never touches the host's network namespace.
    assert_eq!(lab_like_host_links(), links_before);
    assert_eq!(host_addresses_in_lab_ranges(), Vec::<String>::new());

    // Something started in the external client is the lab's too.
    let mut sleeper = lab.command(names::EXTERNAL, "sleep")?;
    let mut sleeper = sleeper.arg("600").spawn()?;
    let sleeper_ref = ProcRef::of(sleeper.id()).context("sleeper")?;
    let processes = recorded_processes(&st);

    lab.down()?;
    let _ = sleeper.wait();
    assert!(
        !sleeper_ref.alive(),
        "a process in the external client survived"
    );
    assert_gone(&name, &processes);
    assert!(!x.cgroup.exists());
    assert_eq!(lab_like_host_links(), links_before);
    assert_eq!(host_addresses_in_lab_ranges(), Vec::<String>::new());
    Ok(())
}

#[test]
fn the_leftovers_of_a_crashed_multi_node_lab_are_swept() -> Result<()> {
    if skip_unless_root("the_leftovers_of_a_crashed_multi_node_lab_are_swept") {
        return Ok(());
    }
    let m = two_nodes()?;
    let name = unique_name("mncrash");
    let first = Lab::up(lab_options(&name, m.path()))?;
    let st = first.state()?;
    let mut sleeper = first.command(names::EXTERNAL, "sleep")?;
    let mut sleeper = sleeper.arg("600").spawn()?;
    let sleeper_ref = ProcRef::of(sleeper.id()).context("sleeper")?;
    let supervisor = st.supervisor.context("no supervisor")?;
    // The supervisor dies without cleaning up: underlay, external client and nodes stay.
    assert!(supervisor.signal(libc::SIGKILL));
    assert!(supervisor.wait_gone(Duration::from_secs(5)));
    drop(first.keep());
    for ns in [names::underlay_netns(&name), names::external_netns(&name)] {
        assert!(
            sluice_lab::netns::exists(&ns),
            "{ns} should outlive the supervisor"
        );
    }

    // A second `up` of the same lab sweeps them first and builds everything anew.
    let second = Lab::up(lab_options(&name, m.path()))?;
    let _ = sleeper.wait();
    assert!(
        !sleeper_ref.alive(),
        "the crashed run's external process survived"
    );
    assert!(
        second
            .cleaned()
            .netns
            .contains(&names::underlay_netns(&name))
            && second
                .cleaned()
                .netns
                .contains(&names::external_netns(&name)),
        "{:?}",
        second.cleaned()
    );
    assert_eq!(
        answered(&second, "client-a", "web-b:8080", Protocol::Tcp)?,
        "web-b"
    );
    assert_eq!(
        outcome(&second, names::EXTERNAL, "node-b:9", Protocol::Tcp)?,
        Outcome::Refused
    );

    // And `down` after another crash removes them too.
    let processes = recorded_processes(&second.state()?);
    let supervisor = second.state()?.supervisor.context("no supervisor")?;
    assert!(supervisor.signal(libc::SIGKILL));
    assert!(supervisor.wait_gone(Duration::from_secs(5)));
    let root = sluice_lab::cgroup::cgroup2_root()?;
    let removed = sluice_lab::cleanup::down(&name, &root)?;
    drop(second.keep());
    assert!(
        removed.netns.contains(&names::underlay_netns(&name)),
        "{removed:?}"
    );
    assert_gone(&name, &processes);
    Ok(())
}
