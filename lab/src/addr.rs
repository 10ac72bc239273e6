//! Address plan of a lab and the allocators that hand addresses out.
//!
//! Routed, Calico-style, no bridge between pods: every pod has `podIP/32` on `eth0` and reaches
//! everything through the link-local gateway [`POD_GATEWAY`], which its node answers for. The lab
//! owns [`POD_SUPERNET`] (node pod CIDRs are carved from it unless a Node names its own), the
//! service CIDR, and [`NODE_NETWORK`] for node addresses. Nodes sit on an underlay (one bridge)
//! with their node address on their uplink; each node routes every other node's pod CIDR via that
//! node's address (no overlay). The external client [`EXTERNAL_IP`] sits on the same bridge and
//! routes only to the nodes' addresses. No namespace gets a default route.
//!
//! Dual-stack: every IPv4 address of the plan has an IPv6 twin derived from it, so nothing new
//! needs configuring. The octets are written as hexadecimal groups with the same digits, so
//! the twin reads like the original: pod `10.244.1.17` is `fd00:10:244:1::17` in its node's
//! `fd00:10:244:1::/64`, node `172.18.0.2` is `fd00:172:18::2` on the underlay's
//! `fd00:172:18::/64`. Pods route the lab's IPv6 ranges via the link-local [`POD_GATEWAY6`],
//! which every host-side veth carries.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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

/// The pods' IPv6 supernet: the twins of [`POD_SUPERNET`]'s /24s are its /64s.
pub const POD_SUPERNET6: Ipv6Net = net6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0), 48);
/// The default IPv6 service CIDR (kind's).
pub const DEFAULT_SERVICE_CIDR6: Ipv6Net =
    net6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0), 112);
/// The underlay's IPv6 network: every derived node address and [`EXTERNAL_IP6`] are in it.
pub const NODE_NETWORK6: Ipv6Net = net6(Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, 0), 64);
/// The IPv6 gateway of every pod: configured on each host-side veth (link-local, so the same
/// address on every veth is fine).
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The external client's IPv6 address; no derived node address has a hex digit above 9, so
/// `fffe` is no node's.
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, 0xfffe);

const fn net(addr: Ipv4Addr, len: u8) -> Ipv4Net {
    match Ipv4Net::new(addr, len) {
        Ok(n) => n,
        Err(_) => panic!("bad constant network"),
    }
}

const fn net6(addr: Ipv6Addr, len: u8) -> Ipv6Net {
    match Ipv6Net::new(addr, len) {
        Ok(n) => n,
        Err(_) => panic!("bad constant network"),
    }
}

/// `n` written in decimal, read as hexadecimal (17 → 0x17): what makes a twin readable.
/// Injective; a u32 has at most 10 decimal digits, which fit 40 bits.
fn spelled(n: u32) -> u64 {
    n.to_string()
        .bytes()
        .fold(0u64, |acc, d| (acc << 4) | u64::from(d - b'0'))
}

/// The IPv6 twin of an IPv4 pod CIDR: `a.b.c.0/≤24` → `fd00:a:b:c::/64`; a CIDR longer than /24
/// (`a.b.c.d/25`) → `fd00:a:b:c:d::/80`, so that two such CIDRs in one /24 stay apart.
pub fn pod_cidr6_of(cidr: Ipv4Net) -> Ipv6Net {
    let [a, b, c, d] = cidr.network().octets();
    let g = |o: u8| spelled(u32::from(o)) as u16;
    if cidr.prefix_len() <= 24 {
        net6_or_host(Ipv6Addr::new(0xfd00, g(a), g(b), g(c), 0, 0, 0, 0), 64)
    } else {
        net6_or_host(Ipv6Addr::new(0xfd00, g(a), g(b), g(c), g(d), 0, 0, 0), 80)
    }
}

fn net6_or_host(addr: Ipv6Addr, len: u8) -> Ipv6Net {
    Ipv6Net::new(addr, len).unwrap_or_else(|_| Ipv6Net::from(addr))
}

