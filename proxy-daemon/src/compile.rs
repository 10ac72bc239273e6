//! Compile: the cluster model in, the desired service table of one node out.
//!
//! Pure and deterministic; this is where kube-proxy's Service semantics live.
//! Each Service port yields frontends in two scopes: [`Scope::Socket`] for
//! clients on the node (cluster IPs, and the node's addresses, externalIPs and
//! LoadBalancer IPs reached from inside), and [`Scope::External`] for packets
//! arriving from outside (NodePort on the node's addresses, externalIPs,
//! LoadBalancer IPs). Traffic policies choose each scope's endpoints.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};

use cluster_model::k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use cluster_model::k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use cluster_model::{ClusterSnapshot, LABEL_SERVICE_NAME, ObjectKey};
use ipnet::IpNet;

/// Transport protocols the socket hooks translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Parses a Kubernetes `protocol` field (absent means TCP). SCTP and
    /// anything else is not translated by the socket hooks: `None`.
    pub fn from_k8s(protocol: Option<&str>) -> Option<Self> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::IPPROTO_TCP,
            Self::Udp => proxy_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// Which clients a frontend entry serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Processes on the node and its pods, translated at the socket.
    Socket,
    /// Packets arriving from outside the node, translated per packet.
    External,
}

impl Scope {
    pub fn map_value(self) -> u8 {
        match self {
            Self::Socket => proxy_common::SCOPE_SOCKET,
            Self::External => proxy_common::SCOPE_EXTERNAL,
        }
    }
}

/// A service address clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            std::net::SocketAddr::new(self.ip, self.port),
            self.protocol
        )?;
        if self.scope == Scope::External {
            f.write_str(" (external)")?;
        }
        Ok(())
    }
}

/// An endpoint address traffic is translated to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node: outside traffic reaches it without SNAT.
    pub local: bool,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.ip, self.port))
    }
}

