//! Programming: how long sluice-proxy takes to bring its maps to a manifest
//! directory.
//!
//! sluice-proxy runs on its own temporary cgroup and manifest directory (no
//! lab needed: the maps are programmed the same way), with map sizes from
//! [`BENCH_MAP_SIZES`] (large enough for 10,000 Services × 10 endpoints).
//! Every `synced` log line is checked: no errors, and the frontend and
//! backend counts the directory should give; anything else fails the run.
//!
//! - **Change latency** ([`run`]): each change rewrites a hand-written
//!   EndpointSlice with one new endpoint address, atomically (write then
//!   rename, as editors and kubectl-style tools do); the clock starts just
//!   before the rename and stops when the daemon's `synced` log line arrives
//!   on the pipe, so the figure includes the watch, settle window, reload,
//!   compile, diff and map writes, plus the pipe — an upper bound.
//! - **From nothing** ([`initial`]): (1) the daemon started on a directory
//!   already holding every Service, from just before the spawn to its first
//!   `synced` line (loading and verifying the programs, attaching, reading and
//!   parsing the directory, compile, map writes); (2) the daemon started on an
//!   empty directory and, once it is ready, the whole workload written as one
//!   file, atomically: from just before the rename to `synced`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::stats::{Summary, micros, summarize_us};

/// Map sizes passed to every sluice-proxy the programming and memory
/// scenarios start (the same for every run, so memory figures compare).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MapSizes {
    /// `--max-service-entries`: one per frontend plus one per backend slot.
    pub service_entries: u32,
    /// `--max-backends`: one per distinct backend address.
    pub backends: u32,
}

/// 10,000 Services × 10 endpoints need 110,000 service entries and 100,000
/// backends; the power of two above leaves room for a change's transient
/// extra entries.
pub const BENCH_MAP_SIZES: MapSizes = MapSizes {
    service_entries: 131_072,
    backends: 131_072,
};

/// How long the first sync of a large directory may take (a debug build on a
/// busy machine parses megabytes of YAML).
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(300);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// A directory of `services` Services (one TCP port each), each with a
/// hand-written EndpointSlice of `endpoints_per_service` ready endpoints, all
/// addresses distinct.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Workload {
    pub services: usize,
    pub endpoints_per_service: usize,
}

impl Workload {
    pub fn new(services: usize, endpoints_per_service: usize) -> Self {
        Self {
            services,
            endpoints_per_service,
        }
    }

    /// What the daemon should report once it has programmed the workload.
    pub fn expected(&self) -> Counts {
        Counts {
            frontends: self.services as u64,
            backends: (self.services * self.endpoints_per_service) as u64,
        }
    }

    pub(crate) fn check_fits(&self, sizes: MapSizes) -> Result<()> {
        let entries = self.services * (self.endpoints_per_service + 1);
        let backends = self.services * self.endpoints_per_service;
        ensure!(
            entries < sizes.service_entries as usize && backends < sizes.backends as usize,
            "{} Services × {} endpoints need {entries} service entries and {backends} backends; \
             the bench passes {} and {}",
            self.services,
            self.endpoints_per_service,
            sizes.service_entries,
            sizes.backends
        );
        ensure!(
            self.services <= 62_500 && backends <= 2_000_000,
            "the bench's address plan does not stretch that far"
        );
        Ok(())
    }

    /// The manifests of Services `range` (the first of them with `first_endpoint` as its
    /// first endpoint when it is Service 0).
    fn manifests(&self, range: std::ops::Range<usize>, first_endpoint: &str) -> String {
        let mut text = String::new();
        for index in range {
            let endpoints: Vec<String> = (0..self.endpoints_per_service)
                .map(|j| {
                    if index == 0 && j == 0 {
                        first_endpoint.to_string()
                    } else {
                        endpoint_address(index * self.endpoints_per_service + j)
                    }
                })
                .collect();
            text.push_str(&service_manifest(index, &endpoints));
        }
        text
    }

