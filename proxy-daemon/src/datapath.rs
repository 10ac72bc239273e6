//! The kernel side: loads the eBPF object, attaches the socket programs to a
//! cgroup, and exposes the maps to sync.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData, MapError};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use ipnet::Ipv4Net;
use proxy_common::{
    AffinityMatchKey, Backend, MAP_AFFINITY, MAP_AFFINITY_MATCH, MAP_BACKENDS, MAP_SERVICE_CIDRS,
    MAP_SERVICES, MAP_SOCK_REVNAT, ServiceKey, ServiceValue,
};

use crate::sync::ServiceMaps;

/// The eBPF object built by build.rs from the proxy-ebpf crate.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-proxy-ebpf"));

/// The socket programs, in attach order.
const SOCKET_PROGRAMS: [&str; 4] = [
    "sluice_recvmsg4",
    "sluice_getpeername4",
    "sluice_sendmsg4",
    "sluice_connect4",
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
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: 65536,
            backends: 65536,
            sock_revnat: 262144,
            affinity: 65536,
        }
    }
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Datapath {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    affinity_matches: HashMap<MapData, AffinityMatchKey, u8>,
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
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let services = take_map(&mut ebpf, MAP_SERVICES)?;
        let backends = take_map(&mut ebpf, MAP_BACKENDS)?;
        let affinity_matches = take_map(&mut ebpf, MAP_AFFINITY_MATCH)?;
        Ok(Self {
            ebpf,
            services,
            backends,
            affinity_matches,
        })
    }

    /// Attaches the socket programs to `cgroup`: every process in it and in
    /// the cgroups below it gets service translation.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let dir =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
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
    pub fn set_service_cidrs(&mut self, cidrs: &[Ipv4Net]) -> Result<()> {
        let mut trie: LpmTrie<&mut MapData, u32, u8> = LpmTrie::try_from(
            self.ebpf
                .map_mut(MAP_SERVICE_CIDRS)
                .context("map SERVICE_CIDRS missing")?,
        )?;
        for cidr in cidrs {
            let key = LpmKey::new(
                u32::from(cidr.prefix_len()),
                u32::from(cidr.network()).to_be(),
            );
            trie.insert(&key, 1, 0)
                .with_context(|| format!("adding service CIDR {cidr}"))?;
        }
        Ok(())
    }
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
}

/// Deleting what is already gone is success: the goal state holds.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
