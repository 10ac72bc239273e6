//! One consistent view of the cluster.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass, NetworkPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::endpointslice::{
    LABEL_MANAGED_BY, LABEL_SERVICE_NAME, MANAGED_BY_CONTROLLER, derive_endpoint_slices,
    derive_endpoint_slices_in, derived_slice_named, in_namespace,
};
use crate::object::{Kind, Object, ObjectKey};

/// The label every namespace carries with its own name.
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// The cluster as the model sees it at one moment.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub nodes: BTreeMap<String, Node>,
    /// Explicit namespaces plus implied ones (every namespace any object uses), each carrying the
    /// label `kubernetes.io/metadata.name`.
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub services: BTreeMap<ObjectKey, Service>,
    /// Hand-written slices plus those derived for Services with selectors.
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Valid NetworkPolicies (defaulted: `policyTypes` and port protocols filled in).
    pub network_policies: BTreeMap<ObjectKey, NetworkPolicy>,
    /// Valid Ingresses, annotations kept (the controller reads them).
    pub ingresses: BTreeMap<ObjectKey, Ingress>,
    /// Valid IngressClasses by name, annotations kept (`is-default-class`).
    pub ingress_classes: BTreeMap<String, IngressClass>,
    /// Secrets of type `kubernetes.io/tls` only (with `tls.crt` and `tls.key`); others are never
    /// read.
    pub secrets: BTreeMap<ObjectKey, Secret>,
    /// Identifies this version among those of its source (0: none given). Set by sources only.
    pub revision: u64,
    /// What differs from the source's previous snapshot, when the source knows it: consumers may
    /// then look at only that. Code that edits a snapshot's maps must set `revision` to 0 and
    /// this to None, so no consumer takes it for the version it had
    /// ([`ClusterSnapshot::rederive_endpoint_slices`] does).
    pub changes: Option<SnapshotChanges>,
}

impl SnapshotChanges {
    /// Adds the keys of `other`.
    pub(crate) fn extend(&mut self, other: SnapshotChanges) {
        self.nodes.extend(other.nodes);
        self.namespaces.extend(other.namespaces);
        self.pods.extend(other.pods);
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.network_policies.extend(other.network_policies);
        self.ingresses.extend(other.ingresses);
        self.ingress_classes.extend(other.ingress_classes);
        self.secrets.extend(other.secrets);
    }
}

/// A revision no other snapshot of this process has.
pub(crate) fn next_revision() -> u64 {
    static REVISIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    REVISIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The keys whose objects differ (added, changed or removed) between a source's snapshot of
/// revision `since` and the one carrying this; every key that differs is listed (some listed
/// ones may be unchanged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotChanges {
    pub since: u64,
    pub nodes: BTreeSet<String>,
    pub namespaces: BTreeSet<String>,
    pub pods: BTreeSet<ObjectKey>,
    pub services: BTreeSet<ObjectKey>,
    /// Hand-written and derived ones.
    pub endpoint_slices: BTreeSet<ObjectKey>,
    pub network_policies: BTreeSet<ObjectKey>,
    pub ingresses: BTreeSet<ObjectKey>,
    pub ingress_classes: BTreeSet<String>,
    pub secrets: BTreeSet<ObjectKey>,
}

impl ClusterSnapshot {
    /// Builds a snapshot from objects (the first of several with the same kind and key wins),
    /// deriving EndpointSlices for Services with selectors (a hand-written slice wins over a
    /// derived one of the same name) and adding implied namespaces.
    ///
    /// Objects are taken as they are: [`crate::ManifestSource`] has already defaulted and
    /// validated them. Namespaced objects without a namespace land in "default".
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> ClusterSnapshot {
        let mut snap = ClusterSnapshot::collect(objects);
        snap.add_derived();
        snap
    }

