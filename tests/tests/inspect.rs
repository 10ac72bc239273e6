//! The inspect CLI against a running lab: `sluice lb list`, `ct list`, `policy list` and
//! `status` read what each node agent programmed from its pinned maps and links, and name it
//! with the agent's status files. Checked in JSON (what tools read) and in text (what a person
//! reads).
//!
//! Two nodes; `web-a` on node-a, `web-b` on node-b, isolated by a policy. They need root
//! (network namespaces, cgroups, BPF); without it they print SKIPPED and pass.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use sluice_e2e::{
    Manifests, lab_options, pod_yaml, skip_unless_root, sluice_bin, two_nodes_yaml, unique_name,
};
use sluice_lab::addr::EXTERNAL_IP;
use sluice_lab::{Lab, Outcome, Protocol, ProxyMode, TargetSpec, names};

const WEB: &str = "10.96.0.10";
const EMPTY: &str = "10.96.0.11";
const NODE_PORT: u16 = 30080;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ipFamilies: [IPv4]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  clusterIP: 10.96.0.11
  ipFamilies: [IPv4]
  selector: {app: nothing}
  ports:
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

/// web-b takes TCP 8080 from client pods and from the node network (NodePort traffic arrives
/// source-translated to node-a, or as the external client); nothing else.
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-b-from-clients}
spec:
  podSelector: {matchLabels: {at: b}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
    - ipBlock: {cidr: 172.18.0.0/16}
    ports:
    - {protocol: TCP, port: 8080}
"#;

fn up() -> Result<(Lab, Manifests)> {
    let m = Manifests::new()?;
    m.write("nodes.yaml", &two_nodes_yaml())?;
    let web = [("http", 8080, "TCP")];
    let pods = [
        pod_yaml(
            "web-a",
            &[("app", "web"), ("at", "a")],
            Some("node-a"),
            &web,
        ),
        pod_yaml(
            "web-b",
            &[("app", "web"), ("at", "b")],
            Some("node-b"),
            &web,
        ),
        pod_yaml("client-a", &[("app", "client")], Some("node-a"), &[]),
        pod_yaml("other-a", &[("app", "other")], Some("node-a"), &[]),
    ];
    m.write("pods.yaml", &pods.join("---\n"))?;
    m.write("services.yaml", SERVICES)?;
    m.write("policy.yaml", POLICY)?;
    let mut opts = lab_options(&unique_name("inspect"), m.path());
    opts.proxy = ProxyMode::Required;
    let lab = Lab::up(opts)?;
    Ok((lab, m))
}

/// Runs `sluice ARGS…`; returns (exit code, stdout, stderr).
fn sluice(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(sluice_bin())
        .args(args)
        .output()
        .context("running sluice")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `sluice GROUP… --lab L --node NODE -o json`, parsed.
fn json(lab: &Lab, node: &str, group: &[&str]) -> Result<Value> {
    let mut args: Vec<&str> = group.to_vec();
    args.extend(["--lab", lab.name(), "--node", node, "-o", "json"]);
    let (code, stdout, stderr) = sluice(&args)?;
    if code != 0 {
        bail!("sluice {args:?} exited {code}: {stderr}");
    }
    serde_json::from_str(&stdout).with_context(|| format!("sluice {args:?} printed {stdout}"))
}

fn text(lab: &Lab, node: &str, group: &[&str]) -> Result<String> {
    let mut args: Vec<&str> = group.to_vec();
    args.extend(["--lab", lab.name(), "--node", node]);
    let (code, stdout, stderr) = sluice(&args)?;
    if code != 0 {
        bail!("sluice {args:?} exited {code}: {stderr}");
    }
    Ok(stdout)
}

fn tcp(host: impl ToString, port: u16) -> TargetSpec {
    TargetSpec {
        host: host.to_string(),
        port,
        protocol: Protocol::Tcp,
    }
}

/// Probes until `from` gets an answer from `to` (the agents program moments after the lab is up).
fn wait_answered(lab: &Lab, from: &str, to: &TargetSpec) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = lab.probe_target(from, to, Duration::from_secs(1))?;
        if r.outcome == Outcome::Answered {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{from} -> {}:{}: {:?}", to.host, to.port, r.outcome);
        }
        sleep(Duration::from_millis(100));
    }
}

fn find<'a>(rows: &'a Value, what: &str, pred: impl Fn(&Value) -> bool) -> Result<&'a Value> {
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|r| pred(r))
        .with_context(|| format!("no {what} in {rows:#}"))
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or_default()
}

