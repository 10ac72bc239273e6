//! Defaulting and validation of single objects, as the API server would do them (the subset the
//! model relies on). Pure functions: one finding per bad field, naming the field path.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ClientIPConfig, Container, Namespace, Node, Pod, Secret, Service, ServicePort, ServiceSpec,
    SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{
    IPBlock, Ingress, IngressBackend, IngressClass, NetworkPolicy, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::endpointslice::LABEL_SERVICE_NAME;
use crate::snapshot::LABEL_NAMESPACE_NAME;

/// A problem with one field of one object (the object and file are added by the caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub field: String,
    pub message: String,
}

/// What validating one object found: errors make it invalid, warnings do not.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub errors: Vec<FieldError>,
    pub warnings: Vec<FieldError>,
}

impl Findings {
    pub fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn check(&mut self, field: impl Into<String>, result: Result<(), String>) {
        if let Err(message) = result {
            self.error(field, message);
        }
    }
}

/// What the API requires of a kind's `metadata.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NameRule {
    /// RFC 1123 label: Namespace.
    Dns1123Label,
    /// RFC 1123 subdomain: Node, Pod, EndpointSlice, NetworkPolicy.
    Dns1123Subdomain,
    /// RFC 1035 label: Service.
    Dns1035Label,
}

/// Per-kind API behaviour. Every kind in [`crate::Kind`] implements it.
pub(crate) trait ApiKind {
    const NAME_RULE: NameRule;

    /// Fills in what the API server would default (and nothing that needs allocation).
    fn apply_defaults(&mut self) {}

    /// Validates everything but `metadata` (done for all kinds by [`validate_metadata`]).
    fn validate(&self, _findings: &mut Findings) {}
}

const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

pub(crate) fn validate_metadata(
    meta: &ObjectMeta,
    namespaced: bool,
    rule: NameRule,
    findings: &mut Findings,
) {
    match meta.name.as_deref() {
        None | Some("") => findings.error("metadata.name", "required value"),
        Some(name) => findings.check(
            "metadata.name",
            match rule {
                NameRule::Dns1123Label => dns1123_label(name),
                NameRule::Dns1123Subdomain => dns1123_subdomain(name),
                NameRule::Dns1035Label => dns1035_label(name),
            },
        ),
    }
    if namespaced && let Some(ns) = meta.namespace.as_deref() {
        findings.check("metadata.namespace", dns1123_label(ns));
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax rules (k8s.io/apimachinery/pkg/util/validation)

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn label_chars_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && is_alnum(b[0])
        && is_alnum(b[b.len() - 1])
        && b.iter().all(|&c| is_alnum(c) || c == b'-')
}

/// RFC 1123 label: at most 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub(crate) fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!(
            "must be no more than 63 characters, got {}",
            s.len()
        ));
    }
    if !label_chars_ok(s) {
        return Err(format!(
            "must be a lowercase RFC 1123 label (lowercase letters, digits and '-', starting and \
             ending with a letter or digit), got {s:?}"
        ));
    }
    Ok(())
}

/// RFC 1123 subdomain: at most 253 characters, dot-separated RFC 1123 labels.
pub(crate) fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!(
            "must be no more than 253 characters, got {}",
            s.len()
        ));
    }
    if !s.split('.').all(label_chars_ok) {
        return Err(format!(
            "must be a lowercase RFC 1123 subdomain (dot-separated parts of lowercase letters, \
             digits and '-', each starting and ending with a letter or digit), got {s:?}"
        ));
    }
    Ok(())
}

/// RFC 1035 label: an RFC 1123 label that starts with a letter.
pub(crate) fn dns1035_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!(
            "must be no more than 63 characters, got {}",
            s.len()
        ));
    }
    if !label_chars_ok(s) || !s.as_bytes()[0].is_ascii_lowercase() {
        return Err(format!(
            "must be a lowercase RFC 1035 label (lowercase letters, digits and '-', starting with \
             a letter and ending with a letter or digit), got {s:?}"
        ));
    }
    Ok(())
}

