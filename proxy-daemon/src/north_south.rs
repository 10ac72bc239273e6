//! Where north–south translation runs on this node: the interfaces holding
//! the node's addresses (or the ones named with `--device`), and the addresses
//! remote backends see as the source of translated traffic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::interfaces::{Interface, NodeNetwork};

/// What the north–south programs need on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NorthSouthPlan {
    /// Interfaces to attach to, sorted by index.
    pub interfaces: Vec<Interface>,
    /// The SNAT source addresses: the node's first address of each family.
    pub snat: SnatAddresses,
    /// Named devices that do not exist (yet).
    pub missing_devices: Vec<String>,
}

/// The source address of source-translated traffic, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatAddresses {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// Plans from the node's addresses (InternalIPs first, as [`crate::compile::node_ips`]
/// gives them), the `--device` names (empty: detect) and the node's network.
pub fn plan(
    node_addresses: &[IpAddr],
    devices: &[String],
    network: &NodeNetwork,
) -> NorthSouthPlan {
    let snat = SnatAddresses {
        v4: node_addresses.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        }),
        v6: node_addresses.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        }),
    };
    let mut plan = NorthSouthPlan {
        snat,
        ..NorthSouthPlan::default()
    };
    if devices.is_empty() {
        for ip in node_addresses {
            if let Some(interface) = network.address_interfaces.get(ip)
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
        n.address_interfaces
            .insert("fd00:172:18::2".parse().unwrap(), interface(2, "eth0"));
        n
    }

    #[test]
    fn detects_the_interfaces_holding_the_node_addresses() {
        let addrs = [
            "172.18.0.2".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
            "fd00:172:18::2".parse().unwrap(),
        ];
        let p = plan(&addrs, &[], &network());
        assert_eq!(p.interfaces, [interface(2, "eth0"), interface(3, "eth1")]);
        assert_eq!(p.snat.v4, Some("172.18.0.2".parse().unwrap()));
        assert_eq!(p.snat.v6, Some("fd00:172:18::2".parse().unwrap()));
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
