//! `sluice lab …`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sluice_lab::addr::{DEFAULT_SERVICE_CIDR, DEFAULT_SERVICE_CIDR6};
use sluice_lab::client::{self, Ask, LoadReport, Outcome, ProbeResult};
use sluice_lab::names::DEFAULT_LAB_NAME;
use sluice_lab::server::{self, ServeOptions};
use sluice_lab::supervisor::{self, SuperviseOptions};
use sluice_lab::{Lab, LabOptions, Protocol, ProxyMode, TargetSpec, cleanup};

use crate::duration::parse_duration;

#[derive(Debug, Args)]
pub struct LabArgs {
    #[command(subcommand)]
    pub command: LabCommand,
}

/// Which lab: `--name`, else $SLUICE_LAB, else "lab".
#[derive(Debug, Args)]
pub struct NameArg {
    /// The lab's name (network namespaces are sl-NAME-…).
    #[arg(long, env = "SLUICE_LAB", default_value = DEFAULT_LAB_NAME)]
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Bring a lab up from a directory of manifests (Nodes, Pods, Services, EndpointSlices),
    /// and keep following the directory until `down`.
    Up {
        /// The manifest directory.
        dir: PathBuf,
        #[command(flatten)]
        name: NameArg,
        /// The service CIDR of a family (passed to the node agents); give it once per family,
        /// e.g. --service-cidr 10.96.0.0/16 --service-cidr fd00:10:96::/112. Each family not
        /// given keeps its default (10.96.0.0/16, fd00:10:96::/112).
        #[arg(long, value_name = "CIDR")]
        service_cidr: Vec<IpNet>,
        /// IPv4 only: no IPv6 addresses, routes or cluster IPs (the lab is dual-stack by
        /// default, like a kind cluster with `ipFamily: dual`).
        #[arg(long)]
        ipv4_only: bool,
        /// Run no node agent (pod-to-pod traffic only; no Service translation).
        #[arg(long, conflicts_with = "proxy_bin")]
        no_proxy: bool,
        /// The node agent binary [default: $SLUICE_PROXY_BIN, else sluice-proxy next to sluice].
        #[arg(long, value_name = "PATH")]
        proxy_bin: Option<PathBuf>,
        /// How long node agents get to become ready.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Take a lab down: stop what it runs, remove what it made.
    Down {
        #[command(flatten)]
        name: NameArg,
        /// Every lab on this machine.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Show a lab: nodes, pods, services, the underlay and the external client, where its files
    /// are.
    Status {
        #[command(flatten)]
        name: NameArg,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Run a command inside a pod (its network namespace and cgroup), or in the external client
    /// outside the cluster (`external`); exits with its code.
    Exec {
        #[command(flatten)]
        name: NameArg,
        /// The pod: NAME or NAMESPACE/NAME; `external` is the external client.
        pod: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// From inside a pod, ask HOST:PORT[/udp] who answers. Prints the answering pod's name, or
    /// refused / timeout / unreachable; exit code 0 answered, 1 refused, 2 timeout, 3 other.
    Probe {
        #[command(flatten)]
        name: NameArg,
        /// The pod to probe from: NAME or NAMESPACE/NAME; `external` is the external client.
        pod: String,
        /// HOST:PORT[/udp]; HOST is an IPv4 address, an IPv6 address in brackets
        /// ([fd00:10:96::a]:80), `external`, a pod or a Service (NAME or NS/NAME: its IPv4
        /// address, a Service's primary cluster IP), or a node (its IPv4 address).
        target: TargetSpec,
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
        /// What to ask: the answering pod's name, or the client address the server saw.
        #[arg(long, value_enum, default_value_t = AskArg::Hostname)]
        ask: AskArg,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// From one process inside a pod, make COUNT sequential connections (TCP: connect,
    /// GET /hostname, close; UDP: one datagram from a fresh socket each) and report answers,
    /// failures and latency.
    Load {
        #[command(flatten)]
        name: NameArg,
        /// The pod to send from: NAME or NAMESPACE/NAME; `external` is the external client.
        pod: String,
        /// HOST:PORT[/udp]; HOST is an IPv4 address, an IPv6 address in brackets
        /// ([fd00:10:96::a]:80), `external`, a pod or a Service (NAME or NS/NAME: its IPv4
        /// address, a Service's primary cluster IP), or a node (its IPv4 address).
        target: TargetSpec,
        #[arg(long)]
        count: u64,
        /// Per connection.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// The NetworkPolicy reachability matrix: every pod to every pod on each PORT/PROTOCOL,
    /// over real traffic, each cell checked against `sluice policy explain`. `.` reached,
    /// `X` not reached, `!` where the kernel disagrees. Exit code 0 when all cells agree.
    Matrix {
        #[command(flatten)]
        name: NameArg,
        /// Destination ports.
        #[arg(long, value_delimiter = ',', default_values_t = [80u16, 81])]
        ports: Vec<u16>,
        /// Protocols.
        #[arg(long, value_delimiter = ',', default_values = ["tcp", "udp"])]
        protocols: Vec<String>,
        /// How long a probe waits before counting a cell as not reached.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// (internal) The process that owns a lab; started by `up`.
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        name: String,
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long)]
        service_cidr: Ipv4Net,
        /// None: IPv4 only.
        #[arg(long)]
        service_cidr6: Option<Ipv6Net>,
        #[arg(long)]
        proxy_bin: Option<PathBuf>,
        #[arg(long, default_value_t = 60_000)]
        ready_timeout_ms: u64,
    },
    /// (internal) A pod's test server.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        pod: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
    },
    /// (internal) The in-pod side of probe and load; prints JSON.
    #[command(hide = true)]
    Client {
        #[arg(value_enum)]
        mode: ClientMode,
        target: SocketAddr,
        #[arg(long, default_value = "tcp")]
        protocol: Protocol,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, value_enum, default_value_t = AskArg::Hostname)]
        ask: AskArg,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AskArg {
    Hostname,
    Clientip,
}

impl From<AskArg> for Ask {
    fn from(a: AskArg) -> Ask {
        match a {
            AskArg::Hostname => Ask::Hostname,
            AskArg::Clientip => Ask::ClientIp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientMode {
    Probe,
    Load,
}

pub fn run(args: LabArgs) -> i32 {
    // Probe reports its own errors as "other" (3); everything else fails with 1.
    let failure_code = if matches!(args.command, LabCommand::Probe { .. }) {
        3
    } else {
        1
    };
    match dispatch(args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            failure_code
        }
    }
}

fn dispatch(command: LabCommand) -> Result<i32> {
    match command {
        LabCommand::Up {
            dir,
            name,
            service_cidr,
            ipv4_only,
            no_proxy,
            proxy_bin,
            timeout,
            output,
        } => {
            let mut opts = LabOptions::new(name.name, dir);
            // This very binary runs the supervisor, the test servers and the probes.
            opts.sluice_bin = Some(std::env::current_exe().context("finding the sluice binary")?);
            let (v4, v6) = service_cidrs(&service_cidr, ipv4_only)?;
            opts.service_cidr = v4;
            opts.service_cidr6 = v6;
            opts.ready_timeout = timeout;
            opts.proxy = match (no_proxy, proxy_bin) {
                (true, _) => ProxyMode::Off,
                (false, Some(p)) => ProxyMode::Binary(p),
                (false, None) => ProxyMode::Required,
            };
            up(opts, output)
        }
        LabCommand::Down { name, all } => down(&name.name, all),
        LabCommand::Matrix {
            name,
            ports,
            protocols,
            timeout,
            output,
        } => {
            let lab = open(&name.name)?;
            let mut cases = Vec::new();
            for protocol in &protocols {
                let protocol: sluice_lab::Protocol = protocol
                    .parse()
                    .with_context(|| format!("protocol {protocol:?}"))?;
                cases.extend(
                    ports
                        .iter()
                        .map(|&port| sluice_lab::matrix::Case { port, protocol }),
                );
            }
            // Probe what the manifests say now, not what the agents had before.
            if let Err(e) = lab.wait_policy_enforced(Duration::from_secs(10)) {
                eprintln!("warning: {e:#}; measuring anyway");
            }
            let matrix = sluice_lab::matrix::Matrix::measure(&lab, &cases, timeout)?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&matrix)?),
                OutputFormat::Text => print!("{}", matrix.render()),
            }
            Ok(i32::from(matrix.disagreements() > 0))
        }
        LabCommand::Status { name, output } => {
            let status = open(&name.name)?.status()?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                OutputFormat::Text => print!("{}", status.render_text()),
            }
            Ok(0)
        }
        LabCommand::Exec { name, pod, command } => {
            let lab = open(&name.name)?;
            // Like a shell: ^C goes to the command (the child restores the defaults).
            // SAFETY: signal(2) with SIG_IGN has no memory-safety preconditions.
            unsafe {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                libc::signal(libc::SIGQUIT, libc::SIG_IGN);
            }
            lab.exec(&pod, &command)
        }
        LabCommand::Probe {
            name,
            pod,
            target,
            timeout,
            ask,
            output,
        } => {
            let result = open(&name.name)?.probe_asking(&pod, &target, ask.into(), timeout)?;
            print_probe(&result, output)?;
            Ok(result.outcome.exit_code())
        }
        LabCommand::Load {
            name,
            pod,
            target,
            count,
            timeout,
            output,
        } => {
            let report = open(&name.name)?.load_target(&pod, &target, count, timeout)?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string(&report)?),
                OutputFormat::Text => print!("{}", load_text(&pod, &report)),
            }
            Ok(if report.answered == report.count {
                0
            } else {
                1
            })
        }
        LabCommand::Supervise {
            name,
            manifests,
            service_cidr,
            service_cidr6,
            proxy_bin,
            ready_timeout_ms,
        } => {
            init_logging();
            supervisor::supervise(SuperviseOptions {
                name,
                manifests,
                service_cidr,
                service_cidr6,
                proxy: proxy_bin,
                sluice: std::env::current_exe().context("finding the sluice binary")?,
                ready_timeout: Duration::from_millis(ready_timeout_ms),
            })?;
            Ok(0)
        }
        LabCommand::Serve { pod, tcp, udp } => {
            server::serve(ServeOptions {
                pod,
                tcp_ports: tcp,
                udp_ports: udp,
            })?;
            Ok(0)
        }
        LabCommand::Client {
            mode,
            target,
            protocol,
            timeout_ms,
            count,
            ask,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let json = match mode {
                ClientMode::Probe => serde_json::to_string(&client::probe_asking(
                    target,
                    protocol,
                    ask.into(),
                    timeout,
                ))?,
                ClientMode::Load => {
                    serde_json::to_string(&client::load(target, protocol, count, timeout))?
                }
            };
            println!("{json}");
            Ok(0)
        }
    }
}

