//! NetworkPolicy enforcement on this node: compile, find the pods'
//! interfaces, attach the programs, sync the maps; and say what was dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use cluster_model::{ClusterSnapshot, ObjectKey};
use ipnet::Ipv4Net;
use proxy_common::{
    DIRECTION_INGRESS, DROP_NOT_IPV4, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    POLICY_CLASS_FIRST, PolicyDropEvent,
};
use serde::Serialize;
use sluice_policy::{Direction, compile_node, policy_inputs_digest};

use crate::datapath::Datapath;
use crate::interfaces::Netlink;
use crate::policy_sync::{PolicySyncReport, PolicySyncer};
use crate::policy_tables::{self, ClassNumbers, ManagedPod, PolicyTables, direction_code};

/// What one enforcement pass did.
#[derive(Debug, Default)]
pub struct EnforcementReport {
    pub sync: PolicySyncReport,
    /// Pods whose programs were attached / detached by this pass.
    pub attached: Vec<ObjectKey>,
    pub detached: Vec<ObjectKey>,
    /// Local pods with an address but no host route yet (retried soon).
    pub pending: Vec<ObjectKey>,
    /// Failures that need a retry (netlink, attaching).
    pub errors: Vec<String>,
}

impl EnforcementReport {
    pub fn needs_retry(&self) -> bool {
        !self.pending.is_empty() || !self.errors.is_empty() || !self.sync.errors.is_empty()
    }

    pub fn changed(&self) -> bool {
        self.sync.changed() || !self.attached.is_empty() || !self.detached.is_empty()
    }
}

pub struct Enforcement {
    node: String,
    netlink: Netlink,
    syncer: PolicySyncer,
    numbers: ClassNumbers,
    managed: BTreeMap<u32, ManagedPod>,
    pending: Vec<ObjectKey>,
    policies: Vec<ObjectKey>,
    /// [`policy_inputs_digest`] of the snapshot last applied, and what
    /// failed then: together they say whether the maps are current.
    inputs_digest: String,
    errors: Vec<String>,
    /// Set after adopting maps a previous agent programmed.
    renumbering: Option<Renumbering>,
}

/// Peer class numbers as the adopted maps know them.
///
/// A restarted agent numbers its classes afresh, so class 5 may now mean what class 3 meant
/// in the maps. Rewriting every address and rule under new numbers would be safe (sync's
/// order holds for any change) but is a rewrite of the whole table, and reusing a number for
/// another class would briefly give one class's rules to another's addresses. So the first
/// build after adoption is matched to the maps: a class holding exactly the addresses an
/// adopted class holds (addresses belong to one class each, so the match is unique) keeps the
/// adopted number; every other class gets a number above all adopted ones. The translation
/// then stays for the agent's life.
#[derive(Debug, Default)]
struct Renumbering {
    /// Fresh number → number written in the maps.
    to_programmed: HashMap<u32, u32>,
    /// Next number for a class the adopted maps did not have.
    next: u32,
    /// Adopted classes by their addresses, until the first build is matched to them.
    adopted: Option<HashMap<BTreeSet<Ipv4Net>, u32>>,
}

impl Renumbering {
    fn new(programmed: &PolicyTables) -> Self {
        let mut by_class: BTreeMap<u32, BTreeSet<Ipv4Net>> = BTreeMap::new();
        for (prefix, class) in &programmed.peers {
            by_class.entry(*class).or_default().insert(*prefix);
        }
        let max = programmed
            .peers
            .values()
            .copied()
            .chain(programmed.rules.iter().map(|r| r.key.class))
            .filter(|c| *c < proxy_common::POLICY_CLASS_UNKNOWN)
            .max()
            .unwrap_or(0);
        Self {
            to_programmed: HashMap::new(),
            next: max.saturating_add(1).max(POLICY_CLASS_FIRST),
            adopted: Some(
                by_class
                    .into_iter()
                    .filter(|(class, _)| *class >= POLICY_CLASS_FIRST)
                    .map(|(class, prefixes)| (prefixes, class))
                    .collect(),
            ),
        }
    }

