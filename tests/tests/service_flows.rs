//! The service flow table (`examples/service-flows/flows.yaml`), in the style of kube-proxy's
//! packet-flow tests: rows of (client, destination, protocol) → which pods may answer and the
//! source address each sees, or refused, or dropped. Every row runs twice on one lab of the
//! cluster in `examples/service-flows/cluster.yaml`: against the compile step (the tables each
//! node agent computes from the cluster as the lab rendered it) and as real traffic.
//!
//! Needs root (network namespaces, cgroups, BPF); without it prints SKIPPED and passes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cluster_model::ManifestSource;
use proxy_daemon::compile::{Protocol as CompileProtocol, ServiceTable, compile, node_ips};
use proxy_daemon::flow::{Client, NodeView, SourceSeen, Verdict, predict};
use serde::Deserialize;
use sluice_e2e::{lab_options, skip_unless_root, unique_name};
use sluice_lab::addr::EXTERNAL_IP;
use sluice_lab::client::Ask;
use sluice_lab::{Lab, LabState, Outcome, Protocol, ProxyMode, TargetSpec, names};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    from: String,
    via: Option<String>,
    to: String,
    #[serde(default)]
    protocol: Option<String>,
    expect: Expect,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
enum Expect {
    /// "refused" or "dropped".
    Outcome(String),
    /// Pod → the source it sees: "client" or a node name.
    Answers(BTreeMap<String, String>),
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/service-flows")
}