/// IANA_SVC_NAME (RFC 6335), what named ports must be.
pub(crate) fn iana_svc_name(s: &str) -> Result<(), String> {
    let fail = |why: &str| {
        Err(format!(
            "must be a valid port name (IANA_SVC_NAME): {why}, got {s:?}"
        ))
    };
    if s.is_empty() {
        return fail("must not be empty");
    }
    if s.len() > 15 {
        return fail("at most 15 characters");
    }
    if !s.bytes().all(|c| is_alnum(c) || c == b'-') {
        return fail("only lowercase letters, digits and '-'");
    }
    if !s.bytes().any(|c| c.is_ascii_lowercase()) {
        return fail("at least one letter");
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return fail("no leading, trailing or doubled '-'");
    }
    Ok(())
}

pub(crate) fn port_number(port: i32) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("must be between 1 and 65535, got {port}"))
    }
}

/// 0 (unset) or a valid port number.
fn optional_port_number(port: i32) -> Result<(), String> {
    if (0..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("must be between 0 and 65535, got {port}"))
    }
}

fn protocol(p: &str) -> Result<(), String> {
    one_of(p, &PROTOCOLS)
}

fn one_of(value: &str, allowed: &[&str]) -> Result<(), String> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "must be one of {}, got {value:?}",
            allowed.join(", ")
        ))
    }
}

pub(crate) fn ip(s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("must be a valid IP address, got {s:?}"))
}

fn target_port(tp: &IntOrString) -> Result<(), String> {
    match tp {
        IntOrString::Int(port) => port_number(*port),
        IntOrString::String(name) => iana_svc_name(name),
    }
}

/// A label value: empty, or at most 63 alphanumerics, '-', '_' or '.', starting and ending
/// alphanumeric.
pub(crate) fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    if s.len() > 63 {
        return Err(format!(
            "must be no more than 63 characters, got {}",
            s.len()
        ));
    }
    let b = s.as_bytes();
    let ok = b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !ok {
        return Err(format!(
            "must be a valid label value (at most 63 letters, digits, '-', '_' or '.', starting \
             and ending with a letter or digit), got {s:?}"
        ));
    }
    Ok(())
}

/// A label key (qualified name): an optional DNS subdomain prefix and '/', then a name of at
/// most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit.
pub(crate) fn label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        dns1123_subdomain(prefix).map_err(|e| format!("prefix of label key {s:?}: {e}"))?;
    }
    if name.is_empty() {
        return Err(format!(
            "must be a valid label key (name part must not be empty), got {s:?}"
        ));
    }
    label_value(name).map_err(|_| {
        format!(
            "must be a valid label key ([prefix/]name, the name at most 63 letters, digits, '-', \
             '_' or '.', starting and ending with a letter or digit), got {s:?}"
        )
    })
}

/// A CIDR like "10.0.0.0/8" or "2001:db8::/32".
pub(crate) fn cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .map_err(|_| format!("must be a valid CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32), got {s:?}"))
}

/// A label selector as the API validates it (`field` is its path).
pub(crate) fn validate_label_selector(field: &str, selector: &LabelSelector, f: &mut Findings) {
    for (key, value) in selector.match_labels.iter().flatten() {
        f.check(format!("{field}.matchLabels"), label_key(key));
        f.check(format!("{field}.matchLabels[{key}]"), label_value(value));
    }
    for (i, req) in selector.match_expressions.iter().flatten().enumerate() {
        let at = |part: &str| format!("{field}.matchExpressions[{i}].{part}");
        f.check(at("key"), label_key(&req.key));
        let values = req.values.as_deref().unwrap_or(&[]);
        match req.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    f.error(
                        at("values"),
                        format!("must be non-empty when operator is {}", req.operator),
                    );
                }
                for (j, value) in values.iter().enumerate() {
                    f.check(at(&format!("values[{j}]")), label_value(value));
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    f.error(
                        at("values"),
                        format!("must be empty when operator is {}", req.operator),
                    );
                }
            }
            other => f.error(
                at("operator"),
                format!("must be one of In, NotIn, Exists, DoesNotExist, got {other:?}"),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kinds

impl ApiKind for Node {
    const NAME_RULE: NameRule = NameRule::Dns1123Subdomain;
}

impl ApiKind for Namespace {
    const NAME_RULE: NameRule = NameRule::Dns1123Label;

    /// The API server labels every namespace with its own name.
    fn apply_defaults(&mut self) {
        if let Some(name) = self.metadata.name.clone() {
            self.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(LABEL_NAMESPACE_NAME.to_string(), name);
        }
    }
}

pub(crate) const SERVICE_TYPES: [&str; 4] =
    ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];

