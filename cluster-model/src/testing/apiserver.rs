//! An in-process Kubernetes list/watch server for tests of the API source with the real kube
//! client (no kube-apiserver can be installed where Sluice is built).
//!
//! What it does like the real API server:
//! - one store for every resource with a cluster-wide, monotonically increasing
//!   resourceVersion; every write stamps the object with it and appends an event to its
//!   resource's log;
//! - `GET` list (cluster-wide or in one namespace): the matching items plus the list's
//!   `metadata.resourceVersion` (`limit`/`continue` are accepted, and everything is returned in
//!   one page, which the API allows);
//! - `GET ?watch=true&resourceVersion=N`: replays the events after N, then streams new ones as
//!   JSON lines (`{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":…}`); without N (or
//!   N = 0), synthetic `ADDED` events for the current objects first; `timeoutSeconds` ends the
//!   watch; `allowWatchBookmarks=true` gets periodic `BOOKMARK`s with the current version;
//! - a watch from a version older than the compacted log gets an `ERROR` event carrying a
//!   `Status` with code 410 (reason `Expired`), as the real API answers;
//! - label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (…)`, `k notin (…)`) and field
//!   selectors (`metadata.name`, `metadata.namespace`, and `spec.nodeName`, `status.phase`,
//!   `status.podIP` for pods; `=`, `==`, `!=`); other fields are refused with 400 as the API
//!   does. A watch with a selector sees an object that stops matching as `DELETED` and one that
//!   starts matching as `ADDED`.
//!
//! - writes a controller makes: `PATCH` with a JSON merge patch (`application/merge-patch+json`)
//!   of an object or of its `status` subresource (where only `status` changes, as in the API),
//!   and `POST` of a new object to a collection (Events), `metadata.generateName` honoured,
//!   409 when the name is taken.
//!
//! What a test can do to it: write and delete objects ([`ApiServer::apply`],
//! [`ApiServer::delete`]), drop every open watch connection ([`ApiServer::drop_watches`]),
//! compact the event log ([`ApiServer::compact`]), and make it unreachable (connections refused,
//! open ones cut) and reachable again on the same address ([`ApiServer::set_reachable`]).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Whether a k8s-openapi resource scope is namespaced (implemented for both scopes).
pub trait ScopeKind {
    const NAMESPACED: bool;
}
impl ScopeKind for k8s_openapi::NamespaceResourceScope {
    const NAMESPACED: bool = true;
}
impl ScopeKind for k8s_openapi::ClusterResourceScope {
    const NAMESPACED: bool = false;
}

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A resource the server serves, e.g. `("discovery.k8s.io", "v1", "endpointslices")`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ResourceId {
    group: String,
    version: String,
    plural: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn name(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

struct LogEvent {
    rv: u64,
    kind: EventType,
    object: Value,
    /// The version before this change (for selector transitions).
    previous: Option<Value>,
}

struct Resource {
    kind: String,
    api_version: String,
    namespaced: bool,
    /// By (namespace, name).
    objects: BTreeMap<(String, String), Value>,
    events: Vec<LogEvent>,
}

struct State {
    rv: u64,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    resources: HashMap<ResourceId, Resource>,
    /// Lists served, by plural (e.g. "services").
    lists: HashMap<String, usize>,
    /// Watch requests served, by plural.
    watches: HashMap<String, usize>,
}

/// What wakes open watches: the current resourceVersion and how many times watches were dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Signal {
    rv: u64,
    drops: u64,
}

struct Net {
    accept: Option<JoinHandle<()>>,
    connections: Vec<JoinHandle<()>>,
}

struct Inner {
    state: Mutex<State>,
    signal: watch::Sender<Signal>,
    net: Mutex<Net>,
    bookmark_interval: Duration,
    open_watches: Mutex<usize>,
}

/// Options of the server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// How often an open watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// The server; dropping it stops it.
pub struct ApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ApiServer {
    /// Starts a server on a free port of 127.0.0.1 serving the kinds the cluster model reads.
    pub async fn start() -> io::Result<ApiServer> {
        ApiServer::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> io::Result<ApiServer> {
        let (signal, _) = watch::channel(Signal::default());
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 1,
                compacted: 0,
                resources: HashMap::new(),
                lists: HashMap::new(),
                watches: HashMap::new(),
            }),
            signal,
            net: Mutex::new(Net {
                accept: None,
                connections: Vec::new(),
            }),
            bookmark_interval: options.bookmark_interval,
            open_watches: Mutex::new(0),
        });
        let mut server = ApiServer {
            inner,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        server.register::<k8s_openapi::api::core::v1::Node>();
        server.register::<k8s_openapi::api::core::v1::Namespace>();
        server.register::<k8s_openapi::api::core::v1::Pod>();
        server.register::<k8s_openapi::api::core::v1::Service>();
        server.register::<k8s_openapi::api::discovery::v1::EndpointSlice>();
        server.register::<k8s_openapi::api::networking::v1::NetworkPolicy>();
        server.register::<k8s_openapi::api::networking::v1::Ingress>();
        server.register::<k8s_openapi::api::networking::v1::IngressClass>();
        server.register::<k8s_openapi::api::core::v1::Secret>();
        server.register::<k8s_openapi::api::core::v1::Event>();
        server.register::<k8s_openapi::api::events::v1::Event>();
        server.addr = listen(&server.inner, server.addr)?;
        Ok(server)
    }

    /// Serves a resource type (with no objects yet) from now on.
    pub fn register<K: k8s_openapi::Resource>(&self)
    where
        K::Scope: ScopeKind,
    {
        let mut state = lock(&self.inner.state);
        state
            .resources
            .entry(resource_id::<K>())
            .or_insert_with(|| Resource {
                kind: K::KIND.to_string(),
                api_version: K::API_VERSION.to_string(),
                namespaced: <K::Scope as ScopeKind>::NAMESPACED,
                objects: BTreeMap::new(),
                events: Vec::new(),
            });
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let uri = self
            .url()
            .parse()
            .unwrap_or_else(|e| panic!("the server's own URL: {e}"));
        let config = kube::Config::new(uri);
        // Only fails for TLS settings; this is plain HTTP.
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"))
    }

    /// Writes a kubeconfig file pointing at this server (no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\n\
             current-context: test\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    /// The current resourceVersion (of the last write).
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.state).rv
    }

    /// Creates or replaces an object (namespace "default" when a namespaced one has none);
    /// returns the resourceVersion of the write.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, object: &K) -> u64
    where
        K::Scope: ScopeKind,
    {
        self.register::<K>();
        let value = serde_json::to_value(object).unwrap_or(Value::Null);
        self.apply_value(&resource_id::<K>(), value)
    }

    /// Deletes an object; returns the resourceVersion of the deletion, `None` if there was none.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> Option<u64> {
        let id = resource_id::<K>();
        let rv = {
            let mut state = lock(&self.inner.state);
            let rv = state.rv + 1;
            let resource = state.resources.get_mut(&id)?;
            let ns = if resource.namespaced { namespace } else { "" };
            let mut object = resource
                .objects
                .remove(&(ns.to_string(), name.to_string()))?;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            resource.events.push(LogEvent {
                rv,
                kind: EventType::Deleted,
                object,
                previous: None,
            });
            state.rv = rv;
            rv
        };
        self.wake();
        Some(rv)
    }

    fn apply_value(&self, id: &ResourceId, value: Value) -> u64 {
        apply_value(&self.inner, id, value)
    }

    /// Every object of a kind, as stored (e.g. to check what a controller wrote).
    pub fn objects<K: k8s_openapi::Resource + serde::de::DeserializeOwned>(&self) -> Vec<K> {
        let state = lock(&self.inner.state);
        let Some(resource) = state.resources.get(&resource_id::<K>()) else {
            return Vec::new();
        };
        resource
            .objects
            .values()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    fn wake(&self) {
        wake(&self.inner);
    }

    /// Forgets the event log up to now: a watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut state = lock(&self.inner.state);
        let rv = state.rv;
        state.compacted = rv;
        for resource in state.resources.values_mut() {
            resource.events.retain(|e| e.rv > rv);
        }
    }

    /// Cuts every open watch connection (abruptly, mid-stream, as a broken connection looks).
    pub fn drop_watches(&self) {
        self.inner.signal.send_modify(|s| s.drops += 1);
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        *lock(&self.inner.open_watches)
    }

    /// How many lists of `plural` (e.g. "services") were served.
    pub fn lists(&self, plural: &str) -> usize {
        lock(&self.inner.state)
            .lists
            .get(plural)
            .copied()
            .unwrap_or(0)
    }

    /// How many watches of `plural` were started.
    pub fn watches(&self, plural: &str) -> usize {
        lock(&self.inner.state)
            .watches
            .get(plural)
            .copied()
            .unwrap_or(0)
    }

    /// Unreachable: stops listening (connections are refused) and cuts open connections.
    /// Reachable: listens again on the same address. Writes keep working either way.
    pub async fn set_reachable(&self, reachable: bool) -> io::Result<()> {
        if reachable {
            if lock(&self.inner.net).accept.is_none() {
                listen(&self.inner, self.addr)?;
            }
            return Ok(());
        }
        let tasks: Vec<JoinHandle<()>> = {
            let mut net = lock(&self.inner.net);
            net.accept
                .take()
                .into_iter()
                .chain(net.connections.drain(..))
                .collect()
        };
        for task in &tasks {
            task.abort();
        }
        // Wait until the listener and the sockets are closed for real.
        for task in tasks {
            let _ = task.await;
        }
        self.drop_watches();
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let mut net = lock(&self.inner.net);
        for task in net
            .accept
            .take()
            .into_iter()
            .chain(net.connections.drain(..))
        {
            task.abort();
        }
        drop(net);
        self.drop_watches();
    }
}

