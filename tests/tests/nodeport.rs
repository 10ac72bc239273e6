//! Traffic from outside the cluster: NodePort, LoadBalancer IPs and externalIPs, translated
//! per packet by the tc programs on each node's uplink, from the lab's external client.
//!
//! Two nodes; `web-a` runs on node-a, `web-b` on node-b. They need root (network namespaces,
//! cgroups, BPF); without it they print SKIPPED and pass.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sluice_e2e::{Manifests, lab_options, node_yaml, pod_yaml, skip_unless_root, unique_name};
use sluice_lab::addr::{EXTERNAL_IP, EXTERNAL_IP6};
use sluice_lab::client::Ask;
use sluice_lab::{Lab, Outcome, Protocol, ProxyMode, TargetSpec, names};

const NODE_B_CIDR: &str = "10.244.7.0/24";
/// Load balancer and external addresses: a range the lab's node network does not cover, routed
/// by the external client through node-a (as a router or MetalLB speaker would).
const LB_ROUTE: &str = "198.18.0.0/24";

fn pods_and_nodes(m: &Manifests, web_a_extra: &str) -> Result<()> {
    m.write(
        "nodes.yaml",
        &[
            node_yaml("node-a", None),
            node_yaml("node-b", Some(NODE_B_CIDR)),
        ]
        .join("---\n"),
    )?;
    let web = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    let mut web_a = pod_yaml(
        "web-a",
        &[("app", "web"), ("at", "a")],
        Some("node-a"),
        &web,
    );
    web_a = web_a.replacen("metadata:\n", &format!("metadata:\n{web_a_extra}"), 1);
    let pods = [
        web_a,
        pod_yaml(
            "web-b",
            &[("app", "web"), ("at", "b")],
            Some("node-b"),
            &web,
        ),
        pod_yaml("client-a", &[("app", "client")], Some("node-a"), &[]),
    ];
    m.write("pods.yaml", &pods.join("---\n"))
}

const SERVICES: &str = r#"
# Backends only on node-b: from node-a they are remote.
apiVersion: v1
kind: Service
metadata: {name: remote}
spec:
  type: NodePort
  selector: {at: b}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}
---
apiVersion: v1
kind: Service
metadata: {name: local}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 30900
  selector: {at: b}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30081}
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  selector: {app: web}
  externalIPs: [198.18.0.21]
  loadBalancerSourceRanges: [172.18.255.254/32]
  ports:
  - {name: http, port: 80, targetPort: 8080}
status:
  loadBalancer:
    ingress: [{ip: 198.18.0.20}]
---
apiVersion: v1
kind: Service
metadata: {name: lb-closed}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  selector: {app: web}
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports:
  - {name: http, port: 80, targetPort: 8080}
status:
  loadBalancer:
    ingress: [{ip: 198.18.0.30}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  type: NodePort
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30082}
---
apiVersion: v1
kind: Service
metadata: {name: both}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30083}
---
# Dual-stack, backends only on node-b: NodePorts on both families of every node.
apiVersion: v1
kind: Service
metadata: {name: dual}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  selector: {at: b}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30085}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30086}
---
# IPv6 only, with IPv6 load balancer addresses: one open to the external client, one whose
# source ranges are IPv4 only (so no IPv6 client may pass).
apiVersion: v1
kind: Service
metadata: {name: lb6}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  selector: {app: web}
  loadBalancerSourceRanges: ["fd00:172:18::fffe/128"]
  ports:
  - {name: http, port: 80, targetPort: 8080}
status:
  loadBalancer:
    ingress: [{ip: "fd00:198:18::20"}]
---
apiVersion: v1
kind: Service
metadata: {name: lb6-closed}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  selector: {app: web}
  loadBalancerSourceRanges: [172.18.255.254/32]
  ports:
  - {name: http, port: 80, targetPort: 8080}
status:
  loadBalancer:
    ingress: [{ip: "fd00:198:18::30"}]
"#;

