//! `cargo xtask …`: one-command setup, build, demo and test for Sluice.
//!
//! Every step that installs something checks first and does nothing when the
//! thing is already there, so the commands are safe to run again and again.

mod chart;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set up, build, demo and test Sluice")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check the machine and install what is missing (apt packages, rust-src, bpf-linker).
    Setup,
    /// Setup, then build every binary.
    Build,
    /// Setup, build, then run the lab on examples/demo and probe it.
    Demo {
        /// Leave the lab running afterwards (remove it with `sluice lab down --name demo`).
        #[arg(long)]
        keep: bool,
    },
    /// Setup, build, then run the benchmarks; the report goes to bench/results/. Full runs
    /// use release builds (figures of debug builds say little); `--quick` uses the debug build.
    Bench {
        /// Few samples, debug build: checks the harness works; not for figures.
        #[arg(long)]
        quick: bool,
        /// Only these scenarios (comma-separated, as sluice-bench's `--only`).
        #[arg(long)]
        only: Option<String>,
        /// Where to write the report (default: bench/results/<unix time>/).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Render, lint and validate the Helm chart offline (a venv under target/; PyPI once).
    Chart,
    /// Setup, build, then every check and test: fmt, clippy, chart, unit and lab tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup::ensure(),
        Task::Build => {
            setup::ensure()?;
            build()
        }
        Task::Demo { keep } => {
            if !setup::is_root() {
                bail!(
                    "the demo builds network namespaces and attaches eBPF programs: run it as root"
                );
            }
            setup::ensure()?;
            build()?;
            demo(&root, keep)
        }
        Task::Bench { quick, only, out } => {
            if !setup::is_root() {
                bail!("the benchmarks build labs and attach eBPF programs: run them as root");
            }
            setup::ensure()?;
            // The bench runs the binaries beside it, so its profile is theirs.
            let profile = if quick {
                build()?;
                "debug"
            } else {
                build_release_for_bench(only.as_deref())?;
                "release"
            };
            let mut bench = Command::new(root.join("target").join(profile).join("sluice-bench"));
            if quick {
                bench.arg("--quick");
            }
            if let Some(only) = &only {
                bench.args(["--only", only]);
            }
            if let Some(out) = &out {
                bench.arg("--out").arg(out);
            }
            run(&mut bench)
        }
        Task::Chart => chart::check(&root),
        Task::Test { cargo_test_args } => {
            setup::ensure()?;
            build()?;
            test(&cargo_test_args)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs a command, echoing it, and fails with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("» {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // `cargo run` gave xtask its own package's variables (CARGO_MANIFEST_DIR, CARGO_PKG_*, …).
    // Passed on, they differ from a plain `cargo build`'s environment, and build scripts that
    // watch them (ring's watches CARGO_MANIFEST_DIR) rerun: everything above ring (rustls,
    // kube, Pingora, …) was rebuilt whenever `cargo xtask` and plain cargo alternated.
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key_text.starts_with(p))
            || key_text == "CARGO_PRIMARY_PACKAGE"
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Every crate built for the host: all but the no_std eBPF crate, which
/// proxy-daemon's build script builds for the BPF target.
const HOST_CRATES: [&str; 3] = ["--workspace", "--exclude", "proxy-ebpf"];

/// One profile (dev) for everything: tests, demo and lab share the binaries.
fn build() -> Result<()> {
    run(cargo().args(["build", "--bins"]).args(HOST_CRATES))
}

/// Release binaries for a full benchmark run (CI's `--quick` stays on the debug profile, so it
/// builds one profile only). Only the ingress scenario: just sluice-bench and sluice-ingress
/// (the release build of everything takes several minutes more on 2 cores).
fn build_release_for_bench(only: Option<&str>) -> Result<()> {
    let ingress_only = only.is_some_and(|o| o.split(',').all(|s| s.trim() == "ingress"));
    if ingress_only {
        run(cargo().args([
            "build",
            "--release",
            "-p",
            "sluice-bench",
            "-p",
            "sluice-ingress",
        ]))
    } else {
        run(cargo()
            .args(["build", "--release", "--bins"])
            .args(HOST_CRATES))
    }
}

fn test(extra: &[String]) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The no_std eBPF crate is linted for its own target (for the host it
    // would clash with std's panic handler).
    run(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "proxy-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--target-dir",
        "target/ebpf-lint",
        "--",
        "-D",
        "warnings",
    ]))?;
    chart::check(&workspace_root())?;
    if !setup::is_root() {
        eprintln!(
            "NOTE: not running as root: lab tests will print SKIPPED (needs root). CI runs as root."
        );
    }
    run(cargo().args(["test"]).args(HOST_CRATES).args(extra))?;
    if setup::is_root() && extra.is_empty() {
        // Only to keep the benchmark harness working: few samples, report
        // thrown away, no figures judged.
        let out = std::env::temp_dir().join(format!("sluice-bench-quick-{}", std::process::id()));
        let result = run(Command::new("target/debug/sluice-bench")
            .arg("--quick")
            .arg("--out")
            .arg(&out));
        let _ = std::fs::remove_dir_all(&out);
        result?;
    }
    Ok(())
}

/// The demo's probes: (what it shows, from pod, target, repetitions).
const DEMO_PROBES: &[(&str, &str, &str, usize)] = &[
    (
        "ClusterIP, TCP, named targetPort",
        "client",
        "10.96.0.10:80",
        6,
    ),
    ("ClusterIP, UDP", "client", "10.96.0.53:53/udp", 4),
    ("Service with no endpoints", "client", "10.96.0.99:80", 1),
    (
        "Unallocated address in the service CIDR",
        "client",
        "10.96.0.200:80",
        1,
    ),
    (
        "NodePort from outside the cluster",
        "external",
        "node-1:30080",
        4,
    ),
    // The lab resolves a pod name to the pod's IP.
    (
        "Pod IP directly (no translation)",
        "client",
        "web-1:8080",
        1,
    ),
];

fn demo(root: &Path, keep: bool) -> Result<()> {
    let sluice = root.join("target/debug/sluice");
    let manifests = root.join("examples/demo");
    // `up` first removes what a previous demo left behind.
    run(Command::new(&sluice)
        .args(["lab", "up"])
        .arg(&manifests)
        .args(["--name", "demo"]))?;
    let result = print_demo_probes(&sluice);
    if keep {
        eprintln!(
            "\nThe demo lab is still up. Try:\n  {0} lab status --name demo\n  {0} lab probe --name demo client 10.96.0.10:80\n  {0} lab down --name demo",
            sluice.display()
        );
    } else {
        run(Command::new(&sluice).args(["lab", "down", "--name", "demo"]))?;
    }
    result
}

fn print_demo_probes(sluice: &Path) -> Result<()> {
    println!("\n{:<42} {:<8} {:<20} answers", "probe", "from", "to");
    for (what, from, target, times) in DEMO_PROBES {
        let mut answers = Vec::new();
        for _ in 0..*times {
            let out = Command::new(sluice)
                .args(["lab", "probe", "--name", "demo", from, target])
                .output()
                .context("running sluice lab probe")?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            answers.push(if answer.is_empty() {
                String::from_utf8_lossy(&out.stderr).trim().to_string()
            } else {
                answer
            });
        }
        println!("{what:<42} {from:<8} {target:<20} {}", answers.join(" "));
    }
    Ok(())
}
