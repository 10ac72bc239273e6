//! cgroup v2: finding the mount, making and removing directories, killing what is inside.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where cgroup2 is mounted (`/sys/fs/cgroup` on pure v2 hosts, `/sys/fs/cgroup/unified` in
/// hybrid mode), from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_cgroup2(&text).context(
        "no cgroup2 file system is mounted (the lab needs cgroup v2: mount -t cgroup2 none /sys/fs/cgroup/unified)",
    )
}

/// The first cgroup2 mount point in mountinfo text.
pub(crate) fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a cgroup directory (and its parents).
pub fn create(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// PIDs in one cgroup (not below).
pub fn procs(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// PIDs in a cgroup and every cgroup below it.
pub fn procs_tree(path: &Path) -> Vec<i32> {
    let mut out = procs(path);
    for child in subdirs(path) {
        out.extend(procs_tree(&child));
    }
    out
}

fn subdirs(path: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(path) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// Whether any process is in the cgroup or below (from cgroup.events, else by listing).
pub fn populated(path: &Path) -> bool {
    match fs::read_to_string(path.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => !procs_tree(path).is_empty(),
    }
}

/// Kills every process in the cgroup and below (cgroup.kill, else SIGKILL one by one) and waits
/// up to `timeout` for them to go. Every process in a lab's cgroups is the lab's.
pub fn kill_all(path: &Path, timeout: Duration) -> Result<()> {
    if !path.exists() || !populated(path) {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    loop {
        if fs::write(path.join("cgroup.kill"), "1").is_err() {
            for pid in procs_tree(path) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if !populated(path) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes remain in cgroup {}: {:?}",
                path.display(),
                procs_tree(path)
            );
        }
        sleep(Duration::from_millis(20));
    }
}

/// Removes a cgroup and every cgroup below it, children first. Processes must be gone
/// ([`kill_all`]); a cgroup that is still busy is retried until `timeout`.
pub fn remove_tree(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    remove_rec(path, deadline)
}

fn remove_rec(path: &Path, deadline: Instant) -> Result<()> {
    for child in subdirs(path) {
        remove_rec(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if busy(&e) && Instant::now() < deadline => sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", path.display())),
        }
    }
}

fn busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENOTEMPTY))
}

/// Kills whatever is in a cgroup tree, then removes it. Nothing happens if it does not exist.
pub fn destroy(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    kill_all(path, Duration::from_secs(10))?;
    remove_tree(path, Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_pure_layouts() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let none = "31 23 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(find_cgroup2(none), None);
        let escaped = "41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(escaped), Some(PathBuf::from("/mnt/my cg")));
    }
}
