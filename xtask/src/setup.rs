//! Machine checks and idempotent installs. Pins come from TOOLCHAIN.md:
//! bpf-linker 0.13.0 built against LLVM 22, which must be the LLVM major of
//! the nightly rustc that builds the eBPF crate.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// iptables and nftables provide the kube-proxy baselines the benchmarks compare against.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "bpftool",
    "iptables",
    "nftables",
    // Pingora (sluice-ingress) builds zlib-ng with it.
    "cmake",
    // `cargo xtask chart` checks the Helm chart with tools in a venv.
    "python3-venv",
    // The ingress benchmark's baseline and load generator (h2load).
    "nginx",
    "nghttp2-client",
];
const LLVM_MAJOR: &str = "22";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions; std offers no safe wrapper.
    unsafe { libc::geteuid() == 0 }
}

pub fn ensure() -> Result<()> {
    check_kernel()?;
    install_apt_packages()?;
    check_nightly()?;
    install_rust_src()?;
    install_bpf_linker()?;
    eprintln!("setup: ok");
    Ok(())
}

/// What the lab and the programs need from the kernel, checked up front so a
/// missing piece is named instead of failing deep inside a test.
fn check_kernel() -> Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); Sluice needs a kernel built with CONFIG_DEBUG_INFO_BTF"
        );
    }
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if !mounts.lines().any(|l| {
        l.split(" - ")
            .nth(1)
            .is_some_and(|t| t.starts_with("cgroup2 "))
    }) {
        bail!(
            "no cgroup v2 hierarchy is mounted; mount one (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)"
        );
    }
    Ok(())
}

fn install_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; run as root (or `sudo apt-get install {}`)",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The eBPF crate is built by nightly rustc, and bpf-linker must use the same
/// LLVM major, or linking fails with confusing bitcode errors.
fn check_nightly() -> Result<()> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-vV"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: `rustup toolchain install nightly` (its LLVM major must be {LLVM_MAJOR})"
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let llvm = text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "nightly rustc uses LLVM {llvm}, but bpf-linker is built against LLVM {LLVM_MAJOR} (llvm-{LLVM_MAJOR}-dev); use a nightly with LLVM {LLVM_MAJOR}"
        );
    }
    Ok(())
}

fn install_rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn install_bpf_linker() -> Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("bpf-linker {BPF_LINKER_VERSION}")
        });
    if installed {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 2 minutes)"
    );
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")),
    )
}
