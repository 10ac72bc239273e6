//! The Sluice lab: a single-machine stand-in for a Kubernetes cluster.
pub mod addr;
pub mod cgroup;
pub mod cleanup;
pub mod client;
pub mod names;
pub mod netns;
pub mod preflight;
pub mod process;
pub mod server;
pub mod spawn;
pub mod state;
