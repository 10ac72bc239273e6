//! Starting processes inside a pod or node: its netns and its cgroup.
//!
//! Not `ip netns exec` (it remounts /sys, which hides cgroup2): the netns file and the cgroup's
//! `cgroup.procs` are opened before fork, and the child, before exec, writes "0" to
//! `cgroup.procs` (moving itself) and calls `setns(fd, CLONE_NEWNET)`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// Where a process should run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// A netns file (e.g. /run/netns/NAME); None: the caller's.
    pub netns: Option<PathBuf>,
    /// A cgroup v2 directory; None: the caller's.
    pub cgroup: Option<PathBuf>,
    /// Start a new session (detach from the terminal).
    pub new_session: bool,
}

impl Placement {
    pub fn new(netns: impl Into<PathBuf>, cgroup: impl Into<PathBuf>) -> Self {
        Placement {
            netns: Some(netns.into()),
            cgroup: Some(cgroup.into()),
            new_session: false,
        }
    }

    /// Opens what the child needs. Keep the result alive until the command has been spawned.
    pub fn prepare(&self) -> Result<Prepared> {
        let netns = match &self.netns {
            Some(p) => {
                Some(File::open(p).with_context(|| format!("opening netns {}", p.display()))?)
            }
            None => None,
        };
        let procs = match &self.cgroup {
            Some(dir) => Some(open_procs(dir)?),
            None => None,
        };
        Ok(Prepared {
            netns,
            procs,
            new_session: self.new_session,
        })
    }
}

fn open_procs(dir: &Path) -> Result<File> {
    let path = dir.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Open files for [`Placement`]; applies them to commands.
#[derive(Debug)]
pub struct Prepared {
    netns: Option<File>,
    procs: Option<File>,
    new_session: bool,
}

impl Prepared {
    /// Makes `cmd`'s child join the cgroup and netns (and a new session) before exec. `self`
    /// must outlive the spawn. Also resets SIGINT/SIGQUIT to default, in case the caller ignores
    /// them while it waits.
    pub fn apply(&self, cmd: &mut Command) {
        let netns = self.netns.as_ref().map(|f| f.as_raw_fd());
        let procs = self.procs.as_ref().map(|f| f.as_raw_fd());
        let new_session = self.new_session;
        // SAFETY: the closure only makes async-signal-safe system calls (setsid, write, setns,
        // signal) on descriptors that stay open until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if new_session && libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = procs
                    && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = netns
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                Ok(())
            });
        }
    }
}
