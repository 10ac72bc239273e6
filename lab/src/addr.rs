//! Address plan of a lab and the allocators that hand addresses out.
//!
//! Routed, Calico-style, no bridge between pods: every pod has `podIP/32` on `eth0` and reaches
//! everything through the link-local gateway [`POD_GATEWAY`], which its node answers for. The lab
//! owns [`POD_SUPERNET`] (node pod CIDRs are carved from it unless a Node names its own), the
//! service CIDR, and [`NODE_NETWORK`] for node addresses. Nodes sit on an underlay (one bridge)
//! with their node address on their uplink; each node routes every other node's pod CIDR via that
//! node's address (no overlay). The external client [`EXTERNAL_IP`] sits on the same bridge and
//! routes only to the nodes' addresses. No namespace gets a default route.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The pods' supernet: node `i` gets `10.244.i.0/24` unless its Node gives `spec.podCIDR`.
pub const POD_SUPERNET: Ipv4Net = net(Ipv4Addr::new(10, 244, 0, 0), 16);
/// The default service CIDR.
pub const DEFAULT_SERVICE_CIDR: Ipv4Net = net(Ipv4Addr::new(10, 96, 0, 0), 16);
/// Node addresses (kind-like): node `i` gets `172.18.0.(i+2)` unless its Node gives an
/// InternalIP.
pub const NODE_NETWORK: Ipv4Net = net(Ipv4Addr::new(172, 18, 0, 0), 16);
/// The gateway every pod routes through; each node has it on its loopback and answers ARP for it.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The external client's address: the top of the node network, which no default node address
/// reaches (those stop at 172.18.1.1).
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 255, 254);

const fn net(addr: Ipv4Addr, len: u8) -> Ipv4Net {
    match Ipv4Net::new(addr, len) {
        Ok(n) => n,
        Err(_) => panic!("bad constant network"),
    }
}

/// The default pod CIDR of the node with index `i` (0-based), if there is one.
pub fn default_pod_cidr(i: u32) -> Option<Ipv4Net> {
    let i = u8::try_from(i).ok()?;
    Ipv4Net::new(Ipv4Addr::new(10, 244, i, 0), 24).ok()
}

/// The default address of the node with index `i` (0-based), if there is one.
pub fn default_node_ip(i: u32) -> Option<Ipv4Addr> {
    let host = i.checked_add(2)?;
    if host >= 0xfffe {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(NODE_NETWORK.network()) + host))
}

/// The lowest node index whose default CIDR overlaps none of `taken`, skipping `used` indices.
pub fn free_node_index(used: &BTreeSet<u32>, taken: &[Ipv4Net]) -> Option<u32> {
    (0..256).find(|i| {
        !used.contains(i)
            && default_pod_cidr(*i).is_some_and(|c| !taken.iter().any(|t| overlaps(c, *t)))
    })
}

/// Whether two networks share an address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Hands out host addresses of one network: the lowest free one, from `.2` (the network
/// address and `.1` are never given).
#[derive(Clone, Debug)]
pub struct IpPool {
    cidr: Ipv4Net,
    used: BTreeSet<Ipv4Addr>,
}

impl IpPool {
    pub fn new(cidr: Ipv4Net) -> Self {
        IpPool {
            cidr,
            used: BTreeSet::new(),
        }
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// Marks `ip` used; false if it is outside the pool or already used.
    pub fn claim(&mut self, ip: Ipv4Addr) -> bool {
        self.usable(ip) && self.used.insert(ip)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }

    /// Whether `ip` is an address this pool could give.
    pub fn usable(&self, ip: Ipv4Addr) -> bool {
        let offset = u32::from(ip).wrapping_sub(u32::from(self.cidr.network()));
        self.cidr.contains(&ip) && offset >= 2 && ip != self.cidr.broadcast()
    }

    /// The lowest free address, marked used.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let first = u32::from(self.cidr.network()).checked_add(2)?;
        let last = u32::from(self.cidr.broadcast()).checked_sub(1)?;
        let ip = (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| !self.used.contains(ip))?;
        self.used.insert(ip);
        Some(ip)
    }

