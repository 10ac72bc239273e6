//! NetworkPolicies parsed into what their semantics need: the policy's pod selector, the
//! directions it isolates, and rules made of peer and port selectors.
//!
//! Parsing never fails: a part the API server would reject (the cluster model already drops such
//! policies, but a snapshot can be built by hand) is kept as an invalid item that matches
//! nothing, and described in [`Policy::problems`].

use std::fmt;
use std::net::IpAddr;

use cluster_model::k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use cluster_model::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use cluster_model::{LABEL_NAMESPACE_NAME, ObjectKey};
use ipnet::IpNet;

use crate::identity::Identity;
use crate::selector::{Labels, Selector};

/// A direction of traffic, seen from the pod a policy selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic to the pod.
    Ingress,
    /// Traffic from the pod.
    Egress,
}

impl Direction {
    /// The `policyTypes` value and the field name's stem: "Ingress" or "Egress".
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }

    /// The field holding the rules: "ingress" or "egress".
    pub fn field(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A transport protocol NetworkPolicy ports name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// A Kubernetes `protocol` field: absent means TCP; unknown values are `None`.
    pub fn from_k8s(protocol: Option<&str>) -> Option<Protocol> {
        match protocol {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The namespaces a pod peer may be in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceMatch {
    /// Only the policy's own namespace (the peer has no `namespaceSelector`).
    Own(String),
    /// Namespaces whose labels match (`namespaceSelector`; `{}` is every namespace).
    Labels(Selector),
}

impl NamespaceMatch {
    pub fn matches(&self, namespace: &str, namespace_labels: &Labels) -> bool {
        match self {
            NamespaceMatch::Own(own) => own == namespace,
            NamespaceMatch::Labels(selector) => selector.matches(namespace_labels),
        }
    }
}

/// One item of a rule's `from` or `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatch {
    /// Pods matching `pods` in the namespaces `namespaces` matches: `podSelector` only (own
    /// namespace), `namespaceSelector` only (`pods` is `{}`), or both (AND).
    Pods {
        namespaces: NamespaceMatch,
        pods: Selector,
    },
    /// Addresses inside `cidr` and outside every `except` (see the crate docs for which
    /// addresses these are).
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
    /// A peer the API would reject: matches nothing.
    Invalid,
}

impl PeerMatch {
    /// Whether a pod of this identity is such a peer.
    pub fn matches_pod(&self, identity: &Identity) -> bool {
        match self {
            PeerMatch::Pods { namespaces, pods } => {
                namespaces.matches(&identity.namespace, &identity.namespace_labels)
                    && pods.matches(&identity.labels)
            }
            PeerMatch::IpBlock { .. } | PeerMatch::Invalid => false,
        }
    }

    /// Whether this address is inside an ipBlock peer.
    pub fn matches_addr(&self, addr: IpAddr) -> bool {
        match self {
            PeerMatch::IpBlock { cidr, except } => {
                cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr))
            }
            PeerMatch::Pods { .. } | PeerMatch::Invalid => false,
        }
    }
}

/// Which destination ports one item of a rule's `ports` allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port of the protocol (`port` absent).
    Any(Protocol),
    /// `port` to `endPort` inclusive (`endPort` absent: just `port`).
    Range(Protocol, u16, u16),
    /// A named port: a container port of the destination pod with this name and protocol.
    Named(Protocol, String),
    /// A port item the API would reject: matches nothing.
    Invalid,
}

impl PortMatch {
    /// Whether it allows `port`/`protocol` to a destination whose named ports are looked up by
    /// `named` (name, protocol → the port numbers it has by that name; none for non-pods).
    pub fn matches(
        &self,
        port: u16,
        protocol: Protocol,
        named: &dyn Fn(&str, Protocol) -> Vec<u16>,
    ) -> bool {
        match self {
            PortMatch::Any(p) => *p == protocol,
            PortMatch::Range(p, start, end) => *p == protocol && (*start..=*end).contains(&port),
            PortMatch::Named(p, name) => *p == protocol && named(name, protocol).contains(&port),
            PortMatch::Invalid => false,
        }
    }
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its index in `spec.ingress` or `spec.egress`.
    pub index: usize,
    /// `from`/`to`; `None` when absent or empty: every peer.
    pub peers: Option<Vec<PeerMatch>>,
    /// `ports`; `None` when absent or empty: every port and protocol.
    pub ports: Option<Vec<PortMatch>>,
}

