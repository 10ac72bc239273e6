//! The pin directory: where one agent keeps its maps and program links on bpffs so that a
//! restart (or an upgrade) drops nothing, and what `sluice-proxy cleanup` removes.
//!
//! ```text
//! <dir>/LAYOUT                      array of one u32: LAYOUT_VERSION of the maps below
//! <dir>/maps/<MAP>                  every map of the eBPF object
//! <dir>/links/cgroup-<program>      the socket programs' links to the cgroup
//! <dir>/links/policy-<ifindex>-<ingress|egress>    policy programs on a pod's veth (TCX)
//! <dir>/links/nodeport-<ifindex>-<ingress|egress>  north–south programs on an uplink (TCX)
//! ```
//!
//! Pinned links stay attached when the process exits (SIGTERM included), so the old
//! programs keep serving with the pinned maps while a new agent starts. The new agent
//! reuses the maps whose definitions match, rebuilds its mirrors from them, syncs, and only
//! then swaps its programs into the pinned links with BPF_LINK_UPDATE: atomic, never two
//! programs on one hook, never none.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::bpf_sys::{self, LinkTarget};

/// Where the agent pins by default.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/sluice";
/// The bpffs mount point checked (and mounted if need be) for directories below it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// The layout of the map keys and values (proxy-common). Bump it whenever a key or value
/// changes meaning without changing size (a size change is caught per map anyway): an agent
/// finding another version creates every map afresh instead of misreading them.
pub const LAYOUT_VERSION: u32 = 1;

const LAYOUT_PIN: &str = "LAYOUT";
/// The subdirectory of the pinned maps.
pub const MAPS_DIR: &str = "maps";
const MAPS: &str = MAPS_DIR;
/// The subdirectory of the pinned links.
pub const LINKS_DIR: &str = "links";
const LINKS: &str = LINKS_DIR;

/// A map definition as the kernel reports it and as the object asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// Why a pinned map cannot be reused, if it cannot.
pub fn incompatibility(want: &MapDef, have: &MapDef) -> Option<String> {
    let mut diffs = Vec::new();
    let mut diff = |what: &str, w: u32, h: u32| {
        if w != h {
            diffs.push(format!("{what} {h} (want {w})"));
        }
    };
    diff("type", want.map_type, have.map_type);
    diff("key size", want.key_size, have.key_size);
    diff("value size", want.value_size, have.value_size);
    diff("max entries", want.max_entries, have.max_entries);
    diff("flags", want.flags, have.flags);
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

/// One pinned link, by what its pin name says.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkPin {
    Cgroup { program: String },
    Policy { ifindex: u32, ingress: bool },
    Nodeport { ifindex: u32, ingress: bool },
}

impl LinkPin {
    pub fn file_name(&self) -> String {
        let dir = |ingress: bool| if ingress { "ingress" } else { "egress" };
        match self {
            LinkPin::Cgroup { program } => format!("cgroup-{program}"),
            LinkPin::Policy { ifindex, ingress } => format!("policy-{ifindex}-{}", dir(*ingress)),
            LinkPin::Nodeport { ifindex, ingress } => {
                format!("nodeport-{ifindex}-{}", dir(*ingress))
            }
        }
    }

    pub fn parse(name: &str) -> Option<LinkPin> {
        if let Some(program) = name.strip_prefix("cgroup-") {
            return (!program.is_empty()).then(|| LinkPin::Cgroup {
                program: program.to_string(),
            });
        }
        let (kind, rest) = name.split_once('-')?;
        let (ifindex, direction) = rest.split_once('-')?;
        let ifindex: u32 = ifindex.parse().ok().filter(|i| *i != 0)?;
        let ingress = match direction {
            "ingress" => true,
            "egress" => false,
            _ => return None,
        };
        match kind {
            "policy" => Some(LinkPin::Policy { ifindex, ingress }),
            "nodeport" => Some(LinkPin::Nodeport { ifindex, ingress }),
            _ => None,
        }
    }
}

/// An agent's pin directory, locked for as long as this value lives (two agents sharing one
/// directory would fight over the same links).
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    _lock: File,
}