/// Stores `value` as the new version of its object (created or replaced) and wakes watches.
fn apply_value(inner: &Inner, id: &ResourceId, mut value: Value) -> u64 {
    let rv = {
        let mut state = lock(&inner.state);
        let rv = state.rv + 1;
        let Some(resource) = state.resources.get_mut(id) else {
            return rv - 1;
        };
        if !value.is_object() {
            return rv - 1;
        }
        value["kind"] = json!(resource.kind);
        value["apiVersion"] = json!(resource.api_version);
        if !value.get("metadata").is_some_and(Value::is_object) {
            value["metadata"] = json!({});
        }
        let meta = &mut value["metadata"];
        if resource.namespaced {
            if meta["namespace"].as_str().is_none_or(str::is_empty) {
                meta["namespace"] = json!("default");
            }
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        meta["resourceVersion"] = json!(rv.to_string());
        let key = (
            meta["namespace"].as_str().unwrap_or("").to_string(),
            meta["name"].as_str().unwrap_or("").to_string(),
        );
        let previous = resource.objects.get(&key).cloned();
        match previous.as_ref().and_then(|p| p["metadata"].get("uid")) {
            Some(uid) => meta["uid"] = uid.clone(),
            None => {
                if meta.get("uid").is_none() {
                    meta["uid"] = json!(format!("uid-{rv}"));
                }
            }
        }
        resource.objects.insert(key, value.clone());
        resource.events.push(LogEvent {
            rv,
            kind: if previous.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            },
            object: value,
            previous,
        });
        state.rv = rv;
        rv
    };
    wake(inner);
    rv
}

