//! Dual-stack, as a kind cluster with `ipFamily: dual`: every node and pod has an IPv4 and an
//! IPv6 address, pods on different nodes reach each other over IPv6 without NAT, a
//! PreferDualStack Service answers on both of its cluster IPs and an IPv6 single-stack Service
//! on its IPv6 one, with backends on both nodes; the external client reaches the nodes' IPv6
//! addresses and no pod's. Nothing of it survives `down`.
//!
//! They need root (network namespaces, cgroups); without it they print SKIPPED and pass.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sluice_e2e::{
    Manifests, dual_service_yaml, host_addresses_in_lab_ranges, lab_options, lab_traces,
    netns_routes6, pod_yaml, service_yaml, skip_unless_root, two_nodes_yaml, unique_name,
};
use sluice_lab::addr::{EXTERNAL_IP6, NODE_NETWORK6, POD_SUPERNET6};
use sluice_lab::client::Ask;
use sluice_lab::{Lab, LoadReport, Outcome, Protocol, ProxyMode, TargetSpec, names};

/// Two nodes (node-b with a pod CIDR of its own, whose IPv6 twin the lab derives); a web pod
/// (TCP 8080, UDP 5353) on each and a client on node-a; Services over both web pods.
fn manifests() -> Result<Manifests> {
    let m = Manifests::new()?;
    m.write("nodes.yaml", &two_nodes_yaml())?;
    let web = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    let pods = [
        pod_yaml("web-a", &[("app", "web")], Some("node-a"), &web),
        pod_yaml("web-b", &[("app", "web")], Some("node-b"), &web),
        pod_yaml("client-a", &[("app", "client")], Some("node-a"), &[]),
    ];
    m.write("pods.yaml", &pods.join("---\n"))?;
    let ports = [("http", 80, 8080, "TCP"), ("dns", 53, 5353, "UDP")];
    m.write(
        "services.yaml",
        &[
            dual_service_yaml("web", "PreferDualStack", &[], &[("app", "web")], &ports),
            dual_service_yaml("web6", "SingleStack", &["IPv6"], &[("app", "web")], &ports),
            // The API server refuses an IPv6 cluster IP outside the service CIDR.
            service_yaml("bad6", Some("\"fd00:99::1\""), &[("app", "web")], &ports),
        ]
        .join("---\n"),
    )?;
    Ok(m)
}

fn up(prefix: &str, m: &Manifests) -> Result<Lab> {
    let mut opts = lab_options(&unique_name(prefix), m.path());
    // The node agents' socket programs translate the cluster IPs: they must run.
    opts.proxy = ProxyMode::Required;
    Lab::up(opts)
}

fn target(addr: SocketAddr, protocol: Protocol) -> TargetSpec {
    TargetSpec {
        host: addr.ip().to_string(),
        port: addr.port(),
        protocol,
    }
}

fn load(lab: &Lab, from: &str, to: SocketAddr, protocol: Protocol, n: u64) -> Result<LoadReport> {
    lab.load_target(from, &target(to, protocol), n, Duration::from_secs(2))
}

/// The address the server at `to` saw the client at.
fn seen_client(lab: &Lab, from: &str, to: SocketAddr, protocol: Protocol) -> Result<IpAddr> {
    let r = lab.probe_asking(
        from,
        &target(to, protocol),
        Ask::ClientIp,
        Duration::from_secs(2),
    )?;
    let answer = r
        .answer
        .as_deref()
        .with_context(|| format!("{from} -> {to}/{protocol}: no answer: {r:?}"))?;
    Ok(answer
        .parse::<SocketAddr>()
        .with_context(|| format!("clientip answer {answer:?}"))?
        .ip())
}

