//! NetworkPolicy enforced by the kernel, scenario by scenario, on the pods of Kubernetes'
//! NetworkPolicy e2e tests (namespaces x, y, z; pods a, b, c; ports 80 and 81).
//!
//! Each scenario (`examples/netpol/scenarios/*.yaml`) is applied to one running lab; the whole
//! matrix is then measured on real traffic and every cell must agree twice: the kernel with
//! `explain`, and `explain` with the expectation written here from the API reference.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use sluice_e2e::{Manifests, lab_options, node_yaml, skip_unless_root, unique_name};
use sluice_lab::matrix::{Case, Cell, Matrix, reached};
use sluice_lab::{Lab, Outcome, Protocol, TargetSpec};

/// Long enough for the agent to follow a manifest change; how long it really takes is measured
/// by the benchmarks.
const ENFORCE_TIMEOUT: Duration = Duration::from_secs(15);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/netpol")
        .join(path)
}

fn read_example(path: &str) -> String {
    std::fs::read_to_string(example(path)).unwrap()
}

fn netpol_lab(prefix: &str) -> (Manifests, Lab) {
    netpol_lab_on(prefix, &[])
}

/// The e2e pods, spread over `nodes` (one implicit node when empty).
fn netpol_lab_on(prefix: &str, nodes: &[&str]) -> (Manifests, Lab) {
    let manifests = Manifests::new().unwrap();
    if !nodes.is_empty() {
        let nodes: Vec<String> = nodes.iter().map(|n| node_yaml(n, None)).collect();
        manifests.write("nodes.yaml", &nodes.join("---\n")).unwrap();
    }
    manifests
        .write("pods.yaml", &read_example("pods.yaml"))
        .unwrap();
    let lab = Lab::up(lab_options(&unique_name(prefix), manifests.path())).unwrap();
    (manifests, lab)
}

fn cases(ports: &[u16], protocols: &[Protocol]) -> Vec<Case> {
    protocols
        .iter()
        .flat_map(|&protocol| ports.iter().map(move |&port| Case { port, protocol }))
        .collect()
}

fn ns(pod: &str) -> &str {
    pod.split_once('/').map_or("default", |(ns, _)| ns)
}

/// What the API reference says about one cell, given the pods' addresses.
type Expectation = fn(&Cell, &BTreeMap<String, Ipv4Addr>) -> bool;

struct Scenario {
    file: &'static str,
    cases: Vec<Case>,
    want: Expectation,
    /// A policy the lab must report as a manifest problem and skip (it reads manifests as the
    /// agent does; like the API server, it serves the agents only valid objects).
    logged: Option<&'static str>,
}

fn scenarios() -> Vec<Scenario> {
    let tcp_udp = [Protocol::Tcp, Protocol::Udp];
    let standard = cases(&[80, 81], &tcp_udp);
    vec![
        Scenario {
            file: "default-deny-ingress.yaml",
            cases: standard.clone(),
            want: |c, _| ns(&c.to) != "x",
            logged: None,
        },
        Scenario {
            file: "default-deny-egress.yaml",
            cases: standard.clone(),
            want: |c, _| ns(&c.from) != "x",
            logged: None,
        },
        Scenario {
            file: "allow-from-namespace.yaml",
            cases: standard.clone(),
            want: |c, _| c.to != "x/a" || ns(&c.from) == "y",
            logged: None,
        },
        Scenario {
            file: "and-versus-or.yaml",
            cases: standard.clone(),
            want: |c, _| match c.to.as_str() {
                "x/a" => c.from == "y/b",
                "x/b" => ns(&c.from) == "y" || c.from == "x/c",
                _ => true,
            },
            logged: None,
        },
        Scenario {
            file: "ipblock-except.yaml",
            cases: standard.clone(),
            want: |c, ips| {
                let cidr: Ipv4Net = "10.244.0.0/24".parse().unwrap();
                let except: Ipv4Net = "10.244.0.4/30".parse().unwrap();
                let ip = ips[&c.to];
                c.from != "x/a" || (cidr.contains(&ip) && !except.contains(&ip))
            },
            logged: None,
        },
        Scenario {
            file: "named-port.yaml",
            cases: standard.clone(),
            want: |c, _| {
                c.to != "x/a"
                    || (c.case.protocol == Protocol::Tcp && c.case.port == 81)
                    || (c.case.protocol == Protocol::Udp && c.case.port == 80)
            },
            logged: None,
        },
        Scenario {
            file: "end-port.yaml",
            cases: cases(&[80, 81, 90, 91], &[Protocol::Tcp]),
            want: |c, _| c.to != "x/a" || (81..=90).contains(&c.case.port),
            logged: None,
        },
        Scenario {
            file: "policies-add-up.yaml",
            cases: standard.clone(),
            want: |c, _| {
                ns(&c.to) != "x"
                    || (ns(&c.from) == "z" && c.case.port == 81)
                    || (c.to == "x/a" && ns(&c.from) == "y" && c.case.port == 80)
            },
            logged: None,
        },
        Scenario {
            file: "egress-dns-only.yaml",
            cases: cases(&[53, 80], &tcp_udp),
            want: |c, _| ns(&c.from) != "x" || c.case.port == 53,
            logged: None,
        },
        Scenario {
            file: "invalid-policy-skipped.yaml",
            cases: standard.clone(),
            want: |c, _| ns(&c.to) != "x",
            logged: Some("y/broken"),
        },
    ]
}

