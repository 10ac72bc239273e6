//! NetworkPolicy: what policies cost a new connection, and how fast a policy
//! change reaches new connections.
//!
//! One lab, one node, four pods: `clients/client` connects to
//! `servers/server`; `servers/decoy` and `others/intruder` (labelled like the
//! client, in another namespace) are there for policies to select and for
//! checking that the server really is isolated.
//!
//! 1. **Rate.** The same sequential connect() + HTTP request load from the
//!    client to the server with 0, 100 and 1,000 NetworkPolicies in the
//!    cluster. With any, the server is isolated by one policy allowing the
//!    client and by about half of the others, whose ingress rules (ipBlocks
//!    outside and inside the pod range, with exceptions, port ranges, named
//!    ports, other namespaces' pods) grow the peer-prefix and allow tables
//!    the first packet of each connection is looked up in; the rest select
//!    the decoy, the intruder or no pod. Each round measures the three
//!    configurations in alternating order (0, 100, 1000, then 1000, 100, 0),
//!    switching by rewriting one manifest file and waiting until the agent
//!    enforces it; every round checks that every connection was answered and
//!    that the intruder is dropped (answered without policies). Ratios to
//!    the 0-policy rate are per round.
//! 2. **Change → enforcement.** A policy change (one manifest file written or
//!    removed, atomically) and the time until new connections get the new
//!    verdict. A thread in the client's network namespace starts a new TCP
//!    connection every [`ATTEMPT_INTERVAL`], each waiting up to
//!    [`ATTEMPT_TIMEOUT`] for the handshake; the figure is the start of the
//!    first of [`CONFIRM`] consecutive connections with the new outcome,
//!    minus the time of the change. The resolution is thus the interval,
//!    not the timeout. Next to it: when the agent's status file named the
//!    new state (what [`Lab::wait_policy_enforced`] waits for; polled here
//!    every 2 ms against the digest the agent reported for that state when
//!    `wait_policy_enforced` had settled it before, because that function
//!    re-reads and re-parses the manifests and the rendered cluster on every
//!    poll, about half a second each with 1,000 policies in a debug build,
//!    which would blur the figure and take a core from the agent), and when
//!    the lab had rendered the change for the agent (the part of the figures
//!    that is the lab's: its manifest watch waits for 100 ms of quiet).
//!
//! One change toggles a default-deny with no other policies; the other the
//! policy allowing the client with 999 others in place.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use sluice_lab::{Lab, LabOptions, Outcome, Protocol, ProxyMode, TargetSpec};
use sluice_policy::Direction;

use crate::stats::{Summary, median, micros, summarize_us};

/// The policy counts measured, the first being the baseline.
pub const POLICY_COUNTS: [usize; 3] = [0, 100, 1000];
/// How often the change watcher starts a new connection.
pub const ATTEMPT_INTERVAL: Duration = Duration::from_millis(5);
/// How long one of its connections waits for the handshake before it counts as dropped.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(150);
/// Consecutive connections with the new outcome that make a transition.
pub const CONFIRM: usize = 3;
/// Generous: a debug-built agent compiling 1,000 policies on a busy machine.
const ENFORCE_TIMEOUT: Duration = Duration::from_secs(120);
const TRANSITION_TIMEOUT: Duration = Duration::from_secs(60);
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
const NODE: &str = "node-1";

const CLIENT: &str = "clients/client";
const SERVER: &str = "servers/server";
const INTRUDER: &str = "others/intruder";
const SERVER_PORT: u16 = 80;

const PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: servers, labels: {app: server}}
spec: {containers: [{name: c, image: agnhost, ports: [{name: http, containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: decoy, namespace: servers, labels: {app: decoy}}
spec: {containers: [{name: c, image: agnhost, ports: [{name: http, containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: clients, labels: {app: client}}
spec: {containers: [{name: c, image: agnhost}]}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: others, labels: {app: client}}
spec: {containers: [{name: c, image: agnhost}]}
";

/// The one policy that lets the client in.
const ALLOW_CLIENT: &str = "\
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client, namespace: servers}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: clients}}
      podSelector: {matchLabels: {app: client}}
    ports: [{port: 80, protocol: TCP}]
";

/// Every pod of `servers` isolated, nothing allowed: denies the client.
const DEFAULT_DENY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: servers}
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

/// Policy number `i` (from 1) of the others, and whether it selects the server.
/// None of them allows the intruder (or anyone but the client) to the server's port 80.
fn filler_policy(i: usize) -> (String, bool) {
    let j = i / 6;
    let (b, c) = (j / 256, j % 256);
    let head = |ns: &str, selector: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: filler-{i:04}, namespace: {ns}}}\nspec:\n  podSelector: {selector}\n"
        )
    };
    match i % 6 {
        // Outside addresses, one /24 each, on the port by number or by name.
        0 => {
            let port = if j.is_multiple_of(2) { "80" } else { "http" };
            (
                head("servers", "{matchLabels: {app: server}}")
                    + &format!(
                        "  ingress:\n  - from:\n    - ipBlock: {{cidr: 100.{}.{c}.0/24}}\n    \
                         ports: [{{port: {port}, protocol: TCP}}]\n",
                        64 + b
                    ),
                true,
            )
        }
        // The whole pod range, with exceptions, on an unaligned range of high ports.
        1 => (
            head("servers", "{matchLabels: {app: server}}")
                + &format!(
                    "  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.244.0.0/16, except: [10.244.{}.0/24]}}\n    \
                     ports: [{{port: {}, endPort: {}, protocol: TCP}}]\n",
                    128 + i % 4,
                    10_000 + i,
                    10_007 + i
                ),
            true,
        ),
        // Pods of another namespace (the intruder), on other ports and UDP.
        2 => (
            head(
                "servers",
                "{matchExpressions: [{key: app, operator: In, values: [server, decoy]}]}",
            ) + &format!(
                "  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: others}}}}\n      \
                 podSelector: {{matchLabels: {{app: client}}}}\n    \
                 ports: [{{port: {}, protocol: UDP}}, {{port: {}, protocol: TCP}}]\n",
                20_000 + i,
                30_000 + i
            ),
            true,
        ),
        // The decoy, from outside addresses and the clients' namespace.
        3 => (
            head("servers", "{matchLabels: {app: decoy}}")
                + &format!(
                    "  ingress:\n  - from:\n    - ipBlock: {{cidr: 100.{}.{c}.0/24}}\n    \
                     - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: clients}}}}\n    \
                     ports: [{{port: 80, protocol: TCP}}]\n",
                    68 + b
                ),
            false,
        ),
        // The intruder, from the servers' namespace.
        4 => (
            head("others", "{}")
                + &format!(
                    "  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: servers}}}}\n    \
                     ports: [{{port: {}, protocol: TCP}}]\n",
                    40_000 + i
                ),
            false,
        ),
        // No pod at all.
        _ => (
            head("servers", &format!("{{matchLabels: {{app: job-{i}}}}}"))
                + "  ingress:\n  - from:\n    - namespaceSelector: {}\n      podSelector: {matchLabels: {app: client}}\n",
            false,
        ),
    }
}

/// `count` policies (the client's allow policy first, if `with_allow`, then
/// fillers), and how many of them select the server.
fn policies(count: usize, with_allow: bool) -> (String, usize) {
    let mut text = String::from("# sluice-bench: NetworkPolicy scenario\n");
    let mut selecting = 0;
    let mut fillers = count;
    if with_allow && count > 0 {
        text.push_str(ALLOW_CLIENT);
        selecting += 1;
        fillers -= 1;
    }
    for i in 1..=fillers {
        let (policy, selects_server) = filler_policy(i);
        text.push_str(&policy);
        selecting += usize::from(selects_server);
    }
    (text, selecting)
}

#[derive(Clone, Debug, Serialize)]
pub struct Tables {
    /// IPv4 prefixes of the peer table (address → peer class), as compiled.
    pub peer_prefixes: usize,
    pub peer_classes: usize,
    /// Allow entries at the server's interface for its ingress (a port range
    /// is split into a few LPM keys by the agent).
    pub server_ingress_allows: usize,
    /// Allow entries of every pod on the node.
    pub node_allows: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RateConfig {
    pub policies: usize,
    /// Policies the agent reports isolating the server.
    pub isolating_server: usize,
    pub tables: Tables,
    /// Time to enforce this configuration after switching to it, per round.
    pub switch_enforced_ms: Vec<f64>,
    /// Connections per second, per round.
    pub rate_by_round: Vec<f64>,
    /// Per round: this rate / the 0-policy rate of the same round.
    pub rate_ratio_by_round: Vec<f64>,
    pub rate_ratio_median: f64,
    pub rate_ratio_min: f64,
    pub rate_ratio_max: f64,
    /// Per round: this p50 latency / the 0-policy p50 of the same round.
    pub p50_ratio_by_round: Vec<f64>,
    pub p50_ratio_median: f64,
    pub connections_per_second: f64,
    pub latency: Summary,
    pub samples_us: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RateResult {
    pub rounds: usize,
    pub connections_per_round: u64,
    pub configs: Vec<RateConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Change {
    /// A default-deny ingress policy for the server's namespace written (no other policies).
    DenyWritten,
    /// That policy removed again.
    DenyRemoved,
    /// The policy allowing the client removed, the other 999 staying.
    AllowRemoved,
    /// It written back.
    AllowWritten,
}

impl Change {
    pub fn label(self) -> &'static str {
        match self {
            Change::DenyWritten => "default-deny written",
            Change::DenyRemoved => "default-deny removed",
            Change::AllowRemoved => "the allowing policy removed",
            Change::AllowWritten => "the allowing policy written back",
        }
    }

    /// Whether new connections are answered after the change.
    fn answered_after(self) -> bool {
        matches!(self, Change::DenyRemoved | Change::AllowWritten)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ChangeResult {
    /// Policies in the cluster while the change is made (besides the changing one).
    pub background_policies: usize,
    pub change: Change,
    pub changes: usize,
    /// Change → first new connection with the new outcome.
    pub new_connections: Summary,
    pub new_connections_us: Vec<f64>,
    /// Change → the agent's status file names the new state (what `Lab::wait_policy_enforced`
    /// waits for).
    pub status_file: Summary,
    pub status_file_us: Vec<f64>,
    /// Change → the lab rewrote the cluster it renders for the agent (after its watch settled):
    /// the part of the figures that is the lab's, not the agent's.
    pub lab_rendered: Summary,
    pub lab_rendered_us: Vec<f64>,
    /// Connections that disagreed with the transition: the new verdict before it, the old
    /// one after it (should be 0).
    pub flaps: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyResult {
    pub rate: RateResult,
    pub attempt_interval_ms: f64,
    pub attempt_timeout_ms: f64,
    pub confirm: usize,
    pub enforcement: Vec<ChangeResult>,
}

/// The lab's manifest directory, written as editors do (temp file, rename).
struct Manifests {
    dir: tempfile::TempDir,
}

impl Manifests {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Writes `file`; returns the instant just before the rename.
    fn write(&self, file: &str, text: &str) -> Result<Instant> {
        let tmp = self.path(&format!(".{file}.tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        let at = Instant::now();
        std::fs::rename(&tmp, self.path(file)).context("renaming manifest")?;
        Ok(at)
    }

    /// Removes `file`; returns the instant just before.
    fn remove(&self, file: &str) -> Result<Instant> {
        let at = Instant::now();
        std::fs::remove_file(self.path(file)).context("removing manifest")?;
        Ok(at)
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

fn server_target(lab: &Lab) -> Result<TargetSpec> {
    Ok(TargetSpec {
        host: lab.pod_ip(SERVER)?.to_string(),
        port: SERVER_PORT,
        protocol: Protocol::Tcp,
    })
}

/// Policies the agent says isolate the server's ingress.
fn isolating_server(lab: &Lab) -> Result<usize> {
    let status = sluice_lab::policy_status::read(&lab.paths().proxy_status(NODE))?
        .context("the agent wrote no status")?;
    let server = status
        .endpoints
        .iter()
        .find(|e| e.pod == SERVER)
        .with_context(|| format!("the agent does not manage {SERVER}: {status:?}"))?;
    Ok(server.ingress_isolated_by.len())
}

/// The tables the agent compiles from the cluster the lab renders for it.
fn tables(lab: &Lab) -> Result<Tables> {
    let snapshot = cluster_model::ManifestSource::new(lab.paths().cluster())
        .reload()
        .snapshot;
    let compiled = sluice_policy::compile_node(&snapshot, NODE, &[]);
    let server = cluster_model::ObjectKey::new("servers", "server");
    let allows = |e: &sluice_policy::compile::EndpointPolicy| {
        e.rules(Direction::Ingress).map_or(0, |r| r.len())
            + e.rules(Direction::Egress).map_or(0, |r| r.len())
    };
    Ok(Tables {
        peer_prefixes: compiled
            .addresses
            .keys()
            .filter(|p| matches!(p, ipnet::IpNet::V4(_)))
            .count(),
        peer_classes: compiled.classes.len(),
        server_ingress_allows: compiled
            .endpoints
            .get(&server)
            .and_then(|e| e.rules(Direction::Ingress))
            .map_or(0, |r| r.len()),
        node_allows: compiled.endpoints.values().map(allows).sum(),
    })
}

/// Checks that the intruder gets `want` (answered or dropped) at the server.
fn check_intruder(lab: &Lab, target: &TargetSpec, answered: bool) -> Result<()> {
    let probe = lab.probe_target(INTRUDER, target, PROBE_TIMEOUT)?;
    let want = if answered {
        Outcome::Answered
    } else {
        Outcome::Timeout
    };
    ensure!(
        probe.outcome == want,
        "{INTRUDER} -> {SERVER}: {:?}, expected {want:?} (the policies are not on the path?): {probe:?}",
        probe.outcome
    );
    Ok(())
}

struct Measured {
    rate: f64,
    p50_us: f64,
    samples_us: Vec<f64>,
    elapsed_ms: u64,
}

fn measure_load(lab: &Lab, target: &TargetSpec, count: u64) -> Result<Measured> {
    let report = lab.load_target(CLIENT, target, count, Duration::from_secs(2))?;
    ensure!(
        report.answered == count && report.answers.get("server") == Some(&count),
        "{CLIENT} -> {SERVER}: {} of {count} answered (answers {:?}, failures {:?}, errors {:?})",
        report.answered,
        report.answers,
        report.failures,
        report.errors
    );
    let samples_us: Vec<f64> = report.samples_us.iter().map(|&s| s as f64).collect();
    let elapsed_s = (report.elapsed_ms as f64 / 1000.0).max(f64::EPSILON);
    Ok(Measured {
        rate: count as f64 / elapsed_s,
        p50_us: summarize_us(&samples_us).p50_us,
        samples_us,
        elapsed_ms: report.elapsed_ms,
    })
}

fn run_rate(lab: &Lab, manifests: &Manifests, rounds: usize, per_round: u64) -> Result<RateResult> {
    let target = server_target(lab)?;
    let texts: Vec<(String, usize)> = POLICY_COUNTS.iter().map(|&n| policies(n, true)).collect();
    let mut table_sizes: BTreeMap<usize, Tables> = BTreeMap::new();
    let mut isolating: BTreeMap<usize, usize> = BTreeMap::new();
    let mut switch_ms: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut measured: BTreeMap<usize, Vec<Measured>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..POLICY_COUNTS.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let count = POLICY_COUNTS[index];
            let (text, selecting) = &texts[index];
            let written = manifests.write("policies.yaml", text)?;
            lab.wait_policy_enforced(ENFORCE_TIMEOUT)
                .with_context(|| format!("switching to {count} policies"))?;
            let took = written.elapsed();
            let isolated_by = isolating_server(lab)?;
            ensure!(
                isolated_by == *selecting,
                "with {count} policies the agent reports {isolated_by} isolating {SERVER}, expected {selecting}"
            );
            check_intruder(lab, &target, count == 0)?;
            if let std::collections::btree_map::Entry::Vacant(e) = table_sizes.entry(count) {
                e.insert(tables(lab)?);
                isolating.insert(count, isolated_by);
            }
            // A few connections first, so each measurement starts warm.
            measure_load(lab, &target, per_round / 10 + 1)?;
            let m = measure_load(lab, &target, per_round)?;
            eprintln!(
                "policy rate: round {}/{rounds}, {count} policies (enforced {} ms after the switch): {:.0} conn/s, p50 {:.0} µs",
                round + 1,
                took.as_millis(),
                m.rate,
                m.p50_us
            );
            switch_ms
                .entry(count)
                .or_default()
                .push(took.as_secs_f64() * 1000.0);
            measured.entry(count).or_default().push(m);
        }
    }

    let base = &measured[&POLICY_COUNTS[0]];
    let configs = POLICY_COUNTS
        .iter()
        .map(|&count| {
            let runs = &measured[&count];
            let rate_by_round: Vec<f64> = runs.iter().map(|m| m.rate).collect();
            let rate_ratio_by_round: Vec<f64> = runs
                .iter()
                .zip(base)
                .map(|(m, b)| m.rate / b.rate)
                .collect();
            let p50_ratio_by_round: Vec<f64> = runs
                .iter()
                .zip(base)
                .map(|(m, b)| m.p50_us / b.p50_us)
                .collect();
            let samples_us: Vec<f64> = runs.iter().flat_map(|m| m.samples_us.clone()).collect();
            let elapsed_s = runs.iter().map(|m| m.elapsed_ms).sum::<u64>() as f64 / 1000.0;
            let (rate_ratio_min, rate_ratio_max) = min_max(&rate_ratio_by_round);
            RateConfig {
                policies: count,
                isolating_server: isolating[&count],
                tables: table_sizes[&count].clone(),
                switch_enforced_ms: switch_ms[&count].clone(),
                rate_ratio_median: median(&rate_ratio_by_round),
                rate_ratio_min,
                rate_ratio_max,
                p50_ratio_median: median(&p50_ratio_by_round),
                rate_by_round,
                rate_ratio_by_round,
                p50_ratio_by_round,
                connections_per_second: samples_us.len() as f64 / elapsed_s.max(f64::EPSILON),
                latency: summarize_us(&samples_us),
                samples_us,
            }
        })
        .collect();
    Ok(RateResult {
        rounds,
        connections_per_round: per_round,
        configs,
    })
}

/// One connection attempt of the watcher.
struct Attempt {
    fd: Option<OwnedFd>,
    started: Instant,
    answered: Option<bool>,
}

/// What the watcher saw after a change.
struct Transition {
    /// Start of the first of `CONFIRM` consecutive attempts with the new outcome.
    at: Instant,
    /// Attempts that disagree: the new outcome before that one, the old one after.
    flaps: usize,
}

/// Starts a non-blocking connect to `to` from the calling thread's netns.
fn start_connect(to: SocketAddrV4) -> Result<(OwnedFd, bool)> {
    // SAFETY: plain syscalls; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: fd is a new, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in of the given length.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok((fd, true));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINPROGRESS) {
        return Ok((fd, false));
    }
    Err(err).with_context(|| format!("connect to {to}"))
}

/// The outcome of a connect that poll() reported done: answered, or an error.
fn connect_result(fd: &OwnedFd, to: SocketAddrV4) -> Result<bool> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err and len are valid for getsockopt(SO_ERROR).
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_ERROR)");
    }
    if err == 0 {
        return Ok(true);
    }
    // A policy drops silently; anything else means the benchmark is broken.
    Err(std::io::Error::from_raw_os_error(err)).with_context(|| format!("connect to {to}"))
}

/// From the netns `ns` (entered by this thread), starts a connection to `to`
/// every `ATTEMPT_INTERVAL` until `CONFIRM` consecutive ones are `answered`.
fn watch_for(ns: &File, to: SocketAddrV4, answered: bool) -> Result<Transition> {
    // SAFETY: setns on a valid fd changes only this thread's network namespace; the caller
    // runs this on a thread of its own that ends right after.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    let began = Instant::now();
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut next_start = began;
    loop {
        let now = Instant::now();
        if now >= next_start {
            let (fd, done) = start_connect(to)?;
            attempts.push(Attempt {
                fd: (!done).then_some(fd),
                started: now,
                answered: done.then_some(true),
            });
            next_start += ATTEMPT_INTERVAL;
            if next_start < now {
                next_start = now + ATTEMPT_INTERVAL;
            }
        }
        // Attempts that ran out of time were dropped.
        for a in attempts.iter_mut().filter(|a| a.fd.is_some()) {
            if now.duration_since(a.started) >= ATTEMPT_TIMEOUT {
                a.fd = None;
                a.answered = Some(false);
            }
        }
        // The first run of CONFIRM with the new outcome among concluded attempts (in start order).
        let concluded: Vec<bool> = attempts.iter().map_while(|a| a.answered).collect();
        if let Some(first) = concluded
            .windows(CONFIRM)
            .position(|w| w.iter().all(|&x| x == answered))
        {
            let flaps = concluded[..first]
                .iter()
                .filter(|&&x| x == answered)
                .count()
                + concluded[first..]
                    .iter()
                    .filter(|&&x| x != answered)
                    .count();
            return Ok(Transition {
                at: attempts[first].started,
                flaps,
            });
        }
        if began.elapsed() > TRANSITION_TIMEOUT {
            bail!(
                "new connections to {to} were still {} {} s after the change",
                if answered { "dropped" } else { "answered" },
                TRANSITION_TIMEOUT.as_secs()
            );
        }
        // Wait for handshakes until the next attempt is due.
        let pending: Vec<usize> = (0..attempts.len())
            .filter(|&i| attempts[i].fd.is_some())
            .collect();
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|&i| libc::pollfd {
                fd: attempts[i].fd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let wait = next_start.saturating_duration_since(Instant::now());
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: wait.as_nanos().min(999_999_999) as libc::c_long,
        };
        // SAFETY: fds is a valid array of fds.len() pollfds; ts is a valid timespec.
        let r = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).context("ppoll");
            }
        }
        for (pfd, &i) in fds.iter().zip(&pending) {
            if pfd.revents != 0 {
                let fd = attempts[i].fd.take().expect("pending attempt has a socket");
                attempts[i].answered = Some(connect_result(&fd, to)?);
            }
        }
    }
}

fn client_netns(lab: &Lab) -> Result<File> {
    let pod = lab.pod(CLIENT)?;
    let ns = pod.netns.context("the client has no netns")?;
    File::open(sluice_lab::netns::path(&ns)).with_context(|| format!("opening netns {ns}"))
}

/// The agent's policy status, if it names a state it fully enforces.
fn enforced_digest(lab: &Lab) -> Result<String> {
    let status = sluice_lab::policy_status::read(&lab.paths().proxy_status(NODE))?
        .context("the agent wrote no status")?;
    ensure!(
        status.pending.is_empty() && status.errors.is_empty(),
        "the agent does not enforce its state fully: {status:?}"
    );
    Ok(status.inputs_digest)
}

/// Enforces the manifests as they are now and returns the digest the agent reports for them.
fn settle(lab: &Lab, what: &str) -> Result<String> {
    lab.wait_policy_enforced(ENFORCE_TIMEOUT)
        .with_context(|| format!("enforcing {what}"))?;
    enforced_digest(lab)
}

/// Polls the agent's status file (every 2 ms, parsing it only when it was rewritten) until it
/// names `digest` with nothing pending and no errors: the test `Lab::wait_policy_enforced`
/// makes, without re-reading the manifests each time.
fn wait_status(lab: &Lab, digest: &str, since: Instant) -> Result<Duration> {
    use std::os::unix::fs::MetadataExt;
    let path = lab.paths().proxy_status(NODE);
    let mut last = None;
    loop {
        let stamp = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.len()));
        if stamp != last {
            last = stamp;
            // A status the agent is replacing right now is read again next time.
            if let Ok(Some(status)) = sluice_lab::policy_status::read(&path)
                && status.inputs_digest == digest
                && status.pending.is_empty()
                && status.errors.is_empty()
            {
                return Ok(since.elapsed());
            }
        }
        if since.elapsed() > ENFORCE_TIMEOUT {
            bail!(
                "the agent's status did not name the new state within {} s",
                ENFORCE_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// When the lab last rewrote the cluster it renders for the agents (the directory's mtime),
/// relative to `since`.
fn rendered_after(lab: &Lab, since: SystemTime) -> Result<Duration> {
    let modified = std::fs::metadata(lab.paths().cluster())?.modified()?;
    Ok(modified.duration_since(since).unwrap_or_default())
}

struct ChangeSample {
    new_connections: Duration,
    status_file: Duration,
    rendered: Duration,
    flaps: usize,
}

/// Makes a change, then waits for new connections to follow it and for the agent's status to
/// name `digest` (the state after the change), both at once; times are from the change.
fn measure_change(
    lab: &Lab,
    ns: &File,
    to: SocketAddrV4,
    change: Change,
    digest: &str,
    apply: impl FnOnce() -> Result<Instant>,
) -> Result<ChangeSample> {
    let wall = SystemTime::now();
    let changed = apply()?;
    let (transition, status) = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_for(ns, to, change.answered_after()));
        let status = wait_status(lab, digest, changed);
        let transition = watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the connection watcher panicked"))?;
        anyhow::Ok((transition, status))
    })?;
    let what = || format!("after the change \"{}\"", change.label());
    let transition = transition.with_context(what)?;
    let status = status.with_context(what)?;
    Ok(ChangeSample {
        new_connections: transition.at.saturating_duration_since(changed),
        status_file: status,
        rendered: rendered_after(lab, wall)?,
        flaps: transition.flaps,
    })
}

fn summarize_changes(
    background_policies: usize,
    change: Change,
    samples: &[ChangeSample],
) -> ChangeResult {
    let us = |f: fn(&ChangeSample) -> Duration| -> Vec<f64> {
        samples.iter().map(|s| micros(f(s))).collect()
    };
    let new_connections_us = us(|s| s.new_connections);
    let status_file_us = us(|s| s.status_file);
    let lab_rendered_us = us(|s| s.rendered);
    ChangeResult {
        background_policies,
        change,
        changes: samples.len(),
        new_connections: summarize_us(&new_connections_us),
        status_file: summarize_us(&status_file_us),
        lab_rendered: summarize_us(&lab_rendered_us),
        new_connections_us,
        status_file_us,
        lab_rendered_us,
        flaps: samples.iter().map(|s| s.flaps).sum(),
    }
}

/// One background: `close` makes the client's connections dropped, `open` answered again.
struct Toggle<'a> {
    background: usize,
    close: (Change, Box<dyn Fn() -> Result<Instant> + 'a>),
    open: (Change, Box<dyn Fn() -> Result<Instant> + 'a>),
}

fn run_toggle(
    lab: &Lab,
    ns: &File,
    to: SocketAddrV4,
    changes: usize,
    toggle: &Toggle,
) -> Result<[ChangeResult; 2]> {
    let background = toggle.background;
    // Learn the digest of both states; the first is learned again to check it is stable.
    let open_digest = settle(lab, "the open state")?;
    (toggle.close.1)()?;
    let closed_digest = settle(lab, "the closed state")?;
    (toggle.open.1)()?;
    ensure!(
        settle(lab, "the open state again")? == open_digest,
        "the agent reports another digest for the same state: comparing digests cannot tell when it is current"
    );
    ensure!(open_digest != closed_digest, "both states have one digest");

    let (mut closed, mut opened) = (Vec::new(), Vec::new());
    for n in 0..changes {
        closed.push(measure_change(
            lab,
            ns,
            to,
            toggle.close.0,
            &closed_digest,
            &toggle.close.1,
        )?);
        opened.push(measure_change(
            lab,
            ns,
            to,
            toggle.open.0,
            &open_digest,
            &toggle.open.1,
        )?);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        eprintln!(
            "policy enforcement, {background} other policies, change {}/{changes}: \
             denied after {:.1} ms (status {:.1} ms, lab rendered {:.1} ms), \
             answered again after {:.1} ms (status {:.1} ms, lab rendered {:.1} ms)",
            n + 1,
            ms(closed[n].new_connections),
            ms(closed[n].status_file),
            ms(closed[n].rendered),
            ms(opened[n].new_connections),
            ms(opened[n].status_file),
            ms(opened[n].rendered),
        );
    }
    Ok([
        summarize_changes(background, toggle.close.0, &closed),
        summarize_changes(background, toggle.open.0, &opened),
    ])
}

fn run_enforcement(lab: &Lab, manifests: &Manifests, changes: usize) -> Result<Vec<ChangeResult>> {
    let ns = client_netns(lab)?;
    let target = server_target(lab)?;
    let to = SocketAddrV4::new(target.host.parse::<Ipv4Addr>()?, target.port);
    let mut results = Vec::new();

    // No other policies: a default-deny for the server's namespace comes and goes.
    manifests.write("policies.yaml", &policies(0, true).0)?;
    results.extend(run_toggle(
        lab,
        &ns,
        to,
        changes,
        &Toggle {
            background: 0,
            close: (
                Change::DenyWritten,
                Box::new(|| manifests.write("deny.yaml", DEFAULT_DENY)),
            ),
            open: (
                Change::DenyRemoved,
                Box::new(|| manifests.remove("deny.yaml")),
            ),
        },
    )?);

    // The largest configuration, the allowing policy in a file of its own.
    let background = POLICY_COUNTS[POLICY_COUNTS.len() - 1] - 1;
    manifests.write("policies.yaml", &policies(background, false).0)?;
    manifests.write("allow.yaml", ALLOW_CLIENT)?;
    results.extend(run_toggle(
        lab,
        &ns,
        to,
        changes,
        &Toggle {
            background,
            close: (
                Change::AllowRemoved,
                Box::new(|| manifests.remove("allow.yaml")),
            ),
            open: (
                Change::AllowWritten,
                Box::new(|| manifests.write("allow.yaml", ALLOW_CLIENT)),
            ),
        },
    )?);
    Ok(results)
}

pub fn run(bin_dir: &Path, rounds: usize, per_round: u64, changes: usize) -> Result<PolicyResult> {
    let manifests = Manifests {
        dir: tempfile::tempdir()?,
    };
    manifests.write("pods.yaml", PODS)?;
    manifests.write("policies.yaml", &policies(0, true).0)?;
    let mut opts = LabOptions::new(
        format!("bnp{}", std::process::id() % 100_000),
        manifests.dir.path(),
    );
    opts.bin_dir = Some(bin_dir.to_path_buf());
    opts.proxy = ProxyMode::Required;
    eprintln!("policy: bringing up a lab…");
    let lab = Lab::up(opts).context("bringing up the NetworkPolicy lab")?;
    for pod in [SERVER, "servers/decoy", CLIENT, INTRUDER] {
        lab.wait_pod_ready(pod, ENFORCE_TIMEOUT)?;
    }
    lab.wait_policy_enforced(ENFORCE_TIMEOUT)?;

    let rate = run_rate(&lab, &manifests, rounds, per_round)?;
    let enforcement = run_enforcement(&lab, &manifests, changes)?;
    drop(lab);
    Ok(PolicyResult {
        rate,
        attempt_interval_ms: ATTEMPT_INTERVAL.as_secs_f64() * 1000.0,
        attempt_timeout_ms: ATTEMPT_TIMEOUT.as_secs_f64() * 1000.0,
        confirm: CONFIRM,
        enforcement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_model::ObjectKey;
    use sluice_policy::Peer;

    /// The scenario's pods with addresses, and `policies`, as the agent would read them.
    fn snapshot(policies: &str) -> std::sync::Arc<cluster_model::ClusterSnapshot> {
        let dir = tempfile::tempdir().unwrap();
        let mut pods = String::new();
        for (n, doc) in PODS.split("---\n").enumerate() {
            pods.push_str(&format!(
                "---\n{doc}status: {{phase: Running, podIP: 10.244.0.{}}}\n",
                n + 2
            ));
        }
        std::fs::write(dir.path().join("pods.yaml"), pods).unwrap();
        std::fs::write(dir.path().join("policies.yaml"), policies).unwrap();
        let reload = cluster_model::ManifestSource::new(dir.path()).reload();
        assert!(reload.new_problems.is_empty(), "{:?}", reload.new_problems);
        reload.snapshot
    }

    fn allowed(snap: &cluster_model::ClusterSnapshot, from: &str, port: u16) -> bool {
        let (ns, name) = from.split_once('/').unwrap();
        sluice_policy::explain(
            snap,
            &Peer::Pod(ObjectKey::new(ns, name)),
            &Peer::Pod(ObjectKey::new("servers", "server")),
            port,
            sluice_policy::Protocol::Tcp,
        )
        .unwrap()
        .allowed
    }

    #[test]
    fn the_policies_isolate_the_server_and_let_only_the_client_in() {
        for (count, with_allow) in [(0, true), (100, true), (1000, true), (999, false)] {
            let (text, selecting) = policies(count, with_allow);
            let snap = snapshot(&text);
            assert_eq!(snap.network_policies.len(), count);
            let fillers = if with_allow && count > 0 {
                count - 1
            } else {
                count
            };
            let expected =
                (1..=fillers).filter(|i| i % 6 < 3).count() + usize::from(with_allow && count > 0);
            assert_eq!(selecting, expected);
            let isolated = count > 0;
            assert_eq!(
                allowed(&snap, CLIENT, 80),
                with_allow || !isolated,
                "{count}"
            );
            assert_eq!(allowed(&snap, INTRUDER, 80), !isolated, "{count}");
        }
        let deny = snapshot(DEFAULT_DENY);
        assert!(!allowed(&deny, CLIENT, 80));
    }
}
