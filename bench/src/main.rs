//! sluice-bench: measures Sluice against baselines run side by side, and
//! writes a report (Markdown and JSON with every sample) under bench/results/.

mod east_west;
mod kube_proxy_rules;
mod policy;
mod programming;
mod stats;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
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
    /// Run only these scenarios (repeat or comma-separate; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Manifest change → service maps updated.
    Programming,
    /// connect() + HTTP request to a ClusterIP against kube-proxy's rules and the direct path.
    EastWest,
    /// NetworkPolicy: new connections with 0/100/1,000 policies, change → enforcement.
    Policy,
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
    let runs = |scenario: Scenario| args.only.is_empty() || args.only.contains(&scenario);
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

    let mut programming_results = Vec::new();
    if runs(Scenario::Programming) {
        report.push_str("## Programming latency (manifest change → maps updated)\n\n");
        report.push_str("| Services present | changes | settle window | p50 | p99 | max |\n|---:|---:|---:|---:|---:|---:|\n");
    }
    for services in [1, 1000]
        .into_iter()
        .filter(|_| runs(Scenario::Programming))
    {
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
    for &services in service_counts.iter().filter(|_| runs(Scenario::EastWest)) {
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

    let mut policy_result = None;
    if runs(Scenario::Policy) {
        // Quick: enough to exercise every step; full: the figures.
        let (rounds, per_round, changes) = if args.quick {
            (2, 200, 5)
        } else {
            (10, 1000, 50)
        };
        let r = policy::run(&bins, rounds, per_round, changes)?;
        policy_report(&mut report, &r);
        policy_result = Some(r);
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
            "policy": policy_result,
        }))?,
    )?;
    println!("{report}");
    eprintln!("report written to {}", out.display());
    Ok(())
}

fn policy_report(report: &mut String, r: &policy::PolicyResult) {
    let rate = &r.rate;
    report.push_str(&format!(
        "\n## NetworkPolicy: new connections with 0, 100 and 1,000 policies\n\n\
         One client pod makes {} sequential connect() + HTTP requests per configuration and round \
         to a server pod in another namespace on the same node, in {} rounds alternating the order \
         (0, 100, 1000, then 1000, 100, 0); with policies, the server is isolated by one that allows \
         the client and by others whose ipBlock, port-range, named-port and namespace rules fill \
         the tables below (the rest select other pods), and a pod labelled like the client in a \
         third namespace is checked to be dropped. Ratios are to the 0-policy rate of the same \
         round; table sizes are as `sluice_policy::compile_node` builds them for the agent.\n\n\
         | policies | isolating the server | peer prefixes | allows at the server | conn/s | p50 | p99 | \
         rate ÷ 0 policies (median) | min | max | p50 ÷ 0 policies (median) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        rate.connections_per_round, rate.rounds,
    ));
    for c in &rate.configs {
        report.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            c.policies,
            c.isolating_server,
            c.tables.peer_prefixes,
            c.tables.server_ingress_allows,
            c.connections_per_second,
            c.latency.p50_us,
            c.latency.p99_us,
            c.rate_ratio_median,
            c.rate_ratio_min,
            c.rate_ratio_max,
            c.p50_ratio_median,
        ));
    }
    report.push_str(&format!(
        "\n## NetworkPolicy: change → enforcement\n\n\
         Each change writes or removes one manifest file (atomically; the clock starts just before \
         the rename or removal) while a thread in the client's network namespace opens a new TCP \
         connection to the server every {} ms (each waiting up to {} ms for the handshake); \
         \"new connections\" is the start of the first of {} consecutive connections with the new \
         verdict, so its resolution is the interval, not the timeout. \"Status file\" is when the \
         agent's status file named the new state (what `Lab::wait_policy_enforced` waits for, polled \
         every 2 ms), and \"lab rendered\" when the lab had rendered the change for the agent (its \
         manifest watch waits for 100 ms of quiet): that part is the lab's, not the agent's.\n\n\
         | other policies | change | changes | new connections p50 | p99 | max | status file p50 | p99 | lab rendered p50 |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        r.attempt_interval_ms, r.attempt_timeout_ms, r.confirm,
    ));
    for e in &r.enforcement {
        report.push_str(&format!(
            "| {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |\n",
            e.background_policies,
            e.change.label(),
            e.changes,
            e.new_connections.p50_us / 1000.0,
            e.new_connections.p99_us / 1000.0,
            e.new_connections.max_us / 1000.0,
            e.status_file.p50_us / 1000.0,
            e.status_file.p99_us / 1000.0,
            e.lab_rendered.p50_us / 1000.0,
        ));
    }
    let flaps: usize = r.enforcement.iter().map(|e| e.flaps).sum();
    if flaps > 0 {
        report.push_str(&format!(
            "\n{flaps} connections disagreed with the transition they were part of (the new verdict before it or the old one after).\n"
        ));
    }
}

fn default_out_dir() -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join(secs.to_string()))
}