    /// Builds a snapshot from objects read from the Kubernetes API: like
    /// [`ClusterSnapshot::from_objects`], but EndpointSlices are taken as they are (the cluster's
    /// endpoint-slice controller writes them) and none is derived.
    pub fn from_api_objects(objects: impl IntoIterator<Item = Object>) -> ClusterSnapshot {
        let mut snap = ClusterSnapshot::collect(objects);
        snap.add_implied_namespaces();
        snap
    }

    /// The objects sorted into their maps (the first of several with the same key wins).
    fn collect(objects: impl IntoIterator<Item = Object>) -> ClusterSnapshot {
        let mut snap = ClusterSnapshot::default();
        for object in objects {
            let mut key = object.key();
            if object.kind().namespaced() && key.namespace.is_empty() {
                key.namespace = "default".to_string();
            }
            match object {
                Object::Node(o) => {
                    snap.nodes.entry(key.name).or_insert(o);
                }
                Object::Namespace(mut o) => {
                    o.metadata
                        .labels
                        .get_or_insert_with(Default::default)
                        .insert(LABEL_NAMESPACE_NAME.to_string(), key.name.clone());
                    snap.namespaces.entry(key.name).or_insert(o);
                }
                Object::Pod(o) => {
                    snap.pods.entry(key).or_insert(o);
                }
                Object::Service(o) => {
                    snap.services.entry(key).or_insert(o);
                }
                Object::EndpointSlice(o) => {
                    snap.endpoint_slices.entry(key).or_insert(o);
                }
                Object::NetworkPolicy(o) => {
                    snap.network_policies.entry(key).or_insert(o);
                }
                Object::Ingress(o) => {
                    snap.ingresses.entry(key).or_insert(o);
                }
                Object::IngressClass(o) => {
                    snap.ingress_classes.entry(key.name).or_insert(o);
                }
                Object::Secret(o) => {
                    snap.secrets.entry(key).or_insert(o);
                }
            }
        }
        snap
    }

