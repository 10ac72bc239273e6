//! The lab as a library: bring one up, use it, take it down ([`Lab`] does so on drop).

use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cluster_model::{ManifestSource, Problem};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::addr::{DEFAULT_SERVICE_CIDR, DEFAULT_SERVICE_CIDR6, Protocol, TargetSpec};
use crate::cleanup::{self, Removed, lab_cgroup, tail};
use crate::client::{Ask, LoadReport, ProbeResult};
use crate::names;
use crate::netns;
use crate::spawn::{Placement, Prepared};
use crate::state::{self, ExternalState, LabPaths, LabState, NodeState, Phase, PodPhase, PodState};
use crate::status::LabStatus;

/// File name of the CLI binary.
pub const SLUICE_BIN: &str = "sluice";
/// File name of the node agent binary.
pub const PROXY_BIN: &str = "sluice-proxy";
/// Environment variable naming the node agent binary (overrides the one next to `sluice`).
pub const PROXY_BIN_ENV: &str = "SLUICE_PROXY_BIN";
/// Default time a probe waits.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether and which node agent (`sluice-proxy`) runs on each node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// `$SLUICE_PROXY_BIN`, else `sluice-proxy` in the binary directory; an error if missing.
    Required,
    /// As [`ProxyMode::Required`], but run without node agents if there is none.
    IfPresent,
    /// No node agents (pod-to-pod traffic only).
    Off,
    /// This binary.
    Binary(PathBuf),
}

/// How to bring a lab up.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Lab name: 1-24 of `a-z0-9-`; namespaces are `sl-NAME-…`.
    pub name: String,
    pub manifests_dir: PathBuf,
    pub service_cidr: Ipv4Net,
    /// The IPv6 service CIDR: with it (the default) the lab is dual-stack, every node, pod
    /// and the external client get an IPv6 address too; None makes it IPv4-only.
    pub service_cidr6: Option<Ipv6Net>,
    /// Where `sluice` and `sluice-proxy` are (default: the directory of this executable).
    pub bin_dir: Option<PathBuf>,
    /// The `sluice` binary, if not `bin_dir/sluice`.
    pub sluice_bin: Option<PathBuf>,
    pub proxy: ProxyMode,
    /// How long node agents get to write their ready file.
    pub ready_timeout: Duration,
}

impl LabOptions {
    pub fn new(name: impl Into<String>, manifests_dir: impl Into<PathBuf>) -> Self {
        LabOptions {
            name: name.into(),
            manifests_dir: manifests_dir.into(),
            service_cidr: DEFAULT_SERVICE_CIDR,
            service_cidr6: Some(DEFAULT_SERVICE_CIDR6),
            bin_dir: None,
            sluice_bin: None,
            proxy: ProxyMode::Required,
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// A running lab. Dropping a lab brought up by [`Lab::up`] takes it down (also when a test
/// panics); [`Lab::open`] attaches to a running lab without taking ownership.
#[derive(Debug)]
pub struct Lab {
    name: String,
    paths: LabPaths,
    sluice: PathBuf,
    cgroup_root: PathBuf,
    supervisor: Option<Child>,
    down_on_drop: bool,
    problems: Vec<Problem>,
    cleaned: Removed,
}

/// The directory of the running executable.
fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("executable has no directory"))
}

/// The `sluice` binary: the running executable if it is `sluice`, else `sluice` next to it.
pub fn default_sluice_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    if exe.file_name().is_some_and(|n| n == SLUICE_BIN) {
        return Ok(exe);
    }
    Ok(exe_dir()?.join(SLUICE_BIN))
}

fn resolve_proxy(mode: &ProxyMode, bin_dir: &Path) -> Result<Option<PathBuf>> {
    let default = || {
        std::env::var_os(PROXY_BIN_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| bin_dir.join(PROXY_BIN))
    };
    match mode {
        ProxyMode::Off => Ok(None),
        ProxyMode::Binary(p) => {
            if !p.is_file() {
                bail!("node agent binary {} not found", p.display());
            }
            Ok(Some(p.clone()))
        }
        ProxyMode::IfPresent => Ok(Some(default()).filter(|p| p.is_file())),
        ProxyMode::Required => {
            let p = default();
            if !p.is_file() {
                bail!(
                    "the node agent {} was not found: build it (cargo build -p proxy-daemon), name it \
                     with --proxy-bin PATH or ${PROXY_BIN_ENV}, or run the lab without node agents (--no-proxy)",
                    p.display()
                );
            }
            Ok(Some(p))
        }
    }
}

