//! The supervisor: the process that owns a lab, like kubelet plus API server rolled into one.
//!
//! It makes the underlay (a netns with one bridge) and the external client (a netns on that
//! bridge, in its own cgroup), reads the manifest directory, makes a netns + uplink + cgroup (+
//! node agent) per node and a netns + veth + cgroup + test server per pod, renders the cluster as
//! the API would serve it into the lab's `cluster/` directory (what the node agents read), and
//! follows changes to the manifests until SIGTERM, when it stops everything it started and
//! removes everything it made.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cluster_model::k8s_openapi::api::core::v1::{Node, Pod};
use cluster_model::{ClusterSnapshot, ManifestSource, ObjectKey, watch_dir};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::addr::{
    self, EXTERNAL_IP, EXTERNAL_IP6, Ip6Pool, IpPool, NODE_NETWORK, POD_GATEWAY, POD_GATEWAY6,
    Protocol,
};
use crate::cleanup::{ensure_dir, lab_cgroup, pin_dir};
use crate::names;
use crate::netns;
use crate::process::ProcRef;
use crate::render::{self, Allocations};
use crate::server::READY_LINE;
use crate::spawn::Placement;
use crate::state::{
    self, ExternalState, IngressState, LabPaths, LabState, NodeState, Phase, PodPhase, PodState,
    STATE_VERSION, UnderlayState,
};

/// The Ingress controller binary, looked for next to `sluice`.
const INGRESS_BIN: &str = "sluice-ingress";

/// The node created when the manifests declare no Node.
pub const IMPLICIT_NODE: &str = "node-1";
/// How long to wait, at start, for the pods' servers before starting the node agents anyway.
const SERVERS_SETTLE: Duration = Duration::from_secs(15);
/// How long the manifest directory must be quiet before it is re-read.
const WATCH_SETTLE: Duration = Duration::from_millis(100);
/// Grace periods after SIGTERM.
const PROXY_GRACE: Duration = Duration::from_secs(10);
const SERVER_GRACE: Duration = Duration::from_secs(2);

/// What `sluice lab supervise` is given.
#[derive(Clone, Debug)]
pub struct SuperviseOptions {
    pub name: String,
    pub manifests: PathBuf,
    pub service_cidr: Ipv4Net,
    /// The IPv6 service CIDR; None makes the lab IPv4-only (as does a kernel without IPv6).
    pub service_cidr6: Option<Ipv6Net>,
    /// The node agent binary; None runs the lab without node agents.
    pub proxy: Option<PathBuf>,
    /// The `sluice` binary (for the pods' test servers).
    pub sluice: PathBuf,
    /// How long node agents get to become ready.
    pub ready_timeout: Duration,
}

/// Runs a lab until SIGTERM or SIGINT.
pub fn supervise(opts: SuperviseOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let mut sup = Supervisor::new(opts)?;
        let result = sup.run().await;
        sup.teardown().await;
        result
    })
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ChildKey {
    Server(ObjectKey),
    Proxy(String),
    Ingress,
}

#[derive(Debug)]
enum Event {
    Ready(ChildKey, u64),
    Exited(ChildKey, u64, String),
}

struct ChildCtl {
    generation: u64,
    stop: oneshot::Sender<Duration>,
    task: JoinHandle<()>,
}

enum ReadyCheck {
    /// The child writes [`READY_LINE`] on stdout.
    Stdout(ChildStdout),
    /// The child creates this file.
    File(PathBuf),
    /// Nothing to wait for (clients find out by trying).
    Started,
}

struct Supervisor {
    opts: SuperviseOptions,
    paths: LabPaths,
    cgroup: PathBuf,
    state: LabState,
    source: ManifestSource,
    snapshot: Arc<ClusterSnapshot>,
    /// Where pods without spec.nodeName were placed (sticky while they exist).
    placements: BTreeMap<ObjectKey, String>,
    round_robin: usize,
    alloc: Allocations,
    /// What the cluster directory holds (file name → content).
    written: BTreeMap<String, Vec<u8>>,
    children: HashMap<ChildKey, ChildCtl>,
    /// Objects already reported as not renderable, and render problems already logged.
    unrendered_warned: BTreeSet<String>,
    generation: u64,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// When the node agents were started (after the first render).
    proxies_started: Option<Instant>,
    started: Instant,
}