/// A NetworkPolicy, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub key: ObjectKey,
    /// Selects the pods of `key.namespace` the policy applies to.
    pub pod_selector: Selector,
    /// The ingress rules when the policy isolates for ingress (`policyTypes`, explicit or
    /// inferred), else `None` (even if `spec.ingress` has rules: they are ignored).
    pub ingress: Option<Vec<Rule>>,
    /// The same for egress.
    pub egress: Option<Vec<Rule>>,
    /// Whether `policyTypes` was absent or empty, so the directions were inferred.
    pub types_inferred: bool,
    /// Parts the API would reject, taken as matching nothing, e.g.
    /// `spec.ingress[0].from[1]: ipBlock together with podSelector or namespaceSelector; matches nothing`.
    pub problems: Vec<String>,
}

impl Policy {
    /// Parses a NetworkPolicy stored under `key` (its namespace defaulted).
    pub fn from_k8s(key: &ObjectKey, policy: &NetworkPolicy) -> Policy {
        let default_spec = Default::default();
        let spec = policy.spec.as_ref().unwrap_or(&default_spec);
        let mut problems = Vec::new();
        let pod_selector = match &spec.pod_selector {
            None => Selector::everything(),
            Some(selector) => Selector::from_k8s(selector).unwrap_or_else(|e| {
                problems.push(format!("spec.podSelector.{e}; the policy selects no pod"));
                Selector::nothing()
            }),
        };
        let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        let (ingress_type, egress_type, types_inferred) = match spec.policy_types.as_deref() {
            None | Some([]) => (true, has_egress_rules, true),
            Some(types) => (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
                false,
            ),
        };
        let ns = key.namespace.as_str();
        let ingress = ingress_type.then(|| {
            spec.ingress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    let at = format!("spec.ingress[{i}]");
                    Rule {
                        index: i,
                        peers: parse_peers(
                            ns,
                            r.from.as_deref(),
                            &format!("{at}.from"),
                            &mut problems,
                        ),
                        ports: parse_ports(
                            r.ports.as_deref(),
                            &format!("{at}.ports"),
                            &mut problems,
                        ),
                    }
                })
                .collect()
        });
        let egress = egress_type.then(|| {
            spec.egress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    let at = format!("spec.egress[{i}]");
                    Rule {
                        index: i,
                        peers: parse_peers(ns, r.to.as_deref(), &format!("{at}.to"), &mut problems),
                        ports: parse_ports(
                            r.ports.as_deref(),
                            &format!("{at}.ports"),
                            &mut problems,
                        ),
                    }
                })
                .collect()
        });
        Policy {
            key: key.clone(),
            pod_selector,
            ingress,
            egress,
            types_inferred,
            problems,
        }
    }

    /// The rules of a direction, when the policy isolates the pods it selects in it.
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Whether the policy applies to a pod of this identity (same namespace, labels match).
    pub fn selects(&self, identity: &Identity) -> bool {
        identity.namespace == self.key.namespace && self.pod_selector.matches(&identity.labels)
    }
}

fn parse_peers(
    namespace: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<Vec<PeerMatch>> {
    let peers = peers.filter(|p| !p.is_empty())?;
    Some(
        peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                parse_peer(namespace, peer).unwrap_or_else(|why| {
                    problems.push(format!("{at}[{i}]: {why}; matches nothing"));
                    PeerMatch::Invalid
                })
            })
            .collect(),
    )
}

fn parse_peer(namespace: &str, peer: &NetworkPolicyPeer) -> Result<PeerMatch, String> {
    let selector = |field: &str, s| Selector::from_k8s(s).map_err(|e| format!("{field}.{e}"));
    match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            Err("ipBlock together with podSelector or namespaceSelector".to_string())
        }
        (Some(block), None, None) => {
            let cidr = parse_cidr(&block.cidr).map_err(|e| format!("ipBlock.cidr: {e}"))?;
            let mut except = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let net = parse_cidr(e).map_err(|e| format!("ipBlock.except[{i}]: {e}"))?;
                if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
                    return Err(format!(
                        "ipBlock.except[{i}]: {e} is not a strict subset of {cidr}"
                    ));
                }
                except.push(net);
            }
            Ok(PeerMatch::IpBlock { cidr, except })
        }
        (None, None, None) => Err("no podSelector, namespaceSelector or ipBlock".to_string()),
        (None, pods, None) => Ok(PeerMatch::Pods {
            namespaces: NamespaceMatch::Own(namespace.to_string()),
            pods: match pods {
                Some(s) => selector("podSelector", s)?,
                None => Selector::everything(),
            },
        }),
        (None, pods, Some(namespaces)) => Ok(PeerMatch::Pods {
            namespaces: NamespaceMatch::Labels(selector("namespaceSelector", namespaces)?),
            pods: match pods {
                Some(s) => selector("podSelector", s)?,
                None => Selector::everything(),
            },
        }),
    }
}

