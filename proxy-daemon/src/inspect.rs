//! What an agent has programmed, read back from its pin directory (the maps and links the
//! kernel runs with) and put in words with the agent's status files: the data behind
//! `sluice lb list`, `sluice ct list`, `sluice policy list` and `sluice status`.
//!
//! Reading ([`Pinned`]) is apart from assembling the rows (pure functions over what was
//! read), so the assembling is tested without a kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, MapData};
use ipnet::Ipv4Net;
use proxy_common::{
    AffinityMatchKey, BACKEND_FLAG_LOCAL, Backend, ConntrackKey, ConntrackValue, DIRECTION_EGRESS,
    DIRECTION_INGRESS, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, MAP_AFFINITY_MATCH,
    MAP_BACKENDS, MAP_NAT_CONNTRACK, MAP_POLICY_CONNTRACK, MAP_SERVICES, MAP_SOURCE_RANGES,
    NAT_ORIGINAL, NatKey, NatValue, POLICY_CLASS_ANY, POLICY_CLASS_OWN_NODE, RULE_PREFIX_ANY_PORT,
    RULE_PREFIX_ANY_PROTOCOL, RULE_PREFIX_FULL, SERVICE_FLAG_SOURCE_RANGES, ServiceKey,
    ServiceValue, SourceRangeKey,
};
use serde::Serialize;

use crate::bpf_sys::{self, LinkTarget};
use crate::compile::Frontend;
use crate::conntrack::{nat_expired, policy_expired};
use crate::datapath::{PolicyMapSet, open_pinned, read_service_maps};
use crate::pins::{self, LinkPin};
use crate::policy_tables::PolicyTables;
use crate::status_file::{
    self, AgentStatus, AttachedInterface, FrontendOwner, FrontendOwners, scope_name,
};
use crate::sync::{ProgrammedState, decode_addr, decode_frontend, decode_source_range};

/// Policy drops by (interface index, direction).
pub type DropCounts = BTreeMap<(u32, u8), u64>;

/// One agent's pinned state and status files.
pub struct Pinned {
    pub dir: PathBuf,
    pub status_file: PathBuf,
    /// The status file, if the agent wrote one there.
    pub status: Option<AgentStatus>,
    /// Which Service each frontend belongs to, if the agent wrote that.
    pub owners: FrontendOwners,
}

impl Pinned {
    /// Opens the pin directory `dir` (an agent's `--bpffs-dir`) with its status file.
    pub fn open(dir: &Path, status_file: &Path) -> Result<Self> {
        if !dir.join(pins::MAPS_DIR).is_dir() {
            bail!(
                "{} holds no pinned sluice maps: is sluice-proxy running here with this --bpffs-dir?",
                dir.display()
            );
        }
        let status = status_file::read::<AgentStatus>(status_file)?;
        let owners =
            status_file::read::<FrontendOwners>(&status_file::frontends_path(status_file))?
                .unwrap_or_default();
        Ok(Self {
            dir: dir.to_path_buf(),
            status_file: status_file.to_path_buf(),
            status,
            owners,
        })
    }

    /// The service maps, as programmed.
    pub fn services(&self) -> Result<ProgrammedState> {
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            open_pinned(&self.dir, MAP_SERVICES)?;
        let backends: HashMap<MapData, u32, Backend> = open_pinned(&self.dir, MAP_BACKENDS)?;
        let matches: HashMap<MapData, AffinityMatchKey, u8> =
            open_pinned(&self.dir, MAP_AFFINITY_MATCH)?;
        let ranges: LpmTrie<MapData, SourceRangeKey, u8> =
            open_pinned(&self.dir, MAP_SOURCE_RANGES)?;
        let (state, _unreadable) = read_service_maps(&services, &backends, &matches, &ranges);
        Ok(state)
    }

    pub fn nat_conntrack(&self) -> Result<Vec<(NatKey, NatValue)>> {
        let map: HashMap<MapData, NatKey, NatValue> = open_pinned(&self.dir, MAP_NAT_CONNTRACK)?;
        Ok(map.iter().filter_map(|e| e.ok()).collect())
    }

    pub fn policy_conntrack(&self) -> Result<Vec<(ConntrackKey, ConntrackValue)>> {
        let map: HashMap<MapData, ConntrackKey, ConntrackValue> =
            open_pinned(&self.dir, MAP_POLICY_CONNTRACK)?;
        Ok(map.iter().filter_map(|e| e.ok()).collect())
    }

