//! What `sluice lab status` shows: the recorded state plus whether its processes are alive.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::state::{
    ExternalState, LabPaths, LabState, Phase, PodPhase, PortSpec, ServiceState, UnderlayState,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabStatus {
    pub name: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub manifests_dir: PathBuf,
    pub service_cidr: Ipv4Net,
    /// The IPv6 service CIDR (None: the lab is IPv4-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cidr6: Option<Ipv6Net>,
    pub supervisor: Option<ProcessStatus>,
    /// Whether node agents run (false with --no-proxy).
    pub proxy: bool,
    /// The rendered cluster (what the node agents read).
    pub cluster_dir: PathBuf,
    pub state_file: PathBuf,
    pub logs_dir: PathBuf,
    pub cgroup: PathBuf,
    /// The bridge joining the nodes and the external client.
    pub underlay: Option<UnderlayState>,
    /// The external client (`probe external …`, `exec external -- …`).
    pub external: Option<ExternalState>,
    /// The Ingress controller, when the manifests hold Ingresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressRow>,
    pub nodes: Vec<NodeRow>,
    pub pods: Vec<PodRow>,
    pub services: Vec<ServiceState>,
    /// Objects left out of the rendered cluster because the API server would refuse them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Every log file.
    pub logs: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: i32,
    pub alive: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub name: String,
    pub netns: String,
    pub pod_cidr: Ipv4Net,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<Ipv6Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// The underlay-side end of the node's uplink (`eth0` in the node's netns).
    pub underlay_port: Option<String>,
    pub cgroup: PathBuf,
    /// The node agent: None when the lab runs without one or it is not running.
    pub daemon: Option<ProcessStatus>,
    pub daemon_ready: bool,
    pub log: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodRow {
    pub namespace: String,
    pub name: String,
    pub phase: PodPhase,
    pub node: Option<String>,
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub ready: bool,
    pub ports: Vec<PortSpec>,
    pub netns: Option<String>,
    pub cgroup: Option<PathBuf>,
    pub server: Option<ProcessStatus>,
    pub log: Option<PathBuf>,
}

/// Where `sluice-ingress` runs: the node, its address, the process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRow {
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    pub process: Option<ProcessStatus>,
    pub log: PathBuf,
    /// The status address the controller published for each Ingress ("namespace/name").
    #[serde(default)]
    pub ingresses: BTreeMap<String, Vec<String>>,
}

/// What the controller's status file says (missing or unreadable: nothing yet).
fn published_ingresses(path: &Path) -> BTreeMap<String, Vec<String>> {
    #[derive(Deserialize)]
    struct StatusFile {
        ingresses: BTreeMap<String, Vec<String>>,
    }
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<StatusFile>(&b).ok())
        .map(|f| f.ingresses)
        .unwrap_or_default()
}

fn proc_status(p: Option<crate::process::ProcRef>) -> Option<ProcessStatus> {
    p.map(|p| ProcessStatus {
        pid: p.pid,
        alive: p.alive(),
    })
}

impl LabStatus {
    pub fn of(state: &LabState, paths: &LabPaths) -> LabStatus {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(paths.logs())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        LabStatus {
            name: state.name.clone(),
            phase: state.phase,
            error: state.error.clone(),
            manifests_dir: state.manifests_dir.clone(),
            service_cidr: state.service_cidr,
            service_cidr6: state.service_cidr6,
            supervisor: proc_status(state.supervisor),
            proxy: state.proxy.is_some(),
            cluster_dir: paths.cluster(),
            state_file: paths.state(),
            logs_dir: paths.logs(),
            cgroup: state.cgroup.clone(),
            underlay: state.underlay.clone(),
            external: state.external.clone(),
            ingress: state.ingress.as_ref().map(|i| IngressRow {
                node: i.node.clone(),
                ip: state.node(&i.node).map(|n| n.ip),
                process: proc_status(i.proc),
                log: i.log.clone(),
                ingresses: published_ingresses(&paths.ingress_status()),
            }),
            nodes: state
                .nodes
                .iter()
                .map(|n| NodeRow {
                    name: n.name.clone(),
                    netns: n.netns.clone(),
                    pod_cidr: n.pod_cidr,
                    ip: n.ip,
                    pod_cidr6: n.pod_cidr6,
                    ip6: n.ip6,
                    underlay_port: n.underlay_port.clone(),
                    cgroup: n.cgroup.clone(),
                    daemon: proc_status(n.proxy),
                    daemon_ready: n.proxy_ready,
                    log: n.proxy_log.clone(),
                })
                .collect(),
            pods: state
                .pods
                .iter()
                .map(|p| PodRow {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    phase: p.phase,
                    node: p.node.clone(),
                    ip: p.ip,
                    ip6: p.ip6,
                    ready: p.ready,
                    ports: p.ports.clone(),
                    netns: p.netns.clone(),
                    cgroup: p.cgroup.clone(),
                    server: proc_status(p.server),
                    log: p.log.clone(),
                })
                .collect(),
            services: state.services.clone(),
            problems: state.render_problems.clone(),
            logs,
        }
    }

