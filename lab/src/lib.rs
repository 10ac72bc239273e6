//! The Sluice lab: a single-machine stand-in for a Kubernetes cluster, driven by a directory of
//! ordinary manifests.
//!
//! Nodes and pods are network namespaces with their own cgroups (v2); pods are wired to their
//! node by a veth (routed, Calico-style: `podIP/32`, gateway 169.254.1.1, proxy ARP on the node
//! side, no default route anywhere). Nodes share an underlay (one bridge in its own netns) with
//! their node address on `eth0` and route each other's pod CIDRs; an external client on the same
//! bridge, in its own cgroup, reaches only the nodes' addresses. The lab is dual-stack by
//! default: each of these addresses has an IPv6 twin derived from it ([`addr`]), pods route the
//! lab's IPv6 ranges via `fe80::1` on their host veth, Services get cluster IPs per
//! `ipFamilyPolicy`. One `sluice-proxy` per node runs
//! in the node's netns and programs the node's cgroup. A supervisor process ([`supervisor`]) owns a lab: it
//! follows the manifests, runs a test server in every pod ([`server`]) and renders the cluster
//! as the API server would serve it for the node agents ([`render`]).
//!
//! [`Lab`] is the handle tests, the CLI, the demo and benchmarks use: [`Lab::up`], probes and
//! loads from inside pods ([`Lab::probe`], [`Lab::load`]), [`Lab::exec`], [`Lab::status`], and
//! taking the lab down on drop.

pub mod addr;
pub mod cgroup;
pub mod cleanup;
pub mod client;
mod lab;
pub mod matrix;
pub mod names;
pub mod netns;
pub mod policy_status;
pub mod preflight;
pub mod process;
pub mod render;
pub mod server;
pub mod spawn;
pub mod state;
pub mod status;
pub mod supervisor;

pub use addr::{Protocol, TargetSpec};
pub use client::{Ask, LoadReport, Outcome, ProbeResult};
pub use lab::{
    DEFAULT_PROBE_TIMEOUT, Lab, LabOptions, PROXY_BIN, PROXY_BIN_ENV, PodCommand, ProxyMode,
    SLUICE_BIN, check_manifests, default_sluice_bin, exit_code, resolve_in,
};
pub use state::{LabState, PodPhase, PodState};
pub use status::LabStatus;