    /// The policy maps and the drop counter of each (interface, direction) they cover.
    pub fn policy(&self) -> Result<(PolicyTables, DropCounts)> {
        let maps = PolicyMapSet::open_pinned(&self.dir)?;
        let (tables, _unreadable) = maps.read();
        let mut drops = BTreeMap::new();
        for ifindex in tables.endpoints.keys() {
            for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
                drops.insert((*ifindex, direction), maps.drop_count(*ifindex, direction));
            }
        }
        Ok((tables, drops))
    }

    /// Every pinned map with its entries and capacity.
    pub fn map_pressure(&self) -> Vec<MapPressure> {
        map_pressure_in(&self.dir, |_| true)
    }

    /// Every pinned link: which program runs where.
    pub fn links(&self) -> Vec<LinkRow> {
        let interfaces = self.interface_names();
        let dir = self.dir.join(pins::LINKS_DIR);
        pins::list(&dir)
            .into_iter()
            .map(|name| link_row(&dir.join(&name), name, &interfaces))
            .collect()
    }

    /// Interface names by index, as the agent (in its own network namespace) saw them.
    pub fn interface_names(&self) -> BTreeMap<u32, &AttachedInterface> {
        interfaces_of(self.status.as_ref())
    }

    /// The process holding the pin directory (a running agent), if any.
    pub fn agent_pid(&self) -> Option<u32> {
        pins::lock_holder(&self.dir)
    }
}

/// The interfaces a status file names, by index.
fn interfaces_of(status: Option<&AgentStatus>) -> BTreeMap<u32, &AttachedInterface> {
    status
        .into_iter()
        .flat_map(|s| &s.interfaces)
        .map(|i| (i.ifindex, i))
        .collect()
}

