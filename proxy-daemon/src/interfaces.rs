//! The node's network as netlink shows it: which interface each pod's host
//! route points at, and the node's own addresses and the interfaces holding them.
//!
//! A pod's host-side interface is found by its route: routed CNIs (kindnet,
//! Calico, Cilium, the lab) give every local pod a /32 route through its veth.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};

/// A network interface of this node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

/// What policy enforcement needs to know about the node's network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// Addresses with a /32 route straight out of an interface (no gateway).
    pub host_routes: BTreeMap<Ipv4Addr, Interface>,
    /// Every address assigned on this node (the pods' gateway address included).
    pub addresses: Vec<IpAddr>,
    /// Which interface each address is assigned on.
    pub address_interfaces: BTreeMap<IpAddr, Interface>,
    /// Every interface by name.
    pub interfaces: BTreeMap<String, Interface>,
}

/// A netlink connection to the agent's network namespace.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the connection; must run inside the tokio runtime.
    pub fn connect() -> Result<Netlink> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    pub async fn read(&self) -> Result<NodeNetwork> {
        let mut names = BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.context("listing interfaces")? {
            if let Some(name) = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) {
                names.insert(link.header.index, name);
            }
        }

        let mut host_routes = BTreeMap::new();
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(route) = routes.try_next().await.context("listing routes")? {
            if route.header.destination_prefix_length != 32
                || route.header.kind != RouteType::Unicast
            {
                continue;
            }
            let mut destination = None;
            let mut oif = None;
            let mut gateway = false;
            for attr in &route.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = Some(*a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => gateway = true,
                    _ => {}
                }
            }
            if let (Some(addr), Some(index), false) = (destination, oif, gateway)
                && let Some(name) = names.get(&index)
            {
                host_routes.insert(
                    addr,
                    Interface {
                        index,
                        name: name.clone(),
                    },
                );
            }
        }

        let mut addresses = Vec::new();
        let mut address_interfaces = BTreeMap::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.context("listing addresses")? {
            for attr in &msg.attributes {
                if let AddressAttribute::Local(a) | AddressAttribute::Address(a) = attr {
                    if !addresses.contains(a) {
                        addresses.push(*a);
                    }
                    if let Some(name) = names.get(&msg.header.index) {
                        address_interfaces.insert(
                            *a,
                            Interface {
                                index: msg.header.index,
                                name: name.clone(),
                            },
                        );
                    }
                }
            }
        }
        let interfaces = names
            .into_iter()
            .map(|(index, name)| (name.clone(), Interface { index, name }))
            .collect();
        Ok(NodeNetwork {
            host_routes,
            addresses,
            address_interfaces,
            interfaces,
        })
    }
}