impl ApiKind for Service {
    const NAME_RULE: NameRule = NameRule::Dns1035Label;

    fn apply_defaults(&mut self) {
        let spec = self.spec.get_or_insert_with(ServiceSpec::default);
        let ty = spec
            .type_
            .get_or_insert_with(|| "ClusterIP".to_string())
            .clone();
        let affinity = spec
            .session_affinity
            .get_or_insert_with(|| "None".to_string());
        if affinity == "ClientIP" {
            let cfg = spec
                .session_affinity_config
                .get_or_insert_with(SessionAffinityConfig::default);
            let client_ip = cfg.client_ip.get_or_insert_with(ClientIPConfig::default);
            client_ip.timeout_seconds.get_or_insert(10800);
        }
        // clusterIP and clusterIPs[0] mirror each other when only one is given.
        let cluster_ip = spec.cluster_ip.clone().unwrap_or_default();
        let first = spec
            .cluster_ips
            .as_ref()
            .and_then(|ips| ips.first())
            .cloned();
        let valid = |ip: &str| ip == "None" || ip.parse::<IpAddr>().is_ok();
        match (cluster_ip.is_empty(), first) {
            (false, None) if valid(&cluster_ip) => spec.cluster_ips = Some(vec![cluster_ip]),
            (true, Some(first)) if valid(&first) => spec.cluster_ip = Some(first),
            _ => {}
        }
        if ty != "ExternalName" {
            spec.internal_traffic_policy
                .get_or_insert_with(|| "Cluster".to_string());
        }
        if ty == "NodePort" || ty == "LoadBalancer" {
            spec.external_traffic_policy
                .get_or_insert_with(|| "Cluster".to_string());
        }
        for port in spec.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".to_string());
            if port.target_port.is_none() && port_number(port.port).is_ok() {
                port.target_port = Some(IntOrString::Int(port.port));
            }
        }
    }

    fn validate(&self, f: &mut Findings) {
        let default_spec = ServiceSpec::default();
        let spec = self.spec.as_ref().unwrap_or(&default_spec);
        let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
        f.check("spec.type", one_of(ty, &SERVICE_TYPES));
        let external_name = ty == "ExternalName";
        let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
        let headless = cluster_ip == "None";

        validate_cluster_ip("spec.clusterIP", cluster_ip, f);
        if external_name && !cluster_ip.is_empty() {
            f.error("spec.clusterIP", "must be empty for type ExternalName");
        }
        let cluster_ips = spec.cluster_ips.as_deref().unwrap_or(&[]);
        if cluster_ips.len() > 2 {
            f.error(
                "spec.clusterIPs",
                format!("at most 2 entries, got {}", cluster_ips.len()),
            );
        }
        let mut families = Vec::new();
        for (i, addr) in cluster_ips.iter().enumerate() {
            let field = format!("spec.clusterIPs[{i}]");
            if validate_cluster_ip(&field, addr, f)
                && let Ok(ip) = addr.parse::<IpAddr>()
            {
                families.push(ip.is_ipv4());
            }
            if i > 0 && addr == "None" {
                f.error(field, "\"None\" is only allowed as the first entry");
            }
        }
        if families.len() == 2 && families[0] == families[1] {
            f.error(
                "spec.clusterIPs[1]",
                "must be of a different IP family than clusterIPs[0]",
            );
        }
        if let Some(first) = cluster_ips.first()
            && !cluster_ip.is_empty()
            && !first.is_empty()
            && first != cluster_ip
        {
            f.error(
                "spec.clusterIPs[0]",
                format!(
                    "must match spec.clusterIP ({cluster_ip:?}) when both are set, got {first:?}"
                ),
            );
        }

        if external_name {
            match spec.external_name.as_deref() {
                None | Some("") => f.error("spec.externalName", "required for type ExternalName"),
                Some(name) => f.check(
                    "spec.externalName",
                    dns1123_subdomain(name.trim_end_matches('.')),
                ),
            }
        }

        let ports = spec.ports.as_deref().unwrap_or(&[]);
        if ports.is_empty() && !headless && !external_name {
            f.error(
                "spec.ports",
                "required value (only headless and ExternalName Services may have no ports)",
            );
        }
        let mut names = BTreeSet::new();
        for (i, port) in ports.iter().enumerate() {
            validate_service_port(i, port, ports.len(), ty, &mut names, f);
        }

        if let Some(families) = &spec.ip_families {
            if families.len() > 2 {
                f.error(
                    "spec.ipFamilies",
                    format!("at most 2 entries, got {}", families.len()),
                );
            }
            for (i, family) in families.iter().enumerate() {
                f.check(
                    format!("spec.ipFamilies[{i}]"),
                    one_of(family, &["IPv4", "IPv6"]),
                );
                if families[..i].contains(family) {
                    f.error(
                        format!("spec.ipFamilies[{i}]"),
                        format!("duplicate value {family:?}"),
                    );
                }
            }
        }
        if let Some(policy) = &spec.ip_family_policy {
            f.check(
                "spec.ipFamilyPolicy",
                one_of(
                    policy,
                    &["SingleStack", "PreferDualStack", "RequireDualStack"],
                ),
            );
        }

        let affinity = spec.session_affinity.as_deref().unwrap_or("None");
        f.check(
            "spec.sessionAffinity",
            one_of(affinity, &["None", "ClientIP"]),
        );
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        if let Some(timeout) = timeout {
            if affinity != "ClientIP" {
                f.error(
                    "spec.sessionAffinityConfig",
                    "must not be set when sessionAffinity is not ClientIP",
                );
            } else if !(1..=86400).contains(&timeout) {
                f.error(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("must be between 1 and 86400, got {timeout}"),
                );
            }
        }
        if let Some(policy) = &spec.external_traffic_policy {
            f.check(
                "spec.externalTrafficPolicy",
                one_of(policy, &["Cluster", "Local"]),
            );
        }
        if let Some(policy) = &spec.internal_traffic_policy {
            f.check(
                "spec.internalTrafficPolicy",
                one_of(policy, &["Cluster", "Local"]),
            );
        }
        if let Some(port) = spec.health_check_node_port {
            f.check("spec.healthCheckNodePort", optional_port_number(port));
        }
        for (i, addr) in spec.external_ips.iter().flatten().enumerate() {
            f.check(format!("spec.externalIPs[{i}]"), ip(addr).map(drop));
        }
    }
}

