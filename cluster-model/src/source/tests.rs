use super::*;
use k8s_openapi::api::core::v1::Service;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

fn write(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, text).expect("write");
}

fn svc(name: &str, port: i32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {name}}}\n  \
         ports: [{{port: {port}}}]\n"
    )
}

fn port_of(snapshot: &ClusterSnapshot, name: &str) -> Option<i32> {
    let service: &Service = snapshot.services.get(&ObjectKey::new("default", name))?;
    Some(service.spec.as_ref()?.ports.as_ref()?[0].port)
}

fn service_names(snapshot: &ClusterSnapshot) -> Vec<String> {
    snapshot.services.keys().map(ToString::to_string).collect()
}

#[test]
fn reads_manifests_recursively_and_skips_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "a.yaml",
        &format!("{}---\n{}", svc("a", 80), svc("b", 81)),
    );
    write(d, "sub/deeper/c.yml", &svc("c", 82));
    write(
        d,
        "d.json",
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "d"}, "spec": {"ports": [{"port": 83}]}}"#,
    );
    write(
        d,
        "pods.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a-1, labels: {app: a}}\nspec: {containers: [{name: c}]}\n\
         status: {podIP: 10.0.0.1, conditions: [{type: Ready, status: \"True\"}]}\n",
    );
    for ignored in [
        ".hidden.yaml",
        "e.yaml~",
        "f.yaml.swp",
        "g.yaml.tmp",
        "notes.txt",
        ".git/h.yaml",
    ] {
        write(d, ignored, &svc("ignored", 1));
    }
    let mut source = ManifestSource::new(d);
    let reload = source.reload();
    assert_eq!(reload.new_problems, vec![]);
    let snap = &reload.snapshot;
    assert_eq!(
        service_names(snap),
        ["default/a", "default/b", "default/c", "default/d"]
    );
    // Derived slices for the Services with selectors.
    let a = snap.slices_of(&ObjectKey::new("default", "a"));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].endpoints.len(), 1);
    assert_eq!(
        snap.slices_of(&ObjectKey::new("default", "b")).len(),
        1,
        "placeholder"
    );
    assert!(
        snap.slices_of(&ObjectKey::new("default", "d")).is_empty(),
        "no selector"
    );
    assert!(snap.namespaces.contains_key("default"));
}

#[test]
fn broken_file_keeps_its_last_good_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "a.yaml",
        &format!("{}---\n{}", svc("a", 80), svc("b", 81)),
    );
    write(d, "z.yaml", &svc("z", 90));
    let mut source = ManifestSource::new(d);
    assert_eq!(source.reload().new_problems, vec![]);

    write(
        d,
        "a.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
    );
    write(d, "z.yaml", &svc("z", 91));
    let reload = source.reload();
    assert_eq!(reload.new_problems.len(), 1, "{:?}", reload.new_problems);
    let problem = &reload.new_problems[0];
    assert_eq!(problem.file.as_deref(), Some(d.join("a.yaml").as_path()));
    assert!(
        problem
            .to_string()
            .starts_with(&format!("{}: invalid YAML: ", d.join("a.yaml").display()))
    );
    assert_eq!(
        service_names(&reload.snapshot),
        ["default/a", "default/b", "default/z"]
    );
    assert_eq!(
        port_of(&reload.snapshot, "z"),
        Some(91),
        "other files still apply"
    );

    // Still broken: kept, not reported again.
    let reload = source.reload();
    assert_eq!(reload.new_problems, vec![]);
    assert_eq!(
        service_names(&reload.snapshot),
        ["default/a", "default/b", "default/z"]
    );

    // Fixed: the new contents apply.
    write(d, "a.yaml", &svc("a", 8080));
    let reload = source.reload();
    assert_eq!(reload.new_problems, vec![]);
    assert_eq!(service_names(&reload.snapshot), ["default/a", "default/z"]);
    assert_eq!(port_of(&reload.snapshot, "a"), Some(8080));

    // Broken again: reported again.
    write(d, "a.yaml", "{");
    assert_eq!(source.reload().new_problems.len(), 1);

    // A file that never parsed contributes nothing.
    write(d, "new.yaml", "\t- nope: [");
    let reload = source.reload();
    assert_eq!(reload.new_problems.len(), 1);
    assert_eq!(service_names(&reload.snapshot), ["default/a", "default/z"]);
}

