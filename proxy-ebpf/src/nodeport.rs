//! North–south translation on the node's own interfaces: NodePort,
//! LoadBalancer IPs and externalIPs for packets from outside the node.
//!
//! Ingress sees what arrives. A packet of a known connection is translated as
//! its first one was; the first packet to an external frontend picks a backend
//! and records both directions in [`NAT_CONNTRACK`]. A remote backend gets the
//! node's address and a port of its own as source (SNAT), so its replies come
//! back here; those replies get the frontend's address back. A packet whose
//! source is now the node's own address would be dropped by the kernel as a
//! martian, so the program sends it out itself after a FIB lookup.
//!
//! Replies of local backends are not source-translated and leave through the
//! interface like any routed packet; egress gives them the frontend's address.
//!
//! IPv4 and IPv6 take one path: addresses are 16 bytes, IPv4 IPv4-mapped, as in
//! every map. Non-first IPv4 fragments carry no ports and pass untranslated, as
//! do IPv6 packets with extension headers before the transport header.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{
        bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns,
        bpf_redirect, bpf_redirect_neigh,
    },
    macros::{classifier, map},
    maps::{Array, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use proxy_common::{
    Addr, AffinityValue, BACKEND_FLAG_LOCAL, CONNTRACK_NAT, ExternalAffinityKey, IPPROTO_TCP,
    IPPROTO_UDP, NAT_ORIGINAL, NAT_REPLY, NatKey, NatValue, NodeConfig, SCOPE_EXTERNAL,
    SERVICE_FLAG_SOURCE_RANGES, SNAT_PORT_FIRST, SNAT_PORT_LAST, SOURCE_RANGE_KEY_BITS, ServiceKey,
    SourceRangeKey, idle_limit_ns, is_v4_mapped, v4_mapped,
};

/// A backend (address and port in network byte order).
struct NatBackend {
    addr: Addr,
    port: u16,
}

use crate::packet::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, SECOND_NS, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use crate::{SERVICES, choose_backend, count_created, count_service, still_valid};

/// How long a connection may go without packets.
#[inline(always)]
fn idle_limit(closing: bool, proto: u8) -> u64 {
    idle_limit_ns(closing, proto)
}

/// Both directions of every translated connection.
#[map]
static NAT_CONNTRACK: LruHashMap<NatKey, NatValue> = LruHashMap::with_max_entries(262144, 0);

/// `loadBalancerSourceRanges`: (frontend, allowed source prefix); value unused.
#[map]
static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Session affinity of outside clients, keyed by their source address.
#[map]
static EXTERNAL_AFFINITY: LruHashMap<ExternalAffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(65536, 0);

#[map]
static NODE_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const IP6_HLEN: usize = 40;
const IP6_SRC_OFF: usize = ETH_HLEN + 8;
const IP6_DST_OFF: usize = ETH_HLEN + 24;
const NO_ADDR: Addr = [0; 4];

/// Address equality word by word: a plain `==` on arrays may become a memcmp call, which
/// eBPF does not have.
#[inline(always)]
fn same(a: &Addr, b: &Addr) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[inline(always)]
fn is_none(a: &Addr) -> bool {
    a[0] | a[1] | a[2] | a[3] == 0
}

/// How many random SNAT ports a new connection tries before it is dropped.
const SNAT_PORT_TRIES: u32 = 32;
/// A closing connection's SNAT port may go to a new connection after this much quiet: its
/// last packets (the final ACK) have passed by then. Much shorter than the entry's own
/// timeout, or connection rates above ports ÷ 10 s would run out of ports.
const SNAT_REUSE_CLOSING_NS: u64 = SECOND_NS;

#[classifier]
pub fn sluice_nodeport_ingress(ctx: TcContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut tally = Tally {
        service: Counted::Nothing,
        created: 0,
    };
    let verdict = match arriving(&ctx, &packet, now, &mut tally) {
        Ok(verdict) => verdict,
        // A packet half rewritten must not travel on.
        Err(()) => TC_ACT_SHOT,
    };
    // Counted here, once the translation's stack is free again: new_connection's frame is
    // full, and a call of its own (a BPF subprogram) would add to it.
    if tally.created != 0 {
        count_created(CONNTRACK_NAT, u64::from(tally.created));
    }
    let counted = tally.service;
    if !matches!(counted, Counted::Nothing) {
        let frontend = ServiceKey::new(packet.daddr, packet.dport, packet.proto, SCOPE_EXTERNAL, 0);
        count_service(&frontend, matches!(counted, Counted::NoEndpoint));
    }
    verdict
}

#[classifier]
pub fn sluice_nodeport_egress(ctx: TcContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    match leaving(&ctx, &packet, now) {
        Ok(verdict) => verdict,
        Err(()) => TC_ACT_SHOT,
    }
}

/// What one packet changed, for the counters.
struct Tally {
    service: Counted,
    /// NAT entries created under new keys.
    created: u8,
}

/// What a packet means for the per-frontend counters.
#[derive(Clone, Copy)]
enum Counted {
    Nothing,
    /// The first packet of a connection to an external frontend.
    Connection,
    /// Dropped: the frontend has no usable endpoint.
    NoEndpoint,
}

/// The connection tuple of a TCP or UDP packet and where its parts are.
struct Packet {
    saddr: Addr,
    daddr: Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    /// IPv6 (else IPv4).
    v6: bool,
    /// Offset of the transport header.
    l4: usize,
    /// IP total length (host order), for the FIB lookup.
    tot_len: u16,
}

impl Packet {
    #[inline(always)]
    fn source_offset(&self) -> usize {
        if self.v6 { IP6_SRC_OFF } else { IP_SRC_OFF }
    }

    #[inline(always)]
    fn destination_offset(&self) -> usize {
        if self.v6 { IP6_DST_OFF } else { IP_DST_OFF }
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype == ETH_P_IP {
        parse_v4(ctx)
    } else if ethertype == ETH_P_IPV6 {
        parse_v6(ctx)
    } else {
        None
    }
}

#[inline(always)]
fn tcp_flags(ctx: &TcContext, proto: u8, l4: usize) -> Option<u8> {
    if proto == IPPROTO_TCP {
        ctx.load::<u8>(l4 + 13).ok()
    } else {
        Some(0)
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Option<Packet> {
    let version_ihl = ctx.load::<u8>(ETH_HLEN).ok()?;
    let tot_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?);
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    let proto = ctx.load::<u8>(ETH_HLEN + 9).ok()?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 || frag & 0x1fff != 0 {
        return None;
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + header_len;
    Some(Packet {
        saddr: v4_mapped(ctx.load::<u32>(IP_SRC_OFF).ok()?),
        daddr: v4_mapped(ctx.load::<u32>(IP_DST_OFF).ok()?),
        sport: ctx.load::<u16>(l4).ok()?,
        dport: ctx.load::<u16>(l4 + 2).ok()?,
        proto,
        tcp_flags: tcp_flags(ctx, proto, l4)?,
        v6: false,
        l4,
        tot_len,
    })
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Option<Packet> {
    if ctx.load::<u8>(ETH_HLEN).ok()? >> 4 != 6 {
        return None;
    }
    let payload_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).ok()?);
    // The next header must be the transport: extension headers (fragments among them)
    // are rare on this path and pass untranslated.
    let proto = ctx.load::<u8>(ETH_HLEN + 6).ok()?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + IP6_HLEN;
    Some(Packet {
        saddr: ctx.load::<Addr>(IP6_SRC_OFF).ok()?,
        daddr: ctx.load::<Addr>(IP6_DST_OFF).ok()?,
        sport: ctx.load::<u16>(l4).ok()?,
        dport: ctx.load::<u16>(l4 + 2).ok()?,
        proto,
        tcp_flags: tcp_flags(ctx, proto, l4)?,
        v6: true,
        l4,
        tot_len: payload_len.saturating_add(IP6_HLEN as u16),
    })
}

#[inline(always)]
fn key(p: &Packet, direction: u8) -> NatKey {
    NatKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        direction,
        _pad: 0,
    }
}

/// What arrives at the node from outside.
#[inline(always)]
fn arriving(ctx: &TcContext, p: &Packet, now: u64, tally: &mut Tally) -> Result<i32, ()> {
    // A reply of a source-translated connection: back to the client.
    // SAFETY: the value is copied out at once.
    if let Some(reply) = (unsafe { NAT_CONNTRACK.get(key(p, NAT_REPLY)) }).copied()
        && !is_none(&reply.nat_addr)
    {
        if !refresh_original(p, &reply, &reply.nat_addr, reply.nat_port, now) {
            return Ok(TC_ACT_OK);
        }
        rewrite_source(ctx, p, &reply.addr, reply.port)?;
        rewrite_destination(ctx, p, &reply.nat_addr, reply.nat_port)?;
        return send_out(
            ctx,
            p,
            &reply.addr,
            &reply.nat_addr,
            reply.port,
            reply.nat_port,
        );
    }

    let original_key = key(p, NAT_ORIGINAL);
    let known = NAT_CONNTRACK.get_ptr_mut(original_key);
    let entry = match known {
        // SAFETY: the pointer is valid for this program run; fields are plain data.
        Some(entry) if alive(unsafe { &*entry }, p, now) => {
            // SAFETY: as above.
            let entry = unsafe { &mut *entry };
            entry.last_seen_ns = now;
            if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                entry.closing = 1;
            }
            *entry
        }
        _ => match new_connection(p, now, tally)? {
            Some(entry) => entry,
            None => return Ok(TC_ACT_OK),
        },
    };

    rewrite_destination(ctx, p, &entry.addr, entry.port)?;
    if is_none(&entry.nat_addr) {
        // A local backend: the kernel routes the packet to the pod.
        return Ok(TC_ACT_OK);
    }
    rewrite_source(ctx, p, &entry.nat_addr, entry.nat_port)?;
    send_out(
        ctx,
        p,
        &entry.nat_addr,
        &entry.addr,
        entry.nat_port,
        entry.port,
    )
}

/// Whether a known connection's entry still holds for this packet. A SYN on
/// a closing entry is a new connection reusing the tuple.
#[inline(always)]
fn alive(entry: &NatValue, p: &Packet, now: u64) -> bool {
    let idle = now.saturating_sub(entry.last_seen_ns);
    let limit = idle_limit(entry.closing != 0, p.proto);
    let syn_only = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    idle < limit && !(entry.closing != 0 && syn_only)
}

/// Translation of the first packet to an external frontend; None when the
/// destination is not one (the packet is none of ours). Errors drop the packet.
#[inline(always)]
fn new_connection(p: &Packet, now: u64, tally: &mut Tally) -> Result<Option<NatValue>, ()> {
    let master_key = ServiceKey::new(p.daddr, p.dport, p.proto, SCOPE_EXTERNAL, 0);
    // SAFETY: the value is copied out at once.
    let Some(master) = (unsafe { SERVICES.get(master_key) }).copied() else {
        return Ok(None);
    };
    if master.flags & SERVICE_FLAG_SOURCE_RANGES != 0 {
        let range_key = SourceRangeKey {
            addr: p.daddr,
            port: p.dport,
            proto: p.proto,
            _pad: 0,
            source: p.saddr,
        };
        if SOURCE_RANGES
            .get(Key::new(SOURCE_RANGE_KEY_BITS, range_key))
            .is_none()
        {
            return Err(());
        }
    }
    // No usable endpoint (none at all, or none on this node under
    // externalTrafficPolicy: Local): dropped, as Cilium does.
    if master.count == 0 {
        tally.service = Counted::NoEndpoint;
        return Err(());
    }

    let affinity = (master.affinity_timeout_s != 0).then_some(ExternalAffinityKey {
        client: p.saddr,
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    });
    let remembered = affinity.and_then(|k| {
        // SAFETY: the value is copied out at once.
        let entry = (unsafe { EXTERNAL_AFFINITY.get(k) }).copied()?;
        still_valid(&entry, &master_key, master.affinity_timeout_s, now)
    });
    let (backend_id, backend) = choose_backend(&master_key, master.count, remembered).ok_or(())?;
    // A frontend only ever has backends of its own family; the headers are rewritten in place.
    if is_v4_mapped(&backend.addr) == p.v6 {
        return Err(());
    }
    let backend_addr = backend.addr;
    if let Some(k) = affinity {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = EXTERNAL_AFFINITY.insert(k, value, 0);
    }

    let mut original = NatValue {
        addr: backend_addr,
        nat_addr: NO_ADDR,
        port: backend.port,
        nat_port: 0,
        closing: u8::from(p.tcp_flags & (TCP_FIN | TCP_RST) != 0),
        _pad: [0; 3],
        last_seen_ns: now,
    };
    // The reply entry goes in first, so the first reply finds it.
    let mut reply_value = NatValue {
        addr: p.daddr,
        nat_addr: NO_ADDR,
        port: p.dport,
        nat_port: 0,
        closing: 0,
        _pad: [0; 3],
        last_seen_ns: 0,
    };
    if backend.flags & BACKEND_FLAG_LOCAL != 0 {
        let reply_key = NatKey {
            saddr: backend_addr,
            daddr: p.saddr,
            sport: backend.port,
            dport: p.sport,
            proto: p.proto,
            direction: NAT_REPLY,
            _pad: 0,
        };
        insert_counted(&reply_key, &reply_value, tally)?;
    } else {
        let config = NODE_CONFIG.get(0).ok_or(())?;
        let snat_addr = if p.v6 {
            config.snat_addr6
        } else {
            config.snat_addr4
        };
        if is_none(&snat_addr) {
            return Err(());
        }
        reply_value.nat_addr = p.saddr;
        reply_value.nat_port = p.sport;
        let target = NatBackend {
            addr: backend_addr,
            port: backend.port,
        };
        let port = reserve_snat_port(p, &target, &snat_addr, &reply_value, now, tally)?;
        original.nat_addr = snat_addr;
        original.nat_port = port;
    }
    // An expired entry of the tuple is overwritten; only a new key counts as created.
    insert_counted(&key(p, NAT_ORIGINAL), &original, tally)?;
    tally.service = Counted::Connection;
    Ok(Some(original))
}

/// Inserts an entry, counting it as created when its key was not in the table (else it
/// overwrites the old entry, as a plain insert would).
#[inline(always)]
fn insert_counted(k: &NatKey, v: &NatValue, tally: &mut Tally) -> Result<(), ()> {
    if NAT_CONNTRACK.insert(k, v, u64::from(BPF_NOEXIST)).is_ok() {
        tally.created += 1;
        return Ok(());
    }
    NAT_CONNTRACK.insert(k, v, 0).map_err(|_| ())
}

/// A free SNAT port (network byte order) towards `backend`, reserved by
/// writing the connection's reply entry under it.
#[inline(always)]
fn reserve_snat_port(
    p: &Packet,
    backend: &NatBackend,
    snat_addr: &Addr,
    reply_value: &NatValue,
    now: u64,
    tally: &mut Tally,
) -> Result<u16, ()> {
    let span = u32::from(SNAT_PORT_LAST - SNAT_PORT_FIRST) + 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..=SNAT_PORT_TRIES {
        // The client's own port first, as Linux's NAT does: then the backend's tuple
        // follows the client's, whose initial sequence numbers grow, so a new connection
        // is accepted by a backend socket still in TIME_WAIT from the last one.
        let port = if i == 0 {
            u16::from_be(p.sport)
        } else {
            (u32::from(SNAT_PORT_FIRST) + (start + i * 97) % span) as u16
        };
        let reply_key = NatKey {
            saddr: backend.addr,
            daddr: *snat_addr,
            sport: backend.port,
            dport: port.to_be(),
            proto: p.proto,
            direction: NAT_REPLY,
            _pad: 0,
        };
        if NAT_CONNTRACK
            .insert(reply_key, reply_value, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            tally.created += 1;
            return Ok(port.to_be());
        }
        // Taken: reuse it if the connection holding it is over.
        // SAFETY: only plain fields are read (see snat_port_free).
        let holder = unsafe { NAT_CONNTRACK.get(reply_key) };
        if holder.is_some_and(|h| snat_port_free(h, p.proto, backend, port.to_be(), now))
            && NAT_CONNTRACK.insert(reply_key, reply_value, 0).is_ok()
        {
            return Ok(port.to_be());
        }
    }
    Err(())
}

/// Whether the connection whose reply entry `holder` holds an SNAT port towards `backend` is
/// over: its original entry is gone, expired, closing and quiet, or names another translation.
#[inline(always)]
fn snat_port_free(
    holder: &NatValue,
    proto: u8,
    backend: &NatBackend,
    port_be: u16,
    now: u64,
) -> bool {
    let original_key = NatKey {
        saddr: holder.nat_addr,
        daddr: holder.addr,
        sport: holder.nat_port,
        dport: holder.port,
        proto,
        direction: NAT_ORIGINAL,
        _pad: 0,
    };
    // SAFETY: only plain fields are read; a concurrent update makes the answer stale, not
    // unsafe (the next try or packet sees the new state).
    let Some(original) = (unsafe { NAT_CONNTRACK.get(original_key) }) else {
        return true;
    };
    if original.nat_port != port_be
        || !same(&original.addr, &backend.addr)
        || original.port != backend.port
    {
        return true;
    }
    let idle = now.saturating_sub(original.last_seen_ns);
    let limit = if original.closing != 0 {
        SNAT_REUSE_CLOSING_NS
    } else {
        idle_limit(false, proto)
    };
    idle >= limit
}

/// What leaves the node: replies of local backends get the frontend's address.
#[inline(always)]
fn leaving(ctx: &TcContext, p: &Packet, now: u64) -> Result<i32, ()> {
    // SAFETY: the value is copied out at once.
    let Some(reply) = (unsafe { NAT_CONNTRACK.get(key(p, NAT_REPLY)) }).copied() else {
        return Ok(TC_ACT_OK);
    };
    if !is_none(&reply.nat_addr) || !refresh_original(p, &reply, &p.daddr, p.dport, now) {
        return Ok(TC_ACT_OK);
    }
    rewrite_source(ctx, p, &reply.addr, reply.port)?;
    Ok(TC_ACT_OK)
}

/// For a reply: whether its connection is alive and still goes to the
/// replying backend; if so the original entry, which keeps the clock for
/// both directions, is refreshed.
#[inline(always)]
fn refresh_original(
    p: &Packet,
    reply: &NatValue,
    client: &Addr,
    client_port: u16,
    now: u64,
) -> bool {
    let original_key = NatKey {
        saddr: *client,
        daddr: reply.addr,
        sport: client_port,
        dport: reply.port,
        proto: p.proto,
        direction: NAT_ORIGINAL,
        _pad: 0,
    };
    let Some(entry) = NAT_CONNTRACK.get_ptr_mut(original_key) else {
        return false;
    };
    // SAFETY: the pointer is valid for this program run; fields are plain data.
    let entry = unsafe { &mut *entry };
    let idle = now.saturating_sub(entry.last_seen_ns);
    let limit = idle_limit(entry.closing != 0, p.proto);
    if idle >= limit || !same(&entry.addr, &p.saddr) || entry.port != p.sport {
        return false;
    }
    entry.last_seen_ns = now;
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        entry.closing = 1;
    }
    true
}