/// The service CIDRs of `lab up`: at most one per family, defaults for the others; none of
/// IPv6 with --ipv4-only.
fn service_cidrs(given: &[IpNet], ipv4_only: bool) -> Result<(Ipv4Net, Option<Ipv6Net>)> {
    let mut v4 = None;
    let mut v6 = None;
    for cidr in given {
        match cidr.trunc() {
            IpNet::V4(c) if v4.replace(c).is_some() => {
                bail!("--service-cidr: give one IPv4 CIDR at most")
            }
            IpNet::V6(c) if v6.replace(c).is_some() => {
                bail!("--service-cidr: give one IPv6 CIDR at most")
            }
            IpNet::V6(_) if ipv4_only => {
                bail!("--service-cidr: an IPv6 CIDR with --ipv4-only")
            }
            _ => {}
        }
    }
    let v6 = if ipv4_only {
        None
    } else {
        Some(v6.unwrap_or(DEFAULT_SERVICE_CIDR6))
    };
    Ok((v4.unwrap_or(DEFAULT_SERVICE_CIDR), v6))
}

/// A running lab, probed with this very binary.
fn open(name: &str) -> Result<Lab> {
    let exe = std::env::current_exe().context("finding the sluice binary")?;
    Ok(Lab::open(name)?.with_sluice_bin(exe))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

fn up(opts: LabOptions, output: OutputFormat) -> Result<i32> {
    let dir = opts.manifests_dir.clone();
    let name = opts.name.clone();
    // Problems first: they may be why the lab then fails to come up.
    if dir.is_dir() {
        let problems = sluice_lab::check_manifests(&dir);
        if !problems.is_empty() {
            eprintln!("problems in {} (those objects are skipped):", dir.display());
            for p in problems {
                eprintln!("  {p}");
            }
        }
    }
    let lab = Lab::up(opts)?.keep();
    let cleaned = lab.cleaned();
    if !cleaned.is_empty() {
        eprintln!(
            "removed leftovers of an earlier run of lab {name}: {} network namespaces, {} processes{}",
            cleaned.netns.len(),
            cleaned.processes_killed,
            cleaned
                .cgroup
                .as_ref()
                .map(|c| format!(", cgroup {}", c.display()))
                .unwrap_or_default()
        );
    }
    let status = lab.status()?;
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        OutputFormat::Text => {
            let sup = status
                .supervisor
                .map(|s| s.pid.to_string())
                .unwrap_or_else(|| "?".into());
            println!(
                "lab {name} is up (supervisor PID {sup}); it follows {}\n",
                dir.display()
            );
            print!("{}", status.tables());
            println!(
                "\nrendered cluster: {}\nlogs:             {}\ntake it down:     sluice lab down --name {name}",
                status.cluster_dir.display(),
                status.logs_dir.display()
            );
        }
    }
    Ok(0)
}

