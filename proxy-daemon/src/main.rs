//! sluice-proxy: the node agent. Reads the cluster model, compiles it into
//! service tables and policy tables and keeps the eBPF maps in step, until
//! SIGTERM. Its programs and maps are pinned, so they keep working while it is
//! down and the next start adopts them; `sluice-proxy cleanup` removes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use clap::{ArgGroup, Parser, ValueEnum};
use cluster_model::{ClusterSnapshot, ClusterSource, KubeSource, kube_client};
use ipnet::IpNet;
use proxy_common::PolicyDropEvent;
use proxy_daemon::compile::{Compiler, node_ips};
use proxy_daemon::conntrack;
use proxy_daemon::datapath::{Datapath, MapSizes};
use proxy_daemon::enforcement::Enforcement;
use proxy_daemon::health::HealthServers;
use proxy_daemon::interfaces::Netlink;
use proxy_daemon::metrics::{self, Metrics};
use proxy_daemon::north_south::{self, NorthSouthPlan};
use proxy_daemon::owners::{Ownership, OwnershipChange};
use proxy_daemon::pins::{self, PinDir};
use proxy_daemon::status_file::{
    self, AgentStatus, AttachedInterface, FrontendOwners, InterfaceRole, LastSync,
};
use proxy_daemon::sync::Syncer;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::MissedTickBehavior;
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-proxy",
    version,
    about = "Sluice node agent: eBPF service load balancing",
    after_help = "Programs and maps stay pinned (attached) after the agent stops, so restarts and upgrades drop no connection. To remove everything (uninstall): sluice-proxy cleanup --help",
    group(ArgGroup::new("source").required(true).args(["manifests", "kubernetes"]))
)]
struct Args {
    /// bpffs directory where this agent pins its maps and program links (one per agent
    /// running in this kernel); bpffs is mounted at /sys/fs/bpf if it is not yet.
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_DIR)]
    bpffs_dir: PathBuf,
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
    /// Interface where traffic from outside arrives (NodePort, LoadBalancer IPs, externalIPs);
    /// repeat for several. Default: the interfaces holding the node's InternalIP/ExternalIP
    /// addresses (from its Node object).
    #[arg(long = "device", value_name = "NAME")]
    devices: Vec<String>,
    /// Service CIDR(s), IPv4 or IPv6; repeat for several: addresses there that no Service owns
    /// are refused.
    #[arg(
        long = "service-cidr",
        value_name = "CIDR",
        default_value = "10.96.0.0/12"
    )]
    service_cidrs: Vec<IpNet>,
    /// File written after the first successful sync (for supervisors and tests).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// File rewritten (JSON) after every sync, and each second while packets are dropped: the
    /// last sync, the interfaces programs are attached to, the policies in effect, the pods
    /// enforcing them, drop counts per pod and per policy. Beside it, <stem>.frontends.json
    /// says which Service each frontend belongs to. `sluice lb list`, `ct list`, `policy
    /// list` and `status` read them for names.
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` here, e.g. 0.0.0.0:9963.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
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
    /// Translated connections from outside the node (LRU): two entries per connection.
    #[arg(long, default_value_t = MapSizes::default().nat_conntrack)]
    max_nat_connections: u32,
    /// loadBalancerSourceRanges entries: one per LoadBalancer IP, port and range.
    #[arg(long, default_value_t = MapSizes::default().source_ranges)]
    max_source_ranges: u32,
    /// NetworkPolicy connection tracking entries (LRU): one per connection of a local pod.
    #[arg(long, default_value_t = MapSizes::default().policy_conntrack)]
    max_policy_connections: u32,
    /// NetworkPolicy allow entries: one per local pod, direction, peer class and port block.
    #[arg(long, default_value_t = MapSizes::default().policy_rules)]
    max_policy_rules: u32,
    /// NetworkPolicy address entries: pod and node addresses, ipBlock CIDRs and exceptions.
    #[arg(long, default_value_t = MapSizes::default().policy_peers)]
    max_policy_addresses: u32,
    /// Per-Service connection counters (LRU): one per frontend that receives connections.
    #[arg(long, default_value_t = MapSizes::default().service_counters)]
    max_service_counters: u32,
    /// How often connection tracking is garbage-collected and counted (tests shorten it).
    #[arg(long, value_name = "MS", default_value_t = conntrack::DEFAULT_INTERVAL_MS, hide = true)]
    conntrack_gc_interval_ms: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How soon policy programming is retried while a pod waits for its interface.
const POLICY_RETRY: Duration = Duration::from_millis(200);
/// How often every map's entries are counted for the metrics.
const MAP_PRESSURE_INTERVAL: Duration = Duration::from_secs(10);
/// How often the status file's drop counters are refreshed while drops happen.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

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
    node: String,
    devices: Vec<String>,
    source: ClusterSource,
    netlink: Netlink,
    health: HealthServers,
    north_south: NorthSouthPlan,
    metrics: Arc<Metrics>,
    syncer: Syncer,
    compiler: Compiler,
    datapath: Datapath,
    enforcement: Enforcement,
    snapshot: Arc<ClusterSnapshot>,
    status_file: Option<PathBuf>,
    /// What the status file says besides policy.
    status: AgentStatus,
    /// Which Service owns each frontend (for gauges, counters and the frontends file).
    ownership: Ownership,
    /// Drops were logged since the status file was last written.
    drops_since_status: bool,
}

/// What is left to retry after a sync.
#[derive(Clone, Copy, Debug, Default)]
struct Retry {
    /// Something could not be programmed.
    services: bool,
    /// A local pod's interface is not there yet, or policy programming failed.
    policy: bool,
}

impl Agent {
    /// Re-reads the model and programs the difference.
    async fn apply(&mut self, trigger: &str) -> Retry {
        let reload_started = Instant::now();
        let Some(reload) = self.source.reload() else {
            // Nothing to publish yet (the API source before every kind was listed).
            return Retry::default();
        };
        for problem in &reload.new_problems {
            warn!(event = "invalid_input", problem = %problem, "skipped invalid input: {problem}");
        }
        self.snapshot = reload.snapshot;
        let reload_us = reload_started.elapsed().as_micros() as u64;
        let services = self.apply_services(trigger, reload_us);
        let north_south = self.apply_north_south().await;
        let policy = self.apply_policy(trigger).await;
        Retry {
            services: services || north_south,
            policy,
        }
    }

    /// Attaches the north–south programs where outside traffic arrives and
    /// sets the SNAT address; returns whether something needs a retry.
    async fn apply_north_south(&mut self) -> bool {
        let network = match self.netlink.read().await {
            Ok(n) => n,
            Err(e) => {
                error!(
                    event = "north_south_error",
                    "reading the node's interfaces: {e:#}"
                );
                return true;
            }
        };
        let addresses = node_ips(&self.snapshot, &self.node);
        let plan = north_south::plan(&addresses, &self.devices, &network);
        if plan == self.north_south {
            return !plan.missing_devices.is_empty();
        }
        let mut failed = false;
        if plan.snat != self.north_south.snat
            && let Err(e) = self.datapath.set_snat_addresses(plan.snat)
        {
            error!(event = "north_south_error", "{e:#}");
            failed = true;
        }
        let wanted: Vec<u32> = plan.interfaces.iter().map(|i| i.index).collect();
        for ifindex in self.datapath.nodeport_interfaces() {
            if !wanted.contains(&ifindex) {
                self.datapath.detach_nodeport(ifindex);
                info!(
                    event = "north_south_detached",
                    ifindex, "stopped translating outside traffic at interface {ifindex}"
                );
            }
        }
        for interface in &plan.interfaces {
            let new = !self
                .datapath
                .nodeport_interfaces()
                .contains(&interface.index);
            match self.datapath.attach_nodeport(interface) {
                Ok(()) if new => info!(
                    event = "north_south_attached",
                    interface = %interface.name,
                    snat = ?plan.snat,
                    "translating NodePort, LoadBalancer and external IP traffic arriving at {}",
                    interface.name
                ),
                Ok(()) => {}
                Err(e) => {
                    error!(event = "north_south_error", "{e:#}");
                    failed = true;
                }
            }
        }
        for name in &plan.missing_devices {
            warn!(event = "north_south_error", device = %name, "--device {name}: no such interface (yet)");
        }
        let retry = failed || !plan.missing_devices.is_empty();
        if !failed {
            self.north_south = plan;
        }
        retry
    }

    /// Programs the service tables; returns whether something needs a retry. `reload_us`: how
    /// long reading the model took (logged with the stages here).
    fn apply_services(&mut self, trigger: &str, reload_us: u64) -> bool {
        let started = Instant::now();
        let delta = self.compiler.update(&self.snapshot, &self.node);
        let table = self.compiler.table();
        let compile_us = started.elapsed().as_micros() as u64;
        for warning in self.compiler.warnings() {
            warn!(event = "unsupported", warning = %warning, "{warning}");
        }
        let sync_started = Instant::now();
        let report = self.syncer.sync_delta(table, &delta, &mut self.datapath);
        let sync_us = sync_started.elapsed().as_micros() as u64;
        for e in &report.errors {
            error!(event = "sync_error", error = %e, "could not program {e}");
        }
        let ownership = self.ownership.apply(table, &delta);
        self.record_services(table, &report, &ownership, started.elapsed());
        let (frontends, backends) = self.syncer.programmed_counts();
        self.status.last_sync = Some(LastSync {
            unix_ms: unix_ms(),
            trigger: trigger.to_string(),
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
            frontends,
            backends,
            errors: report.errors.iter().map(ToString::to_string).collect(),
        });
        if ownership.owners_changed
            && let Some(path) = &self.status_file
        {
            write_frontend_owners(path, table);
        }
        let health_errors = self.health.update(&table.health_checks);
        for e in &health_errors {
            error!(event = "health_check_error", error = %e, "{e}");
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
                reload_us,
                compile_us,
                sync_us,
                "programmed {} frontends, removed {} ({frontends} frontends, {backends} backends in maps)",
                report.frontends_written,
                report.frontends_removed,
            );
        }
        !report.errors.is_empty() || !health_errors.is_empty()
    }

    fn record_services(
        &self,
        table: &proxy_daemon::compile::ServiceTable,
        report: &proxy_daemon::sync::SyncReport,
        ownership: &OwnershipChange,
        elapsed: Duration,
    ) {
        let m = &self.metrics;
        if report.changed() {
            m.programming
                .with_label_values(&["services"])
                .observe(elapsed.as_secs_f64());
        }
        if !report.errors.is_empty() {
            m.sync_errors.with_label_values(&["services"]).inc();
        }
        let (frontends, backends) = self.syncer.programmed_counts();
        m.frontends.set(frontends as i64);
        m.backends.set(backends as i64);
        m.map_entries
            .with_label_values(&["services"])
            .set(self.syncer.service_entries() as i64);
        m.map_entries
            .with_label_values(&["backends"])
            .set(backends as i64);
        // Only the Services whose frontends changed: with thousands of Services, redoing every
        // gauge per change would cost more than the change itself.
        if ownership.owners_changed {
            m.set_frontend_owners(table);
        }
        for (service, count) in &ownership.services {
            let labels = [service.namespace.as_str(), service.name.as_str()];
            if *count == 0 {
                let _ = m.service_frontends.remove_label_values(&labels);
            } else {
                m.service_frontends
                    .with_label_values(&labels)
                    .set(i64::try_from(*count).unwrap_or(i64::MAX));
            }
        }
    }

    /// Programs NetworkPolicy for this node's pods; returns whether something
    /// needs a retry (a pod whose interface is not there yet, say).
    async fn apply_policy(&mut self, trigger: &str) -> bool {
        let started = Instant::now();
        let report = self
            .enforcement
            .apply(&self.snapshot, &mut self.datapath)
            .await;
        for e in report.errors.iter().chain(&report.sync.errors) {
            error!(event = "policy_sync_error", error = %e, "could not program policy: {e}");
        }
        if !report.errors.is_empty() || !report.sync.errors.is_empty() {
            self.metrics
                .sync_errors
                .with_label_values(&["policy"])
                .inc();
        }
        for pod in &report.attached {
            info!(event = "policy_attached", pod = %pod, "enforcing NetworkPolicy at pod {pod}");
        }
        for pod in &report.detached {
            info!(event = "policy_detached", pod = %pod, "stopped enforcing at pod {pod}");
        }
        if report.changed() {
            self.metrics
                .programming
                .with_label_values(&["policy"])
                .observe(started.elapsed().as_secs_f64());
            let managed = self.enforcement.managed();
            let isolated = managed
                .values()
                .filter(|m| !m.isolated_by.is_empty())
                .count();
            info!(
                event = "policy_synced",
                trigger,
                pods = managed.len(),
                isolated,
                pending = report.pending.len(),
                map_writes = report.sync.writes,
                map_deletes = report.sync.deletes,
                elapsed_us = started.elapsed().as_micros() as u64,
                "policy programmed for {} pods ({isolated} isolated), {} waiting for their interface",
                managed.len(),
                report.pending.len(),
            );
        }
        self.write_status();
        report.needs_retry()
    }

    fn write_status(&self) {
        for (direction, name) in [
            (proxy_common::DIRECTION_INGRESS, "ingress"),
            (proxy_common::DIRECTION_EGRESS, "egress"),
        ] {
            let drops: u64 = self
                .datapath
                .policy_interfaces()
                .into_iter()
                .map(|ifindex| self.datapath.drop_count(ifindex, direction))
                .sum();
            self.metrics
                .policy_drops
                .with_label_values(&[name])
                .set(i64::try_from(drops).unwrap_or(i64::MAX));
        }
        let Some(path) = &self.status_file else {
            return;
        };
        let datapath = &self.datapath;
        let policy = self
            .enforcement
            .status(|ifindex, direction| datapath.drop_count(ifindex, direction));
        let mut status = self.status.clone();
        status.policy = serde_json::to_value(policy).unwrap_or_default();
        status.interfaces = self
            .enforcement
            .managed()
            .iter()
            .map(|(ifindex, m)| AttachedInterface {
                ifindex: *ifindex,
                name: m.interface.name.clone(),
                role: InterfaceRole::Pod,
                pod: Some(m.pod.to_string()),
            })
            .chain(
                self.north_south
                    .interfaces
                    .iter()
                    .map(|i| AttachedInterface {
                        ifindex: i.index,
                        name: i.name.clone(),
                        role: InterfaceRole::Uplink,
                        pod: None,
                    }),
            )
            .collect();
        let json = serde_json::to_string(&status).unwrap_or_default();
        if let Err(e) = status_file::write_atomic(path, &json) {
            warn!(event = "status_file", "writing {}: {e:#}", path.display());
        }
    }

    /// Logs the sampled drops waiting in the ring buffer.
    fn log_drops(&mut self, events: &mut RingBuf<MapData>) {
        self.drops_since_status = true;
        while let Some(item) = events.next() {
            if item.len() < size_of::<PolicyDropEvent>() {
                continue;
            }
            // SAFETY: the buffer holds at least one PolicyDropEvent, a plain
            // repr(C) struct the program wrote; read_unaligned copies it out.
            let event: PolicyDropEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<PolicyDropEvent>()) };
            drop(item);
            let count = self.datapath.drop_count(event.ifindex, event.direction);
            let report = self
                .enforcement
                .describe_drop(&event, &self.snapshot, count);
            warn!(
                event = "policy_drop",
                pod = %report.pod,
                direction = report.direction,
                peer = %report.peer,
                source = %report.source,
                destination = %report.destination,
                destination_port = report.destination_port,
                protocol = %report.protocol,
                isolated_by = %report.isolated_by.join(","),
                drops_so_far = report.drops_so_far,
                "{report}"
            );
        }
    }
}

/// Rewrites the frontends file beside the status file `status_file` (only when the
/// frontend → Service mapping changed: the file is large in large clusters).
fn write_frontend_owners(status_file: &Path, table: &proxy_daemon::compile::ServiceTable) {
    let path = status_file::frontends_path(status_file);
    let json = serde_json::to_string(&FrontendOwners::of(table)).unwrap_or_default();
    if let Err(e) = status_file::write_atomic(&path, &json) {
        warn!(event = "status_file", "writing {}: {e:#}", path.display());
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `sluice-proxy cleanup`: what an uninstall runs on each node.
#[derive(Debug, Parser)]
#[command(
    name = "sluice-proxy cleanup",
    about = "Detach every Sluice program and remove its pinned maps and links (uninstall). Stop the agent first. Safe to run twice."
)]
struct CleanupArgs {
    /// The agent's pin directory (its --bpffs-dir).
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_DIR)]
    bpffs_dir: PathBuf,
    /// Also detach Sluice socket programs attached to this cgroup (v2) without a pin (e.g. by
    /// an agent that was still running).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
}

fn cleanup(args: CleanupArgs) -> Result<()> {
    let done = pins::cleanup(&args.bpffs_dir, args.cgroup.as_deref())?;
    if done.is_empty() {
        println!(
            "nothing to remove: no pins at {}{}",
            args.bpffs_dir.display(),
            if args.cgroup.is_some() {
                " and no Sluice programs on the cgroup"
            } else {
                ""
            }
        );
    }
    for line in done {
        println!("{line}");
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "cleanup") {
        let args = CleanupArgs::parse_from(
            std::iter::once(std::ffi::OsString::from("sluice-proxy cleanup"))
                .chain(argv.into_iter().skip(2)),
        );
        if let Err(e) = cleanup(args) {
            eprintln!("sluice-proxy cleanup: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let args = Args::parse();
    init_logging(args.log_format);
    if let Err(e) = run(args).await {
        error!(event = "fatal", "{e:#}");
        return Err(e);
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let pin_dir = PinDir::open(&args.bpffs_dir)?;
    if let Some(dir) = args.status_file.as_deref().and_then(Path::parent) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for --status-file", dir.display()))?;
    }
    let (mut datapath, loaded) = Datapath::load(
        MapSizes {
            services: args.max_service_entries,
            backends: args.max_backends,
            sock_revnat: args.max_socket_entries,
            affinity: args.max_affinity_entries,
            policy_conntrack: args.max_policy_connections,
            policy_rules: args.max_policy_rules,
            policy_peers: args.max_policy_addresses,
            nat_conntrack: args.max_nat_connections,
            source_ranges: args.max_source_ranges,
            service_counters: args.max_service_counters,
        },
        pin_dir,
        &args.cgroup,
    )?;
    let pins_at = args.bpffs_dir.display();
    if !loaded.reused_maps.is_empty() {
        info!(
            event = "maps_adopted",
            maps = %loaded.reused_maps.join(","),
            "reusing {} pinned maps from {pins_at} with their contents",
            loaded.reused_maps.len()
        );
    }
    for (map, why) in &loaded.fresh_maps {
        if why == "none pinned" && loaded.reused_maps.is_empty() {
            continue;
        }
        warn!(event = "map_fresh", map = %map, reason = %why, "creating map {map} afresh: {why}");
    }
    if loaded.reused_maps.is_empty() {
        info!(
            event = "maps_created",
            "no reusable pinned maps at {pins_at}: created fresh ones"
        );
    }
    for link in &loaded.adopted_links {
        info!(event = "link_adopted", link = %link, "kept attached until the first sync: {link}");
    }
    for link in &loaded.removed_links {
        info!(event = "link_removed", link = %link, "removed stale pinned link {link}");
    }
    let (programmed, unreadable) = datapath.read_services();
    let mut syncer = Syncer::new();
    if !programmed.services.is_empty() || !programmed.backends.is_empty() || unreadable > 0 {
        let (adopted, report) = Syncer::adopt(&programmed);
        syncer = adopted;
        info!(
            event = "services_adopted",
            frontends = report.frontends,
            backends = report.backends,
            "adopted {} frontends and {} backends from the pinned maps",
            report.frontends,
            report.backends
        );
        for w in &report.warnings {
            warn!(
                event = "adopt_warning",
                "pinned service maps: {w} (removed by the first sync)"
            );
        }
        if unreadable > 0 {
            warn!(
                event = "adopt_warning",
                "{unreadable} entries of the pinned service maps could not be read"
            );
        }
    }
    let (policy_tables, unreadable) = datapath.read_policy();
    let mut enforcement = Enforcement::new(&args.node, Netlink::connect()?);
    if policy_tables != Default::default() {
        info!(
            event = "policy_adopted",
            pods = policy_tables.endpoints.len(),
            addresses = policy_tables.peers.len(),
            rules = policy_tables.rules.len(),
            "adopted policy for {} interfaces from the pinned maps",
            policy_tables.endpoints.len()
        );
        enforcement.adopt(policy_tables);
    }
    if unreadable > 0 {
        warn!(
            event = "adopt_warning",
            "{unreadable} entries of the pinned policy maps could not be read or decoded"
        );
    }
    datapath.set_service_cidrs(&args.service_cidrs)?;
    if loaded.adopted_links.is_empty() {
        // Nothing to take over: attach now, as the agent always did (the maps fill at the
        // first sync, moments later).
        for done in datapath.take_over()? {
            info!(event = "attached", "{done}");
        }
    }
    let source = match &args.manifests {
        Some(dir) => {
            info!(
                event = "starting",
                node = %args.node,
                cgroup = %args.cgroup.display(),
                manifests = %dir.display(),
                bpffs_dir = %pins_at,
                "socket load balancing for {} after the first sync",
                args.cgroup.display()
            );
            // Watches before the first read so no change slips between the two.
            ClusterSource::manifests(dir, Duration::from_millis(args.settle_ms))
                .with_context(|| format!("watching {}", dir.display()))?
        }
        None => {
            info!(
                event = "starting",
                node = %args.node,
                cgroup = %args.cgroup.display(),
                source = "kubernetes",
                bpffs_dir = %pins_at,
                "socket load balancing for {} after the first sync",
                args.cgroup.display()
            );
            let client = kube_client(args.kubeconfig.as_deref()).await?;
            ClusterSource::kubernetes(KubeSource::start(client))
        }
    };
    let drop_events = datapath
        .take_drop_events()
        .context("the drop ring buffer is missing")?;
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged,
    // for as long as the AsyncFd owns the ring buffer.
    let mut drop_events =
        unsafe { AsyncFd::register_with_interest(drop_events, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the drop ring buffer: {e}"))?;
    let metrics = Arc::new(Metrics::new().context("setting up metrics")?);
    // Pressure of every map, as the kernel holds them (sizes, entries).
    metrics::watch_map_pressure(
        args.bpffs_dir.clone(),
        metrics.clone(),
        MAP_PRESSURE_INTERVAL,
    )
    .context("starting the map pressure thread")?;
    if let Some(addr) = args.metrics_listen {
        metrics::serve(metrics.clone(), addr)
            .with_context(|| format!("--metrics-listen {addr}"))?;
        info!(event = "metrics", %addr, "metrics on http://{addr}/metrics");
    }
    conntrack::spawn(
        datapath.stats_maps()?,
        metrics.clone(),
        Duration::from_millis(args.conntrack_gc_interval_ms.max(100)),
    )?;
    let mut agent = Agent {
        metrics: metrics.clone(),
        node: args.node.clone(),
        devices: args.devices.clone(),
        source,
        netlink: Netlink::connect()?,
        health: HealthServers::default(),
        north_south: NorthSouthPlan::default(),
        syncer,
        compiler: Compiler::default(),
        datapath,
        enforcement,
        snapshot: Arc::default(),
        status_file: args.status_file.clone(),
        status: AgentStatus {
            node: args.node.clone(),
            pid: std::process::id(),
            bpffs_dir: args.bpffs_dir.display().to_string(),
            started_unix_ms: unix_ms(),
            ..AgentStatus::default()
        },
        ownership: Ownership::default(),
        drops_since_status: false,
    };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut retry = tokio::time::interval(Duration::from_secs(args.retry_seconds.max(1)));
    retry.tick().await;
    // After a slow sync, wait a whole period again rather than firing the missed ticks.
    retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // A new pod's interface usually appears moments after the pod does.
    let mut policy_retry = tokio::time::interval(POLICY_RETRY);
    policy_retry.tick().await;
    policy_retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Drop counters in the status file follow the drops at most once a second.
    let mut status_refresh = tokio::time::interval(STATUS_REFRESH);
    status_refresh.tick().await;
    status_refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut needs_retry = Retry::default();
    let mut ready = false;
    loop {
        tokio::select! {
            change = agent.source.changed() => {
                let Some(trigger) = change else {
                    anyhow::bail!("the cluster source stopped");
                };
                needs_retry = agent.apply(trigger).await;
                if !ready {
                    // The maps hold the cluster now: swap our programs into the links the
                    // previous agent left (a no-op after a fresh start).
                    let started = Instant::now();
                    for done in agent.datapath.take_over()? {
                        info!(event = "attached", "{done}");
                    }
                    info!(
                        event = "took_over",
                        cgroup = %args.cgroup.display(),
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "serving {} with this agent's programs",
                        args.cgroup.display()
                    );
                }
                metrics.set_ready();
                if !ready && let Some(path) = &args.ready_file {
                    std::fs::write(path, format!("{}\n", std::process::id()))
                        .with_context(|| format!("writing ready file {}", path.display()))?;
                }
                ready = true;
            }
            _ = retry.tick(), if needs_retry.services => {
                needs_retry = agent.apply("retry").await;
            }
            _ = policy_retry.tick(), if needs_retry.policy && !needs_retry.services => {
                needs_retry.policy = agent.apply_policy("retry").await;
            }
            guard = drop_events.readable_mut() => {
                let mut guard = guard.context("polling the drop ring buffer")?;
                agent.log_drops(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = status_refresh.tick(), if agent.drops_since_status => {
                agent.drops_since_status = false;
                agent.write_status();
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!(
        event = "stopping",
        "signal received; the programs stay attached and the maps pinned in {} (the next start adopts them; `sluice-proxy cleanup` removes them)",
        args.bpffs_dir.display()
    );
    drop(agent);
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
