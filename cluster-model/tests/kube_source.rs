//! The Kubernetes API source against the in-process list/watch server, with the real kube client.

use std::sync::Arc;
use std::time::Duration;

use cluster_model::k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use cluster_model::k8s_openapi::api::discovery::v1::EndpointSlice;
use cluster_model::k8s_openapi::api::networking::v1::NetworkPolicy;
use cluster_model::kube::api::{ListParams, WatchEvent, WatchParams};
use cluster_model::kube::{Api, ResourceExt};
use cluster_model::testing::apiserver::{ApiServer, ServerOptions};
use cluster_model::{ClusterSnapshot, ClusterSource, KubeSource, ObjectKey, Problem, Reload};
use futures::StreamExt;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn from<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("test object")
}

fn namespace(name: &str, team: &str) -> Namespace {
    from(json!({"metadata": {"name": name, "labels": {"team": team}}}))
}

fn node(name: &str, ip: &str) -> Node {
    from(json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}],
            "images": [{"names": ["registry.example/big:1"], "sizeBytes": 1_000_000}]
        }
    }))
}

fn pod(name: &str, ip: &str, app: &str) -> Pod {
    from(json!({
        "metadata": {
            "name": name, "namespace": "prod", "labels": {"app": app},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{…}"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{
                "name": "c", "image": "registry.example/web:1", "env": [{"name": "A", "value": "1"}],
                "ports": [{"name": "http", "containerPort": 8080}]
            }]
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
}

fn service(name: &str, port: i32) -> Service {
    from(json!({
        "metadata": {"name": name, "namespace": "prod"},
        "spec": {
            "clusterIP": "10.96.0.10", "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "targetPort": "http"}]
        }
    }))
}

fn slice(name: &str, service: &str, ip: &str) -> EndpointSlice {
    from(json!({
        "metadata": {"name": name, "namespace": "prod", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
    }))
}

fn policy(name: &str, app: &str) -> NetworkPolicy {
    from(json!({
        "metadata": {"name": name, "namespace": "prod"},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"]}
    }))
}

/// A server holding one object of every kind.
async fn populated() -> ApiServer {
    let server = ApiServer::start().await.expect("server");
    server.apply(&namespace("prod", "a"));
    server.apply(&node("node-a", "192.0.2.1"));
    server.apply(&pod("web-1", "10.244.1.5", "web"));
    server.apply(&service("web", 80));
    server.apply(&slice("web-abc", "web", "10.244.1.5"));
    server.apply(&policy("deny", "web"));
    server
}

/// Waits for a change and reads it.
async fn next(source: &mut KubeSource) -> Reload {
    tokio::time::timeout(WAIT, async {
        assert!(source.changed().await, "source ended");
        source.reload().expect("a snapshot once notified")
    })
    .await
    .expect("a change within the time limit")
}

/// Reads snapshots until `done` holds; returns every snapshot read, the last one satisfying it.
async fn until(
    source: &mut KubeSource,
    done: impl Fn(&ClusterSnapshot) -> bool,
) -> Vec<Arc<ClusterSnapshot>> {
    let mut seen = Vec::new();
    if let Some(reload) = source.reload() {
        seen.push(Arc::clone(&reload.snapshot));
        if done(&reload.snapshot) {
            return seen;
        }
    }
    loop {
        let reload = next(source).await;
        seen.push(Arc::clone(&reload.snapshot));
        if done(&reload.snapshot) {
            return seen;
        }
    }
}

fn prod(name: &str) -> ObjectKey {
    ObjectKey::new("prod", name)
}

fn port(snapshot: &ClusterSnapshot, name: &str) -> Option<i32> {
    Some(
        snapshot
            .services
            .get(&prod(name))?
            .spec
            .as_ref()?
            .ports
            .as_ref()?[0]
            .port,
    )
}

/// The (kind, key) of every object in a snapshot, implied namespaces aside.
fn keys(snapshot: &ClusterSnapshot) -> Vec<String> {
    snapshot
        .objects()
        .map(|o| format!("{} {}", o.kind(), o.key()))
        .collect()
}

#[tokio::test]
async fn initial_sync_gives_the_snapshot_with_slices_from_the_api() {
    let server = populated().await;
    let mut source = KubeSource::start(server.client());
    let reload = next(&mut source).await;
    let snap = &reload.snapshot;
    assert_eq!(reload.new_problems, Vec::<Problem>::new());
    assert_eq!(
        keys(snap),
        [
            "Node node-a",
            "Namespace prod",
            "Pod prod/web-1",
            "Service prod/web",
            "EndpointSlice prod/web-abc",
            "NetworkPolicy prod/deny",
        ],
        "the API's slice and no derived one"
    );
    assert_eq!(port(snap, "web"), Some(80));
    let ns = &snap.namespaces["prod"];
    let labels = ns.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels["kubernetes.io/metadata.name"], "prod");
    assert_eq!(labels["team"], "a");

    // Lean: what the model does not read was dropped on arrival.
    let pod = &snap.pods[&prod("web-1")];
    assert!(pod.metadata.managed_fields.is_none());
    assert!(pod.metadata.annotations.is_none());
    let container = &pod.spec.as_ref().expect("spec").containers[0];
    assert_eq!(container.name, "c");
    assert!(container.image.is_none() && container.env.is_none());
    assert_eq!(
        container.ports.as_ref().expect("ports")[0].name.as_deref(),
        Some("http")
    );
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        Some("10.244.1.5")
    );
    let node = &snap.nodes["node-a"];
    let status = node.status.as_ref().expect("status");
    assert!(status.images.is_none());
    assert_eq!(
        status.addresses.as_ref().expect("addresses")[0].address,
        "192.0.2.1"
    );
    assert_eq!(
        node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()),
        Some("10.244.1.0/24")
    );
}