fn wake(inner: &Inner) {
    let rv = lock(&inner.state).rv;
    inner.signal.send_modify(|s| s.rv = rv);
}

fn resource_id<K: k8s_openapi::Resource>() -> ResourceId {
    ResourceId {
        group: K::GROUP.to_string(),
        version: K::VERSION.to_string(),
        plural: K::URL_PATH_SEGMENT.to_string(),
    }
}

/// Binds `addr` (port 0: a free one) and serves there; returns the bound address.
fn listen(inner: &Arc<Inner>, addr: SocketAddr) -> io::Result<SocketAddr> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(128)?;
    let bound = listener.local_addr()?;
    let weak = Arc::downgrade(inner);
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let service_inner = Arc::clone(&inner);
            let connection = tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let inner = Arc::clone(&service_inner);
                    async move {
                        let response = if req.method() == Method::GET {
                            handle(&inner, req)
                        } else {
                            handle_write(&inner, req).await
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            let mut net = lock(&inner.net);
            net.connections.retain(|c| !c.is_finished());
            net.connections.push(connection);
        }
    });
    lock(&inner.net).accept = Some(accept);
    Ok(bound)
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let mut response = Response::new(Full::new(bytes).map_err(|e| match e {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn error(code: StatusCode, reason: &str, message: impl Into<String>) -> Response<Body> {
    full(code, status(code, reason, message))
}

/// What a request path names.
struct Target {
    id: ResourceId,
    namespace: Option<String>,
    name: Option<String>,
    /// e.g. `status`.
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name, subresource) = match rest {
        [plural] => (None, *plural, None, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        [plural, name] => (None, *plural, Some(*name), None),
        [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    Some(Target {
        id: ResourceId {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
        },
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        subresource: subresource.map(str::to_string),
    })
}

fn query_params(query: Option<&str>) -> HashMap<String, String> {
    let mut params = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(percent_decode(k), percent_decode(v));
    }
    params
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Everything that decides whether an object is in a request's view.
struct Filter {
    namespace: Option<String>,
    name: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        if let Some(name) = &self.name
            && meta["name"].as_str() != Some(name.as_str())
        {
            return false;
        }
        self.labels.iter().all(|r| r.matches(&meta["labels"]))
            && self.fields.iter().all(|r| r.matches(object))
    }
}

#[derive(Debug)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelRequirement {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            LabelRequirement::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::NotExists(k) => get(k).is_none(),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        }
    }
}

/// Splits on commas outside parentheses.
fn split_requirements(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(s[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

fn valid_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut out = Vec::new();
    for part in split_requirements(s) {
        let bad = || format!("unable to parse requirement: {part:?}");
        if let Some(key) = part.strip_prefix('!') {
            let key = key.trim();
            if !valid_label_part(key) {
                return Err(bad());
            }
            out.push(LabelRequirement::NotExists(key.to_string()));
        } else if let Some((k, v)) = part.split_once("!=") {
            out.push(LabelRequirement::NotEquals(
                k.trim().to_string(),
                v.trim().to_string(),
            ));
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            out.push(LabelRequirement::Equals(
                k.trim().to_string(),
                v.trim().to_string(),
            ));
        } else if let Some((k, op, set)) = set_requirement(part) {
            let values: Vec<String> = set
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if !valid_label_part(k) || values.is_empty() {
                return Err(bad());
            }
            out.push(if op == "in" {
                LabelRequirement::In(k.to_string(), values)
            } else {
                LabelRequirement::NotIn(k.to_string(), values)
            });
        } else if valid_label_part(part) {
            out.push(LabelRequirement::Exists(part.to_string()));
        } else {
            return Err(bad());
        }
    }
    Ok(out)
}

/// `key in (a,b)` / `key notin (a,b)`: (key, operator, inside of the parentheses).
fn set_requirement(part: &str) -> Option<(&str, &str, &str)> {
    let open = part.find('(')?;
    let inner = part[open + 1..].strip_suffix(')')?;
    let mut head = part[..open].split_whitespace();
    let key = head.next()?;
    let op = head.next()?;
    if head.next().is_some() || !(op == "in" || op == "notin") {
        return None;
    }
    Some((key, op, inner))
}

#[derive(Debug)]
struct FieldRequirement {
    path: Vec<String>,
    value: String,
    equal: bool,
}

impl FieldRequirement {
    fn matches(&self, object: &Value) -> bool {
        let mut v = object;
        for p in &self.path {
            v = &v[p.as_str()];
        }
        let actual = v.as_str().unwrap_or("");
        (actual == self.value) == self.equal
    }
}

fn parse_field_selector(s: &str, plural: &str) -> Result<Vec<FieldRequirement>, String> {
    let mut out = Vec::new();
    for part in split_requirements(s) {
        let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
            (f, v, false)
        } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (f, v, true)
        } else {
            return Err(format!("invalid selector: {part:?}"));
        };
        let field = field.trim();
        let supported = matches!(field, "metadata.name" | "metadata.namespace")
            || (plural == "pods"
                && matches!(field, "spec.nodeName" | "status.phase" | "status.podIP"))
            || (plural == "secrets" && field == "type");
        if !supported {
            return Err(format!("field label not supported: {field}"));
        }
        out.push(FieldRequirement {
            path: field.split('.').map(str::to_string).collect(),
            value: value.trim().to_string(),
            equal,
        });
    }
    Ok(out)
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` deletes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in fields {
        if value.is_null() {
            if let Some(object) = target.as_object_mut() {
                object.remove(key);
            }
        } else {
            merge_patch(&mut target[key.as_str()], value);
        }
    }
}

/// Most bytes a write's body may have.
const MAX_WRITE_BODY: usize = 1 << 20;

/// `PATCH …/NAME[/status]` (merge patch) and `POST` to a collection.
async fn handle_write(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let Some(target) = parse_path(req.uri().path()) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match http_body_util::Limited::new(req.into_body(), MAX_WRITE_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let namespaced = {
        let state = lock(&inner.state);
        match state.resources.get(&target.id) {
            Some(r) => r.namespaced,
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource",
                );
            }
        }
    };
    let ns = if namespaced {
        target.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    match (
        method,
        target.name.as_deref(),
        target.subresource.as_deref(),
    ) {
        (Method::PATCH, Some(name), subresource @ (None | Some("status"))) => {
            if !content_type.starts_with("application/merge-patch+json") {
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!("this test server takes merge patches only, not {content_type:?}"),
                );
            }
            let current = lock(&inner.state)
                .resources
                .get(&target.id)
                .and_then(|r| r.objects.get(&(ns.clone(), name.to_string())).cloned());
            let Some(mut object) = current else {
                return error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} {name:?} not found", target.id.plural),
                );
            };
            if subresource.is_some() {
                // The status subresource changes status only, whatever else the patch says.
                if let Some(status) = body.get("status") {
                    merge_patch(&mut object["status"], status);
                }
            } else {
                let identity = object["metadata"].clone();
                merge_patch(&mut object, &body);
                // Name, namespace and uid are the object's, whatever the patch says.
                for field in ["name", "namespace", "uid"] {
                    match (identity.get(field), object["metadata"].as_object_mut()) {
                        (Some(v), Some(meta)) => {
                            meta.insert(field.to_string(), v.clone());
                        }
                        (None, Some(meta)) => {
                            meta.remove(field);
                        }
                        _ => {}
                    }
                }
            }
            apply_value(inner, &target.id, object.clone());
            let stored = lock(&inner.state)
                .resources
                .get(&target.id)
                .and_then(|r| r.objects.get(&(ns, name.to_string())).cloned())
                .unwrap_or(object);
            full(StatusCode::OK, stored)
        }
        (Method::POST, None, None) => {
            let mut object = body;
            if !object.is_object() {
                return error(StatusCode::BAD_REQUEST, "BadRequest", "not an object");
            }
            let rv = lock(&inner.state).rv + 1;
            let meta = &mut object["metadata"];
            let name = match (meta["name"].as_str(), meta["generateName"].as_str()) {
                (Some(n), _) if !n.is_empty() => n.to_string(),
                (_, Some(prefix)) => format!("{prefix}{rv:05}"),
                _ => {
                    return error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name or metadata.generateName is required",
                    );
                }
            };
            meta["name"] = json!(name);
            if namespaced {
                meta["namespace"] = json!(ns);
            }
            let taken = lock(&inner.state)
                .resources
                .get(&target.id)
                .is_some_and(|r| r.objects.contains_key(&(ns.clone(), name.clone())));
            if taken {
                return error(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{} {name:?} already exists", target.id.plural),
                );
            }
            apply_value(inner, &target.id, object);
            let stored = lock(&inner.state)
                .resources
                .get(&target.id)
                .and_then(|r| r.objects.get(&(ns, name)).cloned())
                .unwrap_or(Value::Null);
            full(StatusCode::CREATED, stored)
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "this test server takes GET, PATCH of status and POST of new objects",
        ),
    }
}

fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let Some(target) = parse_path(req.uri().path()) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let params = query_params(req.uri().query());
    let labels = match parse_label_selector(params.get("labelSelector").map_or("", String::as_str))
    {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let fields = match parse_field_selector(
        params.get("fieldSelector").map_or("", String::as_str),
        &target.id.plural,
    ) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let filter = Filter {
        namespace: target.namespace.clone(),
        name: None,
        labels,
        fields,
    };
    let state = lock(&inner.state);
    let Some(resource) = state.resources.get(&target.id) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if let Some(name) = &target.name {
        let ns = if resource.namespaced {
            target.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        };
        return match resource.objects.get(&(ns, name.clone())) {
            Some(object) => full(StatusCode::OK, object.clone()),
            None => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} {name:?} not found", target.id.plural),
            ),
        };
    }
    let watching = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        let items: Vec<Value> = resource
            .objects
            .values()
            .filter(|o| filter.matches(o))
            .cloned()
            .collect();
        let body = json!({
            "kind": format!("{}List", resource.kind),
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        });
        drop(state);
        *lock(&inner.state)
            .lists
            .entry(target.id.plural.clone())
            .or_default() += 1;
        return full(StatusCode::OK, body);
    }
    drop(state);

    let from = params
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v != 0);
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    *lock(&inner.state)
        .watches
        .entry(target.id.plural.clone())
        .or_default() += 1;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(64);
    tokio::spawn(run_watch(
        Arc::clone(inner),
        WatchRequest {
            id: target.id,
            filter,
            from,
            timeout,
            bookmarks,
        },
        tx,
    ));
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

struct WatchRequest {
    id: ResourceId,
    filter: Filter,
    from: Option<u64>,
    timeout: Option<Duration>,
    bookmarks: bool,
}

fn line(event_type: &str, object: &Value) -> Frame<Bytes> {
    let mut bytes =
        serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Frame::data(Bytes::from(bytes))
}

/// What to send next on a watch: the events after `last`, or an error that ends it.
enum Next {
    Lines(Vec<Frame<Bytes>>, u64),
    Gone(Frame<Bytes>),
    NoResource,
}

fn events_after(inner: &Inner, req: &WatchRequest, last: Option<u64>, bookmark: bool) -> Next {
    let state = lock(&inner.state);
    let Some(resource) = state.resources.get(&req.id) else {
        return Next::NoResource;
    };
    let mut lines = Vec::new();
    match last {
        None => {
            for object in resource.objects.values().filter(|o| req.filter.matches(o)) {
                lines.push(line("ADDED", object));
            }
        }
        Some(last) if last < state.compacted => {
            return Next::Gone(line(
                "ERROR",
                &status(
                    StatusCode::GONE,
                    "Expired",
                    format!("too old resource version: {last} ({})", state.compacted),
                ),
            ));
        }
        Some(last) => {
            for event in resource.events.iter().filter(|e| e.rv > last) {
                let now = req.filter.matches(&event.object);
                let before = event
                    .previous
                    .as_ref()
                    .is_some_and(|p| req.filter.matches(p));
                let kind = match (event.kind, before, now) {
                    (EventType::Deleted, _, true) => EventType::Deleted,
                    (EventType::Modified, true, true) => EventType::Modified,
                    (EventType::Modified, true, false) => EventType::Deleted,
                    (EventType::Added | EventType::Modified, false, true) => EventType::Added,
                    _ => continue,
                };
                lines.push(line(kind.name(), &event.object));
            }
        }
    }
    if bookmark {
        lines.push(line(
            "BOOKMARK",
            &json!({
                "kind": resource.kind,
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": state.rv.to_string()},
            }),
        ));
    }
    Next::Lines(lines, state.rv)
}

struct OpenWatch<'a>(&'a Inner);

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        *lock(&self.0.open_watches) -= 1;
    }
}

async fn run_watch(
    inner: Arc<Inner>,
    req: WatchRequest,
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
) {
    *lock(&inner.open_watches) += 1;
    let _open = OpenWatch(&inner);
    let mut signal = inner.signal.subscribe();
    let drops = signal.borrow_and_update().drops;
    let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut bookmark_tick = tokio::time::interval(inner.bookmark_interval);
    bookmark_tick.tick().await;
    let mut last = req.from;
    let mut bookmark = false;
    loop {
        match events_after(&inner, &req, last, bookmark) {
            Next::NoResource => return,
            Next::Gone(frame) => {
                let _ = tx.send(Ok(frame)).await;
                return;
            }
            Next::Lines(lines, rv) => {
                for frame in lines {
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                last = Some(rv);
            }
        }
        bookmark = false;
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            changed = signal.changed() => {
                if changed.is_err() {
                    return;
                }
                if signal.borrow_and_update().drops != drops {
                    // A broken connection: the body ends with an error, hyper cuts the
                    // connection without finishing the chunked response.
                    let _ = tx.send(Err(io::Error::new(io::ErrorKind::ConnectionReset, "watch dropped"))).await;
                    return;
                }
            }
            _ = bookmark_tick.tick(), if req.bookmarks => bookmark = true,
            _ = timeout => return,
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors() {
        let labels = json!({"app": "web", "tier": "front"});
        let check = |s: &str| {
            parse_label_selector(s)
                .map(|rs| rs.iter().all(|r| r.matches(&labels)))
                .map_err(|e| e.to_string())
        };
        assert_eq!(check(""), Ok(true));
        assert_eq!(check("app=web"), Ok(true));
        assert_eq!(check("app==web"), Ok(true));
        assert_eq!(check("app!=web"), Ok(false));
        assert_eq!(check("app=web,tier=back"), Ok(false));
        assert_eq!(check("app"), Ok(true));
        assert_eq!(check("!app"), Ok(false));
        assert_eq!(check("!missing"), Ok(true));
        assert_eq!(check("tier in (back, front)"), Ok(true));
        assert_eq!(check("tier notin (back,front)"), Ok(false));
        assert_eq!(check("missing notin (x)"), Ok(true));
        assert_eq!(check("missing in (x)"), Ok(false));
        assert!(check("app in ()").is_err());
        assert!(check("a b c").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let check = |s: &str, plural: &str| {
            parse_field_selector(s, plural).map(|rs| rs.iter().all(|r| r.matches(&pod)))
        };
        assert_eq!(check("metadata.name=p", "pods"), Ok(true));
        assert_eq!(check("metadata.namespace!=ns", "pods"), Ok(false));
        assert_eq!(check("spec.nodeName=n1,metadata.name==p", "pods"), Ok(true));
        assert_eq!(check("spec.nodeName=n2", "pods"), Ok(false));
        assert!(check("spec.nodeName=n1", "services").is_err());
        assert!(check("spec.foo=1", "pods").is_err());
    }

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/namespaces/prod/services").expect("path");
        assert_eq!(t.id.plural, "services");
        assert_eq!(t.namespace.as_deref(), Some("prod"));
        let t = parse_path("/apis/discovery.k8s.io/v1/endpointslices").expect("path");
        assert_eq!(t.id.group, "discovery.k8s.io");
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = parse_path("/api/v1/namespaces").expect("path");
        assert_eq!(t.id.plural, "namespaces");
        let t = parse_path("/api/v1/nodes/n1").expect("path");
        assert_eq!(t.name.as_deref(), Some("n1"));
        let t = parse_path("/apis/networking.k8s.io/v1/namespaces/prod/ingresses/web/status")
            .expect("path");
        assert_eq!(
            (
                t.id.plural.as_str(),
                t.name.as_deref(),
                t.subresource.as_deref()
            ),
            ("ingresses", Some("web"), Some("status"))
        );
        assert!(parse_path("/healthz").is_none());
    }

    #[test]
    fn merge_patches_follow_rfc_7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut target,
            &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(
            target,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
        );
        let mut scalar = json!("s");
        merge_patch(&mut scalar, &json!({"k": null, "v": 1}));
        assert_eq!(scalar, json!({"v": 1}));
    }

    #[test]
    fn decoding() {
        assert_eq!(
            percent_decode("app%3Dweb%2Ctier+in+%28a%29"),
            "app=web,tier in (a)"
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
