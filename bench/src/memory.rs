//! Memory: what sluice-proxy holds with a large cluster, next to the same
//! daemon with one Service.
//!
//! Each configuration starts sluice-proxy (the map sizes of
//! [`BENCH_MAP_SIZES`], as in the programming scenario) on a directory
//! already holding the workload and waits for its first `synced` line with
//! the expected counts, then half a second more. Then it reads the process's
//! resident memory from `/proc/PID/status` (`VmRSS` now, `VmHWM` its peak,
//! `RssAnon` the heap part of `VmRSS`) and the kernel memory of its BPF maps
//! and programs: `memlock` of every `/proc/PID/fdinfo/*` entry with a
//! `map_type` (or `prog_type`), counted once per map (program) id. Map names
//! come from the kernel (`BPF_MAP_GET_FD_BY_ID` + `BPF_OBJ_GET_INFO_BY_FD`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::programming::{BENCH_MAP_SIZES, Daemon, MapSizes, Workload};

/// Time after the first sync before reading: lets the daemon finish the
/// policy pass and the ready file.
const AFTER_SYNC: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub id: u64,
    pub name: String,
    pub map_type: u64,
    pub key_size: u64,
    pub value_size: u64,
    pub max_entries: u64,
    pub memlock_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemorySample {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
    pub rss_anon_kib: u64,
    /// Sum of `memlock` over the distinct maps the process holds.
    pub maps_memlock_bytes: u64,
    /// Sum of `memlock` over the distinct programs the process holds.
    pub programs_memlock_bytes: u64,
    /// File descriptors of maps (more than `maps.len()` when a map is open twice).
    pub map_fds: usize,
    pub maps: Vec<MapMemory>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryResult {
    pub map_sizes: MapSizes,
    pub baseline: MemorySample,
    pub loaded: MemorySample,
}

pub fn run(proxy: &Path, workload: Workload) -> Result<MemoryResult> {
    let baseline = measure(proxy, Workload::new(1, workload.endpoints_per_service))
        .context("memory with 1 Service")?;
    let loaded = measure(proxy, workload)
        .with_context(|| format!("memory with {} Services", workload.services))?;
    Ok(MemoryResult {
        map_sizes: BENCH_MAP_SIZES,
        baseline,
        loaded,
    })
}

fn measure(proxy: &Path, workload: Workload) -> Result<MemorySample> {
    workload.check_fits(BENCH_MAP_SIZES)?;
    let manifests = tempfile::tempdir()?;
    workload.write_split(manifests.path())?;
    let daemon = Daemon::start(proxy, manifests.path(), 10, None)?;
    daemon.first_synced(&workload)?;
    std::thread::sleep(AFTER_SYNC);
    daemon.check_quiet()?;
    let pid = daemon.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |field: &str| -> Result<u64> {
        status_kib(&status, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
    };
    let (vm_rss_kib, vm_hwm_kib, rss_anon_kib) = (kib("VmRSS")?, kib("VmHWM")?, kib("RssAnon")?);
    let bpf = bpf_objects(pid)?;
    // Still the same, healthy process.
    daemon.check_quiet()?;
    drop(daemon);
    Ok(MemorySample {
        services: workload.services,
        endpoints_per_service: workload.endpoints_per_service,
        vm_rss_kib,
        vm_hwm_kib,
        rss_anon_kib,
        maps_memlock_bytes: bpf.maps.iter().map(|m| m.memlock_bytes).sum(),
        programs_memlock_bytes: bpf.programs.values().sum(),
        map_fds: bpf.map_fds,
        maps: bpf.maps,
    })
}

/// A `Field:   1234 kB` line of /proc/PID/status.
pub(crate) fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

struct BpfObjects {
    maps: Vec<MapMemory>,
    map_fds: usize,
    /// memlock by program id.
    programs: BTreeMap<u64, u64>,
}

/// The BPF maps and programs process `pid` holds, from its fdinfo.
fn bpf_objects(pid: u32) -> Result<BpfObjects> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut maps = BTreeMap::new();
    let mut map_fds = 0;
    let mut programs = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        // An fd closed meanwhile is simply gone.
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let fields = fdinfo_fields(&text);
        let field = |name: &str| fields.get(name).copied().unwrap_or(0);
        if let Some(&map_type) = fields.get("map_type") {
            map_fds += 1;
            let id = field("map_id");
            maps.entry(id).or_insert_with(|| MapMemory {
                id,
                name: map_name(id).unwrap_or_else(|| "?".into()),
                map_type,
                key_size: field("key_size"),
                value_size: field("value_size"),
                max_entries: field("max_entries"),
                memlock_bytes: field("memlock"),
            });
        } else if fields.contains_key("prog_type") {
            programs.insert(field("prog_id"), field("memlock"));
        }
    }
    let mut maps: Vec<MapMemory> = maps.into_values().collect();
    maps.sort_by(|a, b| b.memlock_bytes.cmp(&a.memlock_bytes).then(a.id.cmp(&b.id)));
    Ok(BpfObjects {
        maps,
        map_fds,
        programs,
    })
}

/// The numeric `key:\tvalue` lines of an fdinfo file.
fn fdinfo_fields(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The name the kernel holds for map `id` (needs CAP_SYS_ADMIN).
fn map_name(id: u64) -> Option<String> {
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // union bpf_attr, zero-filled past the fields used.
    let mut attr = [0u32; 32];
    attr[0] = u32::try_from(id).ok()?;
    // SAFETY: a valid, zero-filled bpf_attr of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_FD_BY_ID,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return None;
    }
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16], …
    let mut info = [0u8; 128];
    let mut attr = [0u32; 32];
    attr[0] = fd as u32;
    attr[1] = info.len() as u32;
    let address = info.as_mut_ptr() as u64;
    attr[2] = address as u32;
    attr[3] = (address >> 32) as u32;
    // SAFETY: the attr names a buffer of info_len bytes that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    // SAFETY: closing the fd the kernel just gave us.
    unsafe { libc::close(fd as i32) };
    if rc < 0 {
        return None;
    }
    let name = &info[24..40];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// A map type's name (the kernel's `enum bpf_map_type`, the ones Sluice uses).
pub fn map_type_name(map_type: u64) -> &'static str {
    match map_type {
        1 => "hash",
        2 => "array",
        5 => "percpu hash",
        6 => "percpu array",
        9 => "LRU hash",
        11 => "LPM trie",
        27 => "ring buffer",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_fdinfo_fields() {
        let status =
            "Name:\tsluice-proxy\nVmHWM:\t   51234 kB\nVmRSS:\t   40000 kB\nRssAnon:\t  30000 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(40000));
        assert_eq!(status_kib(status, "VmHWM"), Some(51234));
        assert_eq!(status_kib(status, "RssAnon"), Some(30000));
        assert_eq!(status_kib(status, "VmSwap"), None);
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t1\n\
                      key_size:\t12\nvalue_size:\t8\nmax_entries:\t131072\nmap_flags:\t0x0\n\
                      map_extra:\t0x0\nmemlock:\t5259264\nmap_id:\t42\nfrozen:\t0\n";
        let f = fdinfo_fields(fdinfo);
        assert_eq!(
            (f["map_type"], f["memlock"], f["map_id"], f["max_entries"]),
            (1, 5259264, 42, 131072)
        );
    }
}