#[tokio::test]
async fn add_update_and_delete_of_every_kind_reach_the_snapshot() {
    let server = populated().await;
    let mut source = KubeSource::start(server.client());
    next(&mut source).await;

    // Add one more of every kind.
    server.apply(&namespace("staging", "b"));
    server.apply(&node("node-b", "192.0.2.2"));
    server.apply(&pod("api-1", "10.244.1.6", "api"));
    server.apply(&service("api", 81));
    server.apply(&slice("api-xyz", "api", "10.244.1.6"));
    server.apply(&policy("allow", "api"));
    let added = [
        "Node node-b",
        "Namespace staging",
        "Pod prod/api-1",
        "Service prod/api",
        "EndpointSlice prod/api-xyz",
        "NetworkPolicy prod/allow",
    ];
    until(&mut source, |s| {
        let k = keys(s);
        added.iter().all(|a| k.iter().any(|x| x == a))
    })
    .await;

    // Update every kind.
    server.apply(&namespace("staging", "c"));
    server.apply(&node("node-b", "192.0.2.3"));
    server.apply(&pod("api-1", "10.244.1.7", "api"));
    server.apply(&service("api", 82));
    server.apply(&slice("api-xyz", "api", "10.244.1.7"));
    server.apply(&policy("allow", "api-v2"));
    let snaps = until(&mut source, |s| {
        let team = s
            .namespaces
            .get("staging")
            .and_then(|n| n.metadata.labels.as_ref()?.get("team").cloned());
        let node_ip = s
            .nodes
            .get("node-b")
            .and_then(|n| Some(n.status.as_ref()?.addresses.as_ref()?[0].address.clone()));
        let pod_ip = s
            .pods
            .get(&prod("api-1"))
            .and_then(|p| p.status.as_ref()?.pod_ip.clone());
        let ep = s
            .endpoint_slices
            .get(&prod("api-xyz"))
            .map(|e| e.endpoints[0].addresses[0].clone());
        let app = s.network_policies.get(&prod("allow")).and_then(|p| {
            p.spec
                .as_ref()?
                .pod_selector
                .as_ref()?
                .match_labels
                .as_ref()?
                .get("app")
                .cloned()
        });
        team.as_deref() == Some("c")
            && node_ip.as_deref() == Some("192.0.2.3")
            && pod_ip.as_deref() == Some("10.244.1.7")
            && port(s, "api") == Some(82)
            && ep.as_deref() == Some("10.244.1.7")
            && app.as_deref() == Some("api-v2")
    })
    .await;
    for s in &snaps {
        assert_eq!(
            keys(s).len(),
            12,
            "nothing vanished while updating: {:?}",
            keys(s)
        );
    }

    // Delete every kind's new object.
    server.delete::<Namespace>("", "staging");
    server.delete::<Node>("", "node-b");
    server.delete::<Pod>("prod", "api-1");
    server.delete::<Service>("prod", "api");
    server.delete::<EndpointSlice>("prod", "api-xyz");
    server.delete::<NetworkPolicy>("prod", "allow");
    let snaps = until(&mut source, |s| keys(s).len() == 6).await;
    assert_eq!(
        keys(snaps.last().expect("snapshot")),
        [
            "Node node-a",
            "Namespace prod",
            "Pod prod/web-1",
            "Service prod/web",
            "EndpointSlice prod/web-abc",
            "NetworkPolicy prod/deny",
        ]
    );
}