impl PinDir {
    /// Makes sure `root` is on bpffs (mounting bpffs at /sys/fs/bpf when that is not one
    /// yet), creates it and locks it.
    pub fn open(root: &Path) -> Result<PinDir> {
        ensure_bpffs(root)?;
        if let Some(name) = root.file_name().and_then(|n| n.to_str())
            && name.contains('.')
        {
            bail!("--bpffs-dir {}: bpffs refuses '.' in names", root.display());
        }
        for dir in [root.to_path_buf(), root.join(MAPS), root.join(LINKS)] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let Some(lock) = try_lock(root)? else {
            bail!(
                "another sluice-proxy is using {} (give each agent its own --bpffs-dir)",
                root.display()
            );
        };
        Ok(PinDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.root.join(MAPS).join(name)
    }

    pub fn link_path(&self, pin: &LinkPin) -> PathBuf {
        self.root.join(LINKS).join(pin.file_name())
    }

    pub fn layout_path(&self) -> PathBuf {
        self.root.join(LAYOUT_PIN)
    }

    /// The layout version recorded with the pinned maps: None when there is none or it
    /// cannot be read.
    pub fn layout(&self) -> Option<u32> {
        read_layout(&self.root)
    }

    /// Records the layout version of the maps now pinned.
    pub fn set_layout(&self, version: u32) -> Result<()> {
        if self.layout() == Some(version) {
            return Ok(());
        }
        let path = self.layout_path();
        let _ = fs::remove_file(&path);
        let mut array = aya::maps::Array::<aya::maps::MapData, u32>::create(1, 0)
            .context("creating the LAYOUT map")?;
        array.set(0, version, 0).context("writing the LAYOUT map")?;
        array
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok(())
    }

    /// The pinned maps, by name.
    pub fn pinned_maps(&self) -> Vec<String> {
        list(&self.root.join(MAPS))
    }

    /// The pinned links, by what their names say; pins with other names are returned apart.
    pub fn pinned_links(&self) -> (Vec<(LinkPin, PathBuf)>, Vec<PathBuf>) {
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for name in list(&self.root.join(LINKS)) {
            let path = self.root.join(LINKS).join(&name);
            match LinkPin::parse(&name) {
                Some(pin) => known.push((pin, path)),
                None => unknown.push(path),
            }
        }
        known.sort();
        (known, unknown)
    }
}

/// The names in a directory, sorted (none when it cannot be read).
pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The layout version recorded in pin directory `root` (for readers that do not lock it):
/// None when there is none or it cannot be read.
pub fn read_layout(root: &Path) -> Option<u32> {
    let data = aya::maps::MapData::from_pin(root.join(LAYOUT_PIN)).ok()?;
    let array: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).ok()?;
    array.get(&0, 0).ok()
}

