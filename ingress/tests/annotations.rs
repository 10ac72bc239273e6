//! ingress-nginx annotations and WebSocket upgrades through the real binary, over real sockets.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends raw HTTP/1.1 bytes and reads until the peer closes or `until` appears.
async fn raw(addr: std::net::SocketAddr, request: &[u8], until: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&got).contains(until) {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_body_size_redirect_backend_protocol_and_websocket() {
    let plain = backend("plain", [127, 0, 0, 8]).await;
    let tls = backend_with("tls", [127, 0, 0, 9], Mode::Tls).await;
    let h2c = backend_with("h2c", [127, 0, 0, 10], Mode::H2c).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    write(
        &dir,
        "10-backends.yaml",
        &format!(
            "{}{}{}",
            service_with_slice("plain", &[plain.addr]),
            service_with_slice("tls", &[tls.addr]),
            service_with_slice("h2c", &[h2c.addr])
        ),
    );
    let ingress = |name: &str, annotations: &str, host: &str, path: &str, svc: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\n\
             spec:\n  ingressClassName: sluice\n  rules:\n  - host: {host}\n    http: {{paths: [{{path: {path}, pathType: Prefix, \
             backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}]}}\n"
        )
    };
    write(
        &dir,
        "20-ingress.yaml",
        &[
            ingress(
                "rewrite",
                "nginx.ingress.kubernetes.io/rewrite-target: /",
                "rw.example",
                "/app",
                "plain",
            ),
            ingress(
                "limited",
                "nginx.ingress.kubernetes.io/proxy-body-size: 1k",
                "small.example",
                "/",
                "plain",
            ),
            ingress(
                "moved",
                "nginx.ingress.kubernetes.io/permanent-redirect: 'https://new.example/'",
                "old.example",
                "/",
                "plain",
            ),
            ingress(
                "tls-backend",
                "nginx.ingress.kubernetes.io/backend-protocol: HTTPS",
                "tls.example",
                "/",
                "tls",
            ),
            ingress(
                "grpc-backend",
                "nginx.ingress.kubernetes.io/backend-protocol: GRPC",
                "h2c.example",
                "/",
                "h2c",
            ),
            ingress(
                "snippet",
                "nginx.ingress.kubernetes.io/server-snippet: 'return 200;'",
                "ws.example",
                "/",
                "plain",
            ),
        ]
        .concat(),
    );
    let ingress = Ingress::start(&dir).await;

    // rewrite-target replaces the matched prefix; the query stays.
    for (path, upstream) in [
        ("/app", "/"),
        ("/app/x/y", "/x/y"),
        ("/app/x?q=1", "/x?q=1"),
    ] {
        let (status, body, _) = ingress.get("rw.example", path).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(field(&body, "path"), upstream, "{path}");
    }

    // proxy-body-size: within the limit passes; above it, 413, declared or chunked.
    let client = reqwest::Client::new();
    let url = format!("http://{}/upload", ingress.http);
    let resp = client
        .post(&url)
        .header("Host", "small.example")
        .body(vec![b'x'; 1000])
        .send()
        .await
        .expect("small body");
    assert_eq!(resp.status(), 200);
    assert_eq!(field(&resp.text().await.expect("body"), "received"), "1000");
    let resp = client
        .post(&url)
        .header("Host", "small.example")
        .body(vec![b'x'; 2000])
        .send()
        .await
        .expect("large body");
    assert_eq!(resp.status(), 413);
    let chunk = "x".repeat(600);
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: small.example\r\nTransfer-Encoding: chunked\r\n\r\n\
         258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = raw(ingress.http, chunked.as_bytes(), "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Other hosts have no limit.
    let resp = client
        .post(&url)
        .header("Host", "rw.example")
        .body(vec![b'x'; 5000])
        .send()
        .await
        .expect("unlimited");
    assert_eq!(resp.status(), 404, "rw.example has only /app");

    // permanent-redirect: 301 to the URL given.
    let (status, _, headers) = ingress.get("old.example", "/anything").await;
    assert_eq!(status, 301);
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some("https://new.example/")
    );

    // backend-protocol HTTPS: TLS to a self-signed backend; GRPC: HTTP/2 without TLS.
    let (status, body, _) = ingress.get("tls.example", "/t").await;
    assert_eq!((status, field(&body, "backend")), (200, "tls"), "{body}");
    let (status, body, _) = ingress.get("h2c.example", "/g").await;
    assert_eq!((status, field(&body, "backend")), (200, "h2c"), "{body}");
    assert_eq!(field(&body, "version"), "HTTP/2.0");
    // Plain backends are spoken to in HTTP/1.1.
    let (_, body, _) = ingress.get("ws.example", "/").await;
    assert_eq!(field(&body, "version"), "HTTP/1.1");

    // A snippet annotation is refused: reported, and the route works without it.
    let log = ingress.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("server-snippet") && l.contains("not supported")),
        "{log}"
    );

    // WebSocket: the upgrade goes through and bytes flow both ways.
    let upgrade = b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(ingress.http)
        .await
        .expect("connect");
    stream.write_all(upgrade).await.expect("write upgrade");
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&head).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("101 in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before the upgrade: {}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
        .write_all(b"ping over the upgraded connection")
        .await
        .expect("write");
    let mut echoed = Vec::new();
    while echoed.len() < 33 {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert!(n > 0, "closed before the echo");
        echoed.extend_from_slice(&buf[..n]);
    }
    assert_eq!(echoed, b"ping over the upgraded connection");
}
