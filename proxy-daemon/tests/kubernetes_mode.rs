//! sluice-proxy with `--kubernetes`: it programs the Services the API serves (here the
//! in-process list/watch server, reached through a kubeconfig file) and removes one deleted
//! through the API.
//!
//! Programming the maps needs root (BPF, cgroups); without it the test prints SKIPPED and
//! passes. The flag checks run anywhere.

mod common;

use cluster_model::k8s_openapi::api::core::v1::{Namespace, Node, Service};
use cluster_model::k8s_openapi::api::discovery::v1::EndpointSlice;
use cluster_model::testing::apiserver::ApiServer;
use serde_json::{Value, json};

use common::{PROXY, can_run, start_with_env, wait_synced};
use std::process::Command;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_services_from_the_api_and_removes_deleted_ones() {
    let Some(cgroup_root) = can_run("programs_services_from_the_api_and_removes_deleted_ones")
    else {
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
    let kubeconfig = kubeconfig.to_str().expect("utf-8 path");
    // The node name as the downward API gives it.
    let (guard, events) = start_with_env(
        &cgroup_root,
        "kube-e2e",
        &[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig,
            "--service-cidr",
            "10.96.0.0/12",
        ],
        &[("NODE_NAME", "kube-e2e")],
    );

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