impl Supervisor {
    fn new(opts: SuperviseOptions) -> Result<Self> {
        names::validate_lab_name(&opts.name)?;
        let cg_root = crate::cgroup::cgroup2_root()?;
        let paths = LabPaths::new(&opts.name);
        for dir in [
            paths.dir.clone(),
            paths.logs(),
            paths.ready(),
            paths.status(),
            paths.cluster(),
        ] {
            ensure_dir(&dir)?;
        }
        // A fresh cluster directory: nothing rendered by an earlier run may linger.
        if let Ok(entries) = fs::read_dir(paths.cluster()) {
            for e in entries.filter_map(|e| e.ok()) {
                let _ = fs::remove_file(e.path());
            }
        }
        let service_cidr6 = opts.service_cidr6.filter(|_| {
            let ok = crate::preflight::ipv6_available();
            if !ok {
                warn!("the kernel has no IPv6: the lab is IPv4-only");
            }
            ok
        });
        let state = LabState {
            version: STATE_VERSION,
            name: opts.name.clone(),
            manifests_dir: opts.manifests.clone(),
            service_cidr: opts.service_cidr,
            service_cidr6,
            cgroup: lab_cgroup(&cg_root, &opts.name),
            netns_prefix: format!("{}{}-", names::NETNS_PREFIX, opts.name),
            proxy: opts.proxy.clone(),
            phase: Phase::Starting,
            error: None,
            error_log: None,
            supervisor: ProcRef::of(std::process::id()),
            underlay: None,
            external: None,
            nodes: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            ingress: None,
            render_problems: Vec::new(),
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let sup = Supervisor {
            cgroup: state.cgroup.clone(),
            source: ManifestSource::new(&opts.manifests),
            opts,
            paths,
            state,
            snapshot: Arc::new(ClusterSnapshot::default()),
            placements: BTreeMap::new(),
            round_robin: 0,
            alloc: Allocations::default(),
            written: BTreeMap::new(),
            children: HashMap::new(),
            unrendered_warned: BTreeSet::new(),
            generation: 0,
            events_tx,
            events_rx,
            proxies_started: None,
            started: Instant::now(),
        };
        sup.save();
        Ok(sup)
    }

    async fn run(&mut self) -> Result<()> {
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        // Watch before the first read so that no change slips between the two.
        let (_watch, mut changes) = watch_dir(&self.opts.manifests, WATCH_SETTLE)
            .with_context(|| format!("watching {}", self.opts.manifests.display()))?;
        info!(lab = %self.opts.name, manifests = %self.opts.manifests.display(), "lab starting");
        if let Err(e) = self.create_underlay() {
            let e = e.context("creating the underlay and the external client");
            self.fail(format!("{e:#}"), None);
            return Err(e);
        }
        self.apply_manifests().await;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            self.advance_startup();
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM: taking the lab down"); break; }
                _ = sigint.recv() => { info!("SIGINT: taking the lab down"); break; }
                change = changes.recv() => match change {
                    Some(()) => {
                        info!("manifests changed");
                        self.apply_manifests().await;
                    }
                    None => {
                        self.fail("the manifest directory watch ended".into(), None);
                        std::future::pending::<()>().await;
                    }
                },
                Some(event) = self.events_rx.recv() => self.handle(event).await,
                _ = tick.tick() => self.restart_requested_proxies().await,
            }
        }
        Ok(())
    }

    /// At start: once the pods' servers listen, render and start the node agents; once they are
    /// ready, the lab is ready.
    fn advance_startup(&mut self) {
        if self.state.phase != Phase::Starting {
            return;
        }
        let elapsed = self.started.elapsed();
        if self.proxies_started.is_none() {
            let settled = self
                .state
                .pods
                .iter()
                .filter(|p| p.phase == PodPhase::Running)
                .all(|p| p.listening || p.server.is_none());
            if !settled && elapsed < SERVERS_SETTLE {
                return;
            }
            self.write_rendered();
            self.proxies_started = Some(Instant::now());
            let nodes: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
            for node in nodes {
                if let Err(e) = self.start_proxy(&node) {
                    let log = self
                        .opts
                        .proxy
                        .as_ref()
                        .map(|_| self.paths.proxy_log(&node));
                    self.fail(format!("starting the node agent of {node}: {e:#}"), log);
                    return;
                }
            }
            self.ensure_ingress();
        }
        let waiting: Vec<&NodeState> = if self.opts.proxy.is_some() {
            self.state.nodes.iter().filter(|n| !n.proxy_ready).collect()
        } else {
            Vec::new()
        };
        if waiting.is_empty() {
            self.state.phase = Phase::Ready;
            self.save();
            info!(
                nodes = self.state.nodes.len(),
                pods = self.state.pods.len(),
                "lab ready after {} ms",
                elapsed.as_millis()
            );
        } else if self
            .proxies_started
            .is_some_and(|t| t.elapsed() > self.opts.ready_timeout)
        {
            let node = waiting[0].name.clone();
            let log = self.paths.proxy_log(&node);
            self.fail(
                format!(
                    "the node agent of {node} did not write its ready file within {} s",
                    self.opts.ready_timeout.as_secs()
                ),
                Some(log),
            );
        }
    }

    fn fail(&mut self, message: String, log: Option<PathBuf>) {
        error!("{message}");
        if self.state.phase == Phase::Starting {
            self.state.phase = Phase::Failed;
            self.state.error = Some(message);
            self.state.error_log = log;
        }
        self.save();
    }

    fn save(&self) {
        if let Err(e) = state::save(&self.paths.state(), &self.state) {
            error!("saving the lab state: {e:#}");
        }
    }

    /// Re-reads the manifests and makes the lab match them.
    async fn apply_manifests(&mut self) {
        let reload = self.source.reload();
        for problem in &reload.new_problems {
            warn!("manifest problem: {problem}");
        }
        self.snapshot = reload.snapshot;
        self.reconcile().await;
    }

    /// The nodes the manifests want: their Nodes, or the implicit one.
    fn desired_nodes(&self) -> BTreeMap<String, Option<Node>> {
        if self.snapshot.nodes.is_empty() {
            BTreeMap::from([(IMPLICIT_NODE.to_string(), None)])
        } else {
            self.snapshot
                .nodes
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect()
        }
    }

    async fn reconcile(&mut self) {
        let desired_nodes = self.desired_nodes();
        // Nodes whose addresses no longer match their Node go and come back.
        let stale_nodes: BTreeSet<String> = self
            .state
            .nodes
            .iter()
            .filter(|n| match desired_nodes.get(&n.name) {
                None => true,
                Some(node) => {
                    let cidr = node.as_ref().and_then(render::node_pod_cidr);
                    let ip = node.as_ref().and_then(render::node_internal_ip);
                    let cidr6 = node.as_ref().and_then(render::node_pod_cidr6);
                    let ip6 = node.as_ref().and_then(render::node_internal_ip6);
                    let dual = self.state.service_cidr6.is_some();
                    cidr.is_some_and(|c| c != n.pod_cidr)
                        || ip.is_some_and(|ip| ip != n.ip)
                        || (dual && cidr6.is_some_and(|c| Some(c) != n.pod_cidr6))
                        || (dual && ip6.is_some_and(|ip| Some(ip) != n.ip6))
                }
            })
            .map(|n| n.name.clone())
            .collect();
        let live_nodes: Vec<String> = desired_nodes
            .keys()
            .filter(|n| !stale_nodes.contains(*n))
            .cloned()
            .collect();

        // Placement: spec.nodeName, else where the pod already is, else round robin in name order.
        self.placements
            .retain(|k, n| self.snapshot.pods.contains_key(k) && live_nodes.contains(n));
        let mut placement: BTreeMap<ObjectKey, String> = BTreeMap::new();
        for (key, pod) in &self.snapshot.pods {
            let explicit = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty());
            let node = match explicit {
                Some(n) => n,
                None => match self.placements.get(key) {
                    Some(n) => n.clone(),
                    None if live_nodes.is_empty() => continue,
                    None => {
                        let n = live_nodes[self.round_robin % live_nodes.len()].clone();
                        self.round_robin += 1;
                        self.placements.insert(key.clone(), n.clone());
                        n
                    }
                },
            };
            placement.insert(key.clone(), node);
        }

        // Pods that go (or move, or whose node goes): out of the rendered directory first.
        let mut going = Vec::new();
        let mut kept = Vec::new();
        for pod in std::mem::take(&mut self.state.pods) {
            let key = ObjectKey::new(pod.namespace.clone(), pod.name.clone());
            let wanted_node = placement.get(&key);
            let stays = pod.phase == PodPhase::Running
                && self.snapshot.pods.contains_key(&key)
                && wanted_node == pod.node.as_ref()
                && pod.node.as_ref().is_some_and(|n| !stale_nodes.contains(n));
            if stays {
                kept.push(pod);
            } else if pod.phase == PodPhase::Running {
                going.push(pod);
            }
        }
        self.state.pods = kept;
        if !going.is_empty() {
            self.write_rendered();
            for pod in going {
                info!(pod = %pod.key(), "removing pod");
                self.remove_pod(pod).await;
            }
        }

        for name in &stale_nodes {
            self.remove_node(name).await;
        }
        let routes_before = self.cluster_routes();
        for (name, node) in &desired_nodes {
            if self.state.node(name).is_none() {
                let explicit: Vec<Ipv4Net> = desired_nodes
                    .values()
                    .flatten()
                    .filter_map(render::node_pod_cidr)
                    .collect();
                match self.create_node(name, node.as_ref(), &explicit) {
                    Ok(st) => {
                        info!(node = %name, netns = %st.netns, pod_cidr = %st.pod_cidr, ip = %st.ip, pod_cidr6 = ?st.pod_cidr6, ip6 = ?st.ip6, "node created");
                        self.state.nodes.push(st);
                        self.save();
                        if self.proxies_started.is_some()
                            && let Err(e) = self.start_proxy(name)
                        {
                            error!(node = %name, "starting the node agent: {e:#}");
                        }
                    }
                    Err(e) => {
                        self.fail(format!("creating node {name}: {e:#}"), None);
                    }
                }
            }
        }
        self.extend_pod_routes(&routes_before);

        // New pods, pending pods, and pods whose ports changed.
        let snapshot = self.snapshot.clone();
        let mut pending = Vec::new();
        for (key, pod) in &snapshot.pods {
            let ports = render::pod_ports(pod);
            if let Some(i) = self.pod_index(key) {
                if self.state.pods[i].ports != ports {
                    info!(pod = %key, "ports changed: restarting its server");
                    self.stop_child(&ChildKey::Server(key.clone()), SERVER_GRACE)
                        .await;
                    self.state.pods[i].ports = ports;
                    self.state.pods[i].listening = false;
                    if let Err(e) = self.start_server(key) {
                        error!(pod = %key, "starting the test server: {e:#}");
                    }
                }
                continue;
            }
            let node = placement
                .get(key)
                .filter(|n| self.state.node(n).is_some())
                .cloned();
            let Some(node) = node else {
                warn!(pod = %key, node = ?placement.get(key), "pod is Pending: its node does not exist");
                pending.push(pending_pod(key, ports));
                continue;
            };
            match self.create_pod(key, pod, &node, ports.clone()) {
                Ok(st) => {
                    info!(pod = %key, node = %node, ip = ?st.ip, "pod created");
                    self.state.pods.push(st);
                    if let Err(e) = self.start_server(key) {
                        error!(pod = %key, "starting the test server: {e:#}");
                    }
                }
                Err(e) => {
                    error!(pod = %key, "creating the pod: {e:#}");
                    pending.push(pending_pod(key, ports));
                }
            }
        }
        self.state.pods.extend(pending);
        self.state
            .pods
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.write_rendered();
    }

    /// The underlay (a netns with a bridge) and the external client plugged into it: a netns
    /// with [`EXTERNAL_IP`] on `eth0`, routes to the node network only, its own cgroup.
    fn create_underlay(&mut self) -> Result<()> {
        let lab = &self.opts.name;
        let underlay = UnderlayState {
            netns: names::underlay_netns(lab),
            bridge: names::UNDERLAY_BRIDGE.to_string(),
            network: NODE_NETWORK,
            network6: self.state.service_cidr6.map(|_| addr::NODE_NETWORK6),
        };
        let external = ExternalState {
            netns: names::external_netns(lab),
            cgroup: self.cgroup.join(names::EXTERNAL_CGROUP_DIR),
            ip: EXTERNAL_IP,
            ip6: self.state.service_cidr6.map(|_| EXTERNAL_IP6),
            ifname: names::UPLINK_IFNAME.to_string(),
            underlay_port: names::EXTERNAL_PORT.to_string(),
        };
        // Recorded first: whatever gets made is then found by teardown and cleanup.
        self.state.underlay = Some(underlay.clone());
        self.state.external = Some(external.clone());
        self.save();
        let (u, br, x) = (&underlay.netns, &underlay.bridge, &external.netns);
        netns::delete(u)?;
        netns::add(u)?;
        // No multicast snooping: IPv6 neighbour discovery's multicast then reaches every port
        // at once, without waiting for MLD reports.
        netns::ip_batch(
            u,
            &[
                format!("link add {br} type bridge mcast_snooping 0"),
                format!("link set {br} up"),
            ],
        )?;
        netns::delete(x)?;
        netns::add(x)?;
        if external.ip6.is_some() {
            netns::disable_dad(x)?;
        }
        let port = &external.underlay_port;
        netns::ip_batch(
            u,
            &[
                format!(
                    "link add {port} type veth peer name {} netns {x}",
                    external.ifname
                ),
                format!("link set {port} master {br}"),
                format!("link set {port} up"),
            ],
        )?;
        let ips: Vec<IpAddr> = [IpAddr::V4(external.ip)]
            .into_iter()
            .chain(external.ip6.map(IpAddr::V6))
            .collect();
        netns::ip_batch(x, &addr::uplink_commands(&ips, &external.ifname))?;
        crate::cgroup::create(&external.cgroup)?;
        info!(underlay = %u, bridge = %br, external = %x, ip = %external.ip, ip6 = ?external.ip6, "underlay and external client created");
        Ok(())
    }

    fn pod_index(&self, key: &ObjectKey) -> Option<usize> {
        self.state.pods.iter().position(|p| {
            p.phase == PodPhase::Running && p.namespace == key.namespace && p.name == key.name
        })
    }

    fn create_node(
        &self,
        name: &str,
        node: Option<&Node>,
        explicit: &[Ipv4Net],
    ) -> Result<NodeState> {
        let own_cidr = node.and_then(render::node_pod_cidr);
        let used: BTreeSet<u32> = self.state.nodes.iter().map(|n| n.index).collect();
        let mut taken: Vec<Ipv4Net> = self.state.nodes.iter().map(|n| n.pod_cidr).collect();
        let index = match own_cidr {
            Some(_) => (0..).find(|i| !used.contains(i)).unwrap_or(0),
            None => {
                taken.extend(explicit.iter().copied());
                addr::free_node_index(&used, &taken).context("no free pod CIDR in 10.244.0.0/16")?
            }
        };
        let pod_cidr = match own_cidr {
            Some(c) => c,
            None => addr::default_pod_cidr(index).context("no free pod CIDR")?,
        };
        if let Some(other) = self
            .state
            .nodes
            .iter()
            .find(|n| addr::overlaps(n.pod_cidr, pod_cidr))
        {
            bail!(
                "pod CIDR {pod_cidr} overlaps {} of node {}",
                other.pod_cidr,
                other.name
            );
        }
        let ip = node
            .and_then(render::node_internal_ip)
            .or_else(|| addr::default_node_ip(index))
            .context("no free node address")?;
        if let Some(other) = self.state.nodes.iter().find(|n| n.ip == ip) {
            bail!("node address {ip} is already node {}'s", other.name);
        }
        if self.state.external.as_ref().is_some_and(|x| x.ip == ip) || ip == POD_GATEWAY {
            bail!("node address {ip} is reserved by the lab");
        }
        // IPv6: what the Node names, else the twins of the IPv4 plan.
        let (pod_cidr6, ip6) = match self.state.service_cidr6 {
            None => (None, None),
            Some(_) => {
                let cidr6 = node
                    .and_then(render::node_pod_cidr6)
                    .unwrap_or_else(|| addr::pod_cidr6_of(pod_cidr));
                let ip6 = node
                    .and_then(render::node_internal_ip6)
                    .unwrap_or_else(|| addr::node_ip6_of(ip));
                if let Some(other) = self.state.nodes.iter().find(|n| {
                    n.pod_cidr6
                        .is_some_and(|c| c.contains(&cidr6) || cidr6.contains(&c))
                }) {
                    bail!(
                        "IPv6 pod CIDR {cidr6} overlaps {} of node {}",
                        other.pod_cidr6.map(|c| c.to_string()).unwrap_or_default(),
                        other.name
                    );
                }
                if let Some(other) = self.state.nodes.iter().find(|n| n.ip6 == Some(ip6)) {
                    bail!("node address {ip6} is already node {}'s", other.name);
                }
                if ip6 == EXTERNAL_IP6 || ip6 == POD_GATEWAY6 {
                    bail!("node address {ip6} is reserved by the lab");
                }
                (Some(cidr6), Some(ip6))
            }
        };
        let underlay = self
            .state
            .underlay
            .clone()
            .context("the lab has no underlay")?;
        let netns = names::node_netns(&self.opts.name, name);
        let cgroup = self.cgroup.join(names::node_cgroup_dir(name));
        let port = names::underlay_port(index);
        let eth = names::UPLINK_IFNAME;
        let made = (|| -> Result<()> {
            netns::delete(&netns)?;
            netns::add(&netns)?;
            netns::ip_batch(&netns, &[format!("addr add {POD_GATEWAY}/32 dev lo")])?;
            netns::sysctl(&netns, "net/ipv4/ip_forward", "1")?;
            if ip6.is_some() {
                netns::disable_dad(&netns)?;
                netns::sysctl(&netns, "net/ipv6/conf/all/forwarding", "1")?;
            }
            // The uplink: eth0 here, `port` on the bridge; a stale port of a node that had this
            // index goes first.
            let _ = netns::ip(&["-n", &underlay.netns, "link", "del", &port]);
            netns::ip_batch(
                &underlay.netns,
                &[
                    format!("link add {port} type veth peer name {eth} netns {netns}"),
                    format!("link set {port} master {}", underlay.bridge),
                    format!("link set {port} up"),
                ],
            )?;
            let my_ips: Vec<IpAddr> = [IpAddr::V4(ip)]
                .into_iter()
                .chain(ip6.map(IpAddr::V6))
                .collect();
            netns::ip_batch(&netns, &addr::uplink_commands(&my_ips, eth))?;
            // Routes to every other node's pod CIDR (and address, if off the node network),
            // and to the external client; then theirs to this node. Per family.
            let me = Peer {
                ip,
                pod_cidr: Some(pod_cidr),
                ip6,
                pod_cidr6,
            };
            let mut mine = Vec::new();
            for other in &self.state.nodes {
                mine.extend(me.routes_to(&Peer::node(other), eth));
            }
            if let Some(x) = &self.state.external {
                mine.extend(me.routes_to(&Peer::external(x), eth));
            }
            netns::ip_batch(&netns, &mine)?;
            for other in &self.state.nodes {
                netns::ip_batch(&other.netns, &Peer::node(other).routes_to(&me, eth))
                    .with_context(|| format!("routing node {}'s traffic to {name}", other.name))?;
            }
            if let Some(x) = &self.state.external {
                let to_me = Peer {
                    pod_cidr: None,
                    pod_cidr6: None,
                    ..me
                };
                netns::ip_batch(&x.netns, &Peer::external(x).routes_to(&to_me, &x.ifname))?;
            }
            crate::cgroup::create(&cgroup.join(names::PROXY_CGROUP_DIR))?;
            Ok(())
        })();
        if let Err(e) = made {
            self.withdraw_routes(ip, pod_cidr, ip6, pod_cidr6);
            let _ = netns::ip(&["-n", &underlay.netns, "link", "del", &port]);
            let _ = netns::delete(&netns);
            let _ = crate::cgroup::destroy(&cgroup);
            return Err(e);
        }
        Ok(NodeState {
            name: name.to_string(),
            netns,
            cgroup,
            pod_cidr,
            ip,
            pod_cidr6,
            ip6,
            index,
            proxy: None,
            proxy_ready: false,
            proxy_log: None,
            next_veth: 0,
            underlay_port: Some(port),
        })
    }

    /// Removes the routes other nodes and the external client have to a node at `ip` (and
    /// `ip6`) with `pod_cidr` (and `pod_cidr6`); best effort: some may never have been made.
    fn withdraw_routes(
        &self,
        ip: Ipv4Addr,
        pod_cidr: Ipv4Net,
        ip6: Option<Ipv6Addr>,
        pod_cidr6: Option<Ipv6Net>,
    ) {
        let eth = names::UPLINK_IFNAME;
        let gone = Peer {
            ip,
            pod_cidr: Some(pod_cidr),
            ip6,
            pod_cidr6,
        };
        for other in self.state.nodes.iter().filter(|n| n.ip != ip) {
            if netns::exists(&other.netns) {
                let _ =
                    netns::ip_batch_all(&other.netns, &Peer::node(other).unroutes_to(&gone, eth));
            }
        }
        if let Some(x) = &self.state.external
            && netns::exists(&x.netns)
        {
            let to_gone = Peer {
                pod_cidr: None,
                pod_cidr6: None,
                ..gone
            };
            let _ = netns::ip_batch_all(
                &x.netns,
                &Peer::external(x).unroutes_to(&to_gone, &x.ifname),
            );
        }
    }

    async fn remove_node(&mut self, name: &str) {
        info!(node = %name, "removing node");
        let pods: Vec<PodState> = self
            .state
            .pods
            .iter()
            .filter(|p| p.node.as_deref() == Some(name) && p.phase == PodPhase::Running)
            .cloned()
            .collect();
        self.state
            .pods
            .retain(|p| !(p.node.as_deref() == Some(name) && p.phase == PodPhase::Running));
        for pod in pods {
            self.remove_pod(pod).await;
        }
        self.stop_child(&ChildKey::Proxy(name.to_string()), PROXY_GRACE)
            .await;
        if let Some(i) = self.state.nodes.iter().position(|n| n.name == name) {
            let node = self.state.nodes.remove(i);
            // The others stop routing to it, and its uplink leaves the bridge, before it goes.
            self.withdraw_routes(node.ip, node.pod_cidr, node.ip6, node.pod_cidr6);
            if let (Some(u), Some(port)) = (&self.state.underlay, &node.underlay_port)
                && netns::exists(&u.netns)
            {
                let _ = netns::ip(&["-n", &u.netns, "link", "del", port]);
            }
            if let Err(e) = crate::cgroup::destroy(&node.cgroup) {
                error!(node = %name, "{e:#}");
            }
            if let Err(e) = netns::delete(&node.netns) {
                error!(node = %name, "{e:#}");
            }
            // The agent is stopped: its pins hold the last of its programs and maps.
            let pins = pin_dir(&self.opts.name, name);
            if pins.exists()
                && let Err(e) = fs::remove_dir_all(&pins)
            {
                error!(node = %name, "removing {}: {e}", pins.display());
            }
            let _ = fs::remove_file(self.paths.proxy_ready(name));
        }
        self.save();
    }

    /// The routes every pod has via its gateway, IPv4 and IPv6 (when the lab has IPv6).
    fn cluster_routes(&self) -> Vec<IpNet> {
        let cidrs: Vec<Ipv4Net> = self.state.nodes.iter().map(|n| n.pod_cidr).collect();
        let ips: Vec<Ipv4Addr> = self.state.nodes.iter().map(|n| n.ip).collect();
        let mut routes: Vec<IpNet> = addr::cluster_routes(self.opts.service_cidr, &cidrs, &ips)
            .into_iter()
            .map(IpNet::V4)
            .collect();
        if let Some(cidr6) = self.state.service_cidr6 {
            let cidrs6: Vec<Ipv6Net> = self
                .state
                .nodes
                .iter()
                .filter_map(|n| n.pod_cidr6)
                .collect();
            let ips6: Vec<Ipv6Addr> = self.state.nodes.iter().filter_map(|n| n.ip6).collect();
            routes.extend(
                addr::cluster_routes6(cidr6, &cidrs6, &ips6)
                    .into_iter()
                    .map(IpNet::V6),
            );
        }
        routes
    }

    /// Gives running pods the cluster routes that new nodes added (a pod CIDR or node address
    /// outside the ranges every pod routes already). Routes of nodes that went stay: the node
    /// they lead to has no route onward any more.
    fn extend_pod_routes(&self, before: &[IpNet]) {
        let added: Vec<String> = self
            .cluster_routes()
            .into_iter()
            .filter(|r| !before.contains(r))
            .map(|r| {
                format!(
                    "route replace {r} via {} dev {}",
                    gateway_of(&r),
                    names::POD_IFNAME
                )
            })
            .collect();
        if added.is_empty() {
            return;
        }
        for pod in self
            .state
            .pods
            .iter()
            .filter(|p| p.phase == PodPhase::Running)
        {
            if let Some(ns) = &pod.netns
                && let Err(e) = netns::ip_batch(ns, &added)
            {
                error!(pod = %pod.key(), "adding routes to new nodes: {e:#}");
            }
        }
    }

    fn create_pod(
        &mut self,
        key: &ObjectKey,
        pod: &Pod,
        node_name: &str,
        ports: Vec<crate::state::PortSpec>,
    ) -> Result<PodState> {
        let routes = self.cluster_routes();
        let node_idx = self
            .state
            .nodes
            .iter()
            .position(|n| n.name == node_name)
            .ok_or_else(|| anyhow!("no node {node_name}"))?;
        let veth = names::host_veth(self.state.nodes[node_idx].next_veth);
        self.state.nodes[node_idx].next_veth += 1;
        let node = self.state.nodes[node_idx].clone();

        let mut pool = IpPool::new(node.pod_cidr);
        let mut pool6 = node.pod_cidr6.map(Ip6Pool::new);
        for p in self
            .state
            .pods
            .iter()
            .filter(|p| p.node.as_deref() == Some(node_name))
        {
            if let Some(ip) = p.ip {
                pool.claim(ip);
            }
            if let (Some(pool6), Some(ip6)) = (pool6.as_mut(), p.ip6) {
                pool6.claim(ip6);
            }
        }
        let listed = render::manifest_pod_ips(pod);
        let wanted = listed.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        let ip = match wanted {
            Some(ip) if pool.claim(ip) => ip,
            _ => {
                if let Some(w) = wanted {
                    warn!(pod = %key, "status.podIP {w} is not free in {} of node {node_name}; allocating", node.pod_cidr);
                }
                pool.allocate().with_context(|| {
                    format!("pod CIDR {} of node {node_name} is full", node.pod_cidr)
                })?
            }
        };
        // IPv6: the manifest's if free, else the twin of the IPv4 address, else the lowest free.
        let ip6 = match (pool6.as_mut(), node.pod_cidr6) {
            (Some(pool6), Some(cidr6)) => {
                let wanted6 = listed.iter().find_map(|ip| match ip {
                    IpAddr::V6(v6) => Some(*v6),
                    IpAddr::V4(_) => None,
                });
                let ip6 = match wanted6 {
                    Some(w) if pool6.claim(w) => Some(w),
                    _ => {
                        if let Some(w) = wanted6 {
                            warn!(pod = %key, "status.podIPs {w} is not free in {cidr6} of node {node_name}; allocating");
                        }
                        addr::pod_ip6_of(ip, node.pod_cidr, cidr6)
                            .filter(|twin| pool6.claim(*twin))
                            .or_else(|| pool6.allocate())
                    }
                };
                Some(ip6.with_context(|| {
                    format!("IPv6 pod CIDR {cidr6} of node {node_name} is full")
                })?)
            }
            _ => None,
        };
        let netns = names::pod_netns(&self.opts.name, &key.namespace, &key.name);
        let cgroup = node
            .cgroup
            .join(names::pod_cgroup_dir(&key.namespace, &key.name));
        let made = (|| -> Result<()> {
            netns::delete(&netns)?;
            netns::add(&netns)?;
            if ip6.is_some() {
                // Before the veth: its pod end is born here and takes the defaults.
                netns::disable_dad(&netns)?;
            }
            netns::ip_batch(
                &node.netns,
                &[
                    format!(
                        "link add {veth} type veth peer name {} netns {netns}",
                        names::POD_IFNAME
                    ),
                    format!("link set {veth} up"),
                ],
            )?;
            netns::sysctl(&node.netns, &format!("net/ipv4/conf/{veth}/proxy_arp"), "1")?;
            let mut host = vec![format!(
                "route add {ip}/32 dev {veth} scope link src {}",
                node.ip
            )];
            if let (Some(ip6), Some(node_ip6)) = (ip6, node.ip6) {
                // The pod's IPv6 gateway is this end of the veth (link-local: the same on
                // every veth).
                host.push(format!("addr add {POD_GATEWAY6}/64 dev {veth} nodad"));
                host.push(format!("route add {ip6}/128 dev {veth} src {node_ip6}"));
            }
            netns::ip_batch(&node.netns, &host)?;
            let eth = names::POD_IFNAME;
            let mut cmds = vec![format!("addr add {ip}/32 dev {eth}")];
            if let Some(ip6) = ip6 {
                cmds.push(format!("addr add {ip6}/128 dev {eth} nodad"));
            }
            cmds.push(format!("link set {eth} up"));
            cmds.push(format!("route add {POD_GATEWAY} dev {eth} scope link"));
            cmds.extend(
                routes
                    .iter()
                    .filter(|r| r.addr().is_ipv4() || ip6.is_some())
                    .map(|r| format!("route add {r} via {} dev {eth}", gateway_of(r))),
            );
            netns::ip_batch(&netns, &cmds)?;
            crate::cgroup::create(&cgroup)?;
            Ok(())
        })();
        if let Err(e) = made {
            let _ = netns::ip(&["-n", &node.netns, "link", "del", &veth]);
            let _ = netns::delete(&netns);
            let _ = crate::cgroup::destroy(&cgroup);
            self.save();
            return Err(e);
        }
        Ok(PodState {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            phase: PodPhase::Running,
            node: Some(node_name.to_string()),
            netns: Some(netns),
            cgroup: Some(cgroup),
            ip: Some(ip),
            ip6,
            host_veth: Some(veth),
            ports,
            server: None,
            listening: false,
            ready: false,
            log: Some(self.paths.pod_log(&key.namespace, &key.name)),
        })
    }

    async fn remove_pod(&mut self, pod: PodState) {
        let key = ObjectKey::new(pod.namespace.clone(), pod.name.clone());
        self.stop_child(&ChildKey::Server(key), SERVER_GRACE).await;
        teardown_pod_net(&self.state, &pod);
        self.save();
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    fn start_server(&mut self, key: &ObjectKey) -> Result<()> {
        let i = self
            .pod_index(key)
            .ok_or_else(|| anyhow!("no running pod {key}"))?;
        let pod = self.state.pods[i].clone();
        let (Some(netns), Some(cgroup)) = (&pod.netns, &pod.cgroup) else {
            bail!("pod {key} has no netns")
        };
        let log = self.paths.pod_log(&key.namespace, &key.name);
        let mut cmd = std::process::Command::new(&self.opts.sluice);
        cmd.args(["lab", "serve", "--pod", &key.name]);
        for p in &pod.ports {
            cmd.arg(match p.protocol {
                Protocol::Tcp => "--tcp",
                Protocol::Udp => "--udp",
            });
            cmd.arg(p.port.to_string());
        }
        let generation = self.next_generation();
        let (child, proc) =
            spawn_child(cmd, &Placement::new(netns::path(netns), cgroup), &log, true)?;
        let mut child = child;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let ctl = watch(
            child,
            ChildKey::Server(key.clone()),
            generation,
            ReadyCheck::Stdout(stdout),
            self.events_tx.clone(),
        );
        self.children.insert(ChildKey::Server(key.clone()), ctl);
        let st = &mut self.state.pods[i];
        st.server = proc;
        st.listening = false;
        st.log = Some(log);
        self.save();
        Ok(())
    }

    fn start_proxy(&mut self, node: &str) -> Result<()> {
        let Some(proxy) = self.opts.proxy.clone() else {
            return Ok(());
        };
        let i = self
            .state
            .nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| anyhow!("no node {node}"))?;
        let st = self.state.nodes[i].clone();
        let ready = self.paths.proxy_ready(node);
        let _ = fs::remove_file(&ready);
        let log = self.paths.proxy_log(node);
        let mut cmd = std::process::Command::new(&proxy);
        cmd.arg("--manifests")
            .arg(self.paths.cluster())
            .args(["--node", node])
            .arg("--cgroup")
            .arg(&st.cgroup)
            .args(["--service-cidr", &self.opts.service_cidr.to_string()]);
        if let Some(cidr6) = self.state.service_cidr6 {
            cmd.args(["--service-cidr", &cidr6.to_string()]);
        }
        cmd.arg("--ready-file")
            .arg(&ready)
            .arg("--status-file")
            .arg(self.paths.proxy_status(node))
            // Its own pins: every node agent of every lab shares this kernel.
            .arg("--bpffs-dir")
            .arg(pin_dir(&self.opts.name, node))
            // Its log is a file: no colour codes.
            .env("NO_COLOR", "1");
        let placement = Placement::new(
            netns::path(&st.netns),
            st.cgroup.join(names::PROXY_CGROUP_DIR),
        );
        let generation = self.next_generation();
        let (child, proc) = spawn_child(cmd, &placement, &log, false)?;
        info!(node = %node, pid = ?proc.map(|p| p.pid), "node agent started");
        let ctl = watch(
            child,
            ChildKey::Proxy(node.to_string()),
            generation,
            ReadyCheck::File(ready),
            self.events_tx.clone(),
        );
        self.children.insert(ChildKey::Proxy(node.to_string()), ctl);
        let st = &mut self.state.nodes[i];
        st.proxy = proc;
        st.proxy_ready = false;
        st.proxy_log = Some(log);
        self.save();
        Ok(())
    }

    /// Restarts the node agents named in restart requests (see [`request_proxy_restart`]):
    /// stops the running one (SIGKILL, or SIGTERM with its grace period) and starts it again
    /// with the same arguments, as kubelet restarts a DaemonSet pod.
    async fn restart_requested_proxies(&mut self) {
        let dir = requests_dir(&self.paths);
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(node) = name.strip_prefix(RESTART_PREFIX) else {
                continue;
            };
            let node = node.to_string();
            let how = fs::read_to_string(entry.path()).unwrap_or_default();
            let _ = fs::remove_file(entry.path());
            if self.state.node(&node).is_none() || self.opts.proxy.is_none() {
                warn!(node = %node, "restart requested for a node agent that does not exist");
                continue;
            }
            let kill = how.trim() != "TERM";
            info!(node = %node, kill, "restarting the node agent");
            if kill && let Some(proc) = self.state.node(&node).and_then(|n| n.proxy) {
                // By PID (and start time): as a crash or an OOM kill would end it.
                proc.signal(libc::SIGKILL);
            }
            let grace = if kill { Duration::ZERO } else { PROXY_GRACE };
            self.stop_child(&ChildKey::Proxy(node.clone()), grace).await;
            if let Err(e) = self.start_proxy(&node) {
                error!(node = %node, "restarting the node agent: {e:#}");
            }
        }
    }

    async fn stop_child(&mut self, key: &ChildKey, grace: Duration) {
        if let Some(ctl) = self.children.remove(key) {
            let _ = ctl.stop.send(grace);
            let _ = ctl.task.await;
        }
    }

    fn is_current(&self, key: &ChildKey, generation: u64) -> bool {
        self.children
            .get(key)
            .is_some_and(|c| c.generation == generation)
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Ready(key, generation) if self.is_current(&key, generation) => match key {
                ChildKey::Server(pod) => {
                    if let Some(i) = self.pod_index(&pod) {
                        self.state.pods[i].listening = true;
                        info!(pod = %pod, "test server listening");
                        self.write_rendered();
                    }
                }
                ChildKey::Proxy(node) => {
                    if let Some(n) = self.state.nodes.iter_mut().find(|n| n.name == node) {
                        n.proxy_ready = true;
                        info!(node = %node, "node agent ready");
                        self.save();
                    }
                }
                ChildKey::Ingress => {}
            },
            Event::Exited(key, generation, how) if self.is_current(&key, generation) => {
                self.children.remove(&key);
                match key {
                    ChildKey::Server(pod) => {
                        if let Some(i) = self.pod_index(&pod) {
                            let st = &mut self.state.pods[i];
                            st.server = None;
                            st.listening = false;
                            error!(pod = %pod, log = ?st.log, "test server exited ({how})");
                            self.write_rendered();
                        }
                    }
                    ChildKey::Ingress => {
                        let log = self.paths.ingress_log();
                        error!(log = %log.display(), "the ingress controller exited ({how})");
                        if let Some(i) = &mut self.state.ingress {
                            i.proc = None;
                        }
                        self.save();
                    }
                    ChildKey::Proxy(node) => {
                        let log = self.paths.proxy_log(&node);
                        if let Some(n) = self.state.nodes.iter_mut().find(|n| n.name == node) {
                            n.proxy = None;
                            n.proxy_ready = false;
                        }
                        self.fail(
                            format!(
                                "the node agent of {node} exited ({how}); see {}",
                                log.display()
                            ),
                            Some(log),
                        );
                    }
                }
            }
            _ => {} // from a child that was stopped or replaced meanwhile
        }
    }

    /// Renders the cluster and writes what changed (temp file + rename), removing what went.
    fn write_rendered(&mut self) {
        let rendered = render::render(&self.snapshot, &self.state, &mut self.alloc);
        for object in &rendered.unrendered {
            if self.unrendered_warned.insert(object.clone()) {
                warn!(object = %object, "the lab cannot render this kind yet; the node agents will not see it");
            }
        }
        let problems: Vec<String> = rendered.problems.iter().map(|p| p.to_string()).collect();
        for problem in &problems {
            if self.unrendered_warned.insert(problem.clone()) {
                warn!("{problem}");
            }
        }
        self.state.render_problems = problems;
        let dir = self.paths.cluster();
        for (file, bytes) in &rendered.files {
            if self.written.get(file) != Some(bytes)
                && let Err(e) = state::write_atomic(&dir.join(file), bytes)
            {
                error!("{e:#}");
            }
        }
        for file in self.written.keys() {
            if !rendered.files.contains_key(file) {
                let _ = fs::remove_file(dir.join(file));
            }
        }
        self.written = rendered.files;
        for pod in &mut self.state.pods {
            let key = ObjectKey::new(pod.namespace.clone(), pod.name.clone());
            pod.ready = rendered.pod_ready.get(&key).copied().unwrap_or(false);
        }
        self.state.services = rendered.services;
        self.save();
        self.ensure_ingress();
    }

    /// Starts `sluice-ingress` on the first node once the node agents run and the manifests
    /// have an Ingress (it reads the rendered cluster, so it follows every change itself).
    fn ensure_ingress(&mut self) {
        if self.proxies_started.is_none()
            || self.state.ingress.is_some()
            || self.snapshot.ingresses.is_empty()
        {
            return;
        }
        let Some(node) = self.state.nodes.first().cloned() else {
            return;
        };
        let bin = self.opts.sluice.with_file_name(INGRESS_BIN);
        let log = self.paths.ingress_log();
        if !bin.is_file() {
            warn!(bin = %bin.display(), "the manifests have Ingresses but there is no {INGRESS_BIN} next to sluice; no ingress controller (build it: cargo build -p sluice-ingress)");
            self.state.ingress = Some(IngressState {
                node: node.name,
                proc: None,
                log,
            });
            self.save();
            return;
        }
        let cgroup = node.cgroup.join(names::INGRESS_CGROUP_DIR);
        if let Err(e) = crate::cgroup::create(&cgroup) {
            error!("creating the ingress controller's cgroup: {e:#}");
            return;
        }
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--manifests")
            .arg(self.paths.cluster())
            .args(["--http-listen", "0.0.0.0:80"])
            .args(["--https-listen", "0.0.0.0:443"])
            .args(["--metrics-listen", "0.0.0.0:10254"])
            .args(["--settle-ms", "20"])
            // The node it runs on is where Ingresses are reached, as with ingress-nginx on
            // host networking reporting its node's address.
            .arg("--publish-status-address")
            .arg(
                std::iter::once(node.ip.to_string())
                    .chain(node.ip6.map(|ip| ip.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg("--status-file")
            .arg(self.paths.ingress_status())
            .env("NO_COLOR", "1");
        let placement = Placement::new(netns::path(&node.netns), cgroup);
        let generation = self.next_generation();
        match spawn_child(cmd, &placement, &log, false) {
            Ok((child, proc)) => {
                info!(node = %node.name, pid = ?proc.map(|p| p.pid), "ingress controller started");
                let ctl = watch(
                    child,
                    ChildKey::Ingress,
                    generation,
                    ReadyCheck::Started,
                    self.events_tx.clone(),
                );
                self.children.insert(ChildKey::Ingress, ctl);
                self.state.ingress = Some(IngressState {
                    node: node.name,
                    proc,
                    log,
                });
                self.save();
            }
            Err(e) => error!("starting the ingress controller: {e:#}"),
        }
    }

    /// Stops everything this supervisor started and removes everything it made (its own cgroup
    /// and the state file stay for `down`).
    async fn teardown(&mut self) {
        self.state.phase = Phase::Stopping;
        self.save();
        // Node agents first, then the servers: all at once.
        let keys: Vec<ChildKey> = self.children.keys().cloned().collect();
        let (proxies, servers): (Vec<ChildKey>, Vec<ChildKey>) = keys
            .into_iter()
            .partition(|k| matches!(k, ChildKey::Proxy(_)));
        for (group, grace) in [(proxies, PROXY_GRACE), (servers, SERVER_GRACE)] {
            let mut tasks = Vec::new();
            for key in group {
                if let Some(ctl) = self.children.remove(&key) {
                    let _ = ctl.stop.send(grace);
                    tasks.push(ctl.task);
                }
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        for pod in std::mem::take(&mut self.state.pods) {
            teardown_pod_net(&self.state, &pod);
        }
        for node in std::mem::take(&mut self.state.nodes) {
            if let Err(e) = crate::cgroup::destroy(&node.cgroup) {
                error!(node = %node.name, "{e:#}");
            }
            if let Err(e) = netns::delete(&node.netns) {
                error!(node = %node.name, "{e:#}");
            }
        }
        if let Some(x) = self.state.external.take() {
            if let Err(e) = crate::cgroup::destroy(&x.cgroup) {
                error!("external client: {e:#}");
            }
            if let Err(e) = netns::delete(&x.netns) {
                error!("external client: {e:#}");
            }
        }
        if let Some(u) = self.state.underlay.take()
            && let Err(e) = netns::delete(&u.netns)
        {
            error!("underlay: {e:#}");
        }
        // The node agents stopped without detaching (their programs are pinned, as for a
        // restart): removing the pins detaches what is left.
        if let Err(e) = crate::cleanup::remove_pins(&self.opts.name) {
            error!("{e:#}");
        }
        let _ = fs::remove_dir_all(self.paths.cluster());
        let _ = fs::remove_dir_all(self.paths.ready());
        self.state.services.clear();
        self.save();
        info!("lab down");
    }
}

/// A host on the underlay as seen by the routes others have to it: its addresses and pod
/// CIDRs of each family (None: not routed, e.g. the external client has no pod CIDR).
#[derive(Clone, Copy, Debug)]
struct Peer {
    ip: Ipv4Addr,
    pod_cidr: Option<Ipv4Net>,
    ip6: Option<Ipv6Addr>,
    pod_cidr6: Option<Ipv6Net>,
}

impl Peer {
    fn node(n: &NodeState) -> Peer {
        Peer {
            ip: n.ip,
            pod_cidr: Some(n.pod_cidr),
            ip6: n.ip6,
            pod_cidr6: n.pod_cidr6,
        }
    }

    fn external(x: &ExternalState) -> Peer {
        Peer {
            ip: x.ip,
            pod_cidr: None,
            ip6: x.ip6,
            pod_cidr6: None,
        }
    }

    /// The commands with which `self` reaches `to` through `dev` ([`addr::peer_routes`]), for
    /// each family both have.
    fn routes_to(&self, to: &Peer, dev: &str) -> Vec<String> {
        let mut cmds = addr::peer_routes(
            self.ip.into(),
            to.ip.into(),
            to.pod_cidr.map(IpNet::V4),
            dev,
        );
        if let (Some(me), Some(peer)) = (self.ip6, to.ip6) {
            cmds.extend(addr::peer_routes(
                me.into(),
                peer.into(),
                to.pod_cidr6.map(IpNet::V6),
                dev,
            ));
        }
        cmds
    }

    /// The commands undoing [`Peer::routes_to`].
    fn unroutes_to(&self, to: &Peer, dev: &str) -> Vec<String> {
        let mut cmds = addr::peer_unroutes(
            self.ip.into(),
            to.ip.into(),
            to.pod_cidr.map(IpNet::V4),
            dev,
        );
        if let (Some(me), Some(peer)) = (self.ip6, to.ip6) {
            cmds.extend(addr::peer_unroutes(
                me.into(),
                peer.into(),
                to.pod_cidr6.map(IpNet::V6),
                dev,
            ));
        }
        cmds
    }
}

/// A pod's gateway for a route of this family.
fn gateway_of(route: &IpNet) -> IpAddr {
    match route {
        IpNet::V4(_) => IpAddr::V4(POD_GATEWAY),
        IpNet::V6(_) => IpAddr::V6(POD_GATEWAY6),
    }
}

/// Restart requests are files `restart-proxy.<node>` here; the content says how to stop the
/// running agent: `KILL` (default) or `TERM`.
fn requests_dir(paths: &LabPaths) -> PathBuf {
    paths.dir.join("requests")
}

const RESTART_PREFIX: &str = "restart-proxy.";

/// Asks the supervisor of the lab at `paths` to restart the node agent of `node` (SIGKILL when
/// `kill`, else SIGTERM): it is stopped and started again with the same arguments, within a
/// tick (200 ms). Wait for `NodeState::proxy` to change and `proxy_ready` to hold.
pub fn request_proxy_restart(paths: &LabPaths, node: &str, kill: bool) -> Result<()> {
    let dir = requests_dir(paths);
    ensure_dir(&dir)?;
    let file = dir.join(format!("{RESTART_PREFIX}{node}"));
    state::write_atomic(&file, if kill { b"KILL" } else { b"TERM" })
}

fn pending_pod(key: &ObjectKey, ports: Vec<crate::state::PortSpec>) -> PodState {
    PodState {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        phase: PodPhase::Pending,
        node: None,
        netns: None,
        cgroup: None,
        ip: None,
        ip6: None,
        host_veth: None,
        ports,
        server: None,
        listening: false,
        ready: false,
        log: None,
    }
}

/// Removes a pod's cgroup (killing whatever still runs there, e.g. `exec` sessions), its veth
/// and its netns.
fn teardown_pod_net(state: &LabState, pod: &PodState) {
    if let Some(cg) = &pod.cgroup
        && let Err(e) = crate::cgroup::destroy(cg)
    {
        error!(pod = %pod.key(), "{e:#}");
    }
    if let (Some(veth), Some(node)) = (
        &pod.host_veth,
        pod.node.as_deref().and_then(|n| state.node(n)),
    ) && netns::exists(&node.netns)
    {
        let _ = netns::ip(&["-n", &node.netns, "link", "del", veth]);
    }
    if let Some(ns) = &pod.netns
        && let Err(e) = netns::delete(ns)
    {
        error!(pod = %pod.key(), "{e:#}");
    }
}

/// Spawns `cmd` placed in a netns and cgroup, stderr (and stdout unless piped) to `log`.
fn spawn_child(
    mut cmd: std::process::Command,
    placement: &Placement,
    log: &Path,
    pipe_stdout: bool,
) -> Result<(Child, Option<ProcRef>)> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stderr(file.try_clone().context("duplicating the log file")?);
    if pipe_stdout {
        cmd.stdout(Stdio::piped());
    } else {
        cmd.stdout(file);
    }
    let prepared = placement.prepare()?;
    prepared.apply(&mut cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    let child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    drop(prepared);
    let proc = child.id().and_then(ProcRef::of);
    Ok((child, proc))
}

/// Watches a child: reports readiness and exit; on request stops it (SIGTERM, then SIGKILL
/// after the grace period).
fn watch(
    mut child: Child,
    key: ChildKey,
    generation: u64,
    ready: ReadyCheck,
    events: mpsc::UnboundedSender<Event>,
) -> ChildCtl {
    let (stop_tx, mut stop_rx) = oneshot::channel::<Duration>();
    let task = tokio::spawn(async move {
        let mut ready_fut: Pin<Box<dyn Future<Output = bool> + Send>> = match ready {
            ReadyCheck::Stdout(stdout) => Box::pin(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.trim() == READY_LINE {
                        return true;
                    }
                }
                false
            }),
            ReadyCheck::File(path) => Box::pin(async move {
                loop {
                    if path.exists() {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }),
            ReadyCheck::Started => Box::pin(async { true }),
        };
        let mut ready_seen = false;
        loop {
            tokio::select! {
                status = child.wait() => {
                    let how = match status {
                        Ok(s) => s.to_string(),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    let _ = events.send(Event::Exited(key, generation, how));
                    return;
                }
                grace = &mut stop_rx => {
                    let grace = grace.unwrap_or(SERVER_GRACE);
                    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                        // SAFETY: kill(2) has no memory-safety preconditions; the child is not
                        // yet reaped (we own it), so the PID is still its.
                        unsafe { libc::kill(pid, libc::SIGTERM) };
                    }
                    if tokio::time::timeout(grace, child.wait()).await.is_err() {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                    return;
                }
                ok = &mut ready_fut, if !ready_seen => {
                    ready_seen = true;
                    if ok {
                        let _ = events.send(Event::Ready(key.clone(), generation));
                    }
                }
            }
        }
    });
    ChildCtl {
        generation,
        stop: stop_tx,
        task,
    }
}
