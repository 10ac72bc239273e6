//! Prometheus metrics of the agent (`--metrics-listen`, text format on `/metrics`), with
//! `/healthz` (the agent runs) and `/readyz` (the first sync is done) on the same port.
//! Every name has the `sluice_` prefix and its unit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::StatusCode;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::http::{self, Answer};

pub struct Metrics {
    registry: Registry,
    ready: AtomicBool,
    /// Time from a change being noticed (manifest directory settled, API event) to the maps
    /// holding it, by part ("services", "policy").
    pub programming: HistogramVec,
    /// Syncs that left something unprogrammed, by part.
    pub sync_errors: IntCounterVec,
    /// Entries written in each map, and each map's capacity.
    pub map_entries: IntGaugeVec,
    pub map_capacity: IntGaugeVec,
    /// Frontends and backends programmed.
    pub frontends: IntGauge,
    pub backends: IntGauge,
    /// Packets dropped by NetworkPolicy on this node, by direction (as the pods see it).
    pub policy_drops: IntGaugeVec,
    /// Frontends programmed per Service (namespace, name).
    pub service_frontends: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let programming = HistogramVec::new(
            HistogramOpts::new(
                "sluice_programming_duration_seconds",
                "Time from a cluster change being noticed to the eBPF maps holding it",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["part"],
        )?;
        let sync_errors = IntCounterVec::new(
            Opts::new(
                "sluice_sync_errors_total",
                "Syncs that left something unprogrammed (retried)",
            ),
            &["part"],
        )?;
        let map_entries = IntGaugeVec::new(
            Opts::new(
                "sluice_map_entries",
                "Entries the agent wrote in each BPF map",
            ),
            &["map"],
        )?;
        let map_capacity = IntGaugeVec::new(
            Opts::new(
                "sluice_map_capacity_entries",
                "Maximum entries of each BPF map",
            ),
            &["map"],
        )?;
        let frontends = IntGauge::new("sluice_frontends", "Service frontends programmed")?;
        let backends = IntGauge::new("sluice_backends", "Backends programmed")?;
        let policy_drops = IntGaugeVec::new(
            Opts::new(
                "sluice_policy_drops_packets",
                "Packets dropped by NetworkPolicy at this node's pods since they were attached",
            ),
            &["direction"],
        )?;
        let service_frontends = IntGaugeVec::new(
            Opts::new(
                "sluice_service_frontends",
                "Frontends (address, port, protocol, scope) programmed per Service",
            ),
            &["namespace", "name"],
        )?;
        registry.register(Box::new(programming.clone()))?;
        registry.register(Box::new(sync_errors.clone()))?;
        registry.register(Box::new(map_entries.clone()))?;
        registry.register(Box::new(map_capacity.clone()))?;
        registry.register(Box::new(frontends.clone()))?;
        registry.register(Box::new(backends.clone()))?;
        registry.register(Box::new(policy_drops.clone()))?;
        registry.register(Box::new(service_frontends.clone()))?;
        Ok(Metrics {
            registry,
            ready: AtomicBool::new(false),
            programming,
            sync_errors,
            map_entries,
            map_capacity,
            frontends,
            backends,
            policy_drops,
            service_frontends,
        })
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics; an empty page says so.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    fn answer(&self, path: &str) -> Answer {
        const TEXT: &str = "text/plain; version=0.0.4";
        match path {
            "/metrics" => (StatusCode::OK, TEXT, self.render()),
            "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                (StatusCode::OK, TEXT, "ok\n".into())
            }
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not synced yet\n".into(),
            ),
            _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }
}

/// Serves the metrics on `addr` until the runtime stops.
pub fn serve(metrics: Arc<Metrics>, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = http::listen(addr)?;
    tokio::spawn(http::serve(
        listener,
        Arc::new(move |path: &str| metrics.answer(path)),
    ));
    Ok(())
}
