//! Test support (feature `testing`): never part of the daemon.

pub mod apiserver;