#[test]
fn pods_on_different_nodes_reach_each_other_by_ipv6_pod_ip_without_nat() -> Result<()> {
    if skip_unless_root("pods_on_different_nodes_reach_each_other_by_ipv6_pod_ip_without_nat") {
        return Ok(());
    }
    let m = manifests()?;
    let lab = up("dspod", &m)?;
    let st = lab.state()?;
    let a = st.node("node-a").context("node-a")?;
    let b = st.node("node-b").context("node-b")?;
    let (a_cidr6, b_cidr6) = (
        a.pod_cidr6.context("node-a has no IPv6 pod CIDR")?,
        b.pod_cidr6.context("node-b has no IPv6 pod CIDR")?,
    );
    // The twins of the IPv4 plan: node-b's own 10.244.7.0/24 is fd00:10:244:7::/64.
    assert_eq!(a_cidr6.to_string(), "fd00:10:244::/64");
    assert_eq!(b_cidr6.to_string(), "fd00:10:244:7::/64");
    assert_eq!(lab.node_ip6("node-a")?.to_string(), "fd00:172:18::2");
    for (pod, cidr6) in [
        ("web-a", a_cidr6),
        ("web-b", b_cidr6),
        ("client-a", a_cidr6),
    ] {
        let ip6 = lab.pod_ip6(pod)?;
        assert!(cidr6.contains(&ip6), "{pod}: {ip6} outside {cidr6}");
    }
    // Each node routes the other's IPv6 pod CIDR via the other's IPv6 address.
    let routes_a = netns_routes6(&a.netns);
    assert!(
        routes_a.contains(&format!(
            "{b_cidr6} via {} dev eth0",
            b.ip6.context("node-b ip6")?
        )),
        "{routes_a}"
    );
    // No default route anywhere: nothing leaves the machine over IPv6 either.
    let client_ns = lab.pod("client-a")?.netns.context("client netns")?;
    for ns in [a.netns.as_str(), b.netns.as_str(), client_ns.as_str()] {
        let routes = netns_routes6(ns);
        assert!(!routes.contains("default"), "{ns}:\n{routes}");
    }

    let client6 = IpAddr::V6(lab.pod_ip6("client-a")?);
    for (pod, port) in [("web-b", 8080), ("web-a", 8080), ("web-b", 5353)] {
        let protocol = if port == 5353 {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        let to = SocketAddr::new(lab.pod_ip6(pod)?.into(), port);
        let r = lab.probe_target("client-a", &target(to, protocol), Duration::from_secs(2))?;
        assert_eq!(
            (r.outcome, r.answer.as_deref()),
            (Outcome::Answered, Some(pod)),
            "client-a -> {to}/{protocol}: {r:?}"
        );
        // Routed, not translated: the server sees the client's own IPv6 address.
        assert_eq!(seen_client(&lab, "client-a", to, protocol)?, client6);
    }

    // What the node agents read: both families, IPv4 first.
    let rendered: serde_json::Value = serde_json::from_slice(&std::fs::read(
        lab.paths().cluster().join("pod_default_web-b.json"),
    )?)?;
    assert_eq!(
        rendered["status"]["podIP"],
        lab.pod_ip("web-b")?.to_string()
    );
    assert_eq!(
        rendered["status"]["podIPs"][1]["ip"],
        lab.pod_ip6("web-b")?.to_string()
    );
    Ok(())
}

#[test]
fn dual_stack_services_answer_on_each_cluster_ip_from_backends_on_both_nodes() -> Result<()> {
    if skip_unless_root("dual_stack_services_answer_on_each_cluster_ip_from_backends_on_both_nodes")
    {
        return Ok(());
    }
    let m = manifests()?;
    let lab = up("dssvc", &m)?;
    let st = lab.state()?;
    let service = |name: &str| {
        st.services
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .with_context(|| format!("no Service {name} in {:?}", st.services))
    };
    let web = service("web")?;
    let [v4, v6] = web.cluster_ips.as_slice() else {
        bail!("web has not two cluster IPs: {web:?}");
    };
    assert!(v4.is_ipv4() && v6.is_ipv6(), "IPv4 first: {web:?}");
    assert_eq!(web.cluster_ip, Some(*v4));
    let web6 = service("web6")?;
    assert_eq!(web6.cluster_ips.len(), 1, "{web6:?}");
    let only6 = web6.cluster_ip.context("web6 has no cluster IP")?;
    assert!(only6.is_ipv6(), "{web6:?}");

    // The refused Service is reported by name and field and left out; the others work.
    assert!(
        st.render_problems.iter().any(|p| p
            .starts_with("Service default/bad6: spec.clusterIPs[0]:")
            && p.contains("fd00:99::1")),
        "{:?}",
        st.render_problems
    );
    assert!(service("bad6").is_err());

    let both: BTreeSet<String> = ["web-a", "web-b"].map(String::from).into();
    let client6 = IpAddr::V6(lab.pod_ip6("client-a")?);
    let client4 = IpAddr::V4(lab.pod_ip("client-a")?);
    for ip in [*v6, *v4, only6] {
        for (port, protocol) in [(80, Protocol::Tcp), (53, Protocol::Udp)] {
            let to = SocketAddr::new(ip, port);
            let r = load(&lab, "client-a", to, protocol, 60)?;
            assert_eq!(r.answered, 60, "client-a -> {to}/{protocol}: {r:?}");
            let answers: BTreeSet<String> = r.answers.keys().cloned().collect();
            assert_eq!(
                answers, both,
                "client-a -> {to}/{protocol}: backends on both nodes answer: {r:?}"
            );
            // Endpoints of the cluster IP's family: the backend sees the client's address
            // of that family.
            let want = if ip.is_ipv6() { client6 } else { client4 };
            for _ in 0..6 {
                assert_eq!(seen_client(&lab, "client-a", to, protocol)?, want, "{to}");
            }
        }
    }
    // By name, a Service is its primary cluster IP: web6's is IPv6.
    let r = lab.probe("client-a", "web6:80", Protocol::Tcp)?;
    assert_eq!(r.target.ip(), only6, "{r:?}");
    assert_eq!(r.outcome, Outcome::Answered, "{r:?}");
    Ok(())
}

#[test]
fn the_external_client_reaches_node_ipv6_addresses_and_no_pod() -> Result<()> {
    if skip_unless_root("the_external_client_reaches_node_ipv6_addresses_and_no_pod") {
        return Ok(());
    }
    let m = manifests()?;
    let lab = up("dsext", &m)?;
    let name = lab.name().to_string();
    let st = lab.state()?;
    let x = st.external.clone().context("no external client")?;
    assert_eq!(x.ip6, Some(EXTERNAL_IP6));

    for node in &st.nodes {
        let ip6 = node
            .ip6
            .with_context(|| format!("{} has no IPv6", node.name))?;
        assert!(NODE_NETWORK6.contains(&ip6));
        // Nothing listens on port 9: the node itself answers "refused", so it was reached.
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let to = SocketAddr::new(ip6.into(), 9);
            let r = lab.probe_target(
                names::EXTERNAL,
                &target(to, protocol),
                Duration::from_secs(2),
            )?;
            assert_eq!(
                r.outcome,
                Outcome::Refused,
                "external -> {to}/{protocol}: {r:?}"
            );
        }
        // The node's Node object lists an InternalIP of each family (where NodePorts listen).
        let node_json: serde_json::Value = serde_json::from_slice(&std::fs::read(
            lab.paths()
                .cluster()
                .join(format!("node_{}.json", node.name)),
        )?)?;
        let internal: Vec<String> = node_json["status"]["addresses"]
            .as_array()
            .context("no addresses")?
            .iter()
            .filter(|a| a["type"] == "InternalIP")
            .filter_map(|a| a["address"].as_str().map(String::from))
            .collect();
        assert_eq!(internal, [node.ip.to_string(), ip6.to_string()]);
    }
    // Pods are not routed from outside: no route to them, and traffic does not get there.
    let routes = netns_routes6(&x.netns);
    assert!(!routes.contains("default"), "{routes}");
    let routes_pods = routes.lines().any(|l| {
        let dst = l.split_whitespace().next().unwrap_or("");
        let net = dst
            .parse::<ipnet::Ipv6Net>()
            .or_else(|_| dst.parse::<std::net::Ipv6Addr>().map(ipnet::Ipv6Net::from));
        net.is_ok_and(|n| POD_SUPERNET6.contains(&n.network()) || n.contains(&POD_SUPERNET6))
    });
    assert!(!routes_pods, "external client routes pods:\n{routes}");
    for pod in ["web-a", "web-b"] {
        let to = SocketAddr::new(lab.pod_ip6(pod)?.into(), 8080);
        let r = lab.probe_target(
            names::EXTERNAL,
            &target(to, Protocol::Tcp),
            Duration::from_secs(2),
        )?;
        assert_eq!(
            r.outcome,
            Outcome::Unreachable,
            "external -> {pod} {to}: {r:?}"
        );
    }

    // Everything IPv6 lived in the lab's namespaces: gone with them.
    lab.down()?;
    assert_eq!(lab_traces(&name), Vec::<String>::new());
    assert_eq!(host_addresses_in_lab_ranges(), Vec::<String>::new());
    Ok(())
}
