//! The Ingress controller in the lab: with Ingresses among the manifests, `sluice lab up` runs
//! `sluice-ingress` on the first node (host network, ports 80 and 443), and the external client
//! reaches the pods behind an Ingress through it, following changes to the manifests.
//!
//! Needs root (network namespaces, cgroups); without it prints SKIPPED and passes.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sluice_e2e::{Manifests, lab_options, pod_yaml, service_yaml, skip_unless_root, unique_name};
use sluice_lab::{Lab, Outcome, Protocol, ProxyMode, names};

const CLASS: &str = r#"apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: sluice}
spec: {controller: sluice.dev/ingress}
"#;

fn ingress(service: &str) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: site}}
spec:
  ingressClassName: sluice
  rules:
  - http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}
"#
    )
}

/// The pod answering `GET /hostname` through node-1's port 80, once it is `want`.
fn wait_answer(lab: &Lab, want: &[&str]) -> Result<String> {
    let node = lab.node_ip("node-1")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = lab.probe(names::EXTERNAL, &format!("{node}:80"), Protocol::Tcp)?;
        if r.outcome == Outcome::Answered
            && let Some(a) = &r.answer
            && want.contains(&a.as_str())
        {
            return Ok(a.clone());
        }
        if Instant::now() > deadline {
            bail!("through the ingress: {r:?}, not one of {want:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_external_client_reaches_pods_through_the_ingress_and_it_follows_changes() -> Result<()> {
    if skip_unless_root(
        "the_external_client_reaches_pods_through_the_ingress_and_it_follows_changes",
    ) {
        return Ok(());
    }
    let m = Manifests::new()?;
    let http = [("http", 8080, "TCP")];
    m.write(
        "pods.yaml",
        &[
            pod_yaml("blue-1", &[("app", "blue")], None, &http),
            pod_yaml("green-1", &[("app", "green")], None, &http),
        ]
        .join("---\n"),
    )?;
    m.write(
        "services.yaml",
        &[
            service_yaml(
                "blue",
                None,
                &[("app", "blue")],
                &[("http", 80, 8080, "TCP")],
            ),
            service_yaml(
                "green",
                None,
                &[("app", "green")],
                &[("http", 80, 8080, "TCP")],
            ),
        ]
        .join("---\n"),
    )?;
    m.write("class.yaml", CLASS)?;
    m.write("ingress.yaml", &ingress("blue"))?;
    let mut opts = lab_options(&unique_name("ingr"), m.path());
    opts.proxy = ProxyMode::Required;
    let lab = Lab::up(opts)?;
    let st = lab.state()?;
    let running = st
        .ingress
        .as_ref()
        .map(|i| (i.node.clone(), i.proc.is_some()));
    assert_eq!(
        running,
        Some(("node-1".to_string(), true)),
        "{:?}",
        st.ingress
    );

    assert_eq!(wait_answer(&lab, &["blue-1"])?, "blue-1");
    // The Ingress now points at the other Service: the controller follows without a restart.
    m.write("ingress.yaml", &ingress("green"))?;
    assert_eq!(wait_answer(&lab, &["green-1"])?, "green-1");
    let pid = st
        .ingress
        .as_ref()
        .and_then(|i| i.proc.as_ref())
        .map(|p| p.pid);
    let again = lab.state()?.ingress.and_then(|i| i.proc).map(|p| p.pid);
    assert_eq!(pid, again, "the controller was restarted");
    // `sluice lab status` shows where it runs.
    let status = lab.status()?;
    let row = status.ingress.as_ref().expect("an ingress row");
    assert_eq!(row.node, "node-1");
    assert_eq!(row.ip, Some(lab.node_ip("node-1")?));
    assert!(row.process.as_ref().is_some_and(|p| p.alive), "{row:?}");
    assert!(
        status.render_text().contains("HTTP :80, HTTPS :443"),
        "{}",
        status.render_text()
    );
    // The Ingress's status address is the controller's node, both families, as published.
    let node = lab.node_ip("node-1")?.to_string();
    let node6 = lab.node_ip6("node-1")?.to_string();
    assert_eq!(
        row.ingresses.get("default/site"),
        Some(&vec![node.clone(), node6.clone()]),
        "{row:?}"
    );
    let text = status.render_text();
    assert!(
        text.lines()
            .any(|l| l.contains("default/site") && l.contains(&format!("{node}, {node6}"))),
        "{text}"
    );
    Ok(())
}
