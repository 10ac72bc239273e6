//! Map keys and values shared by Sluice's eBPF programs and the node agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so the kernel and user
//! space agree byte for byte. Addresses and ports are stored in network byte
//! order, exactly as the socket hooks see them, so the data path never swaps.
//!
//! Service and backend addresses are [`Addr`]: 16 bytes, IPv4 as IPv4-mapped
//! IPv6 (`::ffff:a.b.c.d`), so one set of maps serves both families and an IPv6
//! socket connecting to a mapped IPv4 address finds its Service too.
#![no_std]

/// An address as four words in network byte order, as `bpf_sock_addr.user_ip6` holds it.
pub type Addr = [u32; 4];

/// Word 2 of an IPv4-mapped address: the bytes `00 00 ff ff` read as a native-endian word.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The [`Addr`] of an IPv4 address given in network byte order (as `user_ip4` holds it).
pub const fn v4_mapped(addr_be: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, addr_be]
}

/// The [`Addr`] of 16 address bytes (network order).
pub const fn addr_from_octets(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Whether an [`Addr`] is IPv4-mapped; its IPv4 address (network order) is word 3.
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// IP protocol numbers as used in map keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_SCTP: u8 = 132;

/// Map names, shared so user space looks up exactly what the programs declare.
pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_SOCK_REVNAT: &str = "SOCK_REVNAT";
pub const MAP_SERVICE_CIDRS: &str = "SERVICE_CIDRS";
pub const MAP_AFFINITY: &str = "AFFINITY";
pub const MAP_AFFINITY_MATCH: &str = "AFFINITY_MATCH";
pub const MAP_POLICY_ENDPOINTS: &str = "POLICY_ENDPOINTS";
pub const MAP_POLICY_PEERS: &str = "POLICY_PEERS";
pub const MAP_POLICY_RULES: &str = "POLICY_RULES";
pub const MAP_POLICY_CONNTRACK: &str = "POLICY_CONNTRACK";
pub const MAP_POLICY_DROPS: &str = "POLICY_DROPS";
pub const MAP_POLICY_DROP_EVENTS: &str = "POLICY_DROP_EVENTS";
pub const MAP_NAT_CONNTRACK: &str = "NAT_CONNTRACK";
pub const MAP_SOURCE_RANGES: &str = "SOURCE_RANGES";
pub const MAP_NODE_CONFIG: &str = "NODE_CONFIG";
pub const MAP_EXTERNAL_AFFINITY: &str = "EXTERNAL_AFFINITY";
pub const MAP_SERVICE_COUNTERS: &str = "SERVICE_COUNTERS";
pub const MAP_CONNTRACK_CREATED: &str = "CONNTRACK_CREATED";

/// Indexes of [`MAP_CONNTRACK_CREATED`], a per-CPU array counting the connection tracking
/// entries the programs created under keys that were not in the table (overwrites of an
/// expired entry are not counted), so the agent can tell LRU evictions from its own
/// garbage collection.
pub const CONNTRACK_NAT: u32 = 0;
pub const CONNTRACK_POLICY: u32 = 1;
pub const CONNTRACK_TABLES: u32 = 2;

/// How long a tracked connection (NAT_CONNTRACK and POLICY_CONNTRACK) lives without
/// packets. Shared so the agent's garbage collection deletes exactly what the programs
/// already treat as over.
pub const SECOND_NS: u64 = 1_000_000_000;
/// An established TCP connection (as Cilium's and the kernel's long timeouts).
pub const TCP_IDLE_NS: u64 = 6 * 3600 * SECOND_NS;
/// After a FIN or RST: the last packets pass, then the entry goes.
pub const CLOSING_NS: u64 = 10 * SECOND_NS;
/// UDP and everything else, which has no end of its own.
pub const OTHER_IDLE_NS: u64 = 60 * SECOND_NS;

/// The idle limit of a tracked connection of protocol `proto`.
pub const fn idle_limit_ns(closing: bool, proto: u8) -> u64 {
    if closing {
        CLOSING_NS
    } else if proto == IPPROTO_TCP {
        TCP_IDLE_NS
    } else {
        OTHER_IDLE_NS
    }
}

/// Names of the tc programs enforcing NetworkPolicy on a pod's host-side interface.
/// tc ingress there sees what the pod sends (its egress), tc egress what it receives.
pub const PROGRAM_POLICY_FROM_POD: &str = "sluice_policy_from_pod";
pub const PROGRAM_POLICY_TO_POD: &str = "sluice_policy_to_pod";

/// Names of the tc programs translating north–south traffic (NodePort, LoadBalancer IPs,
/// externalIPs) on the node's own interfaces: ingress translates what arrives, egress undoes
/// the translation on replies of local backends.
pub const PROGRAM_NODEPORT_INGRESS: &str = "sluice_nodeport_ingress";
pub const PROGRAM_NODEPORT_EGRESS: &str = "sluice_nodeport_egress";

/// Who a frontend entry serves. The same address and port can mean different backends to
/// clients on the node (socket hooks: every endpoint) and to packets from outside (tc
/// programs: only local endpoints under `externalTrafficPolicy: Local`).
pub const SCOPE_SOCKET: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// A service frontend (address, port, protocol, scope) and a slot.
///
/// Slot 0 is the frontend's master entry, holding the number of backends;
/// slots 1..=count each name one backend. Sync writes slots before the master
/// and shrinks the master before deleting slots, so a program that read the
/// master never meets a slot that points nowhere.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    /// [`SCOPE_SOCKET`] or [`SCOPE_EXTERNAL`].
    pub scope: u8,
    pub slot: u16,
    pub _pad2: u16,
}