/// One frontend of `sluice lb list`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LbFrontend {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// "socket" (clients on the node, translated at connect) or "external" (packets from
    /// outside: NodePort, LoadBalancer IPs, externalIPs).
    pub scope: String,
    /// `namespace/name` of the Service, when the agent's frontends file says.
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub state: FrontendState,
    #[serde(skip_serializing_if = "is_zero")]
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` in force (None: every source may connect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<Vec<String>>,
    pub backends: Vec<LbBackend>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FrontendState {
    /// Connections go to the backends.
    Serving,
    /// No usable endpoint: connections are refused (socket) or dropped (external).
    NoEndpoints,
    /// Slots without a master (a sync was interrupted); nothing reaches these.
    Unreachable,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LbBackend {
    pub slot: u16,
    pub id: u32,
    /// None when the slot names a backend id the backend map does not hold.
    pub address: Option<SocketAddr>,
    /// The endpoint runs on this node.
    pub local: bool,
    /// "active": chosen by new connections; "leaving": past the master's count (a sync is
    /// removing it); "missing": its backend entry is gone.
    pub state: &'static str,
}

/// The frontends of the service maps with their backends, in address order.
pub fn lb_frontends(
    state: &ProgrammedState,
    owners: &BTreeMap<Frontend, &FrontendOwner>,
) -> Vec<LbFrontend> {
    let backends: BTreeMap<u32, Backend> = state.backends.iter().copied().collect();
    let mut masters: BTreeMap<Frontend, ServiceValue> = BTreeMap::new();
    let mut slots: BTreeMap<Frontend, BTreeMap<u16, u32>> = BTreeMap::new();
    for (key, value) in &state.services {
        let Some(frontend) = decode_frontend(key.addr, key.port, key.proto, key.scope) else {
            continue;
        };
        if key.slot == 0 {
            masters.insert(frontend, *value);
        } else {
            slots
                .entry(frontend)
                .or_default()
                .insert(key.slot, value.backend_id);
        }
    }
    let mut ranges: BTreeMap<Frontend, Vec<String>> = BTreeMap::new();
    for (key, len) in &state.source_ranges {
        if let Some((frontend, range)) = decode_source_range(key, *len) {
            ranges.entry(frontend).or_default().push(range.to_string());
        }
    }
    let frontends: BTreeSet<Frontend> = masters.keys().chain(slots.keys()).copied().collect();
    frontends
        .into_iter()
        .map(|frontend| {
            let master = masters.get(&frontend);
            let count = master.map_or(0, |m| m.count);
            let rows = slots
                .get(&frontend)
                .into_iter()
                .flatten()
                .map(|(slot, id)| {
                    let backend = backends.get(id);
                    let state = match backend {
                        None => "missing",
                        Some(_) if *slot > count => "leaving",
                        Some(_) => "active",
                    };
                    LbBackend {
                        slot: *slot,
                        id: *id,
                        address: backend
                            .map(|b| SocketAddr::new(decode_addr(b.addr), u16::from_be(b.port))),
                        local: backend.is_some_and(|b| b.flags & BACKEND_FLAG_LOCAL != 0),
                        state,
                    }
                })
                .collect();
            let owner = owners.get(&frontend);
            LbFrontend {
                address: frontend.ip,
                port: frontend.port,
                protocol: frontend.protocol.to_string(),
                scope: scope_name(frontend.scope).into(),
                service: owner.map(|o| o.service.clone()),
                port_name: owner.map(|o| o.port_name.clone()),
                state: match master {
                    None => FrontendState::Unreachable,
                    Some(m) if m.count == 0 => FrontendState::NoEndpoints,
                    Some(_) => FrontendState::Serving,
                },
                affinity_timeout_s: master.map_or(0, |m| m.affinity_timeout_s),
                source_ranges: master
                    .filter(|m| m.flags & SERVICE_FLAG_SOURCE_RANGES != 0)
                    .map(|_| ranges.remove(&frontend).unwrap_or_default()),
                backends: rows,
            }
        })
        .collect()
}

/// One tracked connection of `sluice ct list`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Connection {
    /// "nat": translated traffic from outside the node; "policy": seen at a pod's interface.
    pub table: &'static str,
    pub protocol: String,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// nat: where the connection was translated to (the backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<SocketAddr>,
    /// nat: the node's address and port the backend sees as the source (SNAT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<SocketAddr>,
    /// nat: the Service of the frontend, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// policy: the pod interface and pod, and which way the first packet went as the pod
    /// sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    /// Seconds since the last packet.
    pub idle_s: f64,
    /// A FIN or RST was seen.
    pub closing: bool,
    /// Idle past its timeout: the programs treat it as gone (the agent's garbage collection
    /// deletes it soon).
    pub expired: bool,
}

/// Names a protocol number.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_SCTP => "SCTP".into(),
        IPPROTO_ICMP => "ICMP".into(),
        other => format!("proto-{other}"),
    }
}

fn idle_seconds(now_ns: u64, last_seen_ns: u64) -> f64 {
    // Rounded to a millisecond: more is noise.
    (now_ns.saturating_sub(last_seen_ns) / 1_000_000) as f64 / 1000.0
}

/// The translated connections from outside: one row per original-direction entry (its reply
/// twin holds the same connection backwards).
pub fn nat_connections(
    entries: &[(NatKey, NatValue)],
    owners: &BTreeMap<Frontend, &FrontendOwner>,
    now_ns: u64,
) -> Vec<Connection> {
    let mut rows: Vec<Connection> = entries
        .iter()
        .filter(|(k, _)| k.direction == NAT_ORIGINAL)
        .map(|(k, v)| {
            let destination = SocketAddr::new(decode_addr(k.daddr), u16::from_be(k.dport));
            let service = decode_frontend(k.daddr, k.dport, k.proto, proxy_common::SCOPE_EXTERNAL)
                .and_then(|f| owners.get(&f))
                .map(|o| o.service.clone());
            let no_snat = v.nat_addr == [0; 4];
            Connection {
                table: "nat",
                protocol: protocol_name(k.proto),
                source: SocketAddr::new(decode_addr(k.saddr), u16::from_be(k.sport)),
                destination,
                backend: Some(SocketAddr::new(decode_addr(v.addr), u16::from_be(v.port))),
                snat: (!no_snat)
                    .then(|| SocketAddr::new(decode_addr(v.nat_addr), u16::from_be(v.nat_port))),
                service,
                interface: None,
                pod: None,
                direction: None,
                idle_s: idle_seconds(now_ns, v.last_seen_ns),
                closing: v.closing != 0,
                expired: nat_expired(v, k.proto, now_ns),
            }
        })
        .collect();
    rows.sort_by_key(|c| (c.source, c.destination));
    rows
}

/// The connections NetworkPolicy tracks at this node's pods.
pub fn policy_connections(
    entries: &[(ConntrackKey, ConntrackValue)],
    interfaces: &BTreeMap<u32, &AttachedInterface>,
    now_ns: u64,
) -> Vec<Connection> {
    let mut rows: Vec<Connection> = entries
        .iter()
        .map(|(k, v)| {
            let interface = interfaces.get(&k.ifindex);
            Connection {
                table: "policy",
                protocol: protocol_name(k.proto),
                source: SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(k.saddr))),
                    u16::from_be(k.sport),
                ),
                destination: SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(k.daddr))),
                    u16::from_be(k.dport),
                ),
                backend: None,
                snat: None,
                service: None,
                interface: Some(
                    interface.map_or_else(|| format!("ifindex {}", k.ifindex), |i| i.name.clone()),
                ),
                pod: interface.and_then(|i| i.pod.clone()),
                direction: Some(direction_name(v.origin)),
                idle_s: idle_seconds(now_ns, v.last_seen_ns),
                closing: v.closing != 0,
                expired: policy_expired(k, v, now_ns),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.interface, a.source, a.destination).cmp(&(&b.interface, b.source, b.destination))
    });
    rows
}

fn direction_name(direction: u8) -> &'static str {
    if direction == DIRECTION_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// What `sluice ct list` keeps: every given condition must hold.
#[derive(Clone, Debug, Default)]
pub struct ConnectionFilter {
    /// An address anywhere in the entry (source, destination, backend, SNAT).
    pub address: Option<IpAddr>,
    /// A port anywhere in the entry.
    pub port: Option<u16>,
    /// "TCP", "UDP", ... (any case).
    pub protocol: Option<String>,
    /// `namespace/name` (nat), or the pod (policy).
    pub owner: Option<String>,
}

impl ConnectionFilter {
    pub fn keeps(&self, c: &Connection) -> bool {
        let addrs: Vec<SocketAddr> = [Some(c.source), Some(c.destination), c.backend, c.snat]
            .into_iter()
            .flatten()
            .collect();
        self.address
            .is_none_or(|a| addrs.iter().any(|s| s.ip() == a))
            && self
                .port
                .is_none_or(|p| addrs.iter().any(|s| s.port() == p))
            && self
                .protocol
                .as_ref()
                .is_none_or(|p| p.eq_ignore_ascii_case(&c.protocol))
            && self
                .owner
                .as_ref()
                .is_none_or(|o| c.service.as_ref() == Some(o) || c.pod.as_ref() == Some(o))
    }
}

/// One pod interface of `sluice policy list`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PolicyEndpointRow {
    pub ifindex: u32,
    pub interface: Option<String>,
    pub pod: Option<String>,
    pub ingress: PolicyDirectionRow,
    pub egress: PolicyDirectionRow,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PolicyDirectionRow {
    /// Default deny: only what `allow` lists passes (and replies of allowed connections).
    pub isolated: bool,
    /// The policies isolating the pod this way, when the agent's status file says.
    pub isolated_by: Vec<String>,
    pub allow: Vec<AllowRow>,
    /// Packets dropped this way since the programs were attached.
    pub drops: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct AllowRow {
    /// "any", "node" (this node's addresses: always allowed) or the peer's addresses.
    pub peer: String,
    /// None: every protocol.
    pub protocol: Option<String>,
    /// None: every port; "80" or "8000-8063".
    pub ports: Option<String>,
}

/// The policy maps per pod interface, with the names and isolating policies from the
/// agent's status.
pub fn policy_endpoints(
    tables: &PolicyTables,
    drops: &DropCounts,
    status: Option<&AgentStatus>,
) -> Vec<PolicyEndpointRow> {
    let mut class_addresses: BTreeMap<u32, Vec<Ipv4Net>> = BTreeMap::new();
    for (net, class) in &tables.peers {
        class_addresses.entry(*class).or_default().push(*net);
    }
    let peer_name = |class: u32| match class {
        POLICY_CLASS_ANY => "any".to_string(),
        POLICY_CLASS_OWN_NODE => "node".to_string(),
        other => match class_addresses.get(&other) {
            Some(nets) => nets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            None => format!("class {other} (no addresses)"),
        },
    };
    let interfaces = interfaces_of(status);
    let isolated_by = |pod: Option<&str>, field: &str| -> Vec<String> {
        let endpoints = status
            .and_then(|s| s.policy.get("endpoints"))
            .and_then(|e| e.as_array());
        endpoints
            .into_iter()
            .flatten()
            .find(|e| pod.is_some() && e.get("pod").and_then(|p| p.as_str()) == pod)
            .and_then(|e| e.get(field)?.as_array().cloned())
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    };
    tables
        .endpoints
        .iter()
        .map(|(ifindex, endpoint)| {
            let interface = interfaces.get(ifindex);
            let pod = interface.and_then(|i| i.pod.clone());
            let direction = |code: u8, field: &str| {
                let mut allow: Vec<AllowRow> = tables
                    .rules
                    .iter()
                    .filter(|r| r.key.ifindex == *ifindex && r.key.direction == code)
                    .map(|r| AllowRow {
                        peer: peer_name(r.key.class),
                        protocol: (r.prefix_len > RULE_PREFIX_ANY_PROTOCOL)
                            .then(|| protocol_name(r.key.proto)),
                        ports: port_block(r.prefix_len, r.key.port),
                    })
                    .collect();
                allow.sort();
                PolicyDirectionRow {
                    isolated: endpoint.isolated(code),
                    isolated_by: isolated_by(pod.as_deref(), field),
                    allow,
                    drops: drops.get(&(*ifindex, code)).copied().unwrap_or(0),
                }
            };
            PolicyEndpointRow {
                ifindex: *ifindex,
                interface: interface.map(|i| i.name.clone()),
                pod: pod.clone(),
                ingress: direction(DIRECTION_INGRESS, "ingress_isolated_by"),
                egress: direction(DIRECTION_EGRESS, "egress_isolated_by"),
            }
        })
        .collect()
}

/// The ports an allow entry of `prefix_len` bits covers: None for every port.
fn port_block(prefix_len: u32, port: [u8; 2]) -> Option<String> {
    if prefix_len <= RULE_PREFIX_ANY_PORT {
        return None;
    }
    let bits = (prefix_len.min(RULE_PREFIX_FULL) - RULE_PREFIX_ANY_PORT) as u16;
    let port = u16::from_be_bytes(port);
    let free = 16 - bits;
    let first = if free == 16 {
        0
    } else {
        port & !((1u16 << free) - 1)
    };
    let last = if free == 0 {
        first
    } else {
        first | ((1u32 << free) - 1) as u16
    };
    Some(if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    })
}

/// A pinned map's fill, for `sluice status`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MapPressure {
    pub name: String,
    pub kind: &'static str,
    /// None where "entries" means nothing (arrays always hold max_entries; ring buffers).
    pub entries: Option<u64>,
    pub capacity: u32,
    /// entries ÷ capacity, as a percentage.
    pub percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every map pinned in the pin directory `dir`, with its capacity and, for the maps `count`
/// accepts, its entries as the kernel reports them (counting costs a system call per entry).
pub fn map_pressure_in(dir: &Path, count: impl Fn(&str) -> bool) -> Vec<MapPressure> {
    let maps_dir = dir.join(pins::MAPS_DIR);
    pins::list(&maps_dir)
        .into_iter()
        .map(|name| {
            let counted = count(&name);
            map_pressure(&maps_dir.join(&name), name, counted)
        })
        .collect()
}

fn map_pressure(path: &Path, name: String, count: bool) -> MapPressure {
    let mut row = MapPressure {
        name,
        kind: "?",
        entries: None,
        capacity: 0,
        percent: None,
        error: None,
    };
    let result = bpf_sys::obj_get(path).and_then(|fd| {
        let info = bpf_sys::map_info(fd.as_fd())?;
        row.kind = map_kind(info.map_type);
        row.capacity = info.max_entries;
        if count && counts_entries(info.map_type) {
            row.entries = Some(bpf_sys::count_keys(fd.as_fd(), info.key_size)?);
        }
        Ok(())
    });
    if let Err(e) = result {
        row.error = Some(e.to_string());
    }
    row.percent = row
        .entries
        .filter(|_| row.capacity > 0)
        .map(|n| (n as f64 * 1000.0 / f64::from(row.capacity)).round() / 10.0);
    row
}

// BPF map type numbers (uapi bpf.h).
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PERCPU_HASH: u32 = 5;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
const LRU_PERCPU_HASH: u32 = 10;
const LPM_TRIE: u32 = 11;
const RINGBUF: u32 = 27;

fn map_kind(map_type: u32) -> &'static str {
    match map_type {
        HASH => "hash",
        ARRAY => "array",
        PERCPU_HASH => "percpu-hash",
        PERCPU_ARRAY => "percpu-array",
        LRU_HASH => "lru-hash",
        LRU_PERCPU_HASH => "lru-percpu-hash",
        LPM_TRIE => "lpm-trie",
        RINGBUF => "ringbuf",
        _ => "other",
    }
}

fn counts_entries(map_type: u32) -> bool {
    matches!(
        map_type,
        HASH | PERCPU_HASH | LRU_HASH | LRU_PERCPU_HASH | LPM_TRIE
    )
}

/// A pinned link, for `sluice status`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LinkRow {
    pub pin: String,
    /// "socket" (cgroup), "policy" (a pod's interface) or "nodeport" (an uplink).
    pub kind: &'static str,
    pub program: String,
    /// Where it is attached, in words.
    pub attached_to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

fn link_row(path: &Path, pin: String, interfaces: &BTreeMap<u32, &AttachedInterface>) -> LinkRow {
    let parsed = LinkPin::parse(&pin);
    let kind = match parsed {
        Some(LinkPin::Cgroup { .. }) => "socket",
        Some(LinkPin::Policy { .. }) => "policy",
        Some(LinkPin::Nodeport { .. }) => "nodeport",
        None => "unknown",
    };
    let info = bpf_sys::obj_get(path).and_then(|fd| bpf_sys::link_info(fd.as_fd()));
    let (program, attached_to, pod) = match info {
        Err(e) => ("?".into(), format!("unreadable: {e}"), None),
        Ok(info) => {
            // The kernel keeps 15 bytes of a program name; the pin says which one it is.
            let program = match &parsed {
                Some(LinkPin::Cgroup { program }) => program.clone(),
                Some(LinkPin::Policy { ingress, .. }) => if *ingress {
                    proxy_common::PROGRAM_POLICY_FROM_POD
                } else {
                    proxy_common::PROGRAM_POLICY_TO_POD
                }
                .to_string(),
                Some(LinkPin::Nodeport { ingress, .. }) => if *ingress {
                    proxy_common::PROGRAM_NODEPORT_INGRESS
                } else {
                    proxy_common::PROGRAM_NODEPORT_EGRESS
                }
                .to_string(),
                None => bpf_sys::prog_name(info.prog_id).unwrap_or_else(|_| "?".into()),
            };
            match info.target {
                LinkTarget::Cgroup { cgroup_id, .. } => {
                    (program, format!("cgroup id {cgroup_id}"), None)
                }
                LinkTarget::Tcx { ifindex: 0, .. } => {
                    (program, "an interface that is gone".into(), None)
                }
                LinkTarget::Tcx {
                    ifindex,
                    attach_type,
                } => {
                    let interface = interfaces.get(&ifindex);
                    let name = interface.map_or_else(
                        || {
                            pins::interface_name(ifindex)
                                .unwrap_or_else(|| format!("ifindex {ifindex}"))
                        },
                        |i| i.name.clone(),
                    );
                    // BPF_TCX_INGRESS = 46.
                    let way = if attach_type == 46 {
                        "ingress"
                    } else {
                        "egress"
                    };
                    (
                        program,
                        format!("{name} tc {way}"),
                        interface.and_then(|i| i.pod.clone()),
                    )
                }
                LinkTarget::Other { link_type } => {
                    (program, format!("link type {link_type}"), None)
                }
            }
        }
    };
    LinkRow {
        pin,
        kind,
        program,
        attached_to,
        pod,
    }
}

/// `sluice status`: what is attached where, map pressure, the last sync.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub bpffs_dir: PathBuf,
    /// The pid of the agent holding the pin directory; None: no agent runs (the programs
    /// keep serving with the last state).
    pub agent_pid: Option<u32>,
    pub layout_version: Option<u32>,
    pub node: Option<String>,
    pub agent_started_unix_ms: Option<u64>,
    pub last_sync: Option<status_file::LastSync>,
    pub links: Vec<LinkRow>,
    pub maps: Vec<MapPressure>,
}

impl Pinned {
    pub fn status_report(&self) -> StatusReport {
        let layout_version = pins::read_layout(&self.dir);
        StatusReport {
            bpffs_dir: self.dir.clone(),
            agent_pid: self.agent_pid(),
            layout_version,
            node: self.status.as_ref().map(|s| s.node.clone()),
            agent_started_unix_ms: self.status.as_ref().map(|s| s.started_unix_ms),
            last_sync: self.status.as_ref().and_then(|s| s.last_sync.clone()),
            links: self.links(),
            maps: self.map_pressure(),
        }
    }
}

/// A note for the reader when the agent's status file is missing: rows then carry addresses
/// only.
pub fn status_hint(pinned: &Pinned) -> Option<String> {
    pinned.status.is_none().then(|| {
        format!(
            "no status file at {} (sluice-proxy --status-file): showing addresses without Service and pod names",
            pinned.status_file.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Protocol, Scope};
    use crate::sync::{map_addr, source_range_key};
    use proxy_common::{NAT_REPLY, PolicyEndpoint, PolicyRuleKey};

    fn frontend(ip: &str, port: u16, scope: Scope) -> Frontend {
        Frontend {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            scope,
        }
    }

    fn key(f: Frontend, slot: u16) -> ServiceKey {
        ServiceKey::new(
            map_addr(f.ip),
            f.port.to_be(),
            f.protocol.ip_proto(),
            f.scope.map_value(),
            slot,
        )
    }

    fn backend(ip: &str, port: u16, local: bool) -> Backend {
        Backend::new(
            map_addr(ip.parse().unwrap()),
            port.to_be(),
            IPPROTO_TCP,
            if local { BACKEND_FLAG_LOCAL } else { 0 },
        )
    }

    #[test]
    fn frontends_list_their_backends_by_slot_with_states_and_owners() {
        let web = frontend("10.96.0.10", 80, Scope::Socket);
        let lb = frontend("192.0.2.10", 80, Scope::External);
        let empty = frontend("10.96.0.11", 53, Scope::Socket);
        let (range_key, range_len) = source_range_key(lb, "198.51.100.0/24".parse().unwrap());
        let state = ProgrammedState {
            services: vec![
                (key(web, 0), ServiceValue::master(1, 10800, 0)),
                (key(web, 1), ServiceValue::slot(7)),
                // Past the master's count: being removed.
                (key(web, 2), ServiceValue::slot(8)),
                (
                    key(lb, 0),
                    ServiceValue::master(1, 0, SERVICE_FLAG_SOURCE_RANGES),
                ),
                (key(lb, 1), ServiceValue::slot(9)),
                (key(empty, 0), ServiceValue::master(0, 0, 0)),
            ],
            backends: vec![
                (7, backend("10.244.1.5", 8080, true)),
                (8, backend("10.244.2.6", 8080, false)),
            ],
            affinity_matches: vec![],
            source_ranges: vec![(range_key, range_len)],
        };
        let owner = FrontendOwner {
            address: web.ip,
            port: 80,
            protocol: "TCP".into(),
            scope: "socket".into(),
            service: "default/web".into(),
            port_name: "http".into(),
        };
        let owners: BTreeMap<Frontend, &FrontendOwner> = [(web, &owner)].into();
        let rows = lb_frontends(&state, &owners);
        assert_eq!(rows.len(), 3);
        let web_row = rows
            .iter()
            .find(|r| r.port == 80 && r.scope == "socket")
            .unwrap();
        assert_eq!(web_row.service.as_deref(), Some("default/web"));
        assert_eq!(web_row.state, FrontendState::Serving);
        assert_eq!(web_row.affinity_timeout_s, 10800);
        assert_eq!(
            web_row
                .backends
                .iter()
                .map(|b| (b.address.map(|a| a.to_string()), b.local, b.state))
                .collect::<Vec<_>>(),
            [
                (Some("10.244.1.5:8080".into()), true, "active"),
                (Some("10.244.2.6:8080".into()), false, "leaving"),
            ]
        );
        let lb_row = rows.iter().find(|r| r.scope == "external").unwrap();
        assert_eq!(lb_row.service, None, "no owner known");
        assert_eq!(lb_row.backends[0].state, "missing");
        assert_eq!(
            lb_row.source_ranges,
            Some(vec!["198.51.100.0/24".to_string()])
        );
        let empty_row = rows.iter().find(|r| r.port == 53).unwrap();
        assert_eq!(empty_row.state, FrontendState::NoEndpoints);
        assert!(empty_row.backends.is_empty());
    }

    #[test]
    fn nat_entries_become_one_row_per_connection() {
        let client = map_addr("172.18.255.254".parse().unwrap());
        let node = map_addr("172.18.0.2".parse().unwrap());
        let pod = map_addr("10.244.2.5".parse().unwrap());
        let original = NatKey {
            saddr: client,
            daddr: node,
            sport: 40000u16.to_be(),
            dport: 30080u16.to_be(),
            proto: IPPROTO_TCP,
            direction: NAT_ORIGINAL,
            _pad: 0,
        };
        let value = NatValue {
            addr: pod,
            nat_addr: node,
            port: 8080u16.to_be(),
            nat_port: 61001u16.to_be(),
            closing: 0,
            _pad: [0; 3],
            last_seen_ns: 1_000_000_000,
        };
        let reply = NatKey {
            direction: NAT_REPLY,
            ..original
        };
        let rows = nat_connections(
            &[(original, value), (reply, value)],
            &BTreeMap::new(),
            3_500_000_000,
        );
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.source.to_string(), "172.18.255.254:40000");
        assert_eq!(row.destination.to_string(), "172.18.0.2:30080");
        assert_eq!(row.backend.unwrap().to_string(), "10.244.2.5:8080");
        assert_eq!(row.snat.unwrap().to_string(), "172.18.0.2:61001");
        assert_eq!(row.idle_s, 2.5);
        assert!(!row.expired, "TCP lives for hours without packets");
        let filter = ConnectionFilter {
            port: Some(8080),
            protocol: Some("tcp".into()),
            ..Default::default()
        };
        assert!(filter.keeps(row));
        let other = ConnectionFilter {
            address: Some("10.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        assert!(!other.keeps(row));
    }

    #[test]
    fn policy_rules_read_as_peers_protocols_and_port_blocks() {
        let rule =
            |class: u32, proto: u8, port: u16, prefix_len: u32| crate::policy_tables::RuleEntry {
                prefix_len,
                key: PolicyRuleKey {
                    ifindex: 12,
                    class,
                    direction: DIRECTION_INGRESS,
                    proto,
                    port: port.to_be_bytes(),
                },
            };
        let mut tables = PolicyTables::default();
        tables.endpoints.insert(
            12,
            PolicyEndpoint {
                ingress_isolated: 1,
                egress_isolated: 0,
                _pad: 0,
            },
        );
        tables.peers.insert("10.244.1.7/32".parse().unwrap(), 5);
        tables
            .rules
            .insert(rule(5, IPPROTO_TCP, 80, RULE_PREFIX_FULL));
        // 8000-8063: 10 port bits fixed.
        tables
            .rules
            .insert(rule(5, IPPROTO_TCP, 8000, RULE_PREFIX_ANY_PORT + 10));
        tables
            .rules
            .insert(rule(POLICY_CLASS_OWN_NODE, 0, 0, RULE_PREFIX_ANY_PROTOCOL));
        let status = AgentStatus {
            interfaces: vec![AttachedInterface {
                ifindex: 12,
                name: "veth-web".into(),
                role: status_file::InterfaceRole::Pod,
                pod: Some("default/web".into()),
            }],
            policy: serde_json::json!({"endpoints": [
                {"pod": "default/web", "ingress_isolated_by": ["default/allow-client"], "egress_isolated_by": []}
            ]}),
            ..Default::default()
        };
        let drops = [((12, DIRECTION_INGRESS), 4)].into();
        let rows = policy_endpoints(&tables, &drops, Some(&status));
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.pod.as_deref(), Some("default/web"));
        assert!(row.ingress.isolated && !row.egress.isolated);
        assert_eq!(row.ingress.isolated_by, ["default/allow-client"]);
        assert_eq!(row.ingress.drops, 4);
        let allow: Vec<(String, Option<String>, Option<String>)> = row
            .ingress
            .allow
            .iter()
            .map(|a| (a.peer.clone(), a.protocol.clone(), a.ports.clone()))
            .collect();
        assert_eq!(
            allow,
            [
                (
                    "10.244.1.7/32".into(),
                    Some("TCP".into()),
                    Some("80".into())
                ),
                (
                    "10.244.1.7/32".into(),
                    Some("TCP".into()),
                    Some("8000-8063".into())
                ),
                ("node".into(), None, None),
            ]
        );
    }
}
