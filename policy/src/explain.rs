//! Whether a connection is allowed, and why: the oracle the data path is checked against.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use cluster_model::{ClusterSnapshot, Node, ObjectKey, Pod};

use crate::identity::Identity;
use crate::model::{Direction, PeerMatch, Policy, Protocol, Rule};

/// One end of a connection, as the caller names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A pod of the snapshot; its address is its primary one (`status.podIP`, else the first
    /// of `status.podIPs`). To pick another (e.g. its IPv6 one), name the address instead.
    Pod(ObjectKey),
    /// A node of the snapshot itself (its host network namespace), at its first InternalIP.
    Node(String),
    /// An address: the pod that has it (running, not host-network), else the node that has it
    /// (`status.addresses`), else an address outside the cluster.
    Ip(IpAddr),
}

/// What a [`Peer`] turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Pod {
        key: ObjectKey,
        /// `spec.nodeName`, when scheduled.
        node: Option<String>,
        /// The address the connection uses, if the pod has one.
        addr: Option<IpAddr>,
    },
    /// A node, or a host-network pod (which is its node as far as policy goes).
    Node { name: String, addr: Option<IpAddr> },
    /// An address no pod or node of the snapshot has.
    External { addr: IpAddr },
}

impl Endpoint {
    /// The address a connection from or to it uses, if known.
    pub fn addr(&self) -> Option<IpAddr> {
        match self {
            Endpoint::Pod { addr, .. } | Endpoint::Node { addr, .. } => *addr,
            Endpoint::External { addr } => Some(*addr),
        }
    }
}

/// Why a direction was allowed without looking at policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exemption {
    /// A pod talking to itself: loopback, it never crosses the pod's interface.
    SamePod,
    /// A pod and the node it runs on (so probes work).
    OwnNode,
}

/// One rule of one policy: `spec.<direction>[rule]` of `policy`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjectKey,
    pub direction: Direction,
    pub rule: usize,
}

/// The verdict of one direction: the source's egress or the destination's ingress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectionVerdict {
    /// This side is not a pod policies apply to (a node, a host-network pod, an outside
    /// address): nothing is enforced here.
    NotEnforced,
    /// Always allowed, whatever the policies say.
    Exempt(Exemption),
    /// No policy selects the pod for this direction: everything is allowed.
    NotIsolated,
    /// The policies in `isolated_by` select the pod for this direction; the rules in
    /// `allowed_by` (every one that matches, sorted) allow the connection. None: denied.
    Isolated {
        isolated_by: Vec<ObjectKey>,
        allowed_by: Vec<RuleRef>,
    },
}

impl DirectionVerdict {
    pub fn allows(&self) -> bool {
        match self {
            DirectionVerdict::NotEnforced
            | DirectionVerdict::Exempt(_)
            | DirectionVerdict::NotIsolated => true,
            DirectionVerdict::Isolated { allowed_by, .. } => !allowed_by.is_empty(),
        }
    }

    /// The policies isolating the pod in this direction (empty when not isolated or when
    /// exempt or not enforced).
    pub fn isolated_by(&self) -> &[ObjectKey] {
        match self {
            DirectionVerdict::Isolated { isolated_by, .. } => isolated_by,
            _ => &[],
        }
    }
}

/// Whether a connection (its first packet; replies of an allowed connection are allowed too)
/// from one endpoint to another, on a destination port and protocol, is allowed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Both directions allow it.
    pub allowed: bool,
    pub from: Endpoint,
    pub to: Endpoint,
    /// The source pod's egress.
    pub egress: DirectionVerdict,
    /// The destination pod's ingress.
    pub ingress: DirectionVerdict,
}

/// A peer that names nothing in the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("no pod {0} in the snapshot")]
    UnknownPod(ObjectKey),
    #[error("no node {0} in the snapshot")]
    UnknownNode(String),
}