/// "", "None" or an IP address. Returns whether it was a valid value.
fn validate_cluster_ip(field: &str, value: &str, f: &mut Findings) -> bool {
    if value.is_empty() || value == "None" {
        return true;
    }
    match ip(value) {
        Ok(_) => true,
        Err(_) => {
            f.error(
                field,
                format!("must be empty, \"None\" or a valid IP address, got {value:?}"),
            );
            false
        }
    }
}

fn validate_service_port(
    i: usize,
    port: &ServicePort,
    count: usize,
    ty: &str,
    names: &mut BTreeSet<String>,
    f: &mut Findings,
) {
    let at = |field: &str| format!("spec.ports[{i}].{field}");
    match port.name.as_deref() {
        None | Some("") => {
            if count > 1 {
                f.error(
                    at("name"),
                    "required when the Service has more than one port",
                );
            }
        }
        Some(name) => {
            f.check(at("name"), dns1123_label(name));
            if !names.insert(name.to_string()) {
                f.error(at("name"), format!("duplicate value {name:?}"));
            }
        }
    }
    f.check(at("port"), port_number(port.port));
    if let Some(p) = &port.protocol {
        f.check(at("protocol"), protocol(p));
    }
    if let Some(tp) = &port.target_port {
        f.check(at("targetPort"), target_port(tp));
    }
    if let Some(node_port) = port.node_port {
        f.check(at("nodePort"), optional_port_number(node_port));
        if node_port != 0 && ty == "ClusterIP" {
            f.error(at("nodePort"), "may not be used when type is ClusterIP");
        }
    }
}

impl ApiKind for Pod {
    const NAME_RULE: NameRule = NameRule::Dns1123Subdomain;

    fn apply_defaults(&mut self) {
        if let Some(spec) = &mut self.spec {
            let containers = spec
                .containers
                .iter_mut()
                .chain(spec.init_containers.iter_mut().flatten());
            for port in containers.flat_map(|c| c.ports.iter_mut().flatten()) {
                port.protocol.get_or_insert_with(|| "TCP".to_string());
            }
        }
    }

