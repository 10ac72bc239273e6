//! The pure compile from a cluster snapshot to what the proxy serves: routes, the endpoints of
//! every backend, and which Secret serves which TLS host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use cluster_model::k8s_openapi::api::discovery::v1::EndpointSlice;
use cluster_model::{ClusterSnapshot, ObjectKey};

use crate::class::ClassConfig;
use crate::route::{Backend, PortRef, Problem, RouteTable, compile, normalize_host};

/// Hosts named in our Ingresses' `spec.tls`, each with the Secret that serves it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsHosts {
    pub exact: BTreeMap<String, ObjectKey>,
    /// By the suffix after "*.".
    pub wildcard: BTreeMap<String, ObjectKey>,
}

impl TlsHosts {
    /// The Secret for a host (SNI or Host header): exact first, then a wildcard covering exactly
    /// one more label.
    pub fn lookup(&self, host: &str) -> Option<&ObjectKey> {
        let host = normalize_host(host);
        self.exact.get(&host).or_else(|| {
            let (first, rest) = host.split_once('.')?;
            (!first.is_empty()).then(|| self.wildcard.get(rest))?
        })
    }

    /// Every Secret named.
    pub fn secrets(&self) -> BTreeSet<&ObjectKey> {
        self.exact.values().chain(self.wildcard.values()).collect()
    }
}

/// What the proxy serves, compiled from one snapshot.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub routes: RouteTable,
    /// The endpoints of every backend the routes name (empty: the backend has none, 503).
    pub upstreams: BTreeMap<Backend, Arc<[SocketAddr]>>,
    pub tls: TlsHosts,
}

/// Compiles our Ingresses (by `class`) in `snapshot`. Problems name the Ingress and the field;
/// what can be used still is.
pub fn compile_snapshot(
    snapshot: &ClusterSnapshot,
    class: &ClassConfig,
) -> (Compiled, Vec<Problem>) {
    let ours: Vec<_> = class.select(snapshot).into_iter().cloned().collect();
    let (routes, mut problems) = compile(&ours);
    let slices = snapshot.slices_by_service();
    let mut upstreams = BTreeMap::new();
    for (backend, options) in routes.routes() {
        if upstreams.contains_key(backend) {
            continue;
        }
        let key = ObjectKey::new(backend.namespace.clone(), backend.service.clone());
        let endpoints = match resolve(snapshot, &slices, &key, &backend.port) {
            Ok(endpoints) => endpoints,
            Err(message) => {
                problems.push(Problem {
                    ingress: options.ingress.clone(),
                    message,
                });
                Vec::new()
            }
        };
        upstreams.insert(backend.clone(), endpoints.into());
    }
    let mut tls = TlsHosts::default();
    for ing in &ours {
        let namespace = ing.metadata.namespace.as_deref().unwrap_or("default");
        let id = format!("{namespace}/{}", ing.metadata.name.as_deref().unwrap_or(""));
        let Some(spec) = &ing.spec else { continue };
        for (i, entry) in spec.tls.iter().flatten().enumerate() {
            let Some(secret) = entry.secret_name.as_deref().filter(|s| !s.is_empty()) else {
                // No secret: ingress-nginx serves the default certificate for these hosts.
                continue;
            };
            let secret = ObjectKey::new(namespace, secret);
            // Hosts absent: the hosts of the Ingress's rules, as ingress-nginx does.
            let hosts: Vec<String> = match &entry.hosts {
                Some(h) if !h.is_empty() => h.clone(),
                _ => spec
                    .rules
                    .iter()
                    .flatten()
                    .filter_map(|r| r.host.clone())
                    .collect(),
            };
            for host in hosts {
                let host = host.to_ascii_lowercase();
                let (map, name) = match host.strip_prefix("*.") {
                    Some(suffix) => (&mut tls.wildcard, suffix.to_string()),
                    None => (&mut tls.exact, host.clone()),
                };
                match map.get(&name) {
                    // Ingresses come in key order: the first to name a host keeps it.
                    Some(existing) if *existing != secret => problems.push(Problem {
                        ingress: id.clone(),
                        message: format!(
                            "spec.tls[{i}]: host {host:?} already has Secret {existing} (ignored)"
                        ),
                    }),
                    Some(_) => {}
                    None => {
                        map.insert(name, secret.clone());
                    }
                }
            }
        }
    }
    (
        Compiled {
            routes,
            upstreams,
            tls,
        },
        problems,
    )
}

/// The endpoints of a Service port: the Service port by number or name, its target port from the
/// slices' port of the same name; ready endpoints, or serving-and-terminating ones only when no
/// endpoint is ready (as kube-proxy chooses).
fn resolve(
    snapshot: &ClusterSnapshot,
    slices: &BTreeMap<ObjectKey, Vec<&EndpointSlice>>,
    service: &ObjectKey,
    port: &PortRef,
) -> Result<Vec<SocketAddr>, String> {
    let Some(svc) = snapshot.services.get(service) else {
        return Err(format!("Service {service} not found (answering 503)"));
    };
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return Err(format!(
            "Service {service} is of type ExternalName, which is not supported (answering 503)"
        ));
    }
    let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or(&[]);
    let found = ports.iter().find(|p| match port {
        PortRef::Number(n) => p.port == *n,
        PortRef::Name(name) => p.name.as_deref() == Some(name.as_str()),
    });
    let Some(service_port) = found else {
        let wanted = match port {
            PortRef::Number(n) => format!("number {n}"),
            PortRef::Name(name) => format!("name {name:?}"),
        };
        return Err(format!(
            "Service {service} has no port with {wanted} (answering 503)"
        ));
    };
    let port_name = service_port.name.as_deref().unwrap_or("");
    let protocol = service_port.protocol.as_deref().unwrap_or("TCP");
    let mut ready = Vec::new();
    let mut fallback = Vec::new();
    for slice in slices.get(service).into_iter().flatten() {
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        }) else {
            continue;
        };
        let Some(number) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in &slice.endpoints {
            let conditions = ep.conditions.as_ref();
            let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(is_ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let list = if is_ready {
                &mut ready
            } else if serving && terminating {
                &mut fallback
            } else {
                continue;
            };
            // FQDN slices have names, not addresses: skipped (the proxy connects to addresses).
            list.extend(
                ep.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, number)),
            );
        }
    }
    let mut chosen = if ready.is_empty() { fallback } else { ready };
    chosen.sort();
    chosen.dedup();
    Ok(chosen)
}

#[cfg(test)]
mod tests;
