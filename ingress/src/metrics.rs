//! Prometheus metrics of the controller, in a registry of its own (served on `/metrics` of the
//! metrics port). Labels are kept to what has bounded cardinality: the Ingress, host and path of
//! the rule that matched (cluster objects, as written in the Ingress), the listener, status code,
//! TLS version and ALPN protocol; never the host or path a client sends.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests by Ingress, rule host and rule path ("" when no rule matched; host "" also for
    /// a rule without host and the default backend, path "" for the default backend), listener
    /// ("http"/"https") and status code.
    pub requests: IntCounterVec,
    /// Request duration by Ingress, rule host and rule path (as `requests`).
    pub duration: HistogramVec,
    /// TLS handshakes by result ("ok"/"failed"), version ("1.2"/"1.3", "" when failed) and ALPN
    /// protocol ("h2"/"http/1.1"/"" for none or failed).
    pub tls_handshakes: IntCounterVec,
    /// Connections closed because a request head was not whole within the head deadline (those
    /// that sent nothing at all included; a TLS handshake cut short counts as a failed one).
    pub head_timeouts: IntCounter,
    /// Failed connection attempts to endpoints (each is retried on another when there is one).
    pub connect_failures: IntCounter,
    /// Configurations applied.
    pub reloads: IntCounter,
    /// Problems of the Ingresses and TLS Secrets in the configuration applied last (problems
    /// of the manifests themselves are logged as they appear).
    pub problems: IntGauge,
    /// Hosts with a certificate from a Secret, in the configuration applied last.
    pub tls_hosts: IntGauge,
    /// Requests being served now (upgraded connections included); a drain waits for zero.
    pub in_flight: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("sluice_ingress_requests_total", "Requests served"),
            &["ingress", "host", "path", "listener", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_ingress_request_duration_seconds",
                "Time from the request head to the end of the response",
            ),
            &["ingress", "host", "path"],
        )?;
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "sluice_ingress_tls_handshakes_total",
                "TLS handshakes on the HTTPS listener that completed (ok) or started and did not \
                 (failed: bad or cut data, refused, or over --request-head-timeout)",
            ),
            &["result", "version", "alpn"],
        )?;
        let head_timeouts = IntCounter::new(
            "sluice_ingress_request_head_timeouts_total",
            "Connections closed because a request head did not arrive whole in time",
        )?;
        let connect_failures = IntCounter::new(
            "sluice_ingress_upstream_connect_failures_total",
            "Failed connection attempts to endpoints",
        )?;
        let reloads = IntCounter::new("sluice_ingress_reloads_total", "Configurations applied")?;
        let problems = IntGauge::new(
            "sluice_ingress_config_problems",
            "Problems in the configuration applied last",
        )?;
        let tls_hosts = IntGauge::new(
            "sluice_ingress_tls_hosts",
            "Hosts served with a certificate from a Secret",
        )?;
        let in_flight = IntGauge::new(
            "sluice_ingress_requests_in_flight",
            "Requests being served now, upgraded connections included",
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        registry.register(Box::new(head_timeouts.clone()))?;
        registry.register(Box::new(connect_failures.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(problems.clone()))?;
        registry.register(Box::new(tls_hosts.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            duration,
            tls_handshakes,
            head_timeouts,
            connect_failures,
            reloads,
            problems,
            tls_hosts,
            in_flight,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding to a Vec fails only on metric families that cannot be written, which the
        // registry does not accept in the first place.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new().expect("metrics");
        m.requests
            .with_label_values(&["default/web", "*.example.com", "/api", "https", "200"])
            .inc();
        m.reloads.inc();
        let text = m.render();
        assert!(
            text.contains(
                "sluice_ingress_requests_total{host=\"*.example.com\",ingress=\"default/web\",listener=\"https\",path=\"/api\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("sluice_ingress_reloads_total 1"), "{text}");
    }
}
