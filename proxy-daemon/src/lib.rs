//! sluice-proxy, the node agent: compiles the cluster model into service
//! tables and keeps the eBPF maps in step with them.

pub mod bpf_sys;
pub mod compile;
pub mod conntrack;
pub mod datapath;
pub mod enforcement;
pub mod flow;
pub mod health;
pub mod http;
pub mod inspect;
pub mod interfaces;
pub mod metrics;
pub mod north_south;
pub mod owners;
pub mod pins;
pub mod policy_sync;
pub mod policy_tables;
#[cfg(test)]
mod policy_test_support;
pub mod status_file;
pub mod sync;
