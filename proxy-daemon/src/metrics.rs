//! Prometheus metrics of the agent (`--metrics-listen`, text format on `/metrics`), with
//! `/healthz` (the agent runs) and `/readyz` (the first sync is done) on the same port.
//! Every name has the `sluice_` prefix and its unit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hyper::StatusCode;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use proxy_common::ServiceKey;

use crate::compile::ServiceTable;
use crate::conntrack::ServiceName;
use crate::http::{self, Answer};
use crate::sync::map_addr;

pub struct Metrics {
    registry: Registry,
    ready: AtomicBool,
    /// Time from a change being noticed (manifest directory settled, API event) to the maps
    /// holding it, by part ("services", "policy").
    pub programming: HistogramVec,
    /// Syncs that left something unprogrammed, by part.
    pub sync_errors: IntCounterVec,
    /// Entries in each pinned map and each map's capacity (`map`: its name in lower case).
    pub map_entries: IntGaugeVec,
    pub map_capacity: IntGaugeVec,
    /// Frontends and backends programmed.
    pub frontends: IntGauge,
    pub backends: IntGauge,
    /// Packets dropped by NetworkPolicy on this node, by direction (as the pods see it).
    pub policy_drops: IntGaugeVec,
    /// Frontends programmed per Service (namespace, name).
    pub service_frontends: IntGaugeVec,
    /// Live connection tracking entries, by table ("nat", "policy"); see `conntrack.rs`.
    pub conntrack_entries: IntGaugeVec,
    pub conntrack_created: IntCounterVec,
    pub conntrack_gc_deleted: IntCounterVec,
    pub conntrack_evictions: IntCounterVec,
    /// New connections translated per Service, and those refused for want of endpoints.
    pub service_connections: IntCounterVec,
    pub service_no_endpoint_refusals: IntCounterVec,
    /// Which Service each frontend (master key) belongs to, from the last compiled table.
    frontend_owners: Mutex<Arc<HashMap<ServiceKey, ServiceName>>>,
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
        let table_counter =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["table"]);
        let conntrack_entries = IntGaugeVec::new(
            Opts::new(
                "sluice_conntrack_entries",
                "Live connection tracking entries (nat: translated outside connections, two per connection; policy: connections at local pods), counted at the last walk",
            ),
            &["table"],
        )?;
        let conntrack_created = table_counter(
            "sluice_conntrack_created_total",
            "Connection tracking entries the programs created under new keys, since the agent started",
        )?;
        let conntrack_gc_deleted = table_counter(
            "sluice_conntrack_gc_deleted_total",
            "Expired connection tracking entries the agent deleted, since it started",
        )?;
        let conntrack_evictions = table_counter(
            "sluice_conntrack_evictions_total",
            "Connection tracking entries pushed out of the full LRU table (created - gc deleted - growth of live entries), since the agent started; a lower bound while the table is busy",
        )?;
        let service_connections = IntCounterVec::new(
            Opts::new(
                "sluice_service_connections_total",
                "New connections this node translated to each Service (connect() calls, unconnected UDP datagrams, new connections from outside), since the agent started",
            ),
            &["namespace", "name"],
        )?;
        let service_no_endpoint_refusals = IntCounterVec::new(
            Opts::new(
                "sluice_service_no_endpoint_refusals_total",
                "Connections refused (or, from outside, dropped) because the Service had no usable endpoint, since the agent started",
            ),
            &["namespace", "name"],
        )?;
        registry.register(Box::new(conntrack_entries.clone()))?;
        registry.register(Box::new(conntrack_created.clone()))?;
        registry.register(Box::new(conntrack_gc_deleted.clone()))?;
        registry.register(Box::new(conntrack_evictions.clone()))?;
        registry.register(Box::new(service_connections.clone()))?;
        registry.register(Box::new(service_no_endpoint_refusals.clone()))?;
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
            conntrack_entries,
            conntrack_created,
            conntrack_gc_deleted,
            conntrack_evictions,
            service_connections,
            service_no_endpoint_refusals,
            frontend_owners: Mutex::default(),
        })
    }

    /// Records which Service owns each frontend of `table`, for the connection counters.
    pub fn set_frontend_owners(&self, table: &ServiceTable) {
        let owners: HashMap<ServiceKey, ServiceName> = table
            .frontends
            .iter()
            .map(|(frontend, target)| {
                (
                    frontend_key(frontend),
                    (
                        target.service.namespace.clone(),
                        target.service.name.clone(),
                    ),
                )
            })
            .collect();
        if let Ok(mut guard) = self.frontend_owners.lock() {
            *guard = Arc::new(owners);
        }
    }

    /// The frontend owners last recorded.
    pub fn frontend_owners(&self) -> Arc<HashMap<ServiceKey, ServiceName>> {
        self.frontend_owners
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
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

/// The maps whose entries the conntrack pass counts (see `conntrack.rs`).
const CONNTRACK_MAPS: [&str; 2] = [
    proxy_common::MAP_NAT_CONNTRACK,
    proxy_common::MAP_POLICY_CONNTRACK,
];

/// Sets `sluice_map_entries{map}` and `sluice_map_capacity_entries{map}` of every map pinned
/// in `pin_dir` from the kernel (the map name in lower case), now and then every `interval`
/// on a thread of its own: counting a large map takes a system call per entry.
pub fn watch_map_pressure(
    pin_dir: std::path::PathBuf,
    metrics: Arc<Metrics>,
    interval: std::time::Duration,
) -> std::io::Result<()> {
    let record = move || {
        // The conntrack tables are walked by the conntrack pass, which sets their entries.
        let counted = |name: &str| !CONNTRACK_MAPS.contains(&name);
        for map in crate::inspect::map_pressure_in(&pin_dir, counted) {
            let label = map.name.to_lowercase();
            metrics
                .map_capacity
                .with_label_values(&[label.as_str()])
                .set(i64::from(map.capacity));
            if let Some(entries) = map.entries {
                metrics
                    .map_entries
                    .with_label_values(&[label.as_str()])
                    .set(i64::try_from(entries).unwrap_or(i64::MAX));
            }
        }
    };
    record();
    std::thread::Builder::new()
        .name("map-pressure".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                record();
            }
        })
        .map(drop)
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