impl ServiceKey {
    pub const fn new(addr: Addr, port_be: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr,
            port: port_be,
            proto,
            scope,
            slot,
            _pad2: 0,
        }
    }
}

/// [`ServiceValue::flags`] of a master: only sources in [`SourceRangeKey`] entries of the
/// frontend may pass (`loadBalancerSourceRanges`).
pub const SERVICE_FLAG_SOURCE_RANGES: u16 = 1;

/// Master entry (slot 0): `count` backends, `backend_id` unused, and the
/// session affinity timeout (0: no affinity).
/// Slot entry (slot ≥ 1): `backend_id` names a [`Backend`].
/// A master with `count == 0` is a Service with no usable endpoints: connects
/// to it are refused at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    /// Master only: `SERVICE_FLAG_*`.
    pub flags: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 when off.
    pub affinity_timeout_s: u32,
    pub _pad2: u32,
}

impl ServiceValue {
    pub const fn master(count: u16, affinity_timeout_s: u32, flags: u16) -> Self {
        Self {
            backend_id: 0,
            count,
            flags,
            affinity_timeout_s,
            _pad2: 0,
        }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            flags: 0,
            affinity_timeout_s: 0,
            _pad2: 0,
        }
    }
}

/// Session affinity: which backend one client last got for one frontend.
///
/// At the socket layer the source address is not chosen yet when connect()
/// runs, so the client is its network namespace (one per pod), as in
/// Cilium's socket-level balancing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the client's last new connection.
    pub last_used_ns: u64,
}

/// (frontend, backend) pairs that are currently valid, for frontends with
/// session affinity. An affinity entry whose backend has left the frontend
/// (or whose id was reused) is ignored, so removing a backend moves only
/// its own clients.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    /// The scope of the frontend entry.
    pub scope: u8,
    pub backend_id: u32,
}

/// Session affinity of clients outside the node (tc programs): there the client is its
/// source address, as in kube-proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExternalAffinityKey {
    pub client: Addr,
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// [`Backend::flags`]: the endpoint runs on this node, so traffic from outside reaches it
/// without source NAT.
pub const BACKEND_FLAG_LOCAL: u8 = 1;

/// One backend: the endpoint address and port traffic is translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_FLAG_*`.
    pub flags: u8,
}

impl Backend {
    pub const fn new(addr: Addr, port_be: u16, proto: u8, flags: u8) -> Self {
        Self {
            addr,
            port: port_be,
            proto,
            flags,
        }
    }
}