#[tokio::test]
async fn dropped_watches_resume_without_a_relist() {
    let server = populated().await;
    let mut source = KubeSource::start(server.client());
    next(&mut source).await;
    let lists = server.lists("services");
    let watches = server.watches("services");
    let all_before = keys(&source.reload().expect("snapshot").snapshot);

    server.drop_watches();
    server.apply(&service("web", 90));
    let snaps = until(&mut source, |s| port(s, "web") == Some(90)).await;
    for s in &snaps {
        let k = keys(s);
        for key in &all_before {
            assert!(
                k.contains(key),
                "{key} missing from an intermediate snapshot"
            );
        }
    }
    assert!(
        server.watches("services") > watches,
        "the watch was opened again"
    );
    assert_eq!(
        server.lists("services"),
        lists,
        "resumed from its resourceVersion, no relist"
    );

    // And again, with a change made while the watch is down.
    server.drop_watches();
    server.apply(&service("web", 91));
    server.drop_watches();
    until(&mut source, |s| port(s, "web") == Some(91)).await;
    assert_eq!(server.lists("services"), lists);
}

#[tokio::test]
async fn gone_relists_without_spurious_deletes() {
    // No bookmarks: the watchers' versions stay old, so after compaction every kind gets 410.
    let server = ApiServer::start_with(ServerOptions {
        bookmark_interval: Duration::from_secs(3600),
    })
    .await
    .expect("server");
    server.apply(&namespace("prod", "a"));
    server.apply(&node("node-a", "192.0.2.1"));
    for i in 0..20 {
        server.apply(&service(&format!("svc-{i}"), 80));
    }
    server.apply(&pod("web-1", "10.244.1.5", "web"));
    server.apply(&slice("web-abc", "web", "10.244.1.5"));
    server.apply(&policy("deny", "web"));
    let mut source = KubeSource::start(server.client());
    let first = next(&mut source).await;
    assert_eq!(first.snapshot.services.len(), 20);
    let lists = server.lists("services");

    // While the watches are down: one Service goes, one comes, one changes; the log is compacted.
    server.set_reachable(false).await.expect("down");
    server.delete::<Service>("prod", "svc-0");
    server.apply(&service("svc-new", 80));
    server.apply(&service("svc-1", 81));
    server.compact();
    server.set_reachable(true).await.expect("up");

    let snaps = until(&mut source, |s| {
        s.services.contains_key(&prod("svc-new"))
            && !s.services.contains_key(&prod("svc-0"))
            && port(s, "svc-1") == Some(81)
    })
    .await;
    assert!(
        server.lists("services") > lists,
        "410 made the watcher list again"
    );
    for s in &snaps {
        for i in 1..20 {
            assert!(
                s.services.contains_key(&prod(&format!("svc-{i}"))),
                "svc-{i} missing from an intermediate snapshot"
            );
        }
        assert!(s.nodes.contains_key("node-a") && s.pods.contains_key(&prod("web-1")));
        assert!(s.endpoint_slices.contains_key(&prod("web-abc")));
        assert!(s.network_policies.contains_key(&prod("deny")));
    }
    let last = snaps.last().expect("snapshot");
    assert_eq!(last.services.len(), 20);

    // Watching goes on after the relist.
    server.apply(&service("svc-2", 82));
    until(&mut source, |s| port(s, "svc-2") == Some(82)).await;
}