    /// Writes the workload into `dir` split the way a real directory would be: the first
    /// file holds the Service whose endpoint changes, the second all the others.
    pub(crate) fn write_split(&self, dir: &Path) -> Result<()> {
        write_atomically(
            dir,
            "changing.yaml",
            &self.manifests(0..1, &changing_endpoint(0)),
            || {},
        )?;
        if self.services > 1 {
            write_atomically(
                dir,
                "others.yaml",
                &self.manifests(1..self.services, ""),
                || {},
            )?;
        }
        Ok(())
    }
}

/// Frontends and backends programmed, as the `synced` line counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub frontends: u64,
    pub backends: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgrammingResult {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub changes: usize,
    pub settle_ms: u64,
    pub latency: Summary,
    pub samples_us: Vec<f64>,
    /// The daemon's own compile + diff + map writes per change (`elapsed_us` of its `synced` line).
    pub daemon_sync: Summary,
    /// The stages the `synced` line times, per change: reading the manifests into the model
    /// (`reload_us`), compiling the service table (`compile_us`), syncing the maps (`sync_us`).
    /// None from an agent that does not log them.
    pub daemon_reload: Option<Summary>,
    pub daemon_compile: Option<Summary>,
    pub daemon_maps: Option<Summary>,
}

/// Time to program a workload from nothing.
#[derive(Clone, Debug, Serialize)]
pub struct InitialResult {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub map_sizes: MapSizes,
    pub settle_ms: u64,
    pub repeats: usize,
    /// Started on the full directory: spawn → `attached` (programs loaded, verified, attached).
    pub start_to_attached: Summary,
    /// Started on the full directory: spawn → first `synced`.
    pub start_to_synced: Summary,
    /// Its compile + diff + map writes (`elapsed_us` of that line); the rest after
    /// `attached` is reading and parsing the directory.
    pub start_daemon_sync: Summary,
    /// Started on an empty directory, then the workload written as one file: rename → `synced`.
    pub write_to_synced: Summary,
    pub write_daemon_sync: Summary,
}

/// The endpoint address `k` of the workload: 10.128.0.1 onwards, last octet 1–250.
fn endpoint_address(k: usize) -> String {
    let block = k / 250;
    format!("10.{}.{}.{}", 128 + block / 256, block % 256, 1 + k % 250)
}

/// The first endpoint of the changing Service at change number `n` (outside the workload's
/// addresses).
fn changing_endpoint(n: usize) -> String {
    format!("10.244.{}.{}", 100 + n / 250 % 100, 1 + n % 250)
}

