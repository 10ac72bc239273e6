//! One interface over both sources, for the node agent: wait for a change, then read a
//! [`Reload`].

use std::path::Path;
use std::time::Duration;

use crate::kube_source::KubeSource;
use crate::source::{ManifestSource, Reload};
use crate::watch::{DirWatch, WatchError, watch_dir};

/// Where the cluster model comes from: a watched manifest directory or the Kubernetes API.
#[derive(Debug)]
pub enum ClusterSource {
    Manifests(Box<WatchedManifests>),
    Kubernetes(KubeSource),
}

/// A [`ManifestSource`] with the watch on its directory.
pub struct WatchedManifests {
    pub source: ManifestSource,
    changes: tokio::sync::mpsc::Receiver<()>,
    /// Whether the first (startup) read is still due.
    first: bool,
    _watch: DirWatch,
}

impl std::fmt::Debug for WatchedManifests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedManifests")
            .field("dir", &self.source.dir())
            .finish_non_exhaustive()
    }
}

impl ClusterSource {
    /// Watches `dir` (changes settle for `settle` before they count), then reads it. The watch
    /// starts before the first read, so no change slips between the two.
    pub fn manifests(dir: &Path, settle: Duration) -> Result<ClusterSource, WatchError> {
        let (watch, changes) = watch_dir(dir, settle)?;
        Ok(ClusterSource::Manifests(Box::new(WatchedManifests {
            source: ManifestSource::new(dir),
            changes,
            first: true,
            _watch: watch,
        })))
    }

    /// Reads the cluster through its API.
    pub fn kubernetes(source: KubeSource) -> ClusterSource {
        ClusterSource::Kubernetes(source)
    }

    /// Waits until there is something (new) to read: a manifest directory is read at once the
    /// first time; the API once every kind has been listed. Returns what prompted the read
    /// ("startup", "manifests changed" or "api changed"), or `None` when the source ended.
    pub async fn changed(&mut self) -> Option<&'static str> {
        match self {
            ClusterSource::Manifests(m) => {
                if std::mem::take(&mut m.first) {
                    return Some("startup");
                }
                m.changes.recv().await.map(|()| "manifests changed")
            }
            ClusterSource::Kubernetes(k) => {
                let first = !k.has_published();
                k.changed()
                    .await
                    .then_some(if first { "startup" } else { "api changed" })
            }
        }
    }

    /// The current snapshot and the problems not reported before; `None` while there is nothing
    /// to publish yet (the API source before every kind has been listed).
    pub fn reload(&mut self) -> Option<Reload> {
        match self {
            ClusterSource::Manifests(m) => Some(m.source.reload()),
            ClusterSource::Kubernetes(k) => k.reload(),
        }
    }
}
