//! `sluice lab matrix` on the pods of Kubernetes' NetworkPolicy e2e tests:
//! without policies everything is reached; with the example policy the
//! kernel agrees with `explain` on every cell, and `explain` with the API.

use std::path::Path;
use std::time::Duration;

use sluice_e2e::{lab_options, skip_unless_root, unique_name};
use sluice_lab::Lab;
use sluice_lab::matrix::{Case, Matrix};

fn netpol_lab(prefix: &str, with_policy: bool) -> (tempfile::TempDir, Lab) {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/netpol");
    std::fs::copy(example.join("pods.yaml"), dir.path().join("pods.yaml")).unwrap();
    if with_policy {
        std::fs::copy(example.join("policy.yaml"), dir.path().join("policy.yaml")).unwrap();
    }
    let lab = Lab::up(lab_options(&unique_name(prefix), dir.path())).unwrap();
    (dir, lab)
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for protocol in ["tcp", "udp"] {
        for port in [80, 81] {
            cases.push(Case {
                port,
                protocol: protocol.parse().unwrap(),
            });
        }
    }
    cases
}

#[test]
fn without_policies_every_pod_reaches_every_pod_and_explain_agrees() {
    if skip_unless_root("without_policies_every_pod_reaches_every_pod_and_explain_agrees") {
        return;
    }
    let (_dir, lab) = netpol_lab("mxopen", false);
    let matrix = Matrix::measure(&lab, &cases(), Duration::from_secs(1)).unwrap();
    assert_eq!(matrix.pods.len(), 9);
    assert_eq!(matrix.cells.len(), 9 * 9 * 4);
    assert_eq!(matrix.disagreements(), 0, "{}", matrix.render());
    assert!(
        matrix.cells.iter().all(|c| c.expected && c.observed),
        "{}",
        matrix.render()
    );
}

#[test]
fn a_policy_isolating_x_is_enforced_and_explained_cell_by_cell() {
    if skip_unless_root("a_policy_isolating_x_is_enforced_and_explained_cell_by_cell") {
        return;
    }
    let (_dir, lab) = netpol_lab("mxpol", true);
    lab.wait_policy_enforced(Duration::from_secs(15)).unwrap();
    let matrix = Matrix::measure(&lab, &cases(), Duration::from_secs(1)).unwrap();
    for cell in &matrix.cells {
        let into_x = cell.to.starts_with("x/");
        let from_y = cell.from.starts_with("y/");
        let own_pod = cell.from == cell.to;
        let want = !into_x || own_pod || (from_y && cell.case.port == 80);
        assert_eq!(cell.expected, want, "explain for {cell:?}");
    }
    assert_eq!(matrix.disagreements(), 0, "{}", matrix.render());
}