#[test]
fn invalid_object_keeps_its_last_valid_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "a.yaml",
        &format!("{}---\n{}", svc("a", 80), svc("b", 81)),
    );
    let mut source = ManifestSource::new(d);
    source.reload();

    write(
        d,
        "a.yaml",
        &format!(
            "{}---\n{}---\n{}",
            svc("a", 0),
            svc("b", 82),
            svc("c", 70000)
        ),
    );
    let reload = source.reload();
    let shown: Vec<String> = reload
        .new_problems
        .iter()
        .map(ToString::to_string)
        .collect();
    let file = d.join("a.yaml");
    assert_eq!(
        shown,
        [
            format!(
                "{}: Service default/a: spec.ports[0].port: must be between 1 and 65535, got 0",
                file.display()
            ),
            format!(
                "{}: Service default/c: spec.ports[0].port: must be between 1 and 65535, got 70000",
                file.display()
            ),
        ]
    );
    // a keeps its last valid version, b updates, c (never valid) is absent.
    assert_eq!(service_names(&reload.snapshot), ["default/a", "default/b"]);
    assert_eq!(port_of(&reload.snapshot, "a"), Some(80));
    assert_eq!(port_of(&reload.snapshot, "b"), Some(82));

    // Still invalid over several reloads: still kept, reported once.
    let reload = source.reload();
    assert_eq!(reload.new_problems, vec![]);
    assert_eq!(port_of(&reload.snapshot, "a"), Some(80));

    // A type error (the object cannot even be read) also keeps the last valid version.
    write(
        d,
        "a.yaml",
        &svc("a", 80).replace("port: 80", "port: eighty"),
    );
    let reload = source.reload();
    assert_eq!(reload.new_problems.len(), 1);
    assert_eq!(
        reload.new_problems[0].field.as_deref(),
        Some("spec.ports[0].port")
    );
    assert_eq!(port_of(&reload.snapshot, "a"), Some(80));

    // Removed from the file: gone.
    write(d, "a.yaml", &svc("b", 82));
    let reload = source.reload();
    assert_eq!(service_names(&reload.snapshot), ["default/b"]);
}

#[test]
fn deleted_file_takes_its_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "a.yaml", &svc("a", 80));
    write(d, "sub/b.yaml", &svc("b", 81));
    let mut source = ManifestSource::new(d);
    assert_eq!(
        service_names(&source.reload().snapshot),
        ["default/a", "default/b"]
    );
    fs::remove_file(d.join("a.yaml")).expect("rm");
    assert_eq!(service_names(&source.reload().snapshot), ["default/b"]);
    fs::remove_dir_all(d.join("sub")).expect("rm");
    let reload = source.reload();
    assert!(reload.snapshot.services.is_empty());
    assert!(reload.snapshot.endpoint_slices.is_empty());
}

#[test]
fn duplicates_first_in_path_order_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "b.yaml", &svc("web", 81));
    write(d, "a/x.yaml", &svc("web", 80));
    // Same name, other kind or namespace: not a duplicate.
    write(
        d,
        "c.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: web}\n---\n",
    );
    write(
        d,
        "d.yaml",
        &svc("web", 82).replace("name: web}", "name: web, namespace: prod}"),
    );
    let mut source = ManifestSource::new(d);
    let reload = source.reload();
    assert_eq!(port_of(&reload.snapshot, "web"), Some(80));
    assert_eq!(
        reload.new_problems,
        vec![
            Problem::new(format!(
                "duplicate: already defined in {}",
                d.join("a/x.yaml").display()
            ))
            .in_file(d.join("b.yaml"))
            .for_object("Service default/web")
        ]
    );
    assert_eq!(reload.snapshot.nodes.len(), 1);
    assert_eq!(service_names(&reload.snapshot), ["default/web", "prod/web"]);

    // Within one file too.
    write(
        d,
        "b.yaml",
        &format!("{}---\n{}", svc("twice", 1), svc("twice", 2)),
    );
    let reload = source.reload();
    assert_eq!(port_of(&reload.snapshot, "twice"), Some(1));
    assert_eq!(reload.new_problems.len(), 1);
    assert!(reload.new_problems[0].message.contains("b.yaml"));
}

