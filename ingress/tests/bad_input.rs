//! Bad input over real sockets: malformed requests, oversized headers, stalled clients and TLS
//! garbage get an error answer or a closed connection, and the process keeps serving.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes `bytes` (ignoring a reset mid-write) and reads what comes back until the peer closes
/// or `wait` passes: (answer, closed).
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// An error status (4xx) or nothing, and the connection closed.
/// A manifest directory at `dir`: host ok.example over HTTP and HTTPS (a certificate of `ca`)
/// to the backend at `backend`.
fn ok_example(dir: &std::path::Path, ca: &Ca, backend: std::net::SocketAddr) {
    std::fs::create_dir(dir).expect("manifest dir");
    write(dir, "00-class.yaml", CLASS);
    write(
        dir,
        "10-backends.yaml",
        &service_with_slice("a", &[backend]),
    );
    write(
        dir,
        "30-secret.yaml",
        &tls_secret("t", &ca.leaf(&["ok.example"])),
    );
    write(
        dir,
        "20-ingress.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: ok, annotations: {nginx.ingress.kubernetes.io/ssl-redirect: 'false'}}\n\
         spec:\n  ingressClassName: sluice\n  tls: [{hosts: [ok.example], secretName: t}]\n  \
         rules: [{host: ok.example, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}]}}]\n",
    );
}

fn refused(what: &str, (answer, closed): (String, bool)) {
    assert!(closed, "{what}: connection left open; got {answer:?}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.0 4"),
        "{what}: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_slow_and_tls_garbage_are_refused_and_serving_goes_on() {
    let a = backend("a", [127, 0, 0, 51]).await;
    let ca = Ca::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    ok_example(&dir, &ca, a.addr);
    let mut ingress = Ingress::start(&dir).await;
    let tls_client = ingress.https_client(&ca.pem, &["ok.example"]);
    let works = |ingress: &Ingress| {
        let http = ingress.http;
        let https = ingress.https;
        let tls_client = tls_client.clone();
        async move {
            let resp = reqwest::Client::new()
                .get(format!("http://{http}/"))
                .header("Host", "ok.example")
                .send()
                .await
                .expect("plain request after bad input");
            assert_eq!(resp.status(), 200);
            let (status, body, _, _) = get_tls(&tls_client, https, "ok.example", "/")
                .await
                .expect("TLS request after bad input");
            assert_eq!((status, field(&body, "backend")), (200, "a"));
        }
    };
    works(&ingress).await;
    let wait = Duration::from_secs(10);

    // Malformed request lines and heads.
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\nHost: ok.example\r\n\r\n",
        b"GET\x00/ HTTP/1.1\r\nHost: ok.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost ok.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: ok.example\r\nContent-Length: -5\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        refused(&format!("{bad:?}"), exchange(ingress.http, bad, wait).await);
    }
    // Both Content-Length and chunked (a smuggling attempt) must not reach the backend as two
    // requests: an error, or one answer for one request.
    let (answer, _) = exchange(
        ingress.http,
        b"POST / HTTP/1.1\r\nHost: ok.example\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: ok.example\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(!answer.contains("path=/smuggled"), "{answer}");

    // Oversized: 2 MiB of header, and 300 headers.
    let mut big = b"GET / HTTP/1.1\r\nHost: ok.example\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 2 << 20));
    big.extend_from_slice(b"\r\n\r\n");
    refused("2 MiB header", exchange(ingress.http, &big, wait).await);
    let mut many = b"GET / HTTP/1.1\r\nHost: ok.example\r\n".to_vec();
    for i in 0..300 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    refused("300 headers", exchange(ingress.http, &many, wait).await);

    // TLS garbage on the HTTPS port: random bytes, a plain HTTP request, a cut ClientHello.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (what, bytes) in [
        ("noise", &noise[..]),
        (
            "plain HTTP",
            &b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\n"[..],
        ),
        (
            "cut ClientHello",
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        ),
    ] {
        let cut = what == "cut ClientHello";
        let (answer, closed) = exchange(
            ingress.https,
            bytes,
            if cut { Duration::from_secs(2) } else { wait },
        )
        .await;
        // The cut ClientHello waits for more; the others are refused at once.
        if !cut {
            assert!(closed, "{what}: left open");
        }
        assert!(!answer.contains("HTTP/1.1 200"), "{what}: {answer:?}");
    }

    // Stalled clients (half a request head, then nothing) do not hold up anyone else.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(ingress.http)
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: ok.exa")
            .await
            .expect("write");
        stalled.push(s);
    }
    let start = Instant::now();
    for _ in 0..5 {
        works(&ingress).await;
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    drop(stalled);

    assert!(ingress.child_alive(), "{}", ingress.log_text());
    works(&ingress).await;
}

