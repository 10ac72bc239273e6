//! The kernel side: loads the eBPF object, attaches the socket programs to a
//! cgroup, the north–south programs to the node's own interfaces and the policy
//! programs to pod interfaces, and exposes the maps to sync.
//!
//! Everything is pinned in the agent's [`PinDir`] (see `pins.rs` for the layout and the
//! restart sequence): maps whose definitions match are reused with their contents, links
//! stay attached when the process exits, and a new agent swaps its programs into the
//! pinned links atomically ([`Datapath::take_over`]) after its first sync.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap, RingBuf};
use aya::programs::links::FdLink;
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::{IpNet, Ipv4Net};
use proxy_common::{
    Addr, AffinityMatchKey, Backend, DIRECTION_EGRESS, DIRECTION_INGRESS, DropCounterKey,
    MAP_AFFINITY, MAP_AFFINITY_MATCH, MAP_BACKENDS, MAP_EXTERNAL_AFFINITY, MAP_NAT_CONNTRACK,
    MAP_NODE_CONFIG, MAP_POLICY_CONNTRACK, MAP_POLICY_DROP_EVENTS, MAP_POLICY_DROPS,
    MAP_POLICY_ENDPOINTS, MAP_POLICY_PEERS, MAP_POLICY_RULES, MAP_SERVICE_CIDRS,
    MAP_SERVICE_COUNTERS, MAP_SERVICES, MAP_SOCK_REVNAT, MAP_SOURCE_RANGES, NodeConfig,
    PROGRAM_NODEPORT_EGRESS, PROGRAM_NODEPORT_INGRESS, PROGRAM_POLICY_FROM_POD,
    PROGRAM_POLICY_TO_POD, PolicyEndpoint, PolicyRuleKey, ServiceKey, ServiceValue, SourceRangeKey,
};
use std::net::{IpAddr, Ipv4Addr};
use tracing::{info, warn};

use crate::bpf_sys::{self, LinkTarget};
use crate::interfaces::Interface;
use crate::north_south::SnatAddresses;
use crate::pins::{self, LAYOUT_VERSION, LinkPin, PinDir};
use crate::policy_sync::PolicyMaps;
use crate::policy_tables::{PolicyTables, RuleEntry};
use crate::sync::{ProgrammedState, ServiceMaps, map_addr};

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
    /// Per-frontend connection counters (LRU, per-CPU values): one per frontend in use.
    pub service_counters: u32,
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
            service_counters: 16384,
        }
    }
}

/// One program attachment.
enum Held {
    /// Pinned: it outlives this process. `current`: it runs this process's program (false
    /// for a link adopted from the previous agent until [`Datapath::take_over`]).
    Pinned { path: PathBuf, current: bool },
    /// Could not be pinned (a netlink tc filter on kernels without TCX): lives as long as
    /// this process.
    Memory(#[allow(dead_code)] SchedClassifierLink),
}

/// The two directions of a tc program pair on one interface.
#[derive(Default)]
struct LinkPair {
    ingress: Option<Held>,
    egress: Option<Held>,
}

impl LinkPair {
    fn complete(&self) -> bool {
        self.ingress.is_some() && self.egress.is_some()
    }
}

/// What [`Datapath::load`] found in the pin directory.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Maps reused with their contents.
    pub reused_maps: Vec<String>,
    /// Maps created empty, and why.
    pub fresh_maps: Vec<(String, String)>,
    /// Links of the previous agent, kept attached until [`Datapath::take_over`].
    pub adopted_links: Vec<String>,
    /// Pinned links that were removed (their interface is gone, or unknown), in words.
    pub removed_links: Vec<String>,
}

impl LoadReport {
    /// Whether the service and policy maps were reused (so their mirrors must be rebuilt).
    pub fn reused(&self, map: &str) -> bool {
        self.reused_maps.iter().any(|m| m == map)
    }
}