/// What one frontend should do: which Service port it belongs to and the
/// backends to choose from (sorted, no duplicates; empty means refuse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendTarget {
    pub service: ObjectKey,
    pub port_name: String,
    pub backends: Vec<BackendAddr>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 when off.
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` of a LoadBalancer IP frontend, those of its family: None,
    /// every source; otherwise only these (none at all when the Service lists only ranges of
    /// the other family).
    pub source_ranges: Option<Vec<IpNet>>,
}

/// The API's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;
/// The API's maximum for it.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86400;

/// The desired state of the service maps, and the health checks this node answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    pub frontends: BTreeMap<Frontend, FrontendTarget>,
    /// `healthCheckNodePort` → what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// A `healthCheckNodePort` of a LoadBalancer Service with `externalTrafficPolicy: Local`:
/// load balancers send traffic only to nodes where it answers 200.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectKey,
    /// Ready endpoints (distinct addresses) on this node.
    pub local_endpoints: usize,
}

/// Something in the model that compile had to leave out, with the object and
/// field it came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CompileWarning {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for CompileWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub table: ServiceTable,
    pub warnings: Vec<CompileWarning>,
}

/// Builds the service table of node `node` for every proxied Service in the snapshot.
pub fn compile(snapshot: &ClusterSnapshot, node: &str) -> Compiled {
    let mut compiler = Compiler::default();
    compiler.update(snapshot, node);
    Compiled {
        table: compiler.table,
        warnings: compiler.warnings,
    }
}

/// Distinguishes the tables of every [`Compiler`] in the process, so a [`TableDelta`] is never
/// applied on top of another compiler's table.
static REVISIONS: AtomicU64 = AtomicU64::new(1);

/// Which frontends of a [`Compiler`]'s table changed (added, removed or retargeted) from
/// revision `since` to revision `revision`. `since` is 0 for a compiler's first table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableDelta {
    pub since: u64,
    pub revision: u64,
    pub frontends: BTreeSet<Frontend>,
}

/// [`compile`] kept up to date from one snapshot to the next. What a Service contributes is
/// kept and computed again only when its inputs may have changed: the Service, its
/// EndpointSlices (as the snapshot's [`cluster_model::SnapshotChanges`] name them, when it follows the
/// snapshot compiled last) and the node's own inputs (name, addresses, zone: when they change,
/// everything is computed again, as for a snapshot of unknown lineage). The table is patched
/// where contributions changed. [`compile`] is this run once from empty, so both give the same
/// table and warnings.
#[derive(Debug, Default)]
pub struct Compiler {
    node: Option<NodeInputs>,
    /// [`ClusterSnapshot::revision`] of the snapshot compiled last (0: none, or unknown).
    snapshot_revision: u64,
    services: BTreeMap<ObjectKey, ServiceOutput>,
    /// Each Service's EndpointSlices (by label), and the reverse.
    service_slices: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    slice_service: HashMap<ObjectKey, ObjectKey>,
    /// The Services claiming each frontend; the first (by namespace and name) holds it.
    claims: BTreeMap<Frontend, BTreeSet<ObjectKey>>,
    /// The same for health check ports.
    health_claims: BTreeMap<u16, BTreeSet<ObjectKey>>,
    table: ServiceTable,
    warnings: Vec<CompileWarning>,
    revision: u64,
}

/// What a node's table depends on besides its Services and slices.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeInputs {
    name: String,
    addresses: Vec<IpAddr>,
    zone: Option<String>,
}

/// What one Service contributes to the table, before other Services' claims are weighed.
#[derive(Clone, Debug, Default, PartialEq)]
struct ServiceOutput {
    /// Its frontends with the first meaning it gives each, and the fields naming each (one per
    /// mention: a frontend held by another Service is reported once per mention).
    frontends: BTreeMap<Frontend, (FrontendTarget, Vec<String>)>,
    health_check: Option<(u16, HealthCheck)>,
    /// Its own warnings (not those about addresses other Services hold).
    warnings: Vec<CompileWarning>,
}

impl ServiceOutput {
    /// Adds a mention of a frontend; the first target stays.
    fn add_frontend(&mut self, frontend: Frontend, target: FrontendTarget, field: &str) {
        self.frontends
            .entry(frontend)
            .or_insert_with(|| (target, Vec::new()))
            .1
            .push(field.to_string());
    }
}

/// The Service a slice belongs to (label `kubernetes.io/service-name`, same namespace).
fn owner_of(key: &ObjectKey, slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ObjectKey::new(key.namespace.clone(), name.clone()))
}

impl Compiler {
    /// The table as of the last [`Compiler::update`].
    pub fn table(&self) -> &ServiceTable {
        &self.table
    }

    /// The warnings of the last [`Compiler::update`], sorted.
    pub fn warnings(&self) -> &[CompileWarning] {
        &self.warnings
    }

    /// Brings the table to `snapshot` for node `node`; returns which frontends changed.
    pub fn update(&mut self, snapshot: &ClusterSnapshot, node: &str) -> TableDelta {
        let inputs = NodeInputs {
            name: node.to_string(),
            addresses: node_ips(snapshot, node),
            zone: snapshot
                .nodes
                .get(node)
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(ZONE_LABEL))
                .filter(|z| !z.is_empty())
                .cloned(),
        };
        let follows = self.node.as_ref() == Some(&inputs) && self.snapshot_revision != 0;
        let changes = snapshot
            .changes
            .as_ref()
            .filter(|c| follows && c.since == self.snapshot_revision);
        let candidates: Vec<ObjectKey> = if follows && snapshot.revision == self.snapshot_revision {
            Vec::new()
        } else if let Some(changes) = changes {
            let mut candidates: BTreeSet<ObjectKey> = changes.services.clone();
            for key in &changes.endpoint_slices {
                let old = self.slice_service.remove(key);
                if let Some(old) = &old
                    && let Some(slices) = self.service_slices.get_mut(old)
                {
                    slices.remove(key);
                    if slices.is_empty() {
                        self.service_slices.remove(old);
                    }
                }
                let new = snapshot
                    .endpoint_slices
                    .get(key)
                    .and_then(|s| owner_of(key, s));
                if let Some(new) = &new {
                    self.slice_service.insert(key.clone(), new.clone());
                    self.service_slices
                        .entry(new.clone())
                        .or_default()
                        .insert(key.clone());
                }
                candidates.extend(old.into_iter().chain(new));
            }
            candidates.into_iter().collect()
        } else {
            // Unknown lineage or another node: everything afresh.
            self.service_slices.clear();
            self.slice_service.clear();
            for (key, slice) in &snapshot.endpoint_slices {
                if let Some(service) = owner_of(key, slice) {
                    self.slice_service.insert(key.clone(), service.clone());
                    self.service_slices
                        .entry(service)
                        .or_default()
                        .insert(key.clone());
                }
            }
            let mut all: BTreeSet<ObjectKey> = self.services.keys().cloned().collect();
            all.extend(snapshot.services.keys().cloned());
            all.into_iter().collect()
        };
        self.snapshot_revision = snapshot.revision;

        let mut touched: BTreeMap<ObjectKey, Option<ServiceOutput>> = BTreeMap::new();
        // A new node's inputs make every Service's output differ from the one kept.
        self.node = Some(inputs.clone());
        let no_slices = BTreeSet::new();
        for key in candidates {
            let new = snapshot.services.get(&key).map(|service| {
                let own: Vec<&EndpointSlice> = self
                    .service_slices
                    .get(&key)
                    .unwrap_or(&no_slices)
                    .iter()
                    .filter_map(|k| snapshot.endpoint_slices.get(k))
                    .collect();
                let ctx = ServiceContext {
                    key: &key,
                    node,
                    node_addresses: &inputs.addresses,
                    zone: inputs.zone.as_deref(),
                };
                let mut output = ServiceOutput::default();
                compile_service(&ctx, service, &own, &mut output);
                output
            });
            let old = match new {
                Some(new) if self.services.get(&key) == Some(&new) => continue,
                Some(new) => self.services.insert(key.clone(), new),
                None => self.services.remove(&key),
            };
            touched.insert(key, old);
        }

        let mut changed_frontends = BTreeSet::new();
        let mut changed_ports = BTreeSet::new();
        for (key, old) in touched {
            let new = self.services.get(&key);
            for frontend in old.iter().flat_map(|o| o.frontends.keys()) {
                if let Some(claims) = self.claims.get_mut(frontend) {
                    claims.remove(&key);
                }
                changed_frontends.insert(*frontend);
            }
            for frontend in new.iter().flat_map(|o| o.frontends.keys()) {
                self.claims
                    .entry(*frontend)
                    .or_default()
                    .insert(key.clone());
                changed_frontends.insert(*frontend);
            }
            for (port, _) in old.iter().filter_map(|o| o.health_check.as_ref()) {
                if let Some(claims) = self.health_claims.get_mut(port) {
                    claims.remove(&key);
                }
                changed_ports.insert(*port);
            }
            for (port, _) in new.iter().filter_map(|o| o.health_check.as_ref()) {
                self.health_claims
                    .entry(*port)
                    .or_default()
                    .insert(key.clone());
                changed_ports.insert(*port);
            }
        }
        let mut delta = TableDelta {
            since: self.revision,
            revision: REVISIONS.fetch_add(1, Ordering::Relaxed),
            frontends: BTreeSet::new(),
        };
        self.revision = delta.revision;
        for frontend in changed_frontends {
            let holder = self.claims.get(&frontend).and_then(|c| c.first());
            let target = holder
                .and_then(|k| self.services.get(k))
                .and_then(|c| c.frontends.get(&frontend))
                .map(|(target, _)| target);
            let differs = self.table.frontends.get(&frontend) != target;
            match target {
                Some(target) if differs => {
                    self.table.frontends.insert(frontend, target.clone());
                }
                Some(_) => {}
                None => {
                    self.table.frontends.remove(&frontend);
                    self.claims.remove(&frontend);
                }
            }
            if differs {
                delta.frontends.insert(frontend);
            }
        }
        for port in changed_ports {
            let holder = self.health_claims.get(&port).and_then(|c| c.first());
            let check = holder
                .and_then(|k| self.services.get(k))
                .and_then(|c| c.health_check.as_ref())
                .map(|(_, check)| check);
            match check {
                Some(check) => {
                    self.table.health_checks.insert(port, check.clone());
                }
                None => {
                    self.table.health_checks.remove(&port);
                    self.health_claims.remove(&port);
                }
            }
        }
        self.warnings = self.collect_warnings();
        delta
    }

    /// Every Service's own warnings plus one per mention of an address (or health check port)
    /// another Service holds, sorted.
    fn collect_warnings(&self) -> Vec<CompileWarning> {
        let mut warnings: Vec<CompileWarning> = self
            .services
            .values()
            .flat_map(|c| c.warnings.iter().cloned())
            .collect();
        for (frontend, claims) in self.claims.iter().filter(|(_, c)| c.len() > 1) {
            let mut claims = claims.iter();
            let Some(holder) = claims.next() else {
                continue;
            };
            for key in claims {
                let fields = self
                    .services
                    .get(key)
                    .and_then(|c| c.frontends.get(frontend))
                    .map(|(_, fields)| fields.as_slice())
                    .unwrap_or_default();
                for field in fields {
                    warnings.push(CompileWarning {
                        object: format!("Service {key}"),
                        field: field.clone(),
                        message: format!(
                            "{frontend} is already Service {holder}'s; not served here"
                        ),
                    });
                }
            }
        }
        for (port, claims) in self.health_claims.iter().filter(|(_, c)| c.len() > 1) {
            let mut claims = claims.iter();
            let Some(holder) = claims.next() else {
                continue;
            };
            for key in claims {
                warnings.push(CompileWarning {
                    object: format!("Service {key}"),
                    field: "spec.healthCheckNodePort".into(),
                    message: format!("{port} is already Service {holder}'s; not served"),
                });
            }
        }
        warnings.sort();
        warnings
    }
}

/// The node's own IPv4 addresses, InternalIPs first (the first is the source address of
/// SNAT for outside traffic, which is translated for IPv4).
pub fn node_ipv4s(snapshot: &ClusterSnapshot, node: &str) -> Vec<Ipv4Addr> {
    node_ips(snapshot, node)
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// The node's own addresses, where NodePorts listen: its InternalIPs, then its ExternalIPs,
/// IPv4 before IPv6 in each.
pub fn node_ips(snapshot: &ClusterSnapshot, node: &str) -> Vec<IpAddr> {
    let addresses: Vec<_> = snapshot
        .nodes
        .get(node)
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .collect();
    let mut out = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        let mut of_kind: Vec<IpAddr> = addresses
            .iter()
            .filter(|a| a.type_ == kind)
            .filter_map(|a| a.address.parse().ok())
            .collect();
        of_kind.sort();
        for ip in of_kind {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

struct ServiceContext<'a> {
    key: &'a ObjectKey,
    node: &'a str,
    node_addresses: &'a [IpAddr],
    /// The node's `topology.kubernetes.io/zone`.
    zone: Option<&'a str>,
}

fn compile_service(
    ctx: &ServiceContext<'_>,
    service: &Service,
    slices: &[&EndpointSlice],
    out: &mut ServiceOutput,
) {
    let Some(spec) = &service.spec else {
        return;
    };
    let key = ctx.key;
    let object = format!("Service {key}");
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    // ExternalName Services are DNS aliases; nothing to proxy.
    if ty == "ExternalName" {
        return;
    }
    let cluster_ips = cluster_ips(spec.cluster_ip.as_deref(), spec.cluster_ips.as_deref());
    let affinity_timeout_s = affinity_timeout(spec);
    if cluster_ips.is_empty() {
        // Headless (`None`) or not yet allocated.
        return;
    }
    let node_ports = ty == "NodePort" || ty == "LoadBalancer";
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let external_ips = ip_list(
        &object,
        "spec.externalIPs",
        spec.external_ips.as_deref(),
        out,
    );
    let load_balancer_ips = if ty == "LoadBalancer" {
        load_balancer_ips(service)
    } else {
        Vec::new()
    };
    let source_ranges = source_ranges(&object, spec, out);
    for ip in &load_balancer_ips {
        if ranges_of_family(source_ranges.as_deref(), ip).is_some_and(|r| r.is_empty()) {
            out.warnings.push(CompileWarning {
                object: object.clone(),
                field: "spec.loadBalancerSourceRanges".into(),
                message: format!("no range of {ip}'s family; no outside client may reach {ip}"),
            });
        }
    }
    if node_ports
        && ctx.node_addresses.is_empty()
        && spec.ports.iter().flatten().any(|p| p.node_port.is_some())
    {
        out.warnings.push(CompileWarning {
            object: object.clone(),
            field: "spec.ports[].nodePort".into(),
            message: format!(
                "node {} has no InternalIP or ExternalIP in its Node object; NodePorts not served on it",
                ctx.node
            ),
        });
    }
    let mut local_ready = BTreeSet::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{index}]");
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
            out.warnings.push(CompileWarning {
                object: object.clone(),
                field: format!("{field}.protocol"),
                message: format!(
                    "{} is not translated at the socket layer; port left unproxied",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            });
            continue;
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            continue; // The source rejects such objects; stay safe regardless.
        };
        if service_port == 0 {
            continue;
        }
        // Per family: a frontend leads to endpoints of its own family.
        let mut sets = BTreeMap::new();
        for family in [Family::V4, Family::V6] {
            let endpoints = endpoints_for_port(slices, port, protocol, ctx.node, family);
            local_ready.extend(
                endpoints
                    .iter()
                    .filter(|e| e.addr.local && e.state.ready)
                    .map(|e| e.addr.ip),
            );
            let near = topology_preferred(&endpoints, ctx.node, ctx.zone);
            let cluster = choose_backends(&near, false);
            let local = choose_backends(&endpoints, true);
            let internal = if internal_local { &local } else { &cluster };
            let external = if external_local { &local } else { &cluster };
            let chosen = PortBackends {
                internal: internal.clone(),
                external: external.clone(),
                cluster: cluster.clone(),
            };
            sets.insert(family, chosen);
        }
        let of = |ip: &IpAddr| &sets[&Family::of(ip)];
        let target =
            |backends: &Vec<BackendAddr>, source_ranges: Option<Vec<IpNet>>| FrontendTarget {
                service: key.clone(),
                port_name: port.name.clone().unwrap_or_default(),
                backends: backends.clone(),
                affinity_timeout_s,
                source_ranges,
            };
        let mut add = |ip: IpAddr, port: u16, scope: Scope, target: FrontendTarget, field: &str| {
            let frontend = Frontend {
                ip,
                port,
                protocol,
                scope,
            };
            out.add_frontend(frontend, target, field);
        };
        for ip in &cluster_ips {
            let field = format!("{field}.port");
            add(
                *ip,
                service_port,
                Scope::Socket,
                target(&of(ip).internal, None),
                &field,
            );
        }
        // From inside the cluster, the node's, external and load balancer
        // addresses lead to every endpoint, as kube-proxy short-circuits them.
        let node_port = port
            .node_port
            .filter(|_| node_ports)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0);
        if let Some(node_port) = node_port {
            let field = format!("{field}.nodePort");
            for ip in ctx.node_addresses {
                let set = of(ip);
                add(
                    *ip,
                    node_port,
                    Scope::Socket,
                    target(&set.cluster, None),
                    &field,
                );
                add(
                    *ip,
                    node_port,
                    Scope::External,
                    target(&set.external, None),
                    &field,
                );
            }
        }
        for ip in &external_ips {
            let set = of(ip);
            let field = "spec.externalIPs";
            add(
                *ip,
                service_port,
                Scope::Socket,
                target(&set.cluster, None),
                field,
            );
            add(
                *ip,
                service_port,
                Scope::External,
                target(&set.external, None),
                field,
            );
        }
        for ip in &load_balancer_ips {
            let set = of(ip);
            let field = "status.loadBalancer.ingress";
            add(
                *ip,
                service_port,
                Scope::Socket,
                target(&set.cluster, None),
                field,
            );
            let ranges = ranges_of_family(source_ranges.as_deref(), ip);
            add(
                *ip,
                service_port,
                Scope::External,
                target(&set.external, ranges),
                field,
            );
        }
    }
    if ty == "LoadBalancer" && external_local {
        let port = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        if let Some(port) = port {
            // Another Service may hold the port already: the Compiler decides.
            let check = HealthCheck {
                service: key.clone(),
                local_endpoints: local_ready.len(),
            };
            out.health_check = Some((port, check));
        }
    }
}

/// The addresses of a list field; anything else is reported.
fn ip_list(
    object: &str,
    field: &str,
    list: Option<&[String]>,
    out: &mut ServiceOutput,
) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for (i, text) in list.into_iter().flatten().enumerate() {
        match text.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => out.warnings.push(CompileWarning {
                object: object.to_string(),
                field: format!("{field}[{i}]"),
                message: format!("{text:?} is not an IP address"),
            }),
        }
    }
    ips
}

/// The load balancer addresses that are ours to serve: `status.loadBalancer.ingress[].ip`
/// unless its `ipMode` is `Proxy` (then the load balancer rewrites the destination to a node
/// address itself, and traffic from inside must really go through it).
fn load_balancer_ips(service: &Service) -> Vec<IpAddr> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// The ranges of `ip`'s family among a Service's source ranges, as kube-proxy splits them per
/// family. A Service with ranges of the other family only gets an empty list, which lets no
/// one in: ranges narrow, never widen, who may connect.
fn ranges_of_family(ranges: Option<&[IpNet]>, ip: &IpAddr) -> Option<Vec<IpNet>> {
    let ranges = ranges?;
    let of_family = |r: &&IpNet| matches!(r, IpNet::V4(_)) == ip.is_ipv4();
    Some(ranges.iter().filter(of_family).copied().collect())
}

/// `loadBalancerSourceRanges` (host bits cleared); None when the Service has none. Bad entries
/// are reported and left out, which narrows, never widens, who may connect: a list of only bad
/// entries lets no one in.
fn source_ranges(object: &str, spec: &ServiceSpec, out: &mut ServiceOutput) -> Option<Vec<IpNet>> {
    let listed = spec.load_balancer_source_ranges.as_ref()?;
    if listed.is_empty() {
        return None;
    }
    let mut ranges = Vec::new();
    for (i, text) in listed.iter().enumerate() {
        match text.trim().parse::<IpNet>() {
            Ok(net) => ranges.push(net.trunc()),
            Err(_) => out.warnings.push(CompileWarning {
                object: object.to_string(),
                field: format!("spec.loadBalancerSourceRanges[{i}]"),
                message: format!("{text:?} is not a CIDR; left out"),
            }),
        }
    }
    ranges.sort();
    ranges.dedup();
    Some(ranges)
}

/// The session affinity timeout of a Service, 0 when it has none.
fn affinity_timeout(spec: &ServiceSpec) -> u32 {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return 0;
    }
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match configured {
        None => DEFAULT_AFFINITY_TIMEOUT_S,
        // The source rejects values outside 1..=86400; stay safe regardless.
        Some(t) => u32::try_from(t)
            .unwrap_or(0)
            .clamp(1, MAX_AFFINITY_TIMEOUT_S),
    }
}

/// The cluster IPs of a Service, both families (`clusterIPs` wins over `clusterIP`).
fn cluster_ips(cluster_ip: Option<&str>, cluster_ips: Option<&[String]>) -> Vec<IpAddr> {
    let listed: Vec<&str> = match cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => cluster_ip.into_iter().collect(),
    };
    listed
        .into_iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// The EndpointSlice `addressType` of the family.
    fn address_type(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

/// The backends of one Service port and family, for each kind of frontend.
struct PortBackends {
    /// Cluster IPs (internalTrafficPolicy applied).
    internal: Vec<BackendAddr>,
    /// Outside traffic (externalTrafficPolicy applied).
    external: Vec<BackendAddr>,
    /// Node, external and load balancer addresses reached from inside.
    cluster: Vec<BackendAddr>,
}

/// One endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortEndpoint {
    /// `hints.forZones` names (None: no hints).
    zones: Option<Vec<String>>,
    /// `hints.forNodes` names.
    nodes: Vec<String>,
    addr: BackendAddr,
    state: EndpointState,
}

/// The endpoints of one Service port across the Service's slices.
fn endpoints_for_port(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    protocol: Protocol,
    node: &str,
    family: Family,
) -> Vec<PortEndpoint> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type != family.address_type() {
            continue;
        }
        // The slice port carrying this Service port: same name, same protocol.
        let Some(target_port) = slice.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or_default() == port_name;
            let same_protocol = Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol);
            (same_name && same_protocol)
                .then_some(p.port)
                .flatten()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
        }) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let state = EndpointState::of(endpoint);
            let local = endpoint.node_name.as_deref() == Some(node);
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>()
                    && Family::of(&ip) == family
                {
                    let addr = BackendAddr {
                        ip,
                        port: target_port,
                        local,
                    };
                    let hints = endpoint.hints.as_ref();
                    let zones = hints
                        .and_then(|h| h.for_zones.as_ref())
                        .map(|z| z.iter().map(|z| z.name.clone()).collect());
                    let nodes = hints
                        .and_then(|h| h.for_nodes.as_ref())
                        .map(|n| n.iter().map(|n| n.name.clone()).collect())
                        .unwrap_or_default();
                    out.push(PortEndpoint {
                        zones,
                        nodes,
                        addr,
                        state,
                    });
                }
            }
        }
    }
    out
}

/// The label naming a node's zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The endpoints topology hints prefer for a client on `node` in `zone`, as kube-proxy does
/// (`trafficDistribution`): those hinted for the node, else those hinted for its zone, else
/// all. Hints count only when every serving endpoint has zone hints and the node has a zone.
fn topology_preferred(
    endpoints: &[PortEndpoint],
    node: &str,
    zone: Option<&str>,
) -> Vec<PortEndpoint> {
    let serving = || endpoints.iter().filter(|e| e.state.serving);
    let Some(zone) = zone else {
        return endpoints.to_vec();
    };
    if serving().next().is_none() || serving().any(|e| e.zones.is_none()) {
        return endpoints.to_vec();
    }
    let for_node: Vec<PortEndpoint> = serving()
        .filter(|e| e.nodes.iter().any(|n| n == node))
        .cloned()
        .collect();
    if !for_node.is_empty() {
        return for_node;
    }
    let for_zone: Vec<PortEndpoint> = serving()
        .filter(|e| e.zones.iter().flatten().any(|z| z == zone))
        .cloned()
        .collect();
    if for_zone.is_empty() {
        endpoints.to_vec()
    } else {
        for_zone
    }
}

/// The backends among `endpoints` (only this node's when `local_only`), chosen as kube-proxy
/// does: ready ones; when there are none, serving-and-terminating ones; else none.
fn choose_backends(endpoints: &[PortEndpoint], local_only: bool) -> Vec<BackendAddr> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for e in endpoints.iter().filter(|e| e.addr.local || !local_only) {
        if e.state.ready {
            ready.insert(e.addr);
        } else if e.state.serving && e.state.terminating {
            terminating.insert(e.addr);
        }
    }
    let chosen = if ready.is_empty() { terminating } else { ready };
    chosen.into_iter().collect()
}

/// EndpointConditions with the API's defaults applied: `ready` absent means
/// ready, `serving` absent means the same as `ready`, `terminating` absent
/// means false.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointState {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl EndpointState {
    pub fn of(endpoint: &Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        Self {
            ready,
            serving,
            terminating,
        }
    }
}

#[cfg(test)]
mod tests;
