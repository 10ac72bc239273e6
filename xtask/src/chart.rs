//! `cargo xtask chart`: checks the Helm chart offline. There is no helm
//! binary in Debian, so Helm v4 comes as a library from PyPI
//! (helm-python-sdk) into a venv under `target/`, with kubernetes-validate
//! (the Kubernetes schemas) and yamllint. `charts/check.py` renders every
//! variant, lints it and validates every object; yamllint checks the
//! hand-written YAML.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::run;

const VENV: &str = "target/chart-venv";
/// The whole set, dependencies included, so that a check that passed once
/// passes again. Bump together, and run `cargo xtask chart`.
const PINS: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "yamllint==1.38.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "pathspec==1.1.1",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];
/// The oldest Kubernetes the chart is checked against (kubernetes-validate
/// knows 1.25 to 1.37).
const KUBE_VERSION: &str = "1.33";
/// Written after a successful install: with the same pins, no network is needed.
const STAMP: &str = "sluice-pins.txt";

pub fn check(root: &Path) -> Result<()> {
    let venv = root.join(VENV);
    let python = ensure_venv(&venv)?;
    run(Command::new(&python)
        .arg(root.join("charts/check.py"))
        .arg(root.join("charts/sluice"))
        .arg(KUBE_VERSION))?;
    // Templates are not YAML until rendered, so only these files are linted.
    run(Command::new(&python)
        .args(["-m", "yamllint", "--strict", "-d"])
        .arg("{extends: default, rules: {line-length: {max: 100}, document-start: disable}}")
        .arg(root.join("charts/sluice/values.yaml"))
        .arg(root.join("charts/sluice/Chart.yaml")))
}

/// Creates the venv and installs the pins unless the stamp says they are there.
fn ensure_venv(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin/python");
    let stamp = venv.join(STAMP);
    let wanted = PINS.join("\n") + "\n";
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    if !python.exists() {
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv))
        .context("creating the chart venv (Debian: apt-get install python3-venv)")?;
    }
    eprintln!(
        "chart: installing {} into {}",
        PINS.join(" "),
        venv.display()
    );
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PINS))
    .context("installing the chart tools from PyPI (needed once; later runs are offline)")?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(python)
}
