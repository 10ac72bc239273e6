//! sluice-bench: measures Sluice against baselines run side by side, and
//! writes a report (Markdown and JSON with every sample) under bench/results/.

mod east_west;
mod kube_proxy_rules;
mod programming;
mod stats;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(name = "sluice-bench", about = "Sluice benchmarks")]
struct Args {
    /// Fewer samples: keeps the harness working in CI; not for figures.
    #[arg(long)]
    quick: bool,
    /// Where to write the report (default: bench/results/<unix time>/).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .context("binary has no directory")?
        .to_path_buf())
}

fn machine() -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    json!({"kernel": kernel.trim(), "cores": cores})
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bins = bin_dir()?;
    let proxy = bins.join("sluice-proxy");
    let changes = if args.quick { 10 } else { 100 };
    let mut report = String::from("# Sluice benchmarks\n\n");
    let machine = machine();
    report.push_str(&format!(
        "Machine: {} cores, kernel {}.\n\n",
        machine["cores"],
        machine["kernel"].as_str().unwrap_or("?")
    ));

    report.push_str("## Programming latency (manifest change → maps updated)\n\n");
    report.push_str("| Services present | changes | settle window | p50 | p99 | max |\n|---:|---:|---:|---:|---:|---:|\n");
    let mut programming_results = Vec::new();
    for services in [1, 1000] {
        eprintln!("programming latency: {services} Services, {changes} changes…");
        let r = programming::run(&proxy, services, changes, 10)?;
        report.push_str(&format!(
            "| {} | {} | {} ms | {:.1} ms | {:.1} ms | {:.1} ms |\n",
            r.services,
            r.changes,
            r.settle_ms,
            r.latency.p50_us / 1000.0,
            r.latency.p99_us / 1000.0,
            r.latency.max_us / 1000.0
        ));
        programming_results.push(r);
    }

    let (rounds, per_round, service_counts): (usize, u64, &[usize]) = if args.quick {
        (2, 200, &[1])
    } else {
        (10, 1000, &[1, 1000])
    };
    let mut east_west_results = Vec::new();
    for &services in service_counts {
        let ew = east_west::run(&bins, services, rounds, per_round)?;
        report.push_str(&format!(
            "\n## East–west: connect() + HTTP request to a ClusterIP, {} Services present\n\n\
             {} connections per system in {} rounds (order rotated each round), one backend pod, \
             one client making sequential connections. Ratios are to the direct path, per round, \
             median over rounds. {}.\n\n\
             | path | p50 | p90 | p99 | conn/s | p50 ÷ direct | p99 ÷ direct |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
            ew.services,
            per_round * rounds as u64,
            rounds,
            ew.iptables_version,
        ));
        for system in &ew.systems {
            report.push_str(&format!(
                "| {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} | {:.3} | {:.3} |\n",
                system.system.label(),
                system.latency.p50_us,
                system.latency.p90_us,
                system.latency.p99_us,
                system.connections_per_second,
                system.ratio_p50_median,
                system.ratio_p99_median,
            ));
        }
        east_west_results.push(ew);
    }

    let out = match args.out {
        Some(out) => out,
        None => default_out_dir()?,
    };
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("report.md"), &report)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json!({
            "machine": machine,
            "quick": args.quick,
            "programming": programming_results,
            "east_west": east_west_results,
        }))?,
    )?;
    println!("{report}");
    eprintln!("report written to {}", out.display());
    Ok(())
}

fn default_out_dir() -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join(secs.to_string()))
}