/// The loaded programs and their maps. Dropping it leaves the pinned programs attached
/// (a restart or upgrade drops nothing); `sluice-proxy cleanup` detaches them.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinDir,
    sizes: MapSizes,
    /// The cgroup the socket programs serve.
    cgroup: PathBuf,
    cgroup_links: BTreeMap<String, Held>,
    /// Socket program links of the previous agent on another cgroup (or of a program this
    /// build lacks): detached once ours are attached.
    stale_cgroup_links: Vec<PathBuf>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    affinity_matches: HashMap<MapData, AffinityMatchKey, u8>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    node_config: Array<MapData, NodeConfig>,
    /// North–south program links by interface index.
    nodeport_links: BTreeMap<u32, LinkPair>,
    policy: PolicyMapSet,
    /// Policy program links by interface index (ingress: from the pod, egress: to it).
    policy_links: BTreeMap<u32, LinkPair>,
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
    /// Loads the programs with the maps pinned in `pins` (reused when their definitions
    /// match, fresh otherwise) and adopts the pinned links of a previous agent. Nothing new
    /// is attached to the cgroup until [`Datapath::take_over`].
    pub fn load(sizes: MapSizes, pins: PinDir, cgroup: &Path) -> Result<(Self, LoadReport)> {
        if EBPF_OBJECT.is_empty() {
            bail!(
                "this sluice-proxy was built with AYA_BUILD_SKIP=1 and carries no eBPF programs; rebuild without it"
            );
        }
        // Checked now so a wrong --cgroup fails at start, not after the first sync.
        let dir =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        ensure_cgroup2(&dir, cgroup)?;
        let cgroup_id = pins::cgroup_id(cgroup)?;

        let overrides: BTreeMap<&str, u32> = [
            (MAP_SERVICES, sizes.services),
            (MAP_BACKENDS, sizes.backends),
            (MAP_SOCK_REVNAT, sizes.sock_revnat),
            (MAP_AFFINITY, sizes.affinity),
            // Match entries are bounded by slots: one per backend of a frontend.
            (MAP_AFFINITY_MATCH, sizes.services),
            (MAP_POLICY_CONNTRACK, sizes.policy_conntrack),
            (MAP_POLICY_RULES, sizes.policy_rules),
            (MAP_POLICY_PEERS, sizes.policy_peers),
            (MAP_NAT_CONNTRACK, sizes.nat_conntrack),
            (MAP_SOURCE_RANGES, sizes.source_ranges),
            (MAP_EXTERNAL_AFFINITY, sizes.affinity),
            (MAP_SERVICE_COUNTERS, sizes.service_counters),
        ]
        .into_iter()
        .collect();
        let wanted = pins::object_maps(EBPF_OBJECT, &overrides)?;
        let mut report = LoadReport::default();
        prepare_map_pins(&pins, &wanted, &mut report);

        let mut loader = EbpfLoader::new();
        for (name, size) in &overrides {
            loader.map_max_entries(name, *size);
        }
        for (name, _) in &wanted {
            loader.map_pin_path(name.as_str(), pins.map_path(name));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        pins.set_layout(LAYOUT_VERSION)?;

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
        for name in SOCKET_PROGRAMS {
            socket_program(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading program {name} (verifier)"))?;
        }
        let mut datapath = Self {
            ebpf,
            pins,
            sizes,
            cgroup: cgroup.to_path_buf(),
            cgroup_links: BTreeMap::new(),
            stale_cgroup_links: Vec::new(),
            services,
            backends,
            affinity_matches,
            source_ranges,
            node_config,
            nodeport_links: BTreeMap::new(),
            policy,
            policy_links: BTreeMap::new(),
            drop_events,
        };
        datapath.adopt_links(cgroup_id, &mut report);
        Ok((datapath, report))
    }

    /// Takes the pinned links of the previous agent: kept attached (running its programs,
    /// on the maps reused above) until [`Datapath::take_over`]. Links whose interface went
    /// away are removed.
    fn adopt_links(&mut self, cgroup_id: u64, report: &mut LoadReport) {
        let (known, unknown) = self.pins.pinned_links();
        for path in unknown {
            report.removed_links.push(pins::describe_link(&path));
            let _ = pins::detach_pinned(&path);
        }
        for (pin, path) in known {
            let target = bpf_sys::obj_get(&path)
                .and_then(|fd| bpf_sys::link_info(fd.as_fd()))
                .map(|info| info.target);
            let adopted = Held::Pinned {
                path: path.clone(),
                current: false,
            };
            match (&pin, target) {
                (LinkPin::Cgroup { program }, Ok(LinkTarget::Cgroup { cgroup_id: id, .. }))
                    if id == cgroup_id && SOCKET_PROGRAMS.contains(&program.as_str()) =>
                {
                    self.cgroup_links.insert(program.clone(), adopted);
                }
                (LinkPin::Cgroup { .. }, _) => self.stale_cgroup_links.push(path.clone()),
                (
                    LinkPin::Policy { ifindex, ingress } | LinkPin::Nodeport { ifindex, ingress },
                    Ok(LinkTarget::Tcx { ifindex: i, .. }),
                ) if i == *ifindex => {
                    let links = if matches!(pin, LinkPin::Policy { .. }) {
                        &mut self.policy_links
                    } else {
                        &mut self.nodeport_links
                    };
                    let pair = links.entry(*ifindex).or_default();
                    if *ingress {
                        pair.ingress = Some(adopted);
                    } else {
                        pair.egress = Some(adopted);
                    }
                }
                _ => {
                    report.removed_links.push(pins::describe_link(&path));
                    let _ = pins::detach_pinned(&path);
                    continue;
                }
            }
            report.adopted_links.push(pins::describe_link(&path));
        }
    }

    /// After the first sync: attaches the socket programs to the cgroup, and swaps this
    /// process's programs into every link adopted from the previous agent. The swap is
    /// BPF_LINK_UPDATE: atomic, so the hook never runs two programs (no double translation)
    /// nor none. Returns what it did, in words.
    pub fn take_over(&mut self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for name in SOCKET_PROGRAMS {
            let pin = LinkPin::Cgroup {
                program: name.to_string(),
            };
            match self.cgroup_links.get(name) {
                Some(Held::Pinned { current: true, .. } | Held::Memory(_)) => continue,
                Some(Held::Pinned {
                    path,
                    current: false,
                }) => {
                    let path = path.clone();
                    let program = socket_program(&mut self.ebpf, name)?;
                    let updated = bpf_sys::obj_get(&path).and_then(|link| {
                        bpf_sys::link_update(
                            link.as_fd(),
                            program.fd().map_err(std::io::Error::other)?.as_fd(),
                        )
                    });
                    match updated {
                        Ok(()) => {
                            done.push(format!("replaced {name} on {}", self.cgroup.display()))
                        }
                        Err(e) => {
                            // Attach ours first, then let the old one go: a moment with two
                            // programs, each translating only service addresses, so the
                            // second never sees one.
                            warn!(
                                event = "link_update_failed",
                                program = name,
                                "updating the pinned link of {name}: {e}; attaching anew"
                            );
                            let tmp = path.with_extension("new");
                            self.attach_socket_program(name, &tmp)?;
                            pins::detach_pinned(&path)
                                .with_context(|| format!("removing {}", path.display()))?;
                            std::fs::rename(&tmp, &path)
                                .with_context(|| format!("renaming {}", tmp.display()))?;
                            done.push(format!("re-attached {name} to {}", self.cgroup.display()));
                        }
                    }
                }
                None => {
                    let path = self.pins.link_path(&pin);
                    self.attach_socket_program(name, &path)?;
                    done.push(format!("attached {name} to {}", self.cgroup.display()));
                }
            }
            self.cgroup_links.insert(
                name.to_string(),
                Held::Pinned {
                    path: self.pins.link_path(&pin),
                    current: true,
                },
            );
        }
        for path in std::mem::take(&mut self.stale_cgroup_links) {
            done.push(format!("detached {}", pins::describe_link(&path)));
            let _ = pins::detach_pinned(&path);
        }
        for policy in [true, false] {
            let (ingress_name, egress_name) = if policy {
                (PROGRAM_POLICY_FROM_POD, PROGRAM_POLICY_TO_POD)
            } else {
                (PROGRAM_NODEPORT_INGRESS, PROGRAM_NODEPORT_EGRESS)
            };
            let ifindexes: Vec<u32> = if policy {
                self.policy_links.keys().copied().collect()
            } else {
                self.nodeport_links.keys().copied().collect()
            };
            for ifindex in ifindexes {
                for ingress in [true, false] {
                    let name = if ingress { ingress_name } else { egress_name };
                    let links = if policy {
                        &mut self.policy_links
                    } else {
                        &mut self.nodeport_links
                    };
                    let Some(pair) = links.get_mut(&ifindex) else {
                        continue;
                    };
                    let half = if ingress {
                        &mut pair.ingress
                    } else {
                        &mut pair.egress
                    };
                    let Some(Held::Pinned {
                        path,
                        current: current @ false,
                    }) = half
                    else {
                        continue;
                    };
                    let program = classifier(&mut self.ebpf, name)?;
                    let updated = bpf_sys::obj_get(path).and_then(|link| {
                        bpf_sys::link_update(
                            link.as_fd(),
                            program.fd().map_err(std::io::Error::other)?.as_fd(),
                        )
                    });
                    match updated {
                        Ok(()) => {
                            *current = true;
                            done.push(format!("replaced {name} on ifindex {ifindex}"));
                        }
                        Err(e) => {
                            // The interface may be gone meanwhile; the next sync re-attaches
                            // what is still wanted.
                            warn!(
                                event = "link_update_failed",
                                program = name,
                                ifindex,
                                "updating the pinned link of {name} at ifindex {ifindex}: {e}; detaching it"
                            );
                            let _ = pins::detach_pinned(path);
                            *half = None;
                        }
                    }
                }
            }
        }
        Ok(done)
    }

    /// Attaches socket program `name` to the cgroup and pins its link at `path`.
    fn attach_socket_program(&mut self, name: &str, path: &Path) -> Result<()> {
        let dir = File::open(&self.cgroup)
            .with_context(|| format!("opening cgroup {}", self.cgroup.display()))?;
        let program = socket_program(&mut self.ebpf, name)?;
        // aya attaches through a bpf link, which always coexists with
        // other programs on the cgroup; link_create rejects the
        // AllowMultiple flag (EINVAL), so pass the default mode.
        let id = program
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", self.cgroup.display()))?;
        let link: FdLink = program
            .take_link(id)?
            .try_into()
            .with_context(|| format!("{name}: the kernel gave no bpf link to pin"))?;
        let _ = std::fs::remove_file(path);
        link.pin(path)
            .with_context(|| format!("pinning the link of {name} at {}", path.display()))?;
        Ok(())
    }

    /// What the service maps hold (after adopting pinned maps), for [`crate::sync::Syncer::adopt`].
    /// Entries that cannot be read are counted in the second value.
    pub fn read_services(&self) -> (ProgrammedState, usize) {
        read_service_maps(
            &self.services,
            &self.backends,
            &self.affinity_matches,
            &self.source_ranges,
        )
    }

    /// What the policy maps hold, for [`crate::enforcement::Enforcement::adopt`]; entries
    /// that cannot be read or decoded are counted in the second value.
    pub fn read_policy(&self) -> (PolicyTables, usize) {
        self.policy.read()
    }

    /// Attaches the policy programs to a pod's host-side interface (both
    /// directions). A no-op if they are attached already.
    pub fn attach_policy(&mut self, interface: &Interface) -> Result<()> {
        if self
            .policy_links
            .get(&interface.index)
            .is_some_and(LinkPair::complete)
        {
            return Ok(());
        }
        let mut pair = self
            .policy_links
            .remove(&interface.index)
            .unwrap_or_default();
        let result = self.attach_pair(interface, true, &mut pair);
        self.policy_links.insert(interface.index, pair);
        result
    }

    /// Attaches the north–south programs to one of the node's own interfaces
    /// (where traffic from outside arrives). A no-op if they are attached already.
    pub fn attach_nodeport(&mut self, interface: &Interface) -> Result<()> {
        if self
            .nodeport_links
            .get(&interface.index)
            .is_some_and(LinkPair::complete)
        {
            return Ok(());
        }
        let mut pair = self
            .nodeport_links
            .remove(&interface.index)
            .unwrap_or_default();
        let result = self.attach_pair(interface, false, &mut pair);
        self.nodeport_links.insert(interface.index, pair);
        result
    }

    /// The connection tracking and counter maps, opened anew from their pins for the
    /// thread that walks them ([`crate::conntrack`]).
    pub fn stats_maps(&self) -> Result<crate::conntrack::StatsMaps> {
        crate::conntrack::open(
            |name| self.pins.map_path(name),
            self.sizes.nat_conntrack,
            self.sizes.policy_conntrack,
        )
    }

    /// Interfaces the north–south programs are attached to.
    pub fn nodeport_interfaces(&self) -> Vec<u32> {
        self.nodeport_links.keys().copied().collect()
    }

    /// Detaches the north–south programs from an interface.
    pub fn detach_nodeport(&mut self, ifindex: u32) {
        if let Some(pair) = self.nodeport_links.remove(&ifindex) {
            release(pair);
        }
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

    /// Attaches the missing halves of a tc program pair (policy or north–south) to
    /// `interface` and pins them.
    fn attach_pair(
        &mut self,
        interface: &Interface,
        policy: bool,
        pair: &mut LinkPair,
    ) -> Result<()> {
        let (ingress, egress) = if policy {
            (PROGRAM_POLICY_FROM_POD, PROGRAM_POLICY_TO_POD)
        } else {
            (PROGRAM_NODEPORT_INGRESS, PROGRAM_NODEPORT_EGRESS)
        };
        for (name, point, half) in [
            (ingress, TcAttachType::Ingress, &mut pair.ingress),
            (egress, TcAttachType::Egress, &mut pair.egress),
        ] {
            if half.is_some() {
                continue;
            }
            let pin = if policy {
                LinkPin::Policy {
                    ifindex: interface.index,
                    ingress: point == TcAttachType::Ingress,
                }
            } else {
                LinkPin::Nodeport {
                    ifindex: interface.index,
                    ingress: point == TcAttachType::Ingress,
                }
            };
            let path = self.pins.link_path(&pin);
            let program = classifier(&mut self.ebpf, name)?;
            let id = program
                .attach(&interface.name, point)
                .with_context(|| format!("attaching {name} to {}", interface.name))?;
            let link = program.take_link(id)?;
            if <&FdLink>::try_from(&link).is_err() {
                // A netlink filter (no TCX in this kernel): it cannot be pinned.
                *half = Some(Held::Memory(link));
                continue;
            }
            let link: FdLink = link.try_into()?;
            let _ = std::fs::remove_file(&path);
            link.pin(&path)
                .with_context(|| format!("pinning the link of {name} at {}", path.display()))?;
            *half = Some(Held::Pinned {
                path,
                current: true,
            });
        }
        Ok(())
    }

    /// Interfaces the policy programs are attached to.
    pub fn policy_interfaces(&self) -> Vec<u32> {
        self.policy_links.keys().copied().collect()
    }

    /// Detaches the policy programs from an interface (gone or no longer a
    /// pod's) and forgets its drop counters.
    pub fn detach_policy(&mut self, ifindex: u32) {
        // An interface already deleted took its attachments with it.
        if let Some(pair) = self.policy_links.remove(&ifindex) {
            release(pair);
        }
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
        self.policy.drop_count(ifindex, direction)
    }

    /// Replaces the set of service CIDRs (addresses there with no Service are refused):
    /// adds the new ones, then removes what an adopted map holds beyond them.
    pub fn set_service_cidrs(&mut self, cidrs: &[IpNet]) -> Result<()> {
        let mut trie: LpmTrie<&mut MapData, Addr, u8> = LpmTrie::try_from(
            self.ebpf
                .map_mut(MAP_SERVICE_CIDRS)
                .context("map SERVICE_CIDRS missing")?,
        )?;
        let mut wanted = Vec::new();
        for cidr in cidrs {
            // IPv4 ones as IPv4-mapped: 96 bits of prefix before theirs.
            let (addr, len) = match cidr {
                IpNet::V4(v4) => (IpAddr::V4(v4.network()), 96 + u32::from(v4.prefix_len())),
                IpNet::V6(v6) => (IpAddr::V6(v6.network()), u32::from(v6.prefix_len())),
            };
            let key = LpmKey::new(len, map_addr(addr));
            trie.insert(&key, 1, 0)
                .with_context(|| format!("adding service CIDR {cidr}"))?;
            wanted.push((key.prefix_len(), key.data()));
        }
        let stale: Vec<LpmKey<Addr>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for key in stale {
            ignore_missing(trie.remove(&key)).context("removing a stale service CIDR")?;
        }
        Ok(())
    }
}

/// The entries an iteration over a map yields, counting the ones that fail.
fn collect_ok<T>(iter: impl Iterator<Item = Result<T, MapError>>, errors: &mut usize) -> Vec<T> {
    let mut out = Vec::new();
    for item in iter {
        match item {
            Ok(v) => out.push(v),
            Err(_) => *errors += 1,
        }
    }
    out
}

/// What the service maps hold; entries that cannot be read are counted in the second value.
pub fn read_service_maps(
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
    backends: &HashMap<MapData, u32, Backend>,
    affinity_matches: &HashMap<MapData, AffinityMatchKey, u8>,
    source_ranges: &LpmTrie<MapData, SourceRangeKey, u8>,
) -> (ProgrammedState, usize) {
    let mut errors = 0;
    let services = collect_ok(services.iter(), &mut errors);
    let backends = collect_ok(backends.iter(), &mut errors);
    let affinity_matches = collect_ok(affinity_matches.keys(), &mut errors);
    let source_ranges = collect_ok(source_ranges.keys(), &mut errors)
        .into_iter()
        .map(|k: LpmKey<SourceRangeKey>| (k.data(), k.prefix_len()))
        .collect();
    (
        ProgrammedState {
            services,
            backends,
            affinity_matches,
            source_ranges,
        },
        errors,
    )
}

impl PolicyMapSet {
    /// The policy maps pinned in an agent's pin directory (for `sluice policy list`).
    pub fn open_pinned(pins: &Path) -> Result<Self> {
        Ok(Self {
            endpoints: open_pinned(pins, MAP_POLICY_ENDPOINTS)?,
            peers: open_pinned(pins, MAP_POLICY_PEERS)?,
            rules: open_pinned(pins, MAP_POLICY_RULES)?,
            drops: open_pinned(pins, MAP_POLICY_DROPS)?,
        })
    }

    /// What the maps hold; entries that cannot be read or decoded are counted in the second
    /// value.
    pub fn read(&self) -> (PolicyTables, usize) {
        let mut errors = 0;
        let mut tables = PolicyTables::default();
        for entry in self.endpoints.iter() {
            match entry {
                Ok((ifindex, value)) => {
                    tables.endpoints.insert(ifindex, value);
                }
                Err(_) => errors += 1,
            }
        }
        for entry in self.peers.iter() {
            let prefix = entry.ok().and_then(|(key, class)| {
                let len = u8::try_from(key.prefix_len()).ok().filter(|l| *l <= 32)?;
                let net = Ipv4Net::new(Ipv4Addr::from(u32::from_be(key.data())), len).ok()?;
                Some((net.trunc(), class))
            });
            match prefix {
                Some((net, class)) => {
                    tables.peers.insert(net, class);
                }
                None => errors += 1,
            }
        }
        for entry in self.rules.keys() {
            match entry {
                Ok(key) => {
                    tables.rules.insert(RuleEntry {
                        prefix_len: key.prefix_len(),
                        key: key.data(),
                    });
                }
                Err(_) => errors += 1,
            }
        }
        (tables, errors)
    }

    /// Drops so far at an interface in a direction, summed over CPUs.
    pub fn drop_count(&self, ifindex: u32, direction: u8) -> u64 {
        let key = DropCounterKey {
            ifindex,
            direction,
            _pad: [0; 3],
        };
        self.drops
            .get(&key, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

/// A map pinned as `<pins>/maps/<name>`, typed (the type, key and value sizes must match).
pub fn open_pinned<T>(pins: &Path, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let path = pins.join(pins::MAPS_DIR).join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = aya::maps::Map::from_map_data(data)
        .with_context(|| format!("{}: unknown map type", path.display()))?;
    T::try_from(map).with_context(|| format!("{}: not the map this sluice knows", path.display()))
}

/// Drops a tc program pair: pinned halves are detached and unpinned.
fn release(pair: LinkPair) {
    for held in [pair.ingress, pair.egress].into_iter().flatten() {
        if let Held::Pinned { path, .. } = held
            && let Err(e) = pins::detach_pinned(&path)
        {
            warn!(event = "unpin_failed", "removing {}: {e}", path.display());
        }
    }
}

/// Removes map pins that cannot be reused, so the loader creates those maps afresh: all of
/// them when the recorded layout version differs, else each whose definition differs.
/// Programs of the previous agent still hold the old maps and keep serving from them until
/// [`Datapath::take_over`].
fn prepare_map_pins(pins: &PinDir, wanted: &[(String, pins::MapDef)], report: &mut LoadReport) {
    let pinned = pins.pinned_maps();
    let layout = pins.layout();
    let layout_ok = layout == Some(LAYOUT_VERSION);
    for name in &pinned {
        let path = pins.map_path(name);
        let why = match wanted.iter().find(|(n, _)| n == name) {
            None => Some("this agent has no such map".to_string()),
            Some(_) if !layout_ok => Some(match layout {
                Some(v) => {
                    format!("pinned with layout version {v}, this agent uses {LAYOUT_VERSION}")
                }
                None => "pinned without a layout version".to_string(),
            }),
            Some((_, want)) => match pins::pinned_def(&path) {
                Err(e) => Some(format!("unreadable: {e}")),
                // The kernel keeps the first 15 bytes of a name.
                Ok((_, kernel_name))
                    if !name.starts_with(&kernel_name) || kernel_name.is_empty() =>
                {
                    Some(format!("a foreign map named {kernel_name:?}"))
                }
                Ok((have, _)) => pins::incompatibility(want, &have),
            },
        };
        match why {
            None => report.reused_maps.push(name.clone()),
            Some(why) => {
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(event = "unpin_failed", "removing {}: {e}", path.display());
                }
                if wanted.iter().any(|(n, _)| n == name) {
                    report.fresh_maps.push((name.clone(), why));
                } else {
                    info!(event = "map_unpinned", map = %name, "removed pinned map {name}: {why}");
                }
            }
        }
    }
    for (name, _) in wanted {
        if !pinned.contains(name) {
            report
                .fresh_maps
                .push((name.clone(), "none pinned".to_string()));
        }
    }
}

fn socket_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a cgroup sock_addr program"))
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
