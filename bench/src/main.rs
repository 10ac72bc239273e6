//! sluice-bench: measures Sluice against baselines run side by side, and
//! writes a report (Markdown and JSON with every sample) under bench/results/.

mod east_west;
mod ingress;
mod kube_proxy_rules;
mod memory;
mod nodeport;
mod plot;
mod policy;
mod process_stats;
mod programming;
mod progress;
mod stats;
mod tls_client;

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
    /// External client → NodePort → remote backend, against iptables DNAT + MASQUERADE.
    Nodeport,
    /// sluice-proxy's resident memory and BPF map memory with 10,000 Services.
    Memory,
    /// sluice-ingress against nginx: HTTP/1.1, HTTP/2 and new TLS connections with 1 and 1,000
    /// hosts; memory with 10,000 hosts and certificates.
    Ingress,
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
    // The lab and the scenarios run the binaries beside this one: one profile for all.
    let profile = ingress::own_profile();
    report.push_str(&format!(
        "Machine: {} cores, kernel {}. Binaries: {} build (sluice-bench and its siblings in {}).\n\n",
        machine["cores"],
        machine["kernel"].as_str().unwrap_or("?"),
        profile,
        bins.display(),
    ));
    let mut progress = progress::Progress::new(
        [
            Scenario::Programming,
            Scenario::Memory,
            Scenario::EastWest,
            Scenario::Nodeport,
            Scenario::Policy,
            Scenario::Ingress,
        ]
        .into_iter()
        .filter(|&s| runs(s))
        .count(),
    );

    // Quick: every step at a size that keeps CI fast; full: the figures.
    let large = if args.quick {
        programming::Workload::new(1000, 10)
    } else {
        programming::Workload::new(10_000, 10)
    };
    let mut programming_results = Vec::new();
    let mut programming_initial = None;
    if runs(Scenario::Programming) {
        let latency_workloads = if args.quick {
            vec![programming::Workload::new(1, 1), large]
        } else {
            vec![
                programming::Workload::new(1, 1),
                programming::Workload::new(1000, 1),
                large,
            ]
        };
        progress.scenario("programming", latency_workloads.len() + 1);
        for workload in latency_workloads {
            progress.step(format_args!(
                "latency: {} Services × {} endpoints, {changes} changes",
                workload.services, workload.endpoints_per_service
            ));
            programming_results.push(programming::run(&proxy, workload, changes, 10)?);
        }
        let repeats = if args.quick { 1 } else { 3 };
        progress.step(format_args!(
            "from nothing: {} Services × {} endpoints, {repeats} times each way",
            large.services, large.endpoints_per_service
        ));
        let initial = programming::initial(&proxy, large, repeats, 10)?;
        programming_report(&mut report, &programming_results, &initial);
        programming_initial = Some(initial);
    }

    let mut memory_result = None;
    if runs(Scenario::Memory) {
        progress.scenario("memory", 1);
        progress.step(format_args!(
            "sluice-proxy with 1 and {} Services × {} endpoints",
            large.services, large.endpoints_per_service
        ));
        let r = memory::run(&proxy, large)?;
        memory_report(&mut report, &r);
        memory_result = Some(r);
    }

    let (rounds, per_round, service_counts): (usize, u64, &[usize]) = if args.quick {
        (2, 200, &[1])
    } else {
        (10, 1000, &[1, 1000, 10_000])
    };
    let mut east_west_results = Vec::new();
    if runs(Scenario::EastWest) {
        progress.scenario("east-west", service_counts.len());
    }
    for &services in service_counts.iter().filter(|_| runs(Scenario::EastWest)) {
        progress.step(format_args!(
            "{services} Services present, {rounds} rounds × {per_round} connections"
        ));
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

    let mut nodeport_result = None;
    if runs(Scenario::Nodeport) {
        let (rounds, per_round) = if args.quick { (2, 200) } else { (10, 1000) };
        progress.scenario("nodeport", 1);
        progress.step(format_args!(
            "TCP and UDP, {rounds} rounds × {per_round} connections per system"
        ));
        let r = nodeport::run(&bins, rounds, per_round)?;
        report.push_str(&format!(
            "\n## NodePort: external client → node-a → backend on node-b\n\n\
             connect() + HTTP request, {} connections per system in {} rounds (order alternated), \
             one client making sequential connections; the backend sees node-a's address (SNAT) \
             in both. Then UDP request/reply datagrams to the UDP NodePort for {:.1} s per \
             system per round, {} in flight; each exchange crosses node-a twice, so node-a \
             forwards 2 × the exchange rate in packets per second. Ratios are Sluice ÷ iptables \
             per round, median over rounds: p50 {:.3}, p99 {:.3}, connection rate {:.3}, UDP \
             exchange rate {:.3}.\n\n\
             | path | p50 | p90 | p99 | conn/s | UDP exchanges/s | node-a pps | UDP lost |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
            per_round * rounds as u64,
            rounds,
            r.udp_seconds_per_round,
            nodeport::UDP_WINDOW,
            r.ratio_p50_median,
            r.ratio_p99_median,
            r.ratio_rate_median,
            r.ratio_udp_median,
        ));
        for system in &r.systems {
            report.push_str(&format!(
                "| {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} | {:.0} | {:.0} | {} |\n",
                system.system.label(),
                system.latency.p50_us,
                system.latency.p90_us,
                system.latency.p99_us,
                system.connections_per_second,
                system.udp_exchanges_per_second,
                2.0 * system.udp_exchanges_per_second,
                system.udp_lost,
            ));
        }
        nodeport_result = Some(r);
    }

    let mut policy_result = None;
    if runs(Scenario::Policy) {
        // Quick: enough to exercise every step; full: the figures.
        let (rounds, per_round, changes) = if args.quick {
            (2, 200, 5)
        } else {
            (10, 1000, 50)
        };
        progress.scenario("policy", 1);
        progress.step(format_args!(
            "0/100/1,000 policies, {rounds} rounds × {per_round} connections, {changes} changes"
        ));
        let r = policy::run(&bins, rounds, per_round, changes)?;
        policy_report(&mut report, &r);
        policy_result = Some(r);
    }

    let mut ingress_result = None;
    if runs(Scenario::Ingress) {
        // Quick: every step, small; full: the figures.
        let plan = if args.quick {
            ingress::Plan {
                hosts: vec![1],
                rounds: 1,
                seconds: 1,
                memory_hosts: 100,
                memory_requests: 10,
            }
        } else {
            ingress::Plan {
                hosts: vec![1, 1000],
                rounds: 4,
                seconds: 5,
                memory_hosts: 10_000,
                memory_requests: 100,
            }
        };
        progress.scenario("ingress", plan.steps());
        let r = ingress::run(&bins, &plan, &mut progress)?;
        ingress::report(&mut report, &r);
        ingress_result = Some(r);
    }

    let out = match args.out {
        Some(out) => out,
        None => default_out_dir()?,
    };
    std::fs::create_dir_all(&out)?;
    let plots = write_plots(
        &out,
        &programming_results,
        &east_west_results,
        policy_result.as_ref(),
    )?;
    if !plots.is_empty() {
        report.push_str("\n## Charts\n\n");
        for (file, title) in &plots {
            report.push_str(&format!("![{title}]({file})\n\n"));
        }
    }
    std::fs::write(out.join("report.md"), &report)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json!({
            "machine": machine,
            "quick": args.quick,
            "programming": programming_results,
            "programming_initial": programming_initial,
            "memory": memory_result,
            "east_west": east_west_results,
            "nodeport": nodeport_result,
            "policy": policy_result,
            "ingress": ingress_result,
        }))?,
    )?;
    println!("{report}");
    progress.done();
    eprintln!("report written to {}", out.display());
    Ok(())
}