/// How a slow client ends: (closed by the server, how long it took, what it was sent).
struct Ended {
    closed: bool,
    took: Duration,
    answer: String,
}

/// Sends `start`, then one byte of `trickle` every 200 ms (over and over; none if empty), until the server
/// closes the connection or `give_up` passes.
async fn trickle<S>(mut stream: S, start: &[u8], trickle: &[u8], give_up: Duration) -> Ended
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let begun = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = stream.write_all(start).await.is_err();
    let mut next = trickle.iter().cycle();
    while !closed && begun.elapsed() < give_up {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => closed = true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                // An empty `trickle`: idle.
                if let Some(byte) = next.next()
                    && stream.write_all(&[*byte]).await.is_err()
                {
                    closed = true;
                }
            }
        }
    }
    Ended {
        closed,
        took: begun.elapsed(),
        answer: String::from_utf8_lossy(&got).into_owned(),
    }
}

/// A TLS connection to the HTTPS port trusting `ca`, offering `alpn`, at most `version`.
async fn tls_connect(
    https: std::net::SocketAddr,
    ca: &str,
    alpn: &[u8],
    tls12_only: bool,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use std::sync::Arc;
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der_of(ca)))
        .expect("test CA");
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(https)
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("ok.example").expect("name"),
            tcp,
        )
        .await
        .expect("TLS handshake")
}

/// An HTTP/2 frame header announcing `len` bytes, and `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags, 0, 0, 0, stream]);
    f.extend_from_slice(payload);
    f
}