#[tokio::test]
async fn bookmarks_keep_a_quiet_kind_from_relisting_after_compaction() {
    let server = ApiServer::start_with(ServerOptions {
        bookmark_interval: Duration::from_millis(200),
    })
    .await
    .expect("server");
    server.apply(&node("node-a", "192.0.2.1"));
    let mut source = KubeSource::start(server.client());
    next(&mut source).await;
    let node_lists = server.lists("nodes");
    // Services move the resourceVersion far past the nodes' last event.
    for i in 0..5 {
        server.apply(&service(&format!("svc-{i}"), 80));
    }
    until(&mut source, |s| s.services.len() == 5).await;
    tokio::time::sleep(Duration::from_millis(800)).await; // a few bookmarks
    server.set_reachable(false).await.expect("down");
    server.compact();
    server.set_reachable(true).await.expect("up");
    server.apply(&node("node-b", "192.0.2.2"));
    until(&mut source, |s| s.nodes.contains_key("node-b")).await;
    assert_eq!(
        server.lists("nodes"),
        node_lists,
        "resumed from a bookmark's version, newer than the compaction"
    );
}

#[tokio::test]
async fn an_invalid_object_is_reported_once_and_its_last_valid_version_kept() {
    let server = populated().await;
    let mut source = KubeSource::start(server.client());
    next(&mut source).await;

    server.apply(&service("web", 0)); // port 0: invalid
    let reload = next(&mut source).await;
    assert_eq!(
        port(&reload.snapshot, "web"),
        Some(80),
        "last valid version kept"
    );
    assert_eq!(reload.new_problems.len(), 1, "{:?}", reload.new_problems);
    let problem = &reload.new_problems[0];
    assert_eq!(problem.object.as_deref(), Some("Service prod/web"));
    assert_eq!(problem.field.as_deref(), Some("spec.ports[0].port"));

    // Unrelated changes do not report it again.
    server.apply(&policy("other", "x"));
    let reload = next(&mut source).await;
    assert!(
        reload
            .snapshot
            .network_policies
            .contains_key(&prod("other"))
    );
    assert_eq!(reload.new_problems, vec![]);
    assert_eq!(port(&reload.snapshot, "web"), Some(80));

    // An object that was never valid is reported and left out.
    server.apply(&service("Bad_Name", 80));
    let reload = next(&mut source).await;
    assert_eq!(reload.new_problems.len(), 1, "{:?}", reload.new_problems);
    assert_eq!(
        reload.new_problems[0].field.as_deref(),
        Some("metadata.name")
    );
    assert!(!reload.snapshot.services.contains_key(&prod("Bad_Name")));

    // Fixed: applied.
    server.apply(&service("web", 8080));
    until(&mut source, |s| port(s, "web") == Some(8080)).await;
    // Broken the same way again: reported again (it went away and came back).
    server.apply(&service("web", 0));
    let reload = next(&mut source).await;
    assert_eq!(port(&reload.snapshot, "web"), Some(8080));
    assert_eq!(reload.new_problems.len(), 1, "{:?}", reload.new_problems);
}

#[tokio::test]
async fn unreachable_api_keeps_the_last_snapshot_and_catches_up() {
    let server = populated().await;
    let mut source = KubeSource::start(server.client());
    let first = next(&mut source).await;
    let before = keys(&first.snapshot);

    server.set_reachable(false).await.expect("down");
    server.apply(&service("web", 81));
    server.apply(&service("late", 82));
    // Down for a few seconds: nothing changes, nothing is lost.
    let quiet = tokio::time::timeout(Duration::from_secs(3), source.changed()).await;
    assert!(quiet.is_err(), "no change while the API is unreachable");
    let still = source.reload().expect("snapshot");
    assert_eq!(keys(&still.snapshot), before);
    assert_eq!(port(&still.snapshot, "web"), Some(80));

    server.set_reachable(true).await.expect("up");
    let snaps = until(&mut source, |s| {
        port(s, "web") == Some(81) && s.services.contains_key(&prod("late"))
    })
    .await;
    for s in &snaps {
        let k = keys(s);
        for key in &before {
            assert!(k.contains(key), "{key} missing after reconnecting");
        }
    }
}