/// The IPv6 twin of a pod's IPv4 address: its node's IPv6 pod CIDR plus the address's offset in
/// the IPv4 pod CIDR, spelled (`10.244.1.17` in `10.244.1.0/24` → `fd00:10:244:1::17`). When
/// the spelled offset does not fit (an IPv6 CIDR a Node named, smaller than the IPv4 one), the
/// plain offset; None if even that does not fit.
pub fn pod_ip6_of(ip: Ipv4Addr, cidr: Ipv4Net, cidr6: Ipv6Net) -> Option<Ipv6Addr> {
    if !cidr.contains(&ip) {
        return None;
    }
    let offset = u32::from(ip) - u32::from(cidr.network());
    let base = u128::from(cidr6.network());
    [u128::from(spelled(offset)), u128::from(offset)]
        .into_iter()
        .filter_map(|o| base.checked_add(o).map(Ipv6Addr::from))
        .find(|a| cidr6.contains(a) && *a != cidr6.network())
}

/// The IPv6 twin of a node address, on [`NODE_NETWORK6`]: `172.18.c.d` → `fd00:172:18::c:d`
/// (`::d` when c is 0), any other `a.b.c.d` → `fd00:172:18::a:b:c:d` (a ≠ 0 keeps the two
/// forms apart).
pub fn node_ip6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = ip.octets();
    let g = |o: u8| spelled(u32::from(o)) as u16;
    let mut seg = NODE_NETWORK6.network().segments();
    if NODE_NETWORK.contains(&ip) {
        seg[6] = g(c);
        seg[7] = g(d);
    } else {
        seg[4..].copy_from_slice(&[g(a), g(b), g(c), g(d)]);
    }
    Ipv6Addr::from(seg)
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

/// Hands out IPv6 host addresses of one network, as [`IpPool`] does (never the network address
/// or `::1`, nor the last address).
#[derive(Clone, Debug)]
pub struct Ip6Pool {
    cidr: Ipv6Net,
    used: BTreeSet<Ipv6Addr>,
}

impl Ip6Pool {
    pub fn new(cidr: Ipv6Net) -> Self {
        Ip6Pool {
            cidr,
            used: BTreeSet::new(),
        }
    }

    pub fn cidr(&self) -> Ipv6Net {
        self.cidr
    }

    /// Marks `ip` used; false if it is outside the pool or already used.
    pub fn claim(&mut self, ip: Ipv6Addr) -> bool {
        self.usable(ip) && self.used.insert(ip)
    }

    pub fn usable(&self, ip: Ipv6Addr) -> bool {
        let offset = u128::from(ip).wrapping_sub(u128::from(self.cidr.network()));
        self.cidr.contains(&ip) && offset >= 2 && ip != self.cidr.broadcast()
    }

    /// The highest free address, marked used (service IPs, as [`IpPool::allocate_from_top`]).
    /// Searches at most 65536 addresses: plenty for a lab, and bounded for a /64.
    pub fn allocate_from_top(&mut self) -> Option<Ipv6Addr> {
        let first = u128::from(self.cidr.network()).checked_add(2)?;
        let last = u128::from(self.cidr.broadcast()).checked_sub(1)?;
        let ip = (first..=last)
            .rev()
            .take(1 << 16)
            .map(Ipv6Addr::from)
            .find(|ip| !self.used.contains(ip))?;
        self.used.insert(ip);
        Some(ip)
    }