/// Why a measured matrix fails its scenario, if it does.
fn check(scenario: &Scenario, matrix: &Matrix, ips: &BTreeMap<String, Ipv4Addr>) -> Vec<String> {
    let mut problems = Vec::new();
    for cell in &matrix.cells {
        // A pod reaches itself over loopback, whatever the policies (upstream's AllowLoopback).
        let want = cell.from == cell.to || (scenario.want)(cell, ips);
        if cell.expected != want {
            problems.push(format!(
                "explain says {} for {} -> {} {}/{}, the API reference {}",
                verdict(cell.expected),
                cell.from,
                cell.to,
                cell.case.port,
                cell.case.protocol,
                verdict(want)
            ));
        }
    }
    if matrix.disagreements() > 0 {
        problems.push(format!(
            "{} cells where the kernel disagrees with explain:{}",
            matrix.disagreements(),
            matrix.render()
        ));
    }
    // A scenario that denies nothing (or everything) would not show enforcement.
    if !matrix.cells.iter().any(|c| !c.observed) || !matrix.cells.iter().any(|c| c.observed) {
        problems.push(format!(
            "the scenario should both allow and deny some cells:{}",
            matrix.render()
        ));
    }
    problems
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

#[test]
fn every_scenario_is_enforced_cell_by_cell_as_the_api_reference_says() {
    if skip_unless_root("every_scenario_is_enforced_cell_by_cell_as_the_api_reference_says") {
        return;
    }
    // Two nodes: peers on the other node cross the underlay and meet the policy there.
    let (manifests, lab) = netpol_lab_on("npscen", &["node-1", "node-2"]);
    let state = lab.state().unwrap();
    for node in ["node-1", "node-2"] {
        assert!(
            state.pods.iter().any(|p| p.node.as_deref() == Some(node)),
            "some pods run on {node}"
        );
    }
    let ips: BTreeMap<String, Ipv4Addr> = state
        .pods
        .iter()
        .filter_map(|p| Some((p.key(), p.ip?)))
        .collect();
    assert_eq!(
        ips.len(),
        9,
        "the nine pods of the e2e tests have addresses"
    );

    let mut failures = Vec::new();
    for scenario in scenarios() {
        // One file replaced in place: the previous scenario's policies go as these arrive.
        manifests
            .write(
                "policy.yaml",
                &read_example(&format!("scenarios/{}", scenario.file)),
            )
            .unwrap();
        let took = match lab.wait_policy_enforced(ENFORCE_TIMEOUT) {
            Ok(took) => took,
            Err(e) => {
                failures.push(format!("{}: {e:#}", scenario.file));
                continue;
            }
        };
        let matrix = Matrix::measure(&lab, &scenario.cases, PROBE_TIMEOUT).unwrap();
        eprintln!(
            "{}: enforced after {} ms; {} of {} cells reached",
            scenario.file,
            took.as_millis(),
            matrix.cells.iter().filter(|c| c.observed).count(),
            matrix.cells.len()
        );
        for problem in check(&scenario, &matrix, &ips) {
            failures.push(format!("{}: {problem}", scenario.file));
        }
        if let Some(text) = scenario.logged {
            let log = std::fs::read_to_string(lab.paths().supervisor_log()).unwrap_or_default();
            if !log
                .lines()
                .any(|l| l.contains("manifest problem") && l.contains(text))
            {
                failures.push(format!(
                    "{}: the lab's log has no manifest problem naming {text}",
                    scenario.file
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One HTTP/1.1 keep-alive request on an open connection; the answer's body.
fn http_get(stream: &mut TcpStream, path: &str) -> std::io::Result<String> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: lab\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The drops at `pod` show in the agent's status file (per pod and per policy) and as
/// `policy_drop` lines in its log.
fn assert_drops_are_seen(lab: &Lab, pod: &str, policy: &str) {
    let path = lab.paths().proxy_status("node-1");
    let started = Instant::now();
    loop {
        let status = sluice_lab::policy_status::read(&path)
            .unwrap()
            .unwrap_or_default();
        let at_pod = status
            .endpoints
            .iter()
            .find(|e| e.pod == pod)
            .map_or(0, |e| e.ingress_drops);
        let by_policy = status.drops_by_policy.get(policy).copied().unwrap_or(0);
        if at_pod > 0 && by_policy > 0 {
            break;
        }
        assert!(
            started.elapsed() < ENFORCE_TIMEOUT,
            "no drops counted at {pod} ({at_pod}) or for {policy} ({by_policy}) in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(lab.paths().proxy_log("node-1")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("policy_drop")
                && l.contains(&format!("at {pod} (ingress from y/a)"))),
        "no policy_drop line for {pod} in the agent's log"
    );
}

/// New connections from `from` to `to`, until one's outcome is `reached == want`.
fn wait_new_connections(lab: &Lab, from: &str, to: &TargetSpec, want: bool) -> Duration {
    let started = Instant::now();
    loop {
        let probe = lab
            .probe_target(from, to, Duration::from_millis(300))
            .unwrap();
        if reached(probe.outcome) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < ENFORCE_TIMEOUT,
            "new connections {from} -> {}:{} still {} after {} s",
            to.host,
            to.port,
            if want { "dropped" } else { "reached" },
            ENFORCE_TIMEOUT.as_secs()
        );
    }
}

#[test]
fn a_policy_change_applies_to_new_connections_and_established_ones_keep_working() {
    if skip_unless_root(
        "a_policy_change_applies_to_new_connections_and_established_ones_keep_working",
    ) {
        return;
    }
    let (manifests, lab) = netpol_lab("nplive");
    lab.wait_policy_enforced(ENFORCE_TIMEOUT).unwrap();
    let server = SocketAddrV4::new(lab.pod_ip("x/a").unwrap(), 80);
    let target = TargetSpec {
        host: server.ip().to_string(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut established = lab
        .connect_tcp("y/a", server, Duration::from_secs(2))
        .unwrap();
    established
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert_eq!(http_get(&mut established, "/hostname").unwrap(), "a");

    // Deny every connection into x while the connection is open and in use.
    manifests
        .write(
            "policy.yaml",
            &read_example("scenarios/default-deny-ingress.yaml"),
        )
        .unwrap();
    let denied_after = wait_new_connections(&lab, "y/a", &target, false);
    lab.wait_policy_enforced(ENFORCE_TIMEOUT).unwrap();
    for _ in 0..20 {
        assert_eq!(
            http_get(&mut established, "/hostname").expect(
                "a connection established before the policy keeps working (conntrack lets it through)"
            ),
            "a"
        );
    }
    let probe = lab.probe_target("y/a", &target, PROBE_TIMEOUT).unwrap();
    assert_eq!(
        probe.outcome,
        Outcome::Timeout,
        "new connections are dropped"
    );
    assert_drops_are_seen(&lab, "x/a", "x/default-deny-ingress");

    // Lifting the policy opens new connections again.
    manifests.remove("policy.yaml").unwrap();
    let allowed_after = wait_new_connections(&lab, "y/a", &target, true);
    assert_eq!(http_get(&mut established, "/hostname").unwrap(), "a");
    eprintln!(
        "new connections denied {} ms after the policy was written, allowed again {} ms after it was removed",
        denied_after.as_millis(),
        allowed_after.as_millis()
    );
}

#[test]
fn a_service_is_judged_by_the_policies_of_its_backends() {
    if skip_unless_root("a_service_is_judged_by_the_policies_of_its_backends") {
        return;
    }
    let (manifests, lab) = netpol_lab("npsvc");
    manifests
        .write(
            "service.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\n\
             spec:\n  selector: {pod: a}\n  ports:\n  - {name: http, port: 8080, targetPort: 80, protocol: TCP}\n",
        )
        .unwrap();
    // x accepts only namespace y, on port 80: the backend's port, not the Service's.
    manifests
        .write("policy.yaml", &read_example("policy.yaml"))
        .unwrap();
    lab.wait_policy_enforced(ENFORCE_TIMEOUT).unwrap();
    lab.wait_for(
        "Service x/web to get its cluster IP",
        ENFORCE_TIMEOUT,
        |st| {
            st.services
                .iter()
                .any(|s| s.matches("x/web") && s.cluster_ip.is_some())
        },
    )
    .unwrap();
    let service = TargetSpec {
        host: "x/web".into(),
        port: 8080,
        protocol: Protocol::Tcp,
    };
    for (client, allowed) in [("y/a", true), ("y/c", true), ("z/a", false), ("x/b", false)] {
        let probe = lab.probe_target(client, &service, PROBE_TIMEOUT).unwrap();
        if allowed {
            assert_eq!(
                probe.outcome,
                Outcome::Answered,
                "{client} -> x/web: {probe:?}"
            );
            assert_eq!(probe.answer.as_deref(), Some("a"), "{client} -> x/web");
        } else {
            assert_eq!(
                probe.outcome,
                Outcome::Timeout,
                "{client} -> x/web: {probe:?}"
            );
        }
    }
}

#[test]
fn relabelled_and_new_pods_are_judged_by_their_new_labels() {
    if skip_unless_root("relabelled_and_new_pods_are_judged_by_their_new_labels") {
        return;
    }
    let (manifests, lab) = netpol_lab("nplabel");
    // Every pod of x accepts only pods labelled role=client, from any namespace.
    manifests
        .write(
            "policy.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: clients-only, namespace: x}\n\
             spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {}\n      podSelector: {matchLabels: {role: client}}\n",
        )
        .unwrap();
    lab.wait_policy_enforced(ENFORCE_TIMEOUT).unwrap();
    let to_x_a = TargetSpec {
        host: lab.pod_ip("x/a").unwrap().to_string(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let probe = lab.probe_target("z/b", &to_x_a, PROBE_TIMEOUT).unwrap();
    assert_eq!(probe.outcome, Outcome::Timeout, "z/b is no client yet");

    // z/b becomes a client; a new pod x/d arrives, isolated like the rest of x.
    let pods = read_example("pods.yaml").replace(
        "metadata: {name: b, namespace: z, labels: {pod: b}}",
        "metadata: {name: b, namespace: z, labels: {pod: b, role: client}}",
    );
    assert!(
        pods.contains("role: client"),
        "the relabelling applies to pods.yaml"
    );
    let new_pod = "\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: d, namespace: x, labels: {pod: d}}\n\
                   spec:\n  containers:\n    - name: cont\n      ports: [{containerPort: 80, protocol: TCP}]\n";
    manifests
        .write("pods.yaml", &format!("{pods}{new_pod}"))
        .unwrap();
    lab.wait_pod_ready("x/d", ENFORCE_TIMEOUT).unwrap();
    lab.wait_policy_enforced(ENFORCE_TIMEOUT).unwrap();
    let to_x_d = TargetSpec {
        host: lab.pod_ip("x/d").unwrap().to_string(),
        ..to_x_a.clone()
    };
    for (from, to, allowed) in [
        ("z/b", &to_x_a, true),
        ("z/b", &to_x_d, true),
        ("z/a", &to_x_a, false),
        ("y/a", &to_x_d, false),
    ] {
        let probe = lab.probe_target(from, to, PROBE_TIMEOUT).unwrap();
        let want = if allowed {
            Outcome::Answered
        } else {
            Outcome::Timeout
        };
        assert_eq!(probe.outcome, want, "{from} -> {}: {probe:?}", to.host);
    }
}

#[test]
fn a_pod_and_its_own_node_always_talk_but_other_nodes_are_ordinary_peers() {
    if skip_unless_root("a_pod_and_its_own_node_always_talk_but_other_nodes_are_ordinary_peers") {
        return;
    }
    let (manifests, lab) = netpol_lab_on("npnode", &["node-1", "node-2"]);
    // x accepts nothing and sends nothing.
    manifests
        .write(
            "policy.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: isolate-x, namespace: x}\n\
             spec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n",
        )
        .unwrap();
    lab.wait_policy_enforced(ENFORCE_TIMEOUT).unwrap();
    let state = lab.state().unwrap();
    for pod in state.pods.iter().filter(|p| p.namespace == "x") {
        let own = state.node(pod.node.as_deref().unwrap()).unwrap();
        let other = state.nodes.iter().find(|n| n.name != own.name).unwrap();
        let pod_addr = SocketAddrV4::new(pod.ip.unwrap(), 80);
        let key = pod.key();

        // Node to pod (kubelet's probes): its own node gets through, the other does not.
        let mut from_own =
            sluice_lab::netns::connect_tcp(&own.netns, pod_addr.into(), PROBE_TIMEOUT)
                .unwrap_or_else(|e| panic!("{} -> {key}: {e:#}", own.name));
        from_own.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
        assert_eq!(http_get(&mut from_own, "/hostname").unwrap(), pod.name);
        let from_other =
            sluice_lab::netns::connect_tcp(&other.netns, pod_addr.into(), PROBE_TIMEOUT);
        assert!(
            from_other.is_err(),
            "{} -> {key} must be dropped",
            other.name
        );

        // Pod to node: nothing listens on the node's port 9, so a refusal means it got there.
        for (node, reaches) in [(own, true), (other, false)] {
            let target = TargetSpec {
                host: node.ip.to_string(),
                port: 9,
                protocol: Protocol::Tcp,
            };
            let probe = lab.probe_target(&key, &target, PROBE_TIMEOUT).unwrap();
            assert_eq!(
                reached(probe.outcome),
                reaches,
                "{key} -> {}: {probe:?}",
                node.name
            );
        }
    }
}
