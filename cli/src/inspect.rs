//! `sluice lb list`, `sluice ct list`, `sluice policy list`, `sluice status`: what a node
//! agent has programmed, read from its pinned maps and links (the state the kernel runs
//! with, also while no agent runs) and named with the agent's status files.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use proxy_daemon::inspect::{
    self, Connection, ConnectionFilter, LbFrontend, Pinned, PolicyEndpointRow, StatusReport,
};
use proxy_daemon::pins;
use proxy_daemon::status_file;
use serde::Serialize;

use crate::lab::OutputFormat;

/// Which agent: its pin directory and status file, or a lab node's.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent's pin directory (its --bpffs-dir).
    #[arg(long, value_name = "DIR", env = "SLUICE_BPFFS_DIR", default_value = pins::DEFAULT_DIR)]
    pub bpffs_dir: PathBuf,
    /// The agent's --status-file (for Service and pod names).
    #[arg(
        long,
        value_name = "PATH",
        env = "SLUICE_STATUS_FILE",
        default_value = status_file::DEFAULT_PATH
    )]
    pub status_file: PathBuf,
    /// The node agent of lab NAME instead (with --node when the lab has several nodes).
    #[arg(long, value_name = "NAME")]
    pub lab: Option<String>,
    /// The lab node whose agent to read.
    #[arg(long, value_name = "NODE", requires = "lab")]
    pub node: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct LbArgs {
    #[command(subcommand)]
    pub command: LbCommand,
}