fn programming_report(
    report: &mut String,
    latency: &[programming::ProgrammingResult],
    initial: &programming::InitialResult,
) {
    let sizes = initial.map_sizes;
    report.push_str(&format!(
        "## Programming latency (manifest change → maps updated)\n\n\
         sluice-proxy on its own cgroup and manifest directory (`--max-service-entries {}`, \
         `--max-backends {}`); each change rewrites one Service's EndpointSlice with a new endpoint \
         address atomically, and the time runs from just before the rename to the daemon's \
         `synced` log line (checked: no errors, the expected frontend and backend counts); \
         \"daemon sync\" is its own compile + diff + map writes (`elapsed_us`), the rest is the \
         watch, settle window and reading the changed file.\n\n\
         | Services present | endpoints each | changes | settle window | p50 | p99 | max | daemon sync p50 |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
        sizes.service_entries, sizes.backends,
    ));
    for r in latency {
        report.push_str(&format!(
            "| {} | {} | {} | {} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |\n",
            r.services,
            r.endpoints_per_service,
            r.changes,
            r.settle_ms,
            r.latency.p50_us / 1000.0,
            r.latency.p99_us / 1000.0,
            r.latency.max_us / 1000.0,
            r.daemon_sync.p50_us / 1000.0,
        ));
    }
    let ms = |s: &stats::Summary| {
        format!(
            "{:.0} ms ({:.0}–{:.0})",
            s.p50_us / 1000.0,
            s.min_us / 1000.0,
            s.max_us / 1000.0
        )
    };
    report.push_str(&format!(
        "\n## Programming from nothing: {} Services × {} endpoints\n\n\
         {}. \"Started on the full directory\": from just before \
         sluice-proxy is spawned on a directory already holding every Service to its first \
         `synced` line (`attached` is when its programs were loaded, verified and attached). \
         \"Written into an empty directory\": the daemon started on an empty directory and ready, \
         then every Service written as one file, atomically; from just before the rename to \
         `synced`. Each `synced` line is checked for no errors and {} frontends, {} backends.\n\n\
         | how | → attached | → synced | daemon sync (compile + map writes) |\n\
         |---|---:|---:|---:|\n\
         | started on the full directory | {} | {} | {} |\n\
         | written into an empty directory | – | {} | {} |\n",
        initial.services,
        initial.endpoints_per_service,
        if initial.repeats == 1 {
            "One run each way".to_string()
        } else {
            format!("Median (min–max) of {} runs each way", initial.repeats)
        },
        initial.services,
        initial.services * initial.endpoints_per_service,
        ms(&initial.start_to_attached),
        ms(&initial.start_to_synced),
        ms(&initial.start_daemon_sync),
        ms(&initial.write_to_synced),
        ms(&initial.write_daemon_sync),
    ));
}

