//! sluice-proxy with `--kubernetes`: it programs the Services the API serves (here the
//! in-process list/watch server, reached through a kubeconfig file) and removes one deleted
//! through the API.
//!
//! Programming the maps needs root (BPF, cgroups); without it the test prints SKIPPED and
//! passes. The flag checks run anywhere.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cluster_model::k8s_openapi::api::core::v1::{Namespace, Node, Service};
use cluster_model::k8s_openapi::api::discovery::v1::EndpointSlice;
use cluster_model::testing::apiserver::ApiServer;
use serde_json::{Value, json};

const PROXY: &str = env!("CARGO_BIN_EXE_sluice-proxy");

fn from<T: for<'de> cluster_model::k8s_openapi::serde::Deserialize<'de>>(value: Value) -> T {
    serde_json::from_value(value).expect("test object")
}

fn service(name: &str, ip: &str) -> Service {
    from(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
}

fn slice(service: &str, ip: &str) -> EndpointSlice {
    from(json!({
        "metadata": {
            "name": format!("{service}-abc"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": "kube-e2e"}]
    }))
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

fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if !right.starts_with("cgroup2 ") {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

/// Waits for a `synced` log event satisfying `want`; fails on `fatal`.
fn wait_synced(events: &mpsc::Receiver<Value>, what: &str, want: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let event = events
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("sluice-proxy did not report {what} within 60 s"));
        match event["event"].as_str() {
            Some("fatal") => panic!("sluice-proxy failed: {event}"),
            Some("synced") if want(&event) => return,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_services_from_the_api_and_removes_deleted_ones() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED (needs root): programs_services_from_the_api_and_removes_deleted_ones");
        return;
    }
    let Some(cgroup_root) = cgroup2_root() else {
        eprintln!(
            "SKIPPED (no cgroup2 mount): programs_services_from_the_api_and_removes_deleted_ones"
        );
        return;
    };

    let server = ApiServer::start().await.expect("server");
    server.apply::<Namespace>(&from(json!({"metadata": {"name": "default"}})));
    server.apply::<Node>(&from(json!({
        "metadata": {"name": "kube-e2e"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}
    })));
    server.apply(&service("web", "10.96.77.1"));
    server.apply(&slice("web", "10.244.77.1"));
    server.apply(&service("api", "10.96.77.2"));
    server.apply(&slice("api", "10.244.77.2"));

    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let cgroup = cgroup_root.join(format!("sluice-kube-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("cgroup");
    let child = Command::new(PROXY)
        .args(["--kubernetes", "--log-format", "json"])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cgroup")
        .arg(&cgroup)
        .args(["--service-cidr", "10.96.0.0/12"])
        // The node name as the downward API gives it.
        .env("NODE_NAME", "kube-e2e")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start sluice-proxy");
    let mut guard = DaemonGuard { child, cgroup };
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

    let events = tokio::task::spawn_blocking(move || {
        wait_synced(&events, "both Services programmed", |e| {
            e["frontends"] == 2 && e["trigger"] == "startup"
        });
        events
    })
    .await
    .expect("waiting");

    server.delete::<Service>("default", "api");
    tokio::task::spawn_blocking(move || {
        wait_synced(&events, "the deleted Service removed", |e| {
            e["frontends"] == 1 && e["frontends_removed"] == 1 && e["trigger"] == "api changed"
        });
    })
    .await
    .expect("waiting");
    drop(guard);
}

#[test]
fn exactly_one_source_is_required() {
    let run = |args: &[&str]| {
        let out = Command::new(PROXY)
            .args(args)
            .env_remove("NODE_NAME")
            .output()
            .expect("run sluice-proxy");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--node", "n", "--cgroup", "/nonexistent"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--manifests") && err.contains("--kubernetes"),
        "{err}"
    );

    let (code, err) = run(&[
        "--node",
        "n",
        "--cgroup",
        "/nonexistent",
        "--manifests",
        "/tmp",
        "--kubernetes",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");

    let (code, err) = run(&[
        "--node",
        "n",
        "--cgroup",
        "/nonexistent",
        "--manifests",
        "/tmp",
        "--kubeconfig",
        "/k",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");

    let (code, err) = run(&["--kubernetes", "--cgroup", "/nonexistent"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--node"),
        "--node (or NODE_NAME) is required: {err}"
    );
}
