//! The manifest-directory source: reads a directory of manifests into snapshots, keeping the last
//! good state of whatever breaks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::manifest::{Entry, ManifestFormat, parse_text};
use crate::object::{Kind, Object, ObjectKey};
use crate::problem::Problem;
use crate::snapshot::ClusterSnapshot;

/// Reads a directory (recursively) of YAML/JSON manifests (`*.yaml`, `*.yml`, `*.json`;
/// multi-document YAML with `---`; also `kind: List` with items). Ignores hidden files and
/// directories and editor temp files (names starting with '.', ending in '~', '.swp', '.tmp').
///
/// Nothing already applied is lost to bad input: a file that no longer parses (or cannot be
/// read) keeps contributing what it held last time; an object that became invalid keeps its last
/// valid version. A deleted file's objects go. When two files define the same kind, namespace and
/// name, the first in sorted path order wins and the second gets a problem.
pub struct ManifestSource {
    dir: PathBuf,
    /// Per file, the objects it contributed last time (before duplicates were dropped).
    files: BTreeMap<PathBuf, Vec<Object>>,
    /// The objects applied last time, by kind and key.
    applied: HashMap<(Kind, ObjectKey), Object>,
    /// The problems present last time.
    reported: HashSet<Problem>,
}

/// The outcome of [`ManifestSource::reload`].
#[derive(Clone, Debug)]
pub struct Reload {
    pub snapshot: Arc<ClusterSnapshot>,
    /// Problems not reported by the previous reload.
    pub new_problems: Vec<Problem>,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            applied: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    /// The directory read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the whole directory and returns the current snapshot plus the problems not
    /// reported before (each distinct problem is returned once, until it goes away and comes
    /// back).
    pub fn reload(&mut self) -> Reload {
        let mut problems = Vec::new();
        let listing = list_manifests(&self.dir);
        problems.extend(listing.problems);

        let mut files: BTreeMap<PathBuf, Vec<Object>> = BTreeMap::new();
        for path in listing.files {
            let text = match fs::read(&path) {
                Ok(bytes) => String::from_utf8(bytes)
                    .map_err(|_| Problem::new("not valid UTF-8 text").in_file(&path)),
                // Deleted between listing and reading: gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => Err(Problem::new(format!("cannot read: {e}")).in_file(&path)),
            };
            let format = ManifestFormat::of_path(&path).unwrap_or(ManifestFormat::Yaml);
            match text.and_then(|text| parse_text(&text, format, Some(&path))) {
                Err(problem) => {
                    problems.push(problem);
                    if let Some(previous) = self.files.get(&path) {
                        files.insert(path, previous.clone());
                    }
                }
                Ok(entries) => {
                    let objects = self.accept(entries, &mut problems);
                    files.insert(path, objects);
                }
            }
        }
        // Files under a directory that could not be listed keep their last good contents.
        for (path, objects) in &self.files {
            if !files.contains_key(path) && listing.unreadable.iter().any(|d| path.starts_with(d)) {
                files.insert(path.clone(), objects.clone());
            }
        }

        let mut applied: HashMap<(Kind, ObjectKey), Object> = HashMap::new();
        let mut first_seen: HashMap<(Kind, ObjectKey), &Path> = HashMap::new();
        let mut ordered = Vec::new();
        for (path, objects) in &files {
            for object in objects {
                let id = (object.kind(), object.key());
                if let Some(first) = first_seen.get(&id) {
                    problems.push(
                        Problem::new(format!("duplicate: already defined in {}", first.display()))
                            .in_file(path)
                            .for_object(object.describe()),
                    );
                    continue;
                }
                first_seen.insert(id.clone(), path);
                applied.insert(id, object.clone());
                ordered.push(object.clone());
            }
        }
        let snapshot = Arc::new(ClusterSnapshot::from_objects(ordered));

        let mut seen = HashSet::new();
        problems.retain(|p| seen.insert(p.clone()));
        let new_problems = problems
            .iter()
            .filter(|p| !self.reported.contains(*p))
            .cloned()
            .collect();
        self.reported = seen;
        self.files = files;
        self.applied = applied;
        Reload {
            snapshot,
            new_problems,
        }
    }

    /// The objects a parsed file contributes: its valid objects, plus the last applied version of
    /// each invalid one.
    fn accept(&self, entries: Vec<Entry>, problems: &mut Vec<Problem>) -> Vec<Object> {
        let mut objects = Vec::new();
        for entry in entries {
            match entry {
                Entry::Valid { object, warnings } => {
                    problems.extend(warnings);
                    objects.push(object);
                }
                Entry::Invalid {
                    kind,
                    key,
                    problems: p,
                } => {
                    problems.extend(p);
                    if let Some(previous) = self.applied.get(&(kind, key.clone())) {
                        tracing::debug!(object = %format!("{kind} {key}"), "object is invalid; keeping its last valid version");
                        objects.push(previous.clone());
                    }
                }
                Entry::Unusable { problems: p } => problems.extend(p),
            }
        }
        objects
    }
}

/// Whether a file or directory name is one to skip: hidden or an editor's temporary file.
pub(crate) fn ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.ends_with(".swp") || name.ends_with(".tmp")
}

#[derive(Default)]
struct Listing {
    /// Manifest files, sorted.
    files: Vec<PathBuf>,
    /// Directories that could not be listed.
    unreadable: Vec<PathBuf>,
    problems: Vec<Problem>,
}

/// Lists manifest files under `dir` recursively, following symbolic links (each directory once).
fn list_manifests(dir: &Path) -> Listing {
    let mut listing = Listing::default();
    let mut visited = HashSet::new();
    walk(dir, &mut visited, &mut listing);
    listing.files.sort();
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
            listing.files.push(path);
        }
    }
}

#[cfg(test)]
mod tests;