/// A snapshot's policies, parsed once, ready to explain many connections.
pub struct PolicySet<'a> {
    snapshot: &'a ClusterSnapshot,
    /// Policies by namespace, each list in key order.
    by_namespace: BTreeMap<String, Vec<Policy>>,
    /// Which pod an address is (the data path's compile uses the same resolution).
    pub(crate) pods_by_addr: HashMap<IpAddr, ObjectKey>,
    /// Which node an address is (its own, or a host-network pod's on it).
    pub(crate) nodes_by_addr: HashMap<IpAddr, String>,
}

impl<'a> PolicySet<'a> {
    pub fn new(snapshot: &'a ClusterSnapshot) -> PolicySet<'a> {
        let mut by_namespace: BTreeMap<String, Vec<Policy>> = BTreeMap::new();
        for (key, policy) in &snapshot.network_policies {
            by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .push(Policy::from_k8s(key, policy));
        }
        let mut pods_by_addr = HashMap::new();
        for (key, pod) in &snapshot.pods {
            if host_network(pod) || terminated(pod) {
                continue;
            }
            for addr in pod_addrs(pod) {
                // Pods in key order: the first to claim an address keeps it.
                pods_by_addr.entry(addr).or_insert_with(|| key.clone());
            }
        }
        let mut nodes_by_addr = HashMap::new();
        for (name, node) in &snapshot.nodes {
            for addr in node_addrs(node) {
                nodes_by_addr.entry(addr).or_insert_with(|| name.clone());
            }
        }
        // A host-network pod is its node, so its addresses are the node's too.
        for pod in snapshot.pods.values() {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            if let Some(node) = node.filter(|n| !n.is_empty())
                && host_network(pod)
                && !terminated(pod)
            {
                for addr in pod_addrs(pod) {
                    nodes_by_addr
                        .entry(addr)
                        .or_insert_with(|| node.to_string());
                }
            }
        }
        PolicySet {
            snapshot,
            by_namespace,
            pods_by_addr,
            nodes_by_addr,
        }
    }

    /// Every parsed policy, by namespace then name.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.by_namespace.values().flatten()
    }

    /// The policies that select a pod of this identity and isolate it in `direction`.
    pub(crate) fn isolating(&self, identity: &Identity, direction: Direction) -> Vec<&Policy> {
        self.by_namespace
            .get(&identity.namespace)
            .into_iter()
            .flatten()
            .filter(|p| p.rules(direction).is_some() && p.selects(identity))
            .collect()
    }

    /// What a peer is.
    pub fn resolve(&self, peer: &Peer) -> Result<Endpoint, ExplainError> {
        match peer {
            Peer::Pod(key) => {
                let pod = self
                    .snapshot
                    .pods
                    .get(key)
                    .ok_or_else(|| ExplainError::UnknownPod(key.clone()))?;
                Ok(self.pod_endpoint(key, pod, pod_addrs(pod).into_iter().next()))
            }
            Peer::Node(name) => {
                let node = self
                    .snapshot
                    .nodes
                    .get(name)
                    .ok_or_else(|| ExplainError::UnknownNode(name.clone()))?;
                Ok(Endpoint::Node {
                    name: name.clone(),
                    addr: node_primary_addr(node),
                })
            }
            Peer::Ip(addr) => {
                if let Some(key) = self.pods_by_addr.get(addr)
                    && let Some(pod) = self.snapshot.pods.get(key)
                {
                    return Ok(self.pod_endpoint(key, pod, Some(*addr)));
                }
                if let Some(name) = self.nodes_by_addr.get(addr) {
                    return Ok(Endpoint::Node {
                        name: name.clone(),
                        addr: Some(*addr),
                    });
                }
                Ok(Endpoint::External { addr: *addr })
            }
        }
    }

