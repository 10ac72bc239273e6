//! The kernel side: loads the eBPF object, attaches the socket programs to a
//! cgroup, the north–south programs to the node's own interfaces and the policy
//! programs to pod interfaces, and exposes the maps to sync.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap, RingBuf};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::{IpNet, Ipv4Net};
use proxy_common::{
    Addr, AffinityMatchKey, Backend, DIRECTION_EGRESS, DIRECTION_INGRESS, DropCounterKey,
    MAP_AFFINITY, MAP_AFFINITY_MATCH, MAP_BACKENDS, MAP_EXTERNAL_AFFINITY, MAP_NAT_CONNTRACK,
    MAP_NODE_CONFIG, MAP_POLICY_CONNTRACK, MAP_POLICY_DROP_EVENTS, MAP_POLICY_DROPS,
    MAP_POLICY_ENDPOINTS, MAP_POLICY_PEERS, MAP_POLICY_RULES, MAP_SERVICE_CIDRS, MAP_SERVICES,
    MAP_SOCK_REVNAT, MAP_SOURCE_RANGES, NodeConfig, PROGRAM_NODEPORT_EGRESS,
    PROGRAM_NODEPORT_INGRESS, PROGRAM_POLICY_FROM_POD, PROGRAM_POLICY_TO_POD, PolicyEndpoint,
    PolicyRuleKey, ServiceKey, ServiceValue, SourceRangeKey,
};
use std::net::IpAddr;

use crate::interfaces::Interface;
use crate::north_south::SnatAddresses;
use crate::policy_sync::PolicyMaps;
use crate::policy_tables::RuleEntry;
use crate::sync::{ServiceMaps, map_addr};

/// The eBPF object built by build.rs from the proxy-ebpf crate.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-proxy-ebpf"));

/// The socket programs, in attach order: the reverse translations first, so no
/// translated socket ever shows the backend.
const SOCKET_PROGRAMS: [&str; 8] = [
    "sluice_recvmsg4",
    "sluice_getpeername4",
    "sluice_recvmsg6",
    "sluice_getpeername6",
    "sluice_sendmsg4",
    "sluice_connect4",
    "sluice_sendmsg6",
    "sluice_connect6",
];

/// Map sizes; a setting because clusters differ by orders of magnitude.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Entries in the service map: one per frontend plus one per backend slot.
    pub services: u32,
    pub backends: u32,
    pub sock_revnat: u32,
    /// Session affinity entries (LRU): one per (client pod, sticky frontend).
    pub affinity: u32,
    /// Policy connection tracking entries (LRU): one per connection of a local pod.
    pub policy_conntrack: u32,
    /// Policy allow entries (one per pod, direction, peer class and port block).
    pub policy_rules: u32,
    /// Policy address prefixes (pod and node addresses, ipBlocks).
    pub policy_peers: u32,
    /// Translated connections from outside the node (LRU): two entries per connection.
    pub nat_conntrack: u32,
    /// `loadBalancerSourceRanges` entries: one per LoadBalancer frontend and range.
    pub source_ranges: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: 65536,
            backends: 65536,
            sock_revnat: 262144,
            affinity: 65536,
            policy_conntrack: 262144,
            policy_rules: 262144,
            policy_peers: 65536,
            nat_conntrack: 262144,
            source_ranges: 4096,
        }
    }
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Datapath {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    affinity_matches: HashMap<MapData, AffinityMatchKey, u8>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    node_config: Array<MapData, NodeConfig>,
    /// North–south program links by interface index: (ingress, egress).
    nodeport_links: BTreeMap<u32, (SchedClassifierLink, SchedClassifierLink)>,
    policy: PolicyMapSet,
    /// Policy program links by interface index: (from the pod, to the pod).
    policy_links: BTreeMap<u32, (SchedClassifierLink, SchedClassifierLink)>,
    drop_events: Option<RingBuf<MapData>>,
}

