//! What the policy tests share: constructors for map entries, a deterministic generator,
//! cluster manifests to build tables from, and the kernel's policy lookups emulated over
//! [`PolicyTables`].

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use cluster_model::{ClusterSnapshot, ManifestFormat, parse_manifests};
use ipnet::Ipv4Net;
use proxy_common::{
    POLICY_CLASS_ANY, POLICY_CLASS_OWN_NODE, POLICY_CLASS_UNKNOWN, PolicyEndpoint, PolicyRuleKey,
    RULE_PREFIX_ANY_PROTOCOL, RULE_PREFIX_FULL,
};

use crate::interfaces::Interface;
use crate::policy_tables::{PolicyTables, RuleEntry};

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

/// A tiny deterministic generator (xorshift64*), so failures reproduce.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 32) % n
    }

    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub(crate) fn port(&mut self) -> u16 {
        (self.next() >> 40) as u16
    }
}

pub(crate) fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub(crate) fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

pub(crate) fn endpoint(ingress: u8, egress: u8) -> PolicyEndpoint {
    PolicyEndpoint {
        ingress_isolated: ingress,
        egress_isolated: egress,
        _pad: 0,
    }
}

pub(crate) fn rule_key(
    ifindex: u32,
    class: u32,
    direction: u8,
    proto: u8,
    port: u16,
) -> PolicyRuleKey {
    PolicyRuleKey {
        ifindex,
        class,
        direction,
        proto,
        port: port.to_be_bytes(),
    }
}

pub(crate) fn rule(
    prefix_len: u32,
    ifindex: u32,
    class: u32,
    direction: u8,
    proto: u8,
    port: u16,
) -> RuleEntry {
    RuleEntry {
        prefix_len,
        key: rule_key(ifindex, class, direction, proto, port),
    }
}

pub(crate) fn interface(index: u32) -> Interface {
    Interface {
        index,
        name: format!("veth{index}"),
    }
}

/// Host routes: each address to the interface of that index.
pub(crate) fn routes<'a>(
    pairs: impl IntoIterator<Item = (&'a str, u32)>,
) -> BTreeMap<Ipv4Addr, Interface> {
    pairs
        .into_iter()
        .map(|(addr, index)| (v4(addr), interface(index)))
        .collect()
}

// ---------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------

/// The cluster these manifests (which must be valid) describe.
pub(crate) fn snapshot(yaml: &str) -> ClusterSnapshot {
    let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
    assert_eq!(problems, vec![], "fixture invalid");
    ClusterSnapshot::from_objects(objects)
}

/// `name: value` in YAML: `value` is a flow value or block text at indentation 0.
fn field(name: &str, value: &str) -> String {
    if value.contains('\n') {
        let block: String = value.lines().map(|l| format!("  {l}\n")).collect();
        format!("{name}:\n{block}")
    } else {
        format!("{name}: {value}\n")
    }
}

/// One document, `---` first: `key` is "name" (in default) or "namespace/name", `labels` a
/// flow map or "", `rest` the fields after `metadata`.
fn document(api_version: &str, kind: &str, key: &str, labels: &str, rest: &str) -> String {
    let mut metadata = match key.split_once('/') {
        Some((namespace, name)) => format!("{{name: {name}, namespace: {namespace}"),
        None => format!("{{name: {key}"),
    };
    if !labels.is_empty() {
        metadata.push_str(&format!(", labels: {labels}"));
    }
    format!("---\napiVersion: {api_version}\nkind: {kind}\nmetadata: {metadata}}}\n{rest}")
}

/// A Node with one InternalIP.
pub(crate) fn node(name: &str, address: &str) -> String {
    let status = format!("{{addresses: [{{type: InternalIP, address: {address}}}]}}");
    document("v1", "Node", name, "", &field("status", &status))
}

pub(crate) fn namespace(name: &str, labels: &str) -> String {
    document("v1", "Namespace", name, labels, "")
}

/// A Pod at `ip`; `spec` as for [`field`].
pub(crate) fn pod(key: &str, labels: &str, ip: &str, spec: &str) -> String {
    let status = format!("{{podIP: {ip}}}");
    let rest = field("spec", spec) + &field("status", &status);
    document("v1", "Pod", key, labels, &rest)
}

/// A Pod on `node` at `ip` with one container and no ports.
pub(crate) fn plain_pod(key: &str, labels: &str, node: &str, ip: &str) -> String {
    let spec = format!("{{nodeName: {node}, containers: [{{name: c}}]}}");
    pod(key, labels, ip, &spec)
}

/// A NetworkPolicy; `spec` as for [`field`].
pub(crate) fn network_policy(key: &str, spec: &str) -> String {
    document(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        key,
        "",
        &field("spec", spec),
    )
}

