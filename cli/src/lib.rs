//! The `sluice` command line: `sluice <group> <command>`. Groups: `lab`, `policy`, `lb`,
//! `ct`, `status`.
//!
//! A library so that the binary is a one-liner and test harnesses can build the same CLI
//! under another name.

use std::ffi::OsString;

use clap::{Parser, Subcommand};

mod duration;
mod inspect;
mod lab;
mod policy;

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
    /// NetworkPolicy: why a connection is allowed or denied, and what a node enforces.
    Policy(policy::PolicyArgs),
    /// Service load balancing as a node programmed it.
    Lb(inspect::LbArgs),
    /// Connections a node tracks.
    Ct(inspect::CtArgs),
    /// A node agent: what is attached where, map pressure, the last sync.
    Status(inspect::AgentArgs),
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
        Group::Policy(args) => policy::run(args),
        Group::Lb(args) => inspect::run_lb(args),
        Group::Ct(args) => inspect::run_ct(args),
        Group::Status(args) => inspect::run_status(args),
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

    fn parse(args: &[&str]) -> Result<lab::LabCommand, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied()))?;
        match cli.group {
            Group::Lab(lab) => Ok(lab.command),
            _ => panic!("expected a lab command"),
        }
    }

    #[test]
    fn lab_commands_parse() {
        match parse(&[
            "lab",
            "probe",
            "--name",
            "demo",
            "client",
            "10.96.0.10:53/udp",
            "-o",
            "json",
        ]) {
            Ok(lab::LabCommand::Probe {
                name,
                pod,
                target,
                output,
                ..
            }) => {
                assert_eq!((name.name.as_str(), pod.as_str()), ("demo", "client"));
                assert_eq!(target.to_string(), "10.96.0.10:53/udp");
                assert_eq!(output, lab::OutputFormat::Json);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["lab", "exec", "web-1", "--", "ip", "-4", "addr"]) {
            Ok(lab::LabCommand::Exec { pod, command, .. }) => {
                assert_eq!(pod, "web-1");
                assert_eq!(command, ["ip", "-4", "addr"]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "lab",
            "load",
            "c",
            "web:80",
            "--count",
            "60",
            "--timeout",
            "500ms",
        ]) {
            Ok(lab::LabCommand::Load { count, timeout, .. }) => {
                assert_eq!(
                    (count, timeout),
                    (60, std::time::Duration::from_millis(500))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["lab", "down", "--all"]),
            Ok(lab::LabCommand::Down { all: true, .. })
        ));
        assert!(parse(&["lab", "down", "--all", "--name", "x"]).is_err());
        assert!(parse(&["lab", "up", "d", "--no-proxy", "--proxy-bin", "p"]).is_err());
        assert!(
            parse(&["lab", "exec", "web-1"]).is_err(),
            "a command is required"
        );
        assert!(parse(&["lab", "probe", "client", "nohost"]).is_err());
    }
}