    /// Rewrites the class numbers of freshly built `tables` into the maps' numbering.
    fn apply(&mut self, tables: &mut PolicyTables) {
        let fresh: BTreeSet<u32> = tables
            .peers
            .values()
            .copied()
            .chain(tables.rules.iter().map(|r| r.key.class))
            .filter(|c| *c >= POLICY_CLASS_FIRST)
            .collect();
        if let Some(adopted) = self.adopted.take() {
            let mut by_class: BTreeMap<u32, BTreeSet<Ipv4Net>> = BTreeMap::new();
            for (prefix, class) in &tables.peers {
                by_class.entry(*class).or_default().insert(*prefix);
            }
            for (class, prefixes) in by_class {
                if class >= POLICY_CLASS_FIRST
                    && let Some(old) = adopted.get(&prefixes)
                {
                    self.to_programmed.insert(class, *old);
                }
            }
        }
        self.to_programmed
            .retain(|fresh_class, _| fresh.contains(fresh_class));
        for class in fresh {
            if !self.to_programmed.contains_key(&class) {
                self.to_programmed.insert(class, self.next);
                self.next = self.next.saturating_add(1);
            }
        }
        let map = |c: u32| self.to_programmed.get(&c).copied().unwrap_or(c);
        for class in tables.peers.values_mut() {
            *class = map(*class);
        }
        tables.rules = std::mem::take(&mut tables.rules)
            .into_iter()
            .map(|mut r| {
                r.key.class = map(r.key.class);
                r
            })
            .collect();
    }
}

impl Enforcement {
    pub fn new(node: &str, netlink: Netlink) -> Self {
        Self {
            node: node.to_string(),
            netlink,
            syncer: PolicySyncer::default(),
            numbers: ClassNumbers::default(),
            managed: BTreeMap::new(),
            pending: Vec::new(),
            policies: Vec::new(),
            inputs_digest: String::new(),
            errors: Vec::new(),
            renumbering: None,
        }
    }

    /// Takes over policy maps a previous agent programmed (read back from the pins): the
    /// next apply writes only what differs, in sync's safe order.
    pub fn adopt(&mut self, programmed: PolicyTables) {
        self.renumbering = Some(Renumbering::new(&programmed));
        self.syncer = PolicySyncer::adopt(programmed);
    }

    /// Brings the programs and maps in line with `snapshot`. Programs are
    /// attached before a pod's entries are written (until then they pass
    /// everything) and detached after its entries are gone.
    pub async fn apply(
        &mut self,
        snapshot: &ClusterSnapshot,
        datapath: &mut Datapath,
    ) -> EnforcementReport {
        let mut report = EnforcementReport::default();
        let network = match self.netlink.read().await {
            Ok(n) => n,
            Err(e) => {
                report
                    .errors
                    .push(format!("reading the node's network: {e:#}"));
                self.errors = report.errors.clone();
                return report;
            }
        };
        let policy = compile_node(snapshot, &self.node, &network.addresses);
        let built = policy_tables::build(&policy, &network.host_routes, &mut self.numbers);
        let mut tables = built.tables;
        if let Some(renumbering) = &mut self.renumbering {
            renumbering.apply(&mut tables);
        }
        for (ifindex, pod) in &built.managed {
            let was_attached = datapath.policy_interfaces().contains(ifindex);
            match datapath.attach_policy(&pod.interface) {
                Ok(()) if !was_attached => report.attached.push(pod.pod.clone()),
                Ok(()) => {}
                Err(e) => {
                    // Without programs its entries would only mislead the status.
                    tables.endpoints.remove(ifindex);
                    report.errors.push(format!("pod {}: {e:#}", pod.pod));
                }
            }
        }
        report.sync = self.syncer.sync(&tables, datapath.policy_maps());
        for ifindex in datapath.policy_interfaces() {
            if !tables.endpoints.contains_key(&ifindex) {
                datapath.detach_policy(ifindex);
                if let Some(pod) = self.managed.get(&ifindex) {
                    report.detached.push(pod.pod.clone());
                }
            }
        }
        self.managed = built.managed;
        self.managed
            .retain(|ifindex, _| tables.endpoints.contains_key(ifindex));
        self.pending = built.pending.clone();
        self.policies = snapshot.network_policies.keys().cloned().collect();
        report.pending = built.pending;
        self.inputs_digest = policy_inputs_digest(snapshot);
        self.errors = report
            .errors
            .iter()
            .chain(&report.sync.errors)
            .cloned()
            .collect();
        report
    }

    pub fn managed(&self) -> &BTreeMap<u32, ManagedPod> {
        &self.managed
    }