#[test]
fn problems_reported_once_until_they_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "a.yaml", &svc("a", 0));
    let mut source = ManifestSource::new(d);
    assert_eq!(source.reload().new_problems.len(), 1);
    assert_eq!(source.reload().new_problems, vec![]);
    write(d, "a.yaml", &svc("a", 80));
    assert_eq!(source.reload().new_problems, vec![]);
    write(d, "a.yaml", &svc("a", 0));
    assert_eq!(source.reload().new_problems.len(), 1);
    // A different problem on the same field is new.
    write(d, "a.yaml", &svc("a", -1));
    assert_eq!(source.reload().new_problems.len(), 1);
}

#[test]
fn unreadable_directory_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("manifests");
    write(&d, "a.yaml", &svc("a", 80));
    let mut source = ManifestSource::new(&d);
    assert_eq!(service_names(&source.reload().snapshot), ["default/a"]);
    fs::rename(&d, dir.path().join("elsewhere")).expect("mv");
    let reload = source.reload();
    assert_eq!(reload.new_problems.len(), 1);
    assert!(
        reload.new_problems[0]
            .message
            .starts_with("cannot read directory")
    );
    assert_eq!(service_names(&reload.snapshot), ["default/a"]);
}

#[test]
fn warnings_do_not_stop_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "s.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan}\naddressType: IPv4\n\
         endpoints: [{addresses: [10.0.0.1]}]\n",
    );
    let mut source = ManifestSource::new(d);
    let reload = source.reload();
    assert_eq!(reload.new_problems.len(), 1);
    assert_eq!(reload.snapshot.endpoint_slices.len(), 1);
}

/// Sets a file's modification time to `secs` after the epoch plus `nanos` (which also sets its
/// change time to now).
fn set_mtime(path: &Path, secs: u64, nanos: u32) {
    let time = std::time::UNIX_EPOCH + Duration::new(secs, nanos);
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(time))
        .expect("set mtime");
}

fn names(paths: &[PathBuf], dir: &Path) -> Vec<String> {
    paths
        .iter()
        .map(|p| {
            p.strip_prefix(dir)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// A source that trusts stamps at once (no racy margin), so the cache can be seen at work.
fn caching_source(dir: &Path) -> ManifestSource {
    let mut source = ManifestSource::new(dir);
    source.racy_margin = Duration::ZERO;
    source
}

#[test]
fn unchanged_files_are_not_parsed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "a.yaml", &svc("a", 80));
    write(d, "sub/b.yaml", &svc("b", 81));
    let mut source = caching_source(d);
    let first = source.reload();
    assert_eq!(names(&first.parsed, d), ["a.yaml", "sub/b.yaml"]);

    let second = source.reload();
    assert_eq!(second.parsed, Vec::<PathBuf>::new(), "nothing changed");
    assert_eq!(second.new_problems, vec![]);
    assert_eq!(service_names(&second.snapshot), ["default/a", "default/b"]);
    assert_eq!(
        second.snapshot.endpoint_slices.len(),
        2,
        "derived slices still there"
    );

    // One file changes (another size): only it is parsed, the other's objects are reused.
    write(d, "sub/b.yaml", &svc("b", 8081));
    let third = source.reload();
    assert_eq!(names(&third.parsed, d), ["sub/b.yaml"]);
    assert_eq!(port_of(&third.snapshot, "a"), Some(80));
    assert_eq!(port_of(&third.snapshot, "b"), Some(8081));

    // A new file is parsed; a deleted one takes its objects with it.
    write(d, "c.yaml", &svc("c", 82));
    fs::remove_file(d.join("a.yaml")).expect("rm");
    let fourth = source.reload();
    assert_eq!(names(&fourth.parsed, d), ["c.yaml"]);
    assert_eq!(service_names(&fourth.snapshot), ["default/b", "default/c"]);
}

#[test]
fn same_size_rewrite_in_place_is_parsed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let a = d.join("a.yaml");
    write(d, "a.yaml", &svc("a", 80));
    set_mtime(&a, 1_700_000_000, 1);
    let mut source = caching_source(d);
    assert_eq!(port_of(&source.reload().snapshot, "a"), Some(80));
    let ino = fs::metadata(&a).expect("stat").ino();

    // Same inode, same size, only the times differ (here: by one nanosecond of mtime).
    write(d, "a.yaml", &svc("a", 81));
    set_mtime(&a, 1_700_000_000, 2);
    assert_eq!(fs::metadata(&a).expect("stat").ino(), ino);
    let reload = source.reload();
    assert_eq!(names(&reload.parsed, d), ["a.yaml"]);
    assert_eq!(port_of(&reload.snapshot, "a"), Some(81));
}

