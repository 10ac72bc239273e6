//! East–west: connect() + one HTTP request from a pod to a ClusterIP, with
//! N Services present, through Sluice and through kube-proxy's iptables and
//! nftables rule structures, against the direct path to the pod's IP.
//!
//! Three labs with the same pods at the same addresses run side by side:
//! one programmed by sluice-proxy, two without it whose node namespace holds
//! kube-proxy-style rules (see kube_proxy_rules.rs). The backend is one pod,
//! so every path ends at the same server. Rounds rotate the order of the
//! systems so drift hits all alike; ratios to the direct path are computed
//! per round and their median reported.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use sluice_lab::{Lab, LabOptions, Protocol, ProxyMode};

use crate::kube_proxy_rules::{ClusterIpService, iptables, nftables};
use crate::stats::{Summary, median, summarize_us};

const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 100);
const CLUSTER_CIDR: &str = "10.244.0.0/16";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum System {
    Direct,
    Sluice,
    Iptables,
    Nftables,
}

impl System {
    pub const ALL: [System; 4] = [
        System::Direct,
        System::Sluice,
        System::Iptables,
        System::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            System::Direct => "pod IP (direct)",
            System::Sluice => "Sluice (socket LB)",
            System::Iptables => "kube-proxy iptables rules",
            System::Nftables => "kube-proxy nftables rules",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemResult {
    pub system: System,
    pub latency: Summary,
    /// Connections per second over the measured rounds (sequential, one client).
    pub connections_per_second: f64,
    /// Per round: this system's p50 / the direct path's p50.
    pub ratio_p50_by_round: Vec<f64>,
    pub ratio_p50_median: f64,
    pub ratio_p99_median: f64,
    pub samples_us: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EastWestResult {
    pub services: usize,
    pub rounds: usize,
    pub connections_per_round: u64,
    pub iptables_version: String,
    pub systems: Vec<SystemResult>,
}

/// The measured Service sits in the middle of the others in name order, so
/// kube-proxy's linear KUBE-SERVICES chain is neither favoured nor doomed.
fn services(count: usize) -> Vec<ClusterIpService> {
    let mut out: Vec<ClusterIpService> = (1..count)
        .map(|i| {
            let half = if i % 2 == 0 { "a" } else { "z" };
            ClusterIpService {
                name: format!("default/svc-{half}-{i:05}:http"),
                ip: Ipv4Addr::new(10, 96, 1 + (i / 250) as u8, 1 + (i % 250) as u8),
                port: 80,
                endpoints: vec![(BACKEND_IP, 8080)],
            }
        })
        .collect();
    out.push(ClusterIpService {
        name: "default/svc-m-web:http".into(),
        ip: SERVICE_IP,
        port: 80,
        endpoints: vec![(BACKEND_IP, 8080)],
    });
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

const PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: node-1, containers: [{name: c, image: agnhost}]}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: agnhost, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.100}
";

/// The same Services as manifests: selector-less, with hand-written slices.
fn service_manifests(services: &[ClusterIpService]) -> String {
    let mut out = String::new();
    for svc in services {
        let name = svc
            .name
            .trim_start_matches("default/")
            .trim_end_matches(":http");
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {}, ports: [{{name: http, port: {}}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [\"{BACKEND_IP}\"]}}]\n",
            svc.ip, svc.port
        ));
    }
    out
}

/// Brings up a lab of `manifests` (written to a temporary directory it keeps).
pub(crate) fn bring_up(
    bin_dir: &Path,
    name: &str,
    manifests: &str,
    proxy: ProxyMode,
) -> Result<(tempfile::TempDir, Lab)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("lab.yaml"), manifests)?;
    let mut opts = LabOptions::new(name, dir.path());
    opts.bin_dir = Some(bin_dir.to_path_buf());
    opts.proxy = proxy;
    let lab = Lab::up(opts).with_context(|| format!("bringing up lab {name}"))?;
    Ok((dir, lab))
}

/// [`bring_up`] with the backend at its pinned address, so every lab's path ends alike.
fn bring_up_pinned(
    bin_dir: &Path,
    name: &str,
    manifests: &str,
    proxy: ProxyMode,
) -> Result<(tempfile::TempDir, Lab)> {
    let (dir, lab) = bring_up(bin_dir, name, manifests, proxy)?;
    ensure!(
        lab.pod_ip("web")? == BACKEND_IP,
        "lab {name} did not give web the pinned address {BACKEND_IP}"
    );
    Ok((dir, lab))
}

/// Loads rule text into the namespace of `lab`'s node `node` (the first when None) with
/// `program`.
pub(crate) fn load_rules(
    lab: &Lab,
    node: Option<&str>,
    program: &[&str],
    rules: &str,
) -> Result<()> {
    let status = lab.status()?;
    let node = match node {
        Some(name) => status.nodes.iter().find(|n| n.name == name),
        None => status.nodes.first(),
    }
    .context("lab has no such node")?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.netns])
        .args(program)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("starting {program:?} (is it installed? cargo xtask setup installs it)")
        })?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn run(
    bin_dir: &Path,
    service_count: usize,
    rounds: usize,
    per_round: u64,
) -> Result<EastWestResult> {
    let services = services(service_count);
    let tag = std::process::id() % 10_000;
    let with_services = format!("{PODS}{}", service_manifests(&services));
    let (_d1, sluice) = bring_up_pinned(
        bin_dir,
        &format!("bew-s{tag}"),
        &with_services,
        ProxyMode::Required,
    )?;
    let (_d2, ipt) = bring_up_pinned(bin_dir, &format!("bew-i{tag}"), PODS, ProxyMode::Off)?;
    load_rules(
        &ipt,
        None,
        &["iptables-restore"],
        &iptables(&services, CLUSTER_CIDR),
    )?;
    let (_d3, nft) = bring_up_pinned(bin_dir, &format!("bew-n{tag}"), PODS, ProxyMode::Off)?;
    load_rules(
        &nft,
        None,
        &["nft", "-f", "-"],
        &nftables(&services, CLUSTER_CIDR),
    )?;
    let iptables_version = Command::new("iptables")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let service_target = format!("{SERVICE_IP}:80");
    let direct_target = format!("{BACKEND_IP}:8080");
    let target = |system: System| -> (&Lab, &str) {
        match system {
            System::Direct => (&sluice, &direct_target),
            System::Sluice => (&sluice, &service_target),
            System::Iptables => (&ipt, &service_target),
            System::Nftables => (&nft, &service_target),
        }
    };
    // Warm-up, and a check that every path reaches the backend.
    for system in System::ALL {
        let (lab, to) = target(system);
        let report = lab.load("client", to, Protocol::Tcp, per_round / 10 + 1)?;
        ensure!(
            report.answers.keys().eq(["web"].iter()),
            "{}: warm-up did not reach the backend: {report:?}",
            system.label()
        );
    }

    let mut samples: BTreeMap<System, Vec<f64>> = BTreeMap::new();
    let mut elapsed_ms: BTreeMap<System, u64> = BTreeMap::new();
    let mut p50: BTreeMap<System, Vec<f64>> = BTreeMap::new();
    let mut p99: BTreeMap<System, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        eprintln!(
            "east-west, {service_count} Services: round {}/{rounds} ({per_round} connections per system)…",
            round + 1
        );
        let mut order = System::ALL;
        order.rotate_left(round % System::ALL.len());
        for system in order {
            let (lab, to) = target(system);
            let report = lab.load("client", to, Protocol::Tcp, per_round)?;
            ensure!(
                report.answered == per_round,
                "{}: {} of {per_round} answered: {:?}",
                system.label(),
                report.answered,
                report.failures
            );
            let round_samples: Vec<f64> = report.samples_us.iter().map(|&s| s as f64).collect();
            let summary = summarize_us(&round_samples);
            p50.entry(system).or_default().push(summary.p50_us);
            p99.entry(system).or_default().push(summary.p99_us);
            *elapsed_ms.entry(system).or_default() += report.elapsed_ms;
            samples.entry(system).or_default().extend(round_samples);
        }
    }
    drop((sluice, ipt, nft));

    let direct_p50 = p50.get(&System::Direct).cloned().unwrap_or_default();
    let direct_p99 = p99.get(&System::Direct).cloned().unwrap_or_default();
    let systems = System::ALL
        .iter()
        .map(|&system| {
            let all = samples.remove(&system).unwrap_or_default();
            let ratios_p50: Vec<f64> = p50[&system]
                .iter()
                .zip(&direct_p50)
                .map(|(s, d)| s / d)
                .collect();
            let ratios_p99: Vec<f64> = p99[&system]
                .iter()
                .zip(&direct_p99)
                .map(|(s, d)| s / d)
                .collect();
            let seconds = elapsed_ms[&system] as f64 / 1000.0;
            SystemResult {
                system,
                latency: summarize_us(&all),
                connections_per_second: all.len() as f64 / seconds.max(f64::EPSILON),
                ratio_p50_median: median(&ratios_p50),
                ratio_p99_median: median(&ratios_p99),
                ratio_p50_by_round: ratios_p50,
                samples_us: all,
            }
        })
        .collect();
    Ok(EastWestResult {
        services: service_count,
        rounds,
        connections_per_round: per_round,
        iptables_version,
        systems,
    })
}