    fn validate(&self, f: &mut Findings) {
        if let Some(spec) = &self.spec {
            // Duplicate port names within one container are an error; across containers the
            // API only warns (named ports then resolve to the first one).
            let mut pod_names: Vec<(String, String)> = Vec::new();
            let lists = [
                ("containers", &spec.containers[..]),
                (
                    "initContainers",
                    spec.init_containers.as_deref().unwrap_or(&[]),
                ),
            ];
            for (list, containers) in lists {
                for (ci, container) in containers.iter().enumerate() {
                    validate_container_ports(
                        &format!("spec.{list}[{ci}]"),
                        container,
                        &mut pod_names,
                        f,
                    );
                }
            }
        }
        if let Some(status) = &self.status {
            if let Some(addr) = status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
                f.check("status.podIP", ip(addr).map(drop));
            }
            let pod_ips = status.pod_ips.as_deref().unwrap_or(&[]);
            if pod_ips.len() > 2 {
                f.error(
                    "status.podIPs",
                    format!("at most 2 entries, got {}", pod_ips.len()),
                );
            }
            let parsed: Vec<_> = pod_ips
                .iter()
                .enumerate()
                .filter_map(|(i, p)| match ip(&p.ip) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        f.error(format!("status.podIPs[{i}].ip"), e);
                        None
                    }
                })
                .collect();
            if parsed.len() == 2 && parsed[0].is_ipv4() == parsed[1].is_ipv4() {
                f.error(
                    "status.podIPs[1].ip",
                    "must be of a different IP family than podIPs[0]",
                );
            }
        }
    }
}

fn validate_container_ports(
    path: &str,
    container: &Container,
    pod_names: &mut Vec<(String, String)>,
    f: &mut Findings,
) {
    let mut names = BTreeSet::new();
    for (i, port) in container.ports.iter().flatten().enumerate() {
        let at = |field: &str| format!("{path}.ports[{i}].{field}");
        if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            match iana_svc_name(name) {
                Err(e) => f.error(at("name"), e),
                Ok(()) if !names.insert(name.to_string()) => {
                    f.error(at("name"), format!("duplicate value {name:?}"))
                }
                Ok(()) => {
                    if let Some((_, first)) = pod_names.iter().find(|(n, _)| n == name) {
                        f.warn(
                            at("name"),
                            format!(
                                "duplicate port name {name:?} (also {first}); Services and probes \
                                 that select it by name use the first (applied anyway)"
                            ),
                        );
                    } else {
                        pod_names.push((name.to_string(), at("name")));
                    }
                }
            }
        }
        f.check(at("containerPort"), port_number(port.container_port));
        if let Some(host_port) = port.host_port {
            f.check(at("hostPort"), optional_port_number(host_port));
        }
        if let Some(p) = &port.protocol {
            f.check(at("protocol"), protocol(p));
        }
    }
}

impl ApiKind for EndpointSlice {
    const NAME_RULE: NameRule = NameRule::Dns1123Subdomain;

    fn apply_defaults(&mut self) {
        for port in self.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".to_string());
            port.name.get_or_insert_with(String::new);
        }
    }

    fn validate(&self, f: &mut Findings) {
        let family = self.address_type.as_str();
        f.check("addressType", one_of(family, &["IPv4", "IPv6", "FQDN"]));
        if self.endpoints.len() > 1000 {
            f.error(
                "endpoints",
                format!("at most 1000 endpoints, got {}", self.endpoints.len()),
            );
        }
        for (i, ep) in self.endpoints.iter().enumerate() {
            if ep.addresses.is_empty() {
                f.error(
                    format!("endpoints[{i}].addresses"),
                    "must contain at least 1 address",
                );
            } else if ep.addresses.len() > 100 {
                f.error(
                    format!("endpoints[{i}].addresses"),
                    format!("at most 100 addresses, got {}", ep.addresses.len()),
                );
            }
            for (j, addr) in ep.addresses.iter().enumerate() {
                let field = format!("endpoints[{i}].addresses[{j}]");
                match family {
                    "IPv4" => f.check(
                        field,
                        addr.parse::<Ipv4Addr>()
                            .map(drop)
                            .map_err(|_| format!("must be a valid IPv4 address, got {addr:?}")),
                    ),
                    "IPv6" => f.check(
                        field,
                        addr.parse::<Ipv6Addr>()
                            .map(drop)
                            .map_err(|_| format!("must be a valid IPv6 address, got {addr:?}")),
                    ),
                    "FQDN" => f.check(field, dns1123_subdomain(addr)),
                    _ => {}
                }
            }
            if let Some(node) = &ep.node_name {
                f.check(format!("endpoints[{i}].nodeName"), dns1123_subdomain(node));
            }
        }
        let ports = self.ports.as_deref().unwrap_or(&[]);
        if ports.len() > 100 {
            f.error("ports", format!("at most 100 ports, got {}", ports.len()));
        }
        let mut names = BTreeSet::new();
        for (i, port) in ports.iter().enumerate() {
            let name = port.name.as_deref().unwrap_or("");
            if !name.is_empty() {
                f.check(format!("ports[{i}].name"), dns1123_label(name));
            }
            if !names.insert(name) {
                f.error(
                    format!("ports[{i}].name"),
                    format!("duplicate value {name:?}"),
                );
            }
            if let Some(p) = port.port {
                f.check(format!("ports[{i}].port"), port_number(p));
            }
            if let Some(p) = &port.protocol {
                f.check(format!("ports[{i}].protocol"), protocol(p));
            }
        }
        let has_service = self
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .is_some_and(|s| !s.is_empty());
        if !has_service {
            f.warn(
                format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
                "missing: the slice belongs to no Service (applied anyway)",
            );
        }
    }
}