/// The pid of the process (a running agent) holding `root`'s lock, read from /proc/locks so
/// that asking never takes the lock (an agent starting meanwhile would find it taken).
pub fn lock_holder(root: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(root).ok()?;
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 22079 fe:00:5521584 0 EOF"
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&id.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

/// An exclusive, non-blocking flock on the directory itself; None while another process
/// (a running agent) holds it.
fn try_lock(root: &Path) -> Result<Option<File>> {
    let dir = File::open(root).with_context(|| format!("opening {}", root.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(e).with_context(|| format!("locking {}", root.display()));
    }
    Ok(Some(dir))
}

/// The nearest existing ancestor of `path` (itself included).
fn existing_ancestor(path: &Path) -> &Path {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    p
}

/// Makes sure `root` is (or will be created) on a bpf filesystem. Below /sys/fs/bpf a
/// missing mount is made (as systemd does at boot); elsewhere it is an error.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    let on_bpffs =
        |p: &Path| bpf_sys::fs_type(existing_ancestor(p)).ok() == Some(bpf_sys::BPF_FS_MAGIC);
    if on_bpffs(root) {
        return Ok(());
    }
    let mount_point = Path::new(BPFFS_ROOT);
    if !root.starts_with(mount_point) {
        bail!(
            "--bpffs-dir {} is not on a bpf filesystem (mount one: mount -t bpf bpf DIR)",
            root.display()
        );
    }
    // Agents starting together must not stack two mounts (pins in the lower one would be
    // hidden): serialise check-and-mount with a lock file.
    let lock_path = Path::new("/run/sluice-bpffs.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // SAFETY: flock on an fd we own; it is released when `lock` is closed.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if bpf_sys::fs_type(mount_point).ok() != Some(bpf_sys::BPF_FS_MAGIC) {
        fs::create_dir_all(mount_point)
            .with_context(|| format!("creating {}", mount_point.display()))?;
        bpf_sys::mount_bpffs(mount_point).with_context(|| {
            format!("{BPFFS_ROOT} is not a bpf filesystem and mounting one there failed")
        })?;
        tracing::info!(
            event = "bpffs_mounted",
            "mounted a bpf filesystem at {BPFFS_ROOT}"
        );
    }
    drop(lock);
    if !on_bpffs(root) {
        bail!("{} is not on a bpf filesystem", root.display());
    }
    Ok(())
}

/// A pinned link in words, for messages.
pub fn describe_link(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Ok(fd) = bpf_sys::obj_get(path) else {
        return format!("{name} (unreadable)");
    };
    match bpf_sys::link_info(fd.as_fd()) {
        Ok(info) => {
            // The kernel keeps 15 bytes of a program name; the pin name has all of it.
            let program = match LinkPin::parse(&name) {
                Some(LinkPin::Cgroup { program }) => program,
                _ => bpf_sys::prog_name(info.prog_id).unwrap_or_else(|_| "?".into()),
            };
            format!("{program} ({})", describe_target(info.target))
        }
        Err(e) => format!("{name} ({e})"),
    }
}

fn describe_target(target: LinkTarget) -> String {
    match target {
        LinkTarget::Cgroup { cgroup_id, .. } => format!("cgroup id {cgroup_id}"),
        LinkTarget::Tcx { ifindex: 0, .. } => "an interface that is gone".into(),
        LinkTarget::Tcx {
            ifindex,
            attach_type,
        } => {
            let name = interface_name(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}"));
            // BPF_TCX_INGRESS = 46, BPF_TCX_EGRESS = 47.
            let dir = if attach_type == 46 {
                "ingress"
            } else {
                "egress"
            };
            format!("{name} {dir}")
        }
        LinkTarget::Other { link_type } => format!("link type {link_type}"),
    }
}

/// The name of interface `ifindex` in this network namespace.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into buf.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Detaches a pinned link (whoever else holds it) and removes its pin.
pub fn detach_pinned(path: &Path) -> io::Result<()> {
    if let Ok(fd) = bpf_sys::obj_get(path) {
        // A link whose interface or cgroup is gone is detached already.
        let _ = bpf_sys::link_detach(fd.as_fd());
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The id of a cgroup v2 directory (its inode number), as link info reports it.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path)
        .with_context(|| format!("reading cgroup {}", path.display()))?
        .ino())
}