/// A CIDR, host bits cleared (as the data path will see it).
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not a CIDR"))
}

fn parse_ports(
    ports: Option<&[NetworkPolicyPort]>,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<Vec<PortMatch>> {
    let ports = ports.filter(|p| !p.is_empty())?;
    Some(
        ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                parse_port(port).unwrap_or_else(|why| {
                    problems.push(format!("{at}[{i}]: {why}; matches nothing"));
                    PortMatch::Invalid
                })
            })
            .collect(),
    )
}

fn parse_port(port: &NetworkPolicyPort) -> Result<PortMatch, String> {
    let protocol = Protocol::from_k8s(port.protocol.as_deref()).ok_or_else(|| {
        format!(
            "unknown protocol {:?}",
            port.protocol.as_deref().unwrap_or("")
        )
    })?;
    let number = |n: i32| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("port {n} is not between 1 and 65535"))
    };
    match (&port.port, port.end_port) {
        (None, None) => Ok(PortMatch::Any(protocol)),
        (None, Some(_)) => Err("endPort without port".to_string()),
        (Some(IntOrString::Int(start)), None) => {
            let start = number(*start)?;
            Ok(PortMatch::Range(protocol, start, start))
        }
        (Some(IntOrString::Int(start)), Some(end)) => {
            let (start, end) = (number(*start)?, number(end)?);
            if end < start {
                return Err(format!("endPort {end} is below port {start}"));
            }
            Ok(PortMatch::Range(protocol, start, end))
        }
        (Some(IntOrString::String(name)), None) => Ok(PortMatch::Named(protocol, name.clone())),
        (Some(IntOrString::String(_)), Some(_)) => Err("endPort with a named port".to_string()),
    }
}

/// The labels a namespace is selected by: its own, plus `kubernetes.io/metadata.name` (which the
/// API server always sets).
pub(crate) fn namespace_labels(name: &str, labels: Option<&Labels>) -> Labels {
    let mut labels = labels.cloned().unwrap_or_default();
    labels.insert(LABEL_NAMESPACE_NAME.to_string(), name.to_string());
    labels
}

