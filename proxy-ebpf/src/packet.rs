//! What the tc programs share about packets: header offsets, TCP flags, and how long a
//! tracked connection lives without packets.

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const SECOND_NS: u64 = 1_000_000_000;
/// An established TCP connection (as Cilium's and the kernel's long timeouts).
pub const TCP_IDLE_NS: u64 = 6 * 3600 * SECOND_NS;
/// After a FIN or RST: the last packets pass, then the entry goes.
pub const CLOSING_NS: u64 = 10 * SECOND_NS;
/// UDP and everything else, which has no end of its own.
pub const OTHER_IDLE_NS: u64 = 60 * SECOND_NS;