fn memory_report(report: &mut String, r: &memory::MemoryResult) {
    const MIB: f64 = 1024.0 * 1024.0;
    let kib = |k: u64| k as f64 / 1024.0;
    let bytes = |b: u64| b as f64 / MIB;
    report.push_str(&format!(
        "\n## Memory of sluice-proxy\n\n\
         sluice-proxy (`--max-service-entries {}`, `--max-backends {}`, other maps at their \
         defaults) started on a directory with the Services, read half a second after its first \
         `synced` line: resident memory from `/proc/PID/status` (VmRSS now, VmHWM its peak, \
         RssAnon the heap part of VmRSS) and the kernel memory of its BPF maps and programs \
         (`memlock` in `/proc/PID/fdinfo`, once per map or program id). MiB.\n\n\
         | Services | endpoints | VmRSS | VmHWM | RssAnon | BPF maps | BPF programs |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
        r.map_sizes.service_entries, r.map_sizes.backends,
    ));
    for m in [&r.baseline, &r.loaded] {
        report.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            m.services,
            m.services * m.endpoints_per_service,
            kib(m.vm_rss_kib),
            kib(m.vm_hwm_kib),
            kib(m.rss_anon_kib),
            bytes(m.maps_memlock_bytes),
            bytes(m.programs_memlock_bytes),
        ));
    }
    report.push_str(&format!(
        "\nPer map (memlock, MiB; maps preallocate their entries unless they are LPM tries or \
         created with `BPF_F_NO_PREALLOC`):\n\n\
         | map | type | key + value bytes | max entries | 1 Service | {} Services |\n\
         |---|---|---:|---:|---:|---:|\n",
        r.loaded.services
    ));
    for m in &r.loaded.maps {
        let base = r
            .baseline
            .maps
            .iter()
            .find(|b| b.name == m.name && b.map_type == m.map_type)
            .map_or_else(
                || "–".to_string(),
                |b| format!("{:.2}", bytes(b.memlock_bytes)),
            );
        report.push_str(&format!(
            "| {} | {} | {} + {} | {} | {} | {:.2} |\n",
            m.name,
            memory::map_type_name(m.map_type),
            m.key_size,
            m.value_size,
            m.max_entries,
            base,
            bytes(m.memlock_bytes),
        ));
    }
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