/// IPv6 load balancer addresses, routed by the external client through node-a like [`LB_ROUTE`].
const LB_ROUTE6: &str = "fd00:198:18::/64";

fn up(prefix: &str) -> Result<(Lab, Manifests)> {
    let m = Manifests::new()?;
    pods_and_nodes(&m, "")?;
    m.write("services.yaml", SERVICES)?;
    let mut opts = lab_options(&unique_name(prefix), m.path());
    opts.proxy = ProxyMode::Required;
    let lab = Lab::up(opts)?;
    Ok((lab, m))
}

fn target(host: &str, port: u16, protocol: Protocol) -> TargetSpec {
    TargetSpec {
        host: host.into(),
        port,
        protocol,
    }
}

/// What `from` gets asking `to` (ip:port) for `ask`: the answer, or the outcome.
fn ask(
    lab: &Lab,
    from: &str,
    to: SocketAddr,
    protocol: Protocol,
    what: Ask,
) -> Result<Result<String, Outcome>> {
    let t = target(&to.ip().to_string(), to.port(), protocol);
    let r = lab.probe_asking(from, &t, what, Duration::from_secs(2))?;
    Ok(match (r.outcome, r.answer) {
        (Outcome::Answered, Some(a)) => Ok(a),
        (outcome, _) => Err(outcome),
    })
}

fn hostname(lab: &Lab, from: &str, to: SocketAddr, protocol: Protocol) -> Result<String> {
    ask(lab, from, to, protocol, Ask::Hostname)?
        .map_err(|o| anyhow::anyhow!("{from} -> {to}/{protocol}: {o:?}"))
}

fn client_ip(lab: &Lab, from: &str, to: SocketAddr, protocol: Protocol) -> Result<IpAddr> {
    let answer = ask(lab, from, to, protocol, Ask::ClientIp)?
        .map_err(|o| anyhow::anyhow!("{from} -> {to}/{protocol}: {o:?}"))?;
    Ok(answer
        .parse::<SocketAddr>()
        .with_context(|| format!("clientip answer {answer:?}"))?
        .ip())
}

fn node_addr(lab: &Lab, node: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::new(lab.node_ip(node)?.into(), port))
}

fn node_addr6(lab: &Lab, node: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::new(lab.node_ip6(node)?.into(), port))
}

/// Probes until `pred` holds for the outcome (the agents program moments after the lab is up).
fn eventually(
    what: &str,
    mut probe: impl FnMut() -> Result<Result<String, Outcome>>,
    pred: impl Fn(&Result<String, Outcome>) -> bool,
) -> Result<Result<String, Outcome>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = probe()?;
        if pred(&got) || Instant::now() > deadline {
            if !pred(&got) {
                bail!("{what}: still {got:?}");
            }
            return Ok(got);
        }
        sleep(Duration::from_millis(100));
    }
}

/// [`eventually`] for its success alone.
fn wait_until(
    what: &str,
    probe: impl FnMut() -> Result<Result<String, Outcome>>,
    pred: impl Fn(&Result<String, Outcome>) -> bool,
) -> Result<()> {
    eventually(what, probe, pred).map(drop)
}

/// One HTTP/1.1 request on an open connection: (status, body).
fn http_get(stream: &mut TcpStream, path: &str) -> Result<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
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
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("no status")?;
            return Ok((status, body[..length].to_string()));
        }
    }
}