pub(crate) const POLICY_TYPES: [&str; 2] = ["Ingress", "Egress"];

impl ApiKind for NetworkPolicy {
    const NAME_RULE: NameRule = NameRule::Dns1123Subdomain;

    /// As the API server: port protocols default to TCP; absent or empty `policyTypes` become
    /// `["Ingress"]`, plus `"Egress"` when `spec.egress` has at least one rule.
    fn apply_defaults(&mut self) {
        let spec = self.spec.get_or_insert_with(NetworkPolicySpec::default);
        let ingress_ports = spec
            .ingress
            .iter_mut()
            .flatten()
            .flat_map(|r| r.ports.iter_mut().flatten());
        let egress_ports = spec
            .egress
            .iter_mut()
            .flatten()
            .flat_map(|r| r.ports.iter_mut().flatten());
        for port in ingress_ports.chain(egress_ports) {
            port.protocol.get_or_insert_with(|| "TCP".to_string());
        }
        if spec.policy_types.as_ref().is_none_or(Vec::is_empty) {
            let mut types = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                types.push("Egress".to_string());
            }
            spec.policy_types = Some(types);
        }
    }

    fn validate(&self, f: &mut Findings) {
        let default_spec = NetworkPolicySpec::default();
        let spec = self.spec.as_ref().unwrap_or(&default_spec);
        if let Some(selector) = &spec.pod_selector {
            validate_label_selector("spec.podSelector", selector, f);
        }
        let types = spec.policy_types.as_deref().unwrap_or(&[]);
        if types.len() > POLICY_TYPES.len() {
            f.error(
                "spec.policyTypes",
                format!("at most 2 entries, got {}", types.len()),
            );
        }
        for (i, ty) in types.iter().enumerate() {
            f.check(format!("spec.policyTypes[{i}]"), one_of(ty, &POLICY_TYPES));
        }
        for (i, rule) in spec.ingress.iter().flatten().enumerate() {
            let at = format!("spec.ingress[{i}]");
            for (j, peer) in rule.from.iter().flatten().enumerate() {
                validate_policy_peer(&format!("{at}.from[{j}]"), peer, f);
            }
            for (j, port) in rule.ports.iter().flatten().enumerate() {
                validate_policy_port(&format!("{at}.ports[{j}]"), port, f);
            }
        }
        for (i, rule) in spec.egress.iter().flatten().enumerate() {
            let at = format!("spec.egress[{i}]");
            for (j, peer) in rule.to.iter().flatten().enumerate() {
                validate_policy_peer(&format!("{at}.to[{j}]"), peer, f);
            }
            for (j, port) in rule.ports.iter().flatten().enumerate() {
                validate_policy_port(&format!("{at}.ports[{j}]"), port, f);
            }
        }
    }
}