    /// The lowest free address, marked used (at most 65536 tried).
    pub fn allocate(&mut self) -> Option<Ipv6Addr> {
        let first = u128::from(self.cidr.network()).checked_add(2)?;
        let last = u128::from(self.cidr.broadcast()).checked_sub(1)?;
        let ip = (first..=last)
            .take(1 << 16)
            .map(Ipv6Addr::from)
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

/// The IPv6 ranges a pod routes via [`POD_GATEWAY6`], as [`cluster_routes`] for IPv4.
pub fn cluster_routes6(
    service_cidr: Ipv6Net,
    pod_cidrs: &[Ipv6Net],
    node_ips: &[Ipv6Addr],
) -> Vec<Ipv6Net> {
    let mut all = vec![POD_SUPERNET6, service_cidr, NODE_NETWORK6];
    all.extend(pod_cidrs.iter().copied());
    all.extend(node_ips.iter().map(|ip| Ipv6Net::from(*ip)));
    Ipv6Net::aggregate(&all)
}

/// The prefix a node (or the external client) puts on its uplink: the node network of the
/// address's family when the address lies in it (a connected route to every default node and
/// the external client), else the address alone (peers then get on-link host routes).
pub fn uplink_prefix(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(ip) if NODE_NETWORK.contains(&ip) => {
            IpNet::V4(Ipv4Net::new(ip, NODE_NETWORK.prefix_len()).unwrap_or(NODE_NETWORK))
        }
        IpAddr::V6(ip) if NODE_NETWORK6.contains(&ip) => {
            IpNet::V6(Ipv6Net::new(ip, NODE_NETWORK6.prefix_len()).unwrap_or(NODE_NETWORK6))
        }
        ip => IpNet::from(ip),
    }
}

/// `ip` batch commands that put `ips` on the uplink `dev` (with [`uplink_prefix`]) and bring it
/// up. IPv6 addresses skip duplicate address detection: the lab owns the range, and they are
/// usable at once.
pub fn uplink_commands(ips: &[IpAddr], dev: &str) -> Vec<String> {
    let mut cmds: Vec<String> = ips
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(_) => format!("addr add {} dev {dev}", uplink_prefix(*ip)),
            IpAddr::V6(_) => format!("addr add {} dev {dev} nodad", uplink_prefix(*ip)),
        })
        .collect();
    cmds.push(format!("link set {dev} up"));
    cmds
}

/// `ip` batch commands with which the host at `me` reaches a peer on the underlay through `dev`:
/// an on-link route to the peer's address unless `me`'s uplink prefix covers it, then the peer's
/// pod CIDR (a node's; None for the external client) via the peer's address. `me`, `peer` and
/// the CIDR are of one family.
pub fn peer_routes(
    me: IpAddr,
    peer: IpAddr,
    peer_pod_cidr: Option<IpNet>,
    dev: &str,
) -> Vec<String> {
    let mut cmds = Vec::new();
    if !uplink_prefix(me).contains(&peer) {
        cmds.push(match peer {
            IpAddr::V4(_) => format!("route replace {peer}/32 dev {dev} scope link"),
            IpAddr::V6(_) => format!("route replace {peer}/128 dev {dev}"),
        });
    }
    if let Some(cidr) = peer_pod_cidr {
        cmds.push(format!("route replace {cidr} via {peer} dev {dev}"));
    }
    cmds
}

