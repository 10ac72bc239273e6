//! NodePort: connect() + one HTTP request from the external client through a
//! node to a backend on another node, through Sluice's tc programs and through
//! the iptables rules kube-proxy would write for it (DNAT in PREROUTING,
//! MASQUERADE of what leaves towards the backend).
//!
//! Two two-node labs with the same pods run side by side: one programmed by
//! sluice-proxy, one without it whose node-a namespace holds the iptables rules.
//! Rounds alternate the order; the ratio Sluice ÷ iptables is computed per round
//! and its median reported.
//!
//! Packets per second: UDP request/reply datagrams from the external client to the
//! UDP NodePort, a window of them in flight, for a fixed time. Each exchange
//! crosses node-a twice (request and reply), so node-a forwards twice the rate.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use sluice_lab::{Lab, Protocol, ProxyMode, names, netns};

use crate::east_west::{bring_up, load_rules};
use crate::stats::{Summary, median, summarize_us};

const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
/// Datagrams in flight: enough to keep both cores busy, few enough not to overrun queues.
pub const UDP_WINDOW: u64 = 32;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeName: node-b
  containers: [{name: web, image: x, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]
"#;

const SERVICE: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum System {
    Sluice,
    Iptables,
}

impl System {
    pub const ALL: [System; 2] = [System::Sluice, System::Iptables];

    pub fn label(self) -> &'static str {
        match self {
            System::Sluice => "Sluice (tc NodePort, SNAT)",
            System::Iptables => "iptables DNAT + MASQUERADE",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemResult {
    pub system: System,
    pub latency: Summary,
    /// Connections per second over the measured rounds (sequential, one client).
    pub connections_per_second: f64,
    pub samples_us: Vec<f64>,
    /// UDP request/reply exchanges per second over the measured rounds.
    pub udp_exchanges_per_second: f64,
    /// Datagrams that got no reply.
    pub udp_lost: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodePortResult {
    pub rounds: usize,
    pub connections_per_round: u64,
    pub systems: Vec<SystemResult>,
    /// Per round: Sluice's p50 / iptables' p50, and connection rates likewise.
    pub ratio_p50_by_round: Vec<f64>,
    pub ratio_p50_median: f64,
    pub ratio_p99_median: f64,
    pub ratio_rate_median: f64,
    /// Seconds of UDP exchanges per system per round.
    pub udp_seconds_per_round: f64,
    /// Per round: Sluice's UDP exchange rate / iptables'.
    pub ratio_udp_by_round: Vec<f64>,
    pub ratio_udp_median: f64,
}

/// What one UDP exchange run counted.
#[derive(Clone, Copy, Debug, Default)]
struct UdpRun {
    replies: u64,
    lost: u64,
    elapsed: Duration,
}

/// Sends "hostname" datagrams to `target` from the external client for `duration`, keeping
/// [`UDP_WINDOW`] in flight, and counts the replies. A window that stays unanswered for
/// 20 ms counts as lost and is sent again, so a drop does not stall the run.
fn udp_exchanges(lab: &Lab, target: SocketAddr, duration: Duration) -> Result<UdpRun> {
    let netns_name = names::external_netns(lab.name());
    netns::run_in(&netns_name, "udp exchanges", move || {
        let socket = UdpSocket::bind("0.0.0.0:0").context("binding the UDP client")?;
        socket
            .connect(target)
            .context("connecting the UDP client")?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let mut run = UdpRun::default();
        let mut in_flight = 0u64;
        let mut buf = [0u8; 64];
        let start = Instant::now();
        while start.elapsed() < duration {
            while in_flight < UDP_WINDOW {
                socket.send(b"hostname").context("sending")?;
                in_flight += 1;
            }
            match socket.recv(&mut buf) {
                Ok(_) => {
                    run.replies += 1;
                    in_flight = in_flight.saturating_sub(1);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    run.lost += in_flight;
                    in_flight = 0;
                }
                Err(e) => return Err(e).context("receiving"),
            }
        }
        run.elapsed = start.elapsed();
        Ok(run)
    })
}

/// kube-proxy's translation for one NodePort with a remote endpoint, reduced to its two rules.
fn iptables_rules(node_ip: &str, backend: &str) -> String {
    format!(
        "*nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n\
         -A PREROUTING -d {node_ip}/32 -p tcp --dport {NODE_PORT} -j DNAT --to-destination {backend}:8080\n\
         -A PREROUTING -d {node_ip}/32 -p udp --dport {UDP_NODE_PORT} -j DNAT --to-destination {backend}:5353\n\
         -A POSTROUTING -d {backend}/32 -p tcp --dport 8080 -j MASQUERADE\n\
         -A POSTROUTING -d {backend}/32 -p udp --dport 5353 -j MASQUERADE\n\
         COMMIT\n"
    )
}

pub fn run(bin_dir: &Path, rounds: usize, per_round: u64) -> Result<NodePortResult> {
    let tag = std::process::id() % 10_000;
    let (_d1, sluice) = bring_up(
        bin_dir,
        &format!("bnp-s{tag}"),
        &format!("{MANIFESTS}{SERVICE}"),
        ProxyMode::Required,
    )?;
    let (_d2, ipt) = bring_up(bin_dir, &format!("bnp-i{tag}"), MANIFESTS, ProxyMode::Off)?;
    let ipt_node = ipt.node_ip("node-a")?;
    let rules = iptables_rules(&ipt_node.to_string(), &ipt.pod_ip("web")?.to_string());
    load_rules(&ipt, Some("node-a"), &["iptables-restore"], &rules)?;
    let target = |system: System| -> Result<(&Lab, String)> {
        let lab = match system {
            System::Sluice => &sluice,
            System::Iptables => &ipt,
        };
        Ok((lab, format!("{}:{NODE_PORT}", lab.node_ip("node-a")?)))
    };
    // Warm-up, and a check that both paths reach the backend.
    for system in System::ALL {
        let (lab, to) = target(system)?;
        let mut report = lab.load(names::EXTERNAL, &to, Protocol::Tcp, per_round / 10 + 1)?;
        for _ in 0..50 {
            if report.answers.contains_key("web") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            report = lab.load(names::EXTERNAL, &to, Protocol::Tcp, 1)?;
        }
        ensure!(
            report.answers.keys().eq(["web"].iter()),
            "{}: warm-up did not reach the backend: {report:?}",
            system.label()
        );
    }

    let mut samples: BTreeMap<System, Vec<f64>> = BTreeMap::new();
    let mut p50: BTreeMap<System, Vec<f64>> = BTreeMap::new();
    let mut p99: BTreeMap<System, Vec<f64>> = BTreeMap::new();
    let mut rate: BTreeMap<System, Vec<f64>> = BTreeMap::new();
    let mut elapsed_ms: BTreeMap<System, u64> = BTreeMap::new();
    let mut udp_rate: BTreeMap<System, Vec<f64>> = BTreeMap::new();
    let mut udp_total: BTreeMap<System, UdpRun> = BTreeMap::new();
    let udp_seconds = if per_round >= 1000 { 3.0 } else { 0.5 };
    for round in 0..rounds {
        eprintln!(
            "nodeport: round {}/{rounds} ({per_round} connections per system)…",
            round + 1
        );
        let mut order = System::ALL;
        order.rotate_left(round % System::ALL.len());
        for system in order {
            let (lab, to) = target(system)?;
            let report = lab.load(names::EXTERNAL, &to, Protocol::Tcp, per_round)?;
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
            rate.entry(system)
                .or_default()
                .push(per_round as f64 * 1000.0 / (report.elapsed_ms.max(1) as f64));
            *elapsed_ms.entry(system).or_default() += report.elapsed_ms;
            samples.entry(system).or_default().extend(round_samples);

            let udp_target = SocketAddr::new(lab.node_ip("node-a")?.into(), UDP_NODE_PORT);
            let udp = udp_exchanges(lab, udp_target, Duration::from_secs_f64(udp_seconds))?;
            ensure!(
                udp.replies > 0,
                "{}: no UDP reply through the NodePort",
                system.label()
            );
            udp_rate
                .entry(system)
                .or_default()
                .push(udp.replies as f64 / udp.elapsed.as_secs_f64());
            let total = udp_total.entry(system).or_default();
            total.replies += udp.replies;
            total.lost += udp.lost;
            total.elapsed += udp.elapsed;
        }
    }
    drop((sluice, ipt));

    let ratio = |m: &BTreeMap<System, Vec<f64>>| -> Vec<f64> {
        m[&System::Sluice]
            .iter()
            .zip(&m[&System::Iptables])
            .map(|(s, i)| s / i)
            .collect()
    };
    let ratio_p50_by_round = ratio(&p50);
    let systems = System::ALL
        .iter()
        .map(|&system| {
            let all = samples.remove(&system).unwrap_or_default();
            let seconds = elapsed_ms[&system] as f64 / 1000.0;
            let udp = udp_total.get(&system).copied().unwrap_or_default();
            SystemResult {
                system,
                latency: summarize_us(&all),
                connections_per_second: all.len() as f64 / seconds.max(f64::EPSILON),
                samples_us: all,
                udp_exchanges_per_second: udp.replies as f64
                    / udp.elapsed.as_secs_f64().max(f64::EPSILON),
                udp_lost: udp.lost,
            }
        })
        .collect();
    Ok(NodePortResult {
        rounds,
        connections_per_round: per_round,
        systems,
        ratio_p50_median: median(&ratio_p50_by_round),
        ratio_p99_median: median(&ratio(&p99)),
        ratio_rate_median: median(&ratio(&rate)),
        ratio_p50_by_round,
        udp_seconds_per_round: udp_seconds,
        ratio_udp_median: median(&ratio(&udp_rate)),
        ratio_udp_by_round: ratio(&udp_rate),
    })
}