    fn pod_endpoint(&self, key: &ObjectKey, pod: &Pod, addr: Option<IpAddr>) -> Endpoint {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        if host_network(pod) {
            return Endpoint::Node {
                name: node.unwrap_or_default(),
                addr,
            };
        }
        Endpoint::Pod {
            key: key.clone(),
            node,
            addr,
        }
    }

    /// Explains a connection from `from` to `to` on destination `port`/`protocol`.
    pub fn explain(
        &self,
        from: &Peer,
        to: &Peer,
        port: u16,
        protocol: Protocol,
    ) -> Result<Verdict, ExplainError> {
        let from = self.resolve(from)?;
        let to = self.resolve(to)?;
        Ok(self.explain_endpoints(from, to, port, protocol))
    }

    /// [`PolicySet::explain`] for endpoints already resolved.
    pub fn explain_endpoints(
        &self,
        from: Endpoint,
        to: Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> Verdict {
        let egress = self.direction(Direction::Egress, &from, &to, &to, port, protocol);
        let ingress = self.direction(Direction::Ingress, &to, &from, &to, port, protocol);
        Verdict {
            allowed: egress.allows() && ingress.allows(),
            from,
            to,
            egress,
            ingress,
        }
    }

    /// The verdict of `direction` for `subject` (the pod whose policies count) talking with
    /// `other`; `destination` is the side whose named ports count.
    fn direction(
        &self,
        direction: Direction,
        subject: &Endpoint,
        other: &Endpoint,
        destination: &Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> DirectionVerdict {
        let Endpoint::Pod {
            key,
            node: subject_node,
            ..
        } = subject
        else {
            return DirectionVerdict::NotEnforced;
        };
        match other {
            Endpoint::Pod { key: other_key, .. } if other_key == key => {
                return DirectionVerdict::Exempt(Exemption::SamePod);
            }
            Endpoint::Node { name, .. } if subject_node.as_deref() == Some(name.as_str()) => {
                return DirectionVerdict::Exempt(Exemption::OwnNode);
            }
            _ => {}
        }
        let Some(pod) = self.snapshot.pods.get(key) else {
            // Endpoints made by hand for pods not in the snapshot: no labels, no policy.
            return DirectionVerdict::NotIsolated;
        };
        let identity = Identity::of_pod(self.snapshot, key, pod);
        let isolating = self.isolating(&identity, direction);
        if isolating.is_empty() {
            return DirectionVerdict::NotIsolated;
        }
        let other_identity = match other {
            Endpoint::Pod { key, .. } => self
                .snapshot
                .pods
                .get(key)
                .map(|pod| Identity::of_pod(self.snapshot, key, pod)),
            _ => None,
        };
        let named = |name: &str, protocol: Protocol| match destination {
            Endpoint::Pod { key, .. } => self
                .snapshot
                .pods
                .get(key)
                .map(|pod| named_port(pod, name, protocol))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let mut allowed_by = Vec::new();
        for policy in &isolating {
            for rule in policy.rules(direction).unwrap_or_default() {
                let peer_ok = rule_peer_matches(rule, other_identity.as_ref(), other.addr());
                let port_ok = match &rule.ports {
                    None => true,
                    Some(ports) => ports.iter().any(|p| p.matches(port, protocol, &named)),
                };
                if peer_ok && port_ok {
                    allowed_by.push(RuleRef {
                        policy: policy.key.clone(),
                        direction,
                        rule: rule.index,
                    });
                }
            }
        }
        DirectionVerdict::Isolated {
            isolated_by: isolating.iter().map(|p| p.key.clone()).collect(),
            allowed_by,
        }
    }
}

/// Whether a rule's peers include the other side: a pod by its identity (pod selectors) or
/// its address (ipBlock), anything else by its address (ipBlock only).
fn rule_peer_matches(rule: &Rule, identity: Option<&Identity>, addr: Option<IpAddr>) -> bool {
    let Some(peers) = &rule.peers else {
        return true;
    };
    peers.iter().any(|peer| match peer {
        PeerMatch::Pods { .. } => identity.is_some_and(|i| peer.matches_pod(i)),
        PeerMatch::IpBlock { .. } => addr.is_some_and(|a| peer.matches_addr(a)),
        PeerMatch::Invalid => false,
    })
}

/// Explains one connection (parses the snapshot's policies each time: for many connections, use
/// a [`PolicySet`]).
pub fn explain(
    snapshot: &ClusterSnapshot,
    from: &Peer,
    to: &Peer,
    port: u16,
    protocol: Protocol,
) -> Result<Verdict, ExplainError> {
    PolicySet::new(snapshot).explain(from, to, port, protocol)
}

/// Whether the pod uses the node's network namespace (policies do not apply to it).
pub(crate) fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

pub(crate) fn terminated(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// A pod's addresses: `status.podIP`, then `status.podIPs`, without repeats.
pub(crate) fn pod_addrs(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut addrs: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    for s in status.pod_ip.as_deref().into_iter().chain(listed) {
        if let Ok(addr) = s.parse::<IpAddr>()
            && !addrs.contains(&addr)
        {
            addrs.push(addr);
        }
    }
    addrs
}

/// A node's addresses (`status.addresses` that are IP addresses).
pub(crate) fn node_addrs(node: &Node) -> Vec<IpAddr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .collect()
}

/// A node's first InternalIP, else its first IP address.
fn node_primary_addr(node: &Node) -> Option<IpAddr> {
    let addresses: Vec<_> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .collect();
    addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .chain(addresses.iter())
        .find_map(|a| a.address.parse::<IpAddr>().ok())
}

/// The port numbers a pod has under a name and protocol: every container's (and restartable
/// init container's, i.e. sidecar's) ports of that name; usually one.
pub(crate) fn named_port(pod: &Pod, name: &str, protocol: Protocol) -> Vec<u16> {
    cluster_model::container_ports(pod)
        .filter(|p| {
            p.name.as_deref() == Some(name)
                && Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol)
        })
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect()
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod { key, addr, .. } => {
                write!(f, "pod {key}")?;
                if let Some(addr) = addr {
                    write!(f, " ({addr})")?;
                }
                Ok(())
            }
            Endpoint::Node { name, addr } => {
                write!(f, "node {name}")?;
                if let Some(addr) = addr {
                    write!(f, " ({addr})")?;
                }
                Ok(())
            }
            Endpoint::External { addr } => write!(f, "{addr} (outside the cluster)"),
        }
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}[{}]",
            self.policy,
            self.direction.field(),
            self.rule
        )
    }
}

