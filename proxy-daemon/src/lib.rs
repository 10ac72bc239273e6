//! sluice-proxy, the node agent: compiles the cluster model into service
//! tables and keeps the eBPF maps in step with them.

pub mod compile;
pub mod datapath;
pub mod sync;