/// The maps policy sync writes, and the drop counters.
pub struct PolicyMapSet {
    endpoints: HashMap<MapData, u32, PolicyEndpoint>,
    peers: LpmTrie<MapData, u32, u32>,
    rules: LpmTrie<MapData, PolicyRuleKey, u8>,
    drops: PerCpuHashMap<MapData, DropCounterKey, u64>,
}

impl Datapath {
    pub fn load(sizes: MapSizes) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!(
                "this sluice-proxy was built with AYA_BUILD_SKIP=1 and carries no eBPF programs; rebuild without it"
            );
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_SERVICES, sizes.services)
            .map_max_entries(MAP_BACKENDS, sizes.backends)
            .map_max_entries(MAP_SOCK_REVNAT, sizes.sock_revnat)
            .map_max_entries(MAP_AFFINITY, sizes.affinity)
            // Match entries are bounded by slots: one per backend of a frontend.
            .map_max_entries(MAP_AFFINITY_MATCH, sizes.services)
            .map_max_entries(MAP_POLICY_CONNTRACK, sizes.policy_conntrack)
            .map_max_entries(MAP_POLICY_RULES, sizes.policy_rules)
            .map_max_entries(MAP_POLICY_PEERS, sizes.policy_peers)
            .map_max_entries(MAP_NAT_CONNTRACK, sizes.nat_conntrack)
            .map_max_entries(MAP_SOURCE_RANGES, sizes.source_ranges)
            .map_max_entries(MAP_EXTERNAL_AFFINITY, sizes.affinity)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let services = take_map(&mut ebpf, MAP_SERVICES)?;
        let backends = take_map(&mut ebpf, MAP_BACKENDS)?;
        let affinity_matches = take_map(&mut ebpf, MAP_AFFINITY_MATCH)?;
        let source_ranges = take_typed(&mut ebpf, MAP_SOURCE_RANGES)?;
        let node_config = take_typed(&mut ebpf, MAP_NODE_CONFIG)?;
        let policy = PolicyMapSet {
            endpoints: take_map(&mut ebpf, MAP_POLICY_ENDPOINTS)?,
            peers: take_typed(&mut ebpf, MAP_POLICY_PEERS)?,
            rules: take_typed(&mut ebpf, MAP_POLICY_RULES)?,
            drops: take_typed(&mut ebpf, MAP_POLICY_DROPS)?,
        };
        let drop_events = Some(take_typed(&mut ebpf, MAP_POLICY_DROP_EVENTS)?);
        // Loaded (verified) now, so a kernel that rejects them fails at start.
        for name in [
            PROGRAM_POLICY_FROM_POD,
            PROGRAM_POLICY_TO_POD,
            PROGRAM_NODEPORT_INGRESS,
            PROGRAM_NODEPORT_EGRESS,
        ] {
            classifier(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading program {name} (verifier)"))?;
        }
        Ok(Self {
            ebpf,
            services,
            backends,
            affinity_matches,
            source_ranges,
            node_config,
            nodeport_links: BTreeMap::new(),
            policy,
            policy_links: BTreeMap::new(),
            drop_events,
        })
    }

    /// Attaches the policy programs to a pod's host-side interface (both
    /// directions). A no-op if they are attached already.
    pub fn attach_policy(&mut self, interface: &Interface) -> Result<()> {
        if self.policy_links.contains_key(&interface.index) {
            return Ok(());
        }
        let links = self.attach_pair(interface, PROGRAM_POLICY_FROM_POD, PROGRAM_POLICY_TO_POD)?;
        self.policy_links.insert(interface.index, links);
        Ok(())
    }

    /// Attaches the north–south programs to one of the node's own interfaces
    /// (where traffic from outside arrives). A no-op if they are attached already.
    pub fn attach_nodeport(&mut self, interface: &Interface) -> Result<()> {
        if self.nodeport_links.contains_key(&interface.index) {
            return Ok(());
        }
        let links =
            self.attach_pair(interface, PROGRAM_NODEPORT_INGRESS, PROGRAM_NODEPORT_EGRESS)?;
        self.nodeport_links.insert(interface.index, links);
        Ok(())
    }

    /// Interfaces the north–south programs are attached to.
    pub fn nodeport_interfaces(&self) -> Vec<u32> {
        self.nodeport_links.keys().copied().collect()
    }

    /// Detaches the north–south programs from an interface.
    pub fn detach_nodeport(&mut self, ifindex: u32) {
        self.nodeport_links.remove(&ifindex);
    }

    /// The addresses remote backends see as the source of translated outside traffic; a
    /// family without one drops outside traffic bound for remote backends.
    pub fn set_snat_addresses(&mut self, snat: SnatAddresses) -> Result<()> {
        let config = NodeConfig {
            snat_addr4: snat.v4.map_or([0; 4], |ip| map_addr(IpAddr::V4(ip))),
            snat_addr6: snat.v6.map_or([0; 4], |ip| map_addr(IpAddr::V6(ip))),
        };
        self.node_config
            .set(0, config, 0)
            .with_context(|| format!("setting the SNAT addresses {snat:?}"))
    }

    /// Attaches tc programs `ingress` and `egress` to `interface`.
    fn attach_pair(
        &mut self,
        interface: &Interface,
        ingress: &str,
        egress: &str,
    ) -> Result<(SchedClassifierLink, SchedClassifierLink)> {
        let mut attach = |name: &str, point: TcAttachType| -> Result<SchedClassifierLink> {
            let program = classifier(&mut self.ebpf, name)?;
            let id = program
                .attach(&interface.name, point)
                .with_context(|| format!("attaching {name} to {}", interface.name))?;
            Ok(program.take_link(id)?)
        };
        let first = attach(ingress, TcAttachType::Ingress)?;
        let second = attach(egress, TcAttachType::Egress)?;
        Ok((first, second))
    }

    /// Interfaces the policy programs are attached to.
    pub fn policy_interfaces(&self) -> Vec<u32> {
        self.policy_links.keys().copied().collect()
    }

    /// Detaches the policy programs from an interface (gone or no longer a
    /// pod's) and forgets its drop counters.
    pub fn detach_policy(&mut self, ifindex: u32) {
        // Dropping the links detaches them; an interface already deleted took
        // its attachments with it.
        self.policy_links.remove(&ifindex);
        for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
            let _ = self.policy.drops.remove(&DropCounterKey {
                ifindex,
                direction,
                _pad: [0; 3],
            });
        }
    }

    /// The maps policy sync writes.
    pub fn policy_maps(&mut self) -> &mut PolicyMapSet {
        &mut self.policy
    }

    /// The ring buffer of sampled drops (once: its reader owns it).
    pub fn take_drop_events(&mut self) -> Option<RingBuf<MapData>> {
        self.drop_events.take()
    }

    /// Drops so far at an interface in a direction, summed over CPUs.
    pub fn drop_count(&self, ifindex: u32, direction: u8) -> u64 {
        let key = DropCounterKey {
            ifindex,
            direction,
            _pad: [0; 3],
        };
        self.policy
            .drops
            .get(&key, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Attaches the socket programs to `cgroup`: every process in it and in
    /// the cgroups below it gets service translation.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let dir =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        ensure_cgroup2(&dir, cgroup)?;
        for name in SOCKET_PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
            program
                .load()
                .with_context(|| format!("loading program {name} (verifier)"))?;
            // aya attaches through a bpf link, which always coexists with
            // other programs on the cgroup; link_create rejects the
            // AllowMultiple flag (EINVAL), so pass the default mode.
            program
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        }
        Ok(())
    }

    /// Replaces the set of service CIDRs (addresses there with no Service are refused).
    pub fn set_service_cidrs(&mut self, cidrs: &[IpNet]) -> Result<()> {
        let mut trie: LpmTrie<&mut MapData, Addr, u8> = LpmTrie::try_from(
            self.ebpf
                .map_mut(MAP_SERVICE_CIDRS)
                .context("map SERVICE_CIDRS missing")?,
        )?;
        for cidr in cidrs {
            // IPv4 ones as IPv4-mapped: 96 bits of prefix before theirs.
            let (addr, len) = match cidr {
                IpNet::V4(v4) => (IpAddr::V4(v4.network()), 96 + u32::from(v4.prefix_len())),
                IpNet::V6(v6) => (IpAddr::V6(v6.network()), u32::from(v6.prefix_len())),
            };
            trie.insert(&LpmKey::new(len, map_addr(addr)), 1, 0)
                .with_context(|| format!("adding service CIDR {cidr}"))?;
        }
        Ok(())
    }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a tc classifier"))
}