#[test]
fn nodeport_from_outside_reaches_backends_on_any_node() -> Result<()> {
    if skip_unless_root("nodeport_from_outside_reaches_backends_on_any_node") {
        return Ok(());
    }
    let (lab, _m) = up("npremote")?;
    let a = node_addr(&lab, "node-a", 30080)?;
    let b = node_addr(&lab, "node-b", 30080)?;
    let x = names::EXTERNAL;
    wait_until(
        "external -> node-a NodePort",
        || ask(&lab, x, a, Protocol::Tcp, Ask::Hostname),
        |r| r.as_deref() == Ok("web-b"),
    )?;
    // Through node-a the remote backend sees node-a (SNAT), so its replies return there.
    assert_eq!(client_ip(&lab, x, a, Protocol::Tcp)?, a.ip());
    // Through node-b, where the backend runs, it sees the client itself.
    assert_eq!(hostname(&lab, x, b, Protocol::Tcp)?, "web-b");
    assert_eq!(
        client_ip(&lab, x, b, Protocol::Tcp)?,
        IpAddr::V4(EXTERNAL_IP)
    );
    // UDP the same way.
    let a_udp = node_addr(&lab, "node-a", 30053)?;
    let b_udp = node_addr(&lab, "node-b", 30053)?;
    assert_eq!(hostname(&lab, x, a_udp, Protocol::Udp)?, "web-b");
    assert_eq!(client_ip(&lab, x, a_udp, Protocol::Udp)?, a.ip());
    assert_eq!(
        client_ip(&lab, x, b_udp, Protocol::Udp)?,
        IpAddr::V4(EXTERNAL_IP)
    );
    // Many connections in a row, each with its own SNAT port and conntrack entries.
    for i in 0..30 {
        assert_eq!(
            hostname(&lab, x, a, Protocol::Tcp)?,
            "web-b",
            "connection {i}"
        );
    }
    // From a pod: its own node's address (socket-level) and the other node's (per packet).
    assert_eq!(hostname(&lab, "client-a", a, Protocol::Tcp)?, "web-b");
    assert_eq!(hostname(&lab, "client-a", b, Protocol::Tcp)?, "web-b");
    assert_eq!(hostname(&lab, "client-a", a_udp, Protocol::Udp)?, "web-b");
    // A port that is no NodePort is left alone: nothing listens there.
    let other = node_addr(&lab, "node-a", 30999)?;
    assert_eq!(
        ask(&lab, x, other, Protocol::Tcp, Ask::Hostname)?,
        Err(Outcome::Refused)
    );
    Ok(())
}

