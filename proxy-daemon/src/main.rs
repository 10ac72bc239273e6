//! sluice-proxy: the node agent. Reads the cluster model, compiles it into
//! service tables and keeps the eBPF maps in step, until SIGTERM.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{ArgGroup, Parser, ValueEnum};
use cluster_model::{ClusterSource, KubeSource, kube_client};
use ipnet::Ipv4Net;
use proxy_daemon::compile::compile;
use proxy_daemon::datapath::{Datapath, MapSizes};
use proxy_daemon::sync::Syncer;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-proxy",
    version,
    about = "Sluice node agent: eBPF service load balancing",
    group(ArgGroup::new("source").required(true).args(["manifests", "kubernetes"]))
)]
struct Args {
    /// Directory of Kubernetes manifests to read (and watch for changes).
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Read the cluster through the Kubernetes API (in-cluster service account, or
    /// --kubeconfig, or KUBECONFIG / ~/.kube/config).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig file to reach the API with (its current context); with --kubernetes.
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (as in Node.metadata.name and Pod.spec.nodeName); in a Pod, set
    /// NODE_NAME from spec.nodeName with the downward API.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node: String,
    /// cgroup (v2) directory whose processes get service translation; the
    /// programs apply to every cgroup below it.
    #[arg(long, value_name = "DIR")]
    cgroup: PathBuf,
    /// Service CIDR(s): addresses there that no Service owns are refused.
    #[arg(
        long = "service-cidr",
        value_name = "CIDR",
        default_value = "10.96.0.0/12"
    )]
    service_cidrs: Vec<Ipv4Net>,
    /// File written after the first successful sync (for supervisors and tests).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// How long the manifest directory must be quiet before it is re-read.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    settle_ms: u64,
    /// How often to retry after a sync left something unprogrammed.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    retry_seconds: u64,
    /// Entries in the service map (one per frontend plus one per backend slot).
    #[arg(long, default_value_t = MapSizes::default().services)]
    max_service_entries: u32,
    /// Entries in the backend map.
    #[arg(long, default_value_t = MapSizes::default().backends)]
    max_backends: u32,
    /// Entries in the per-socket reverse translation map (LRU).
    #[arg(long, default_value_t = MapSizes::default().sock_revnat)]
    max_socket_entries: u32,
    /// Entries in the session affinity map (LRU): one per client pod and sticky Service port.
    #[arg(long, default_value_t = MapSizes::default().affinity)]
    max_affinity_entries: u32,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Everything the agent keeps between syncs.
struct Agent {
    source: ClusterSource,
    syncer: Syncer,
    datapath: Datapath,
}

impl Agent {
    /// Re-reads the model and programs the difference. Returns whether
    /// something could not be programmed (and so needs a retry).
    fn apply(&mut self, trigger: &str) -> bool {
        let started = Instant::now();
        let Some(reload) = self.source.reload() else {
            // Nothing to publish yet (the API source before every kind was listed).
            return false;
        };
        for problem in &reload.new_problems {
            warn!(event = "invalid_input", problem = %problem, "skipped invalid input: {problem}");
        }
        let compiled = compile(&reload.snapshot);
        for warning in &compiled.warnings {
            warn!(event = "unsupported", warning = %warning, "{warning}");
        }
        let report = self.syncer.sync(&compiled.table, &mut self.datapath);
        for e in &report.errors {
            error!(event = "sync_error", error = %e, "could not program {e}");
        }
        let (frontends, backends) = self.syncer.programmed_counts();
        if report.changed() || !report.errors.is_empty() {
            info!(
                event = "synced",
                trigger,
                frontends_written = report.frontends_written,
                frontends_removed = report.frontends_removed,
                map_writes = report.map_writes,
                map_deletes = report.map_deletes,
                frontends,
                backends,
                errors = report.errors.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "programmed {} frontends, removed {} ({frontends} frontends, {backends} backends in maps)",
                report.frontends_written,
                report.frontends_removed,
            );
        }
        !report.errors.is_empty()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    if let Err(e) = run(args).await {
        error!(event = "fatal", "{e:#}");
        return Err(e);
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let mut datapath = Datapath::load(MapSizes {
        services: args.max_service_entries,
        backends: args.max_backends,
        sock_revnat: args.max_socket_entries,
        affinity: args.max_affinity_entries,
    })?;
    datapath.set_service_cidrs(&args.service_cidrs)?;
    datapath.attach_cgroup(&args.cgroup)?;
    let source = match &args.manifests {
        Some(dir) => {
            info!(
                event = "attached",
                node = %args.node,
                cgroup = %args.cgroup.display(),
                manifests = %dir.display(),
                "socket load balancing attached to {}",
                args.cgroup.display()
            );
            // Watches before the first read so no change slips between the two.
            ClusterSource::manifests(dir, Duration::from_millis(args.settle_ms))
                .with_context(|| format!("watching {}", dir.display()))?
        }
        None => {
            info!(
                event = "attached",
                node = %args.node,
                cgroup = %args.cgroup.display(),
                source = "kubernetes",
                "socket load balancing attached to {}",
                args.cgroup.display()
            );
            let client = kube_client(args.kubeconfig.as_deref()).await?;
            ClusterSource::kubernetes(KubeSource::start(client))
        }
    };
    let mut agent = Agent {
        source,
        syncer: Syncer::new(),
        datapath,
    };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut retry = tokio::time::interval(Duration::from_secs(args.retry_seconds.max(1)));
    retry.tick().await;
    let mut needs_retry = false;
    let mut ready = false;
    loop {
        tokio::select! {
            change = agent.source.changed() => {
                let Some(trigger) = change else {
                    anyhow::bail!("the cluster source stopped");
                };
                needs_retry = agent.apply(trigger);
                if !ready && let Some(path) = &args.ready_file {
                    std::fs::write(path, format!("{}\n", std::process::id()))
                        .with_context(|| format!("writing ready file {}", path.display()))?;
                }
                ready = true;
            }
            _ = retry.tick(), if needs_retry => {
                needs_retry = agent.apply("retry");
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!(event = "stopping", "signal received; detaching programs");
    drop(agent); // Dropping the datapath detaches the programs.
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
