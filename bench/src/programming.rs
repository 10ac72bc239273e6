//! Programming latency: time from a manifest change on disk to the moment
//! sluice-proxy reports the maps updated.
//!
//! sluice-proxy runs on its own temporary cgroup and manifest directory (no
//! lab needed: the maps are programmed the same way). Each change rewrites a
//! hand-written EndpointSlice with a new endpoint address, atomically (write
//! then rename, as editors and kubectl-style tools do); the clock starts just
//! before the rename and stops when the daemon's `synced` log line arrives on
//! the pipe, so the figure includes the watch, settle window, reload, compile,
//! diff and map writes, plus the pipe — an upper bound.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::stats::{Summary, micros, summarize_us};

#[derive(Clone, Debug, Serialize)]
pub struct ProgrammingResult {
    pub services: usize,
    pub changes: usize,
    pub settle_ms: u64,
    pub latency: Summary,
    pub samples_us: Vec<f64>,
}

/// Stops the daemon (SIGTERM, by the PID we started) and removes the cgroup.
struct DaemonGuard {
    child: Child,
    cgroup: PathBuf,
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        // SAFETY: signalling a child we spawned and have not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// A Service `svc-INDEX` with one ready endpoint, as a hand-written slice.
fn service_manifest(index: usize, endpoint: &str) -> String {
    let (hi, lo) = (1 + index / 250, 1 + index % 250);
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{index}, namespace: default}}\n\
         spec: {{clusterIP: 10.96.{hi}.{lo}, ports: [{{name: http, port: 80}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc-{index}-1, namespace: default, labels: {{kubernetes.io/service-name: svc-{index}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints: [{{addresses: [\"{endpoint}\"], conditions: {{ready: true}}}}]\n"
    )
}

/// The endpoint of the changing Service at change number `n`.
fn changing_endpoint(n: usize) -> String {
    format!("10.244.{}.{}", 100 + n / 250 % 100, 1 + n % 250)
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

pub fn run(
    proxy: &Path,
    services: usize,
    changes: usize,
    settle_ms: u64,
) -> Result<ProgrammingResult> {
    let manifests = tempfile::tempdir()?;
    // Services split over files the way a real directory would be; the
    // first file holds the Service whose endpoints change.
    write_atomically(
        manifests.path(),
        "changing.yaml",
        &service_manifest(0, &changing_endpoint(0)),
        || {},
    )?;
    if services > 1 {
        let others: String = (1..services)
            .map(|i| service_manifest(i, &format!("10.244.{}.{}", 1 + i / 250, 1 + i % 250)))
            .collect();
        write_atomically(manifests.path(), "others.yaml", &others, || {})?;
    }

    let cgroup =
        sluice_lab::cgroup::cgroup2_root()?.join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let child = Command::new(proxy)
        .args([
            "--node",
            "bench",
            "--log-format",
            "json",
            "--service-cidr",
            "10.96.0.0/12",
        ])
        .arg("--manifests")
        .arg(manifests.path())
        .arg("--cgroup")
        .arg(&cgroup)
        .arg("--settle-ms")
        .arg(settle_ms.to_string())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", proxy.display()))?;
    let mut guard = DaemonGuard { child, cgroup };

    let stderr = guard.child.stderr.take().context("daemon stderr")?;
    let (synced_tx, synced_rx) = mpsc::channel::<Instant>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let arrived = Instant::now();
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            match event["event"].as_str() {
                Some("synced") if synced_tx.send(arrived).is_err() => return,
                Some("synced") => {}
                Some("fatal") | Some("sync_error") | Some("invalid_input") => {
                    eprintln!("sluice-proxy: {line}");
                }
                _ => {}
            }
        }
    });

    synced_rx
        .recv_timeout(Duration::from_secs(60))
        .context("sluice-proxy did not finish its first sync within 60 s")?;
    let mut samples = Vec::with_capacity(changes);
    for change in 1..=changes {
        let text = service_manifest(0, &changing_endpoint(change));
        let mut started = Instant::now();
        write_atomically(manifests.path(), "changing.yaml", &text, || {
            started = Instant::now()
        })?;
        let done = synced_rx
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("change {change} was not programmed within 10 s"))?;
        samples.push(micros(done.duration_since(started)));
        // Let each change stand alone, so none is folded into the next.
        std::thread::sleep(Duration::from_millis(settle_ms + 20));
        while synced_rx.try_recv().is_ok() {}
    }
    if samples.len() != changes {
        bail!("measured {} of {changes} changes", samples.len());
    }
    drop(guard);
    Ok(ProgrammingResult {
        services,
        changes,
        settle_ms,
        latency: summarize_us(&samples),
        samples_us: samples,
    })
}
