//! Taking a lab down, and removing what a crashed lab left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::debug;

use crate::names;
use crate::netns;
use crate::process::ProcRef;
use crate::state::{self, LabPaths, LabState, RUN_ROOT};

/// What a cleanup removed (for messages).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub supervisor_stopped: bool,
    pub processes_killed: usize,
    pub netns: Vec<String>,
    pub cgroup: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    /// The node agents' bpffs pin directories.
    pub pin_dirs: Vec<PathBuf>,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        !self.supervisor_stopped
            && self.processes_killed == 0
            && self.netns.is_empty()
            && self.cgroup.is_none()
            && self.run_dir.is_none()
            && self.pin_dirs.is_empty()
    }
}

/// Where the node agents of all labs pin (`sluice-proxy --bpffs-dir`), one directory each.
pub const PIN_ROOT: &str = "/sys/fs/bpf/sluice";

/// The pin directory of the node agent of `node` in lab `lab`: `<lab>_<node>`. Lab and node
/// names hold no '_', so one lab's prefix never matches another's directory; bpffs refuses
/// '.' in names, so a node name's dots become '_' too.
pub fn pin_dir(lab: &str, node: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(format!("{lab}_{}", node.replace('.', "_")))
}

/// The pin directories of lab `lab`'s node agents that exist now.
pub fn pin_dirs(lab: &str) -> Vec<PathBuf> {
    let prefix = format!("{lab}_");
    fs::read_dir(PIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Removes the pin directories of lab `lab`'s node agents, as `sluice-proxy cleanup` would
/// once they are stopped: with no process holding them, unpinning a link detaches its program
/// and unpinning a map frees it. Returns the directories removed.
pub fn remove_pins(lab: &str) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for dir in pin_dirs(lab) {
        match fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir),
            Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
        }
    }
    // The parent goes with the last directory in it (rmdir fails while another is there).
    let _ = fs::remove_dir(PIN_ROOT);
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("; "));
    }
    Ok(removed)
}

/// The lab cgroup of `name` under the cgroup2 mount `root`.
pub fn lab_cgroup(root: &Path, name: &str) -> PathBuf {
    root.join(names::CGROUP_PARENT).join(name)
}

/// Whether `proc` is the supervisor of lab `name` (by its command line).
pub fn is_supervisor_of(proc: &ProcRef, name: &str) -> bool {
    let args = proc.cmdline();
    let supervise = args.iter().any(|a| a == "supervise");
    let named = args.windows(2).any(|w| w[0] == "--name" && w[1] == name)
        || args.iter().any(|a| a.strip_prefix("--name=") == Some(name));
    supervise && named
}

/// The running supervisor of lab `name`, if its state names one that is alive and ours.
pub fn running_supervisor(name: &str) -> Option<ProcRef> {
    let state = state::load(&LabPaths::new(name).state()).ok()??;
    state
        .supervisor
        .filter(|s| s.alive() && is_supervisor_of(s, name))
}

/// Takes lab `name` down: SIGTERM to its supervisor (which stops what it started and removes
/// what it made), then removes whatever is left. Safe to call for a lab that is not up.
pub fn down(name: &str, cgroup_root: &Path) -> Result<Removed> {
    names::validate_lab_name(name)?;
    let paths = LabPaths::new(name);
    let state = state::load(&paths.state()).unwrap_or_else(|e| {
        debug!("ignoring unreadable state: {e:#}");
        None
    });
    let mut removed = Removed::default();
    if let Some(sup) = state.as_ref().and_then(|s| s.supervisor)
        && sup.alive()
        && is_supervisor_of(&sup, name)
    {
        removed.supervisor_stopped = true;
        sup.stop(Duration::from_secs(60));
    }
    leftovers(name, state.as_ref(), cgroup_root, &mut removed)?;
    // The parent every lab's cgroup lives in goes with the last lab; while
    // another lab is up, rmdir fails (not empty) and that is fine.
    let _ = std::fs::remove_dir(cgroup_root.join(names::CGROUP_PARENT));
    // Likewise the parent of the run directories.
    let _ = std::fs::remove_dir(crate::state::RUN_ROOT);
    Ok(removed)
}