/// Offset of the transport checksum, and the flags its updates need.
#[inline(always)]
fn l4_checksum(p: &Packet) -> (usize, u64) {
    if p.proto == IPPROTO_TCP {
        (p.l4 + 16, 0)
    } else {
        // A UDP checksum of 0 means "none" and must stay so.
        (p.l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    }
}

#[inline(always)]
fn rewrite_destination(ctx: &TcContext, p: &Packet, addr: &Addr, port: u16) -> Result<(), ()> {
    let at = p.destination_offset();
    rewrite(ctx, p, at, &p.daddr, addr, p.l4 + 2, p.dport, port)
}

#[inline(always)]
fn rewrite_source(ctx: &TcContext, p: &Packet, addr: &Addr, port: u16) -> Result<(), ()> {
    let at = p.source_offset();
    rewrite(ctx, p, at, &p.saddr, addr, p.l4, p.sport, port)
}

/// Replaces an address and a port, fixing the IP and transport checksums.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    p: &Packet,
    addr_off: usize,
    old_addr: &Addr,
    new_addr: &Addr,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let (csum_off, csum_flags) = l4_checksum(p);
    if !same(old_addr, new_addr) {
        if p.v6 {
            // No IPv6 header checksum; the transport checksum covers the addresses
            // through the pseudo-header, fixed by the difference of the two.
            let mut from = *old_addr;
            let mut to = *new_addr;
            // SAFETY: both buffers are 16 readable bytes on this stack.
            let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
            if diff < 0 {
                return Err(());
            }
            ctx.l4_csum_replace(
                csum_off,
                0,
                diff as u64,
                u64::from(BPF_F_PSEUDO_HDR) | csum_flags,
            )
            .map_err(|_| ())?;
            ctx.store(addr_off, new_addr, 0).map_err(|_| ())?;
        } else {
            let (old, new) = (u64::from(old_addr[3]), u64::from(new_addr[3]));
            ctx.l4_csum_replace(
                csum_off,
                old,
                new,
                u64::from(BPF_F_PSEUDO_HDR) | csum_flags | 4,
            )
            .map_err(|_| ())?;
            ctx.l3_csum_replace(IP_CSUM_OFF, old, new, 4)
                .map_err(|_| ())?;
            ctx.store(addr_off, &new_addr[3], 0).map_err(|_| ())?;
        }
    }
    if old_port != new_port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            csum_flags | 2,
        )
        .map_err(|_| ())?;
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Sends a rewritten packet (now from `saddr` to `daddr`) out of the
/// interface the routing table names, with the next hop's MAC address.
#[inline(always)]
fn send_out(
    ctx: &TcContext,
    p: &Packet,
    saddr: &Addr,
    daddr: &Addr,
    sport: u16,
    dport: u16,
) -> Result<i32, ()> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.l4_protocol = p.proto;
    params.sport = sport;
    params.dport = dport;
    params.__bindgen_anon_1.tot_len = p.tot_len;
    // SAFETY: the context is the running program's skb.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if p.v6 {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = *saddr;
        params.__bindgen_anon_4.ipv6_dst = *daddr;
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = saddr[3];
        params.__bindgen_anon_4.ipv4_dst = daddr[3];
    }
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size given.
    let found = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        ctx.store(0, &params.dmac, 0).map_err(|_| ())?;
        ctx.store(6, &params.smac, 0).map_err(|_| ())?;
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(params.ifindex, 0) } as i32);
    }
    if found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // The kernel resolves the neighbour and fills in the addresses.
        // SAFETY: a null params pointer with length 0 is allowed.
        return Ok(
            unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32,
        );
    }
    Err(())
}
