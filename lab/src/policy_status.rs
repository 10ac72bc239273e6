//! Whether the node agents enforce the NetworkPolicy of the lab's manifests:
//! each agent's status file names the policy inputs it programmed
//! ([`sluice_policy::policy_inputs_digest`]); they are current when that
//! digest is the rendered cluster's and the rendered cluster holds the
//! manifests' policies and labels.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use cluster_model::{ClusterSnapshot, ObjectKey};
use serde::Deserialize;
use sluice_policy::policy_inputs_digest;

use crate::state::{LabPaths, LabState};

/// The `policy` part of a `sluice-proxy --status-file`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AgentPolicyStatus {
    pub policies: Vec<String>,
    pub endpoints: Vec<EndpointStatus>,
    pub pending: Vec<String>,
    #[serde(default)]
    pub drops_by_policy: BTreeMap<String, u64>,
    pub inputs_digest: String,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct EndpointStatus {
    pub pod: String,
    pub interface: String,
    pub ingress_isolated_by: Vec<String>,
    pub egress_isolated_by: Vec<String>,
    #[serde(default)]
    pub ingress_drops: u64,
    #[serde(default)]
    pub egress_drops: u64,
}

#[derive(Deserialize)]
struct StatusFile {
    policy: AgentPolicyStatus,
}

/// A node agent's policy status; `None` before it wrote one.
pub fn read(path: &Path) -> Result<Option<AgentPolicyStatus>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file: StatusFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(file.policy))
}

/// Why the lab's policy is not enforced yet, or `None` when every node
/// agent enforces the policies and labels of the manifest directory.
pub fn not_enforced_because(
    state: &LabState,
    paths: &LabPaths,
    manifests: &ClusterSnapshot,
    rendered: &ClusterSnapshot,
) -> Result<Option<String>> {
    if manifests.network_policies != rendered.network_policies {
        return Ok(Some(
            "the lab has not rendered the manifests' policies yet".into(),
        ));
    }
    if pod_labels(manifests) != pod_labels(rendered)
        || namespace_labels(manifests) != namespace_labels(rendered)
    {
        return Ok(Some(
            "the lab has not rendered the manifests' labels yet".into(),
        ));
    }
    let want = policy_inputs_digest(rendered);
    for node in state.nodes.iter().filter(|n| n.proxy.is_some()) {
        let Some(status) = read(&paths.proxy_status(&node.name))? else {
            return Ok(Some(format!(
                "the agent of {} wrote no status yet",
                node.name
            )));
        };
        if status.inputs_digest != want {
            return Ok(Some(format!(
                "the agent of {} enforces an older state",
                node.name
            )));
        }
        if !status.pending.is_empty() {
            return Ok(Some(format!(
                "the agent of {} waits for the interfaces of {}",
                node.name,
                status.pending.join(", ")
            )));
        }
        if !status.errors.is_empty() {
            return Ok(Some(format!(
                "the agent of {} failed to program: {}",
                node.name,
                status.errors.join("; ")
            )));
        }
    }
    Ok(None)
}

fn pod_labels(
    snapshot: &ClusterSnapshot,
) -> BTreeMap<&ObjectKey, Option<&BTreeMap<String, String>>> {
    snapshot
        .pods
        .iter()
        .map(|(k, p)| (k, p.metadata.labels.as_ref()))
        .collect()
}

fn namespace_labels(
    snapshot: &ClusterSnapshot,
) -> BTreeMap<&String, Option<&BTreeMap<String, String>>> {
    snapshot
        .namespaces
        .iter()
        .map(|(k, n)| (k, n.metadata.labels.as_ref()))
        .collect()
}
