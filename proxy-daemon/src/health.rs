//! `healthCheckNodePort` servers: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on the node answering as
//! kube-proxy's does — 200 with the count of local endpoints when there are
//! some, 503 otherwise — so load balancers send traffic only to nodes that
//! can serve it without a second hop.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use hyper::StatusCode;
use tokio::task::JoinHandle;

use crate::compile::HealthCheck;
use crate::http::{self, Answer};

type Checks = Arc<RwLock<BTreeMap<u16, HealthCheck>>>;

/// The running health check servers, one per port.
#[derive(Default)]
pub struct HealthServers {
    checks: Checks,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

/// A health check port that could not be opened.
#[derive(Debug)]
pub struct HealthError {
    pub port: u16,
    pub check: HealthCheck,
    pub message: String,
}

impl std::fmt::Display for HealthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Service {} spec.healthCheckNodePort {}: {}",
            self.check.service, self.port, self.message
        )
    }
}

impl HealthServers {
    /// Serves exactly `wanted`: opens new ports, closes dropped ones, and
    /// answers with the new counts from now on. Must run inside the runtime.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<HealthError> {
        if let Ok(mut checks) = self.checks.write() {
            *checks = wanted.clone();
        }
        self.listeners.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut errors = Vec::new();
        for (port, check) in wanted {
            if self.listeners.contains_key(port) {
                continue;
            }
            match http::listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port))) {
                Ok(listener) => {
                    let checks = self.checks.clone();
                    let port = *port;
                    let task = tokio::spawn(http::serve(
                        listener,
                        Arc::new(move |_path: &str| answer(&checks, port)),
                    ));
                    self.listeners.insert(port, task);
                }
                Err(e) => errors.push(HealthError {
                    port: *port,
                    check: check.clone(),
                    message: format!("cannot listen: {e}"),
                }),
            }
        }
        errors
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

fn answer(checks: &Checks, port: u16) -> Answer {
    let check = checks.read().ok().and_then(|c| c.get(&port).cloned());
    match check {
        Some(check) if check.local_endpoints > 0 => (StatusCode::OK, JSON, body(&check)),
        Some(check) => (StatusCode::SERVICE_UNAVAILABLE, JSON, body(&check)),
        None => (StatusCode::SERVICE_UNAVAILABLE, JSON, "{}".to_string()),
    }
}

const JSON: &str = "application/json";

/// kube-proxy's body, field for field.
pub fn body(check: &HealthCheck) -> String {
    serde_json::json!({
        "service": {
            "namespace": check.service.namespace,
            "name": check.service.name,
        },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string()
}
