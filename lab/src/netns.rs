//! Network namespaces, links and routes, through iproute2 (`ip netns add`, `ip -n NS …`).
//! Nothing here touches the host's own network namespace.

use std::fs::{self, File};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// Where `ip netns` keeps its namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// The file of a named netns.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Every named netns.
pub fn list() -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The `ip` program: found in PATH or the sbin directories once, else plain "ip".
fn ip_program() -> &'static Path {
    static IP: OnceLock<PathBuf> = OnceLock::new();
    IP.get_or_init(|| crate::preflight::find_in_path("ip").unwrap_or_else(|| PathBuf::from("ip")))
}

/// Runs `ip ARGS…`, failing with the command and its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new(ip_program())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs several `ip` commands in one process (`ip -n NS -batch -`), stopping at the first error.
pub fn ip_batch(netns: &str, commands: &[String]) -> Result<()> {
    run_batch(netns, commands, false)
}

/// Runs every one of several `ip` commands even when some fail (`ip -force -batch`), e.g. to
/// remove routes that may already be gone; fails if any failed.
pub fn ip_batch_all(netns: &str, commands: &[String]) -> Result<()> {
    run_batch(netns, commands, true)
}

fn run_batch(netns: &str, commands: &[String], force: bool) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    let mut args = vec!["-n", netns];
    if force {
        args.push("-force");
    }
    args.extend(["-batch", "-"]);
    let mut child = Command::new(ip_program())
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (is iproute2 installed?)")?;
    {
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("ip: no stdin"))?;
        stdin
            .write_all(commands.join("\n").as_bytes())
            .context("writing to ip -batch")?;
    }
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!(
            "ip -n {netns} -batch failed: {}\n(commands: {})",
            String::from_utf8_lossy(&out.stderr).trim(),
            commands.join("; ")
        );
    }
    Ok(())
}

/// Creates a named netns with loopback up.
pub fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Deletes a named netns (its interfaces go with it). Missing is fine.
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "delete", name]).or_else(|e| if exists(name) { Err(e) } else { Ok(()) })
}

/// Runs `f` on a short-lived thread that has entered the netns (setns affects only the calling
/// thread), so this process stays put. Sockets it makes stay in that netns.
pub fn run_in<T: Send + 'static>(
    netns: &str,
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = File::open(path(netns)).with_context(|| format!("opening netns {netns}"))?;
    let what = format!("{what} in {netns}");
    std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns on a valid fd; it changes only this thread's network namespace, and
        // this thread ends right after `f`.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("{what}: thread panicked"))?
    .with_context(|| what)
}

/// Writes a sysctl inside a netns, e.g. `sysctl(ns, "net/ipv4/ip_forward", "1")` (/proc/sys/net
/// shows the netns of the task that looks).
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let file = format!("/proc/sys/{key}");
    let value = value.to_string();
    run_in(netns, &format!("sysctl {key}={value}"), move || {
        fs::write(&file, value.as_bytes()).with_context(|| format!("writing {file}"))
    })
}

/// Turns IPv6 duplicate address detection off for the netns's current and future interfaces
/// (both `all` and `default` must be 0 to skip it), so link-local addresses are usable at once
/// too: the lab owns its ranges, nothing can clash.
pub fn disable_dad(netns: &str) -> Result<()> {
    for conf in ["all", "default"] {
        sysctl(netns, &format!("net/ipv6/conf/{conf}/accept_dad"), "0")?;
    }
    Ok(())
}

/// A TCP connection made from inside a netns; the socket stays in that netns, so this process
/// can hold it open across lab changes. It is made outside the pod's cgroup: address it to a
/// pod, not a Service.
pub fn connect_tcp(netns: &str, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    run_in(netns, &format!("connecting to {to}"), move || {
        Ok(TcpStream::connect_timeout(&to, timeout)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_path() {
        assert_eq!(path("sl-a-n.x"), PathBuf::from("/run/netns/sl-a-n.x"));
    }
}