#[test]
fn replaced_file_is_parsed() {
    // Editors and kubectl-style tools write a new file and rename it over the old one.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "a.yaml", &svc("a", 80));
    let mut source = caching_source(d);
    source.reload();
    write(d, ".a.yaml.tmp", &svc("a", 81));
    fs::rename(d.join(".a.yaml.tmp"), d.join("a.yaml")).expect("rename");
    let reload = source.reload();
    assert_eq!(names(&reload.parsed, d), ["a.yaml"]);
    assert_eq!(port_of(&reload.snapshot, "a"), Some(81));
}

#[test]
fn files_changed_just_before_reading_are_read_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "a.yaml", &svc("a", 80));
    // Default margin: the file changed just now, so its stamp is not trusted yet.
    let mut source = ManifestSource::new(d);
    assert_eq!(names(&source.reload().parsed, d), ["a.yaml"]);
    assert_eq!(
        names(&source.reload().parsed, d),
        ["a.yaml"],
        "racy: read again"
    );
    std::thread::sleep(RACY_MARGIN + Duration::from_millis(50));
    // Read once more, now that the change is old enough to trust the stamp; then cached.
    assert_eq!(names(&source.reload().parsed, d), ["a.yaml"]);
    assert_eq!(source.reload().parsed, Vec::<PathBuf>::new());
}

#[test]
fn cached_outcomes_keep_last_good_and_report_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "a.yaml",
        &format!("{}---\n{}", svc("a", 80), svc("b", 81)),
    );
    write(d, "z.yaml", &svc("z", 90));
    let mut source = caching_source(d);
    assert_eq!(source.reload().new_problems, vec![]);

    // A file that no longer parses, and one with an invalid object: reported once, last good
    // versions kept, also over reloads that reuse the cached outcomes.
    write(
        d,
        "a.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
    );
    write(d, "z.yaml", &svc("z", 0));
    let reload = source.reload();
    assert_eq!(names(&reload.parsed, d), ["a.yaml", "z.yaml"]);
    assert_eq!(reload.new_problems.len(), 2, "{:?}", reload.new_problems);
    for _ in 0..2 {
        let reload = source.reload();
        assert_eq!(reload.parsed, Vec::<PathBuf>::new());
        assert_eq!(reload.new_problems, vec![]);
        assert_eq!(
            service_names(&reload.snapshot),
            ["default/a", "default/b", "default/z"]
        );
        assert_eq!(port_of(&reload.snapshot, "z"), Some(90));
    }

    // Duplicates across a cached file and a new one: resolved by path, reported once.
    write(d, "0.yaml", &svc("z", 70));
    let reload = source.reload();
    assert_eq!(names(&reload.parsed, d), ["0.yaml"]);
    assert_eq!(port_of(&reload.snapshot, "z"), Some(70));
    assert_eq!(reload.new_problems.len(), 1, "{:?}", reload.new_problems);
    assert!(reload.new_problems[0].message.starts_with("duplicate"));
    assert_eq!(source.reload().new_problems, vec![]);
}

