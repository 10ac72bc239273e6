//! Resident memory and CPU time of a process and its descendants (nginx: master and
//! workers), from `/proc/PID/status`, `/proc/PID/smaps_rollup` and `/proc/PID/stat`.

use anyhow::{Context, Result};
use serde::Serialize;

use crate::memory::status_kib;

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessMemory {
    pub processes: usize,
    /// Sum of VmRSS: a page shared by several processes counts once per process.
    pub vm_rss_kib: u64,
    /// Sum of each process's peak VmHWM (the peaks need not have been at the same time).
    pub vm_hwm_kib: u64,
    /// Sum of PSS: shared pages divided among the processes sharing them.
    pub pss_kib: u64,
}

/// `pid` and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .as_deref()
                .and_then(parent_of)
            {
                parents.push((child, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/PID/stat` line: `pid (comm) state ppid …`,
/// where comm may hold spaces and parentheses, so the fields count from the last `)`.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

fn parent_of(stat: &str) -> Option<u32> {
    u32::try_from(stat_field(stat, 4)?).ok()
}

/// CPU time (user + system, every thread) used so far by `pid` and its descendants, in µs.
/// Clock-tick resolution (10 ms): meant for differences over seconds of load.
pub fn cpu_us_of_tree(pid: u32) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0;
    for p in tree(pid) {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .with_context(|| format!("reading /proc/{p}/stat"))?;
        // utime and stime.
        ticks += stat_field(&stat, 14).unwrap_or(0) + stat_field(&stat, 15).unwrap_or(0);
    }
    Ok(ticks as f64 / ticks_per_s * 1e6)
}

pub fn of_tree(pid: u32) -> Result<ProcessMemory> {
    let mut total = ProcessMemory::default();
    for p in tree(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status"))
            .with_context(|| format!("reading /proc/{p}/status"))?;
        let rollup = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
            .with_context(|| format!("reading /proc/{p}/smaps_rollup"))?;
        let field = |text: &str, name: &str| {
            status_kib(text, name).with_context(|| format!("no {name} for process {p}"))
        };
        total.processes += 1;
        total.vm_rss_kib += field(&status, "VmRSS")?;
        total.vm_hwm_kib += field(&status, "VmHWM")?;
        total.pss_kib += field(&rollup, "Pss")?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_from_stat_with_odd_names() {
        assert_eq!(parent_of("42 (nginx) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_of("43 (a) b (c)) R 9 1 1"), Some(9));
        assert_eq!(parent_of("garbage"), None);
        let stat = "42 (nginx: worker) S 7 42 42 0 -1 4194624 100 0 0 0 250 31 0 0 20 0 1";
        assert_eq!(
            (stat_field(stat, 14), stat_field(stat, 15)),
            (Some(250), Some(31))
        );
    }
}
