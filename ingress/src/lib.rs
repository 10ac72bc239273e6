//! The Ingress controller: pure compile steps from the cluster model to immutable tables, and the
//! Pingora proxy that serves them.
//!
//! - [`route`]: Ingress objects to a route table, and the lookup of a request's host and path in
//!   it, as the Ingress v1 API defines matching. `ImplementationSpecific` paths are matched as
//!   `Prefix` here (element-wise, trailing slash ignored).
//! - [`annotations`]: the ingress-nginx annotations understood (others are reported).
//! - [`class`]: which Ingresses are ours (IngressClass, the old annotation, the default class).
//! - [`config`]: a whole snapshot to routes, endpoints and TLS hosts.
//! - [`certs`]: TLS Secrets to rustls certificates, chosen by SNI.
//! - [`metrics`]: Prometheus metrics.
//! - [`proxy`]: the Pingora proxy serving a [`proxy::State`] swapped atomically on change.
//! - [`status`]: the addresses written to our Ingresses' status; [`publish`] writes them (and
//!   Events) to the API, or logs them and a status file in manifest mode.

pub mod annotations;
pub mod certs;
pub mod class;
pub mod config;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod publish;
pub mod route;
pub mod status;

pub use route::{Backend, PortRef, Problem, RouteTable, compile};
