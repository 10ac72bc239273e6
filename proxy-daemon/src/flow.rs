//! What the compiled service tables do to one connection: the prediction of the data path,
//! pure, in the style of kube-proxy's packet-flow tests. Tests check it row by row against
//! expectations written from the Kubernetes documentation, and run the same rows as real
//! traffic.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::compile::{BackendAddr, Frontend, Protocol, Scope, ServiceTable};

/// One node's view: its compiled table and its addresses (the first is the SNAT source).
pub struct NodeView<'a> {
    pub name: &'a str,
    pub table: &'a ServiceTable,
    pub addresses: &'a [IpAddr],
}

/// Where a connection starts.
#[derive(Clone, Copy, Debug)]
pub enum Client {
    /// A pod or process on `node` (socket-level translation applies), with its address.
    OnNode { node: usize, ip: IpAddr },
    /// Outside the cluster, its packets arriving at node `via`.
    Outside { via: usize, ip: IpAddr },
}

/// What the backend sees as the client's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceSeen {
    /// The client's own address.
    Client,
    /// The address of the node that translated the connection (SNAT).
    Node(IpAddr),
}

/// What happens to a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Translated to one of these backends, each seeing the client as given.
    Backends(Vec<(BackendAddr, SourceSeen)>),
    /// Refused at once (connection refused).
    Refused,
    /// Dropped without an answer.
    Dropped,
    /// Not a service address: it goes where its destination leads, untranslated.
    Untranslated,
}

/// The verdict for a connection from `client` to `ip:port/protocol` across `nodes`.
pub fn predict(
    nodes: &[NodeView<'_>],
    service_cidrs: &[IpNet],
    client: Client,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Verdict {
    let frontend = |scope| Frontend {
        ip,
        port,
        protocol,
        scope,
    };
    match client {
        Client::OnNode {
            node,
            ip: client_ip,
        } => {
            let Some(view) = nodes.get(node) else {
                return Verdict::Untranslated;
            };
            if let Some(target) = view.table.frontends.get(&frontend(Scope::Socket)) {
                if target.backends.is_empty() {
                    return Verdict::Refused;
                }
                return Verdict::Backends(
                    target
                        .backends
                        .iter()
                        .map(|b| (*b, SourceSeen::Client))
                        .collect(),
                );
            }
            if service_cidrs.iter().any(|c| c.contains(&ip)) {
                return Verdict::Refused;
            }
            // Another node's address: translated there, per packet, like outside traffic.
            match nodes.iter().position(|n| n.addresses.contains(&ip)) {
                Some(other) if other != node => predict(
                    nodes,
                    service_cidrs,
                    Client::Outside {
                        via: other,
                        ip: client_ip,
                    },
                    ip,
                    port,
                    protocol,
                ),
                _ => Verdict::Untranslated,
            }
        }
        Client::Outside { via, ip: client_ip } => {
            let Some(view) = nodes.get(via) else {
                return Verdict::Untranslated;
            };
            let Some(target) = view.table.frontends.get(&frontend(Scope::External)) else {
                return Verdict::Untranslated;
            };
            let allowed = match &target.source_ranges {
                None => true,
                Some(ranges) => ranges.iter().any(|r| r.contains(&client_ip)),
            };
            if !allowed || target.backends.is_empty() {
                return Verdict::Dropped;
            }
            // A remote backend needs the node's address as SNAT source; without one the
            // data path drops what it would send there.
            let same_family = |a: &&IpAddr| a.is_ipv4() == client_ip.is_ipv4();
            let Some(snat) = view.addresses.iter().find(same_family).copied() else {
                return Verdict::Dropped;
            };
            Verdict::Backends(
                target
                    .backends
                    .iter()
                    .map(|b| {
                        let seen = if b.local {
                            SourceSeen::Client
                        } else {
                            SourceSeen::Node(snat)
                        };
                        (*b, seen)
                    })
                    .collect(),
            )
        }
    }
}