    /// Recomputes the derived EndpointSlices from the current Services, Pods and Nodes, e.g.
    /// after filling in pod addresses and conditions the manifests did not have. Replaces every
    /// slice labelled `endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io`
    /// (as the controller owns those), keeps the others, and adds implied namespaces.
    pub fn rederive_endpoint_slices(&mut self) {
        self.revision = 0;
        self.changes = None;
        self.endpoint_slices.retain(|_, s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_MANAGED_BY))
                .map(String::as_str)
                != Some(MANAGED_BY_CONTROLLER)
        });
        self.add_derived();
    }

    fn add_derived(&mut self) {
        for slice in derive_endpoint_slices(&self.services, &self.pods, &self.nodes) {
            let key = ObjectKey::of(&slice.metadata);
            if self.endpoint_slices.contains_key(&key) {
                tracing::debug!(slice = %key, "a hand-written EndpointSlice has the name of a derived one; keeping the hand-written one");
                continue;
            }
            self.endpoint_slices.insert(key, slice);
        }
        self.add_implied_namespaces();
    }

    /// Brings a snapshot built from objects (by [`ClusterSnapshot::from_objects`] or by this)
    /// to what [`ClusterSnapshot::from_objects`] gives for the objects `current` names, where
    /// only the objects of `ids` (source keys: namespace "" for cluster-scoped kinds) may
    /// differ. Derived EndpointSlices are derived again in the namespaces where a Service, Pod
    /// or EndpointSlice changed (everywhere when a Node did, for zones). Returns the keys that
    /// may have changed (every one that did), `since` left 0.
    pub(crate) fn apply_changes<'a>(
        &mut self,
        ids: &BTreeSet<(Kind, ObjectKey)>,
        current: impl Fn(Kind, &ObjectKey) -> Option<&'a Object>,
    ) -> SnapshotChanges {
        fn set<K: Ord, T>(map: &mut BTreeMap<K, T>, key: K, value: Option<T>) {
            match value {
                Some(value) => map.insert(key, value),
                None => map.remove(&key),
            };
        }
        let mut changes = SnapshotChanges::default();
        let mut rederive_all = false;
        let mut rederive: BTreeSet<String> = BTreeSet::new();
        let mut namespaces: BTreeSet<String> = BTreeSet::new();
        let mut uncovered: Vec<ObjectKey> = Vec::new();
        for (kind, key) in ids {
            let object = current(*kind, key).cloned();
            let name = key.name.clone();
            match (kind, object) {
                (Kind::Node, o) => {
                    let o = o.and_then(|o| match o {
                        Object::Node(o) => Some(o),
                        _ => None,
                    });
                    set(&mut self.nodes, name.clone(), o);
                    changes.nodes.insert(name);
                    rederive_all = true;
                }
                (Kind::Namespace, _) => {
                    // Explicit or implied: settled with the others below.
                    namespaces.insert(name);
                }
                (Kind::IngressClass, o) => {
                    let o = o.and_then(|o| match o {
                        Object::IngressClass(o) => Some(o),
                        _ => None,
                    });
                    set(&mut self.ingress_classes, name.clone(), o);
                    changes.ingress_classes.insert(name);
                }
                (kind, o) => {
                    namespaces.insert(key.namespace.clone());
                    let key = key.clone();
                    match (kind, o) {
                        (Kind::Pod, o) => {
                            let o = o.and_then(|o| {
                                if let Object::Pod(o) = o {
                                    Some(o)
                                } else {
                                    None
                                }
                            });
                            set(&mut self.pods, key.clone(), o);
                            rederive.insert(key.namespace.clone());
                            changes.pods.insert(key);
                        }
                        (Kind::Service, o) => {
                            let o = o.and_then(|o| {
                                if let Object::Service(o) = o {
                                    Some(o)
                                } else {
                                    None
                                }
                            });
                            // A Service that derives no slice, before or after, changes none.
                            let derives = self.services.get(&key).is_some_and(derives_slices)
                                || o.as_ref().is_some_and(derives_slices);
                            if derives {
                                rederive.insert(key.namespace.clone());
                            }
                            set(&mut self.services, key.clone(), o);
                            changes.services.insert(key);
                        }
                        (Kind::EndpointSlice, o) => {
                            let o = o.and_then(|o| {
                                if let Object::EndpointSlice(o) = o {
                                    Some(o)
                                } else {
                                    None
                                }
                            });
                            // A hand-written slice gone may uncover a derived one: below.
                            if o.is_none() {
                                uncovered.push(key.clone());
                            }
                            set(&mut self.endpoint_slices, key.clone(), o);
                            changes.endpoint_slices.insert(key);
                        }
                        (Kind::NetworkPolicy, o) => {
                            let o = o.and_then(|o| {
                                if let Object::NetworkPolicy(o) = o {
                                    Some(o)
                                } else {
                                    None
                                }
                            });
                            set(&mut self.network_policies, key.clone(), o);
                            changes.network_policies.insert(key);
                        }
                        (Kind::Ingress, o) => {
                            let o = o.and_then(|o| {
                                if let Object::Ingress(o) = o {
                                    Some(o)
                                } else {
                                    None
                                }
                            });
                            set(&mut self.ingresses, key.clone(), o);
                            changes.ingresses.insert(key);
                        }
                        (Kind::Secret, o) => {
                            let o = o.and_then(|o| {
                                if let Object::Secret(o) = o {
                                    Some(o)
                                } else {
                                    None
                                }
                            });
                            set(&mut self.secrets, key.clone(), o);
                            changes.secrets.insert(key);
                        }
                        // Handled above.
                        (Kind::Node | Kind::Namespace | Kind::IngressClass, _) => {}
                    }
                }
            }
        }

        if rederive_all {
            rederive = self
                .services
                .keys()
                .chain(self.endpoint_slices.keys())
                .map(|k| k.namespace.clone())
                .collect();
        }
        let hand_written = |key: &ObjectKey| current(Kind::EndpointSlice, key).is_some();
        for ns in &rederive {
            // Every slice of the namespace not written by hand is derived: derive them again.
            let stale: Vec<ObjectKey> = in_namespace(&self.endpoint_slices, ns)
                .map(|(k, _)| k)
                .filter(|k| !hand_written(k))
                .cloned()
                .collect();
            let mut old: BTreeMap<ObjectKey, EndpointSlice> = BTreeMap::new();
            for key in stale {
                if let Some(slice) = self.endpoint_slices.remove(&key) {
                    old.insert(key, slice);
                }
            }
            for slice in derive_endpoint_slices_in(ns, &self.services, &self.pods, &self.nodes) {
                let key = ObjectKey::of(&slice.metadata);
                if self.endpoint_slices.contains_key(&key) {
                    continue;
                }
                old.remove(&key);
                changes.endpoint_slices.insert(key.clone());
                self.endpoint_slices.insert(key, slice);
            }
            changes.endpoint_slices.extend(old.into_keys());
            namespaces.insert(ns.clone());
        }
        for key in uncovered {
            if rederive.contains(&key.namespace) || self.endpoint_slices.contains_key(&key) {
                continue;
            }
            if let Some(slice) = derived_slice_named(&key, &self.services, &self.pods, &self.nodes)
            {
                self.endpoint_slices.insert(key, slice);
            }
        }

        for ns in namespaces {
            let explicit = current(Kind::Namespace, &ObjectKey::cluster(ns.clone()));
            let wanted = match explicit {
                Some(Object::Namespace(o)) => {
                    let mut o = o.clone();
                    o.metadata
                        .labels
                        .get_or_insert_with(Default::default)
                        .insert(LABEL_NAMESPACE_NAME.to_string(), ns.clone());
                    Some(o)
                }
                _ if self.uses_namespace(&ns) => Some(implied_namespace(ns.clone())),
                _ => None,
            };
            set(&mut self.namespaces, ns.clone(), wanted);
            changes.namespaces.insert(ns);
        }
        changes
    }

    /// Keeps of `changes` (keys that may differ) those whose objects differ between `before`
    /// and this snapshot.
    pub(crate) fn keep_differing(&self, before: &ClusterSnapshot, changes: &mut SnapshotChanges) {
        fn keep<K: Ord, T: PartialEq>(
            keys: &mut BTreeSet<K>,
            before: &BTreeMap<K, T>,
            after: &BTreeMap<K, T>,
        ) {
            keys.retain(|k| before.get(k) != after.get(k));
        }
        keep(&mut changes.nodes, &before.nodes, &self.nodes);
        keep(
            &mut changes.namespaces,
            &before.namespaces,
            &self.namespaces,
        );
        keep(&mut changes.pods, &before.pods, &self.pods);
        keep(&mut changes.services, &before.services, &self.services);
        keep(
            &mut changes.endpoint_slices,
            &before.endpoint_slices,
            &self.endpoint_slices,
        );
        keep(
            &mut changes.network_policies,
            &before.network_policies,
            &self.network_policies,
        );
        keep(&mut changes.ingresses, &before.ingresses, &self.ingresses);
        keep(
            &mut changes.ingress_classes,
            &before.ingress_classes,
            &self.ingress_classes,
        );
        keep(&mut changes.secrets, &before.secrets, &self.secrets);
    }

    /// Whether some object that implies its namespace is in `ns`.
    fn uses_namespace(&self, ns: &str) -> bool {
        in_namespace(&self.pods, ns).next().is_some()
            || in_namespace(&self.services, ns).next().is_some()
            || in_namespace(&self.endpoint_slices, ns).next().is_some()
            || in_namespace(&self.network_policies, ns).next().is_some()
            || in_namespace(&self.ingresses, ns).next().is_some()
            || in_namespace(&self.secrets, ns).next().is_some()
    }

    /// Adds a Namespace object for every namespace some object is in that has none.
    fn add_implied_namespaces(&mut self) {
        let used: Vec<String> = self
            .pods
            .keys()
            .chain(self.services.keys())
            .chain(self.endpoint_slices.keys())
            .chain(self.network_policies.keys())
            .chain(self.ingresses.keys())
            .chain(self.secrets.keys())
            .map(|k| k.namespace.clone())
            .collect();
        for ns in used {
            self.namespaces
                .entry(ns.clone())
                .or_insert_with(|| implied_namespace(ns));
        }
    }

    /// EndpointSlices of a Service (by label `kubernetes.io/service-name` in the same
    /// namespace), sorted by name.
    ///
    /// Looks at every slice of the namespace: to go through many Services, use
    /// [`ClusterSnapshot::slices_by_service`] once instead.
    pub fn slices_of(&self, service: &ObjectKey) -> Vec<&EndpointSlice> {
        let start = ObjectKey::new(service.namespace.clone(), "");
        self.endpoint_slices
            .range(start..)
            .take_while(|(k, _)| k.namespace == service.namespace)
            .filter(|(_, s)| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SERVICE_NAME))
                    == Some(&service.name)
            })
            .map(|(_, s)| s)
            .collect()
    }

    /// The EndpointSlices of every Service that has some, by Service key (label
    /// `kubernetes.io/service-name` in the slice's namespace), each list sorted by name; the same
    /// lists as [`ClusterSnapshot::slices_of`] gives, in one pass over the slices. Slices without
    /// the label are left out; a label naming no Service still gets its entry.
    pub fn slices_by_service(&self) -> BTreeMap<ObjectKey, Vec<&EndpointSlice>> {
        let mut by_service: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
        for (key, slice) in &self.endpoint_slices {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
            else {
                continue;
            };
            by_service
                .entry(ObjectKey::new(key.namespace.clone(), service.clone()))
                .or_default()
                .push(slice);
        }
        by_service
    }

    /// Every object in the snapshot (derived slices and implied namespaces included: to rebuild
    /// after changing pods, use [`ClusterSnapshot::rederive_endpoint_slices`] rather than
    /// feeding these back to [`ClusterSnapshot::from_objects`], which would keep stale slices).
    pub fn objects(&self) -> impl Iterator<Item = Object> + '_ {
        let nodes = self.nodes.values().cloned().map(Object::Node);
        let namespaces = self.namespaces.values().cloned().map(Object::Namespace);
        let pods = self.pods.values().cloned().map(Object::Pod);
        let services = self.services.values().cloned().map(Object::Service);
        let slices = self
            .endpoint_slices
            .values()
            .cloned()
            .map(Object::EndpointSlice);
        let policies = self
            .network_policies
            .values()
            .cloned()
            .map(Object::NetworkPolicy);
        let ingresses = self.ingresses.values().cloned().map(Object::Ingress);
        let classes = self
            .ingress_classes
            .values()
            .cloned()
            .map(Object::IngressClass);
        let secrets = self.secrets.values().cloned().map(Object::Secret);
        nodes
            .chain(namespaces)
            .chain(pods)
            .chain(services)
            .chain(slices)
            .chain(policies)
            .chain(ingresses)
            .chain(classes)
            .chain(secrets)
    }
}

