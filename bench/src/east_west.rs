//! East–west: connect() + one HTTP request through a ClusterIP, against the
//! same directly to the pod's IP (the physical limit), in one lab.
//!
//! One backend pod, so both paths end at the same server; the only
//! difference is the socket-level translation. Rounds alternate the two
//! paths so drift in the machine's state hits both alike; the ratio is
//! computed per round and its median reported.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use sluice_lab::{Lab, LabOptions, Protocol};

use crate::stats::{Summary, summarize_us};

#[derive(Clone, Debug, Serialize)]
pub struct PathResult {
    pub connections: u64,
    pub latency: Summary,
    pub samples_us: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub cluster_ip_p50_us: f64,
    pub direct_p50_us: f64,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EastWestResult {
    pub cluster_ip: PathResult,
    pub direct: PathResult,
    pub rounds: Vec<Round>,
    /// Median over rounds of (ClusterIP p50 / direct p50).
    pub ratio_p50_median: f64,
    pub ratio_p50_min: f64,
    pub ratio_p50_max: f64,
    /// Median over rounds of (ClusterIP p99 / direct p99).
    pub ratio_p99_median: f64,
}

const MANIFESTS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: agnhost}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {containers: [{name: c, image: agnhost, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
";

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(bin_dir: &Path, rounds: usize, per_round: u64) -> Result<EastWestResult> {
    let manifests = tempfile::tempdir()?;
    std::fs::write(manifests.path().join("lab.yaml"), MANIFESTS)?;
    let mut opts = LabOptions::new(
        format!("bench-ew-{}", std::process::id() % 100_000),
        manifests.path(),
    );
    opts.bin_dir = Some(bin_dir.to_path_buf());
    let lab = Lab::up(opts).context("bringing up the east-west lab")?;
    let direct_target = format!("{}:8080", lab.pod_ip("web")?);
    let service_target = "10.96.0.10:80";

    // Warm-up: caches, ARP, the server's first accepts.
    lab.load("client", service_target, Protocol::Tcp, per_round / 10 + 1)?;
    lab.load("client", &direct_target, Protocol::Tcp, per_round / 10 + 1)?;

    let mut all_service = Vec::new();
    let mut all_direct = Vec::new();
    let mut round_results = Vec::new();
    for round in 0..rounds {
        eprintln!(
            "east-west: round {}/{rounds} ({per_round} connections per path)…",
            round + 1
        );
        // Alternate which path goes first.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut service = None;
        let mut direct = None;
        for via_service in order {
            let target = if via_service {
                service_target
            } else {
                &direct_target
            };
            let report = lab.load("client", target, Protocol::Tcp, per_round)?;
            ensure!(
                report.answered == per_round,
                "{target}: only {} of {per_round} connections answered: {:?}",
                report.answered,
                report.failures
            );
            let samples: Vec<f64> = report.samples_us.iter().map(|&s| s as f64).collect();
            if via_service {
                service = Some(samples);
            } else {
                direct = Some(samples);
            }
        }
        let (service, direct) = (service.unwrap_or_default(), direct.unwrap_or_default());
        let (s, d) = (summarize_us(&service), summarize_us(&direct));
        round_results.push(Round {
            cluster_ip_p50_us: s.p50_us,
            direct_p50_us: d.p50_us,
            ratio_p50: s.p50_us / d.p50_us,
            ratio_p99: s.p99_us / d.p99_us,
        });
        all_service.extend(service);
        all_direct.extend(direct);
    }
    lab.down()?;

    let mut p50_ratios: Vec<f64> = round_results.iter().map(|r| r.ratio_p50).collect();
    let mut p99_ratios: Vec<f64> = round_results.iter().map(|r| r.ratio_p99).collect();
    let ratio_p50_min = p50_ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let ratio_p50_max = p50_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(EastWestResult {
        cluster_ip: PathResult {
            connections: all_service.len() as u64,
            latency: summarize_us(&all_service),
            samples_us: all_service,
        },
        direct: PathResult {
            connections: all_direct.len() as u64,
            latency: summarize_us(&all_direct),
            samples_us: all_direct,
        },
        ratio_p50_median: median(&mut p50_ratios),
        ratio_p50_min,
        ratio_p50_max,
        ratio_p99_median: median(&mut p99_ratios),
        rounds: round_results,
    })
}