/// A Service `svc-INDEX` with ready endpoints, as a hand-written slice.
fn service_manifest(index: usize, endpoints: &[String]) -> String {
    let (hi, lo) = (1 + index / 250, 1 + index % 250);
    let addresses: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{addresses: [\"{e}\"], conditions: {{ready: true}}}}"))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{index}, namespace: default}}\n\
         spec: {{clusterIP: 10.96.{hi}.{lo}, ports: [{{name: http, port: 80}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc-{index}-1, namespace: default, labels: {{kubernetes.io/service-name: svc-{index}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints: [{}]\n",
        addresses.join(", ")
    )
}

fn write_atomically(
    dir: &Path,
    name: &str,
    text: &str,
    before_rename: impl FnOnce(),
) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    before_rename();
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// A `synced` log line.
#[derive(Clone, Debug)]
pub struct Synced {
    pub arrived: Instant,
    pub counts: Counts,
    pub elapsed_us: u64,
    /// `reload_us`, `compile_us` and `sync_us`, when logged.
    pub stages_us: Option<[u64; 3]>,
}

enum LogEvent {
    Attached(Instant),
    Synced(Synced),
    /// A line that fails the run: a sync error, invalid input, a fatal error.
    Problem(String),
}

/// Stops the daemon (SIGTERM, by the PID we started), removes what it pinned (SIGTERM leaves
/// its programs attached, as for a restart) and the cgroup.
struct DaemonGuard {
    child: Option<Child>,
    cgroup: PathBuf,
    proxy: PathBuf,
    /// Its own `--bpffs-dir`: a daemon must not adopt the maps an earlier one left.
    pins: PathBuf,
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // SAFETY: signalling a child we spawned and have not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = Command::new(&self.proxy)
            .arg("cleanup")
            .arg("--bpffs-dir")
            .arg(&self.pins)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// A sluice-proxy we started, reading its JSON log.
pub struct Daemon {
    _guard: DaemonGuard,
    events: mpsc::Receiver<LogEvent>,
    pid: u32,
    /// Just before the spawn.
    pub spawned: Instant,
}

/// Distinguishes the cgroups of the daemons one bench process starts.
static DAEMONS: AtomicUsize = AtomicUsize::new(0);

impl Daemon {
    /// Starts sluice-proxy on `manifests` with [`BENCH_MAP_SIZES`].
    pub fn start(
        proxy: &Path,
        manifests: &Path,
        settle_ms: u64,
        ready_file: Option<&Path>,
    ) -> Result<Daemon> {
        let tag = format!(
            "sluice-bench-{}-{}",
            std::process::id(),
            DAEMONS.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup = sluice_lab::cgroup::cgroup2_root()?.join(&tag);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating {}", cgroup.display()))?;
        let pins = PathBuf::from("/sys/fs/bpf/sluice").join(&tag);
        let mut guard = DaemonGuard {
            child: None,
            cgroup,
            proxy: proxy.to_path_buf(),
            pins: pins.clone(),
        };
        let sizes = BENCH_MAP_SIZES;
        let mut command = Command::new(proxy);
        command
            .args([
                "--node",
                "bench",
                "--log-format",
                "json",
                "--service-cidr",
                "10.96.0.0/12",
            ])
            .arg("--manifests")
            .arg(manifests)
            .arg("--cgroup")
            .arg(&guard.cgroup)
            .arg("--bpffs-dir")
            .arg(&pins)
            .arg("--settle-ms")
            .arg(settle_ms.to_string())
            .arg("--max-service-entries")
            .arg(sizes.service_entries.to_string())
            .arg("--max-backends")
            .arg(sizes.backends.to_string())
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        if let Some(path) = ready_file {
            command.arg("--ready-file").arg(path);
        }
        let spawned = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", proxy.display()))?;
        let pid = child.id();
        let child = guard.child.insert(child);
        let stderr = child.stderr.take().context("daemon stderr")?;
        let (tx, events) = mpsc::channel();
        // Reads to the end even when nobody listens any more, so the daemon never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let arrived = Instant::now();
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let _ = match event["event"].as_str() {
                    Some("attached") => tx.send(LogEvent::Attached(arrived)),
                    Some("synced") => {
                        let field = |name: &str| event[name].as_u64();
                        match (
                            field("frontends"),
                            field("backends"),
                            field("errors"),
                            field("elapsed_us"),
                        ) {
                            (Some(frontends), Some(backends), Some(0), Some(elapsed_us)) => {
                                let stages = ["reload_us", "compile_us", "sync_us"].map(field);
                                tx.send(LogEvent::Synced(Synced {
                                    arrived,
                                    counts: Counts {
                                        frontends,
                                        backends,
                                    },
                                    elapsed_us,
                                    stages_us: match stages {
                                        [Some(r), Some(c), Some(s)] => Some([r, c, s]),
                                        _ => None,
                                    },
                                }))
                            }
                            _ => tx.send(LogEvent::Problem(line)),
                        }
                    }
                    Some("fatal" | "sync_error" | "invalid_input" | "unsupported") => {
                        eprintln!("sluice-proxy: {line}");
                        tx.send(LogEvent::Problem(line))
                    }
                    _ => Ok(()),
                };
            }
        });
        Ok(Daemon {
            _guard: guard,
            events,
            pid,
            spawned,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the next `synced` line, which must report `expected`; returns it and when
    /// `attached` arrived if it did meanwhile.
    fn next_synced(
        &self,
        timeout: Duration,
        expected: Counts,
        what: &str,
    ) -> Result<(Synced, Option<Instant>)> {
        let deadline = Instant::now() + timeout;
        let mut attached = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(left) {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{what}: sluice-proxy did not sync within {timeout:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("{what}: sluice-proxy exited (its log ended) before syncing")
                }
            };
            match event {
                LogEvent::Attached(at) => attached = Some(at),
                LogEvent::Problem(line) => bail!("{what}: sluice-proxy reported: {line}"),
                LogEvent::Synced(synced) if synced.counts == expected => {
                    return Ok((synced, attached));
                }
                LogEvent::Synced(synced) => bail!(
                    "{what}: sluice-proxy synced {} frontends and {} backends; expected {} and {} \
                     (a map too small?)",
                    synced.counts.frontends,
                    synced.counts.backends,
                    expected.frontends,
                    expected.backends
                ),
            }
        }
    }

    /// Waits for the first sync, which must have programmed `workload`.
    pub fn first_synced(&self, workload: &Workload) -> Result<Synced> {
        Ok(self
            .next_synced(FIRST_SYNC_TIMEOUT, workload.expected(), "first sync")?
            .0)
    }

    /// Fails on anything but quiet (no line that fails the run) so far.
    pub fn check_quiet(&self) -> Result<()> {
        loop {
            match self.events.try_recv() {
                Ok(LogEvent::Problem(line)) => bail!("sluice-proxy reported: {line}"),
                Ok(LogEvent::Synced(s)) => bail!(
                    "sluice-proxy synced unexpectedly ({} frontends, {} backends)",
                    s.counts.frontends,
                    s.counts.backends
                ),
                Ok(LogEvent::Attached(_)) => {}
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => bail!("sluice-proxy exited"),
            }
        }
    }
}

/// Endpoint change → maps updated, `changes` times, with `workload` present.
pub fn run(
    proxy: &Path,
    workload: Workload,
    changes: usize,
    settle_ms: u64,
) -> Result<ProgrammingResult> {
    workload.check_fits(BENCH_MAP_SIZES)?;
    let manifests = tempfile::tempdir()?;
    workload.write_split(manifests.path())?;
    let daemon = Daemon::start(proxy, manifests.path(), settle_ms, None)?;
    daemon.first_synced(&workload)?;
    // The first sync may have been followed by a second look at the just-written files.
    std::thread::sleep(Duration::from_millis(settle_ms + 100));
    daemon.check_quiet()?;

    let expected = workload.expected();
    let mut samples = Vec::with_capacity(changes);
    let mut daemon_sync = Vec::with_capacity(changes);
    let mut stages: [Vec<f64>; 3] = Default::default();
    for change in 1..=changes {
        let text = workload.manifests(0..1, &changing_endpoint(change));
        let mut started = Instant::now();
        write_atomically(manifests.path(), "changing.yaml", &text, || {
            started = Instant::now()
        })?;
        let (done, _) =
            daemon.next_synced(CHANGE_TIMEOUT, expected, &format!("change {change}"))?;
        samples.push(micros(done.arrived.duration_since(started)));
        daemon_sync.push(done.elapsed_us as f64);
        for (samples, us) in stages.iter_mut().zip(done.stages_us.into_iter().flatten()) {
            samples.push(us as f64);
        }
        // Let each change stand alone, so none is folded into the next.
        std::thread::sleep(Duration::from_millis(settle_ms + 20));
        daemon.check_quiet()?;
    }
    if samples.len() != changes {
        bail!("measured {} of {changes} changes", samples.len());
    }
    drop(daemon);
    Ok(ProgrammingResult {
        services: workload.services,
        endpoints_per_service: workload.endpoints_per_service,
        changes,
        settle_ms,
        latency: summarize_us(&samples),
        samples_us: samples,
        daemon_sync: summarize_us(&daemon_sync),
        daemon_reload: stage(&stages[0]),
        daemon_compile: stage(&stages[1]),
        daemon_maps: stage(&stages[2]),
    })
}

/// A stage's summary, unless no change timed it.
fn stage(samples: &[f64]) -> Option<Summary> {
    (!samples.is_empty()).then(|| summarize_us(samples))
}

/// Programming `workload` from nothing, `repeats` times each way (see the module docs).
pub fn initial(
    proxy: &Path,
    workload: Workload,
    repeats: usize,
    settle_ms: u64,
) -> Result<InitialResult> {
    workload.check_fits(BENCH_MAP_SIZES)?;
    let mut to_attached = Vec::new();
    let mut to_synced = Vec::new();
    let mut start_sync = Vec::new();
    let mut write_to_synced = Vec::new();
    let mut write_sync = Vec::new();
    for repeat in 1..=repeats {
        // (1) Started on a directory already holding the workload.
        let manifests = tempfile::tempdir()?;
        workload.write_split(manifests.path())?;
        let daemon = Daemon::start(proxy, manifests.path(), settle_ms, None)?;
        let (synced, attached) = daemon
            .next_synced(
                FIRST_SYNC_TIMEOUT,
                workload.expected(),
                "start on a full directory",
            )
            .with_context(|| format!("repeat {repeat}"))?;
        let attached = attached.context("sluice-proxy synced without logging `attached`")?;
        to_attached.push(micros(attached.duration_since(daemon.spawned)));
        to_synced.push(micros(synced.arrived.duration_since(daemon.spawned)));
        start_sync.push(synced.elapsed_us as f64);
        drop(daemon);

        // (2) Started on an empty directory, then the workload written as one file.
        let root = tempfile::tempdir()?;
        let manifests = root.path().join("manifests");
        std::fs::create_dir(&manifests)?;
        let ready = root.path().join("ready");
        let daemon = Daemon::start(proxy, &manifests, settle_ms, Some(&ready))?;
        let deadline = Instant::now() + FIRST_SYNC_TIMEOUT;
        while !ready.exists() {
            daemon.check_quiet()?;
            ensure!(
                Instant::now() < deadline,
                "sluice-proxy on an empty directory was not ready within {FIRST_SYNC_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon.check_quiet()?;
        let text = workload.manifests(0..workload.services, &changing_endpoint(0));
        let mut started = Instant::now();
        write_atomically(&manifests, "services.yaml", &text, || {
            started = Instant::now()
        })?;
        let (synced, _) = daemon
            .next_synced(
                FIRST_SYNC_TIMEOUT,
                workload.expected(),
                "the whole workload written into an empty directory",
            )
            .with_context(|| format!("repeat {repeat}"))?;
        write_to_synced.push(micros(synced.arrived.duration_since(started)));
        write_sync.push(synced.elapsed_us as f64);
        drop(daemon);
    }
    Ok(InitialResult {
        services: workload.services,
        endpoints_per_service: workload.endpoints_per_service,
        map_sizes: BENCH_MAP_SIZES,
        settle_ms,
        repeats,
        start_to_attached: summarize_us(&to_attached),
        start_to_synced: summarize_us(&to_synced),
        start_daemon_sync: summarize_us(&start_sync),
        write_to_synced: summarize_us(&write_to_synced),
        write_daemon_sync: summarize_us(&write_sync),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_addresses_are_distinct_and_outside_the_service_range() {
        let w = Workload::new(10_000, 10);
        let mut seen = std::collections::HashSet::new();
        for k in 0..w.services * w.endpoints_per_service {
            let a: std::net::Ipv4Addr = endpoint_address(k).parse().unwrap();
            let o = a.octets();
            assert!(o[1] >= 128 && o[3] >= 1 && o[3] <= 250, "{a}");
            assert!(seen.insert(a), "{a} twice");
        }
        for n in 0..1000 {
            let a: std::net::Ipv4Addr = changing_endpoint(n).parse().unwrap();
            assert!(!seen.contains(&a));
        }
        w.check_fits(BENCH_MAP_SIZES).unwrap();
        assert!(
            Workload::new(20_000, 10)
                .check_fits(BENCH_MAP_SIZES)
                .is_err()
        );
    }
}