#[tokio::test]
async fn nothing_is_published_before_every_kind_is_listed() {
    let server = populated().await;
    server.set_reachable(false).await.expect("down");
    let mut source = KubeSource::start(server.client());
    let early = tokio::time::timeout(Duration::from_secs(2), source.changed()).await;
    assert!(early.is_err());
    assert!(source.reload().is_none());
    assert!(!source.is_synced());
    server.set_reachable(true).await.expect("up");
    let reload = next(&mut source).await;
    assert_eq!(keys(&reload.snapshot).len(), 6);
}

/// The server itself, through the kube client: selectors, replay, 410.
#[tokio::test]
async fn server_lists_and_watches_like_the_api() {
    let server = ApiServer::start().await.expect("server");
    let mut other = pod("other", "10.244.2.1", "db");
    other.spec.as_mut().expect("spec").node_name = Some("node-b".into());
    server.apply(&pod("web-1", "10.244.1.5", "web"));
    server.apply(&other);
    let pods: Api<Pod> = Api::all(server.client());

    let names = |list: cluster_model::kube::core::ObjectList<Pod>| -> Vec<String> {
        list.items.iter().map(|p| p.name_any()).collect()
    };
    let by_label = pods
        .list(&ListParams::default().labels("app in (web,api)"))
        .await
        .expect("list");
    assert_eq!(names(by_label), ["web-1"]);
    let by_field = pods
        .list(&ListParams::default().fields("spec.nodeName=node-b"))
        .await
        .expect("list");
    assert_eq!(names(by_field), ["other"]);
    let none = pods
        .list(&ListParams::default().labels("!app"))
        .await
        .expect("list");
    assert!(none.items.is_empty());
    let bad = pods.list(&ListParams::default().fields("spec.foo=1")).await;
    assert!(bad.is_err(), "unsupported field selector refused");
    let in_ns: Api<Pod> = Api::namespaced(server.client(), "prod");
    let listed = in_ns.list(&ListParams::default()).await.expect("list");
    let rv = listed
        .metadata
        .resource_version
        .clone()
        .expect("resourceVersion");
    assert_eq!(rv, server.resource_version().to_string());

    // Replay from a version: only later events, with a selector's transitions.
    let mut moved = pod("web-1", "10.244.1.5", "api");
    moved.metadata.resource_version = None;
    server.apply(&moved); // leaves app=web: DELETED for that watch
    server.delete::<Pod>("prod", "other");
    let stream = pods
        .watch(&WatchParams::default().labels("app=web"), &rv)
        .await
        .expect("watch");
    let mut stream = std::pin::pin!(stream);
    match stream.next().await {
        Some(Ok(WatchEvent::Deleted(p))) => assert_eq!(p.name_any(), "web-1"),
        other => panic!("expected DELETED web-1, got {other:?}"),
    }

    // Compacted: a watch from an old version gets 410 Expired as an ERROR event.
    server.compact();
    let stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch");
    let mut stream = std::pin::pin!(stream);
    match stream.next().await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn both_sources_behind_one_interface() {
    let server = populated().await;
    let mut source = ClusterSource::kubernetes(KubeSource::start(server.client()));
    let trigger = tokio::time::timeout(WAIT, source.changed())
        .await
        .expect("listed");
    assert_eq!(trigger, Some("startup"));
    let reload = source.reload().expect("snapshot");
    assert_eq!(keys(&reload.snapshot).len(), 6);
    server.apply(&service("web", 81));
    let trigger = tokio::time::timeout(WAIT, source.changed())
        .await
        .expect("change");
    assert_eq!(trigger, Some("api changed"));

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80}]}\n",
    )
    .expect("write");
    let mut source =
        ClusterSource::manifests(dir.path(), Duration::from_millis(10)).expect("watch");
    assert_eq!(
        source.changed().await,
        Some("startup"),
        "read at once the first time"
    );
    let reload = source.reload().expect("snapshot");
    assert!(
        reload
            .snapshot
            .services
            .contains_key(&ObjectKey::new("default", "web"))
    );
    std::fs::write(dir.path().join("more.yaml"), "").expect("write");
    let trigger = tokio::time::timeout(WAIT, source.changed())
        .await
        .expect("change");
    assert_eq!(trigger, Some("manifests changed"));
}