    /// Nodes and pods as two short tables.
    pub fn tables(&self) -> String {
        let mut out = String::new();
        let node_rows: Vec<Vec<String>> = self
            .nodes
            .iter()
            .map(|n| {
                let daemon = match (&n.daemon, self.proxy) {
                    (_, false) => "none (--no-proxy)".to_string(),
                    (Some(d), _) if d.alive && n.daemon_ready => format!("{} ready", d.pid),
                    (Some(d), _) if d.alive => format!("{} starting", d.pid),
                    (Some(d), _) => format!("{} dead", d.pid),
                    (None, _) => "dead".to_string(),
                };
                vec![
                    n.name.clone(),
                    n.netns.clone(),
                    both(n.pod_cidr, n.pod_cidr6),
                    both(n.ip, n.ip6),
                    daemon,
                ]
            })
            .collect();
        table(
            &mut out,
            &["NODE", "NETNS", "POD CIDRS", "NODE IPS", "SLUICE-PROXY"],
            &node_rows,
        );
        out.push('\n');
        let network = self.network_rows();
        if !network.is_empty() {
            table(
                &mut out,
                &["NETWORK", "NETNS", "ADDRESS", "WIRING"],
                &network,
            );
            out.push('\n');
        }
        let pod_rows: Vec<Vec<String>> = self
            .pods
            .iter()
            .map(|p| {
                let ports = p
                    .ports
                    .iter()
                    .map(|port| match &port.name {
                        Some(n) => format!("{n}:{}/{}", port.port, port.protocol),
                        None => format!("{}/{}", port.port, port.protocol),
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                let server_dead = p.server.is_some_and(|s| !s.alive)
                    || (p.phase == PodPhase::Running && p.server.is_none());
                let ready = match (p.phase, p.ready) {
                    (PodPhase::Pending, _) => "Pending".to_string(),
                    (_, true) => "yes".to_string(),
                    (_, false) if server_dead => "no (server dead)".to_string(),
                    (_, false) => "no".to_string(),
                };
                let ips = match (p.ip, p.ip6) {
                    (Some(ip), ip6) => both(ip, ip6),
                    (None, Some(ip6)) => ip6.to_string(),
                    (None, None) => "-".into(),
                };
                vec![
                    format!("{}/{}", p.namespace, p.name),
                    p.node.clone().unwrap_or_else(|| "-".into()),
                    ips,
                    ready,
                    if ports.is_empty() { "-".into() } else { ports },
                ]
            })
            .collect();
        table(
            &mut out,
            &["POD", "NODE", "IPS", "READY", "PORTS"],
            &pod_rows,
        );
        out
    }

    /// The underlay and the external client, one row each.
    fn network_rows(&self) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        if let Some(u) = &self.underlay {
            let mut ports: Vec<String> = self
                .nodes
                .iter()
                .filter_map(|n| n.underlay_port.as_ref().map(|p| format!("{p}={}", n.name)))
                .collect();
            if let Some(x) = &self.external {
                ports.push(format!("{}={}", x.underlay_port, crate::names::EXTERNAL));
            }
            rows.push(vec![
                "underlay".into(),
                u.netns.clone(),
                both(u.network, u.network6),
                format!("bridge {}: {}", u.bridge, ports.join(" ")),
            ]);
        }
        if let Some(x) = &self.external {
            rows.push(vec![
                crate::names::EXTERNAL.into(),
                x.netns.clone(),
                both(x.ip, x.ip6),
                format!(
                    "{} on the bridge; routes to node addresses only; own cgroup",
                    x.ifname
                ),
            ]);
        }
        if let Some(i) = &self.ingress {
            let process = match &i.process {
                Some(p) if p.alive => format!("sluice-ingress PID {}", p.pid),
                Some(p) => format!("sluice-ingress PID {} exited", p.pid),
                None => "sluice-ingress not running (see its log)".into(),
            };
            rows.push(vec![
                "ingress".into(),
                format!("node {}", i.node),
                i.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                format!("{process}: HTTP :80, HTTPS :443, metrics :10254"),
            ]);
            for (ingress, addresses) in &i.ingresses {
                rows.push(vec![
                    "ingress".into(),
                    ingress.clone(),
                    addresses.join(", "),
                    "status address published by sluice-ingress".into(),
                ]);
            }
        }
        rows
    }

    /// The full human-readable status.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let sup = match &self.supervisor {
            Some(s) => format!("PID {} {}", s.pid, if s.alive { "alive" } else { "dead" }),
            None => "none".into(),
        };
        let _ = writeln!(
            out,
            "lab {}: {:?} (supervisor {sup})",
            self.name, self.phase
        );
        if let Some(e) = &self.error {
            let _ = writeln!(out, "error: {e}");
        }
        let _ = writeln!(out, "manifests:    {}", self.manifests_dir.display());
        let _ = writeln!(
            out,
            "service CIDR: {}",
            both(self.service_cidr, self.service_cidr6)
        );
        let _ = writeln!(out, "rendered:     {}", self.cluster_dir.display());
        let _ = writeln!(out, "cgroup:       {}", self.cgroup.display());
        let _ = writeln!(out, "state:        {}", self.state_file.display());
        let _ = writeln!(out, "logs:         {}", self.logs_dir.display());
        for log in &self.logs {
            let _ = writeln!(out, "  {}", log.display());
        }
        out.push('\n');
        out.push_str(&self.tables());
        if !self.services.is_empty() {
            out.push('\n');
            let rows: Vec<Vec<String>> = self
                .services
                .iter()
                .map(|s| {
                    let ports = s
                        .ports
                        .iter()
                        .map(|p| match p.node_port {
                            Some(np) => format!("{}:{np}/{}", p.port, p.protocol),
                            None => format!("{}/{}", p.port, p.protocol),
                        })
                        .collect::<Vec<_>>()
                        .join(",");
                    let ips = if s.cluster_ips.is_empty() {
                        s.cluster_ip
                            .map(|ip| ip.to_string())
                            .unwrap_or_else(|| "None".into())
                    } else {
                        let all: Vec<String> =
                            s.cluster_ips.iter().map(|ip| ip.to_string()).collect();
                        all.join(",")
                    };
                    vec![
                        format!("{}/{}", s.namespace, s.name),
                        s.type_.clone(),
                        ips,
                        ports,
                    ]
                })
                .collect();
            table(
                &mut out,
                &["SERVICE", "TYPE", "CLUSTER IPS", "PORTS"],
                &rows,
            );
        }
        if !self.problems.is_empty() {
            out.push_str("\nleft out of the rendered cluster:\n");
            for p in &self.problems {
                let _ = writeln!(out, "  {p}");
            }
        }
        out
    }
}

/// An IPv4 value and its IPv6 twin, if any: "10.244.0.2,fd00:10:244::2".
fn both(v4: impl std::fmt::Display, v6: Option<impl std::fmt::Display>) -> String {
    match v6 {
        Some(v6) => format!("{v4},{v6}"),
        None => v4.to_string(),
    }
}

/// A left-aligned text table.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut out = String::new();
        table(
            &mut out,
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(out, "A    BB\nxxx  y\nz    w\n");
    }
}