impl fmt::Display for DirectionVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |items: Vec<String>| items.join(", ");
        match self {
            DirectionVerdict::NotEnforced => f.write_str("not a pod: nothing enforced"),
            DirectionVerdict::Exempt(Exemption::SamePod) => {
                f.write_str("allowed: a pod talking to itself")
            }
            DirectionVerdict::Exempt(Exemption::OwnNode) => {
                f.write_str("allowed: a pod and its own node")
            }
            DirectionVerdict::NotIsolated => f.write_str("allowed: no policy isolates the pod"),
            DirectionVerdict::Isolated {
                isolated_by,
                allowed_by,
            } => {
                let isolated = list(isolated_by.iter().map(ToString::to_string).collect());
                if allowed_by.is_empty() {
                    write!(f, "denied: isolated by {isolated}, and no rule allows it")
                } else {
                    let rules = list(allowed_by.iter().map(ToString::to_string).collect());
                    write!(f, "allowed by {rules} (isolated by {isolated})")
                }
            }
        }
    }
}

/// Three lines: the outcome, then each direction.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = if self.allowed { "allowed" } else { "denied" };
        writeln!(f, "{} -> {}: {outcome}", self.from, self.to)?;
        writeln!(f, "  egress of the source: {}", self.egress)?;
        write!(f, "  ingress of the destination: {}", self.ingress)
    }
}
