//! Ingress status: the addresses our Ingresses are reached at (`status.loadBalancer.ingress`),
//! published as ingress-nginx publishes them: the load balancer addresses of the controller's
//! own Service (`--publish-service`; its `spec.externalIPs` when it has none), or addresses given
//! outright (`--publish-status-address`). Pure: what to write is decided here, the writing is
//! the binary's.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use cluster_model::k8s_openapi::api::networking::v1::Ingress;
use cluster_model::{ClusterSnapshot, ObjectKey};
use serde_json::{Value, json};

use crate::class::ClassConfig;

/// One published address, as an entry of `status.loadBalancer.ingress` names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatusAddress {
    Ip(IpAddr),
    Hostname(String),
}

impl StatusAddress {
    /// An IP address, or else a hostname.
    pub fn parse(text: &str) -> StatusAddress {
        match text.parse() {
            Ok(ip) => StatusAddress::Ip(ip),
            Err(_) => StatusAddress::Hostname(text.to_ascii_lowercase()),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            StatusAddress::Ip(ip) => json!({"ip": ip.to_string()}),
            StatusAddress::Hostname(h) => json!({"hostname": h}),
        }
    }
}

impl fmt::Display for StatusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusAddress::Ip(ip) => ip.fmt(f),
            StatusAddress::Hostname(h) => h.fmt(f),
        }
    }
}

/// Where the published addresses come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Publish {
    /// Nothing is published (status is left alone).
    #[default]
    Nothing,
    /// These addresses.
    Addresses(Vec<StatusAddress>),
    /// The addresses of this Service.
    Service(ObjectKey),
}

impl Publish {
    /// From the two flags; `--publish-status-address` (comma-separated) wins, as in ingress-nginx.
    /// A `--publish-service` without a namespace is in "default".
    pub fn from_flags(status_address: Option<&str>, service: Option<&str>) -> Publish {
        if let Some(list) = status_address {
            let addresses = list
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(StatusAddress::parse)
                .collect();
            return Publish::Addresses(sorted(addresses));
        }
        match service.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => {
                let (namespace, name) = s.split_once('/').unwrap_or(("default", s));
                Publish::Service(ObjectKey::new(namespace, name))
            }
            None => Publish::Nothing,
        }
    }

    /// The addresses to publish now; Err names what is missing.
    pub fn addresses(&self, snapshot: &ClusterSnapshot) -> Result<Vec<StatusAddress>, String> {
        match self {
            Publish::Nothing => Ok(Vec::new()),
            Publish::Addresses(a) => Ok(a.clone()),
            Publish::Service(key) => {
                let service = snapshot
                    .services
                    .get(key)
                    .ok_or_else(|| format!("--publish-service {key}: no such Service"))?;
                let from_balancer: Vec<StatusAddress> = service
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|e| entry_address(e.ip.as_deref(), e.hostname.as_deref()))
                    .collect();
                if !from_balancer.is_empty() {
                    return Ok(sorted(from_balancer));
                }
                let external = service
                    .spec
                    .as_ref()
                    .and_then(|s| s.external_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|ip| ip.parse().ok().map(StatusAddress::Ip))
                    .collect();
                Ok(sorted(external))
            }
        }
    }
}

fn sorted(mut addresses: Vec<StatusAddress>) -> Vec<StatusAddress> {
    addresses.sort();
    addresses.dedup();
    addresses
}

/// What an Ingress's status says now (ports are not compared; we never set them).
pub fn current(ingress: &Ingress) -> Vec<StatusAddress> {
    let entries = ingress
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let addresses = entries
        .into_iter()
        .flatten()
        .filter_map(|e| entry_address(e.ip.as_deref(), e.hostname.as_deref()))
        .collect();
    sorted(addresses)
}

/// The address of one `status.loadBalancer.ingress` entry (of a Service or an Ingress): its IP,
/// else its hostname.
fn entry_address(ip: Option<&str>, hostname: Option<&str>) -> Option<StatusAddress> {
    match (ip.and_then(|ip| ip.parse().ok()), hostname) {
        (Some(ip), _) => Some(StatusAddress::Ip(ip)),
        (None, Some(h)) if !h.is_empty() => Some(StatusAddress::parse(h)),
        _ => None,
    }
}

/// The status every Ingress of ours should have.
pub fn wanted(
    snapshot: &ClusterSnapshot,
    class: &ClassConfig,
    addresses: &[StatusAddress],
) -> BTreeMap<ObjectKey, Vec<StatusAddress>> {
    class
        .select(snapshot)
        .into_iter()
        .map(|ing| {
            let key = ObjectKey::new(
                ing.metadata.namespace.as_deref().unwrap_or("default"),
                ing.metadata.name.as_deref().unwrap_or(""),
            );
            (key, addresses.to_vec())
        })
        .collect()
}

