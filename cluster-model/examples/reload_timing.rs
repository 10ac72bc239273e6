//! Times `ManifestSource::reload` on a directory like sluice-bench's: one file with N Services and
//! N hand-written EndpointSlices, and one small file that changes between reloads.
//!
//! With `derived`, each Service has a selector and one Pod instead (slices derived).
//!
//! `cargo run -p cluster-model --example reload_timing -- [N] [reloads] [derived]`

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use cluster_model::ManifestSource;

fn service(index: usize, endpoint: &str) -> String {
    let (hi, lo) = (1 + index / 250, 1 + index % 250);
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{index}, namespace: default}}\n\
         spec: {{clusterIP: 10.96.{hi}.{lo}, ports: [{{name: http, port: 80}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc-{index}-1, namespace: default, labels: {{kubernetes.io/service-name: svc-{index}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints: [{{addresses: [\"{endpoint}\"], conditions: {{ready: true}}}}]\n"
    )
}

/// A Service `svc-INDEX` with a selector, and one Pod it selects (slices derived).
fn service_and_pod(index: usize, endpoint: &str) -> String {
    let (hi, lo) = (1 + index / 250, 1 + index % 250);
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{index}, namespace: default}}\n\
         spec: {{clusterIP: 10.96.{hi}.{lo}, selector: {{app: svc-{index}}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n\
         ---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: svc-{index}-pod, namespace: default, labels: {{app: svc-{index}}}}}\n\
         spec: {{nodeName: node-a, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{podIP: \"{endpoint}\", conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, dir.join(name)).expect("rename");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let reloads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let derived = args.next().as_deref() == Some("derived");
    let service = if derived { service_and_pod } else { service };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_atomically(d, "changing.yaml", &service(0, "10.244.100.1"));
    let others: String = (1..n)
        .map(|i| service(i, &format!("10.244.{}.{}", 1 + i / 250, 1 + i % 250)))
        .collect();
    write_atomically(d, "others.yaml", &others);
    // As if written a while ago, so the first reload may cache it.
    let old = SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(d.join("others.yaml"))
        .and_then(|f| f.set_modified(old))
        .expect("set mtime");

    // Past the racy margin, so the first reload's outcome is trusted.
    std::thread::sleep(Duration::from_millis(200));
    let mut source = ManifestSource::new(d);
    let started = Instant::now();
    let reload = source.reload();
    println!(
        "first reload: {:?} ({} services, {} pods, {} slices)",
        started.elapsed(),
        reload.snapshot.services.len(),
        reload.snapshot.pods.len(),
        reload.snapshot.endpoint_slices.len()
    );
    let mut times = Vec::new();
    for change in 1..=reloads {
        write_atomically(
            d,
            "changing.yaml",
            &service(0, &format!("10.244.101.{change}")),
        );
        let started = Instant::now();
        let reload = source.reload();
        times.push(started.elapsed());
        assert_eq!(reload.snapshot.services.len(), n);
    }
    times.sort();
    let snapshot = source.reload().snapshot;
    let started = Instant::now();
    let slices =
        cluster_model::derive_endpoint_slices(&snapshot.services, &snapshot.pods, &snapshot.nodes);
    println!(
        "derive_endpoint_slices alone: {:?} ({} slices)",
        started.elapsed(),
        slices.len()
    );
    let started = Instant::now();
    let found: usize = snapshot
        .services
        .keys()
        .map(|k| snapshot.slices_of(k).len())
        .sum();
    println!(
        "slices_of for every Service: {:?} ({found} slices)",
        started.elapsed()
    );
    let started = Instant::now();
    let by_service = snapshot.slices_by_service();
    let found: usize = snapshot
        .services
        .keys()
        .map(|k| by_service.get(k).map_or(0, Vec::len))
        .sum();
    println!(
        "slices_by_service: {:?} ({found} slices)",
        started.elapsed()
    );
    println!(
        "one-file change, {reloads} reloads: p50 {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