/// Key of the `loadBalancerSourceRanges` trie: a frontend (all 160 bits always match), then
/// the client's address, matched to the range's prefix length (an IPv4 range is IPv4-mapped,
/// so its length is 96 more).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub source: Addr,
}

/// Prefix length (bits) of the frontend part of [`SourceRangeKey`].
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 160;
/// Prefix length (bits) of a whole [`SourceRangeKey`], as lookups give it.
pub const SOURCE_RANGE_KEY_BITS: u32 = SOURCE_RANGE_FRONTEND_BITS + 128;

/// One translated connection as the node's tc programs see it, in the direction of the
/// packet looked up. The original direction's key is (client, frontend); the reply
/// direction's is (backend, client), or (backend, node address and SNAT port) when the
/// connection was source-translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`NAT_ORIGINAL`] or [`NAT_REPLY`].
    pub direction: u8,
    pub _pad: u16,
}

pub const NAT_ORIGINAL: u8 = 0;
pub const NAT_REPLY: u8 = 1;

/// What to rewrite. Original direction: destination to (`addr`, `port`), and source to
/// (`nat_addr`, `nat_port`) when `nat_addr` is not 0. Reply direction: source to (`addr`,
/// `port`) — the frontend — and destination to (`nat_addr`, `nat_port`) — the client — when
/// `nat_addr` is not 0. Both directions of a connection are of one family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatValue {
    pub addr: Addr,
    /// All zero: no source translation.
    pub nat_addr: Addr,
    pub port: u16,
    pub nat_port: u16,
    /// A FIN or RST was seen: the connection expires soon (original direction only).
    pub closing: u8,
    pub _pad: [u8; 3],
    /// bpf_ktime_get_ns() of the last packet; kept in the original direction's entry, which
    /// both directions refresh and which decides whether the connection is alive.
    pub last_seen_ns: u64,
}

/// Per-frontend counters (per-CPU values of [`MAP_SERVICE_COUNTERS`], keyed by the
/// frontend's master [`ServiceKey`], slot 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceCounters {
    /// Translations to a backend: `connect()` calls (TCP, connected UDP) and unconnected UDP
    /// datagrams at the socket hooks; new connections from outside at the tc programs.
    pub connections: u64,
    /// Connections refused (socket hooks) or dropped (tc) because the frontend had no
    /// usable endpoint.
    pub no_endpoints: u64,
}

/// The node's own settings for the tc programs (an array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The address remote backends see as the source of source-translated IPv4 traffic
    /// (IPv4-mapped); all zero when the node has none.
    pub snat_addr4: Addr,
    /// The same for IPv6.
    pub snat_addr6: Addr,
}

/// Source ports of source-translated connections: above Linux's default ephemeral range
/// (32768–60999), so they do not meet the node's own connections.
pub const SNAT_PORT_FIRST: u16 = 61000;
pub const SNAT_PORT_LAST: u16 = 65535;

/// Reverse translation for one socket: (socket cookie, backend address and
/// port) → the service address the application asked for. Read by
/// `getpeername4` and `recvmsg4` so the application only ever sees the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
}

/// A direction as the pod sees it.
pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

/// Peer class numbers with a fixed meaning; the agent numbers the others from
/// [`POLICY_CLASS_FIRST`].
/// A rule for any peer.
pub const POLICY_CLASS_ANY: u32 = 0;
/// This node's own addresses: always allowed, both ways (probes keep working).
pub const POLICY_CLASS_OWN_NODE: u32 = 1;
pub const POLICY_CLASS_FIRST: u32 = 2;
/// What an address no prefix holds gets (cannot happen: the table has /0).
pub const POLICY_CLASS_UNKNOWN: u32 = u32::MAX;

/// Whether a pod (its host-side interface index is the map key) is isolated in
/// each direction. Every interface the programs are attached to has an entry,
/// isolated or not, so connections are tracked before isolation begins.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEndpoint {
    pub ingress_isolated: u8,
    pub egress_isolated: u8,
    pub _pad: u16,
}