/// Reads a manifest directory once and returns its problems (what `up` prints).
pub fn check_manifests(dir: &Path) -> Vec<Problem> {
    ManifestSource::new(dir).reload().new_problems
}

impl Lab {
    /// Brings a lab up: preflight, cleans what a crashed run of the same lab left, starts the
    /// supervisor (detached, in the lab's cgroup) and waits until every node agent is ready.
    /// On failure the lab is taken down again and the error carries the relevant log's tail.
    pub fn up(opts: LabOptions) -> Result<Lab> {
        names::validate_lab_name(&opts.name)?;
        let cgroup_root = crate::preflight::check()?;
        let manifests = opts.manifests_dir.canonicalize().with_context(|| {
            format!(
                "manifest directory {} not found",
                opts.manifests_dir.display()
            )
        })?;
        if !manifests.is_dir() {
            bail!("{} is not a directory", manifests.display());
        }
        let bin_dir = match &opts.bin_dir {
            Some(d) => d.clone(),
            None => exe_dir()?,
        };
        let sluice = match &opts.sluice_bin {
            Some(p) => p.clone(),
            None if opts.bin_dir.is_some() => bin_dir.join(SLUICE_BIN),
            None => default_sluice_bin()?,
        };
        if !sluice.is_file() {
            bail!(
                "the sluice binary {} was not found (build it: cargo build -p sluice-cli)",
                sluice.display()
            );
        }
        let proxy = resolve_proxy(&opts.proxy, &bin_dir)?;
        let name = opts.name.clone();
        if let Some(sup) = cleanup::running_supervisor(&name) {
            bail!(
                "lab {name} is already up (supervisor PID {}); take it down first: sluice lab down --name {name}",
                sup.pid
            );
        }

        // Whatever a crashed run left behind.
        let paths = LabPaths::new(&name);
        let old = state::load(&paths.state()).unwrap_or(None);
        let mut cleaned = Removed::default();
        cleanup::leftovers(&name, old.as_ref(), &cgroup_root, &mut cleaned)?;

        let problems = check_manifests(&manifests);

        let cgroup = lab_cgroup(&cgroup_root, &name);
        let sup_cgroup = cgroup.join(names::SUPERVISOR_CGROUP_DIR);
        crate::cgroup::create(&sup_cgroup)?;
        fs::create_dir_all(paths.logs())
            .with_context(|| format!("creating {}", paths.logs().display()))?;
        let initial = LabState {
            version: state::STATE_VERSION,
            name: name.clone(),
            manifests_dir: manifests.clone(),
            service_cidr: opts.service_cidr,
            service_cidr6: opts.service_cidr6,
            cgroup: cgroup.clone(),
            netns_prefix: format!("{}{name}-", names::NETNS_PREFIX),
            proxy: proxy.clone(),
            phase: Phase::Starting,
            error: None,
            error_log: None,
            supervisor: None,
            underlay: None,
            external: None,
            nodes: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            ingress: None,
            render_problems: Vec::new(),
        };
        state::save(&paths.state(), &initial)?;

        let log = File::options()
            .create(true)
            .append(true)
            .open(paths.supervisor_log())
            .with_context(|| format!("opening {}", paths.supervisor_log().display()))?;
        let mut cmd = Command::new(&sluice);
        cmd.args(["lab", "supervise", "--name", &name, "--manifests"])
            .arg(&manifests)
            .args(["--service-cidr", &opts.service_cidr.to_string()])
            .args([
                "--ready-timeout-ms",
                &opts.ready_timeout.as_millis().to_string(),
            ]);
        if let Some(cidr6) = opts.service_cidr6 {
            cmd.args(["--service-cidr6", &cidr6.to_string()]);
        }
        if let Some(p) = &proxy {
            cmd.arg("--proxy-bin").arg(p);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let placement = Placement {
            netns: None,
            cgroup: Some(sup_cgroup),
            new_session: true,
        };
        let prepared = placement.prepare()?;
        prepared.apply(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", sluice.display()));
        drop(prepared);
        let mut lab = Lab {
            name,
            paths,
            sluice,
            cgroup_root,
            supervisor: None,
            down_on_drop: true,
            problems,
            cleaned,
        };
        match child {
            Ok(c) => lab.supervisor = Some(c),
            Err(e) => return Err(e), // dropping `lab` cleans up
        }
        // The supervisor waits up to ready_timeout for the agents after up to 15 s for servers.
        let deadline = opts.ready_timeout + Duration::from_secs(30);
        lab.wait_up(deadline)?;
        Ok(lab)
    }

    fn wait_up(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = &mut self.supervisor
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the lab supervisor exited ({status}) before the lab was ready\n--- {} ---\n{}",
                    self.paths.supervisor_log().display(),
                    tail(&self.paths.supervisor_log(), 30)
                );
            }
            let st = self.state()?;
            match st.phase {
                Phase::Ready => return Ok(()),
                Phase::Failed => {
                    let mut msg = format!(
                        "lab {} failed to start: {}",
                        self.name,
                        st.error.unwrap_or_default()
                    );
                    let log = st.error_log.unwrap_or_else(|| self.paths.supervisor_log());
                    msg.push_str(&format!(
                        "\n--- {} (last lines) ---\n{}",
                        log.display(),
                        tail(&log, 30)
                    ));
                    bail!(msg);
                }
                Phase::Starting | Phase::Stopping => {}
            }
            if Instant::now() >= deadline {
                let mut msg = format!(
                    "lab {} was not ready within {} s",
                    self.name,
                    timeout.as_secs()
                );
                let waiting: Vec<_> = st
                    .nodes
                    .iter()
                    .filter(|n| st.proxy.is_some() && !n.proxy_ready)
                    .collect();
                for n in &waiting {
                    let log = self.paths.proxy_log(&n.name);
                    msg.push_str(&format!(
                        "\nnode agent of {} not ready\n--- {} (last lines) ---\n{}",
                        n.name,
                        log.display(),
                        tail(&log, 30)
                    ));
                }
                if waiting.is_empty() {
                    let log = self.paths.supervisor_log();
                    msg.push_str(&format!(
                        "\n--- {} (last lines) ---\n{}",
                        log.display(),
                        tail(&log, 30)
                    ));
                }
                bail!(msg);
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Attaches to a running lab (dropping the handle leaves it running).
    pub fn open(name: &str) -> Result<Lab> {
        names::validate_lab_name(name)?;
        let paths = LabPaths::new(name);
        if state::load(&paths.state())?.is_none() {
            bail!("lab {name} is not up (no {})", paths.state().display());
        }
        Ok(Lab {
            name: name.to_string(),
            paths,
            sluice: default_sluice_bin()?,
            cgroup_root: crate::cgroup::cgroup2_root().unwrap_or_default(),
            supervisor: None,
            down_on_drop: false,
            problems: Vec::new(),
            cleaned: Removed::default(),
        })
    }

    /// Uses this `sluice` binary for probes and loads.
    pub fn with_sluice_bin(mut self, sluice: impl Into<PathBuf>) -> Self {
        self.sluice = sluice.into();
        self
    }

    /// Leaves the lab running when this handle is dropped.
    pub fn keep(mut self) -> Self {
        self.down_on_drop = false;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn paths(&self) -> &LabPaths {
        &self.paths
    }

    /// Problems in the manifest directory when the lab came up.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// What `up` removed of a crashed earlier run.
    pub fn cleaned(&self) -> &Removed {
        &self.cleaned
    }

    /// The recorded state.
    pub fn state(&self) -> Result<LabState> {
        state::load(&self.paths.state())?.ok_or_else(|| anyhow!("lab {} is not up", self.name))
    }

    pub fn status(&self) -> Result<LabStatus> {
        Ok(LabStatus::of(&self.state()?, &self.paths))
    }

    /// A running pod ("name" or "ns/name").
    pub fn pod(&self, pod: &str) -> Result<PodState> {
        let st = self.state()?;
        let p = st.find_pod(pod)?;
        if p.phase != PodPhase::Running {
            bail!("pod {} is Pending (its node does not exist)", p.key());
        }
        Ok(p.clone())
    }

    pub fn pod_ip(&self, pod: &str) -> Result<Ipv4Addr> {
        self.pod(pod)?
            .ip
            .ok_or_else(|| anyhow!("pod {pod} has no IP"))
    }

    /// A running pod's IPv6 address (an error in a lab without IPv6).
    pub fn pod_ip6(&self, pod: &str) -> Result<Ipv6Addr> {
        self.pod(pod)?
            .ip6
            .ok_or_else(|| anyhow!("pod {pod} has no IPv6 address (is the lab IPv4-only?)"))
    }

    /// A node.
    pub fn node(&self, node: &str) -> Result<NodeState> {
        let st = self.state()?;
        st.node(node)
            .cloned()
            .ok_or_else(|| anyhow!("no node {node:?} in lab {}", self.name))
    }

    /// A node's address (on its uplink, `eth0` in its netns).
    pub fn node_ip(&self, node: &str) -> Result<Ipv4Addr> {
        Ok(self.node(node)?.ip)
    }

    /// A node's IPv6 address (next to its IPv4 one on its uplink).
    pub fn node_ip6(&self, node: &str) -> Result<Ipv6Addr> {
        self.node(node)?
            .ip6
            .ok_or_else(|| anyhow!("node {node} has no IPv6 address (is the lab IPv4-only?)"))
    }

    /// The external client (probe and exec it as [`names::EXTERNAL`]).
    pub fn external(&self) -> Result<ExternalState> {
        external_of(&self.state()?)
    }

    /// Where commands "in" `who` run: the external client for [`names::EXTERNAL`], else a
    /// running pod ("name" or "ns/name"): its netns and cgroup.
    pub fn placement_of(&self, who: &str) -> Result<Placement> {
        if who == names::EXTERNAL {
            let x = self.external()?;
            return Ok(Placement::new(netns::path(&x.netns), x.cgroup));
        }
        let p = self.pod(who)?;
        let (Some(ns), Some(cg)) = (&p.netns, &p.cgroup) else {
            bail!("pod {} has no netns", p.key())
        };
        Ok(Placement::new(netns::path(ns), cg))
    }

    /// Waits until `pred` holds for the state (polling), e.g. for a pod added to the manifests.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&LabState) -> bool,
    ) -> Result<LabState> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.state()?;
            if pred(&st) {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {} s waiting for {what}", timeout.as_secs());
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// A TCP connection from a pod's network namespace (or the external client's, for
    /// [`names::EXTERNAL`]) to `to`, held by this process: for checking what happens to an
    /// established connection when something changes. It is made outside the pod's cgroup, so
    /// the socket programs do not translate it: give a pod's address, or from the external
    /// client a node's (NodePort, translated per packet).
    pub fn connect_tcp(
        &self,
        pod: &str,
        to: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<TcpStream> {
        let to = to.into();
        if pod == names::EXTERNAL {
            return netns::connect_tcp(&self.external()?.netns, to, timeout);
        }
        let p = self.pod(pod)?;
        let ns = p
            .netns
            .as_ref()
            .ok_or_else(|| anyhow!("pod {} has no netns", p.key()))?;
        netns::connect_tcp(ns, to, timeout)
    }

    /// Waits until every node agent enforces the NetworkPolicy of the manifest directory as it
    /// is now (policies, pod and namespace labels, every local pod's interface); returns how long
    /// that took. Call it after changing the manifests, before probing.
    pub fn wait_policy_enforced(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        // Kept across polls: a source re-parses only the files that changed.
        let mut manifests_source = ManifestSource::new(&self.state()?.manifests_dir);
        let mut rendered_source = ManifestSource::new(self.paths.cluster());
        loop {
            let state = self.state()?;
            let manifests = manifests_source.reload().snapshot;
            let rendered = rendered_source.reload().snapshot;
            let why = crate::policy_status::not_enforced_because(
                &state,
                &self.paths,
                &manifests,
                &rendered,
            )?;
            let Some(why) = why else {
                return Ok(started.elapsed());
            };
            if started.elapsed() >= timeout {
                bail!(
                    "policy not enforced after {} s: {why}",
                    timeout.as_secs_f64()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a pod runs and is Ready.
    pub fn wait_pod_ready(&self, pod: &str, timeout: Duration) -> Result<PodState> {
        let st = self.wait_for(&format!("pod {pod} to be ready"), timeout, |st| {
            st.find_pod(pod)
                .is_ok_and(|p| p.phase == PodPhase::Running && p.listening)
        })?;
        Ok(st.find_pod(pod)?.clone())
    }

    /// The address a target names: an IP address, a pod ("name" or "ns/name": its IPv4
    /// address) or a Service ("name" or "ns/name": its primary cluster IP).
    pub fn resolve(&self, target: &TargetSpec) -> Result<SocketAddr> {
        resolve_in(&self.state()?, target)
    }

    /// A command that will run inside a pod (its netns and cgroup), or in the external client
    /// when `pod` is [`names::EXTERNAL`].
    pub fn command(&self, pod: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<PodCommand> {
        crate::preflight::require_root()?;
        let prepared = self.placement_of(pod)?.prepare()?;
        let mut cmd = Command::new(program);
        prepared.apply(&mut cmd);
        Ok(PodCommand {
            cmd,
            _prepared: prepared,
        })
    }

    /// Runs `argv` in a pod with inherited stdio; returns its exit code (128+N if killed by
    /// signal N).
    pub fn exec(&self, pod: &str, argv: &[impl AsRef<std::ffi::OsStr>]) -> Result<i32> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("no command given"))?;
        let mut cmd = self.command(pod, program)?;
        cmd.args(args);
        let status = cmd
            .status()
            .with_context(|| format!("running {:?}", program.as_ref()))?;
        Ok(exit_code(status))
    }

    /// Runs `argv` in a pod and captures its output.
    pub fn exec_output(&self, pod: &str, argv: &[impl AsRef<std::ffi::OsStr>]) -> Result<Output> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("no command given"))?;
        let mut cmd = self.command(pod, program)?;
        cmd.args(args).stdin(Stdio::null());
        cmd.output()
            .with_context(|| format!("running {:?}", program.as_ref()))
    }

    /// Probes `host_port` ("10.96.0.10:80", "web-1:8080", "web:80") from a pod.
    pub fn probe(&self, pod: &str, host_port: &str, protocol: Protocol) -> Result<ProbeResult> {
        let target = with_protocol(host_port, protocol)?;
        self.probe_target(pod, &target, DEFAULT_PROBE_TIMEOUT)
    }

    pub fn probe_target(
        &self,
        pod: &str,
        target: &TargetSpec,
        timeout: Duration,
    ) -> Result<ProbeResult> {
        self.probe_asking(pod, target, Ask::Hostname, timeout)
    }

    /// Probes asking the server `ask` (e.g. [`Ask::ClientIp`]: the address it saw).
    pub fn probe_asking(
        &self,
        pod: &str,
        target: &TargetSpec,
        ask: Ask,
        timeout: Duration,
    ) -> Result<ProbeResult> {
        let addr = self.resolve(target)?;
        let out = self.client(pod, ClientRun::Probe(ask), addr, target.protocol, timeout)?;
        parse_client_output(&out)
    }

    /// `count` sequential connections (or datagrams) from one process in a pod.
    pub fn load(
        &self,
        pod: &str,
        host_port: &str,
        protocol: Protocol,
        count: u64,
    ) -> Result<LoadReport> {
        let target = with_protocol(host_port, protocol)?;
        self.load_target(pod, &target, count, DEFAULT_PROBE_TIMEOUT)
    }

    pub fn load_target(
        &self,
        pod: &str,
        target: &TargetSpec,
        count: u64,
        timeout: Duration,
    ) -> Result<LoadReport> {
        let addr = self.resolve(target)?;
        let out = self.client(pod, ClientRun::Load(count), addr, target.protocol, timeout)?;
        parse_client_output(&out)
    }

    fn client(
        &self,
        pod: &str,
        run: ClientRun,
        addr: SocketAddr,
        protocol: Protocol,
        timeout: Duration,
    ) -> Result<Output> {
        let mut cmd = self.command(pod, &self.sluice)?;
        let mode = match run {
            ClientRun::Probe(_) => "probe",
            ClientRun::Load(_) => "load",
        };
        cmd.args(["lab", "client", mode, &addr.to_string()])
            .args(["--protocol", &protocol.to_string()])
            .args(["--timeout-ms", &timeout.as_millis().to_string()]);
        match run {
            ClientRun::Probe(ask) => cmd.args(["--ask", ask.as_str()]),
            ClientRun::Load(n) => cmd.args(["--count", &n.to_string()]),
        };
        cmd.stdin(Stdio::null());
        cmd.output()
            .with_context(|| format!("running {} in pod {pod}", self.sluice.display()))
    }

    /// Takes the lab down now.
    pub fn down(mut self) -> Result<Removed> {
        self.down_on_drop = false;
        self.take_down()
    }

    fn take_down(&mut self) -> Result<Removed> {
        let removed = cleanup::down(&self.name, &self.cgroup_root);
        if let Some(mut child) = self.supervisor.take() {
            // Reap our child (it has exited or been killed by now).
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        removed
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down_on_drop {
            return;
        }
        if std::thread::panicking() {
            // Show what the lab logged: the test failed, and the logs go with the lab.
            eprintln!("--- lab {} logs (the test failed) ---", self.name);
            if let Ok(entries) = fs::read_dir(self.paths.logs()) {
                let mut logs: Vec<PathBuf> =
                    entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
                logs.sort();
                for log in logs {
                    eprintln!("--- {} ---\n{}", log.display(), tail(&log, 20));
                }
            }
        }
        if let Err(e) = self.take_down() {
            eprintln!("taking lab {} down: {e:#}", self.name);
        }
    }
}

enum ClientRun {
    Probe(Ask),
    Load(u64),
}

/// A [`Command`] that runs in a pod; it keeps the netns and cgroup files open until spawned.
#[derive(Debug)]
pub struct PodCommand {
    cmd: Command,
    _prepared: Prepared,
}

impl std::ops::Deref for PodCommand {
    type Target = Command;
    fn deref(&self) -> &Command {
        &self.cmd
    }
}

impl std::ops::DerefMut for PodCommand {
    fn deref_mut(&mut self) -> &mut Command {
        &mut self.cmd
    }
}

/// The exit code a shell would report.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn with_protocol(host_port: &str, protocol: Protocol) -> Result<TargetSpec> {
    let mut t: TargetSpec = host_port.parse()?;
    t.protocol = protocol;
    Ok(t)
}

fn parse_client_output<T: serde::de::DeserializeOwned>(out: &Output) -> Result<T> {
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the in-pod client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

fn external_of(state: &LabState) -> Result<ExternalState> {
    state.external.clone().ok_or_else(|| {
        anyhow!(
            "lab {} has no external client (it was brought up by an older sluice)",
            state.name
        )
    })
}

/// Resolves a target against a lab's state: an IP address; [`names::EXTERNAL`] (the external
/// client); a pod ("name" or "ns/name": its IPv4 address); a Service ("name" or "ns/name": its
/// primary cluster IP); a node (its IPv4 address), in that order. IPv6 addresses of pods and
/// nodes are named literally (`sluice lab status` shows them).
pub fn resolve_in(state: &LabState, target: &TargetSpec) -> Result<SocketAddr> {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, target.port));
    }
    let at = |ip: Ipv4Addr| SocketAddr::new(IpAddr::V4(ip), target.port);
    if target.host == names::EXTERNAL {
        return Ok(at(external_of(state)?.ip));
    }
    let pods: Vec<&PodState> = state
        .pods
        .iter()
        .filter(|p| p.matches(&target.host))
        .collect();
    if let [pod] = pods.as_slice() {
        let ip = pod
            .ip
            .ok_or_else(|| anyhow!("pod {} has no IP (Pending)", pod.key()))?;
        return Ok(at(ip));
    }
    if pods.len() > 1 {
        bail!("{:?} names several pods; use ns/name", target.host);
    }
    let services: Vec<_> = state
        .services
        .iter()
        .filter(|s| s.matches(&target.host))
        .collect();
    match services.as_slice() {
        [svc] => {
            let ip = svc.cluster_ip.ok_or_else(|| {
                anyhow!("Service {}/{} has no cluster IP", svc.namespace, svc.name)
            })?;
            Ok(SocketAddr::new(ip, target.port))
        }
        [] => match state.node(&target.host) {
            Some(node) => Ok(at(node.ip)),
            None => bail!(
                "{:?} is neither an IP address nor a pod, Service or node of lab {}",
                target.host,
                state.name
            ),
        },
        _ => bail!("{:?} names several Services; use ns/name", target.host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{STATE_VERSION, ServiceState};

    #[test]
    fn resolves_ips_pods_and_services() {
        let mut st = LabState {
            version: STATE_VERSION,
            name: "t".into(),
            manifests_dir: "/m".into(),
            service_cidr: DEFAULT_SERVICE_CIDR,
            service_cidr6: Some(DEFAULT_SERVICE_CIDR6),
            cgroup: "/c".into(),
            netns_prefix: "sl-t-".into(),
            proxy: None,
            phase: Phase::Ready,
            error: None,
            error_log: None,
            supervisor: None,
            underlay: None,
            external: None,
            nodes: vec![],
            pods: vec![],
            services: vec![ServiceState {
                namespace: "default".into(),
                name: "web".into(),
                type_: "ClusterIP".into(),
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10).into()),
                cluster_ips: vec![],
                ports: vec![],
            }],
            ingress: None,
            render_problems: vec![],
        };
        st.pods.push(PodState {
            namespace: "default".into(),
            name: "web-1".into(),
            phase: PodPhase::Running,
            node: Some("node-1".into()),
            netns: None,
            cgroup: None,
            ip: Some(Ipv4Addr::new(10, 244, 0, 2)),
            ip6: Some("fd00:10:244::2".parse().unwrap()),
            host_veth: None,
            ports: vec![],
            server: None,
            listening: true,
            ready: true,
            log: None,
        });
        let r = |s: &str| resolve_in(&st, &s.parse().unwrap()).map(|a| a.to_string());
        assert!(
            r("external:80").is_err(),
            "no external client in an old lab"
        );
        assert!(r("node-1:30080").is_err());
        st.external = Some(ExternalState {
            netns: "sl-t-x".into(),
            cgroup: "/c/external".into(),
            ip: crate::addr::EXTERNAL_IP,
            ip6: Some(crate::addr::EXTERNAL_IP6),
            ifname: "eth0".into(),
            underlay_port: "ext".into(),
        });
        st.nodes.push(NodeState {
            name: "node-1".into(),
            netns: "sl-t-n.node-1".into(),
            cgroup: "/c/node.node-1".into(),
            pod_cidr: "10.244.0.0/24".parse().unwrap(),
            ip: Ipv4Addr::new(172, 18, 0, 2),
            pod_cidr6: None,
            ip6: None,
            index: 0,
            proxy: None,
            proxy_ready: false,
            proxy_log: None,
            next_veth: 1,
            underlay_port: Some("n0".into()),
        });
        // A pod called "external" is NS/external; bare "external" is the external client.
        st.pods.push(PodState {
            namespace: "default".into(),
            name: "external".into(),
            phase: PodPhase::Running,
            node: Some("node-1".into()),
            netns: None,
            cgroup: None,
            ip: Some(Ipv4Addr::new(10, 244, 0, 9)),
            ip6: None,
            host_veth: None,
            ports: vec![],
            server: None,
            listening: true,
            ready: true,
            log: None,
        });
        let r = |s: &str| resolve_in(&st, &s.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(r("external:80").unwrap(), "172.18.255.254:80");
        assert_eq!(r("default/external:80").unwrap(), "10.244.0.9:80");
        assert_eq!(r("node-1:30080").unwrap(), "172.18.0.2:30080");
        assert_eq!(r("1.2.3.4:5").unwrap(), "1.2.3.4:5");
        assert_eq!(r("web-1:8080").unwrap(), "10.244.0.2:8080");
        assert_eq!(r("default/web-1:8080").unwrap(), "10.244.0.2:8080");
        assert_eq!(r("web:80").unwrap(), "10.96.0.10:80");
        assert_eq!(r("[fd00:10:244::2]:80").unwrap(), "[fd00:10:244::2]:80");
        // An IPv6-only Service resolves to its IPv6 cluster IP.
        st.services[0].cluster_ip = Some("fd00:10:96::a".parse().unwrap());
        let r = |s: &str| resolve_in(&st, &s.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(r("web:80").unwrap(), "[fd00:10:96::a]:80");
        assert!(r("nothing:80").is_err());
    }

    #[test]
    fn proxy_resolution() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve_proxy(&ProxyMode::Off, dir.path()).unwrap(), None);
        assert!(resolve_proxy(&ProxyMode::Binary(dir.path().join("nope")), dir.path()).is_err());
        if std::env::var_os(PROXY_BIN_ENV).is_none() {
            assert_eq!(
                resolve_proxy(&ProxyMode::IfPresent, dir.path()).unwrap(),
                None
            );
            let err = resolve_proxy(&ProxyMode::Required, dir.path())
                .unwrap_err()
                .to_string();
            assert!(err.contains("--no-proxy"), "{err}");
            fs::write(dir.path().join(PROXY_BIN), "").unwrap();
            assert_eq!(
                resolve_proxy(&ProxyMode::IfPresent, dir.path()).unwrap(),
                Some(dir.path().join(PROXY_BIN))
            );
        }
    }
}