#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// Every frontend (address, port, protocol; socket or external scope) with its backends,
    /// as programmed in the maps.
    List {
        /// Only the frontends of this Service (NAMESPACE/NAME).
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service: Option<String>,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

#[derive(Debug, Args)]
pub struct CtArgs {
    #[command(subcommand)]
    pub command: CtCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Table {
    /// Connections from outside translated by the node (NodePort, LoadBalancer IPs,
    /// externalIPs).
    Nat,
    /// Connections NetworkPolicy tracks at this node's pods.
    Policy,
}

#[derive(Debug, Subcommand)]
pub enum CtCommand {
    /// Tracked connections: translated ones from outside (nat) and those policy tracks at
    /// pods (policy).
    List {
        /// Only this table.
        #[arg(long, value_enum)]
        table: Option<Table>,
        /// Only connections with this address (source, destination, backend or SNAT).
        #[arg(long, value_name = "IP")]
        address: Option<IpAddr>,
        /// Only connections with this port anywhere.
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
        /// Only this protocol (tcp, udp, sctp, icmp).
        #[arg(long, value_name = "PROTOCOL")]
        protocol: Option<String>,
        /// Only connections of this Service (nat) or pod (policy), as NAMESPACE/NAME.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        owner: Option<String>,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

impl AgentArgs {
    fn open(&self) -> Result<Pinned> {
        let (dir, status) = match &self.lab {
            None => (self.bpffs_dir.clone(), self.status_file.clone()),
            Some(lab) => {
                let node = self.lab_node(lab)?;
                (
                    sluice_lab::cleanup::pin_dir(lab, &node),
                    sluice_lab::state::LabPaths::new(lab).proxy_status(&node),
                )
            }
        };
        let pinned = Pinned::open(&dir, &status)?;
        if let Some(hint) = inspect::status_hint(&pinned) {
            eprintln!("note: {hint}");
        }
        Ok(pinned)
    }

    fn lab_node(&self, lab: &str) -> Result<String> {
        if let Some(node) = &self.node {
            return Ok(node.clone());
        }
        let paths = sluice_lab::state::LabPaths::new(lab);
        let state = sluice_lab::state::load(&paths.state())?
            .with_context(|| format!("no lab named {lab} is up"))?;
        match state.nodes.as_slice() {
            [only] => Ok(only.name.clone()),
            nodes => bail!(
                "lab {lab} has nodes {}: say which with --node",
                nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

fn finish(result: Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// Writes to stdout; a reader that went away (`| head`) is no error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn run_lb(args: LbArgs) -> i32 {
    let LbCommand::List { service, agent } = args.command;
    finish((|| {
        let pinned = agent.open()?;
        let owners = pinned.owners.by_frontend();
        let mut rows = inspect::lb_frontends(&pinned.services()?, &owners);
        if let Some(service) = &service {
            rows.retain(|r| r.service.as_ref() == Some(service));
        }
        match agent.output {
            OutputFormat::Json => print_json(&rows),
            OutputFormat::Text => emit(&lb_text(&rows)),
        }
    })())
}

pub fn run_ct(args: CtArgs) -> i32 {
    let CtCommand::List {
        table,
        address,
        port,
        protocol,
        owner,
        agent,
    } = args.command;
    finish((|| {
        let pinned = agent.open()?;
        let now = proxy_daemon::conntrack::monotonic_ns();
        let mut rows = Vec::new();
        if table != Some(Table::Policy) {
            let owners = pinned.owners.by_frontend();
            rows.extend(inspect::nat_connections(
                &pinned.nat_conntrack()?,
                &owners,
                now,
            ));
        }
        if table != Some(Table::Nat) {
            rows.extend(inspect::policy_connections(
                &pinned.policy_conntrack()?,
                &pinned.interface_names(),
                now,
            ));
        }
        let filter = ConnectionFilter {
            address,
            port,
            protocol,
            owner,
        };
        rows.retain(|c| filter.keeps(c));
        match agent.output {
            OutputFormat::Json => print_json(&rows),
            OutputFormat::Text => emit(&ct_text(&rows)),
        }
    })())
}

pub fn run_policy_list(pod: Option<String>, agent: AgentArgs) -> i32 {
    finish((|| {
        let pinned = agent.open()?;
        let (tables, drops) = pinned.policy()?;
        let mut rows = inspect::policy_endpoints(&tables, &drops, pinned.status.as_ref());
        if let Some(pod) = &pod {
            rows.retain(|r| r.pod.as_ref() == Some(pod));
        }
        match agent.output {
            OutputFormat::Json => print_json(&rows),
            OutputFormat::Text => emit(&policy_text(&rows)),
        }
    })())
}

pub fn run_status(agent: AgentArgs) -> i32 {
    finish((|| {
        let report = agent.open()?.status_report();
        match agent.output {
            OutputFormat::Json => print_json(&report),
            OutputFormat::Text => emit(&status_text(&report)),
        }
    })())
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn columns(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn strings<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

fn lb_text(rows: &[LbFrontend]) -> String {
    if rows.is_empty() {
        return "no frontends programmed\n".into();
    }
    let mut table = vec![strings([
        "FRONTEND", "SCOPE", "SERVICE", "STATE", "BACKENDS",
    ])];
    for f in rows {
        let frontend = format!(
            "{}/{}",
            std::net::SocketAddr::new(f.address, f.port),
            f.protocol
        );
        let service = match (&f.service, &f.port_name) {
            (Some(s), Some(p)) if !p.is_empty() => format!("{s}:{p}"),
            (Some(s), _) => s.clone(),
            (None, _) => "-".into(),
        };
        let mut state = match f.state {
            inspect::FrontendState::Serving => "serving".to_string(),
            inspect::FrontendState::NoEndpoints => "no endpoints (refused)".to_string(),
            inspect::FrontendState::Unreachable => "unreachable (no master)".to_string(),
        };
        if f.affinity_timeout_s > 0 {
            state.push_str(&format!(", affinity {}s", f.affinity_timeout_s));
        }
        if let Some(ranges) = &f.source_ranges {
            state.push_str(&format!(", sources {}", ranges.join(",")));
        }
        let backends: Vec<String> = f
            .backends
            .iter()
            .map(|b| {
                let addr = b
                    .address
                    .map_or_else(|| format!("#{}", b.id), |a| a.to_string());
                let mut notes = Vec::new();
                if b.local {
                    notes.push("local");
                }
                if b.state != "active" {
                    notes.push(b.state);
                }
                if notes.is_empty() {
                    addr
                } else {
                    format!("{addr} ({})", notes.join(", "))
                }
            })
            .collect();
        let first = backends.first().cloned().unwrap_or_else(|| "-".into());
        table.push(vec![frontend, f.scope.clone(), service, state, first]);
        for more in backends.iter().skip(1) {
            table.push(vec![
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                more.clone(),
            ]);
        }
    }
    columns(&table)
}

fn ct_text(rows: &[Connection]) -> String {
    if rows.is_empty() {
        return "no tracked connections\n".into();
    }
    let mut table = vec![strings([
        "TABLE",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "VIA",
        "OWNER",
        "IDLE",
        "STATE",
    ])];
    for c in rows {
        let via = match (c.backend, c.snat, &c.interface, c.direction) {
            (Some(b), Some(s), _, _) => format!("{b} (snat {s})"),
            (Some(b), None, _, _) => b.to_string(),
            (None, _, Some(i), Some(d)) => format!("{i} {d}"),
            _ => "-".into(),
        };
        let owner = c
            .service
            .clone()
            .or_else(|| c.pod.clone())
            .unwrap_or_else(|| "-".into());
        table.push(vec![
            c.table.into(),
            c.protocol.clone(),
            c.source.to_string(),
            c.destination.to_string(),
            via,
            owner,
            format!("{:.1}s", c.idle_s),
            match (c.expired, c.closing) {
                (true, _) => "expired",
                (false, true) => "closing",
                (false, false) => "open",
            }
            .into(),
        ]);
    }
    columns(&table)
}

fn policy_text(rows: &[PolicyEndpointRow]) -> String {
    if rows.is_empty() {
        return "no pod interfaces under policy programs\n".into();
    }
    let mut out = String::new();
    for r in rows {
        let pod = r.pod.as_deref().unwrap_or("-");
        let interface = r
            .interface
            .clone()
            .unwrap_or_else(|| format!("ifindex {}", r.ifindex));
        out.push_str(&format!("{pod} ({interface})\n"));
        for (way, d) in [("ingress", &r.ingress), ("egress", &r.egress)] {
            if !d.isolated {
                out.push_str(&format!(
                    "  {way}: open (no policy selects it), {} drops\n",
                    d.drops
                ));
                continue;
            }
            let by = if d.isolated_by.is_empty() {
                String::new()
            } else {
                format!(" by {}", d.isolated_by.join(", "))
            };
            out.push_str(&format!(
                "  {way}: isolated{by}, {} drops; allow:\n",
                d.drops
            ));
            let mut table = Vec::new();
            for a in &d.allow {
                table.push(vec![
                    format!("    {}", a.peer),
                    a.protocol.clone().unwrap_or_else(|| "any protocol".into()),
                    a.ports.clone().unwrap_or_else(|| "any port".into()),
                ]);
            }
            if table.is_empty() {
                out.push_str("    nothing\n");
            } else {
                out.push_str(&columns(&table));
            }
        }
    }
    out
}

fn status_text(r: &StatusReport) -> String {
    let mut out = String::new();
    let agent = match (r.agent_pid, &r.node) {
        (Some(pid), Some(node)) => format!("running (pid {pid}) for node {node}"),
        (Some(pid), None) => format!("running (pid {pid})"),
        (None, _) => "not running: the pinned programs keep serving the last state".into(),
    };
    out.push_str(&format!("pins:      {}\n", r.bpffs_dir.display()));
    out.push_str(&format!("agent:     {agent}\n"));
    if let Some(v) = r.layout_version {
        out.push_str(&format!("layout:    version {v}\n"));
    }
    match &r.last_sync {
        Some(s) => {
            let ago = (now_unix_ms().saturating_sub(s.unix_ms)) as f64 / 1000.0;
            let errors = if s.errors.is_empty() {
                "no errors".to_string()
            } else {
                format!("{} errors: {}", s.errors.len(), s.errors.join("; "))
            };
            out.push_str(&format!(
                "last sync: {ago:.1}s ago ({}), {:.1} ms, {} frontends, {} backends, {errors}\n",
                s.trigger, s.elapsed_ms, s.frontends, s.backends
            ));
        }
        None => out.push_str("last sync: unknown (no status file)\n"),
    }
    out.push_str("\nattached:\n");
    let mut links = vec![strings(["  KIND", "PROGRAM", "WHERE", "POD"])];
    for l in &r.links {
        links.push(vec![
            format!("  {}", l.kind),
            l.program.clone(),
            l.attached_to.clone(),
            l.pod.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&columns(&links));
    out.push_str("\nmaps:\n");
    let mut maps = vec![strings(["  MAP", "KIND", "ENTRIES", "CAPACITY", "USED"])];
    for m in &r.maps {
        maps.push(vec![
            format!("  {}", m.name),
            m.kind.into(),
            m.entries.map_or_else(|| "-".into(), |n| n.to_string()),
            m.capacity.to_string(),
            match (&m.error, m.percent) {
                (Some(e), _) => format!("unreadable: {e}"),
                (None, Some(p)) => format!("{p:.1}%"),
                (None, None) => "-".into(),
            },
        ]);
    }
    out.push_str(&columns(&maps));
    out
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_do_not_pad_the_last_one() {
        let out = columns(&[strings(["A", "BB", "C"]), strings(["long", "x", "y"])]);
        assert_eq!(out, "A     BB  C\nlong  x   y\n");
    }
}