fn validate_policy_peer(at: &str, peer: &NetworkPolicyPeer, f: &mut Findings) {
    if let Some(selector) = &peer.pod_selector {
        validate_label_selector(&format!("{at}.podSelector"), selector, f);
    }
    if let Some(selector) = &peer.namespace_selector {
        validate_label_selector(&format!("{at}.namespaceSelector"), selector, f);
    }
    let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match &peer.ip_block {
        Some(_) if selectors => f.error(
            at,
            "may not specify both ipBlock and podSelector or namespaceSelector",
        ),
        Some(block) => validate_ip_block(&format!("{at}.ipBlock"), block, f),
        None if !selectors => f.error(
            at,
            "must specify a peer: podSelector, namespaceSelector or ipBlock",
        ),
        None => {}
    }
}

fn validate_ip_block(at: &str, block: &IPBlock, f: &mut Findings) {
    let net = match cidr(&block.cidr) {
        Ok(net) => net,
        Err(e) => {
            f.error(format!("{at}.cidr"), e);
            return;
        }
    };
    if net.trunc() != net {
        f.warn(
            format!("{at}.cidr"),
            format!(
                "{} has host bits set; it means {} (applied anyway)",
                block.cidr,
                net.trunc()
            ),
        );
    }
    for (i, except) in block.except.iter().flatten().enumerate() {
        let field = format!("{at}.except[{i}]");
        match cidr(except) {
            Err(e) => f.error(field, e),
            Ok(ex) => {
                if !net.contains(&ex.network()) || ex.prefix_len() <= net.prefix_len() {
                    f.error(
                        field,
                        format!("{except} must be a strict subset of cidr {}", block.cidr),
                    );
                }
            }
        }
    }
}

fn validate_policy_port(at: &str, port: &NetworkPolicyPort, f: &mut Findings) {
    if let Some(p) = &port.protocol {
        f.check(format!("{at}.protocol"), protocol(p));
    }
    let end_port = format!("{at}.endPort");
    match (&port.port, port.end_port) {
        (Some(IntOrString::Int(start)), end) => {
            f.check(format!("{at}.port"), port_number(*start));
            if let Some(end) = end {
                f.check(&end_port, port_number(end));
                if end < *start {
                    f.error(
                        &end_port,
                        format!("must be greater than or equal to port ({start}), got {end}"),
                    );
                }
            }
        }
        (Some(IntOrString::String(name)), end) => {
            f.check(format!("{at}.port"), iana_svc_name(name));
            if end.is_some() {
                f.error(end_port, "may not be specified when port is a name");
            }
        }
        (None, Some(_)) => f.error(end_port, "may not be specified without port"),
        (None, None) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Ingress, IngressClass, Secret

/// An Ingress or TLS host: a DNS subdomain, optionally with a leading `*.` wildcard label; not an
/// IP address.
fn ingress_host(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "must be a DNS name, not an IP address, got {host:?}"
        ));
    }
    dns1123_subdomain(host.strip_prefix("*.").unwrap_or(host))
}

pub(crate) const PATH_TYPES: [&str; 3] = ["Exact", "Prefix", "ImplementationSpecific"];

fn validate_ingress_backend(at: &str, backend: &IngressBackend, f: &mut Findings) {
    match (&backend.service, &backend.resource) {
        (Some(_), Some(_)) => f.error(at, "service and resource are mutually exclusive"),
        (None, None) => f.error(at, "one of service and resource is required"),
        (None, Some(_)) => {}
        (Some(service), None) => {
            f.check(format!("{at}.service.name"), dns1035_label(&service.name));
            let port = service.port.as_ref();
            match (
                port.and_then(|p| p.number),
                port.and_then(|p| p.name.as_deref()),
            ) {
                (Some(n), None) => f.check(format!("{at}.service.port.number"), port_number(n)),
                (None, Some(name)) => {
                    f.check(format!("{at}.service.port.name"), dns1123_label(name))
                }
                _ => f.error(
                    format!("{at}.service.port"),
                    "exactly one of number and name is required",
                ),
            }
        }
    }
}

impl ApiKind for Ingress {
    const NAME_RULE: NameRule = NameRule::Dns1123Subdomain;

