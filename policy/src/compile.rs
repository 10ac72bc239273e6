//! NetworkPolicy compiled for one node's data path.
//!
//! The kernel answers "may this packet pass?" with a fixed number of lookups whatever the
//! number of policies: the peer's address gives a [`PeerClass`] (longest-prefix match), and each
//! local pod has, per direction, a set of [`Allow`] entries keyed by peer class, protocol and
//! port range. This module computes those tables from a snapshot; it is pure, and
//! [`NodePolicy::allows`] evaluates them the way the kernel does, so tests can check the
//! compiled tables against [`crate::PolicySet::explain`] cell by cell.
//!
//! A peer class is everything a verdict can depend on about the other side of a connection:
//! whether it is this node, the pod's [`Identity`] (what selectors see), which ipBlocks hold its
//! address, and the numbers of the named ports policies refer to (egress named ports are
//! resolved against the destination). Addresses that agree on all of that share a class.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use cluster_model::{ClusterSnapshot, ObjectKey, Pod};
use ipnet::IpNet;

use crate::explain::{Endpoint, PolicySet, host_network, named_port, pod_addrs, terminated};
use crate::identity::Identity;
use crate::model::{Direction, PeerMatch, Policy, PortMatch, Protocol, Rule};

/// One ipBlock, as a peer: its CIDR and its exceptions (sorted).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlock {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl IpBlock {
    /// The canonical form (exceptions sorted) of an ipBlock peer.
    fn new(cidr: IpNet, except: &[IpNet]) -> IpBlock {
        let mut except = except.to_vec();
        except.sort();
        IpBlock { cidr, except }
    }

    fn contains(&self, addr: IpAddr) -> bool {
        self.cidr.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }

    /// Whether every address whose most specific table prefix is `prefix` is in the block,
    /// given that the block's CIDR and exceptions are table prefixes themselves (so an
    /// address in `prefix` is in one of them only if `prefix` lies inside it).
    fn holds_prefix(&self, prefix: &IpNet) -> bool {
        self.cidr.contains(prefix) && !self.except.iter().any(|e| e.contains(prefix))
    }
}

/// What the other side of a connection is, as far as policy can tell.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerKind {
    /// This node (any of its addresses): always allowed, both ways.
    OwnNode,
    /// A pod: what selectors see, and the named ports policies refer to, resolved on it
    /// (name, protocol, number), sorted.
    Pod {
        identity: Identity,
        named_ports: Vec<(String, Protocol, u16)>,
    },
    /// Another node, a host-network pod elsewhere, or an address outside the cluster: only
    /// ipBlocks match it.
    Address,
}

/// A set of addresses every policy treats alike.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerClass {
    pub kind: PeerKind,
    /// The ipBlocks (of the policies that matter on this node) holding these addresses.
    pub blocks: BTreeSet<IpBlock>,
}

/// Which peers an [`Allow`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerRef {
    Any,
    /// An index into [`NodePolicy::classes`].
    Class(usize),
}

/// Which destination ports an [`Allow`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRef {
    /// Every protocol and port (a rule without `ports`): ICMP and others included.
    All,
    /// `first..=last` of one protocol.
    Range(Protocol, u16, u16),
}

/// One entry of a pod's table for one direction: traffic with this kind of peer on these
/// ports passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Allow {
    pub peer: PeerRef,
    pub ports: PortRef,
}

/// What one local pod's interface enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// The pod's addresses.
    pub addrs: Vec<IpAddr>,
    /// `None`: not isolated for ingress (everything passes). `Some`: only these.
    pub ingress: Option<BTreeSet<Allow>>,
    /// The same for egress.
    pub egress: Option<BTreeSet<Allow>>,
    /// The policies isolating it, per direction (for drop reports).
    pub isolated_by: BTreeMap<Direction, Vec<ObjectKey>>,
}

