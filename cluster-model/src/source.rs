//! The manifest-directory source: reads a directory of manifests into snapshots, keeping the last
//! good state of whatever breaks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::manifest::{Entry, ManifestFormat, parse_text};
use crate::object::{Kind, Object, ObjectKey};
use crate::problem::Problem;
use crate::snapshot::{ClusterSnapshot, next_revision};

/// Reads a directory (recursively) of YAML/JSON manifests (`*.yaml`, `*.yml`, `*.json`;
/// multi-document YAML with `---`; also `kind: List` with items). Ignores hidden files and
/// directories and editor temp files (names starting with '.', ending in '~', '.swp', '.tmp').
///
/// Nothing already applied is lost to bad input: a file that no longer parses (or cannot be
/// read) keeps contributing what it held last time; an object that became invalid keeps its last
/// valid version. A deleted file's objects go. When two files define the same kind, namespace and
/// name, the first in sorted path order wins and the second gets a problem.
///
/// Reloads are incremental: a file is read and parsed again only when its stamp (device,
/// inode, size, modification and change times with nanoseconds) differs from the last reload's;
/// otherwise what it parsed to last time is reused. A file changed less than [`RACY_MARGIN`]
/// before it was read is read again next time even if its stamp looks the same (a second write
/// within one file-system clock tick could leave the stamp unchanged), as git does for "racily
/// clean" index entries. Files that could not be read are always tried again.
pub struct ManifestSource {
    dir: PathBuf,
    /// Per file, what it parsed to and contributed last time.
    files: BTreeMap<PathBuf, FileState>,
    /// The objects applied (in effect), by kind and key: the first definition of each.
    applied: HashMap<(Kind, ObjectKey), Arc<Object>>,
    /// Every definition of each object, by file and place in the file.
    definers: HashMap<Id, BTreeMap<Place, Arc<Object>>>,
    /// The duplicate problems of each object defined more than once, with the place of the
    /// duplicate.
    duplicates: HashMap<Id, Vec<(Place, Problem)>>,
    /// The problems present last time.
    reported: HashSet<Problem>,
    /// The snapshot returned last time, and the objects that changed to make it.
    published: Option<(Arc<ClusterSnapshot>, BTreeSet<Id>)>,
    /// The snapshot returned the time before: readers have usually let go of it by the next
    /// reload, so it is brought up to date in place instead of copying the whole cluster.
    spare: Option<Arc<ClusterSnapshot>>,
    /// [`RACY_MARGIN`]; tests set it to zero to see the cache at work without waiting.
    pub(crate) racy_margin: Duration,
}

/// An object's identity: kind and key.
type Id = (Kind, ObjectKey);
/// Where an object is defined: file and index among the file's objects.
type Place = (Arc<Path>, usize);
/// A file whose objects changed: its path, what it held before, and now.
type FileChange = (PathBuf, Vec<Arc<Object>>, Vec<Arc<Object>>);

/// How long before a read a file must have last changed for its stamp to be trusted next time.
/// File times come from the kernel's coarse clock, which lags the real one by up to a tick (at
/// most 10 ms for HZ >= 100): a write right after a read may get the very time the file already
/// had. Twice that is used; on file systems that keep whole seconds only (no nanoseconds in
/// either time) two seconds are used instead.
pub const RACY_MARGIN: Duration = Duration::from_millis(20);
const RACY_MARGIN_COARSE: Duration = Duration::from_secs(2);

/// What identifies one version of a file without reading it. Paths are followed through
/// symbolic links, so re-pointing a link changes the stamp (device and inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file changed less than `margin` before `read_at`, so that another change in
    /// the same clock tick could go unnoticed. The change time is set by the kernel (unlike the
    /// modification time, which tools may set to anything); the later of the two is used.
    fn racy(&self, read_at: SystemTime, margin: Duration) -> bool {
        let coarse = self.mtime.1 == 0 && self.ctime.1 == 0;
        let margin = if coarse && !margin.is_zero() {
            margin.max(RACY_MARGIN_COARSE)
        } else {
            margin
        };
        let as_time = |(secs, nanos): (i64, i64)| -> Option<SystemTime> {
            let nanos = Duration::from_nanos(u64::try_from(nanos).ok()?);
            match u64::try_from(secs) {
                Ok(secs) => UNIX_EPOCH.checked_add(Duration::from_secs(secs).checked_add(nanos)?),
                Err(_) => UNIX_EPOCH
                    .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
                    .checked_add(nanos),
            }
        };
        let changed = match (as_time(self.mtime), as_time(self.ctime)) {
            (Some(m), Some(c)) => m.max(c),
            // Times we cannot place: never trust the stamp.
            _ => return true,
        };
        match read_at.checked_sub(margin) {
            Some(limit) => changed >= limit,
            None => true,
        }
    }
}

