//! NetworkPolicy enforcement on each local pod's host-side interface.
//!
//! tc ingress there sees what the pod sends (its egress), tc egress what it
//! receives (its ingress). The first packet of a connection costs one address
//! lookup (peer → class) and at most two allow lookups (that class, then any
//! peer), whatever the number of policies; later packets and replies match the
//! per-pod connection table. Connections are tracked at every managed pod,
//! isolated or not, so a connection made before a policy isolates the pod
//! keeps working, as with iptables-based implementations.

use crate::packet::{
    CLOSING_NS, ETH_HLEN, ETH_P_IP, OTHER_IDLE_NS, SECOND_NS, TCP_ACK, TCP_FIN, TCP_IDLE_NS,
    TCP_RST, TCP_SYN,
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use proxy_common::{
    CONNTRACK_POLICY, ConntrackKey, ConntrackValue, DIRECTION_EGRESS, DIRECTION_INGRESS,
    DROP_NOT_ALLOWED, DROP_NOT_IPV4, DropCounterKey, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, POLICY_CLASS_ANY, POLICY_CLASS_OWN_NODE, POLICY_CLASS_UNKNOWN, PolicyDropEvent,
    PolicyEndpoint, PolicyRuleKey, RULE_PREFIX_FULL,
};

/// Managed pods by host-side interface index.
#[map]
static POLICY_ENDPOINTS: HashMap<u32, PolicyEndpoint> = HashMap::with_max_entries(4096, 0);

/// Address (network byte order) → peer class.
#[map]
static POLICY_PEERS: LpmTrie<u32, u32> = LpmTrie::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// What isolated pods allow; the value is unused.
#[map]
static POLICY_RULES: LpmTrie<PolicyRuleKey, u8> =
    LpmTrie::with_max_entries(262144, BPF_F_NO_PREALLOC);

#[map]
static POLICY_CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue> =
    LruHashMap::with_max_entries(262144, 0);

#[map]
static POLICY_DROPS: PerCpuHashMap<DropCounterKey, u64> = PerCpuHashMap::with_max_entries(8192, 0);

#[map]
static POLICY_DROP_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU budget of sampled drop events: (window start ns, events in it).
#[map]
static DROP_SAMPLER: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Sampled drop events per CPU per second; the counters count every drop.
const DROP_EVENTS_PER_SECOND: u64 = 64;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;

#[classifier]
pub fn sluice_policy_from_pod(ctx: TcContext) -> i32 {
    enforce(&ctx, DIRECTION_EGRESS)
}

#[classifier]
pub fn sluice_policy_to_pod(ctx: TcContext) -> i32 {
    enforce(&ctx, DIRECTION_INGRESS)
}

/// A parsed IPv4 packet: its connection tuple and TCP flags.
struct Packet {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
}

enum Parsed {
    /// Not subject to policy (ARP, ICMP errors, non-IP at a pod that is not isolated).
    Pass,
    /// Not IPv4, or too short to read: dropped at isolated pods.
    Unknown,
    Ipv4(Packet),
}

#[inline(always)]
fn enforce(ctx: &TcContext, direction: u8) -> i32 {
    // SAFETY: the context pointer is the running program's skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let Some(endpoint) = (unsafe { POLICY_ENDPOINTS.get(ifindex) }).copied() else {
        return TC_ACT_OK;
    };
    let isolated = endpoint.isolated(direction);
    let packet = match parse(ctx) {
        Parsed::Pass => return TC_ACT_OK,
        Parsed::Unknown if isolated => {
            return drop_packet(ifindex, direction, DROP_NOT_IPV4, None);
        }
        Parsed::Unknown => return TC_ACT_OK,
        Parsed::Ipv4(p) => p,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if tracked(ifindex, direction, &packet, now) {
        return TC_ACT_OK;
    }
    if isolated && !allowed(ifindex, direction, &packet) {
        return drop_packet(ifindex, direction, DROP_NOT_ALLOWED, Some(&packet));
    }
    let key = conntrack_key(ifindex, &packet, false);
    let value = ConntrackValue {
        last_seen_ns: now,
        origin: direction,
        closing: u8::from(packet.tcp_flags & (TCP_FIN | TCP_RST) != 0),
        _pad: [0; 6],
    };
    // An LRU map only fails to allocate under pressure; the packet was
    // allowed, and the next one is judged again. NOEXIST first so only new keys count as
    // created; an expired entry of the tuple is overwritten.
    if POLICY_CONNTRACK
        .insert(key, value, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        crate::count_created(CONNTRACK_POLICY, 1);
    } else {
        let _ = POLICY_CONNTRACK.insert(key, value, 0);
    }
    TC_ACT_OK
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Parsed {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return Parsed::Unknown;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => {}
        ETH_P_ARP => return Parsed::Pass,
        ETH_P_IPV6 if ipv6_link_control(ctx) => return Parsed::Pass,
        _ => return Parsed::Unknown,
    }
    let (Ok(version_ihl), Ok(frag), Ok(proto), Ok(saddr), Ok(daddr)) = (
        ctx.load::<u8>(ETH_HLEN),
        ctx.load::<u16>(ETH_HLEN + 6),
        ctx.load::<u8>(ETH_HLEN + 9),
        ctx.load::<u32>(ETH_HLEN + 12),
        ctx.load::<u32>(ETH_HLEN + 16),
    ) else {
        return Parsed::Unknown;
    };
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < 20 {
        return Parsed::Unknown;
    }
    let l4 = ETH_HLEN + header_len;
    let mut packet = Packet {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
    };
    // Later fragments carry no ports: they are judged as port 0, which only
    // rules without ports allow.
    if u16::from_be(frag) & 0x1fff != 0 {
        return Parsed::Ipv4(packet);
    }
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let (Ok(sport), Ok(dport)) = (ctx.load::<u16>(l4), ctx.load::<u16>(l4 + 2)) else {
                return Parsed::Unknown;
            };
            packet.sport = sport;
            packet.dport = dport;
            if proto == IPPROTO_TCP {
                let Ok(flags) = ctx.load::<u8>(l4 + 13) else {
                    return Parsed::Unknown;
                };
                packet.tcp_flags = flags;
            }
        }
        IPPROTO_ICMP => {
            let Ok(icmp_type) = ctx.load::<u8>(l4) else {
                return Parsed::Unknown;
            };
            match icmp_type {
                // Destination unreachable, time exceeded, parameter problem:
                // they belong to a connection and path MTU discovery needs them.
                3 | 11 | 12 => return Parsed::Pass,
                // Echo request / reply: the identifier makes the tuple.
                8 | 0 => {
                    let Ok(id) = ctx.load::<u16>(l4 + 4) else {
                        return Parsed::Unknown;
                    };
                    if icmp_type == 8 {
                        packet.sport = id;
                    } else {
                        packet.dport = id;
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
    Parsed::Ipv4(packet)
}

/// IPv6's equivalent of ARP, which isolated pods must keep: link-local
/// multicast (neighbour and router discovery, MLD) and neighbour
/// solicitations and advertisements sent to one address.
#[inline(always)]
fn ipv6_link_control(ctx: &TcContext) -> bool {
    let (Ok(next_header), Ok(dst_prefix)) = (
        ctx.load::<u8>(ETH_HLEN + 6),
        ctx.load::<[u8; 2]>(ETH_HLEN + 24),
    ) else {
        return false;
    };
    if dst_prefix == [0xff, 0x02] {
        return true;
    }
    next_header == IPPROTO_ICMPV6
        && ctx
            .load::<u8>(ETH_HLEN + 40)
            .is_ok_and(|t| (133..=137).contains(&t))
}

#[inline(always)]
fn conntrack_key(ifindex: u32, p: &Packet, reversed: bool) -> ConntrackKey {
    let (saddr, daddr, sport, dport) = if reversed {
        (p.daddr, p.saddr, p.dport, p.sport)
    } else {
        (p.saddr, p.daddr, p.sport, p.dport)
    };
    ConntrackKey {
        ifindex,
        saddr,
        daddr,
        sport,
        dport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// Whether the packet belongs to a live tracked connection (either way), and
/// if so refreshes it.
#[inline(always)]
fn tracked(ifindex: u32, direction: u8, p: &Packet, now: u64) -> bool {
    let fresh_syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    for reversed in [false, true] {
        let key = conntrack_key(ifindex, p, reversed);
        let Some(entry) = POLICY_CONNTRACK.get_ptr_mut(key) else {
            continue;
        };
        // SAFETY: the pointer is to a live map value; a racing update from
        // another CPU at worst loses a refresh.
        let entry = unsafe { &mut *entry };
        // The original direction matches the tuple as is, a reply reversed.
        if (entry.origin == direction) == reversed {
            continue;
        }
        let idle_limit = if entry.closing != 0 {
            CLOSING_NS
        } else if p.proto == IPPROTO_TCP {
            TCP_IDLE_NS
        } else {
            OTHER_IDLE_NS
        };
        let expired = now.saturating_sub(entry.last_seen_ns) > idle_limit;
        // A new SYN on a closed connection's tuple is a new connection.
        if expired || (fresh_syn && entry.closing != 0) {
            return false;
        }
        if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            entry.closing = 1;
        }
        if now.saturating_sub(entry.last_seen_ns) > SECOND_NS {
            entry.last_seen_ns = now;
        }
        return true;
    }
    false
}

/// The allow lookups for a new connection at an isolated pod.
#[inline(always)]
fn allowed(ifindex: u32, direction: u8, p: &Packet) -> bool {
    let (peer, port) = if direction == DIRECTION_EGRESS {
        (p.daddr, p.dport)
    } else {
        (p.saddr, p.dport)
    };
    let class = POLICY_PEERS
        .get(Key::new(32, peer))
        .copied()
        .unwrap_or(POLICY_CLASS_UNKNOWN);
    if class == POLICY_CLASS_OWN_NODE {
        return true;
    }
    let mut key = PolicyRuleKey {
        ifindex,
        class,
        direction,
        proto: p.proto,
        port: port.to_ne_bytes(),
    };
    if POLICY_RULES.get(Key::new(RULE_PREFIX_FULL, key)).is_some() {
        return true;
    }
    key.class = POLICY_CLASS_ANY;
    POLICY_RULES.get(Key::new(RULE_PREFIX_FULL, key)).is_some()
}

#[inline(always)]
fn drop_packet(ifindex: u32, direction: u8, reason: u8, p: Option<&Packet>) -> i32 {
    let key = DropCounterKey {
        ifindex,
        direction,
        _pad: [0; 3],
    };
    match POLICY_DROPS.get_ptr_mut(key) {
        // SAFETY: a per-CPU value: only this CPU writes it.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = POLICY_DROPS.insert(key, 1, 0);
        }
    }
    if sample_drop() {
        let event = PolicyDropEvent {
            ifindex,
            saddr: p.map_or(0, |p| p.saddr),
            daddr: p.map_or(0, |p| p.daddr),
            sport: p.map_or(0, |p| p.sport),
            dport: p.map_or(0, |p| p.dport),
            proto: p.map_or(0, |p| p.proto),
            direction,
            reason,
            _pad: 0,
        };
        // A full ring only loses the sample; the counter has the drop.
        let _ = POLICY_DROP_EVENTS.output::<PolicyDropEvent>(&event, 0);
    }
    TC_ACT_SHOT
}

/// Whether this CPU may send another drop event in the current second.
#[inline(always)]
fn sample_drop() -> bool {
    let Some(state) = DROP_SAMPLER.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU value: only this CPU touches it, and programs do not
    // preempt each other on one CPU for tc.
    let state = unsafe { &mut *state };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(state[0]) >= SECOND_NS {
        state[0] = now;
        state[1] = 0;
    }
    if state[1] >= DROP_EVENTS_PER_SECOND {
        return false;
    }
    state[1] += 1;
    true
}