fn down(name: &str, all: bool) -> Result<i32> {
    let root = sluice_lab::preflight::check()?;
    let names = if all {
        cleanup::all_labs(&root)
    } else {
        vec![name.to_string()]
    };
    let mut code = 0;
    for lab in names {
        match cleanup::down(&lab, &root) {
            Ok(removed) if removed.is_empty() => println!("lab {lab}: nothing to remove"),
            Ok(removed) => {
                let mut left = Vec::new();
                if !removed.netns.is_empty() {
                    left.push(format!("{} network namespaces", removed.netns.len()));
                }
                if removed.processes_killed > 0 {
                    left.push(format!("{} processes", removed.processes_killed));
                }
                let how = if removed.supervisor_stopped {
                    "stopped by its supervisor"
                } else {
                    "cleaned up"
                };
                if left.is_empty() {
                    println!("lab {lab} is down ({how})");
                } else {
                    println!(
                        "lab {lab} is down ({how}; removed leftover {})",
                        left.join(", ")
                    );
                }
            }
            Err(e) => {
                eprintln!("error: lab {lab}: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
}

fn print_probe(result: &ProbeResult, output: OutputFormat) -> Result<()> {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string(result)?),
        OutputFormat::Text => match (&result.outcome, &result.answer) {
            (Outcome::Answered, Some(answer)) => println!("{answer}"),
            (outcome, _) => {
                println!("{}", outcome.as_str());
                if *outcome == Outcome::Error
                    && let Some(e) = &result.error
                {
                    eprintln!("{e}");
                }
            }
        },
    }
    Ok(())
}

fn load_text(pod: &str, r: &LoadReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} to {} from {pod}: {} answered in {} ms",
        r.count,
        if r.protocol == Protocol::Udp {
            "datagrams"
        } else {
            "connections"
        },
        r.target,
        r.answered,
        r.elapsed_ms
    );
    if !r.answers.is_empty() {
        let width = r.answers.keys().map(|k| k.len()).max().unwrap_or(0);
        out.push_str("answers:\n");
        for (who, n) in &r.answers {
            let _ = writeln!(out, "  {who:<width$}  {n}");
        }
    }
    if !r.failures.is_empty() {
        let failures: Vec<String> = r
            .failures
            .iter()
            .map(|(k, n)| format!("{} {n}", k.as_str()))
            .collect();
        let _ = writeln!(out, "failures: {}", failures.join(", "));
        for e in &r.errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    let l = &r.latency_us;
    if r.answered > 0 {
        let _ = writeln!(
            out,
            "latency (µs): p50 {}  p90 {}  p99 {}  max {}",
            l.p50, l.p90, l.p99, l.max
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidrs_one_per_family_with_defaults() {
        let c = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            service_cidrs(&[], false).unwrap(),
            (DEFAULT_SERVICE_CIDR, Some(DEFAULT_SERVICE_CIDR6))
        );
        assert_eq!(
            service_cidrs(&[c("fd00:99::/112"), c("10.100.0.0/16")], false).unwrap(),
            (
                "10.100.0.0/16".parse().unwrap(),
                Some("fd00:99::/112".parse().unwrap())
            )
        );
        assert_eq!(
            service_cidrs(&[c("10.100.0.5/16")], true).unwrap(),
            ("10.100.0.0/16".parse().unwrap(), None)
        );
        assert!(service_cidrs(&[c("10.1.0.0/16"), c("10.2.0.0/16")], false).is_err());
        assert!(service_cidrs(&[c("fd00:99::/112")], true).is_err());
    }
}
