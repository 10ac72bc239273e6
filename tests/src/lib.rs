//! Helpers for the end-to-end lab tests: finding the binaries, skipping without root, unique
//! lab names, and small manifest directories.
//!
//! ```no_run
//! use sluice_e2e::{Manifests, lab_options, skip_unless_root, unique_name};
//! # fn t() -> anyhow::Result<()> {
//! if skip_unless_root("my_test") { return Ok(()); }
//! let m = Manifests::new()?;
//! m.write("pods.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c}]}\n")?;
//! let lab = sluice_lab::Lab::up(lab_options(&unique_name("my"), m.path()))?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use sluice_lab::{LabOptions, PROXY_BIN, ProxyMode};

/// Name of the CLI binary this package builds for the tests.
pub const E2E_CLI: &str = "sluice-e2e-cli";

/// Where cargo put the binaries: the test executable is `target/<profile>/deps/X`, so they are
/// two levels up (`target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The `sluice` CLI the tests use: `$SLUICE_BIN`, else this package's fresh build of it, else
/// `sluice` in [`bin_dir`].
pub fn sluice_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return p.into();
    }
    let own = bin_dir().join(E2E_CLI);
    if own.is_file() {
        own
    } else {
        bin_dir().join("sluice")
    }
}

/// Whether the node agent binary is there (`$SLUICE_PROXY_BIN` or `sluice-proxy` in [`bin_dir`]).
pub fn proxy_available() -> bool {
    std::env::var_os(sluice_lab::PROXY_BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join(PROXY_BIN))
        .is_file()
}

/// True (after printing a loud line) when not root: the caller returns early.
pub fn skip_unless_root(test: &str) -> bool {
    if sluice_lab::preflight::is_root() {
        return false;
    }
    eprintln!("SKIPPED (needs root): {test}");
    true
}

/// A lab name unique to this process and call (tests run in parallel): `PREFIX` + pid + n.
/// Keep PREFIX short (≤ 8 characters).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}x{n}", std::process::id())
}

/// Lab options for tests: the test binaries, the node agent if built (else none).
pub fn lab_options(name: &str, manifests: &Path) -> LabOptions {
    let mut opts = LabOptions::new(name, manifests);
    opts.bin_dir = Some(bin_dir());
    opts.sluice_bin = Some(sluice_bin());
    opts.proxy = ProxyMode::IfPresent;
    opts
}

/// A temporary manifest directory.
pub struct Manifests {
    dir: tempfile::TempDir,
}

impl Manifests {
    pub fn new() -> Result<Self> {
        Ok(Manifests {
            dir: tempfile::Builder::new().prefix("sluice-e2e-").tempdir()?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes (or replaces) a file atomically, so the lab never reads half of it.
    pub fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.path().join(file)).context("renaming manifest")
    }

    pub fn remove(&self, file: &str) -> Result<()> {
        std::fs::remove_file(self.dir.path().join(file)).context("removing manifest")
    }
}

/// A Pod manifest: `ports` as (name, number, "TCP"/"UDP").
pub fn pod_yaml(
    name: &str,
    labels: &[(&str, &str)],
    node: Option<&str>,
    ports: &[(&str, u16, &str)],
) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let node = node
        .map(|n| format!("  nodeName: {n}\n"))
        .unwrap_or_default();
    let ports = if ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = ports
            .iter()
            .map(|(n, p, proto)| format!("{{name: {n}, containerPort: {p}, protocol: {proto}}}"))
            .collect();
        format!("    ports: [{}]\n", list.join(", "))
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{{}}}\nspec:\n{node}  containers:\n  - name: main\n    image: registry.k8s.io/e2e-test-images/agnhost:2.53\n{ports}",
        labels.join(", ")
    )
}

/// The Node manifests of a two-node lab: node-a (pod CIDR chosen by the lab) and node-b
/// with 10.244.7.0/24.
pub fn two_nodes_yaml() -> String {
    [
        node_yaml("node-a", None),
        node_yaml("node-b", Some("10.244.7.0/24")),
    ]
    .join("---\n")
}

/// A Node manifest.
pub fn node_yaml(name: &str, pod_cidr: Option<&str>) -> String {
    let spec = pod_cidr
        .map(|c| format!("spec:\n  podCIDR: {c}\n"))
        .unwrap_or_default();
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{spec}")
}

/// A Node manifest with an `InternalIP` address of its own.
pub fn node_yaml_with_ip(name: &str, pod_cidr: Option<&str>, internal_ip: &str) -> String {
    format!(
        "{}status:\n  addresses: [{{type: InternalIP, address: {internal_ip}}}]\n",
        node_yaml(name, pod_cidr)
    )
}

