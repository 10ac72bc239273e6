//! Map keys and values shared by Sluice's eBPF programs and the node agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so the kernel and user
//! space agree byte for byte. Addresses and ports are stored in network byte
//! order, exactly as the socket hooks see them, so the data path never swaps.
#![no_std]

/// IP protocol numbers as used in map keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Map names, shared so user space looks up exactly what the programs declare.
pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_SOCK_REVNAT: &str = "SOCK_REVNAT";
pub const MAP_SERVICE_CIDRS: &str = "SERVICE_CIDRS";
pub const MAP_AFFINITY: &str = "AFFINITY";
pub const MAP_AFFINITY_MATCH: &str = "AFFINITY_MATCH";

/// A service frontend (IPv4 address, port, protocol) and a slot.
///
/// Slot 0 is the frontend's master entry, holding the number of backends;
/// slots 1..=count each name one backend. Sync writes slots before the master
/// and shrinks the master before deleting slots, so a program that read the
/// master never meets a slot that points nowhere.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub slot: u16,
    pub _pad2: u16,
}

impl ServiceKey {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr: addr_be,
            port: port_be,
            proto,
            _pad: 0,
            slot,
            _pad2: 0,
        }
    }
}

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
    pub _pad: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 when off.
    pub affinity_timeout_s: u32,
    pub _pad2: u32,
}

impl ServiceValue {
    pub const fn master(count: u16, affinity_timeout_s: u32) -> Self {
        Self {
            backend_id: 0,
            count,
            _pad: 0,
            affinity_timeout_s,
            _pad2: 0,
        }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            _pad: 0,
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
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
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
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub backend_id: u32,
}

/// One backend: the endpoint address and port traffic is translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl Backend {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8) -> Self {
        Self {
            addr: addr_be,
            port: port_be,
            proto,
            _pad: 0,
        }
    }
}

/// Reverse translation for one socket: (socket cookie, backend address and
/// port) → the service address the application asked for. Read by
/// `getpeername4` and `recvmsg4` so the application only ever sees the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 12);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<AffinityMatchKey>(), 12);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<SockRevNatKey>(), 16);
        assert_eq!(size_of::<SockRevNatValue>(), 8);
    }
}