#[test]
fn unreadable_files_are_tried_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "a.yaml", &svc("a", 80));
    let mut source = caching_source(d);
    source.reload();
    // A link to a file that cannot be read gives a read error, even as root. Its stamp is that of
    // the file linked to, and it stays the same: the read is still tried every time (a read
    // error is not cached), and the error is still reported only once.
    fs::remove_file(d.join("a.yaml")).expect("rm");
    std::os::unix::fs::symlink("/proc/self/mem", d.join("a.yaml")).expect("symlink");
    let reload = source.reload();
    assert_eq!(reload.new_problems.len(), 1, "{:?}", reload.new_problems);
    assert!(reload.new_problems[0].message.starts_with("cannot read"));
    assert_eq!(
        service_names(&reload.snapshot),
        ["default/a"],
        "last good kept"
    );
    let again = source.reload();
    assert_eq!(names(&again.parsed, d), Vec::<String>::new());
    assert_eq!(again.new_problems, vec![], "reported once");
    assert_eq!(service_names(&again.snapshot), ["default/a"]);
}

/// Every map of two snapshots, as comparable values.
fn contents(s: &ClusterSnapshot) -> Vec<String> {
    let debug = |v: &dyn std::fmt::Debug| format!("{v:?}");
    vec![
        debug(&s.nodes),
        debug(&s.namespaces),
        debug(&s.pods),
        debug(&s.services),
        debug(&s.endpoint_slices),
        debug(&s.network_policies),
        debug(&s.ingresses),
        debug(&s.ingress_classes),
        debug(&s.secrets),
    ]
}

/// The keys whose objects differ between two snapshots, as [`SnapshotChanges`] names them.
fn differing(before: &ClusterSnapshot, after: &ClusterSnapshot) -> crate::SnapshotChanges {
    fn keys<K: Ord + Clone, T: PartialEq>(a: &BTreeMap<K, T>, b: &BTreeMap<K, T>) -> BTreeSet<K> {
        a.keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect()
    }
    crate::SnapshotChanges {
        since: before.revision,
        nodes: keys(&before.nodes, &after.nodes),
        namespaces: keys(&before.namespaces, &after.namespaces),
        pods: keys(&before.pods, &after.pods),
        services: keys(&before.services, &after.services),
        endpoint_slices: keys(&before.endpoint_slices, &after.endpoint_slices),
        network_policies: keys(&before.network_policies, &after.network_policies),
        ingresses: keys(&before.ingresses, &after.ingresses),
        ingress_classes: keys(&before.ingress_classes, &after.ingress_classes),
        secrets: keys(&before.secrets, &after.secrets),
    }
}

fn pod(name: &str, ns: &str, app: &str, ip: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

fn selector_svc(name: &str, ns: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{clusterIP: {ip}, selector: {{app: {app}}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n"
    )
}

fn node(name: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: 192.168.0.1}}]}}\n"
    )
}

fn hand_slice(name: &str, ns: &str, service: &str, ip: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"{ip}\"]}}]\n"
    )
}

