//! `sluice policy explain` as a user runs it: a manifest directory, a verdict, an exit code.

use std::process::Command;

const MANIFESTS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: http}]
";

fn explain(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.yaml"), MANIFESTS).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["policy", "explain", "--manifests"])
        .arg(dir.path())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn an_allowed_connection_names_the_policy_and_rule_that_allow_it() {
    let (code, text) = explain(&["client", "web", "8080"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(": allowed"), "{text}");
    assert!(
        text.contains("allowed by default/web-from-client ingress[0]"),
        "{text}"
    );
}

#[test]
fn a_denied_connection_says_which_policy_isolates_the_destination() {
    let (code, text) = explain(&["client", "web", "9090"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("denied: isolated by default/web-from-client"),
        "{text}"
    );
    // The named port `http` is TCP only.
    let (code, _) = explain(&["client", "web", "8080/udp"]);
    assert_eq!(code, 1);
}

#[test]
fn a_pod_no_policy_selects_accepts_everything() {
    let (code, text) = explain(&["web", "client", "80"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no policy isolates the pod"), "{text}");
}

#[test]
fn bad_arguments_are_errors() {
    assert_eq!(explain(&["client", "web", "0"]).0, 2);
    assert_eq!(explain(&["client", "nobody", "80"]).0, 2);
}
