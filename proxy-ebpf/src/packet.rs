//! What the tc programs share about packets: header offsets, TCP flags, and how long a
//! tracked connection lives without packets.

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

// Shared with the agent, whose garbage collection must agree with the programs.
pub use proxy_common::{CLOSING_NS, OTHER_IDLE_NS, SECOND_NS, TCP_IDLE_NS};