fn take_typed<M>(ebpf: &mut Ebpf, name: &str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    M::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    HashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl ServiceMaps for Datapath {
    type Error = MapError;

    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.backends.insert(id, backend, 0)
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        ignore_missing(self.backends.remove(&id))
    }

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services.insert(key, value, 0)
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        ignore_missing(self.services.remove(&key))
    }

    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), MapError> {
        self.affinity_matches.insert(key, 1, 0)
    }

    fn delete_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), MapError> {
        ignore_missing(self.affinity_matches.remove(&key))
    }

    fn put_source_range(&mut self, key: SourceRangeKey, prefix_len: u32) -> Result<(), MapError> {
        self.source_ranges
            .insert(&LpmKey::new(prefix_len, key), 1, 0)
    }

    fn delete_source_range(
        &mut self,
        key: SourceRangeKey,
        prefix_len: u32,
    ) -> Result<(), MapError> {
        ignore_missing(self.source_ranges.remove(&LpmKey::new(prefix_len, key)))
    }
}

/// Deleting what is already gone is success: the goal state holds.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl PolicyMaps for PolicyMapSet {
    type Error = MapError;

    fn put_rule(&mut self, rule: RuleEntry) -> Result<(), MapError> {
        self.rules
            .insert(&LpmKey::new(rule.prefix_len, rule.key), 1, 0)
    }

    fn delete_rule(&mut self, rule: RuleEntry) -> Result<(), MapError> {
        ignore_missing(self.rules.remove(&LpmKey::new(rule.prefix_len, rule.key)))
    }

    fn put_peer(&mut self, prefix: Ipv4Net, class: u32) -> Result<(), MapError> {
        self.peers.insert(&ipv4_key(prefix), class, 0)
    }

    fn delete_peer(&mut self, prefix: Ipv4Net) -> Result<(), MapError> {
        ignore_missing(self.peers.remove(&ipv4_key(prefix)))
    }

    fn put_endpoint(&mut self, ifindex: u32, value: PolicyEndpoint) -> Result<(), MapError> {
        self.endpoints.insert(ifindex, value, 0)
    }

    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), MapError> {
        ignore_missing(self.endpoints.remove(&ifindex))
    }
}

/// An LPM key for an IPv4 prefix: the address in network byte order.
fn ipv4_key(prefix: Ipv4Net) -> LpmKey<u32> {
    LpmKey::new(
        u32::from(prefix.prefix_len()),
        u32::from(prefix.network()).to_be(),
    )
}

/// The socket programs attach only to a cgroup v2 directory; say so plainly
/// instead of the kernel's "bad file descriptor".
fn ensure_cgroup2(dir: &File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs on an open fd, writing into a zeroed statfs we own.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("checking cgroup {}", path.display()));
    }
    if stat.f_type != libc::CGROUP2_SUPER_MAGIC {
        anyhow::bail!(
            "--cgroup {} is not a cgroup v2 directory (mount cgroup2, e.g. at /sys/fs/cgroup, and give a directory in it)",
            path.display()
        );
    }
    Ok(())
}
