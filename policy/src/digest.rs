//! A fingerprint of what NetworkPolicy enforcement depends on, so an agent
//! can say which cluster state it enforces and a reader holding the same
//! objects can tell whether it is current.

use std::hash::Hasher;

use cluster_model::ClusterSnapshot;
use fnv::FnvHasher;

/// A stable hash (same objects, same text, across processes and builds) of
/// the snapshot's pods, namespaces and NetworkPolicies: every input of a
/// policy verdict. Services are not in it: policy applies after translation.
pub fn policy_inputs_digest(snapshot: &ClusterSnapshot) -> String {
    let mut hasher = FnvHasher::default();
    // Values only: each object names itself in its metadata.
    let parts = [
        serde_json::to_vec(&snapshot.pods.values().collect::<Vec<_>>()),
        serde_json::to_vec(&snapshot.namespaces.values().collect::<Vec<_>>()),
        serde_json::to_vec(&snapshot.network_policies.values().collect::<Vec<_>>()),
    ];
    for part in parts {
        // Serializing in-memory API objects does not fail; hash the error
        // text if it ever did, so the digest still changes with the input.
        let bytes = part.unwrap_or_else(|e| e.to_string().into_bytes());
        hasher.write_usize(bytes.len());
        hasher.write(&bytes);
    }
    format!("{:016x}", hasher.finish())
}