#[test]
fn external_traffic_policy_local_keeps_the_client_and_drops_where_no_endpoint_runs() -> Result<()> {
    if skip_unless_root(
        "external_traffic_policy_local_keeps_the_client_and_drops_where_no_endpoint_runs",
    ) {
        return Ok(());
    }
    let (lab, _m) = up("nplocal")?;
    let x = names::EXTERNAL;
    let a = node_addr(&lab, "node-a", 30081)?;
    let b = node_addr(&lab, "node-b", 30081)?;
    wait_until(
        "external -> node-b NodePort (eTP Local)",
        || ask(&lab, x, b, Protocol::Tcp, Ask::Hostname),
        |r| r.as_deref() == Ok("web-b"),
    )?;
    assert_eq!(
        client_ip(&lab, x, b, Protocol::Tcp)?,
        IpAddr::V4(EXTERNAL_IP)
    );
    // node-a runs no endpoint of it: dropped there.
    assert_eq!(
        ask(&lab, x, a, Protocol::Tcp, Ask::Hostname)?,
        Err(Outcome::Timeout)
    );
    // From inside, the NodePort leads to every endpoint.
    assert_eq!(hostname(&lab, "client-a", a, Protocol::Tcp)?, "web-b");

    // The health check port answers as kube-proxy's does.
    for (node, status, count) in [("node-a", 503, 0), ("node-b", 200, 1)] {
        let to = node_addr(&lab, node, 30900)?;
        let mut stream = lab.connect_tcp(x, to, Duration::from_secs(2))?;
        let (got, body) = http_get(&mut stream, "/healthz")?;
        assert_eq!(got, status, "{node}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(json["localEndpoints"], count, "{node}: {body}");
        assert_eq!(json["service"]["name"], "local");
        assert_eq!(json["service"]["namespace"], "default");
    }
    Ok(())
}

#[test]
fn load_balancer_ips_and_external_ips_honour_source_ranges() -> Result<()> {
    if skip_unless_root("load_balancer_ips_and_external_ips_honour_source_ranges") {
        return Ok(());
    }
    let (lab, _m) = up("nplb")?;
    let x = names::EXTERNAL;
    let via = lab.node_ip("node-a")?.to_string();
    let code = lab.exec(x, &["ip", "route", "add", LB_ROUTE, "via", &via])?;
    assert_eq!(code, 0, "adding the route to the load balancer addresses");
    let webs: BTreeSet<&str> = ["web-a", "web-b"].into();
    let lb = SocketAddr::from(([198, 18, 0, 20], 80));
    let external_ip = SocketAddr::from(([198, 18, 0, 21], 80));
    let closed = SocketAddr::from(([198, 18, 0, 30], 80));
    wait_until(
        "external -> load balancer IP",
        || ask(&lab, x, lb, Protocol::Tcp, Ask::Hostname),
        |r| r.as_deref().is_ok_and(|h| webs.contains(h)),
    )?;
    let answer = hostname(&lab, x, external_ip, Protocol::Tcp)?;
    assert!(webs.contains(answer.as_str()), "{answer}");
    // Its source ranges do not include the external client.
    assert_eq!(
        ask(&lab, x, closed, Protocol::Tcp, Ask::Hostname)?,
        Err(Outcome::Timeout)
    );
    // From a pod, socket-level: the same addresses work, source ranges are for outside.
    let answer = hostname(&lab, "client-a", lb, Protocol::Tcp)?;
    assert!(webs.contains(answer.as_str()), "{answer}");
    // allocateLoadBalancerNodePorts: false: no NodePort was allocated, none is served.
    let st = lab.state()?;
    let closed_service = st
        .services
        .iter()
        .find(|s| s.name == "lb-closed")
        .context("lb-closed in the lab state")?;
    assert!(
        closed_service.ports.iter().all(|p| p.node_port.is_none()),
        "{closed_service:?}"
    );
    Ok(())
}

#[test]
fn client_ip_affinity_from_outside_holds_and_is_released_after_its_timeout() -> Result<()> {
    if skip_unless_root("client_ip_affinity_from_outside_holds_and_is_released_after_its_timeout") {
        return Ok(());
    }
    let (lab, _m) = up("npsticky")?;
    let x = names::EXTERNAL;
    let a = node_addr(&lab, "node-a", 30082)?;
    let first = eventually(
        "external -> sticky NodePort",
        || ask(&lab, x, a, Protocol::Tcp, Ask::Hostname),
        |r| r.is_ok(),
    )?
    .map_err(|o| anyhow::anyhow!("{o:?}"))?;
    for i in 0..50 {
        assert_eq!(
            hostname(&lab, x, a, Protocol::Tcp)?,
            first,
            "connection {i}"
        );
    }
    // After a second without a new connection the client is free again: over rounds each
    // starting after the timeout, both backends show up (all alike by chance: 2^-13).
    let mut seen = BTreeSet::new();
    for _ in 0..14 {
        sleep(Duration::from_millis(1300));
        seen.insert(hostname(&lab, x, a, Protocol::Tcp)?);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "affinity never released: {seen:?}");
    Ok(())
}

#[test]
fn a_terminating_backend_keeps_its_open_connection_from_outside() -> Result<()> {
    if skip_unless_root("a_terminating_backend_keeps_its_open_connection_from_outside") {
        return Ok(());
    }
    let (lab, m) = up("npterm")?;
    let x = names::EXTERNAL;
    let a = node_addr(&lab, "node-a", 30083)?;
    wait_until(
        "external -> NodePort",
        || ask(&lab, x, a, Protocol::Tcp, Ask::Hostname),
        |r| r.is_ok(),
    )?;
    // An open connection to web-a (local to node-a), found by trying.
    let mut open = None;
    for _ in 0..40 {
        let mut stream = lab.connect_tcp(x, a, Duration::from_secs(2))?;
        if http_get(&mut stream, "/hostname")?.1 == "web-a" {
            open = Some(stream);
            break;
        }
    }
    let mut open = open.context("no connection reached web-a in 40 tries")?;
    // web-a starts terminating (still serving); web-b is ready, so new connections go there.
    pods_and_nodes(&m, "  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n")?;
    wait_until(
        "new connections avoid the terminating backend",
        || {
            for _ in 0..10 {
                let got = ask(&lab, x, a, Protocol::Tcp, Ask::Hostname)?;
                if got.as_deref() != Ok("web-b") {
                    return Ok(got);
                }
            }
            Ok(Ok("web-b".into()))
        },
        |r| r.as_deref() == Ok("web-b"),
    )?;
    for _ in 0..20 {
        assert_eq!(hostname(&lab, x, a, Protocol::Tcp)?, "web-b");
    }
    assert_eq!(http_get(&mut open, "/hostname")?, (200, "web-a".into()));
    Ok(())
}

#[test]
fn ipv6_nodeport_and_load_balancer_ips_from_outside() -> Result<()> {
    if skip_unless_root("ipv6_nodeport_and_load_balancer_ips_from_outside") {
        return Ok(());
    }
    let (lab, _m) = up("np6")?;
    let x = names::EXTERNAL;
    let a = node_addr6(&lab, "node-a", 30085)?;
    let b = node_addr6(&lab, "node-b", 30085)?;
    wait_until(
        "external -> node-a IPv6 NodePort",
        || ask(&lab, x, a, Protocol::Tcp, Ask::Hostname),
        |r| r.as_deref() == Ok("web-b"),
    )?;
    // The remote backend sees node-a's IPv6 address (SNAT); on node-b the client itself.
    assert_eq!(client_ip(&lab, x, a, Protocol::Tcp)?, a.ip());
    assert_eq!(hostname(&lab, x, b, Protocol::Tcp)?, "web-b");
    assert_eq!(
        client_ip(&lab, x, b, Protocol::Tcp)?,
        IpAddr::V6(EXTERNAL_IP6)
    );
    // UDP over IPv6 both ways, the reply from the address asked.
    let a_udp = node_addr6(&lab, "node-a", 30086)?;
    assert_eq!(hostname(&lab, x, a_udp, Protocol::Udp)?, "web-b");
    assert_eq!(client_ip(&lab, x, a_udp, Protocol::Udp)?, a.ip());
    // Many connections in a row: SNAT ports and connection entries are reused cleanly.
    let report = lab.load(x, &a.to_string(), Protocol::Tcp, 30)?;
    assert_eq!(report.answered, 30, "{report:?}");
    // The same Service's IPv4 NodePort still works beside it.
    let a4 = node_addr(&lab, "node-a", 30085)?;
    assert_eq!(hostname(&lab, x, a4, Protocol::Tcp)?, "web-b");

    // IPv6 load balancer addresses and their source ranges.
    let via = lab.node_ip6("node-a")?.to_string();
    let code = lab.exec(x, &["ip", "-6", "route", "add", LB_ROUTE6, "via", &via])?;
    assert_eq!(
        code, 0,
        "adding the route to the IPv6 load balancer addresses"
    );
    let webs: BTreeSet<&str> = ["web-a", "web-b"].into();
    let lb: SocketAddr = "[fd00:198:18::20]:80".parse()?;
    wait_until(
        "external -> IPv6 load balancer IP",
        || ask(&lab, x, lb, Protocol::Tcp, Ask::Hostname),
        |r| r.as_deref().is_ok_and(|h| webs.contains(h)),
    )?;
    let closed: SocketAddr = "[fd00:198:18::30]:80".parse()?;
    assert_eq!(
        ask(&lab, x, closed, Protocol::Tcp, Ask::Hostname)?,
        Err(Outcome::Timeout),
        "IPv4-only source ranges let no IPv6 client in"
    );
    Ok(())
}
