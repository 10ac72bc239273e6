//! The typed cluster model Sluice compiles from, and its two sources.
//!
//! Objects are [`k8s_openapi`] types (re-exported, so dependents use the same version), kept in a
//! [`ClusterSnapshot`]. [`ManifestSource`] builds snapshots from a directory of YAML/JSON manifests
//! (deriving EndpointSlices for Services with selectors the way the endpoint-slice controller
//! would), re-reading only the files that changed since the last reload, and [`watch_dir`] tells
//! when that directory changed. [`KubeSource`] builds the same snapshots from the Kubernetes API
//! through kube-rs watchers (EndpointSlices as the API has them, never derived).
//! [`ClusterSource`] is the one interface the node agent uses over both: wait for a change, then
//! reload.
//!
//! Parsing, validation and derivation are pure functions on strings and objects
//! ([`parse_manifests`], [`derive_endpoint_slices`], [`ClusterSnapshot::from_objects`]); only
//! [`ManifestSource`] and [`watch_dir`] touch the file system.
//!
//! With the `testing` feature, `testing::apiserver` is an in-process list/watch server for
//! tests of the API source (never part of the daemon).

pub use k8s_openapi;

mod cluster_source;
mod endpointslice;
mod kube_source;
mod manifest;
mod object;
mod problem;
mod snapshot;
mod source;
mod validate;
pub use validate::{TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY};
mod watch;

pub use cluster_source::{ClusterSource, WatchedManifests};
pub use endpointslice::{
    LABEL_MANAGED_BY, LABEL_SERVICE_NAME, MANAGED_BY_CONTROLLER, container_ports,
    derive_endpoint_slices,
};
pub use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
pub use k8s_openapi::api::discovery::v1::EndpointSlice;
pub use k8s_openapi::api::networking::v1::{Ingress, IngressClass, NetworkPolicy};
/// The kube-rs crate the API source is built on (re-exported, so dependents use the same version).
pub use kube;
pub use kube_source::{KubeConfigError, KubeSource, kube_client};
pub use manifest::{ManifestFormat, parse_manifests};
pub use object::{Kind, Object, ObjectKey, SECRET_TYPE_TLS};
pub use problem::Problem;
pub use snapshot::{ClusterSnapshot, LABEL_NAMESPACE_NAME, SnapshotChanges};
pub use source::{ManifestSource, RACY_MARGIN, Reload};
#[cfg(feature = "testing")]
pub mod testing;
pub use watch::{DirWatch, WatchError, watch_dir};
