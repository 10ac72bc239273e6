//! Pure step: one node's compiled NetworkPolicy ([`NodePolicy`]) → the
//! contents of the policy maps, keyed by the pods' host-side interfaces.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use cluster_model::ObjectKey;
use ipnet::{IpNet, Ipv4Net};
use proxy_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, POLICY_CLASS_ANY,
    POLICY_CLASS_FIRST, POLICY_CLASS_OWN_NODE, POLICY_CLASS_UNKNOWN, PolicyEndpoint, PolicyRuleKey,
    RULE_PREFIX_ANY_PORT, RULE_PREFIX_ANY_PROTOCOL,
};
use sluice_policy::compile::{PeerClass, PeerKind, PeerRef, PortRef};
use sluice_policy::{Direction, NodePolicy, Protocol};

use crate::interfaces::Interface;

/// One allow entry: an LPM prefix length (bits) over a [`PolicyRuleKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleEntry {
    pub prefix_len: u32,
    pub key: PolicyRuleKey,
}

/// What the policy maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    /// Managed pods by interface index.
    pub endpoints: BTreeMap<u32, PolicyEndpoint>,
    /// IPv4 prefix → peer class number.
    pub peers: BTreeMap<Ipv4Net, u32>,
    pub rules: BTreeSet<RuleEntry>,
}

/// A local pod the tables cover, for attaching programs and naming drops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedPod {
    pub pod: ObjectKey,
    pub interface: Interface,
    /// The policies isolating it, per direction.
    pub isolated_by: BTreeMap<Direction, Vec<ObjectKey>>,
}

/// The tables, the pods they cover, and the pods they could not (no host route yet).
#[derive(Clone, Debug, Default)]
pub struct BuiltTables {
    pub tables: PolicyTables,
    pub managed: BTreeMap<u32, ManagedPod>,
    pub pending: Vec<ObjectKey>,
}

/// Class numbers that stay the same across compiles, so a change to one pod's
/// labels rewrites that pod's entries only. Numbers are never reused: a
/// number freed in one sync may still be in rules the same sync deletes last.
#[derive(Debug)]
pub struct ClassNumbers {
    numbers: HashMap<PeerClass, u32>,
    next: u32,
    /// Numbers ran out once: the next ones may be in use.
    wrapped: bool,
}

impl Default for ClassNumbers {
    fn default() -> Self {
        Self {
            numbers: HashMap::new(),
            next: POLICY_CLASS_FIRST,
            wrapped: false,
        }
    }
}

impl ClassNumbers {
    fn number(&mut self, class: &PeerClass) -> u32 {
        if class.kind == PeerKind::OwnNode {
            return POLICY_CLASS_OWN_NODE;
        }
        if let Some(n) = self.numbers.get(class) {
            return *n;
        }
        // 2^32 classes would take centuries of churn; if it ever comes,
        // wrap past the reserved numbers and skip those still in use.
        let n = loop {
            let n = self.next;
            self.next = if n >= POLICY_CLASS_UNKNOWN - 1 {
                self.wrapped = true;
                POLICY_CLASS_FIRST
            } else {
                n + 1
            };
            if !self.wrapped || !self.numbers.values().any(|&used| used == n) {
                break n;
            }
        };
        self.numbers.insert(class.clone(), n);
        n
    }
}

pub fn direction_code(direction: Direction) -> u8 {
    match direction {
        Direction::Ingress => DIRECTION_INGRESS,
        Direction::Egress => DIRECTION_EGRESS,
    }
}

pub fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

/// Builds the map contents for `policy`, the pods' host routes in `routes`.
pub fn build(
    policy: &NodePolicy,
    routes: &BTreeMap<Ipv4Addr, Interface>,
    numbers: &mut ClassNumbers,
) -> BuiltTables {
    let class_numbers: Vec<u32> = policy.classes.iter().map(|c| numbers.number(c)).collect();
    numbers
        .numbers
        .retain(|class, _| policy.classes.contains(class));

    let mut built = BuiltTables::default();
    for (prefix, class) in &policy.addresses {
        // IPv6 is not enforced yet; the program drops it at isolated pods.
        if let IpNet::V4(v4) = prefix {
            built.tables.peers.insert(*v4, class_numbers[*class]);
        }
    }
    for (key, endpoint) in &policy.endpoints {
        let route = endpoint.addrs.iter().find_map(|a| match a {
            IpAddr::V4(v4) => routes.get(v4),
            IpAddr::V6(_) => None,
        });
        // A pod that outlived an address change can match another pod's
        // route; the first claim wins and the other stays pending.
        let Some(interface) = route.filter(|i| !built.managed.contains_key(&i.index)) else {
            built.pending.push(key.clone());
            continue;
        };
        let ifindex = interface.index;
        built.managed.insert(
            ifindex,
            ManagedPod {
                pod: key.clone(),
                interface: interface.clone(),
                isolated_by: endpoint.isolated_by.clone(),
            },
        );
        built.tables.endpoints.insert(
            ifindex,
            PolicyEndpoint {
                ingress_isolated: u8::from(endpoint.ingress.is_some()),
                egress_isolated: u8::from(endpoint.egress.is_some()),
                _pad: 0,
            },
        );
        for direction in [Direction::Ingress, Direction::Egress] {
            for allow in endpoint.rules(direction).into_iter().flatten() {
                let class = match allow.peer {
                    PeerRef::Any => POLICY_CLASS_ANY,
                    PeerRef::Class(c) => class_numbers[c],
                };
                let base = PolicyRuleKey {
                    ifindex,
                    class,
                    direction: direction_code(direction),
                    proto: 0,
                    port: [0; 2],
                };
                match allow.ports {
                    PortRef::All => {
                        built.tables.rules.insert(RuleEntry {
                            prefix_len: RULE_PREFIX_ANY_PROTOCOL,
                            key: base,
                        });
                    }
                    PortRef::Range(protocol, first, last) => {
                        for (port, bits) in port_prefixes(first, last) {
                            built.tables.rules.insert(RuleEntry {
                                prefix_len: RULE_PREFIX_ANY_PORT + u32::from(bits),
                                key: PolicyRuleKey {
                                    proto: protocol_number(protocol),
                                    port: port.to_be_bytes(),
                                    ..base
                                },
                            });
                        }
                    }
                }
            }
        }
    }
    built
}

/// The fewest aligned blocks covering `first..=last`, as (start, prefix bits of
/// the 16-bit port): 0..=65535 is one block of 0 bits, a single port 16 bits.
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut blocks = Vec::new();
    if first > last {
        return blocks;
    }
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // The largest block aligned at `start` that does not pass `end`.
        let mut size = if start == 0 {
            1 << 16
        } else {
            1u32 << start.trailing_zeros()
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        blocks.push((start as u16, 16 - size.trailing_zeros() as u8));
        start += size;
    }
    blocks
}

#[cfg(test)]
mod tests;