impl EndpointPolicy {
    pub fn rules(&self, direction: Direction) -> Option<&BTreeSet<Allow>> {
        match direction {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

/// The policy tables of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePolicy {
    pub classes: Vec<PeerClass>,
    /// Address prefixes → index into `classes`; the most specific prefix holding an address
    /// decides. Always has the whole address space of each family.
    pub addresses: BTreeMap<IpNet, usize>,
    /// The node's pods that policies can apply to (running, not host-network, with an
    /// address), by key.
    pub endpoints: BTreeMap<ObjectKey, EndpointPolicy>,
}

/// Compiles the policies of `snapshot` for the pods of node `node`. `local_addrs` are this
/// node's own addresses beyond those its Node object lists (e.g. the gateway address pods
/// use), which count as the node.
pub fn compile_node(snapshot: &ClusterSnapshot, node: &str, local_addrs: &[IpAddr]) -> NodePolicy {
    let set = PolicySet::new(snapshot);

    // The node's pods and the policies isolating each, per direction.
    let mut local: Vec<(&ObjectKey, &Pod, [Vec<&Policy>; 2])> = Vec::new();
    for (key, pod) in &snapshot.pods {
        let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        if !on_node || host_network(pod) || terminated(pod) || pod_addrs(pod).is_empty() {
            continue;
        }
        let identity = Identity::of_pod(snapshot, key, pod);
        let isolating = [
            set.isolating(&identity, Direction::Ingress),
            set.isolating(&identity, Direction::Egress),
        ];
        local.push((key, pod, isolating));
    }

    // Only the policies isolating a local pod shape the classes.
    let relevant: BTreeMap<&ObjectKey, &Policy> = local
        .iter()
        .flat_map(|(_, _, iso)| iso.iter().flatten())
        .map(|p| (&p.key, *p))
        .collect();
    let mut blocks: BTreeSet<IpBlock> = BTreeSet::new();
    let mut egress_names: BTreeSet<(String, Protocol)> = BTreeSet::new();
    for policy in relevant.values() {
        for direction in [Direction::Ingress, Direction::Egress] {
            for rule in policy.rules(direction).unwrap_or_default() {
                for peer in rule.peers.iter().flatten() {
                    if let PeerMatch::IpBlock { cidr, except } = peer {
                        blocks.insert(IpBlock::new(*cidr, except));
                    }
                }
                if direction == Direction::Egress {
                    for port in rule.ports.iter().flatten() {
                        if let PortMatch::Named(protocol, name) = port {
                            egress_names.insert((name.clone(), *protocol));
                        }
                    }
                }
            }
        }
    }

    let mut tables = ClassTable::default();
    // Prefixes first: the whole space, then every ipBlock CIDR and exception.
    let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
    prefixes.insert("0.0.0.0/0".parse().expect("valid prefix"));
    prefixes.insert("::/0".parse().expect("valid prefix"));
    for block in &blocks {
        prefixes.insert(block.cidr.trunc());
        prefixes.extend(block.except.iter().map(IpNet::trunc));
    }
    for prefix in prefixes {
        let class = PeerClass {
            kind: PeerKind::Address,
            blocks: blocks
                .iter()
                .filter(|b| b.holds_prefix(&prefix))
                .cloned()
                .collect(),
        };
        tables.set(prefix, class);
    }
    let block_set = |addr: IpAddr| -> BTreeSet<IpBlock> {
        blocks
            .iter()
            .filter(|b| b.contains(addr))
            .cloned()
            .collect()
    };
    // Single addresses resolve as explain resolves them: a pod first, else a node (host-network
    // pods count as theirs), this node being always allowed.
    for (addr, key) in &set.pods_by_addr {
        let Some(pod) = snapshot.pods.get(key) else {
            continue;
        };
        let named_ports: Vec<(String, Protocol, u16)> = egress_names
            .iter()
            .flat_map(|(name, protocol)| {
                named_port(pod, name, *protocol)
                    .into_iter()
                    .map(|n| (name.clone(), *protocol, n))
            })
            .collect();
        let class = PeerClass {
            kind: PeerKind::Pod {
                identity: Identity::of_pod(snapshot, key, pod),
                named_ports,
            },
            blocks: block_set(*addr),
        };
        tables.set(IpNet::from(*addr), class);
    }
    let nodes = set.nodes_by_addr.iter().map(|(a, n)| (*a, n == node));
    for (addr, own) in nodes.chain(local_addrs.iter().map(|a| (*a, true))) {
        if set.pods_by_addr.contains_key(&addr) {
            continue;
        }
        let class = if own {
            PeerClass {
                kind: PeerKind::OwnNode,
                blocks: BTreeSet::new(),
            }
        } else {
            PeerClass {
                kind: PeerKind::Address,
                blocks: block_set(addr),
            }
        };
        tables.set(IpNet::from(addr), class);
    }

    let mut endpoints = BTreeMap::new();
    for (key, pod, isolating) in &local {
        let mut endpoint = EndpointPolicy {
            addrs: pod_addrs(pod),
            ..Default::default()
        };
        for (direction, policies) in [Direction::Ingress, Direction::Egress]
            .into_iter()
            .zip(isolating)
        {
            if policies.is_empty() {
                continue;
            }
            let mut allows = BTreeSet::new();
            for policy in policies {
                for rule in policy.rules(direction).unwrap_or_default() {
                    tables.compile_rule(rule, direction, pod, &mut allows);
                }
            }
            endpoint
                .isolated_by
                .insert(direction, policies.iter().map(|p| p.key.clone()).collect());
            match direction {
                Direction::Ingress => endpoint.ingress = Some(allows),
                Direction::Egress => endpoint.egress = Some(allows),
            }
        }
        endpoints.insert((*key).clone(), endpoint);
    }
    NodePolicy {
        classes: tables.classes,
        addresses: tables.addresses,
        endpoints,
    }
}

/// Classes numbered as they are met, and the address table pointing at them.
#[derive(Default)]
struct ClassTable {
    classes: Vec<PeerClass>,
    index: BTreeMap<PeerClass, usize>,
    addresses: BTreeMap<IpNet, usize>,
}

impl ClassTable {
    fn set(&mut self, prefix: IpNet, class: PeerClass) {
        let next = self.classes.len();
        let id = *self.index.entry(class.clone()).or_insert(next);
        if id == next {
            self.classes.push(class);
        }
        self.addresses.insert(prefix, id);
    }

    /// Adds what one rule allows to `allows`; `subject` is the local pod (the destination of
    /// ingress, whose named ports count there).
    fn compile_rule(
        &self,
        rule: &Rule,
        direction: Direction,
        subject: &Pod,
        allows: &mut BTreeSet<Allow>,
    ) {
        let peers: Vec<PeerRef> = match &rule.peers {
            None => vec![PeerRef::Any],
            Some(peers) => self
                .classes
                .iter()
                .enumerate()
                .filter(|(_, class)| peers.iter().any(|p| peer_matches_class(p, class)))
                .map(|(i, _)| PeerRef::Class(i))
                .collect(),
        };
        let Some(ports) = &rule.ports else {
            allows.extend(peers.iter().map(|&peer| Allow {
                peer,
                ports: PortRef::All,
            }));
            return;
        };
        for port in ports {
            match port {
                PortMatch::Any(protocol) => {
                    let ports = PortRef::Range(*protocol, 0, u16::MAX);
                    allows.extend(peers.iter().map(|&peer| Allow { peer, ports }));
                }
                PortMatch::Range(protocol, first, last) => {
                    let ports = PortRef::Range(*protocol, *first, *last);
                    allows.extend(peers.iter().map(|&peer| Allow { peer, ports }));
                }
                PortMatch::Named(protocol, name) if direction == Direction::Ingress => {
                    for number in named_port(subject, name, *protocol) {
                        let ports = PortRef::Range(*protocol, number, number);
                        allows.extend(peers.iter().map(|&peer| Allow { peer, ports }));
                    }
                }
                PortMatch::Named(protocol, name) => {
                    // Egress: the destination's numbers, so one entry per pod class.
                    for (i, class) in self.classes.iter().enumerate() {
                        let PeerKind::Pod { named_ports, .. } = &class.kind else {
                            continue;
                        };
                        let peer_ok = peers
                            .iter()
                            .any(|p| *p == PeerRef::Any || *p == PeerRef::Class(i));
                        if !peer_ok {
                            continue;
                        }
                        for (n, p, number) in named_ports {
                            if n == name && p == protocol {
                                allows.insert(Allow {
                                    peer: PeerRef::Class(i),
                                    ports: PortRef::Range(*protocol, *number, *number),
                                });
                            }
                        }
                    }
                }
                PortMatch::Invalid => {}
            }
        }
    }
}

fn peer_matches_class(peer: &PeerMatch, class: &PeerClass) -> bool {
    match (peer, &class.kind) {
        (PeerMatch::Pods { .. }, PeerKind::Pod { identity, .. }) => peer.matches_pod(identity),
        (PeerMatch::IpBlock { cidr, except }, _) => {
            class.blocks.contains(&IpBlock::new(*cidr, except))
        }
        _ => false,
    }
}

impl NodePolicy {
    /// The class of an address: the most specific prefix holding it.
    pub fn class_of(&self, addr: IpAddr) -> Option<usize> {
        self.addresses
            .iter()
            .filter(|(prefix, _)| prefix.contains(&addr))
            .max_by_key(|(prefix, _)| prefix.prefix_len())
            .map(|(_, class)| *class)
    }

    /// What the data path does with the first packet of a connection seen at local pod
    /// `endpoint` in `direction`, with `peer` the other side: the kernel's lookups, in Rust.
    /// Exemptions first (this node), then isolation, then the entries.
    pub fn allows(
        &self,
        endpoint: &ObjectKey,
        direction: Direction,
        peer: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        let Some(ep) = self.endpoints.get(endpoint) else {
            return true;
        };
        let class = self.class_of(peer);
        if class.is_some_and(|c| self.classes[c].kind == PeerKind::OwnNode) {
            return true;
        }
        let Some(allows) = ep.rules(direction) else {
            return true;
        };
        allows.iter().any(|a| {
            let peer_ok = match a.peer {
                PeerRef::Any => true,
                PeerRef::Class(c) => Some(c) == class,
            };
            let port_ok = match a.ports {
                PortRef::All => true,
                PortRef::Range(p, first, last) => p == protocol && (first..=last).contains(&port),
            };
            peer_ok && port_ok
        })
    }
}

/// What the compiled tables of the nodes involved decide for a connection between two
/// resolved endpoints: the source node's egress tables, then the destination node's ingress
/// tables, each compiled as that node's agent would (without extra local addresses). `None`
/// when no packet would cross a pod interface: an end without an address or node, or a pod
/// talking to itself (loopback inside the pod). Tests check it against [`crate::PolicySet::explain`].
pub fn compiled_verdict(
    snapshot: &ClusterSnapshot,
    from: &Endpoint,
    to: &Endpoint,
    port: u16,
    protocol: Protocol,
) -> Option<bool> {
    let (from_addr, to_addr) = (from.addr()?, to.addr()?);
    if let (Endpoint::Pod { key: a, .. }, Endpoint::Pod { key: b, .. }) = (from, to)
        && a == b
    {
        return None;
    }
    // Both ends on one address (only hand-made snapshots do that), or in two families: no
    // packet can carry it.
    if from_addr == to_addr || from_addr.is_ipv4() != to_addr.is_ipv4() {
        return None;
    }
    // An unscheduled pod has no interface for any packet to cross.
    if [from, to]
        .iter()
        .any(|e| matches!(e, Endpoint::Pod { node: None, .. }))
    {
        return None;
    }
    let side = |end: &Endpoint, direction: Direction, peer: IpAddr| match end {
        Endpoint::Pod {
            key,
            node: Some(node),
            ..
        } => compile_node(snapshot, node, &[]).allows(key, direction, peer, port, protocol),
        _ => true,
    };
    Some(side(from, Direction::Egress, to_addr) && side(to, Direction::Ingress, from_addr))
}

#[cfg(test)]
mod tests;