/// The Ingresses whose status differs from what is wanted, with what it should be.
pub fn out_of_date(
    snapshot: &ClusterSnapshot,
    wanted: &BTreeMap<ObjectKey, Vec<StatusAddress>>,
) -> Vec<(ObjectKey, Vec<StatusAddress>)> {
    wanted
        .iter()
        .filter(|(key, addresses)| {
            snapshot
                .ingresses
                .get(key)
                .is_some_and(|ing| current(ing) != **addresses)
        })
        .map(|(k, a)| (k.clone(), a.clone()))
        .collect()
}

/// The merge patch of the status subresource that sets `addresses`.
pub fn status_patch(addresses: &[StatusAddress]) -> Value {
    let entries: Vec<Value> = addresses.iter().map(StatusAddress::to_json).collect();
    json!({"status": {"loadBalancer": {"ingress": entries}}})
}

/// Addresses as one line for logs and the CLI: "172.18.0.2, lb.example".
pub fn join(addresses: &[StatusAddress]) -> String {
    let parts: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_model::{ManifestFormat, parse_manifests};

    fn snapshot(yaml: &str) -> ClusterSnapshot {
        let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        assert_eq!(problems, vec![]);
        ClusterSnapshot::from_objects(objects)
    }

    const CLUSTER: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: sluice}
spec: {controller: sluice.dev/ingress}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: shop}
spec:
  ingressClassName: sluice
  defaultBackend: {service: {name: web, port: {number: 80}}}
status:
  loadBalancer:
    ingress: [{ip: 198.18.0.9}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: other, namespace: shop}
spec:
  ingressClassName: nginx
  defaultBackend: {service: {name: web, port: {number: 80}}}
---
apiVersion: v1
kind: Service
metadata: {name: sluice-ingress, namespace: sluice-system}
spec:
  type: LoadBalancer
  externalIPs: [203.0.113.4]
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 198.18.0.10}, {hostname: LB.Example.com}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: sluice-system}
spec:
  externalIPs: [203.0.113.5, 203.0.113.4]
  ports: [{port: 80}]
"#;

    fn class() -> ClassConfig {
        ClassConfig {
            controller: crate::class::DEFAULT_CONTROLLER.into(),
            class: crate::class::DEFAULT_CLASS.into(),
        }
    }

    #[test]
    fn explicit_addresses_win_and_are_sorted() {
        let p = Publish::from_flags(Some("lb.example, 172.18.0.3,172.18.0.2,"), Some("x/y"));
        let got = p.addresses(&snapshot(CLUSTER)).unwrap();
        assert_eq!(join(&got), "172.18.0.2, 172.18.0.3, lb.example");
    }

    #[test]
    fn a_published_service_gives_its_load_balancer_addresses_else_its_external_ips() {
        let s = snapshot(CLUSTER);
        let lb = Publish::from_flags(None, Some("sluice-system/sluice-ingress"));
        assert_eq!(
            join(&lb.addresses(&s).unwrap()),
            "198.18.0.10, lb.example.com"
        );
        let plain = Publish::from_flags(None, Some("sluice-system/plain"));
        assert_eq!(
            join(&plain.addresses(&s).unwrap()),
            "203.0.113.4, 203.0.113.5"
        );
        let missing = Publish::from_flags(None, Some("nope"));
        assert_eq!(
            missing.addresses(&s).unwrap_err(),
            "--publish-service default/nope: no such Service"
        );
        assert_eq!(Publish::from_flags(None, None), Publish::Nothing);
    }

    #[test]
    fn only_our_ingresses_whose_status_differs_are_written() {
        let s = snapshot(CLUSTER);
        let addresses = vec![StatusAddress::parse("198.18.0.10")];
        let wanted = wanted(&s, &class(), &addresses);
        assert_eq!(
            wanted.keys().cloned().collect::<Vec<_>>(),
            [ObjectKey::new("shop", "web")],
            "the nginx-class Ingress is not ours"
        );
        let stale = out_of_date(&s, &wanted);
        assert_eq!(stale, [(ObjectKey::new("shop", "web"), addresses.clone())]);
        // Already right: nothing to write.
        let same = vec![StatusAddress::parse("198.18.0.9")];
        assert!(out_of_date(&s, &super::wanted(&s, &class(), &same)).is_empty());
    }

    #[test]
    fn the_patch_sets_ip_and_hostname_entries() {
        let patch = status_patch(&[
            StatusAddress::parse("2001:db8::1"),
            StatusAddress::parse("lb.example"),
        ]);
        assert_eq!(
            patch,
            json!({"status": {"loadBalancer": {"ingress": [
                {"ip": "2001:db8::1"}, {"hostname": "lb.example"}
            ]}}})
        );
    }
}
