//! The Kubernetes API source: kube-rs watchers keep a validated copy of every kind the model
//! reads, and [`KubeSource::reload`] turns it into the same [`ClusterSnapshot`] the manifest
//! source produces.
//!
//! - One watcher per kind (cluster-wide list, then watch), with kube's default backoff between
//!   failed attempts. A watch that ends or breaks resumes from the last resourceVersion seen; a
//!   `410 Gone` makes the watcher list again.
//! - A (re)list is collected aside and replaces that kind's objects only once it is complete
//!   (`Init` … `InitApply` … `InitDone`): until then the previous objects stay, so a relist never
//!   shows a half-listed kind, and objects deleted meanwhile go at once, at the end.
//! - Nothing is published before every kind has been listed once.
//! - Objects are validated like manifests; an invalid one is reported once (until it changes or
//!   goes), and its last valid version is kept. EndpointSlices are read, never derived.
//! - Fields the model does not read (managedFields, annotations except on Ingresses and
//!   IngressClasses, most of a Pod's spec, a Node's images…) are dropped as objects arrive.
//! - Which kinds are watched is the caller's choice ([`Kind::PROXY`] for the service proxy,
//!   [`Kind::INGRESS`] for the Ingress controller); only `kubernetes.io/tls` Secrets are read.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass, NetworkPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::object::{Kind, Object, ObjectKey, SECRET_TYPE_TLS};
use crate::problem::Problem;
use crate::snapshot::ClusterSnapshot;
use crate::source::Reload;
use crate::validate::Findings;

/// Errors building a client for the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum KubeConfigError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (neither in-cluster nor a kubeconfig): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the cluster: from the kubeconfig file `kubeconfig` (its current context) when
/// given, else inferred (`KUBECONFIG` or `~/.kube/config`, else the in-cluster service account).
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<Client, KubeConfigError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubeConfigError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The cluster as the API shows it, kept up to date by watchers running on the tokio runtime.
/// Dropping it stops them.
pub struct KubeSource {
    shared: Arc<Mutex<Shared>>,
    changes: mpsc::Receiver<()>,
    tasks: Vec<JoinHandle<()>>,
    /// The problems present at the last reload.
    reported: HashSet<Problem>,
    /// Whether a reload gave a snapshot yet.
    published: bool,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").finish_non_exhaustive()
    }
}

/// What the watchers share with the reader.
struct Shared {
    kinds: BTreeMap<Kind, KindState>,
    notify: mpsc::Sender<()>,
}

#[derive(Default)]
struct KindState {
    /// Whether a list of this kind completed at least once.
    listed: bool,
    /// The objects as of the last complete list plus the watch events since.
    objects: BTreeMap<ObjectKey, Entry>,
    /// A list in progress, collected aside until it completes.
    relist: Option<BTreeMap<ObjectKey, Entry>>,
}

/// One object as the API has it now.
struct Entry {
    /// The last valid version (`None` when no version seen so far was valid).
    valid: Option<Arc<Object>>,
    /// Problems with the current version (errors when it is invalid; warnings otherwise).
    problems: Vec<Problem>,
}

impl Shared {
    fn all_listed(&self) -> bool {
        self.kinds.values().all(|s| s.listed)
    }