/// What the source knows about one file.
struct FileState {
    /// The version read last time, when its parse outcome may be reused: `None` when the stamp
    /// is not to be trusted (racy) or the file could not be read.
    stamp: Option<Stamp>,
    /// What reading and parsing it gave: its entries, or why its text is unusable. `None` when
    /// it could not be read (the objects are then the last good ones).
    parsed: Option<Result<Vec<Entry>, Problem>>,
    /// The objects it contributed last time (before duplicates were dropped).
    objects: Vec<Arc<Object>>,
}

/// The outcome of [`ManifestSource::reload`].
#[derive(Clone, Debug)]
pub struct Reload {
    pub snapshot: Arc<ClusterSnapshot>,
    /// Problems not reported by the previous reload.
    pub new_problems: Vec<Problem>,
    /// The files this reload read and parsed, sorted; every other manifest file was unchanged
    /// and its previous outcome reused.
    pub parsed: Vec<PathBuf>,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            applied: HashMap::new(),
            definers: HashMap::new(),
            duplicates: HashMap::new(),
            reported: HashSet::new(),
            published: None,
            spare: None,
            racy_margin: RACY_MARGIN,
        }
    }

    /// The directory read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks at the whole directory, re-reads the files that changed, and returns the current
    /// snapshot plus the problems not reported before (each distinct problem is returned once,
    /// until it goes away and comes back).
    pub fn reload(&mut self) -> Reload {
        let read_at = SystemTime::now();
        let mut problems = Vec::new();
        let listing = list_manifests(&self.dir);
        problems.extend(listing.problems);

        let mut previous = std::mem::take(&mut self.files);
        let mut files: BTreeMap<PathBuf, FileState> = BTreeMap::new();
        let mut parsed_paths = Vec::new();
        // Files whose objects changed: what they held before, and now.
        let mut changed_files: Vec<FileChange> = Vec::new();
        for (path, stamp) in listing.files {
            let old = previous.remove(&path);
            let old_objects = old.as_ref().map(|o| o.objects.clone()).unwrap_or_default();
            let reusable = old
                .as_ref()
                .is_some_and(|old| old.stamp == Some(stamp) && old.parsed.is_some());
            let state = if reusable && let Some(old) = old {
                old
            } else {
                match read_and_parse(&path) {
                    // Deleted between listing and reading: gone.
                    Read::Gone => {
                        changed_files.push((path, old_objects, Vec::new()));
                        continue;
                    }
                    Read::Failed(problem) => {
                        problems.push(problem);
                        FileState {
                            stamp: None,
                            parsed: None,
                            objects: old.map(|old| old.objects).unwrap_or_default(),
                        }
                    }
                    Read::Parsed(outcome) => {
                        parsed_paths.push(path.clone());
                        FileState {
                            stamp: (!stamp.racy(read_at, self.racy_margin)).then_some(stamp),
                            parsed: Some(outcome),
                            objects: old.map(|old| old.objects).unwrap_or_default(),
                        }
                    }
                }
            };
            let state = self.contribute(state, &mut problems);
            // Unchanged files keep the very objects they had: comparing pointers suffices.
            let same = old_objects.len() == state.objects.len()
                && old_objects
                    .iter()
                    .zip(&state.objects)
                    .all(|(a, b)| Arc::ptr_eq(a, b));
            if !same {
                changed_files.push((path.clone(), old_objects, state.objects.clone()));
            }
            files.insert(path, state);
        }
        // Files under a directory that could not be listed keep their last good contents.
        for (path, state) in previous {
            if listing.unreadable.iter().any(|d| path.starts_with(d)) {
                files.insert(path, state);
            } else {
                changed_files.push((path, state.objects, Vec::new()));
            }
        }

        let changed = self.apply_file_changes(changed_files);
        let mut duplicates: Vec<&(Place, Problem)> = self.duplicates.values().flatten().collect();
        // In path order, then file order, as files are read.
        duplicates.sort_by(|a, b| a.0.cmp(&b.0));
        problems.extend(duplicates.into_iter().map(|(_, p)| p.clone()));
        let snapshot = self.next_snapshot(changed);

        let mut seen = HashSet::new();
        problems.retain(|p| seen.insert(p.clone()));
        let new_problems = problems
            .iter()
            .filter(|p| !self.reported.contains(*p))
            .cloned()
            .collect();
        self.reported = seen;
        self.files = files;
        Reload {
            snapshot,
            new_problems,
            parsed: parsed_paths,
        }
    }

    /// Takes in what changed files held before and hold now: updates the definitions, the
    /// objects in effect (the first definition in path and file order wins) and the duplicate
    /// problems of the objects they define; returns the objects whose version in effect changed.
    fn apply_file_changes(
        &mut self,
        changed_files: Vec<FileChange>,
    ) -> BTreeSet<(Kind, ObjectKey)> {
        let mut affected = BTreeSet::new();
        for (path, old, new) in changed_files {
            let path: Arc<Path> = Arc::from(path.as_path());
            for (index, object) in old.iter().enumerate() {
                let id = (object.kind(), object.key());
                if let Some(definers) = self.definers.get_mut(&id) {
                    definers.remove(&(Arc::clone(&path), index));
                    if definers.is_empty() {
                        self.definers.remove(&id);
                    }
                }
                affected.insert(id);
            }
            for (index, object) in new.into_iter().enumerate() {
                let id = (object.kind(), object.key());
                self.definers
                    .entry(id.clone())
                    .or_default()
                    .insert((Arc::clone(&path), index), object);
                affected.insert(id);
            }
        }
        let mut changed = BTreeSet::new();
        for id in affected {
            self.duplicates.remove(&id);
            let Some(definers) = self.definers.get(&id) else {
                if self.applied.remove(&id).is_some() {
                    changed.insert(id);
                }
                continue;
            };
            let mut definers = definers.iter();
            let Some(((first_path, _), first)) = definers.next() else {
                continue;
            };
            let duplicates: Vec<_> = definers
                .map(|(place, object)| {
                    let problem = Problem::new(format!(
                        "duplicate: already defined in {}",
                        first_path.display()
                    ))
                    .in_file(place.0.as_ref())
                    .for_object(object.describe());
                    (place.clone(), problem)
                })
                .collect();
            if !duplicates.is_empty() {
                self.duplicates.insert(id.clone(), duplicates);
            }
            let same = self
                .applied
                .get(&id)
                .is_some_and(|old| Arc::ptr_eq(old, first));
            if !same {
                self.applied.insert(id.clone(), Arc::clone(first));
                changed.insert(id);
            }
        }
        changed
    }

    /// The snapshot of the objects in effect, where `changed` are the objects that differ from
    /// the last snapshot returned.
    fn next_snapshot(&mut self, changed: BTreeSet<(Kind, ObjectKey)>) -> Arc<ClusterSnapshot> {
        let applied = &self.applied;
        let Some((published, published_changed)) = self.published.take() else {
            let mut snapshot =
                ClusterSnapshot::from_objects(applied.values().map(|o| Object::clone(o)));
            snapshot.revision = next_revision();
            let snapshot = Arc::new(snapshot);
            self.published = Some((Arc::clone(&snapshot), changed));
            return snapshot;
        };
        if changed.is_empty() {
            self.published = Some((Arc::clone(&published), published_changed));
            return published;
        }
        // The snapshot before the last one with both changes applied; else a copy of the last.
        let spare = self.spare.take().and_then(|spare| {
            let since = published.changes.as_ref().map(|c| c.since);
            let between = published
                .changes
                .clone()
                .filter(|_| since == Some(spare.revision))?;
            Some((spare, between))
        });
        let (mut next, mut ids, between) = match spare {
            Some((spare, between)) => (spare, published_changed, Some(between)),
            None => (Arc::clone(&published), BTreeSet::new(), None),
        };
        ids.extend(changed.iter().cloned());
        // Copies only when a reader still holds it.
        let snapshot = Arc::make_mut(&mut next);
        let mut changes = snapshot.apply_changes(&ids, |kind, key| {
            applied.get(&(kind, key.clone())).map(|o| &**o)
        });
        // Keys that differed between the spare and the last snapshot may differ between the
        // last and this one although the spare's and this one's are the same.
        if let Some(between) = between {
            changes.extend(between);
        }
        // Exactly what differs from the last snapshot, the one readers compare with.
        snapshot.keep_differing(&published, &mut changes);
        changes.since = published.revision;
        snapshot.revision = next_revision();
        snapshot.changes = Some(changes);
        self.spare = Some(published);
        self.published = Some((Arc::clone(&next), changed));
        next
    }

    /// Works out what a file contributes this time from its parse outcome: its valid objects,
    /// plus the last applied version of each invalid one; when its text is unusable (or it could
    /// not be read), what it contributed last time. Adds the file's problems.
    fn contribute(&self, mut state: FileState, problems: &mut Vec<Problem>) -> FileState {
        match &state.parsed {
            None => {}
            Some(Err(problem)) => problems.push(problem.clone()),
            Some(Ok(entries)) => state.objects = self.accept(entries, problems),
        }
        state
    }

    /// The objects a parsed file contributes: its valid objects, plus the last applied version of
    /// each invalid one.
    fn accept(&self, entries: &[Entry], problems: &mut Vec<Problem>) -> Vec<Arc<Object>> {
        let mut objects = Vec::new();
        for entry in entries {
            match entry {
                Entry::Valid { object, warnings } => {
                    problems.extend(warnings.iter().cloned());
                    objects.push(Arc::clone(object));
                }
                Entry::Invalid {
                    kind,
                    key,
                    problems: p,
                } => {
                    problems.extend(p.iter().cloned());
                    if let Some(previous) = self.applied.get(&(*kind, key.clone())) {
                        tracing::debug!(object = %format!("{kind} {key}"), "object is invalid; keeping its last valid version");
                        objects.push(Arc::clone(previous));
                    }
                }
                Entry::Unusable { problems: p } => problems.extend(p.iter().cloned()),
            }
        }
        objects
    }
}

