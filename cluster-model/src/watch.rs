//! Watching a manifest directory for changes.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::error::TrySendError;

use crate::source::ignored_name;

/// Watching a directory; dropping it stops watching.
pub struct DirWatch {
    _watcher: RecommendedWatcher,
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatch").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {}: {source}", path.display())]
    Notify {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot start the watch thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Watches `dir` recursively and sends one `()` per burst of changes, once the directory has been
/// quiet for `settle` (editors write files in several steps). Notifications coalesce: at most
/// one is pending, so a slow reader sees one `()` for everything that changed meanwhile.
/// Reads (opening files) and changes to hidden or editor temp files do not count.
/// Dropping the returned guard stops watching; the receiver then ends.
pub fn watch_dir(
    dir: &Path,
    settle: Duration,
) -> Result<(DirWatch, tokio::sync::mpsc::Receiver<()>), WatchError> {
    let notify_err = |source| WatchError::Notify {
        path: dir.to_path_buf(),
        source,
    };
    let (raw_tx, raw_rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        let relevant = match &event {
            Ok(event) => is_change(event),
            Err(e) => {
                // Events may have been lost: make the reader look again.
                tracing::warn!(error = %e, "manifest directory watch error");
                true
            }
        };
        if relevant {
            let _ = raw_tx.send(());
        }
    })
    .map_err(notify_err)?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .map_err(notify_err)?;

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("sluice-dirwatch".to_string())
        .spawn(move || {
            // Ends when the watcher is dropped (raw_tx goes) or the receiver is.
            while raw_rx.recv().is_ok() {
                loop {
                    match raw_rx.recv_timeout(settle) {
                        Ok(()) => continue,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                if let Err(TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        })?;
    Ok((DirWatch { _watcher: watcher }, rx))
}

/// Whether an event may change what the directory holds.
fn is_change(event: &Event) -> bool {
    let kind_counts = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    let all_ignored = !event.paths.is_empty()
        && event.paths.iter().all(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(ignored_name)
        });
    kind_counts && !all_ignored
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tokio::time::timeout;

    async fn next_within(rx: &mut tokio::sync::mpsc::Receiver<()>, ms: u64) -> bool {
        matches!(
            timeout(Duration::from_millis(ms), rx.recv()).await,
            Ok(Some(()))
        )
    }

    #[tokio::test]
    async fn one_notification_per_burst_then_again_for_later_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_guard, mut rx) = watch_dir(dir.path(), Duration::from_millis(250)).expect("watch");

        for i in 0..5 {
            fs::write(dir.path().join(format!("f{i}.yaml")), "a: 1\n").expect("write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(next_within(&mut rx, 3000).await, "burst notified");
        assert!(!next_within(&mut rx, 400).await, "only once for the burst");

        fs::write(dir.path().join("f1.yaml"), "a: 2\n").expect("write");
        assert!(next_within(&mut rx, 3000).await, "later change notified");
        assert!(!next_within(&mut rx, 400).await);

        // Reading files does not count as a change.
        let _ = fs::read(dir.path().join("f1.yaml")).expect("read");
        assert!(!next_within(&mut rx, 400).await, "reads are not changes");

        fs::remove_file(dir.path().join("f2.yaml")).expect("remove");
        assert!(next_within(&mut rx, 3000).await, "deletion notified");

        fs::create_dir(dir.path().join("sub")).expect("mkdir");
        assert!(next_within(&mut rx, 3000).await, "new directory notified");
        tokio::time::sleep(Duration::from_millis(200)).await;
        fs::write(dir.path().join("sub/x.yaml"), "a: 1\n").expect("write");
        assert!(
            next_within(&mut rx, 3000).await,
            "change in a new subdirectory notified"
        );
    }

    #[tokio::test]
    async fn dropping_the_guard_ends_the_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (guard, mut rx) = watch_dir(dir.path(), Duration::from_millis(10)).expect("watch");
        drop(guard);
        let end = timeout(Duration::from_secs(3), rx.recv()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }

    #[test]
    fn missing_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = watch_dir(&dir.path().join("nope"), Duration::from_millis(10)).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
