//! Sluice's eBPF programs: socket-level service load balancing for IPv4
//! (east–west traffic), below, per-packet translation of traffic from outside
//! the node ([`nodeport`]), and NetworkPolicy enforcement ([`policy`]).
//!
//! `connect4/6` and `sendmsg4/6` rewrite a service address to a backend once per
//! connection (once per datagram for unconnected UDP), so established flows pay
//! nothing per packet. `getpeername4/6` and `recvmsg4/6` undo the rewrite in what
//! the application sees, so it only ever observes the service address. Both
//! families share the maps: IPv4 addresses are keyed IPv4-mapped.
#![no_std]
#![no_main]

mod nodeport;
mod packet;
mod policy;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, bpf_sock_addr},
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, lpm_trie::Key},
    programs::SockAddrContext,
};
use proxy_common::{
    Addr, AffinityKey, AffinityMatchKey, AffinityValue, Backend, CONNTRACK_TABLES, IPPROTO_TCP,
    IPPROTO_UDP, SCOPE_SOCKET, ServiceCounters, ServiceKey, ServiceValue, SockRevNatKey,
    SockRevNatValue, v4_mapped,
};

/// Return values of cgroup sock_addr programs.
const PROCEED: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

// Sizes here are defaults; the daemon sets the real ones at load time.
#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(65536, 0);

#[map]
static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(65536, 0);

#[map]
static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(65536, 0);

/// Session affinity: (client netns, frontend) → backend and when last used.
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::with_max_entries(65536, 0);

/// Valid (frontend, backend) pairs of frontends with session affinity.
#[map]
static AFFINITY_MATCH: HashMap<AffinityMatchKey, u8> = HashMap::with_max_entries(65536, 0);

/// Service CIDRs (IPv4 ones IPv4-mapped). Traffic to an address in them that
/// no Service owns is refused, as kube-proxy's nftables mode does, instead of
/// wandering off towards a default route.
#[map]
static SERVICE_CIDRS: LpmTrie<Addr, u8> = LpmTrie::with_max_entries(64, BPF_F_NO_PREALLOC);

/// Connections translated and refused per frontend (master key), summed by the agent. LRU:
/// bounded whatever the number of frontends, and stale frontends age out.
#[map]
static SERVICE_COUNTERS: LruPerCpuHashMap<ServiceKey, ServiceCounters> =
    LruPerCpuHashMap::with_max_entries(16384, 0);

/// Connection tracking entries created under new keys, by table (`CONNTRACK_*`).
#[map]
static CONNTRACK_CREATED: PerCpuArray<u64> = PerCpuArray::with_max_entries(CONNTRACK_TABLES, 0);

/// Counts one translated (`refused` false) or refused connection of a frontend: one per-CPU
/// map update.
#[inline(always)]
pub(crate) fn count_service(master_key: &ServiceKey, refused: bool) {
    if let Some(counters) = SERVICE_COUNTERS.get_ptr_mut(master_key) {
        // SAFETY: a per-CPU value: only this CPU writes it, and a program runs to its end
        // on one CPU.
        let counters = unsafe { &mut *counters };
        if refused {
            counters.no_endpoints += 1;
        } else {
            counters.connections += 1;
        }
        return;
    }
    let first = ServiceCounters {
        connections: u64::from(!refused),
        no_endpoints: u64::from(refused),
    };
    // NOEXIST: another CPU may have created the entry meanwhile; then count into it.
    if SERVICE_COUNTERS
        .insert(master_key, first, u64::from(BPF_NOEXIST))
        .is_err()
        && let Some(counters) = SERVICE_COUNTERS.get_ptr_mut(master_key)
    {
        // SAFETY: as above.
        let counters = unsafe { &mut *counters };
        counters.connections += first.connections;
        counters.no_endpoints += first.no_endpoints;
    }
}

