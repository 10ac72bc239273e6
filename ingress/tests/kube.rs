//! `sluice-ingress` on the Kubernetes API: the real binary against the in-process list/watch
//! server (cluster-model's `testing::apiserver`), through a kubeconfig file.

mod common;

use cluster_model::k8s_openapi::api::discovery::v1::EndpointSlice;
use cluster_model::testing::apiserver::ApiServer;
use cluster_model::{Ingress as IngressObject, IngressClass, Secret, Service};
use common::*;
use serde_json::{Value, json};

fn from<T: cluster_model::k8s_openapi::serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("test object")
}

fn web_ingress(path: &str, tls: bool) -> IngressObject {
    let mut spec = json!({
        "ingressClassName": "sluice",
        "rules": [{"host": "web.example", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
            {"path": path, "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"name": "http"}}}}
        ]}}]
    });
    if tls {
        spec["tls"] = json!([{"hosts": ["web.example"], "secretName": "web-tls"}]);
    }
    from(json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec}))
}

fn service(name: &str) -> Service {
    from(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
}

fn slice(name: &str, addr: std::net::SocketAddr) -> EndpointSlice {
    from(json!({
        "metadata": {"name": format!("{name}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": addr.port(), "protocol": "TCP"}],
        "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}]
    }))
}

fn secret(type_: &str, (cert, key): &(String, String)) -> Secret {
    from(json!({
        "metadata": {"name": "web-tls", "namespace": "default"},
        "type": type_,
        "stringData": {"tls.crt": cert, "tls.key": key}
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_certificates_follow_the_api() {
    let web = backend("web", [127, 0, 0, 11]).await;
    let api = backend("api", [127, 0, 0, 12]).await;
    let server = ApiServer::start().await.expect("API server");
    server.apply::<IngressClass>(&from(json!({
        "metadata": {"name": "sluice"}, "spec": {"controller": "sluice.dev/ingress"}
    })));
    server.apply(&service("web"));
    server.apply(&service("api"));
    server.apply(&slice("web", web.addr));
    server.apply(&slice("api", api.addr));
    server.apply(&web_ingress("/api", false));
    let tmp = tempfile::tempdir().expect("temp dir");
    let kubeconfig = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let ingress = Ingress::start_with(
        &["--kubeconfig".into(), kubeconfig.clone().into()],
        &tmp.path().join("ingress.log"),
    )
    .await;

    let (status, body, _) = ingress.get("web.example", "/api/x").await;
    assert_eq!((status, field(&body, "backend")), (200, "api"), "{body}");
    let (_, body, _) = ingress.get("web.example", "/other").await;
    assert_eq!(field(&body, "backend"), "web");
    // Only the kinds the controller reads are listed: never Pods or Nodes.
    assert_eq!(server.lists("pods") + server.lists("nodes"), 0);

    // An Ingress change in the API applies without restart.
    server.apply(&web_ingress("/other", false));
    eventually("the new route", || async {
        field(&ingress.get("web.example", "/other").await.1, "backend") == "api"
    })
    .await
    .unwrap_or_else(|| panic!("route change not applied; log:\n{}", ingress.log_text()));

    // TLS from a Secret in the API; a Secret of another type is never read.
    let ca = Ca::new();
    let cert = ca.leaf(&["web.example"]);
    server.apply(&secret("Opaque", &cert));
    server.apply(&web_ingress("/other", true));
    eventually("the redirect of a TLS host", || async {
        ingress.get("web.example", "/").await.0 == 308
    })
    .await
    .unwrap_or_else(|| panic!("TLS not applied; log:\n{}", ingress.log_text()));
    let client = || ingress.https_client(&ca.pem, &["web.example"]);
    assert!(
        get_tls(&client(), ingress.https, "web.example", "/")
            .await
            .is_err(),
        "an Opaque Secret gives no certificate: the default is served and not trusted"
    );
    server.apply(&secret("kubernetes.io/tls", &cert));
    eventually("the certificate", || async {
        get_tls(&client(), ingress.https, "web.example", "/")
            .await
            .is_ok_and(|(status, _, served, _)| status == 200 && served == der_of(&cert.0))
    })
    .await
    .unwrap_or_else(|| panic!("certificate not served; log:\n{}", ingress.log_text()));
}

fn status_ips(server: &ApiServer, name: &str) -> Vec<String> {
    server
        .objects::<IngressObject>()
        .into_iter()
        .filter(|i| i.metadata.name.as_deref() == Some(name))
        .flat_map(|i| sluice_ingress::status::current(&i))
        .map(|a| a.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_addresses_and_events_are_written_to_the_api() {
    use cluster_model::k8s_openapi::api::events::v1::Event;
    let web = backend("web", [127, 0, 0, 13]).await;
    let server = ApiServer::start().await.expect("API server");
    server.apply::<IngressClass>(&from(json!({
        "metadata": {"name": "sluice"}, "spec": {"controller": "sluice.dev/ingress"}
    })));
    server.apply(&service("web"));
    server.apply(&slice("web", web.addr));
    server.apply(&web_ingress("/api", false));
    let mut theirs = web_ingress("/api", false);
    theirs.metadata.name = Some("theirs".into());
    theirs.spec.as_mut().unwrap().ingress_class_name = Some("nginx".into());
    server.apply(&theirs);
    let controller_service = |ip: &str| -> Service {
        from(json!({
            "metadata": {"name": "sluice-ingress", "namespace": "sluice-system"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}
        }))
    };
    server.apply(&controller_service("198.18.0.10"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let kubeconfig = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let ingress = Ingress::start_opts(
        &["--kubeconfig".into(), kubeconfig.clone().into()],
        &tmp.path().join("ingress.log"),
        &["--publish-service", "sluice-system/sluice-ingress"],
    )
    .await;

    eventually("the status address", || async {
        status_ips(&server, "web") == ["198.18.0.10"]
    })
    .await
    .unwrap_or_else(|| panic!("status not written; log:\n{}", ingress.log_text()));
    assert!(
        status_ips(&server, "theirs").is_empty(),
        "an Ingress of another class is left alone"
    );

    // The load balancer's address changes: the Ingress follows.
    server.apply(&controller_service("198.18.0.11"));
    eventually("the new status address", || async {
        status_ips(&server, "web") == ["198.18.0.11"]
    })
    .await
    .unwrap_or_else(|| panic!("status not updated; log:\n{}", ingress.log_text()));

    // A problem with one of our Ingresses becomes a Warning Event about it.
    let canary: IngressObject = from(json!({
        "metadata": {"name": "lonely-canary", "namespace": "default",
                     "annotations": {"nginx.ingress.kubernetes.io/canary": "true"}},
        "spec": {"ingressClassName": "sluice", "rules": [{"host": "nowhere.example", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}
        ]}}]}
    }));
    server.apply(&canary);
    eventually("a Warning Event", || async {
        server.objects::<Event>().iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("lonely-canary")
                && e.type_.as_deref() == Some("Warning")
                && e.note.as_deref().is_some_and(|n| n.contains("canary"))
                && e.reporting_controller.as_deref() == Some("sluice-ingress")
        })
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no Event; events: {:?}\nlog:\n{}",
            server.objects::<Event>(),
            ingress.log_text()
        )
    });
    // Status is written once per change, not on every reload it causes.
    // (A reload racing its own write's watch event may write the same value once more.)
    let log = ingress.log_text();
    let writes = log.matches("Ingress default/web: status address").count();
    let reloads = log.matches("configuration applied").count();
    assert!(
        (2..=3).contains(&writes) && reloads > writes,
        "{writes} status writes in {reloads} reloads:\n{log}"
    );
}
