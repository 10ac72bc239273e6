//! Empty on purpose: the eBPF programs live in the `sluice-proxy-ebpf` binary.
#![no_std]
