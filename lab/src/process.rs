//! Processes the lab started, named by PID plus start time so that a recycled PID is never
//! mistaken for ours.

use std::fs;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A process: PID and its start time (clock ticks since boot, field 22 of /proc/PID/stat).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: i32,
    pub start_time: u64,
}

/// What /proc/PID/stat says about a process: state letter and start time.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses state and start time from the text of /proc/PID/stat (the command name may hold
/// spaces and parentheses, so fields are counted from the last ')').
pub(crate) fn parse_stat(text: &str) -> Option<(char, u64)> {
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the name: state is field 3; starttime is field 22, i.e. 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl ProcRef {
    /// The running process with this PID, if any.
    pub fn of(pid: u32) -> Option<ProcRef> {
        let pid = i32::try_from(pid).ok()?;
        let (_, start_time) = stat(pid)?;
        Some(ProcRef { pid, start_time })
    }

    /// Whether this very process still runs (not exited, not a zombie, PID not reused).
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }

    /// Its command line, arguments split.
    pub fn cmdline(&self) -> Vec<String> {
        if !self.alive() {
            return Vec::new();
        }
        fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends `signal` if the process is still this one. Returns whether it was sent.
    pub fn signal(&self, signal: i32) -> bool {
        if !self.alive() {
            return false;
        }
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.pid, signal) == 0 }
    }

    /// Waits until the process is gone; true if it went within `timeout`.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(20));
        }
        true
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns whether it is gone.
    pub fn stop(&self, grace: Duration) -> bool {
        if !self.signal(libc::SIGTERM) {
            return !self.alive();
        }
        if self.wait_gone(grace) {
            return true;
        }
        self.signal(libc::SIGKILL);
        self.wait_gone(Duration::from_secs(5))
    }
}

/// The cgroup v2 path (relative to the cgroup2 root) of a process, e.g. "/sluice-lab/x/supervisor".
pub fn cgroup_of(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_names() {
        let text =
            "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(text), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn self_is_alive_and_named() {
        let me = ProcRef::of(std::process::id()).expect("own process");
        assert!(me.alive());
        assert!(!me.cmdline().is_empty());
        let other = ProcRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !other.alive(),
            "a different start time is a different process"
        );
    }
}
