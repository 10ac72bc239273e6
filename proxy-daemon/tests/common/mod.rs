//! What the daemon tests share: a cgroup of their own, the daemon started with JSON logs and
//! stopped by its PID, and waiting for its log events.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PROXY: &str = env!("CARGO_BIN_EXE_sluice-proxy");

/// Stops the daemon (SIGTERM, by the PID we started), removes what it pinned (SIGTERM leaves
/// its programs attached, as for a restart) and the cgroup.
pub struct DaemonGuard {
    pub child: Child,
    pub cgroup: PathBuf,
    /// Its `--bpffs-dir`.
    pub pins: PathBuf,
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        // SAFETY: signalling a child we spawned and have not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new(PROXY)
            .arg("cleanup")
            .arg("--bpffs-dir")
            .arg(&self.pins)
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// The pin directory of a test daemon (each its own: tests run in parallel).
pub fn pin_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/sluice/test-{tag}-{}",
        std::process::id()
    ))
}

pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if !right.starts_with("cgroup2 ") {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

/// Whether the test can run (root, cgroup2); prints SKIPPED with the reason when not.
pub fn can_run(test: &str) -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED (needs root): {test}");
        return None;
    }
    let root = cgroup2_root();
    if root.is_none() {
        eprintln!("SKIPPED (no cgroup2 mount): {test}");
    }
    root
}

/// Starts the daemon with `args` (plus `--cgroup` and JSON logs) in a new cgroup named after
/// `tag`; its log events arrive on the receiver.
pub fn start(
    cgroup_root: &std::path::Path,
    tag: &str,
    args: &[&str],
) -> (DaemonGuard, mpsc::Receiver<Value>) {
    start_with_env(cgroup_root, tag, args, &[])
}

pub fn start_with_env(
    cgroup_root: &std::path::Path,
    tag: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (DaemonGuard, mpsc::Receiver<Value>) {
    let cgroup = cgroup_root.join(format!("sluice-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("cgroup");
    let pins = pin_dir(tag);
    let child = Command::new(PROXY)
        .args(args)
        .args(["--log-format", "json"])
        .arg("--cgroup")
        .arg(&cgroup)
        .arg("--bpffs-dir")
        .arg(&pins)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start sluice-proxy");
    let mut guard = DaemonGuard {
        child,
        cgroup,
        pins,
    };
    let stderr = guard.child.stderr.take().expect("stderr");
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            match serde_json::from_str::<Value>(&line) {
                Ok(event) => {
                    if tx.send(event).is_err() {
                        return;
                    }
                }
                Err(_) => eprintln!("sluice-proxy: {line}"),
            }
        }
    });
    (guard, events)
}

/// Waits for a log event named `name` satisfying `want`; fails on `fatal`.
pub fn wait_event(
    events: &mpsc::Receiver<Value>,
    name: &str,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("sluice-proxy did not report {what} within 60 s"));
        match event["event"].as_str() {
            Some("fatal") => panic!("sluice-proxy failed: {event}"),
            Some(n) if n == name && want(&event) => return event,
            _ => {}
        }
    }
}

/// Waits for a `synced` log event satisfying `want`.
pub fn wait_synced(events: &mpsc::Receiver<Value>, what: &str, want: impl Fn(&Value) -> bool) {
    wait_event(events, "synced", what, want);
}

/// Runs `cmd` as a process of `cgroup` (so the socket programs translate its connections);
/// its output.
pub fn output_in_cgroup(cgroup: &std::path::Path, cmd: &mut Command) -> std::process::Output {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let fd = procs.as_raw_fd();
    // SAFETY: the hook only calls write(2) on an fd opened before the fork: no allocation,
    // no locks, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run the client");
    drop(procs);
    out
}