/// SVG charts of the key comparisons, written beside report.md.
/// Returns (file name, title) of each, for the report to link.
fn write_plots(
    out: &Path,
    programming: &[programming::ProgrammingResult],
    east_west: &[east_west::EastWestResult],
    policy: Option<&policy::PolicyResult>,
) -> Result<Vec<(String, String)>> {
    use plot::{Bar, BarChart, Group, LatencyChart, Reference, Series};
    let mut written = Vec::new();
    let mut bars = |name: &str, chart: &BarChart| -> Result<()> {
        plot::write_svg(chart, &out.join(name))?;
        written.push((name.to_string(), chart.title.clone()));
        Ok(())
    };
    if let Some(first) = east_west.first() {
        bars(
            "east_west_ratios.svg",
            &BarChart {
                title: "East–west: p50 latency of connect() + HTTP request ÷ direct path".into(),
                subtitle: Some(format!(
                    "bars: median over {} rounds of the per-round ratio; whiskers: min–max over rounds",
                    first.rounds
                )),
                y_label: "p50 ÷ pod IP (direct)".into(),
                decimals: 3,
                groups: east_west
                    .iter()
                    .map(|ew| {
                        Group::new(
                            format!("{} Services present", ew.services),
                            ew.systems
                                .iter()
                                .filter(|s| s.system != east_west::System::Direct)
                                .map(|s| {
                                    Bar::with_range(
                                        s.system.label(),
                                        s.ratio_p50_median,
                                        &s.ratio_p50_by_round,
                                    )
                                })
                                .collect(),
                        )
                    })
                    .collect(),
                reference: Some(Reference {
                    value: 1.0,
                    label: format!("{} = 1", east_west::System::Direct.label()),
                }),
            },
        )?;
    }
    if let Some(p) = policy {
        bars(
            "policy_ratios.svg",
            &BarChart {
                title: "NetworkPolicy: new connections with 100 and 1,000 policies ÷ 0 policies"
                    .into(),
                subtitle: Some(format!(
                    "bars: median over {} rounds of the ratio to the same round's 0-policy figure; whiskers: min–max",
                    p.rate.rounds
                )),
                y_label: "ratio to 0 policies".into(),
                decimals: 3,
                groups: p
                    .rate
                    .configs
                    .iter()
                    .filter(|c| c.policies > 0)
                    .map(|c| {
                        Group::new(
                            format!("{} policies", c.policies),
                            vec![
                                Bar::new(
                                    "connections per second",
                                    c.rate_ratio_median,
                                    c.rate_ratio_min,
                                    c.rate_ratio_max,
                                ),
                                Bar::with_range(
                                    "p50 latency",
                                    c.p50_ratio_median,
                                    &c.p50_ratio_by_round,
                                ),
                            ],
                        )
                    })
                    .collect(),
                reference: Some(Reference {
                    value: 1.0,
                    label: "0 policies = 1".into(),
                }),
            },
        )?;
    }
    let mut cdf = |name: &str, chart: &LatencyChart| -> Result<()> {
        plot::write_latency_svg(chart, &out.join(name))?;
        written.push((name.to_string(), chart.title.clone()));
        Ok(())
    };
    for ew in east_west {
        cdf(
            &format!("east_west_latency_{}.svg", ew.services),
            &LatencyChart {
                title: format!("East–west latency, {} Services present", ew.services),
                subtitle: Some(format!(
                    "connect() + HTTP request to a ClusterIP; {} connections per path",
                    ew.connections_per_round * ew.rounds as u64
                )),
                y_label: "% of connections at or below".into(),
                series: ew
                    .systems
                    .iter()
                    .map(|s| Series::new(s.system.label(), &s.samples_us))
                    .collect(),
            },
        )?;
    }
    if let Some(p) = policy {
        cdf(
            "policy_enforcement.svg",
            &LatencyChart {
                title: "NetworkPolicy: change → first new connection with the new verdict".into(),
                subtitle: Some(format!(
                    "a new connection every {} ms; {} consecutive with the new verdict count",
                    p.attempt_interval_ms, p.confirm
                )),
                y_label: "% of changes at or below".into(),
                series: p
                    .enforcement
                    .iter()
                    .map(|e| {
                        Series::new(
                            format!(
                                "{} ({} other policies)",
                                e.change.label(),
                                e.background_policies
                            ),
                            &e.new_connections_us,
                        )
                    })
                    .collect(),
            },
        )?;
    }
    if !programming.is_empty() {
        cdf(
            "programming_latency.svg",
            &LatencyChart {
                title: "Programming latency: manifest change → service maps updated".into(),
                subtitle: None,
                y_label: "% of changes at or below".into(),
                series: programming
                    .iter()
                    .map(|r| Series::new(format!("{} Services present", r.services), &r.samples_us))
                    .collect(),
            },
        )?;
    }
    Ok(written)
}