/// With `--request-head-timeout 2 --keepalive-timeout 3`: clients trickling a request head
/// (plain HTTP, HTTP/1.1 over TLS, HTTP/2, and the second request of a keep-alive connection) or
/// stalling a TLS handshake are closed at about the deadline, idle HTTP/1.1 and HTTP/2
/// connections at about the keep-alive timeout, while normal clients are served meanwhile. TLS
/// handshakes are counted by result, version and ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_closed_at_the_head_deadline_and_handshakes_are_counted() {
    let a = backend("a", [127, 0, 0, 52]).await;
    let ca = Ca::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    ok_example(&dir, &ca, a.addr);
    // Different, so that which one closed a connection shows.
    let deadline = Duration::from_secs(2);
    let keepalive = Duration::from_secs(3);
    let ingress = Ingress::start_dir_with(
        &dir,
        &["--request-head-timeout", "2", "--keepalive-timeout", "3"],
    )
    .await;
    // Generous: a loaded machine may be slow to notice, never early.
    let bound = keepalive * 5;
    let give_up = bound + Duration::from_secs(5);
    let head = b"GET / HTTP/1.1\r\nHost: ok.example\r\nX-Slow: ";
    let http = ingress.http;
    let https = ingress.https;

    let plain = async {
        let tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
        trickle(tcp, head, b"a", give_up).await
    };
    let over_tls = async {
        let tls = tls_connect(https, &ca.pem, b"http/1.1", false).await;
        trickle(tls, head, b"a", give_up).await
    };
    let h2 = async {
        let tls = tls_connect(https, &ca.pem, b"h2", true).await;
        let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        start.extend(h2_frame(0x4, 0, 0, 0, &[])); // SETTINGS
        // HEADERS (END_HEADERS) announcing 1000 bytes of header block, which then trickle.
        start.extend(h2_frame(0x1, 0x4, 1, 1000, &[]));
        trickle(tls, &start, &[0x40], give_up).await
    };
    // Keep-alive: one whole request, then the next head trickles.
    let second = async {
        let mut tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = tcp.read(&mut buf).await.expect("first answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        trickle(tcp, head, b"a", give_up).await
    };
    // Idle: after one request (keep-alive timeout), and before any byte on HTTPS.
    let idle_after_request = async {
        let mut tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\n")
            .await
            .expect("write");
        trickle(tcp, b"", b"", give_up).await
    };
    let idle_tls = async {
        let tcp = tokio::net::TcpStream::connect(https)
            .await
            .expect("connect");
        trickle(tcp, b"", b"", give_up).await
    };
    let cut_hello = async {
        let tcp = tokio::net::TcpStream::connect(https)
            .await
            .expect("connect");
        trickle(
            tcp,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"",
            give_up,
        )
        .await
    };
    // HTTP/2: a whole request, then idle: closed by the keep-alive (HTTP/2 idle) timeout.
    let h2_idle = async {
        let tls = tls_connect(https, &ca.pem, b"h2", false).await;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get("https://ok.example/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("h2 request");
        assert_eq!(resp.status(), 200);
        drop(resp);
        let begun = Instant::now();
        let closed = tokio::time::timeout(give_up, conn).await.is_ok();
        Ended {
            closed,
            took: begun.elapsed(),
            answer: String::new(),
        }
    };
    // Meanwhile, normal clients are served.
    let tls_client = ingress.https_client(&ca.pem, &["ok.example"]);
    let normal = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..3 {
            let (status, body, _) = ingress.get("ok.example", "/").await;
            assert_eq!((status, field(&body, "backend")), (200, "a"), "{body}");
            let (status, _, _, _) = get_tls(&tls_client, https, "ok.example", "/")
                .await
                .expect("TLS request meanwhile");
            assert_eq!(status, 200);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let (plain, over_tls, h2, second, idle_after_request, idle_tls, cut_hello, h2_idle, ()) = tokio::join!(
        plain,
        over_tls,
        h2,
        second,
        idle_after_request,
        idle_tls,
        cut_hello,
        h2_idle,
        normal
    );
    for (what, ended, not_before) in [
        ("plain HTTP trickle", plain, deadline),
        ("HTTP/1.1 over TLS trickle", over_tls, deadline),
        ("HTTP/2 trickle", h2, deadline),
        // The deadline starts again at the second request's first byte.
        ("keep-alive second request trickle", second, deadline),
        ("idle after a request", idle_after_request, keepalive),
        ("idle before a TLS handshake", idle_tls, deadline),
        ("cut ClientHello", cut_hello, deadline),
        ("HTTP/2 idle after a request", h2_idle, keepalive),
    ] {
        eprintln!("{what}: closed after {:?}", ended.took);
        assert!(
            ended.closed,
            "{what}: still open after {:?}: {:?}",
            ended.took, ended.answer
        );
        assert!(
            ended.took < bound,
            "{what}: closed only after {:?}",
            ended.took
        );
        // Never before its timeout (timers do not fire early; 100 ms for where the client's
        // clock starts against the server's).
        assert!(
            ended.took + Duration::from_millis(100) >= not_before,
            "{what}: closed after {:?}, before {not_before:?}: {:?}",
            ended.took,
            ended.answer
        );
        assert!(
            !ended.answer.contains("X-Slow"),
            "{what}: {:?}",
            ended.answer
        );
    }

    // Garbage on the HTTPS port is a failed handshake; an idle connection is none.
    let (_, closed) = exchange(https, b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\n", bound).await;
    assert!(closed, "plain HTTP on the HTTPS port left open");
    let metrics = reqwest::get(format!("http://{}/metrics", ingress.metrics))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let handshakes = |result: &str, alpn: &str, version: &str| {
        value(&format!(
            "sluice_ingress_tls_handshakes_total{{alpn=\"{alpn}\",result=\"{result}\",version=\"{version}\"}}"
        ))
    };
    // The four trickled heads and the silent HTTPS connection (the idle keep-alive one ended
    // by the keep-alive timeout, the cut ClientHello as a failed handshake).
    assert_eq!(
        value("sluice_ingress_request_head_timeouts_total"),
        5.0,
        "{metrics}"
    );
    // The cut ClientHello (timed out) and the plain HTTP request.
    assert_eq!(handshakes("failed", "", ""), 2.0, "{metrics}");
    assert_eq!(handshakes("ok", "http/1.1", "1.3"), 1.0, "{metrics}");
    assert_eq!(handshakes("ok", "h2", "1.2"), 1.0, "{metrics}");
    let log = ingress.log_text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("event=\"tls_handshake_failed\""))
            .count(),
        2,
        "{log}"
    );
    // The two above, the HTTP/2 idle one and reqwest's three (h2 or HTTP/1.1 by its ALPN).
    assert_eq!(
        handshakes("ok", "h2", "1.3") + handshakes("ok", "http/1.1", "1.3"),
        5.0,
        "{metrics}"
    );
}