#[test]
fn inspect_cli_shows_what_each_node_programmed() -> Result<()> {
    if skip_unless_root("inspect_cli_shows_what_each_node_programmed") {
        return Ok(());
    }
    let (lab, _m) = up()?;
    lab.wait_policy_enforced(Duration::from_secs(20))?;
    wait_answered(&lab, "client-a", &tcp(WEB, 80))?;
    let web_a = SocketAddr::new(lab.pod_ip("web-a")?.into(), 8080);
    let web_b = SocketAddr::new(lab.pod_ip("web-b")?.into(), 8080);
    let node_a: IpAddr = lab.node_ip("node-a")?.into();

    // lb list: the ClusterIP with both backends, the NodePort, the Service with none.
    let lb = json(&lab, "node-a", &["lb", "list"])?;
    let cluster_ip = find(&lb, "the web ClusterIP", |r| {
        str_of(r, "address") == WEB && r["port"] == 80 && str_of(r, "scope") == "socket"
    })?;
    assert_eq!(str_of(cluster_ip, "service"), "default/web");
    assert_eq!(str_of(cluster_ip, "port_name"), "http");
    assert_eq!(str_of(cluster_ip, "state"), "serving");
    let mut backends: Vec<(String, bool, String)> = cluster_ip["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                str_of(b, "address").to_string(),
                b["local"].as_bool().unwrap_or_default(),
                str_of(b, "state").to_string(),
            )
        })
        .collect();
    backends.sort();
    let mut want = vec![
        (web_a.to_string(), true, "active".to_string()),
        (web_b.to_string(), false, "active".to_string()),
    ];
    want.sort();
    assert_eq!(backends, want, "{cluster_ip:#}");
    let node_port = find(&lb, "the NodePort on node-a's address", |r| {
        str_of(r, "address") == node_a.to_string()
            && r["port"] == NODE_PORT
            && str_of(r, "scope") == "external"
    })?;
    assert_eq!(str_of(node_port, "service"), "default/web");
    assert_eq!(node_port["backends"].as_array().map(Vec::len), Some(2));
    let empty = find(&lb, "the empty Service", |r| str_of(r, "address") == EMPTY)?;
    assert_eq!(str_of(empty, "state"), "no-endpoints");
    assert_eq!(str_of(empty, "protocol"), "UDP");
    // Filtered by Service.
    let only_empty = json(
        &lab,
        "node-a",
        &["lb", "list", "--service", "default/empty"],
    )?;
    assert!(
        only_empty
            .as_array()
            .is_some_and(|rows| !rows.is_empty()
                && rows.iter().all(|r| str_of(r, "service") == "default/empty")),
        "{only_empty:#}"
    );
    let lb_text = text(&lab, "node-a", &["lb", "list"])?;
    assert!(lb_text.starts_with("FRONTEND"), "{lb_text}");
    let line = lb_text
        .lines()
        .find(|l| l.starts_with(&format!("{WEB}:80/TCP")))
        .with_context(|| format!("no line for the ClusterIP in\n{lb_text}"))?;
    assert!(
        line.contains("default/web:http") && line.contains("serving"),
        "{line}"
    );
    assert!(
        lb_text.contains("no endpoints (refused)"),
        "the empty Service reads as refused:\n{lb_text}"
    );

    // ct list: a connection from outside, held open, through node-a's NodePort.
    let held = lab.connect_tcp(names::EXTERNAL, (node_a, NODE_PORT), Duration::from_secs(2))?;
    let client_port = held.local_addr()?.port();
    let ct = json(
        &lab,
        "node-a",
        &[
            "ct",
            "list",
            "--table",
            "nat",
            "--port",
            &client_port.to_string(),
        ],
    )?;
    let conn = find(&ct, "the held NodePort connection", |r| {
        str_of(r, "source") == SocketAddr::new(EXTERNAL_IP.into(), client_port).to_string()
    })?;
    assert_eq!(str_of(conn, "table"), "nat");
    assert_eq!(str_of(conn, "protocol"), "TCP");
    assert_eq!(
        str_of(conn, "destination"),
        SocketAddr::new(node_a, NODE_PORT).to_string()
    );
    assert_eq!(str_of(conn, "service"), "default/web");
    let backend = str_of(conn, "backend");
    assert!(
        backend == web_a.to_string() || backend == web_b.to_string(),
        "{conn:#}"
    );
    // To the remote backend it is source-translated to node-a; to the local one it is not.
    let snat = conn.get("snat").and_then(Value::as_str);
    if backend == web_b.to_string() {
        assert!(
            snat.is_some_and(|s| s.starts_with(&format!("{node_a}:"))),
            "{conn:#}"
        );
    } else {
        assert_eq!(snat, None, "{conn:#}");
    }
    assert_eq!(conn["closing"], false);
    assert_eq!(
        ct.as_array().map(Vec::len),
        Some(1),
        "filtered to one port: {ct:#}"
    );
    drop(held);

    // The policy table at node-b: client-a's connection to web-b, tracked at web-b.
    wait_answered(&lab, "client-a", &tcp(web_b.ip(), 8080))?;
    let client_a = lab.pod_ip("client-a")?;
    let ct_b = json(
        &lab,
        "node-b",
        &[
            "ct",
            "list",
            "--table",
            "policy",
            "--address",
            &client_a.to_string(),
        ],
    )?;
    let tracked = find(&ct_b, "client-a -> web-b", |r| {
        str_of(r, "destination") == web_b.to_string()
    })?;
    assert_eq!(str_of(tracked, "pod"), "default/web-b");
    assert_eq!(str_of(tracked, "direction"), "ingress");
    let ct_text = text(&lab, "node-b", &["ct", "list", "--table", "policy"])?;
    assert!(
        ct_text.starts_with("TABLE") && ct_text.contains("default/web-b"),
        "{ct_text}"
    );

    // policy list: web-b is isolated for ingress by the policy and allows what it says.
    let other_probe =
        lab.probe_target("other-a", &tcp(web_b.ip(), 8080), Duration::from_secs(1))?;
    assert_eq!(
        other_probe.outcome,
        Outcome::Timeout,
        "other-a is no client"
    );
    let policy = json(
        &lab,
        "node-b",
        &["policy", "list", "--pod", "default/web-b"],
    )?;
    let row = find(&policy, "web-b", |r| str_of(r, "pod") == "default/web-b")?;
    let ingress = &row["ingress"];
    assert_eq!(ingress["isolated"], true);
    assert_eq!(
        ingress["isolated_by"],
        serde_json::json!(["default/web-b-from-clients"])
    );
    assert!(
        ingress["drops"].as_u64() >= Some(1),
        "other-a was dropped: {row:#}"
    );
    assert_eq!(row["egress"]["isolated"], false);
    let allows: Vec<(String, String, String)> = ingress["allow"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                str_of(a, "peer").to_string(),
                str_of(a, "protocol").to_string(),
                str_of(a, "ports").to_string(),
            )
        })
        .collect();
    assert!(
        allows.iter().any(|(peer, proto, ports)| peer
            .split(',')
            .any(|p| p == format!("{client_a}/32"))
            && proto == "TCP"
            && ports == "8080"),
        "client-a may reach TCP 8080: {allows:?}"
    );
    assert!(
        allows
            .iter()
            .any(|(peer, _, ports)| peer.contains("172.18.0.0/16") && ports == "8080"),
        "the node network may reach TCP 8080: {allows:?}"
    );
    assert!(
        allows
            .iter()
            .all(|(_, _, ports)| ports == "8080" || ports.is_empty()),
        "only TCP 8080 (and the node itself): {allows:?}"
    );
    let policy_text = text(&lab, "node-b", &["policy", "list"])?;
    assert!(
        policy_text.contains("default/web-b (")
            && policy_text.contains("ingress: isolated by default/web-b-from-clients"),
        "{policy_text}"
    );

    // status: the agent, what is attached where, how full the maps are.
    let status = json(&lab, "node-a", &["status"])?;
    let agent_pid = lab
        .state()?
        .node("node-a")
        .and_then(|n| n.proxy.as_ref().map(|p| p.pid));
    assert_eq!(
        status["agent_pid"].as_u64(),
        agent_pid.map(|p| p as u64),
        "{status:#}"
    );
    assert_eq!(str_of(&status, "node"), "node-a");
    assert!(
        status["last_sync"]["frontends"].as_u64() >= Some(3),
        "{status:#}"
    );
    let links = &status["links"];
    let sockets = links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| str_of(l, "kind") == "socket")
        .count();
    assert_eq!(
        sockets, 8,
        "the eight socket programs on the cgroup: {links:#}"
    );
    find(links, "the NodePort program on node-a's uplink", |l| {
        str_of(l, "kind") == "nodeport" && str_of(l, "attached_to").ends_with("tc ingress")
    })?;
    let services_map = find(&status["maps"], "the SERVICES map", |m| {
        str_of(m, "name") == "SERVICES"
    })?;
    assert!(
        services_map["entries"].as_u64() >= Some(6),
        "{services_map:#}"
    );
    assert!(services_map["capacity"].as_u64() > Some(0));
    let status_text = text(&lab, "node-a", &["status"])?;
    assert!(
        status_text.contains("agent:     running (pid")
            && status_text.contains("SERVICES")
            && status_text.contains("nodeport"),
        "{status_text}"
    );
    Ok(())
}

#[test]
fn inspect_cli_says_when_there_is_nothing_to_read() -> Result<()> {
    let dir = tempfile_dir()?;
    let (code, stdout, stderr) = sluice(&[
        "lb",
        "list",
        "--bpffs-dir",
        &dir.path().display().to_string(),
    ])?;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stderr.contains("holds no pinned sluice maps"),
        "names the problem: {stderr}"
    );
    Ok(())
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("sluice-inspect-")
        .tempdir()?)
}