/// The outcome of reading one file.
enum Read {
    /// It no longer exists.
    Gone,
    /// It could not be read (the reason).
    Failed(Problem),
    /// It was read: its entries, or why its text is unusable.
    Parsed(Result<Vec<Entry>, Problem>),
}

fn read_and_parse(path: &Path) -> Read {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Read::Gone,
        Err(e) => return Read::Failed(Problem::new(format!("cannot read: {e}")).in_file(path)),
    };
    let format = ManifestFormat::of_path(path).unwrap_or(ManifestFormat::Yaml);
    Read::Parsed(
        String::from_utf8(bytes)
            .map_err(|_| Problem::new("not valid UTF-8 text").in_file(path))
            .and_then(|text| parse_text(&text, format, Some(path))),
    )
}

/// Whether a file or directory name is one to skip: hidden or an editor's temporary file.
pub(crate) fn ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.ends_with(".swp") || name.ends_with(".tmp")
}

#[derive(Default)]
struct Listing {
    /// Manifest files with their stamps, sorted by path.
    files: Vec<(PathBuf, Stamp)>,
    /// Directories that could not be listed.
    unreadable: Vec<PathBuf>,
    problems: Vec<Problem>,
}

/// Lists manifest files under `dir` recursively, following symbolic links (each directory once).
fn list_manifests(dir: &Path) -> Listing {
    let mut listing = Listing::default();
    let mut visited = HashSet::new();
    walk(dir, &mut visited, &mut listing);
    listing.files.sort_by(|a, b| a.0.cmp(&b.0));
    listing
}

fn walk(dir: &Path, visited: &mut HashSet<PathBuf>, listing: &mut Listing) {
    if let Ok(real) = fs::canonicalize(dir)
        && !visited.insert(real)
    {
        return;
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            listing
                .problems
                .push(Problem::new(format!("cannot read directory: {e}")).in_file(dir));
            listing.unreadable.push(dir.to_path_buf());
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                listing
                    .problems
                    .push(Problem::new(format!("cannot read directory: {e}")).in_file(dir));
                listing.unreadable.push(dir.to_path_buf());
                continue;
            }
        };
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if ignored_name(name) {
            continue;
        }
        // Follows symbolic links; a dangling link is skipped.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, visited, listing);
        } else if meta.is_file() && ManifestFormat::of_path(&path).is_some() {
            listing.files.push((path, Stamp::of(&meta)));
        }
    }
}

#[cfg(test)]
mod tests;
