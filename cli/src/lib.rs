//! The `sluice` command line: `sluice <group> <command>`. Groups: `lab` (more to come).
//!
//! A library so that the binary is a one-liner and test harnesses can build the same CLI
//! under another name.

use std::ffi::OsString;

use clap::{Parser, Subcommand};

mod duration;
mod lab;

pub use duration::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: an eBPF Kubernetes networking data plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub group: Group,
}

#[derive(Debug, Subcommand)]
pub enum Group {
    /// A Kubernetes-like cluster on this machine: network namespaces as nodes and pods,
    /// driven by a directory of manifests.
    Lab(lab::LabArgs),
}

/// Parses `args` (program name first) and runs the command; returns the exit code.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match cli.group {
        Group::Lab(args) => lab::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