#[test]
fn updated_in_place_snapshots_equal_fresh_reads_and_name_every_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    type Step = Box<dyn Fn(&Path)>;
    let steps: Vec<Step> = vec![
        Box::new(|d| {
            write(d, "nodes.yaml", &node("n1", "z1"));
            write(
                d,
                "web.yaml",
                &selector_svc("web", "prod", "web", "10.96.0.10"),
            );
            write(d, "pods/a.yaml", &pod("a", "prod", "web", "10.0.0.1", "n1"));
            write(
                d,
                "plain.yaml",
                &selector_svc("plain", "default", "none", "10.96.0.11"),
            );
            write(
                d,
                "slice.yaml",
                &hand_slice("plain-1", "default", "plain", "10.1.0.1"),
            );
        }),
        // A pod added, another changed.
        Box::new(|d| {
            write(d, "pods/b.yaml", &pod("b", "prod", "web", "10.0.0.2", "n1"));
            write(d, "pods/a.yaml", &pod("a", "prod", "web", "10.0.0.3", "n1"));
        }),
        // A Service without selector, added then changed: it derives nothing.
        Box::new(|d| {
            write(
                d,
                "bare.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: bare, namespace: prod}\n\
                 spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}\n",
            )
        }),
        Box::new(|d| {
            write(
                d,
                "bare.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: bare, namespace: prod}\n\
                 spec: {clusterIP: 10.96.0.20, ports: [{port: 81}]}\n",
            )
        }),
        // The node's zone (derived slices carry zones).
        Box::new(|d| write(d, "nodes.yaml", &node("n1", "z2"))),
        // A hand-written slice changed, then a Service's selector.
        Box::new(|d| {
            write(
                d,
                "slice.yaml",
                &hand_slice("plain-1", "default", "plain", "10.1.0.2"),
            )
        }),
        Box::new(|d| {
            write(
                d,
                "web.yaml",
                &selector_svc("web", "prod", "other", "10.96.0.10"),
            )
        }),
        Box::new(|d| {
            write(
                d,
                "web.yaml",
                &selector_svc("web", "prod", "web", "10.96.0.10"),
            )
        }),
        // A hand-written slice with the name of a derived one wins; gone, the derived is back.
        Box::new(|d| {
            write(
                d,
                "shadow.yaml",
                &hand_slice("web-8d241b5a4d", "prod", "web", "10.1.0.9"),
            )
        }),
        Box::new(|d| fs::remove_file(d.join("shadow.yaml")).expect("rm")),
        // An explicit namespace, then gone while its objects stay; then the objects go.
        Box::new(|d| {
            write(
                d,
                "ns.yaml",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: a}}\n",
            )
        }),
        Box::new(|d| fs::remove_file(d.join("ns.yaml")).expect("rm")),
        Box::new(|d| {
            fs::remove_file(d.join("pods/a.yaml")).expect("rm");
            fs::remove_file(d.join("pods/b.yaml")).expect("rm");
        }),
        Box::new(|d| fs::remove_file(d.join("web.yaml")).expect("rm")),
        // A duplicate in a later file takes over when the first goes.
        Box::new(|d| {
            write(
                d,
                "z.yaml",
                &selector_svc("plain", "default", "none", "10.96.0.12"),
            )
        }),
        Box::new(|d| fs::remove_file(d.join("plain.yaml")).expect("rm")),
        // A node removed; the hand-written slice relabelled to another Service.
        Box::new(|d| {
            fs::remove_file(d.join("nodes.yaml")).expect("rm");
            write(
                d,
                "slice.yaml",
                &hand_slice("plain-1", "default", "web", "10.1.0.2"),
            );
        }),
        // Nothing changed.
        Box::new(|_| {}),
    ];
    for held in [false, true] {
        let mut source = caching_source(d);
        let mut previous: Option<Arc<ClusterSnapshot>> = None;
        let mut kept = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            step(d);
            let reload = source.reload();
            let fresh = caching_source(d).reload().snapshot;
            let managed = |s: &ClusterSnapshot| {
                let key = ObjectKey::new("prod", "web-8d241b5a4d");
                s.endpoint_slices[&key]
                    .metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(crate::LABEL_MANAGED_BY))
            };
            if i == 8 {
                assert!(!managed(&reload.snapshot), "the hand-written one");
            }
            if i == 9 {
                assert!(managed(&reload.snapshot), "the derived one");
            }
            assert_eq!(contents(&reload.snapshot), contents(&fresh), "step {i}");
            if let Some(previous) = &previous {
                let want = differing(previous, &reload.snapshot);
                if want
                    == (crate::SnapshotChanges {
                        since: want.since,
                        ..Default::default()
                    })
                {
                    assert_eq!(reload.snapshot.revision, previous.revision, "step {i}");
                } else {
                    assert_eq!(reload.snapshot.changes.as_ref(), Some(&want), "step {i}");
                }
            }
            if held {
                // A reader holding every snapshot: each one is then copied, never changed.
                kept.push((Arc::clone(&reload.snapshot), contents(&reload.snapshot)));
            }
            previous = Some(reload.snapshot);
        }
        for (i, (snapshot, at_the_time)) in kept.iter().enumerate() {
            assert_eq!(
                &contents(snapshot),
                at_the_time,
                "snapshot {i} changed under its reader"
            );
        }
        for entry in fs::read_dir(d).expect("ls") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                fs::remove_dir_all(path).expect("rm");
            } else {
                fs::remove_file(path).expect("rm");
            }
        }
    }
}
