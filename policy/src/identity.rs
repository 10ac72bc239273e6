//! Label-set identities: what selectors see of a pod.
//!
//! Whether a policy selects a pod, and whether a pod is a rule's peer, depends only on the pod's
//! namespace (name and labels) and its own labels: its [`Identity`]. Pods with equal identities
//! are indistinguishable to selectors, so a data path can number identities, tag each packet
//! with its peer's number, and compile each rule's pod peers to a set of numbers (the way
//! Cilium's security identities work). [`Identities`] does the numbering; explain goes through
//! the same [`Identity`] type, so the oracle and a compiled data path agree on what a selector
//! matches.

use std::collections::BTreeMap;

use cluster_model::{ClusterSnapshot, ObjectKey, Pod};

use crate::model::namespace_labels;
use crate::selector::Labels;

/// What selectors see of a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub namespace: String,
    /// The namespace's labels (always with `kubernetes.io/metadata.name`).
    pub namespace_labels: Labels,
    /// The pod's labels.
    pub labels: Labels,
}

impl Identity {
    /// The identity of a pod stored under `key` in `snapshot`.
    pub fn of_pod(snapshot: &ClusterSnapshot, key: &ObjectKey, pod: &Pod) -> Identity {
        let ns_labels = snapshot
            .namespaces
            .get(&key.namespace)
            .and_then(|ns| ns.metadata.labels.as_ref());
        Identity {
            namespace: key.namespace.clone(),
            namespace_labels: namespace_labels(&key.namespace, ns_labels),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        }
    }
}

/// A number standing for one [`Identity`] (dense, from 0, in identity order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(pub u32);

/// The distinct identities of a snapshot's pods (host-network pods left out: policies do not
/// apply to them, and as peers they are their node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identities {
    identities: Vec<Identity>,
    by_pod: BTreeMap<ObjectKey, IdentityId>,
}

impl Identities {
    pub fn of(snapshot: &ClusterSnapshot) -> Identities {
        let mut by_identity: BTreeMap<Identity, Vec<ObjectKey>> = BTreeMap::new();
        for (key, pod) in &snapshot.pods {
            if crate::explain::host_network(pod) {
                continue;
            }
            by_identity
                .entry(Identity::of_pod(snapshot, key, pod))
                .or_default()
                .push(key.clone());
        }
        let mut out = Identities::default();
        for (n, (identity, pods)) in by_identity.into_iter().enumerate() {
            let id = IdentityId(u32::try_from(n).unwrap_or(u32::MAX));
            for pod in pods {
                out.by_pod.insert(pod, id);
            }
            out.identities.push(identity);
        }
        out
    }

    /// The identity number of a pod (not of host-network or unknown pods).
    pub fn of_pod(&self, key: &ObjectKey) -> Option<IdentityId> {
        self.by_pod.get(key).copied()
    }

    pub fn get(&self, id: IdentityId) -> Option<&Identity> {
        self.identities.get(usize::try_from(id.0).ok()?)
    }

    /// Every identity with its number.
    pub fn iter(&self) -> impl Iterator<Item = (IdentityId, &Identity)> {
        self.identities
            .iter()
            .enumerate()
            .map(|(n, i)| (IdentityId(u32::try_from(n).unwrap_or(u32::MAX)), i))
    }

    pub fn len(&self) -> usize {
        self.identities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_model::{ManifestFormat, parse_manifests};

    #[test]
    fn pods_with_equal_labels_in_one_namespace_share_an_identity() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: v1
kind: Pod
metadata: {name: a1, namespace: prod, labels: {app: a}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a2, namespace: prod, labels: {app: a}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a3, labels: {app: a}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: h, labels: {app: a}}
spec: {hostNetwork: true, containers: [{name: c}]}
"#;
        let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        assert_eq!(problems, vec![]);
        let snap = ClusterSnapshot::from_objects(objects);
        let ids = Identities::of(&snap);
        let id = |ns: &str, name: &str| ids.of_pod(&ObjectKey::new(ns, name));
        assert_eq!(ids.len(), 2);
        assert_eq!(id("prod", "a1"), id("prod", "a2"));
        assert_ne!(id("prod", "a1"), id("default", "a3"), "other namespace");
        assert_eq!(id("default", "h"), None, "host network");
        let prod = id("prod", "a1").and_then(|i| ids.get(i)).expect("identity");
        assert_eq!(prod.namespace, "prod");
        assert_eq!(
            prod.namespace_labels.get("env").map(String::as_str),
            Some("prod")
        );
        assert_eq!(
            prod.namespace_labels
                .get("kubernetes.io/metadata.name")
                .map(String::as_str),
            Some("prod")
        );
        assert_eq!(ids.iter().count(), 2);
    }
}