impl fmt::Display for PeerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerMatch::Pods {
                namespaces: NamespaceMatch::Own(ns),
                pods,
            } => write!(f, "pods {pods} in namespace {ns}"),
            PeerMatch::Pods {
                namespaces: NamespaceMatch::Labels(ns),
                pods,
            } => write!(f, "pods {pods} in namespaces {ns}"),
            PeerMatch::IpBlock { cidr, except } if except.is_empty() => write!(f, "{cidr}"),
            PeerMatch::IpBlock { cidr, except } => {
                let except: Vec<String> = except.iter().map(ToString::to_string).collect();
                write!(f, "{cidr} except {}", except.join(", "))
            }
            PeerMatch::Invalid => f.write_str("<invalid peer>"),
        }
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortMatch::Any(p) => write!(f, "any/{p}"),
            PortMatch::Range(p, a, b) if a == b => write!(f, "{a}/{p}"),
            PortMatch::Range(p, a, b) => write!(f, "{a}-{b}/{p}"),
            PortMatch::Named(p, name) => write!(f, "{name}/{p}"),
            PortMatch::Invalid => f.write_str("<invalid port>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_model::k8s_openapi::api::networking::v1::{
        IPBlock, NetworkPolicyIngressRule, NetworkPolicySpec,
    };
    use cluster_model::k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelector, LabelSelectorRequirement,
    };

    /// Input the API server rejects fails closed item by item, and says why.
    #[test]
    fn invalid_items_match_nothing_and_are_described() {
        let policy = NetworkPolicy {
            metadata: Default::default(),
            spec: Some(NetworkPolicySpec {
                pod_selector: None,
                policy_types: None,
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![
                        NetworkPolicyPeer {
                            ip_block: Some(ipb("10.0.0.0/8", &[])),
                            pod_selector: Some(Default::default()),
                            namespace_selector: None,
                        },
                        NetworkPolicyPeer::default(),
                        NetworkPolicyPeer {
                            ip_block: Some(ipb("10.0.0.0/8", &["192.168.0.0/16"])),
                            ..Default::default()
                        },
                        NetworkPolicyPeer {
                            ip_block: Some(ipb("nonsense", &[])),
                            ..Default::default()
                        },
                        NetworkPolicyPeer {
                            ip_block: Some(ipb("10.1.2.3/8", &["10.1.0.0/16"])),
                            ..Default::default()
                        },
                    ]),
                    ports: Some(vec![
                        port(Some("ICMP"), Some(IntOrString::Int(1)), None),
                        port(None, Some(IntOrString::String("http".into())), Some(90)),
                        port(None, None, Some(90)),
                        port(None, Some(IntOrString::Int(100)), Some(99)),
                        port(None, Some(IntOrString::Int(70000)), None),
                        port(Some("UDP"), Some(IntOrString::Int(53)), Some(54)),
                    ]),
                }]),
                egress: None,
            }),
        };
        let parsed = Policy::from_k8s(&ObjectKey::new("default", "bad"), &policy);
        let rule = &parsed.ingress.as_ref().expect("ingress")[0];
        let peers = rule.peers.as_ref().expect("peers");
        assert_eq!(
            peers[..4],
            [
                PeerMatch::Invalid,
                PeerMatch::Invalid,
                PeerMatch::Invalid,
                PeerMatch::Invalid
            ]
        );
        assert_eq!(
            peers[4],
            PeerMatch::IpBlock {
                cidr: "10.0.0.0/8".parse().expect("cidr"),
                except: vec!["10.1.0.0/16".parse().expect("cidr")],
            },
            "host bits cleared"
        );
        let ports = rule.ports.as_ref().expect("ports");
        assert_eq!(
            ports[..5],
            [
                PortMatch::Invalid,
                PortMatch::Invalid,
                PortMatch::Invalid,
                PortMatch::Invalid,
                PortMatch::Invalid
            ]
        );
        assert_eq!(ports[5], PortMatch::Range(Protocol::Udp, 53, 54));
        assert_eq!(
            parsed.problems,
            [
                "spec.ingress[0].from[0]: ipBlock together with podSelector or namespaceSelector; matches nothing",
                "spec.ingress[0].from[1]: no podSelector, namespaceSelector or ipBlock; matches nothing",
                "spec.ingress[0].from[2]: ipBlock.except[0]: 192.168.0.0/16 is not a strict subset of 10.0.0.0/8; matches nothing",
                "spec.ingress[0].from[3]: ipBlock.cidr: \"nonsense\" is not a CIDR; matches nothing",
                "spec.ingress[0].ports[0]: unknown protocol \"ICMP\"; matches nothing",
                "spec.ingress[0].ports[1]: endPort with a named port; matches nothing",
                "spec.ingress[0].ports[2]: endPort without port; matches nothing",
                "spec.ingress[0].ports[3]: endPort 99 is below port 100; matches nothing",
                "spec.ingress[0].ports[4]: port 70000 is not between 1 and 65535; matches nothing",
            ]
        );
        // Absent policyTypes without egress rules: ingress only, inferred.
        assert!(parsed.types_inferred);
        assert!(parsed.egress.is_none());
        assert!(parsed.pod_selector.is_everything());
    }

    #[test]
    fn invalid_pod_selector_selects_nothing() {
        let policy = NetworkPolicy {
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "a".into(),
                        operator: "In".into(),
                        values: None,
                    }]),
                    match_labels: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let parsed = Policy::from_k8s(&ObjectKey::new("default", "p"), &policy);
        assert!(parsed.pod_selector.is_nothing());
        assert_eq!(parsed.problems.len(), 1);
        assert!(
            parsed.problems[0].starts_with("spec.podSelector.matchExpressions[0]: "),
            "{:?}",
            parsed.problems
        );
    }

    fn ipb(cidr: &str, except: &[&str]) -> IPBlock {
        IPBlock {
            cidr: cidr.to_string(),
            except: (!except.is_empty()).then(|| except.iter().map(ToString::to_string).collect()),
        }
    }

    fn port(
        protocol: Option<&str>,
        port: Option<IntOrString>,
        end_port: Option<i32>,
    ) -> NetworkPolicyPort {
        NetworkPolicyPort {
            end_port,
            port,
            protocol: protocol.map(String::from),
        }
    }
}