    /// What the agent enforces, for its status file; `drops(ifindex,
    /// direction)` reads the kernel's drop counters.
    pub fn status(&self, drops: impl Fn(u32, u8) -> u64) -> PolicyStatus {
        let mut drops_by_policy: BTreeMap<String, u64> = BTreeMap::new();
        let mut endpoints = Vec::new();
        for (ifindex, m) in &self.managed {
            let ingress_drops = drops(*ifindex, direction_code(Direction::Ingress));
            let egress_drops = drops(*ifindex, direction_code(Direction::Egress));
            // None of the policies isolating the pod allowed the packet, so
            // the drop counts for each of them.
            for (direction, count) in [
                (Direction::Ingress, ingress_drops),
                (Direction::Egress, egress_drops),
            ] {
                for policy in m.isolated_by.get(&direction).into_iter().flatten() {
                    *drops_by_policy.entry(policy.to_string()).or_default() += count;
                }
            }
            endpoints.push(EndpointStatus {
                pod: m.pod.to_string(),
                interface: m.interface.name.clone(),
                ingress_isolated_by: names(m.isolated_by.get(&Direction::Ingress)),
                egress_isolated_by: names(m.isolated_by.get(&Direction::Egress)),
                ingress_drops,
                egress_drops,
            });
        }
        PolicyStatus {
            policies: self.policies.iter().map(ToString::to_string).collect(),
            endpoints,
            pending: self.pending.iter().map(ToString::to_string).collect(),
            drops_by_policy,
            inputs_digest: self.inputs_digest.clone(),
            errors: self.errors.clone(),
        }
    }

    /// A sampled drop in words: which pod, which way, with whom, and which
    /// policies isolate the pod (none of them allowed it).
    pub fn describe_drop(
        &self,
        event: &PolicyDropEvent,
        snapshot: &ClusterSnapshot,
        drops_so_far: u64,
    ) -> DropReport {
        let managed = self.managed.get(&event.ifindex);
        let direction = if event.direction == DIRECTION_INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let source = Ipv4Addr::from(u32::from_be(event.saddr));
        let destination = Ipv4Addr::from(u32::from_be(event.daddr));
        let peer_addr = match direction {
            Direction::Ingress => source,
            Direction::Egress => destination,
        };
        DropReport {
            pod: managed.map_or_else(
                || format!("interface {}", event.ifindex),
                |m| m.pod.to_string(),
            ),
            direction: match direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            },
            source: source.to_string(),
            destination: destination.to_string(),
            source_port: u16::from_be(event.sport),
            destination_port: u16::from_be(event.dport),
            protocol: protocol_name(event.proto),
            peer: pod_with_address(snapshot, IpAddr::V4(peer_addr))
                .map_or_else(|| peer_addr.to_string(), |k| k.to_string()),
            reason: if event.reason == DROP_NOT_IPV4 {
                "not IPv4 (only IPv4 policy is enforced; isolated pods drop the rest)"
            } else {
                "no rule of the policies isolating the pod allows it"
            },
            ipv4: event.reason != DROP_NOT_IPV4,
            isolated_by: names(managed.and_then(|m| m.isolated_by.get(&direction))),
            drops_so_far,
        }
    }
}

fn names(keys: Option<&Vec<ObjectKey>>) -> Vec<String> {
    keys.into_iter()
        .flatten()
        .map(ToString::to_string)
        .collect()
}

fn protocol_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_SCTP => "SCTP".into(),
        IPPROTO_ICMP => "ICMP".into(),
        other => format!("IP protocol {other}"),
    }
}

/// The running pod that has `addr`, if one does.
fn pod_with_address(snapshot: &ClusterSnapshot, addr: IpAddr) -> Option<&ObjectKey> {
    let text = addr.to_string();
    snapshot.pods.iter().find_map(|(key, pod)| {
        let status = pod.status.as_ref()?;
        let mut addrs = status
            .pod_ip
            .iter()
            .chain(status.pod_ips.iter().flatten().map(|p| &p.ip));
        addrs.any(|a| *a == text).then_some(key)
    })
}

/// The policy part of the agent's status file.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyStatus {
    /// NetworkPolicies in effect (valid ones), as `namespace/name`.
    pub policies: Vec<String>,
    /// Local pods with programs attached.
    pub endpoints: Vec<EndpointStatus>,
    /// Local pods waiting for their interface.
    pub pending: Vec<String>,
    /// Packets dropped at the pods each policy isolates (a drop counts for
    /// every policy isolating the pod in that direction).
    pub drops_by_policy: BTreeMap<String, u64>,
    /// `sluice_policy::policy_inputs_digest` of the cluster state these
    /// maps were programmed from (current only if `errors` is empty).
    pub inputs_digest: String,
    /// What could not be programmed in the last pass (retried).
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointStatus {
    pub pod: String,
    pub interface: String,
    pub ingress_isolated_by: Vec<String>,
    pub egress_isolated_by: Vec<String>,
    /// Packets dropped by policy since the programs were attached.
    pub ingress_drops: u64,
    pub egress_drops: u64,
}

