//! Writes what [`crate::status`] decides: in Kubernetes mode the status subresource of our
//! Ingresses and Events about them (through kube's event recorder); in manifest mode, where
//! nothing can be written back, a log line per change and an optional status file the CLI
//! reads.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cluster_model::kube::api::{Api, Patch, PatchParams};
use cluster_model::kube::runtime::events::{Event, EventType, Recorder, Reporter};
use cluster_model::kube::{self, Resource};
use cluster_model::{ClusterSnapshot, Ingress, ObjectKey};
use serde_json::json;

use crate::class::ClassConfig;
use crate::status::{Publish, StatusAddress, join, out_of_date, status_patch, wanted};

/// The component name on Events and status writes.
pub const COMPONENT: &str = "sluice-ingress";

/// Where status goes.
pub enum Sink {
    /// The Kubernetes API.
    Api(kube::Client),
    /// Logs, and this JSON file when given (manifest mode).
    Local(Option<PathBuf>),
}

/// Keeps our Ingresses' status in step with the published addresses.
pub struct Publisher {
    publish: Publish,
    sink: Sink,
    recorder: Option<Recorder>,
    /// Manifest mode: what was last logged and written.
    last: Option<BTreeMap<ObjectKey, Vec<StatusAddress>>>,
    /// The last problem finding the addresses, logged once while it lasts.
    problem: Option<String>,
}

impl Publisher {
    pub fn new(publish: Publish, sink: Sink, instance: String) -> Publisher {
        let recorder = match &sink {
            Sink::Api(client) => Some(Recorder::new(
                client.clone(),
                Reporter {
                    controller: COMPONENT.into(),
                    instance: Some(instance),
                },
            )),
            Sink::Local(_) => None,
        };
        Publisher {
            publish,
            sink,
            recorder,
            last: None,
            problem: None,
        }
    }

    /// Brings the status of our Ingresses up to date with `snapshot`.
    pub async fn update(&mut self, snapshot: &ClusterSnapshot, class: &ClassConfig) {
        if self.publish == Publish::Nothing {
            return;
        }
        let addresses = match self.publish.addresses(snapshot) {
            Ok(a) => {
                self.problem = None;
                a
            }
            Err(problem) => {
                if self.problem.as_ref() != Some(&problem) {
                    tracing::warn!(event = "status_problem", problem = %problem, "Ingress status not updated: {problem}");
                    self.problem = Some(problem);
                }
                return;
            }
        };
        let wanted = wanted(snapshot, class, &addresses);
        match &self.sink {
            Sink::Api(client) => {
                for (key, addresses) in out_of_date(snapshot, &wanted) {
                    let api: Api<Ingress> = Api::namespaced(client.clone(), &key.namespace);
                    let patch = status_patch(&addresses);
                    match api
                        .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => tracing::info!(
                            event = "ingress_status",
                            ingress = %key,
                            addresses = %join(&addresses),
                            "Ingress {key}: status address {}",
                            join(&addresses)
                        ),
                        // The next change retries: the status still differs then.
                        Err(e) => tracing::warn!(
                            event = "status_write_failed",
                            ingress = %key,
                            error = %e,
                            "Ingress {key}: writing status.loadBalancer.ingress: {e}"
                        ),
                    }
                }
            }
            Sink::Local(file) => {
                if self.last.as_ref() == Some(&wanted) {
                    return;
                }
                let before = self.last.take().unwrap_or_default();
                for (key, addresses) in &wanted {
                    if before.get(key) != Some(addresses) {
                        tracing::info!(
                            event = "ingress_status",
                            ingress = %key,
                            addresses = %join(addresses),
                            "Ingress {key}: status address {}",
                            join(addresses)
                        );
                    }
                }
                if let Some(path) = file
                    && let Err(e) = write_status_file(path, &wanted)
                {
                    tracing::warn!(event = "status_write_failed", file = %path.display(), error = %e, "writing {}: {e}", path.display());
                }
                self.last = Some(wanted);
            }
        }
    }

    /// Tells the Ingress about a new problem with it (Kubernetes mode: a Warning Event).
    pub async fn report_problem(&self, snapshot: &ClusterSnapshot, ingress: &str, message: &str) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let (namespace, name) = ingress.split_once('/').unwrap_or(("default", ingress));
        let Some(object) = snapshot.ingresses.get(&ObjectKey::new(namespace, name)) else {
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidIngress".into(),
            // The API caps a note at 1 kB.
            note: Some(message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(event = "event_write_failed", ingress, error = %e, "Ingress {ingress}: writing an Event: {e}");
        }
    }
}

/// The status file: `{"ingresses": {"ns/name": ["addr", …]}}`, replaced whole (rename), so a
/// reader never sees half of it.
fn write_status_file(
    path: &std::path::Path,
    wanted: &BTreeMap<ObjectKey, Vec<StatusAddress>>,
) -> std::io::Result<()> {
    let ingresses: serde_json::Map<String, serde_json::Value> = wanted
        .iter()
        .map(|(k, a)| {
            let list: Vec<String> = a.iter().map(ToString::to_string).collect();
            (k.to_string(), json!(list))
        })
        .collect();
    let text = serde_json::to_vec_pretty(&json!({ "ingresses": ingresses }))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