fn rows() -> Result<Vec<Row>> {
    let path = examples().join("flows.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

impl Row {
    fn protocol(&self) -> Protocol {
        match self.protocol.as_deref() {
            Some("UDP") => Protocol::Udp,
            _ => Protocol::Tcp,
        }
    }

    fn describe(&self) -> String {
        let via = self
            .via
            .as_deref()
            .map(|v| format!(" via {v}"))
            .unwrap_or_default();
        format!("{}{via} -> {}/{}", self.from, self.to, self.protocol())
    }
}

/// Resolves `host:port` (host a node name or an address).
fn destination(st: &LabState, to: &str) -> Result<(Ipv4Addr, u16)> {
    let (host, port) = to.rsplit_once(':').context("to: no port")?;
    let ip = match st.node(host) {
        Some(n) => n.ip,
        None => host.parse().with_context(|| format!("to: {host}"))?,
    };
    Ok((ip, port.parse()?))
}

/// The node where an external row's packets arrive: `via`, else the node owning the address.
fn arrival_node(st: &LabState, row: &Row, ip: Ipv4Addr) -> Result<String> {
    if let Some(via) = &row.via {
        return Ok(via.clone());
    }
    st.nodes
        .iter()
        .find(|n| n.ip == ip)
        .map(|n| n.name.clone())
        .with_context(|| format!("{}: no via and {ip} is no node's", row.describe()))
}

/// The client's own address.
fn client_ip(lab: &Lab, row: &Row) -> Result<Ipv4Addr> {
    if row.from == names::EXTERNAL {
        return Ok(EXTERNAL_IP);
    }
    lab.pod_ip(&row.from)
}

/// The compile step's answer to a row, in the row's terms.
fn predicted(
    st: &LabState,
    lab: &Lab,
    row: &Row,
    nodes: &[NodeView<'_>],
    service_cidr: ipnet::Ipv4Net,
) -> Result<Expect> {
    let (ip, port) = destination(st, &row.to)?;
    let me = client_ip(lab, row)?;
    let index = |name: &str| {
        nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    };
    let client = if row.from == names::EXTERNAL {
        Client::Outside {
            via: index(&arrival_node(st, row, ip)?)?,
            ip: me.into(),
        }
    } else {
        let pod = lab.pod(&row.from)?;
        let node = pod.node.as_deref().context("pod without node")?;
        Client::OnNode {
            node: index(node)?,
            ip: me.into(),
        }
    };
    let protocol = match row.protocol() {
        Protocol::Tcp => CompileProtocol::Tcp,
        Protocol::Udp => CompileProtocol::Udp,
    };
    Ok(
        match predict(
            nodes,
            &[service_cidr.into()],
            client,
            ip.into(),
            port,
            protocol,
        ) {
            Verdict::Refused => Expect::Outcome("refused".into()),
            Verdict::Dropped => Expect::Outcome("dropped".into()),
            Verdict::Untranslated => Expect::Outcome("untranslated".into()),
            Verdict::Backends(backends) => {
                let mut answers = BTreeMap::new();
                for (backend, seen) in backends {
                    let pod = st
                        .pods
                        .iter()
                        .find(|p| p.ip.map(IpAddr::V4) == Some(backend.ip))
                        .map(|p| p.name.clone())
                        .unwrap_or_else(|| backend.ip.to_string());
                    let source = match seen {
                        SourceSeen::Client => "client".to_string(),
                        SourceSeen::Node(node_ip) => st
                            .nodes
                            .iter()
                            .find(|n| IpAddr::V4(n.ip) == node_ip)
                            .map(|n| n.name.clone())
                            .unwrap_or_else(|| node_ip.to_string()),
                    };
                    answers.insert(pod, source);
                }
                Expect::Answers(answers)
            }
        },
    )
}

/// What real traffic does for a row; None when it matches the expectation, else why not.
fn observed_mismatch(lab: &Lab, st: &LabState, row: &Row) -> Result<Option<String>> {
    let (ip, port) = destination(st, &row.to)?;
    let target = TargetSpec {
        host: ip.to_string(),
        port,
        protocol: row.protocol(),
    };
    let probe = |ask: Ask| lab.probe_asking(&row.from, &target, ask, Duration::from_secs(2));
    match &row.expect {
        Expect::Outcome(outcome) => {
            let want = match outcome.as_str() {
                "refused" => Outcome::Refused,
                "dropped" => Outcome::Timeout,
                other => bail!("{}: unknown outcome {other}", row.describe()),
            };
            let got = probe(Ask::Hostname)?;
            Ok((got.outcome != want).then(|| format!("{:?}, not {want:?}", got.outcome)))
        }
        Expect::Answers(answers) => {
            let me = client_ip(lab, row)?;
            let sources: BTreeSet<Ipv4Addr> = answers
                .values()
                .map(|s| match s.as_str() {
                    "client" => Ok(me),
                    node => st.node(node).map(|n| n.ip).context("no such node"),
                })
                .collect::<Result<_>>()?;
            let mut pods = BTreeSet::new();
            let mut seen = BTreeSet::new();
            // Enough tries that a missing backend of two shows up (2^-11).
            for _ in 0..12 {
                let r = probe(Ask::Hostname)?;
                pods.insert(r.answer.unwrap_or_else(|| format!("{:?}", r.outcome)));
                let r = probe(Ask::ClientIp)?;
                let answer = r.answer.unwrap_or_default();
                match answer.parse::<SocketAddr>().map(|a| a.ip()) {
                    Ok(IpAddr::V4(v4)) => seen.insert(v4.to_string()),
                    _ => seen.insert(format!("{:?} {answer}", r.outcome)),
                };
            }
            let want_pods: BTreeSet<String> = answers.keys().cloned().collect();
            let want_seen: BTreeSet<String> = sources.iter().map(ToString::to_string).collect();
            Ok((pods != want_pods || seen != want_seen).then(|| {
                format!(
                    "answered by {pods:?} seeing {seen:?}, not {want_pods:?} seeing {want_seen:?}"
                )
            }))
        }
    }
}

#[test]
fn every_row_of_the_service_flow_table_holds_in_compile_and_in_the_lab() -> Result<()> {
    if skip_unless_root("every_row_of_the_service_flow_table_holds_in_compile_and_in_the_lab") {
        return Ok(());
    }
    let rows = rows()?;
    assert!(rows.len() >= 15, "the table lost rows: {}", rows.len());
    // The lab routes the load balancer range through node-a only.
    assert!(
        rows.iter()
            .all(|r| r.via.as_deref().is_none_or(|v| v == "node-a")),
        "rows may only go via node-a"
    );
    let mut opts = lab_options(&unique_name("flows"), &examples());
    opts.proxy = ProxyMode::Required;
    let service_cidr = opts.service_cidr;
    let lab = Lab::up(opts)?;
    let st = lab.state()?;

    // The compile step, on the cluster exactly as the agents read it.
    let snapshot = ManifestSource::new(lab.paths().cluster()).reload().snapshot;
    let node_names: Vec<String> = st.nodes.iter().map(|n| n.name.clone()).collect();
    let tables: Vec<(ServiceTable, Vec<IpAddr>)> = node_names
        .iter()
        .map(|n| (compile(&snapshot, n).table, node_ips(&snapshot, n)))
        .collect();
    let views: Vec<NodeView<'_>> = node_names
        .iter()
        .zip(&tables)
        .map(|(name, (table, addresses))| NodeView {
            name,
            table,
            addresses,
        })
        .collect();
    let mut failures = Vec::new();
    for row in &rows {
        let got = predicted(&st, &lab, row, &views, service_cidr)?;
        if got != row.expect {
            failures.push(format!(
                "compile: {}: {got:?}, not {:?}",
                row.describe(),
                row.expect
            ));
        }
    }

    // Real traffic. The external client routes the load balancer range through node-a.
    let via = lab.node_ip("node-a")?.to_string();
    assert_eq!(
        lab.exec(
            names::EXTERNAL,
            &["ip", "route", "add", "198.18.0.0/24", "via", &via]
        )?,
        0
    );
    for row in &rows {
        if let Some(why) = observed_mismatch(&lab, &st, row)? {
            failures.push(format!("lab: {}: {why}", row.describe()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
