//! The agent's status files (`--status-file`): what the maps cannot say — which Service a
//! frontend belongs to, which pod or uplink an interface index is, when the last sync ran —
//! written by the agent and read by `sluice lb list`, `ct list`, `policy list` and `status`
//! next to the pinned maps.
//!
//! Two files, so that a change of endpoints (the common case) rewrites a small one:
//! `<status-file>` (the agent, the last sync, interfaces, policy) after every sync, and
//! `<status-file stem>.frontends.json` (frontend → Service) only when that mapping changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compile::{Frontend, Protocol, Scope, ServiceTable};

/// Where the chart's agents write their status file, and where `sluice` looks by default.
pub const DEFAULT_PATH: &str = "/run/sluice/status.json";

/// The main status file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AgentStatus {
    pub node: String,
    pub pid: u32,
    pub bpffs_dir: String,
    /// Unix time (ms) the agent started.
    pub started_unix_ms: u64,
    pub last_sync: Option<LastSync>,
    /// Interfaces the agent's tc programs are attached to.
    pub interfaces: Vec<AttachedInterface>,
    /// The policy part (see `enforcement::PolicyStatus`); kept as JSON so readers of the
    /// other parts need not know its shape.
    pub policy: serde_json::Value,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LastSync {
    pub unix_ms: u64,
    /// What caused it: a file or object that changed, "retry", "startup".
    pub trigger: String,
    pub elapsed_ms: f64,
    pub frontends: usize,
    pub backends: usize,
    /// What could not be programmed (retried).
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceRole {
    /// A local pod's host-side interface (NetworkPolicy programs).
    Pod,
    /// Where outside traffic arrives (NodePort, LoadBalancer IPs, externalIPs).
    Uplink,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttachedInterface {
    pub ifindex: u32,
    pub name: String,
    pub role: InterfaceRole,
    /// The pod, as `namespace/name`, for pod interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// Which Service port each programmed frontend belongs to.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct FrontendOwners {
    pub frontends: Vec<FrontendOwner>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrontendOwner {
    pub address: IpAddr,
    pub port: u16,
    /// "TCP" or "UDP".
    pub protocol: String,
    /// "socket" (clients on the node) or "external" (traffic from outside).
    pub scope: String,
    /// `namespace/name`.
    pub service: String,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
}

impl FrontendOwners {
    pub fn of(table: &ServiceTable) -> Self {
        let frontends = table
            .frontends
            .iter()
            .map(|(f, target)| FrontendOwner {
                address: f.ip,
                port: f.port,
                protocol: f.protocol.to_string(),
                scope: scope_name(f.scope).into(),
                service: target.service.to_string(),
                port_name: target.port_name.clone(),
            })
            .collect();
        FrontendOwners { frontends }
    }

    /// Owners by frontend, for lookups; entries that do not parse are left out.
    pub fn by_frontend(&self) -> BTreeMap<Frontend, &FrontendOwner> {
        self.frontends
            .iter()
            .filter_map(|o| {
                let protocol = Protocol::from_k8s(Some(&o.protocol))?;
                let scope = match o.scope.as_str() {
                    "socket" => Scope::Socket,
                    "external" => Scope::External,
                    _ => return None,
                };
                let f = Frontend {
                    ip: o.address,
                    port: o.port,
                    protocol,
                    scope,
                };
                Some((f, o))
            })
            .collect()
    }
}

pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Socket => "socket",
        Scope::External => "external",
    }
}

/// Where the frontends file of a status file is.
pub fn frontends_path(status_file: &Path) -> PathBuf {
    let stem = status_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "status".into());
    status_file.with_file_name(format!("{stem}.frontends.json"))
}

/// Reads a status file (None when it is not there); errors name the file.
pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    use anyhow::Context;
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a sluice-proxy status file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so readers never see
/// half of it.
pub fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::FrontendTarget;
    use cluster_model::ObjectKey;

    #[test]
    fn owners_round_trip_through_json() {
        let mut table = ServiceTable::default();
        let frontend = Frontend {
            ip: "fd00:10:96::a".parse().unwrap(),
            port: 443,
            protocol: Protocol::Udp,
            scope: Scope::External,
        };
        table.frontends.insert(
            frontend,
            FrontendTarget {
                service: ObjectKey::new("shop", "web"),
                port_name: "quic".into(),
                backends: vec![],
                affinity_timeout_s: 0,
                source_ranges: None,
            },
        );
        let owners = FrontendOwners::of(&table);
        let json = serde_json::to_string(&owners).unwrap();
        let back: FrontendOwners = serde_json::from_str(&json).unwrap();
        let by = back.by_frontend();
        assert_eq!(by[&frontend].service, "shop/web");
        assert_eq!(by[&frontend].port_name, "quic");
    }

    #[test]
    fn frontends_file_sits_next_to_the_status_file() {
        assert_eq!(
            frontends_path(Path::new("/run/sluice/status.json")),
            Path::new("/run/sluice/status.frontends.json")
        );
    }
}