    fn validate(&self, f: &mut Findings) {
        let Some(spec) = &self.spec else {
            f.error("spec", "required value");
            return;
        };
        if spec.default_backend.is_none() && spec.rules.as_ref().is_none_or(Vec::is_empty) {
            f.error("spec", "either defaultBackend or rules must be specified");
        }
        if let Some(b) = &spec.default_backend {
            validate_ingress_backend("spec.defaultBackend", b, f);
        }
        if let Some(class) = &spec.ingress_class_name {
            f.check("spec.ingressClassName", dns1123_subdomain(class));
        }
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            if let Some(host) = rule.host.as_deref().filter(|h| !h.is_empty()) {
                f.check(format!("spec.rules[{i}].host"), ingress_host(host));
            }
            let Some(http) = &rule.http else { continue };
            for (j, p) in http.paths.iter().enumerate() {
                let at = format!("spec.rules[{i}].http.paths[{j}]");
                let ty = p.path_type.as_str();
                if ty.is_empty() {
                    f.error(format!("{at}.pathType"), "required value");
                } else {
                    f.check(format!("{at}.pathType"), one_of(ty, &PATH_TYPES));
                }
                let path = p.path.as_deref().unwrap_or("");
                if matches!(ty, "Exact" | "Prefix") && !path.starts_with('/') {
                    f.error(
                        format!("{at}.path"),
                        format!("must be an absolute path, got {path:?}"),
                    );
                }
                validate_ingress_backend(&format!("{at}.backend"), &p.backend, f);
            }
        }
        for (i, tls) in spec.tls.iter().flatten().enumerate() {
            for (j, host) in tls.hosts.iter().flatten().enumerate() {
                f.check(format!("spec.tls[{i}].hosts[{j}]"), ingress_host(host));
            }
            if let Some(secret) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) {
                f.check(
                    format!("spec.tls[{i}].secretName"),
                    dns1123_subdomain(secret),
                );
            }
        }
    }
}

impl ApiKind for IngressClass {
    const NAME_RULE: NameRule = NameRule::Dns1123Subdomain;

    fn validate(&self, f: &mut Findings) {
        let controller = self.spec.as_ref().and_then(|s| s.controller.as_deref());
        match controller {
            None | Some("") => f.error("spec.controller", "required value"),
            Some(c) if c.len() > 250 => f.error(
                "spec.controller",
                format!("must be no more than 250 characters, got {}", c.len()),
            ),
            Some(_) => {}
        }
    }
}

pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_PRIVATE_KEY_KEY: &str = "tls.key";

impl ApiKind for Secret {
    const NAME_RULE: NameRule = NameRule::Dns1123Subdomain;

    /// As the API server: `type` defaults to Opaque, and `stringData` is merged into `data` (its
    /// keys win).
    fn apply_defaults(&mut self) {
        self.type_.get_or_insert_with(|| "Opaque".to_string());
        if let Some(strings) = self.string_data.take() {
            let data = self.data.get_or_insert_with(Default::default);
            for (k, v) in strings {
                data.insert(k, ByteString(v.into_bytes()));
            }
        }
    }

    /// A `kubernetes.io/tls` Secret needs `tls.crt` and `tls.key` (whether they hold a usable
    /// certificate is for the Ingress controller to say).
    fn validate(&self, f: &mut Findings) {
        if self.type_.as_deref() != Some(crate::object::SECRET_TYPE_TLS) {
            return;
        }
        for key in [TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY] {
            if !self.data.as_ref().is_some_and(|d| d.contains_key(key)) {
                f.error(
                    format!("data[{key}]"),
                    "required value for a Secret of type kubernetes.io/tls",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web", "a-b-1", "0abc"] {
            assert_eq!(dns1123_label(ok), Ok(()), "{ok}");
        }
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(dns1123_label(bad).is_err(), "{bad}");
        }
        for ok in ["a.b", "node-1.example.com", "0a"] {
            assert_eq!(dns1123_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "A.b", &"a".repeat(254)] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad}");
        }
        assert_eq!(dns1035_label("web-1"), Ok(()));
        assert!(dns1035_label("1web").is_err());
    }

    #[test]
    fn iana_names() {
        for ok in ["http", "h2c", "metrics-1", "a", "abcdefghijklmno"] {
            assert_eq!(iana_svc_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "8080",
            "HTTP",
            "-http",
            "http-",
            "ht--tp",
            "abcdefghijklmnop",
            "a_b",
        ] {
            assert!(iana_svc_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(
            port_number(0),
            Err("must be between 1 and 65535, got 0".to_string())
        );
        assert_eq!(port_number(1), Ok(()));
        assert_eq!(port_number(65535), Ok(()));
        assert!(port_number(65536).is_err());
        assert_eq!(optional_port_number(0), Ok(()));
        assert!(optional_port_number(-1).is_err());
    }
}