/// A Service manifest selecting `selector`: `ports` as (name, port, targetPort, "TCP"/"UDP");
/// `cluster_ip` None lets the lab pick one.
pub fn service_yaml(
    name: &str,
    cluster_ip: Option<&str>,
    selector: &[(&str, &str)],
    ports: &[(&str, u16, u16, &str)],
) -> String {
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let ip = cluster_ip
        .map(|ip| format!("  clusterIP: {ip}\n"))
        .unwrap_or_default();
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, t, proto)| {
            format!("{{name: {n}, port: {p}, targetPort: {t}, protocol: {proto}}}")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n{ip}  selector: {{{}}}\n  ports: [{}]\n",
        selector.join(", "),
        ports.join(", ")
    )
}

/// A Service manifest with an IP family policy: `families` is `spec.ipFamilies` (empty: not
/// given), `ports` as in [`service_yaml`].
pub fn dual_service_yaml(
    name: &str,
    policy: &str,
    families: &[&str],
    selector: &[(&str, &str)],
    ports: &[(&str, u16, u16, &str)],
) -> String {
    let families = if families.is_empty() {
        String::new()
    } else {
        format!("  ipFamilies: [{}]\n", families.join(", "))
    };
    service_yaml(name, None, selector, ports).replacen(
        "spec:\n",
        &format!("spec:\n  ipFamilyPolicy: {policy}\n{families}"),
        1,
    )
}

/// Runs `ip ARGS…` and returns its stdout (empty if it fails).
pub fn ip_output(args: &[&str]) -> String {
    let ip = sluice_lab::preflight::find_in_path("ip").unwrap_or_else(|| "ip".into());
    std::process::Command::new(ip)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The IPv4 routes of a netns, one per line (`ip -n NETNS -4 route`).
pub fn netns_routes(netns: &str) -> String {
    ip_output(&["-n", netns, "-4", "route"])
}

/// The IPv6 routes of a netns, one per line (`ip -n NETNS -6 route`).
pub fn netns_routes6(netns: &str) -> String {
    ip_output(&["-n", netns, "-6", "route"])
}

/// The interface names in a netns (without the `@peer` suffix).
pub fn netns_links(netns: &str) -> Vec<String> {
    links_in(&ip_output(&["-n", netns, "-o", "link"]))
}

/// The interface names of the host's own network namespace.
pub fn host_links() -> Vec<String> {
    links_in(&ip_output(&["-o", "link"]))
}

fn links_in(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// The host's own addresses that lie in a range the lab owns (pod supernets and node networks
/// of both families, the IPv4 pod gateway): any is a lab address leaking into the host's
/// network namespace.
pub fn host_addresses_in_lab_ranges() -> Vec<String> {
    use sluice_lab::addr::{NODE_NETWORK, NODE_NETWORK6, POD_GATEWAY, POD_SUPERNET, POD_SUPERNET6};
    let text = ip_output(&["-o", "addr"]);
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let family = words.find(|w| *w == "inet" || *w == "inet6")?;
            let net: ipnet::IpNet = words.next()?.parse().ok()?;
            let lab = match (family, net.addr()) {
                ("inet", std::net::IpAddr::V4(ip)) => {
                    POD_SUPERNET.contains(&ip) || NODE_NETWORK.contains(&ip) || ip == POD_GATEWAY
                }
                ("inet6", std::net::IpAddr::V6(ip)) => {
                    POD_SUPERNET6.contains(&ip) || NODE_NETWORK6.contains(&ip)
                }
                _ => false,
            };
            lab.then(|| l.to_string())
        })
        .collect()
}

/// Every process, netns, cgroup, file and pin directory of lab `name` that exists right now (empty when the
/// lab left nothing behind).
pub fn lab_traces(name: &str) -> Vec<String> {
    let mut traces = Vec::new();
    for ns in sluice_lab::netns::list() {
        if sluice_lab::names::is_lab_netns(name, &ns) {
            traces.push(format!("netns {ns}"));
        }
    }
    if let Ok(root) = sluice_lab::cgroup::cgroup2_root() {
        let cg = sluice_lab::cleanup::lab_cgroup(&root, name);
        if cg.exists() {
            traces.push(format!(
                "cgroup {} (processes {:?})",
                cg.display(),
                sluice_lab::cgroup::procs_tree(&cg)
            ));
        }
    }
    let dir = sluice_lab::state::LabPaths::new(name).dir;
    if dir.exists() {
        traces.push(format!("directory {}", dir.display()));
    }
    for pins in sluice_lab::cleanup::pin_dirs(name) {
        traces.push(format!("pinned BPF objects {}", pins.display()));
    }
    // Processes whose command line names the lab (supervisor) even outside its cgroup.
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(p) = sluice_lab::process::ProcRef::of(pid)
                && p.alive()
                && sluice_lab::cleanup::is_supervisor_of(&p, name)
            {
                traces.push(format!("supervisor process {pid}"));
            }
        }
    }
    traces
}