/// `sluice-proxy cleanup`: detaches every program the agent with pin directory `root`
/// attached and removes its pins; with `cgroup`, also detaches socket programs of ours left
/// on that cgroup without a pin. Returns what it removed, in words. Idempotent.
pub fn cleanup(root: &Path, cgroup: Option<&Path>) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if root.exists() {
        if bpf_sys::fs_type(root).ok() != Some(bpf_sys::BPF_FS_MAGIC) {
            bail!(
                "{} is not on a bpf filesystem: not a sluice pin directory",
                root.display()
            );
        }
        let Some(_lock) = try_lock(root)? else {
            bail!(
                "a sluice-proxy is still running with --bpffs-dir {}: stop it first (its programs stay attached until then)",
                root.display()
            );
        };
        let links = root.join(LINKS);
        for name in list(&links) {
            let path = links.join(&name);
            let what = describe_link(&path);
            detach_pinned(&path).with_context(|| format!("removing {}", path.display()))?;
            done.push(format!("detached {what}"));
        }
        let maps = root.join(MAPS);
        for name in list(&maps) {
            let path = maps.join(&name);
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            done.push(format!("removed map {name}"));
        }
        let layout = root.join(LAYOUT_PIN);
        if layout.exists() {
            fs::remove_file(&layout).with_context(|| format!("removing {}", layout.display()))?;
        }
        for dir in [links, maps] {
            let _ = fs::remove_dir(&dir);
        }
        let leftovers = list(root);
        if !leftovers.is_empty() {
            bail!(
                "{} holds more than sluice pins ({}); left it in place",
                root.display(),
                leftovers.join(", ")
            );
        }
        fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))?;
        done.push(format!("removed {}", root.display()));
        // The shared parent of per-instance directories goes with the last of them.
        if let Some(parent) = root.parent()
            && parent.file_name().is_some_and(|n| n == "sluice")
            && fs::remove_dir(parent).is_ok()
        {
            done.push(format!("removed {}", parent.display()));
        }
    }
    if let Some(cgroup) = cgroup {
        let id = cgroup_id(cgroup)?;
        for fd in bpf_sys::all_links() {
            let Ok(info) = bpf_sys::link_info(fd.as_fd()) else {
                continue;
            };
            let LinkTarget::Cgroup { cgroup_id, .. } = info.target else {
                continue;
            };
            let program = bpf_sys::prog_name(info.prog_id).unwrap_or_default();
            if cgroup_id == id && program.starts_with("sluice_") {
                bpf_sys::link_detach(fd.as_fd())
                    .with_context(|| format!("detaching {program} from {}", cgroup.display()))?;
                done.push(format!(
                    "detached {program} from {} (unpinned link {})",
                    cgroup.display(),
                    info.id
                ));
            }
        }
    }
    Ok(done)
}

/// Map definitions the eBPF object asks for, by name, with `max_entries` overrides applied.
pub fn object_maps(
    object: &[u8],
    overrides: &BTreeMap<&str, u32>,
) -> Result<Vec<(String, MapDef)>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    let mut maps: Vec<(String, MapDef)> = obj
        .maps
        .iter()
        // .rodata/.data/.bss hold globals of this build: never shared.
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, map)| {
            (
                name.clone(),
                MapDef {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: overrides
                        .get(name.as_str())
                        .copied()
                        .unwrap_or(map.max_entries()),
                    flags: map.map_flags(),
                },
            )
        })
        .collect();
    maps.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(maps)
}

/// The definition of a pinned map, or why it cannot be read.
pub fn pinned_def(path: &Path) -> io::Result<(MapDef, String)> {
    let fd = bpf_sys::obj_get(path)?;
    let info = bpf_sys::map_info(fd.as_fd())?;
    Ok((
        MapDef {
            map_type: info.map_type,
            key_size: info.key_size,
            value_size: info.value_size,
            max_entries: info.max_entries,
            flags: info.flags,
        },
        info.name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip() {
        for pin in [
            LinkPin::Cgroup {
                program: "sluice_connect4".into(),
            },
            LinkPin::Policy {
                ifindex: 12,
                ingress: true,
            },
            LinkPin::Nodeport {
                ifindex: 3,
                ingress: false,
            },
        ] {
            assert_eq!(LinkPin::parse(&pin.file_name()), Some(pin));
        }
        for bad in [
            "",
            "cgroup-",
            "policy-0-ingress",
            "policy-x-ingress",
            "tc-3-ingress",
            "nodeport-3-up",
        ] {
            assert_eq!(LinkPin::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn incompatibility_names_every_difference() {
        let want = MapDef {
            map_type: 1,
            key_size: 40,
            value_size: 16,
            max_entries: 100,
            flags: 0,
        };
        assert_eq!(incompatibility(&want, &want), None);
        let have = MapDef {
            key_size: 24,
            max_entries: 50,
            ..want.clone()
        };
        assert_eq!(
            incompatibility(&want, &have).as_deref(),
            Some("key size 24 (want 40), max entries 50 (want 100)")
        );
    }
}
