//! The Ingress route table: a pure compile step from Ingress objects to an immutable table, and
//! the lookup of a request's host and path in it, as the Ingress v1 API defines matching.
//!
//! `ImplementationSpecific` paths are matched as `Prefix` here.

mod route;

pub use route::{Backend, PortRef, Problem, RouteTable, compile};