/// Whether [`derive_endpoint_slices`] derives slices for a Service: one with a non-empty
/// selector that is not ExternalName.
fn derives_slices(service: &Service) -> bool {
    service.spec.as_ref().is_some_and(|spec| {
        spec.type_.as_deref() != Some("ExternalName")
            && spec.selector.as_ref().is_some_and(|s| !s.is_empty())
    })
}

fn implied_namespace(name: String) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            labels: Some([(LABEL_NAMESPACE_NAME.to_string(), name.clone())].into()),
            name: Some(name),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ManifestFormat, parse_manifests};

    fn snapshot(yaml: &str) -> ClusterSnapshot {
        let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        assert_eq!(problems, vec![]);
        ClusterSnapshot::from_objects(objects)
    }

    #[test]
    fn slices_of_matches_label_and_namespace_sorted_by_name() {
        let snap = snapshot(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-other-ns, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-c, labels: {kubernetes.io/service-name: webx}}
addressType: IPv4
endpoints: []
"#,
        );
        let names: Vec<_> = snap
            .slices_of(&ObjectKey::new("default", "web"))
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(names, ["web-a", "web-b"]);
        assert_eq!(snap.slices_of(&ObjectKey::new("prod", "web")).len(), 1);
        let by_service = snap.slices_by_service();
        assert_eq!(
            by_service
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["default/web", "default/webx", "prod/web"]
        );
        for (service, slices) in &by_service {
            assert_eq!(slices, &snap.slices_of(service), "{service}");
        }
        assert!(
            snap.slices_of(&ObjectKey::new("default", "nope"))
                .is_empty()
        );
    }

    #[test]
    fn namespaces_explicit_and_implied_carry_name_label() {
        let snap = snapshot(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: staging}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {ports: [{port: 80}]}
"#,
        );
        assert_eq!(
            snap.namespaces.keys().cloned().collect::<Vec<_>>(),
            ["default", "prod", "staging"]
        );
        for (name, ns) in &snap.namespaces {
            let labels = ns.metadata.labels.as_ref().expect("labels");
            assert_eq!(labels.get(LABEL_NAMESPACE_NAME), Some(name));
        }
        let prod = &snap.namespaces["prod"];
        assert_eq!(
            prod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("team"))
                .map(String::as_str),
            Some("a")
        );
    }

    #[test]
    fn rederive_after_filling_in_pod_status() {
        let mut snap = snapshot(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {containers: [{name: c}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-manual, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [192.0.2.1]}]
"#,
        );
        let web = ObjectKey::new("default", "web");
        let endpoints = |s: &ClusterSnapshot| -> usize {
            s.slices_of(&web).iter().map(|s| s.endpoints.len()).sum()
        };
        assert_eq!(
            endpoints(&snap),
            1,
            "only the hand-written one: the pod has no IP"
        );
        let pod = snap
            .pods
            .get_mut(&ObjectKey::new("default", "web-1"))
            .expect("pod");
        pod.status.get_or_insert_with(Default::default).pod_ip = Some("10.0.0.1".into());
        snap.rederive_endpoint_slices();
        assert_eq!(snap.slices_of(&web).len(), 2);
        assert_eq!(endpoints(&snap), 2);
    }

    #[test]
    fn network_policies_are_kept_and_imply_their_namespace() {
        let snap = snapshot(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: locked}
spec: {podSelector: {}}
"#,
        );
        let key = ObjectKey::new("locked", "deny");
        assert_eq!(snap.network_policies.keys().collect::<Vec<_>>(), [&key]);
        assert!(snap.namespaces.contains_key("locked"));
        assert_eq!(
            snap.objects()
                .filter(|o| o.kind() == crate::Kind::NetworkPolicy)
                .count(),
            1
        );
        // Users that build snapshots by hand still can.
        let by_hand = ClusterSnapshot {
            network_policies: snap.network_policies.clone(),
            ..Default::default()
        };
        assert_eq!(by_hand.network_policies.len(), 1);
    }

    #[test]
    fn hand_written_slices_kept_next_to_derived_ones() {
        let snap = snapshot(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-manual, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [192.0.2.1]}]
"#,
        );
        let slices = snap.slices_of(&ObjectKey::new("default", "web"));
        assert_eq!(slices.len(), 2, "{slices:?}");
        assert!(
            slices
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some("web-manual"))
        );
    }
}