    /// The highest free address, marked used (for service IPs: the API server keeps the low end
    /// of the range for addresses users pick themselves).
    pub fn allocate_from_top(&mut self) -> Option<Ipv4Addr> {
        let first = u32::from(self.cidr.network()).checked_add(2)?;
        let last = u32::from(self.cidr.broadcast()).checked_sub(1)?;
        let ip = (first..=last)
            .rev()
            .map(Ipv4Addr::from)
            .find(|ip| !self.used.contains(ip))?;
        self.used.insert(ip);
        Some(ip)
    }
}

/// The ranges a pod routes via [`POD_GATEWAY`]: the pod supernet, the service CIDR, the node
/// network, plus any pod CIDR or node address outside them; without covered duplicates.
pub fn cluster_routes(
    service_cidr: Ipv4Net,
    pod_cidrs: &[Ipv4Net],
    node_ips: &[Ipv4Addr],
) -> Vec<Ipv4Net> {
    let mut all = vec![POD_SUPERNET, service_cidr, NODE_NETWORK];
    all.extend(pod_cidrs.iter().copied());
    all.extend(node_ips.iter().map(|ip| Ipv4Net::from(*ip)));
    Ipv4Net::aggregate(&all)
}

/// The prefix a node (or the external client) puts on its uplink: the node network when its
/// address lies in it (a connected route to every default node and the external client), else
/// the address alone (peers then get on-link /32 routes).
pub fn uplink_prefix(ip: Ipv4Addr) -> Ipv4Net {
    if NODE_NETWORK.contains(&ip) {
        Ipv4Net::new(ip, NODE_NETWORK.prefix_len()).unwrap_or(NODE_NETWORK)
    } else {
        Ipv4Net::from(ip)
    }
}

/// `ip` batch commands that put `ip` on the uplink `dev` (with [`uplink_prefix`]) and bring it up.
pub fn uplink_commands(ip: Ipv4Addr, dev: &str) -> Vec<String> {
    vec![
        format!("addr add {} dev {dev}", uplink_prefix(ip)),
        format!("link set {dev} up"),
    ]
}

/// `ip` batch commands with which the host at `me` reaches a peer on the underlay through `dev`:
/// an on-link route to the peer's address unless `me`'s uplink prefix covers it, then the peer's
/// pod CIDR (a node's; None for the external client) via the peer's address.
pub fn peer_routes(
    me: Ipv4Addr,
    peer: Ipv4Addr,
    peer_pod_cidr: Option<Ipv4Net>,
    dev: &str,
) -> Vec<String> {
    let mut cmds = Vec::new();
    if !uplink_prefix(me).contains(&peer) {
        cmds.push(format!("route replace {peer}/32 dev {dev} scope link"));
    }
    if let Some(cidr) = peer_pod_cidr {
        cmds.push(format!("route replace {cidr} via {peer} dev {dev}"));
    }
    cmds
}

/// The commands that undo [`peer_routes`] (pod CIDR first).
pub fn peer_unroutes(
    me: Ipv4Addr,
    peer: Ipv4Addr,
    peer_pod_cidr: Option<Ipv4Net>,
    dev: &str,
) -> Vec<String> {
    let mut cmds = Vec::new();
    if let Some(cidr) = peer_pod_cidr {
        cmds.push(format!("route del {cidr} via {peer} dev {dev}"));
    }
    if !uplink_prefix(me).contains(&peer) {
        cmds.push(format!("route del {peer}/32 dev {dev}"));
    }
    cmds
}

/// Transport protocol of a port or target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Kubernetes' spelling: "TCP", "UDP".
    pub fn k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => bail!("unknown protocol {s:?} (tcp or udp)"),
        }
    }
}