    /// Tells the reader something changed, once every kind has been listed. Coalesces: at most
    /// one notification is pending.
    fn changed(&self) {
        if self.all_listed() {
            let _ = self.notify.try_send(());
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic elsewhere while holding the lock leaves maps that are still consistent (each
    // update is a single insert or swap).
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl KubeSource {
    /// Starts watching the kinds the service proxy reads ([`Kind::PROXY`], cluster-wide), with
    /// the default watcher configuration. Must be called within a tokio runtime.
    pub fn start(client: Client) -> KubeSource {
        KubeSource::start_with(client, watcher::Config::default())
    }

    /// Like [`KubeSource::start`], with a watcher configuration (e.g. a shorter watch timeout).
    pub fn start_with(client: Client, config: watcher::Config) -> KubeSource {
        KubeSource::start_kinds(client, Kind::PROXY, config)
    }

    /// Starts watching `kinds` (e.g. [`Kind::INGRESS`]): only those are listed before the first
    /// snapshot, and the snapshot has only those. Secrets are watched with the field selector
    /// `type=kubernetes.io/tls`, so no other Secret reaches this process.
    pub fn start_kinds(client: Client, kinds: &[Kind], config: watcher::Config) -> KubeSource {
        let (notify, changes) = mpsc::channel(1);
        let shared = Arc::new(Mutex::new(Shared {
            kinds: kinds.iter().map(|k| (*k, KindState::default())).collect(),
            notify,
        }));
        let mut tasks = Vec::new();
        for kind in kinds
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let task = match kind {
                Kind::Node => spawn_watch::<Node>(&client, &config, &shared),
                Kind::Namespace => spawn_watch::<Namespace>(&client, &config, &shared),
                Kind::Pod => spawn_watch::<Pod>(&client, &config, &shared),
                Kind::Service => spawn_watch::<Service>(&client, &config, &shared),
                Kind::EndpointSlice => spawn_watch::<EndpointSlice>(&client, &config, &shared),
                Kind::NetworkPolicy => spawn_watch::<NetworkPolicy>(&client, &config, &shared),
                Kind::Ingress => spawn_watch::<Ingress>(&client, &config, &shared),
                Kind::IngressClass => spawn_watch::<IngressClass>(&client, &config, &shared),
                Kind::Secret => {
                    let config = config.clone().fields(&format!("type={SECRET_TYPE_TLS}"));
                    spawn_watch::<Secret>(&client, &config, &shared)
                }
            };
            tasks.push(task);
        }
        KubeSource {
            shared,
            changes,
            tasks,
            reported: HashSet::new(),
            published: false,
        }
    }

    /// Waits until there is something new to read: the first time, until every kind has been
    /// listed. Several changes in a row give one wake-up. Returns `false` if the watchers are
    /// gone (they run until the source is dropped, so only if they were stopped abnormally).
    pub async fn changed(&mut self) -> bool {
        self.changes.recv().await.is_some()
    }

    /// Whether [`KubeSource::reload`] gave a snapshot yet.
    pub fn has_published(&self) -> bool {
        self.published
    }

    /// Whether every kind has been listed (so [`KubeSource::reload`] gives a snapshot).
    pub fn is_synced(&self) -> bool {
        lock(&self.shared).all_listed()
    }

    /// The current snapshot and the problems not reported by the previous reload; `None` until
    /// every kind has been listed once.
    pub fn reload(&mut self) -> Option<Reload> {
        let (objects, problems) = {
            let shared = lock(&self.shared);
            if !shared.all_listed() {
                return None;
            }
            let mut objects = Vec::new();
            let mut problems = Vec::new();
            for state in shared.kinds.values() {
                for entry in state.objects.values() {
                    if let Some(valid) = &entry.valid {
                        objects.push(Object::clone(valid));
                    }
                    problems.extend(entry.problems.iter().cloned());
                }
            }
            (objects, problems)
        };
        let snapshot = Arc::new(ClusterSnapshot::from_api_objects(objects));
        let mut seen = HashSet::new();
        let new_problems = problems
            .into_iter()
            .filter(|p| seen.insert(p.clone()) && !self.reported.contains(p))
            .collect();
        self.reported = seen;
        self.published = true;
        Some(Reload {
            snapshot,
            new_problems,
            parsed: Vec::new(),
        })
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the model keeps of an object as it arrives from the API.
trait Lean {
    fn make_lean(&mut self);
}

fn lean_metadata(meta: &mut ObjectMeta) {
    meta.annotations = None;
    lean_metadata_keep_annotations(meta);
}

/// For the kinds whose annotations the Ingress controller reads (ingress-nginx annotations,
/// `kubernetes.io/ingress.class`, `ingressclass.kubernetes.io/is-default-class`).
fn lean_metadata_keep_annotations(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(annotations) = &mut meta.annotations {
        // kubectl's copy of the whole object: big, and never read.
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

impl Lean for Node {
    fn make_lean(&mut self) {
        lean_metadata(&mut self.metadata);
        if let Some(status) = &mut self.status {
            // Keep addresses and conditions; drop the bulky inventory.
            status.images = None;
            status.node_info = None;
            status.volumes_attached = None;
            status.volumes_in_use = None;
            status.capacity = None;
            status.allocatable = None;
            status.daemon_endpoints = None;
            status.config = None;
            status.features = None;
            status.runtime_handlers = None;
            status.declared_features = None;
        }
    }
}

impl Lean for Namespace {
    fn make_lean(&mut self) {
        lean_metadata(&mut self.metadata);
    }
}

impl Lean for Pod {
    fn make_lean(&mut self) {
        lean_metadata(&mut self.metadata);
        if let Some(spec) = &mut self.spec {
            // Containers keep their names and ports (named ports), and init containers their
            // restart policy (sidecars); everything else of the spec that the model does not
            // read goes.
            let containers = spec
                .containers
                .iter_mut()
                .chain(spec.init_containers.iter_mut().flatten());
            for c in containers {
                *c = k8s_openapi::api::core::v1::Container {
                    name: std::mem::take(&mut c.name),
                    ports: c.ports.take(),
                    restart_policy: c.restart_policy.take(),
                    ..Default::default()
                };
            }
            spec.ephemeral_containers = None;
            spec.volumes = None;
            spec.affinity = None;
            spec.tolerations = None;
            spec.topology_spread_constraints = None;
            spec.security_context = None;
            spec.image_pull_secrets = None;
            spec.resource_claims = None;
            spec.resources = None;
            spec.readiness_gates = None;
            spec.scheduling_gates = None;
            spec.host_aliases = None;
            spec.dns_config = None;
            spec.overhead = None;
        }
        if let Some(status) = &mut self.status {
            status.container_statuses = None;
            status.init_container_statuses = None;
            status.ephemeral_container_statuses = None;
            status.resource_claim_statuses = None;
            status.resize = None;
            status.message = None;
        }
    }
}

impl Lean for Service {
    fn make_lean(&mut self) {
        lean_metadata(&mut self.metadata);
    }
}

impl Lean for EndpointSlice {
    fn make_lean(&mut self) {
        lean_metadata(&mut self.metadata);
    }
}

impl Lean for NetworkPolicy {
    fn make_lean(&mut self) {
        lean_metadata(&mut self.metadata);
    }
}

impl Lean for Ingress {
    fn make_lean(&mut self) {
        lean_metadata_keep_annotations(&mut self.metadata);
    }
}

impl Lean for IngressClass {
    fn make_lean(&mut self) {
        lean_metadata_keep_annotations(&mut self.metadata);
    }
}

impl Lean for Secret {
    fn make_lean(&mut self) {
        lean_metadata(&mut self.metadata);
        if self.type_.as_deref() != Some(SECRET_TYPE_TLS) {
            // Not ours (the field selector should have kept it away): hold none of its data.
            self.data = None;
            self.string_data = None;
        } else if let Some(data) = &mut self.data {
            data.retain(|k, _| {
                k == crate::validate::TLS_CERT_KEY || k == crate::validate::TLS_PRIVATE_KEY_KEY
            });
        }
    }
}

/// Defaults and validates an object from the API the way manifests are: its valid form, or
/// `None` when invalid; plus its problems (errors, or warnings about a valid object).
fn check(mut object: Object) -> (Option<Object>, Vec<Problem>) {
    if object.kind().namespaced() {
        let ns = &mut object.metadata_mut().namespace;
        if ns.as_deref().is_none_or(str::is_empty) {
            *ns = Some("default".to_string());
        }
    } else {
        object.metadata_mut().namespace = None;
    }
    object.apply_defaults();
    let mut findings = Findings::default();
    object.validate(&mut findings);
    let describe = object.describe();
    let as_problem = |e: crate::validate::FieldError| {
        Problem::new(e.message)
            .for_object(&describe)
            .at_field(e.field)
    };
    let mut problems: Vec<Problem> = findings.errors.into_iter().map(as_problem).collect();
    let valid = problems.is_empty();
    problems.extend(findings.warnings.into_iter().map(as_problem));
    (valid.then_some(object), problems)
}

/// The entry for a new version of an object: itself when valid, else the last valid version
/// (from `previous`).
fn entry_for(object: Object, previous: Option<&Entry>) -> Entry {
    let describe = object.describe();
    let (valid, problems) = check(object);
    let valid = match valid {
        Some(object) => Some(Arc::new(object)),
        None => {
            let kept = previous.and_then(|p| p.valid.clone());
            if kept.is_some() {
                tracing::debug!(object = %describe, "object is invalid; keeping its last valid version");
            }
            kept
        }
    };
    Entry { valid, problems }
}

fn is_ignored(object: &Object) -> bool {
    matches!(object, Object::Secret(s) if s.type_.as_deref() != Some(SECRET_TYPE_TLS))
}

fn key_of(object: &Object) -> ObjectKey {
    let mut key = object.key();
    if object.kind().namespaced() && key.namespace.is_empty() {
        key.namespace = "default".to_string();
    }
    key
}

/// Applies one watcher event of `kind` to the shared state.
fn apply_event(shared: &Mutex<Shared>, kind: Kind, event: Event<Object>) {
    let mut shared = lock(shared);
    let Some(state) = shared.kinds.get_mut(&kind) else {
        return;
    };
    let event = match event {
        // Only TLS Secrets are read, as from manifests (the field selector keeps the others
        // away from a real API server; this is the belt to its braces).
        Event::InitApply(o) | Event::Apply(o) if is_ignored(&o) => return,
        other => other,
    };
    let notify = match event {
        Event::Init => {
            state.relist = Some(BTreeMap::new());
            false
        }
        Event::InitApply(object) => {
            let key = key_of(&object);
            let relist = state.relist.get_or_insert_with(BTreeMap::new);
            // The last valid version may be in this list already (duplicates) or from before.
            let previous = relist.get(&key).or_else(|| state.objects.get(&key));
            let entry = entry_for(object, previous);
            relist.insert(key, entry);
            false
        }
        Event::InitDone => {
            let listed = state.relist.take().unwrap_or_default();
            let count = listed.len();
            state.objects = listed;
            let first = !state.listed;
            state.listed = true;
            if first {
                tracing::info!(event = "listed", kind = %kind, count, "listed {count} {kind} objects");
            } else {
                tracing::info!(event = "relisted", kind = %kind, count, "listed {count} {kind} objects again");
            }
            true
        }
        Event::Apply(object) => {
            let key = key_of(&object);
            let entry = entry_for(object, state.objects.get(&key));
            state.objects.insert(key, entry);
            true
        }
        Event::Delete(object) => state.objects.remove(&key_of(&object)).is_some(),
    };
    if notify {
        shared.changed();
    }
}

fn spawn_watch<K>(
    client: &Client,
    config: &watcher::Config,
    shared: &Arc<Mutex<Shared>>,
) -> JoinHandle<()>
where
    K: kube::Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + Lean
        + Into<Object>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let shared = Arc::clone(shared);
    let kind = Kind::from_name(<K as k8s_openapi::Resource>::KIND);
    let stream = watcher(api, config.clone())
        .modify(Lean::make_lean)
        .default_backoff();
    tokio::spawn(async move {
        let Some(kind) = kind else {
            return;
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => apply_event(&shared, kind, map_event(event)),
                Err(e) => {
                    tracing::warn!(event = "api_error", kind = %kind, error = %e, "watching {kind}: {e}")
                }
            }
        }
    })
}

fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, config)
}

fn map_event<K: Into<Object>>(event: Event<K>) -> Event<Object> {
    match event {
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(o.into()),
        Event::InitDone => Event::InitDone,
        Event::Apply(o) => Event::Apply(o.into()),
        Event::Delete(o) => Event::Delete(o.into()),
    }
}