/// Counts `n` connection tracking entries created under new keys in `table`.
#[inline(always)]
pub(crate) fn count_created(table: u32, n: u64) {
    if let Some(count) = CONNTRACK_CREATED.get_ptr_mut(table) {
        // SAFETY: a per-CPU value: only this CPU writes it.
        unsafe { *count += n };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    translate_to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate_to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sluice_recvmsg4(ctx: SockAddrContext) -> i32 {
    translate_to_service(&ctx, Family::V4);
    // recvmsg and getpeername programs must return 1.
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeername4(ctx: SockAddrContext) -> i32 {
    translate_to_service(&ctx, Family::V4);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    translate_to_backend(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sluice_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate_to_backend(&ctx, Family::V6)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sluice_recvmsg6(ctx: SockAddrContext) -> i32 {
    translate_to_service(&ctx, Family::V6);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeername6(ctx: SockAddrContext) -> i32 {
    translate_to_service(&ctx, Family::V6);
    PROCEED
}

/// Which hook runs: the address is in `user_ip4` or in `user_ip6`.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// The hook's address as a map [`Addr`].
#[inline(always)]
fn user_addr(sa: &bpf_sock_addr, family: Family) -> Addr {
    match family {
        Family::V4 => v4_mapped(sa.user_ip4),
        // Word by word: the verifier allows 4-byte accesses to user_ip6.
        Family::V6 => [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ],
    }
}

/// Writes a map [`Addr`] of the hook's family back (IPv4 ones are mapped).
#[inline(always)]
fn set_user_addr(sa: &mut bpf_sock_addr, family: Family, addr: &Addr) {
    match family {
        Family::V4 => sa.user_ip4 = addr[3],
        Family::V6 => {
            sa.user_ip6[0] = addr[0];
            sa.user_ip6[1] = addr[1];
            sa.user_ip6[2] = addr[2];
            sa.user_ip6[3] = addr[3];
        }
    }
}

/// The program's context as a mutable struct.
///
/// # Safety
/// `ptr` must be the context the kernel handed the running program.
#[inline(always)]
unsafe fn sock_addr<'a>(ptr: *mut bpf_sock_addr) -> &'a mut bpf_sock_addr {
    // SAFETY: per the function's contract the pointer is valid and unique.
    unsafe { &mut *ptr }
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: plain helper call; connect()/sendmsg() then fail with
    // ECONNREFUSED rather than the default EPERM.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

#[inline(always)]
fn translate_to_backend(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: ctx wraps the context of the running program.
    let sa = unsafe { sock_addr(ctx.sock_addr) };
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    let service_addr = user_addr(sa, family);
    let service_port = sa.user_port as u16;

    let master_key = ServiceKey::new(service_addr, service_port, proto, SCOPE_SOCKET, 0);
    // SAFETY: the value is copied out before any other map operation.
    let Some(master) = (unsafe { SERVICES.get(master_key) }).copied() else {
        if SERVICE_CIDRS.get(Key::new(128, service_addr)).is_some() {
            return refuse();
        }
        return PROCEED;
    };
    if master.count == 0 {
        count_service(&master_key, true);
        return refuse();
    }

    let affinity = (master.affinity_timeout_s != 0).then(|| {
        // SAFETY: the context pointer is valid for this program.
        let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        AffinityKey {
            netns_cookie,
            addr: service_addr,
            port: service_port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    });
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let remembered = affinity.and_then(|key| {
        // SAFETY: the value is copied out at once.
        let entry = (unsafe { AFFINITY.get(key) }).copied()?;
        still_valid(&entry, &master_key, master.affinity_timeout_s, now)
    });
    let Some((backend_id, backend)) = choose_backend(&master_key, master.count, remembered) else {
        // A missing slot or backend can only be seen mid-update; refusing one
        // connection beats sending it to an address that may no longer serve.
        return refuse();
    };
    if let Some(key) = affinity {
        // Every new connection refreshes the client's entry: the timeout
        // counts from the last one, as kube-proxy's `recent` match does.
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(key, value, 0);
    }

    // SAFETY: the context pointer is valid for this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
        _pad2: 0,
    };
    let rev_value = SockRevNatValue {
        addr: service_addr,
        port: service_port,
        _pad: 0,
    };
    // An LRU map only fails when it cannot allocate; the connection still
    // works, only getpeername() would show the backend.
    let _ = SOCK_REVNAT.insert(rev_key, rev_value, 0);

    set_user_addr(sa, family, &backend.addr);
    sa.user_port = u32::from(backend.port);
    // connect(): one per connection; sendmsg(): one per unconnected UDP datagram (each is
    // translated on its own, and there is no flow state to tell a new flow from an old one).
    count_service(&master_key, false);
    PROCEED
}

/// The backend a client got last for `frontend` (a master key), if that was
/// less than `timeout_s` ago and the backend still belongs to the frontend.
#[inline(always)]
fn still_valid(
    entry: &AffinityValue,
    frontend: &ServiceKey,
    timeout_s: u32,
    now: u64,
) -> Option<u32> {
    if now.saturating_sub(entry.last_used_ns) >= u64::from(timeout_s) * 1_000_000_000 {
        return None;
    }
    let valid = AffinityMatchKey {
        addr: frontend.addr,
        port: frontend.port,
        proto: frontend.proto,
        scope: frontend.scope,
        backend_id: entry.backend_id,
    };
    // SAFETY: only presence is checked.
    (unsafe { AFFINITY_MATCH.get(valid) }).map(|_| entry.backend_id)
}

/// The backend for a new connection to the frontend of `master_key` (with
/// `count` ≥ 1 slots): the remembered one, else a slot picked at random.
/// None only mid-update (a slot or backend not written yet).
#[inline(always)]
fn choose_backend(
    master_key: &ServiceKey,
    count: u16,
    remembered: Option<u32>,
) -> Option<(u32, Backend)> {
    let backend_id = match remembered {
        Some(id) => id,
        None => {
            // SAFETY: plain helper call.
            let pick = unsafe { bpf_get_prandom_u32() } % u32::from(count);
            let slot_key = ServiceKey {
                slot: pick as u16 + 1,
                ..*master_key
            };
            // SAFETY: the value is copied out at once.
            (unsafe { SERVICES.get(slot_key) }).copied()?.backend_id
        }
    };
    // SAFETY: the value is copied out at once.
    let backend = (unsafe { BACKENDS.get(backend_id) }).copied()?;
    Some((backend_id, backend))
}

#[inline(always)]
fn translate_to_service(ctx: &SockAddrContext, family: Family) {
    // SAFETY: ctx wraps the context of the running program.
    let sa = unsafe { sock_addr(ctx.sock_addr) };
    // SAFETY: the context pointer is valid for this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: user_addr(sa, family),
        port: sa.user_port as u16,
        _pad: 0,
        _pad2: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(service) = (unsafe { SOCK_REVNAT.get(key) }).copied() {
        set_user_addr(sa, family, &service.addr);
        sa.user_port = u32::from(service.port);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