impl PolicyEndpoint {
    pub const fn isolated(&self, direction: u8) -> bool {
        if direction == DIRECTION_INGRESS {
            self.ingress_isolated != 0
        } else {
            self.egress_isolated != 0
        }
    }
}

/// Key of the allow table, an LPM trie, so that "every protocol", "every port
/// of a protocol" and aligned port blocks are prefixes of one key: a pod, a
/// direction, a peer class, then protocol and port. The port is big-endian so
/// a range splits into few prefixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRuleKey {
    pub ifindex: u32,
    pub class: u32,
    pub direction: u8,
    pub proto: u8,
    pub port: [u8; 2],
}

/// Prefix lengths (bits) of [`PolicyRuleKey`].
pub const RULE_PREFIX_ANY_PROTOCOL: u32 = 72;
pub const RULE_PREFIX_ANY_PORT: u32 = 80;
pub const RULE_PREFIX_FULL: u32 = 96;

/// A connection seen at one pod's interface, in the direction of its first
/// packet. Addresses and ports in network byte order; for ICMP echo the
/// identifier stands in for the source port of a request.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConntrackKey {
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConntrackValue {
    /// bpf_ktime_get_ns() of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// The direction of the first packet.
    pub origin: u8,
    /// A FIN or RST was seen: the entry expires soon.
    pub closing: u8,
    pub _pad: [u8; 6],
}

/// Drop counters: per pod interface and direction (per-CPU values).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropCounterKey {
    pub ifindex: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// Why a packet was dropped.
pub const DROP_NOT_ALLOWED: u8 = 1;
/// Not IPv4 at an isolated pod (IPv6 policy is not enforced yet: fail closed).
pub const DROP_NOT_IPV4: u8 = 2;

/// One sampled drop, sent to the agent through a ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyDropEvent {
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub reason: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy, and have no implicit padding.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::AffinityMatchKey {}
    unsafe impl aya::Pod for super::PolicyEndpoint {}
    unsafe impl aya::Pod for super::PolicyRuleKey {}
    unsafe impl aya::Pod for super::ConntrackKey {}
    unsafe impl aya::Pod for super::ConntrackValue {}
    unsafe impl aya::Pod for super::DropCounterKey {}
    unsafe impl aya::Pod for super::ExternalAffinityKey {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::NatValue {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::PolicyDropEvent {}
    unsafe impl aya::Pod for super::ServiceCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<AffinityMatchKey>(), 24);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<SockRevNatKey>(), 32);
        assert_eq!(size_of::<SockRevNatValue>(), 20);
        assert_eq!(size_of::<PolicyEndpoint>(), 4);
        assert_eq!(size_of::<PolicyRuleKey>(), 12);
        assert_eq!(size_of::<PolicyRuleKey>() as u32 * 8, RULE_PREFIX_FULL);
        assert_eq!(size_of::<ConntrackKey>(), 20);
        assert_eq!(size_of::<ConntrackValue>(), 16);
        assert_eq!(size_of::<DropCounterKey>(), 8);
        assert_eq!(size_of::<PolicyDropEvent>(), 20);
        assert_eq!(size_of::<ExternalAffinityKey>(), 36);
        assert_eq!(size_of::<SourceRangeKey>(), 36);
        assert_eq!(
            size_of::<SourceRangeKey>() as u32 * 8,
            SOURCE_RANGE_KEY_BITS
        );
        assert_eq!(size_of::<NatKey>(), 40);
        assert_eq!(size_of::<NatValue>(), 48);
        assert_eq!(size_of::<NodeConfig>(), 32);
        assert_eq!(size_of::<ServiceCounters>(), 16);
    }

    #[test]
    fn ipv4_maps_into_the_ipv6_space() {
        let ip = [10u8, 96, 0, 10];
        let mapped = v4_mapped(u32::from_ne_bytes(ip));
        let mut octets = [0u8; 16];
        octets[10] = 0xff;
        octets[11] = 0xff;
        octets[12..].copy_from_slice(&ip);
        assert_eq!(mapped, addr_from_octets(octets));
        assert!(is_v4_mapped(&mapped));
        assert!(!is_v4_mapped(&addr_from_octets([
            0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ])));
    }
}