fn ingress(name: &str) -> cluster_model::Ingress {
    from(json!({
        "metadata": {
            "name": name, "namespace": "prod",
            "annotations": {
                "nginx.ingress.kubernetes.io/ssl-redirect": "false",
                "kubectl.kubernetes.io/last-applied-configuration": "{…}"
            }
        },
        "spec": {
            "ingressClassName": "sluice",
            "rules": [{"host": "web.example", "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}
            }]}}],
            "tls": [{"hosts": ["web.example"], "secretName": "web-tls"}]
        }
    }))
}

fn secret(name: &str, type_: &str) -> cluster_model::Secret {
    from(json!({
        "metadata": {"name": name, "namespace": "prod"},
        "type": type_,
        // "cert" and "key", base64; whether they are PEM is the controller's business.
        "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5", "extra": "eA=="}
    }))
}

#[tokio::test]
async fn ingress_kinds_are_watched_only_when_asked_and_only_tls_secrets_are_kept() {
    let server = populated().await;
    server.apply(&ingress("web"));
    server.apply::<cluster_model::IngressClass>(&from(json!({
        "metadata": {"name": "sluice", "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
        "spec": {"controller": "sluice.dev/ingress"}
    })));
    server.apply(&secret("web-tls", "kubernetes.io/tls"));
    server.apply(&secret("db-password", "Opaque"));

    // The proxy's kinds: no Ingress, no Secret.
    let mut proxy = KubeSource::start(server.client());
    let snap = next(&mut proxy).await.snapshot;
    assert!(
        snap.ingresses.is_empty() && snap.secrets.is_empty() && snap.ingress_classes.is_empty()
    );
    assert_eq!(snap.pods.len(), 1);

    let mut source = KubeSource::start_kinds(
        server.client(),
        cluster_model::Kind::INGRESS,
        Default::default(),
    );
    let reload = next(&mut source).await;
    assert_eq!(reload.new_problems, Vec::<Problem>::new());
    let snap = &reload.snapshot;
    assert!(snap.pods.is_empty() && snap.nodes.is_empty(), "not watched");
    assert_eq!(snap.secrets.keys().collect::<Vec<_>>(), [&prod("web-tls")]);
    let data = snap.secrets[&prod("web-tls")].data.as_ref().expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["tls.crt", "tls.key"]);
    assert_eq!(data["tls.crt"].0, b"cert");
    let annotations = snap.ingresses[&prod("web")]
        .metadata
        .annotations
        .as_ref()
        .expect("annotations kept on Ingress");
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/ssl-redirect"],
        "false"
    );
    assert!(!annotations.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
    let class = &snap.ingress_classes["sluice"];
    assert_eq!(
        class
            .metadata
            .annotations
            .as_ref()
            .expect("annotations kept on IngressClass")["ingressclass.kubernetes.io/is-default-class"],
        "true"
    );

    // A TLS Secret missing its key is reported by name and field; its last valid version stays.
    let mut broken = secret("web-tls", "kubernetes.io/tls");
    broken.data.as_mut().expect("data").remove("tls.key");
    server.apply(&broken);
    let reload = next(&mut source).await;
    assert_eq!(reload.new_problems.len(), 1, "{:?}", reload.new_problems);
    let problem = reload.new_problems[0].to_string();
    assert!(
        problem.contains("Secret prod/web-tls") && problem.contains("data[tls.key]"),
        "{problem}"
    );
    assert!(
        reload.snapshot.secrets[&prod("web-tls")]
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("tls.key"))
    );
}
