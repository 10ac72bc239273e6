//! Graceful shutdown of the real binary: SIGTERM stops accepting, lets the request in flight
//! finish, then exits; the grace period bounds how long that may take.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn sigterm(ingress: &Ingress) {
    // Our own child, by its PID.
    let status = Command::new("kill")
        .args(["-TERM", &ingress.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Waits for the child to exit; its exit code, or None if it is still running after `within`.
async fn exited(ingress: &mut Ingress, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = ingress.child.try_wait() {
            return Some(status.code().unwrap_or(-1));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn setup(grace: &str) -> (tempfile::TempDir, BackendServer, Ingress) {
    let slow = backend("slow", [127, 0, 0, 31]).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    write(
        &dir,
        "10-backends.yaml",
        &service_with_slice("slow", &[slow.addr]),
    );
    write(
        &dir,
        "20-ingress.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: slow}\nspec:\n  ingressClassName: sluice\n  \
         rules: [{host: slow.example, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: slow, port: {number: 80}}}}]}}]\n",
    );
    let ingress = Ingress::start_dir_with(&dir, &["--shutdown-grace-seconds", grace]).await;
    (tmp, slow, ingress)
}

fn slow_request(
    ingress: &Ingress,
    ms: u64,
) -> tokio::task::JoinHandle<Result<(u16, String), String>> {
    let url = format!("http://{}/work?sleep={ms}", ingress.http);
    tokio::spawn(async move {
        let resp = reqwest::Client::new()
            .get(url)
            .header("Host", "slow.example")
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.map_err(|e| format!("{e:?}"))?))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_then_exits() {
    let (_tmp, _slow, mut ingress) = setup("10").await;
    let (status, _, _) = ingress.get("slow.example", "/").await;
    assert_eq!(status, 200);
    let request = slow_request(&ingress, 1500);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = Instant::now();
    sigterm(&ingress);
    // Draining: no new connections, readiness fails (or the port is gone already).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(ingress.http).await.is_err(),
        "still accepting after SIGTERM"
    );
    let ready = reqwest::Client::new()
        .get(format!("http://{}/readyz", ingress.metrics))
        .send()
        .await;
    assert!(
        ready.is_ok_and(|r| r.status() == 503),
        "ready while draining"
    );
    assert!(ingress.child_alive(), "exited with a request in flight");
    let (status, body) = request
        .await
        .expect("task")
        .expect("in-flight request finished");
    assert_eq!((status, field(&body, "backend")), (200, "slow"));
    let code = exited(&mut ingress, Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "{}", ingress.log_text());
    // Long before the 10 s grace: it exited because nothing was left in flight.
    assert!(
        term.elapsed() < Duration::from_secs(5),
        "{:?}",
        term.elapsed()
    );
    assert!(ingress.log_text().contains("drained"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_bounds_the_drain() {
    let (_tmp, _slow, mut ingress) = setup("1").await;
    let request = slow_request(&ingress, 30_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = Instant::now();
    sigterm(&ingress);
    let code = exited(&mut ingress, Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "{}", ingress.log_text());
    let took = term.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the grace period"
    );
    assert!(
        request.await.expect("task").is_err(),
        "the 30 s request was cut"
    );
    assert!(ingress.log_text().contains("grace period over"));
}