/// Removes what lab `name` left: processes it recorded (by PID and start time) and every
/// process in its cgroups (the external client's included), its network namespaces (recorded,
/// plus any with its names: nodes, pods, the underlay with its bridge and the external client),
/// its cgroup tree and its run directory.
pub fn leftovers(
    name: &str,
    state: Option<&LabState>,
    cgroup_root: &Path,
    removed: &mut Removed,
) -> Result<()> {
    let mut errors = Vec::new();
    let cgroup = state
        .map(|s| s.cgroup.clone())
        .unwrap_or_else(|| lab_cgroup(cgroup_root, name));
    let cgroup = if cgroup.starts_with(cgroup_root) {
        cgroup
    } else {
        lab_cgroup(cgroup_root, name)
    };

    if let Some(state) = state {
        let recorded = state
            .nodes
            .iter()
            .filter_map(|n| n.proxy)
            .chain(state.pods.iter().filter_map(|p| p.server))
            .chain(state.supervisor.filter(|s| is_supervisor_of(s, name)));
        for proc in recorded {
            if proc.signal(libc::SIGKILL) {
                removed.processes_killed += 1;
                proc.wait_gone(Duration::from_secs(5));
            }
        }
    }
    if cgroup.exists() {
        removed.processes_killed += crate::cgroup::procs_tree(&cgroup).len();
        if let Err(e) = crate::cgroup::kill_all(&cgroup, Duration::from_secs(10)) {
            errors.push(format!("{e:#}"));
        }
    }

    let mut namespaces: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names::is_lab_netns(name, n))
        .collect();
    if let Some(state) = state {
        for ns in state
            .pods
            .iter()
            .filter_map(|p| p.netns.clone())
            .chain(state.nodes.iter().map(|n| n.netns.clone()))
            .chain(state.external.iter().map(|x| x.netns.clone()))
            .chain(state.underlay.iter().map(|u| u.netns.clone()))
        {
            if names::is_lab_netns(name, &ns) && !namespaces.contains(&ns) && netns::exists(&ns) {
                namespaces.push(ns);
            }
        }
    }
    // Pods, then nodes, then the external client and the underlay: deleting a netns takes the
    // veth pairs with an end in it along (the bridge goes with the underlay).
    namespaces.sort_by_key(|n| {
        if n.contains("-p.") {
            0
        } else if n.contains("-n.") {
            1
        } else {
            2
        }
    });
    for ns in namespaces {
        match netns::delete(&ns) {
            Ok(()) => removed.netns.push(ns),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }

    if cgroup.exists() {
        match crate::cgroup::remove_tree(&cgroup, Duration::from_secs(10)) {
            Ok(()) => removed.cgroup = Some(cgroup),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }

    // The node agents are gone (killed above if need be), so nothing holds the pins.
    match remove_pins(name) {
        Ok(dirs) => removed.pin_dirs = dirs,
        Err(e) => errors.push(format!("{e:#}")),
    }

    let dir = LabPaths::new(name).dir;
    if dir.exists() {
        match fs::remove_dir_all(&dir) {
            Ok(()) => removed.run_dir = Some(dir),
            Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("cleaning up lab {name}: {}", errors.join("; "));
    }
    Ok(())
}

/// Every lab that has something on this machine: a run directory, a cgroup or a netns.
pub fn all_labs(cgroup_root: &Path) -> Vec<String> {
    let mut labs = Vec::new();
    let dirs = [
        PathBuf::from(RUN_ROOT),
        cgroup_root.join(names::CGROUP_PARENT),
    ];
    for dir in dirs {
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.filter_map(|e| e.ok()) {
                if let Ok(name) = e.file_name().into_string()
                    && names::validate_lab_name(&name).is_ok()
                    && e.path().is_dir()
                {
                    labs.push(name);
                }
            }
        }
    }
    labs.extend(
        netns::list()
            .iter()
            .filter_map(|n| names::lab_of_netns(n))
            .map(str::to_string),
    );
    labs.sort();
    labs.dedup();
    labs
}

/// Reads the last `lines` lines of a log file (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Makes sure a directory exists.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dirs_are_per_lab_and_node() {
        assert_eq!(
            pin_dir("ab", "node-1"),
            Path::new("/sys/fs/bpf/sluice/ab_node-1")
        );
        assert_eq!(pin_dir("ab", "n.x"), Path::new("/sys/fs/bpf/sluice/ab_n_x"));
        // Lab names hold no '_', so one lab's prefix never matches another lab's directory.
        assert!(!pin_dir("ab-c", "n").starts_with(pin_dir("ab", "")));
    }

    #[test]
    fn tail_takes_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c\nd");
        assert_eq!(tail(&p, 10), "a\nb\nc\nd");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }
}
