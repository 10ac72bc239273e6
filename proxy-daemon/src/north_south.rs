//! Where north–south translation runs on this node: the interfaces holding
//! the node's addresses (or the ones named with `--device`), and the address
//! remote backends see as the source of translated traffic.

use std::net::{IpAddr, Ipv4Addr};

use crate::interfaces::{Interface, NodeNetwork};

/// What the north–south programs need on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NorthSouthPlan {
    /// Interfaces to attach to, sorted by index.
    pub interfaces: Vec<Interface>,
    /// The SNAT source address: the node's first address.
    pub snat: Option<Ipv4Addr>,
    /// Named devices that do not exist (yet).
    pub missing_devices: Vec<String>,
}

/// Plans from the node's addresses (InternalIPs first, as [`crate::compile::node_ipv4s`]
/// gives them), the `--device` names (empty: detect) and the node's network.
pub fn plan(
    node_addresses: &[Ipv4Addr],
    devices: &[String],
    network: &NodeNetwork,
) -> NorthSouthPlan {
    let mut plan = NorthSouthPlan {
        snat: node_addresses.first().copied(),
        ..NorthSouthPlan::default()
    };
    if devices.is_empty() {
        for ip in node_addresses {
            if let Some(interface) = network.address_interfaces.get(&IpAddr::V4(*ip))
                && !plan.interfaces.contains(interface)
            {
                plan.interfaces.push(interface.clone());
            }
        }
    } else {
        for name in devices {
            match network.interfaces.get(name) {
                Some(interface) if !plan.interfaces.contains(interface) => {
                    plan.interfaces.push(interface.clone());
                }
                Some(_) => {}
                None => plan.missing_devices.push(name.clone()),
            }
        }
    }
    plan.interfaces.sort();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interface(index: u32, name: &str) -> Interface {
        Interface {
            index,
            name: name.into(),
        }
    }

    fn network() -> NodeNetwork {
        let mut n = NodeNetwork::default();
        for (index, name) in [(1, "lo"), (2, "eth0"), (3, "eth1")] {
            n.interfaces.insert(name.into(), interface(index, name));
        }
        n.address_interfaces
            .insert("127.0.0.1".parse().unwrap(), interface(1, "lo"));
        n.address_interfaces
            .insert("172.18.0.2".parse().unwrap(), interface(2, "eth0"));
        n.address_interfaces
            .insert("198.51.100.7".parse().unwrap(), interface(3, "eth1"));
        n
    }

    #[test]
    fn detects_the_interfaces_holding_the_node_addresses() {
        let addrs = [
            "172.18.0.2".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
        ];
        let p = plan(&addrs, &[], &network());
        assert_eq!(p.interfaces, [interface(2, "eth0"), interface(3, "eth1")]);
        assert_eq!(p.snat, Some(addrs[0]));
        assert!(p.missing_devices.is_empty());
    }

    #[test]
    fn named_devices_win_and_missing_ones_are_reported() {
        let addrs = ["172.18.0.2".parse().unwrap()];
        let devices = ["eth1".to_string(), "bond0".to_string()];
        let p = plan(&addrs, &devices, &network());
        assert_eq!(p.interfaces, [interface(3, "eth1")]);
        assert_eq!(p.missing_devices, ["bond0"]);
    }

    #[test]
    fn a_node_without_addresses_gets_nothing() {
        let p = plan(&[], &[], &network());
        assert_eq!(p, NorthSouthPlan::default());
    }
}