/// One sampled drop, for the log.
#[derive(Clone, Debug, Serialize)]
pub struct DropReport {
    pub pod: String,
    pub direction: &'static str,
    pub source: String,
    pub destination: String,
    pub source_port: u16,
    pub destination_port: u16,
    pub protocol: String,
    /// The other end: a pod's `namespace/name`, else its address.
    pub peer: String,
    pub reason: &'static str,
    /// Whether the addresses and ports are known (an IPv4 packet).
    pub ipv4: bool,
    pub isolated_by: Vec<String>,
    pub drops_so_far: u64,
}

impl fmt::Display for DropReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ipv4 {
            let arrow = if self.direction == "ingress" {
                "from"
            } else {
                "to"
            };
            write!(
                f,
                "dropped {} {}:{} -> {}:{} at {} ({} {} {}): {}",
                self.protocol,
                self.source,
                self.source_port,
                self.destination,
                self.destination_port,
                self.pod,
                self.direction,
                arrow,
                self.peer,
                self.reason
            )?;
        } else {
            write!(
                f,
                "dropped a packet at {} ({}): {}",
                self.pod, self.direction, self.reason
            )?;
        }
        if !self.isolated_by.is_empty() {
            write!(f, "; isolated by {}", self.isolated_by.join(", "))?;
        }
        write!(f, " ({} drops so far)", self.drops_so_far)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_tables::RuleEntry;
    use proxy_common::{PolicyRuleKey, RULE_PREFIX_ANY_PORT};

    fn rule(class: u32) -> RuleEntry {
        RuleEntry {
            prefix_len: RULE_PREFIX_ANY_PORT,
            key: PolicyRuleKey {
                ifindex: 7,
                class,
                direction: 0,
                proto: 6,
                port: [0, 0],
            },
        }
    }

    fn tables(peers: &[(&str, u32)], rules: &[u32]) -> PolicyTables {
        PolicyTables {
            endpoints: BTreeMap::new(),
            peers: peers
                .iter()
                .map(|(p, c)| (p.parse().unwrap(), *c))
                .collect(),
            rules: rules.iter().map(|c| rule(*c)).collect(),
        }
    }

    #[test]
    fn classes_with_the_same_addresses_keep_their_adopted_numbers() {
        // The maps: class 7 = {a, b}, class 9 = {c}, and a rule for the any-peer class 0.
        let programmed = tables(
            &[("10.0.0.1/32", 7), ("10.0.0.2/32", 7), ("10.0.0.3/32", 9)],
            &[0, 7, 9],
        );
        let mut r = Renumbering::new(&programmed);
        // Fresh numbers: 2 = {a, b}, 3 = {c}: exactly what the maps hold.
        let mut fresh = tables(
            &[("10.0.0.1/32", 2), ("10.0.0.2/32", 2), ("10.0.0.3/32", 3)],
            &[0, 2, 3],
        );
        r.apply(&mut fresh);
        assert_eq!(fresh, programmed);

        // Later a new class appears: a number above every adopted one, stable afterwards.
        let mut later = tables(
            &[("10.0.0.1/32", 2), ("10.0.0.2/32", 4), ("10.0.0.3/32", 3)],
            &[2, 3, 4],
        );
        r.apply(&mut later);
        assert_eq!(later.peers[&"10.0.0.2/32".parse().unwrap()], 10);
        assert_eq!(later.peers[&"10.0.0.1/32".parse().unwrap()], 7);
        let mut again = later.clone();
        for class in again.peers.values_mut() {
            *class = match *class {
                7 => 2,
                9 => 3,
                10 => 4,
                c => c,
            };
        }
        again.rules = [2, 3, 4].iter().map(|c| rule(*c)).collect();
        r.apply(&mut again);
        assert_eq!(again, later);
    }

    #[test]
    fn a_class_whose_addresses_changed_gets_a_number_no_adopted_class_has() {
        let programmed = tables(&[("10.0.0.1/32", 2), ("10.0.0.2/32", 3)], &[2, 3]);
        let mut r = Renumbering::new(&programmed);
        // Fresh class 2 now holds {a, b}: matches neither adopted class.
        let mut fresh = tables(&[("10.0.0.1/32", 2), ("10.0.0.2/32", 2)], &[2]);
        r.apply(&mut fresh);
        assert!(fresh.peers.values().all(|c| *c == 4), "{fresh:?}");
        assert!(fresh.rules.iter().all(|r| r.key.class == 4));
    }
}