/// The commands that undo [`peer_routes`] (pod CIDR first).
pub fn peer_unroutes(
    me: IpAddr,
    peer: IpAddr,
    peer_pod_cidr: Option<IpNet>,
    dev: &str,
) -> Vec<String> {
    let mut cmds = Vec::new();
    if let Some(cidr) = peer_pod_cidr {
        cmds.push(format!("route del {cidr} via {peer} dev {dev}"));
    }
    if !uplink_prefix(me).contains(&peer) {
        let len = if peer.is_ipv4() { 32 } else { 128 };
        cmds.push(format!("route del {peer}/{len} dev {dev}"));
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

/// `HOST:PORT[/udp|/tcp]` as given to probe and load. HOST is an IPv4 address, an IPv6 address
/// in brackets (`[fd00:10:96::a]:80`), or a name the lab resolves (a pod, `ns/pod`, or a
/// Service). `host` holds the address without brackets.
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
        // An IPv6 address is bracketed, as in a URL: [fd00:10:96::a]:80.
        let (host, port) = match hostport.strip_prefix('[') {
            Some(rest) => {
                let (host, port) = rest
                    .split_once("]:")
                    .with_context(|| format!("target {s:?}: expected [IPV6]:PORT[/udp]"))?;
                if host.parse::<Ipv6Addr>().is_err() {
                    bail!("target {s:?}: {host:?} is not an IPv6 address");
                }
                (host, port)
            }
            None => hostport
                .rsplit_once(':')
                .with_context(|| format!("target {s:?}: expected HOST:PORT[/udp]"))?,
        };
        if host.is_empty() {
            bail!("target {s:?}: empty host");
        }
        if host.contains(':') && !hostport.starts_with('[') {
            bail!("target {s:?}: write an IPv6 address in brackets: [IPV6]:PORT");
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
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
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
        let a: IpAddr = Ipv4Addr::new(172, 18, 0, 2).into();
        let b: IpAddr = Ipv4Addr::new(172, 18, 0, 3).into();
        let odd: IpAddr = Ipv4Addr::new(192, 168, 5, 5).into();
        let x: IpAddr = EXTERNAL_IP.into();
        let c = |s: &str| Some(s.parse::<IpNet>().unwrap());
        assert_eq!(uplink_prefix(a), "172.18.0.2/16".parse::<IpNet>().unwrap());
        assert_eq!(
            uplink_prefix(odd),
            "192.168.5.5/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            uplink_commands(&[a], "eth0"),
            ["addr add 172.18.0.2/16 dev eth0", "link set eth0 up"]
        );
        assert_eq!(
            uplink_commands(&[odd], "eth0"),
            ["addr add 192.168.5.5/32 dev eth0", "link set eth0 up"]
        );
        // Off the node network, every peer gets an on-link route (here the external client).
        assert_eq!(
            peer_routes(odd, x, None, "eth0"),
            ["route replace 172.18.255.254/32 dev eth0 scope link"]
        );
        // Inside the node network: only the pod CIDR, via the peer.
        assert_eq!(
            peer_routes(a, b, c("10.244.1.0/24"), "eth0"),
            ["route replace 10.244.1.0/24 via 172.18.0.3 dev eth0"]
        );
        // A peer outside my prefix: on-link first.
        assert_eq!(
            peer_routes(a, odd, c("10.50.0.0/24"), "eth0"),
            [
                "route replace 192.168.5.5/32 dev eth0 scope link",
                "route replace 10.50.0.0/24 via 192.168.5.5 dev eth0"
            ]
        );
        // The external client to a node outside the node network: the address only.
        assert_eq!(
            peer_routes(x, odd, None, "eth0"),
            ["route replace 192.168.5.5/32 dev eth0 scope link"]
        );
        assert!(peer_routes(x, a, None, "eth0").is_empty());
        assert_eq!(
            peer_unroutes(a, odd, c("10.50.0.0/24"), "eth0"),
            [
                "route del 10.50.0.0/24 via 192.168.5.5 dev eth0",
                "route del 192.168.5.5/32 dev eth0"
            ]
        );
        for cmds in [
            uplink_commands(&[odd], "eth0"),
            peer_routes(a, odd, c("10.50.0.0/24"), "eth0"),
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
    fn ipv6_twins_read_like_the_ipv4_plan() {
        let c6 = |s: &str| s.parse::<Ipv6Net>().unwrap();
        let ip6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(pod_cidr6_of(n("10.244.0.0/24")), c6("fd00:10:244::/64"));
        assert_eq!(pod_cidr6_of(n("10.244.3.0/24")), c6("fd00:10:244:3::/64"));
        assert_eq!(
            pod_cidr6_of(n("10.244.255.0/24")),
            c6("fd00:10:244:255::/64")
        );
        assert!(POD_SUPERNET6.contains(&pod_cidr6_of(n("10.244.255.0/24"))));
        // Longer than /24: the fourth octet stays in, so neighbours do not collide.
        assert_eq!(pod_cidr6_of(n("10.50.1.0/25")), c6("fd00:10:50:1:0::/80"));
        assert_eq!(
            pod_cidr6_of(n("10.50.1.128/25")),
            c6("fd00:10:50:1:128::/80")
        );
        assert_eq!(pod_cidr6_of(n("10.50.0.0/16")), c6("fd00:10:50::/64"));

        let cidr = n("10.244.1.0/24");
        let cidr6 = pod_cidr6_of(cidr);
        let twin = |ip: &str| pod_ip6_of(ip.parse().unwrap(), cidr, cidr6);
        assert_eq!(twin("10.244.1.17"), Some(ip6("fd00:10:244:1::17")));
        assert_eq!(twin("10.244.1.254"), Some(ip6("fd00:10:244:1::254")));
        assert_eq!(twin("10.244.2.1"), None, "outside the IPv4 CIDR");
        // A /16 pod CIDR: offsets past 255 stay readable and distinct.
        let big = n("10.50.0.0/16");
        assert_eq!(
            pod_ip6_of("10.50.1.5".parse().unwrap(), big, pod_cidr6_of(big)),
            Some(ip6("fd00:10:50::261"))
        );
        // A small IPv6 CIDR a Node named: the plain offset when the spelled one does not fit.
        let small = c6("fd00:99::/120");
        assert_eq!(
            pod_ip6_of("10.244.1.200".parse().unwrap(), cidr, small),
            Some(ip6("fd00:99::c8"))
        );
        assert_eq!(
            pod_ip6_of("10.244.1.5".parse().unwrap(), cidr, c6("fd00:99::/128")),
            None
        );

        assert_eq!(
            node_ip6_of(Ipv4Addr::new(172, 18, 0, 2)),
            ip6("fd00:172:18::2")
        );
        assert_eq!(
            node_ip6_of(Ipv4Addr::new(172, 18, 1, 46)),
            ip6("fd00:172:18::1:46")
        );
        assert_eq!(
            node_ip6_of(Ipv4Addr::new(192, 168, 5, 5)),
            ip6("fd00:172:18::192:168:5:5")
        );
        assert!((0..300).all(|i| {
            let v6 = node_ip6_of(default_node_ip(i).unwrap());
            NODE_NETWORK6.contains(&v6) && v6 != EXTERNAL_IP6
        }));
        assert!(NODE_NETWORK6.contains(&EXTERNAL_IP6));
    }

    #[test]
    fn ipv6_uplinks_routes_and_pool() {
        let a: IpAddr = "fd00:172:18::2".parse().unwrap();
        let b: IpAddr = "fd00:172:18::3".parse().unwrap();
        let odd: IpAddr = "fd00:99::5".parse().unwrap();
        assert_eq!(
            uplink_commands(&[Ipv4Addr::new(172, 18, 0, 2).into(), a], "eth0"),
            [
                "addr add 172.18.0.2/16 dev eth0",
                "addr add fd00:172:18::2/64 dev eth0 nodad",
                "link set eth0 up"
            ]
        );
        assert_eq!(
            peer_routes(a, b, Some("fd00:10:244:1::/64".parse().unwrap()), "eth0"),
            ["route replace fd00:10:244:1::/64 via fd00:172:18::3 dev eth0"]
        );
        assert_eq!(
            peer_routes(a, odd, None, "eth0"),
            ["route replace fd00:99::5/128 dev eth0"]
        );
        assert_eq!(
            peer_unroutes(a, odd, None, "eth0"),
            ["route del fd00:99::5/128 dev eth0"]
        );
        let routes = cluster_routes6(
            DEFAULT_SERVICE_CIDR6,
            &[
                "fd00:10:244:1::/64".parse().unwrap(),
                "fd00:50::/64".parse().unwrap(),
            ],
            &["fd00:172:18::2".parse().unwrap()],
        );
        let shown: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "fd00:10:96::/112",
                "fd00:10:244::/48",
                "fd00:50::/64",
                "fd00:172:18::/64"
            ]
        );

        let mut pool = Ip6Pool::new(DEFAULT_SERVICE_CIDR6);
        assert_eq!(
            pool.allocate_from_top(),
            Some("fd00:10:96::fffe".parse().unwrap())
        );
        assert!(pool.claim("fd00:10:96::fffd".parse().unwrap()));
        assert!(
            !pool.claim("fd00:10:96::fffd".parse().unwrap()),
            "claimed twice"
        );
        assert!(!pool.claim("fd00:10:96::1".parse().unwrap()));
        assert!(!pool.claim("fd00:10:97::5".parse().unwrap()), "outside");
        assert_eq!(
            pool.allocate_from_top(),
            Some("fd00:10:96::fffc".parse().unwrap())
        );
        assert_eq!(pool.allocate(), Some("fd00:10:96::2".parse().unwrap()));
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
        let t: TargetSpec = "[fd00:10:96::a]:80/udp".parse().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.protocol),
            ("fd00:10:96::a", 80, Protocol::Udp)
        );
        assert_eq!(t.to_string(), "[fd00:10:96::a]:80/udp");
        for bad in [
            "10.0.0.1",
            ":80",
            "x:0",
            "x:65536",
            "x:y",
            "x:80/sctp",
            "fd00::1:80",
            "[fd00::1]",
            "[nope]:80",
            "[]:80",
        ] {
            assert!(bad.parse::<TargetSpec>().is_err(), "{bad:?} accepted");
        }
    }
}
