//! Checks before a lab is touched, with messages that say what to do.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Root, a cgroup2 mount and `ip`. Returns the cgroup2 mount point.
pub fn check() -> Result<PathBuf> {
    require_root()?;
    let root = crate::cgroup::cgroup2_root()?;
    if !root.join("cgroup.procs").exists() {
        bail!(
            "{} is not a usable cgroup2 mount (no cgroup.procs)",
            root.display()
        );
    }
    if find_in_path("ip").is_none() {
        bail!("`ip` (iproute2) not found in PATH: install it (apt-get install iproute2)");
    }
    Ok(root)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root() -> Result<()> {
    if !is_root() {
        bail!(
            "the lab needs root (it creates network namespaces, veths and cgroups): run it with sudo"
        );
    }
    Ok(())
}

/// The first executable `name` in PATH (plus the sbin directories, which a plain user's PATH
/// may lack).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether the kernel has IPv6 (it may be built without it or booted with `ipv6.disable=1`);
/// without it a lab is IPv4-only.
pub fn ipv6_available() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}
