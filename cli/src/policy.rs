//! `sluice policy …`: NetworkPolicy verdicts computed from the cluster model.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use cluster_model::{ManifestSource, ObjectKey};
use sluice_policy::{Peer, PolicySet, Protocol};

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// May FROM reach TO on PORT? Prints the verdict and the policies and rules that decided
    /// it; exit code 0 allowed, 1 denied, 2 error. Peers are pods (NAME or NAMESPACE/NAME),
    /// nodes (node/NAME) or addresses. Judged after Service translation: name the backend pod.
    Explain {
        /// FROM: the source (pod, node/NAME or address).
        from: String,
        /// TO: the destination (pod, node/NAME or address).
        to: String,
        /// PORT[/tcp|/udp|/sctp] on the destination (TCP when no protocol is given).
        port: String,
        /// Read the cluster from this manifest directory…
        #[arg(long, value_name = "DIR", conflicts_with = "lab")]
        manifests: Option<PathBuf>,
        /// …or from the running lab NAME (as the lab's API server renders it, with pod IPs).
        #[arg(long, value_name = "NAME")]
        lab: Option<String>,
    },
    /// What a node enforces, as programmed in its maps: each pod interface under policy
    /// programs, whether each direction is isolated and by which policies, what is allowed
    /// (peer addresses, protocol, ports), and drops.
    List {
        /// Only this pod (NAMESPACE/NAME).
        #[arg(long, value_name = "NAMESPACE/NAME")]
        pod: Option<String>,
        #[command(flatten)]
        agent: crate::inspect::AgentArgs,
    },
}

pub fn run(args: PolicyArgs) -> i32 {
    match args.command {
        PolicyCommand::Explain {
            from,
            to,
            port,
            manifests,
            lab,
        } => match explain(&from, &to, &port, manifests, lab) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("error: {e:#}");
                2
            }
        },
        PolicyCommand::List { pod, agent } => crate::inspect::run_policy_list(pod, agent),
    }
}

fn explain(
    from: &str,
    to: &str,
    port: &str,
    manifests: Option<PathBuf>,
    lab: Option<String>,
) -> Result<bool> {
    let dir = match (manifests, lab) {
        (Some(dir), _) => dir,
        (None, Some(lab)) => sluice_lab::state::LabPaths::new(&lab).cluster(),
        (None, None) => bail!("say where the cluster is: --manifests DIR or --lab NAME"),
    };
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let reload = ManifestSource::new(&dir).reload();
    for problem in &reload.new_problems {
        eprintln!("warning: {problem}");
    }
    let (port, protocol) = parse_port(port)?;
    let set = PolicySet::new(&reload.snapshot);
    let verdict = set
        .explain(&parse_peer(from), &parse_peer(to), port, protocol)
        .context("explaining")?;
    println!("{verdict}");
    Ok(verdict.allowed)
}

/// `ns/name` or `name` (namespace `default`) is a pod, `node/NAME` a node, an address an address.
fn parse_peer(text: &str) -> Peer {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Peer::Ip(addr);
    }
    match text.split_once('/') {
        Some(("node", name)) => Peer::Node(name.to_string()),
        Some((namespace, name)) => Peer::Pod(ObjectKey::new(namespace, name)),
        None => Peer::Pod(ObjectKey::new("default", text)),
    }
}

fn parse_port(text: &str) -> Result<(u16, Protocol)> {
    let (number, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
    let port: u16 = number
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("port {number:?}: expected 1-65535"))?;
    let protocol = Protocol::from_k8s(Some(&protocol.to_ascii_uppercase()))
        .with_context(|| format!("protocol {protocol:?}: expected tcp, udp or sctp"))?;
    Ok((port, protocol))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_and_ports_parse_as_documented() {
        assert_eq!(
            parse_peer("web"),
            Peer::Pod(ObjectKey::new("default", "web"))
        );
        assert_eq!(parse_peer("x/a"), Peer::Pod(ObjectKey::new("x", "a")));
        assert_eq!(parse_peer("node/node-1"), Peer::Node("node-1".into()));
        assert_eq!(
            parse_peer("10.0.0.1"),
            Peer::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(parse_port("80").unwrap(), (80, Protocol::Tcp));
        assert_eq!(parse_port("53/udp").unwrap(), (53, Protocol::Udp));
        assert!(parse_port("0").is_err());
        assert!(parse_port("80/icmp").is_err());
    }
}