/// The master key of a frontend, as the programs count it.
pub fn frontend_key(frontend: &crate::compile::Frontend) -> ServiceKey {
    ServiceKey::new(
        map_addr(frontend.ip),
        frontend.port.to_be(),
        frontend.protocol.ip_proto(),
        frontend.scope.map_value(),
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{BackendAddr, Frontend, FrontendTarget, Protocol, Scope};
    use crate::sync::{ServiceMaps, Syncer};
    use cluster_model::ObjectKey;
    use proxy_common::{AffinityMatchKey, Backend, ServiceValue, SourceRangeKey};
    use std::collections::BTreeSet;
    use std::convert::Infallible;

    /// The master keys sync writes.
    #[derive(Default)]
    struct Masters(BTreeSet<ServiceKey>);

    impl ServiceMaps for Masters {
        type Error = Infallible;
        fn put_backend(&mut self, _: u32, _: Backend) -> Result<(), Infallible> {
            Ok(())
        }
        fn delete_backend(&mut self, _: u32) -> Result<(), Infallible> {
            Ok(())
        }
        fn put_service(&mut self, key: ServiceKey, _: ServiceValue) -> Result<(), Infallible> {
            if key.slot == 0 {
                self.0.insert(key);
            }
            Ok(())
        }
        fn delete_service(&mut self, key: ServiceKey) -> Result<(), Infallible> {
            self.0.remove(&key);
            Ok(())
        }
        fn put_affinity_match(&mut self, _: AffinityMatchKey) -> Result<(), Infallible> {
            Ok(())
        }
        fn delete_affinity_match(&mut self, _: AffinityMatchKey) -> Result<(), Infallible> {
            Ok(())
        }
        fn put_source_range(&mut self, _: SourceRangeKey, _: u32) -> Result<(), Infallible> {
            Ok(())
        }
        fn delete_source_range(&mut self, _: SourceRangeKey, _: u32) -> Result<(), Infallible> {
            Ok(())
        }
    }

    fn target(name: &str, backends: usize) -> FrontendTarget {
        FrontendTarget {
            service: ObjectKey {
                namespace: "default".into(),
                name: name.into(),
            },
            port_name: "http".into(),
            backends: (0..backends)
                .map(|i| BackendAddr {
                    ip: format!("10.244.0.{}", i + 1).parse().expect("ip"),
                    port: 8080,
                    local: true,
                })
                .collect(),
            affinity_timeout_s: 0,
            source_ranges: None,
        }
    }

    #[test]
    fn every_programmed_frontend_is_attributed_to_its_service() {
        let frontend = |ip: &str, port, protocol, scope| Frontend {
            ip: ip.parse().expect("ip"),
            port,
            protocol,
            scope,
        };
        let mut table = ServiceTable::default();
        for (f, t) in [
            (
                frontend("10.96.0.10", 80, Protocol::Tcp, Scope::Socket),
                target("web", 2),
            ),
            (
                frontend("10.96.0.10", 53, Protocol::Udp, Scope::Socket),
                target("web", 1),
            ),
            (
                frontend("192.168.1.5", 30080, Protocol::Tcp, Scope::External),
                target("web", 2),
            ),
            (
                frontend("fd00:10:96::1", 443, Protocol::Tcp, Scope::Socket),
                target("v6", 1),
            ),
            // No endpoints: refused, and the refusals are attributed too.
            (
                frontend("10.96.0.11", 80, Protocol::Tcp, Scope::Socket),
                target("empty", 0),
            ),
        ] {
            table.frontends.insert(f, t);
        }
        let mut maps = Masters::default();
        let report = Syncer::new().sync(&table, &mut maps);
        assert!(report.errors.is_empty());
        let metrics = Metrics::new().expect("metrics");
        metrics.set_frontend_owners(&table);
        let owners = metrics.frontend_owners();
        // The keys the programs count under are exactly the masters sync wrote.
        let owned: BTreeSet<ServiceKey> = owners.keys().copied().collect();
        assert_eq!(owned, maps.0);
        let name_of = |f: Frontend| owners[&frontend_key(&f)].1.clone();
        assert_eq!(
            name_of(frontend(
                "192.168.1.5",
                30080,
                Protocol::Tcp,
                Scope::External
            )),
            "web"
        );
        assert_eq!(
            name_of(frontend("fd00:10:96::1", 443, Protocol::Tcp, Scope::Socket)),
            "v6"
        );
        assert_eq!(
            name_of(frontend("10.96.0.11", 80, Protocol::Tcp, Scope::Socket)),
            "empty"
        );
    }
}