/// `HOST:PORT[/udp|/tcp]` as given to probe and load. HOST is an IPv4 address or a name the
/// lab resolves (a pod, `ns/pod`, or a Service).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl FromStr for TargetSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (hostport, protocol) = match s.rsplit_once('/') {
            Some((hp, proto))
                if proto.eq_ignore_ascii_case("udp") || proto.eq_ignore_ascii_case("tcp") =>
            {
                (hp, proto.parse()?)
            }
            _ => (s, Protocol::Tcp),
        };
        let (host, port) = hostport
            .rsplit_once(':')
            .with_context(|| format!("target {s:?}: expected HOST:PORT[/udp]"))?;
        if host.is_empty() {
            bail!("target {s:?}: empty host");
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("target {s:?}: port must be 1-65535"))?;
        Ok(TargetSpec {
            host: host.to_string(),
            port,
            protocol,
        })
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)?;
        if self.protocol == Protocol::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn defaults() {
        assert_eq!(default_pod_cidr(0), Some(n("10.244.0.0/24")));
        assert_eq!(default_pod_cidr(3), Some(n("10.244.3.0/24")));
        assert_eq!(default_pod_cidr(256), None);
        assert_eq!(default_node_ip(0), Some(Ipv4Addr::new(172, 18, 0, 2)));
        assert_eq!(default_node_ip(300), Some(Ipv4Addr::new(172, 18, 1, 46)));
    }

    #[test]
    fn node_index_avoids_explicit_cidrs_and_used_indices() {
        let used = BTreeSet::from([0]);
        assert_eq!(free_node_index(&used, &[]), Some(1));
        assert_eq!(
            free_node_index(&used, &[n("10.244.1.0/24"), n("10.244.2.128/25")]),
            Some(3)
        );
        assert_eq!(
            free_node_index(&BTreeSet::new(), &[n("10.244.0.0/16")]),
            None
        );
    }

    #[test]
    fn pool_gives_lowest_free_from_dot_two() {
        let mut pool = IpPool::new(n("10.244.0.0/24"));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 244, 0, 2)));
        assert!(pool.claim(Ipv4Addr::new(10, 244, 0, 3)));
        assert!(!pool.claim(Ipv4Addr::new(10, 244, 0, 3)), "claimed twice");
        assert!(
            !pool.claim(Ipv4Addr::new(10, 244, 0, 1)),
            "gateway-ish .1 is never given"
        );
        assert!(!pool.claim(Ipv4Addr::new(10, 244, 0, 255)), "broadcast");
        assert!(!pool.claim(Ipv4Addr::new(10, 244, 1, 5)), "outside");
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 244, 0, 4)));
        pool.release(Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 244, 0, 2)));
    }

    #[test]
    fn pool_exhaustion() {
        let mut pool = IpPool::new(n("10.0.0.0/30"));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(pool.allocate(), None);
        let mut tiny = IpPool::new(n("10.0.0.0/32"));
        assert_eq!(tiny.allocate(), None);
    }

    #[test]
    fn service_ips_from_the_top() {
        let mut pool = IpPool::new(n("10.96.0.0/16"));
        assert_eq!(
            pool.allocate_from_top(),
            Some(Ipv4Addr::new(10, 96, 255, 254))
        );
        assert!(pool.claim(Ipv4Addr::new(10, 96, 255, 253)));
        assert_eq!(
            pool.allocate_from_top(),
            Some(Ipv4Addr::new(10, 96, 255, 252))
        );
    }

    #[test]
    fn routes_cover_cluster_ranges_only() {
        let routes = cluster_routes(
            n("10.96.0.0/16"),
            &[n("10.244.0.0/24"), n("10.50.0.0/24")],
            &[Ipv4Addr::new(172, 18, 0, 2), Ipv4Addr::new(192, 168, 9, 9)],
        );
        assert_eq!(
            routes,
            vec![
                n("10.50.0.0/24"),
                n("10.96.0.0/16"),
                n("10.244.0.0/16"),
                n("172.18.0.0/16"),
                n("192.168.9.9/32")
            ]
        );
        assert!(
            !routes.iter().any(|r| r.prefix_len() == 0),
            "never a default route"
        );
    }

    #[test]
    fn external_ip_is_no_default_node_ip() {
        assert!(NODE_NETWORK.contains(&EXTERNAL_IP));
        assert!((0..256).all(|i| default_node_ip(i) != Some(EXTERNAL_IP)));
    }

    #[test]
    fn uplinks_and_peer_routes() {
        let a = Ipv4Addr::new(172, 18, 0, 2);
        let b = Ipv4Addr::new(172, 18, 0, 3);
        let odd = Ipv4Addr::new(192, 168, 5, 5);
        assert_eq!(uplink_prefix(a), n("172.18.0.2/16"));
        assert_eq!(uplink_prefix(odd), n("192.168.5.5/32"));
        assert_eq!(
            uplink_commands(a, "eth0"),
            ["addr add 172.18.0.2/16 dev eth0", "link set eth0 up"]
        );
        assert_eq!(
            uplink_commands(odd, "eth0"),
            ["addr add 192.168.5.5/32 dev eth0", "link set eth0 up"]
        );
        // Off the node network, every peer gets an on-link route (here the external client).
        assert_eq!(
            peer_routes(odd, EXTERNAL_IP, None, "eth0"),
            ["route replace 172.18.255.254/32 dev eth0 scope link"]
        );
        // Inside the node network: only the pod CIDR, via the peer.
        assert_eq!(
            peer_routes(a, b, Some(n("10.244.1.0/24")), "eth0"),
            ["route replace 10.244.1.0/24 via 172.18.0.3 dev eth0"]
        );
        // A peer outside my prefix: on-link first.
        assert_eq!(
            peer_routes(a, odd, Some(n("10.50.0.0/24")), "eth0"),
            [
                "route replace 192.168.5.5/32 dev eth0 scope link",
                "route replace 10.50.0.0/24 via 192.168.5.5 dev eth0"
            ]
        );
        // The external client to a node outside the node network: the address only.
        assert_eq!(
            peer_routes(EXTERNAL_IP, odd, None, "eth0"),
            ["route replace 192.168.5.5/32 dev eth0 scope link"]
        );
        assert!(peer_routes(EXTERNAL_IP, a, None, "eth0").is_empty());
        assert_eq!(
            peer_unroutes(a, odd, Some(n("10.50.0.0/24")), "eth0"),
            [
                "route del 10.50.0.0/24 via 192.168.5.5 dev eth0",
                "route del 192.168.5.5/32 dev eth0"
            ]
        );
        for cmds in [
            uplink_commands(odd, "eth0"),
            peer_routes(a, odd, Some(n("10.50.0.0/24")), "eth0"),
        ] {
            assert!(
                !cmds
                    .iter()
                    .any(|c| c.contains("default") || c.contains("/0 ")),
                "never a default route: {cmds:?}"
            );
        }
    }

    #[test]
    fn targets() {
        let t: TargetSpec = "10.96.0.10:80".parse().unwrap();
        assert_eq!(
            t,
            TargetSpec {
                host: "10.96.0.10".into(),
                port: 80,
                protocol: Protocol::Tcp
            }
        );
        let t: TargetSpec = "web-1:53/udp".parse().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.protocol),
            ("web-1", 53, Protocol::Udp)
        );
        let t: TargetSpec = "default/web-1:8080/TCP".parse().unwrap();
        assert_eq!((t.host.as_str(), t.port), ("default/web-1", 8080));
        assert_eq!(t.to_string(), "default/web-1:8080");
        assert_eq!(
            "1.2.3.4:5/udp".parse::<TargetSpec>().unwrap().to_string(),
            "1.2.3.4:5/udp"
        );
        for bad in ["10.0.0.1", ":80", "x:0", "x:65536", "x:y", "x:80/sctp"] {
            assert!(bad.parse::<TargetSpec>().is_err(), "{bad:?} accepted");
        }
    }
}