// ---------------------------------------------------------------------------
// The kernel's lookups, emulated
// ---------------------------------------------------------------------------

/// Whether the first `bits` bits of `stored` and `key` agree, bits numbered from the most
/// significant bit of the first byte: the kernel's LPM trie match.
pub(crate) fn prefix_matches(stored: &[u8], key: &[u8], bits: u32) -> bool {
    let bits = bits as usize;
    assert!(bits <= stored.len() * 8 && stored.len() == key.len());
    let (bytes, rest) = (bits / 8, bits % 8);
    if stored[..bytes] != key[..bytes] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    stored[bytes] & mask == key[bytes] & mask
}

/// Whether every bit from `bits` on is zero: a key the kernel and the mirror agree on.
fn canonical(stored: &[u8], bits: u32) -> bool {
    (bits as usize..stored.len() * 8).all(|i| stored[i / 8] & (0x80 >> (i % 8)) == 0)
}

/// A rule key as its bytes sit in memory (the LPM trie compares those).
fn rule_key_bytes(k: &PolicyRuleKey) -> [u8; 12] {
    let mut b = [0; 12];
    b[0..4].copy_from_slice(&k.ifindex.to_ne_bytes());
    b[4..8].copy_from_slice(&k.class.to_ne_bytes());
    b[8] = k.direction;
    b[9] = k.proto;
    b[10..12].copy_from_slice(&k.port);
    b
}

/// One node's policy maps as `proxy-ebpf/src/policy.rs` reads them.
pub(crate) struct Kernel<'a> {
    tables: &'a PolicyTables,
    /// Rules by (ifindex, class, direction), the part every rule's prefix covers (checked).
    rules: HashMap<(u32, u32, u8), Vec<RuleEntry>>,
}

impl<'a> Kernel<'a> {
    pub(crate) fn new(tables: &'a PolicyTables) -> Kernel<'a> {
        let mut rules: HashMap<(u32, u32, u8), Vec<RuleEntry>> = HashMap::new();
        for rule in &tables.rules {
            assert!(
                (RULE_PREFIX_ANY_PROTOCOL..=RULE_PREFIX_FULL).contains(&rule.prefix_len),
                "{rule:?}: a prefix shorter than (ifindex, class, direction)"
            );
            assert!(
                canonical(&rule_key_bytes(&rule.key), rule.prefix_len),
                "{rule:?}: bits past the prefix are set (the kernel would merge it with another)"
            );
            assert!(
                rule.prefix_len == RULE_PREFIX_ANY_PROTOCOL || rule.key.proto != 0,
                "{rule:?}: a port rule without a protocol"
            );
            rules
                .entry((rule.key.ifindex, rule.key.class, rule.key.direction))
                .or_default()
                .push(*rule);
        }
        for prefix in tables.peers.keys() {
            assert_eq!(*prefix, prefix.trunc(), "{prefix}: host bits set");
        }
        Kernel { tables, rules }
    }

    /// `POLICY_PEERS` lookup: the class of the longest prefix holding `addr`.
    fn class_of(&self, addr: Ipv4Addr) -> u32 {
        self.tables
            .peers
            .iter()
            .filter(|(p, _)| {
                prefix_matches(
                    &p.network().octets(),
                    &addr.octets(),
                    u32::from(p.prefix_len()),
                )
            })
            .max_by_key(|(p, _)| p.prefix_len())
            .map_or(POLICY_CLASS_UNKNOWN, |(_, c)| *c)
    }

    /// `POLICY_RULES` lookup with a full-length key.
    fn rule_matches(&self, key: PolicyRuleKey) -> bool {
        let bytes = rule_key_bytes(&key);
        self.rules
            .get(&(key.ifindex, key.class, key.direction))
            .into_iter()
            .flatten()
            .any(|r| prefix_matches(&rule_key_bytes(&r.key), &bytes, r.prefix_len))
    }

    /// `enforce` for the first packet of a connection at interface `ifindex`: `peer` is the
    /// other side, `port` the destination port.
    pub(crate) fn passes(
        &self,
        ifindex: u32,
        direction: u8,
        peer: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> bool {
        let Some(endpoint) = self.tables.endpoints.get(&ifindex) else {
            return true;
        };
        if !endpoint.isolated(direction) {
            return true;
        }
        let class = self.class_of(peer);
        if class == POLICY_CLASS_OWN_NODE {
            return true;
        }
        [class, POLICY_CLASS_ANY]
            .into_iter()
            .any(|class| self.rule_matches(rule_key(ifindex, class, direction, proto, port)))
    }
}
