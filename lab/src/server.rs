//! The test server every pod runs (like Kubernetes e2e `agnhost netexec`), on each declared
//! container port:
//!
//! - TCP: HTTP/1.1 (keep-alive, concurrent connections): `GET /hostname` answers the pod's name,
//!   `GET /clientip` the peer address it saw (`ip:port`), `GET /echo?msg=X` answers X,
//!   `GET /healthz` answers `ok`.
//! - UDP: a datagram `hostname` is answered with the pod's name, `clientip` with the peer
//!   address, `echo X` with X; anything else gets no answer.
//!
//! It writes `ready` on stdout once every socket is bound, then logs (little) to stderr.

use std::convert::Infallible;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;

/// What a server serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// The name it answers with.
    pub pod: String,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
}

/// The line written on stdout once listening.
pub const READY_LINE: &str = "ready";

/// Runs the server until killed.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(opts))
}

async fn run(opts: ServeOptions) -> Result<()> {
    let pod: Arc<str> = opts.pod.into();
    let mut tasks = JoinSet::new();
    // One socket per family and port: an IPv6-only socket next to the IPv4 one, so IPv4
    // peers show as themselves (not as ::ffff:a.b.c.d). Without IPv6 in the kernel, IPv4 only.
    let ipv6 = crate::preflight::ipv6_available();
    for port in dedup(&opts.tcp_ports) {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .with_context(|| format!("binding TCP port {port}"))?;
        tasks.spawn(accept_loop(listener, pod.clone()));
        if ipv6 {
            let socket = ipv6_socket(socket2::Type::STREAM, port)
                .with_context(|| format!("binding TCP port {port} (IPv6)"))?;
            socket.listen(1024).context("listen")?;
            let listener = TcpListener::from_std(socket.into())?;
            tasks.spawn(accept_loop(listener, pod.clone()));
        }
    }
    for port in dedup(&opts.udp_ports) {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .with_context(|| format!("binding UDP port {port}"))?;
        tasks.spawn(udp_loop(socket, pod.clone()));
        if ipv6 {
            let socket = ipv6_socket(socket2::Type::DGRAM, port)
                .with_context(|| format!("binding UDP port {port} (IPv6)"))?;
            tasks.spawn(udp_loop(UdpSocket::from_std(socket.into())?, pod.clone()));
        }
    }
    eprintln!(
        "{pod}: serving tcp {:?} udp {:?}",
        opts.tcp_ports, opts.udp_ports
    );
    let mut out = std::io::stdout();
    writeln!(out, "{READY_LINE}")
        .and_then(|()| out.flush())
        .context("writing ready")?;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
            Err(e) => return Err(e).context("server task failed"),
        }
    }
    // No ports: keep running, like a container that serves nothing.
    std::future::pending::<()>().await;
    Ok(())
}

/// A non-blocking IPv6-only socket bound to `[::]:port`.
fn ipv6_socket(ty: socket2::Type, port: u16) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, ty, None)?;
    socket.set_only_v6(true)?;
    if ty == socket2::Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port).into())?;
    Ok(socket)
}

fn dedup(ports: &[u16]) -> Vec<u16> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    ports
}

async fn accept_loop(listener: TcpListener, pod: Arc<str>) -> Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let pod = pod.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, pod.clone(), peer));
            // Errors here are the client's doing (reset, garbage): nothing to report.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    pod: Arc<str>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()));
    }
    Ok(
        match http_answer(req.uri().path(), req.uri().query(), &pod, peer) {
            Some(body) => reply(StatusCode::OK, body),
            None => reply(StatusCode::NOT_FOUND, "not found\n".into()),
        },
    )
}

/// The body for an HTTP path, None for 404.
pub(crate) fn http_answer(
    path: &str,
    query: Option<&str>,
    pod: &str,
    peer: SocketAddr,
) -> Option<String> {
    match path {
        "/hostname" => Some(pod.to_string()),
        "/clientip" => Some(peer.to_string()),
        "/echo" => Some(query_param(query.unwrap_or(""), "msg").unwrap_or_default()),
        "/healthz" | "/" => Some("ok".to_string()),
        _ => None,
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// The percent-decoded value of `name` in a query string.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The answer to a UDP datagram, None for no answer.
pub(crate) fn udp_answer(datagram: &[u8], pod: &str, peer: SocketAddr) -> Option<String> {
    let text = String::from_utf8_lossy(datagram);
    let text = text.trim();
    match text {
        "hostname" => Some(pod.to_string()),
        "clientip" => Some(peer.to_string()),
        _ => text.strip_prefix("echo ").map(str::to_string),
    }
}

async fn udp_loop(socket: UdpSocket, pod: Arc<str>) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("udp recv: {e}");
                continue;
            }
        };
        if let Some(answer) = udp_answer(&buf[..n], &pod, peer)
            && let Err(e) = socket.send_to(answer.as_bytes(), peer).await
        {
            eprintln!("udp send to {peer}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.244.0.7:40000".parse().unwrap()
    }

    #[test]
    fn http_paths() {
        assert_eq!(
            http_answer("/hostname", None, "web-1", peer()).as_deref(),
            Some("web-1")
        );
        assert_eq!(
            http_answer("/clientip", None, "web-1", peer()).as_deref(),
            Some("10.244.0.7:40000")
        );
        assert_eq!(
            http_answer("/echo", Some("msg=hi+there%21"), "p", peer()).as_deref(),
            Some("hi there!")
        );
        assert_eq!(
            http_answer("/echo", Some("x=1"), "p", peer()).as_deref(),
            Some("")
        );
        assert_eq!(http_answer("/nope", None, "p", peer()), None);
    }

    #[test]
    fn udp_commands() {
        assert_eq!(
            udp_answer(b"hostname", "dns-1", peer()).as_deref(),
            Some("dns-1")
        );
        assert_eq!(
            udp_answer(b"hostname\n", "dns-1", peer()).as_deref(),
            Some("dns-1")
        );
        assert_eq!(
            udp_answer(b"clientip", "d", peer()).as_deref(),
            Some("10.244.0.7:40000")
        );
        assert_eq!(udp_answer(b"echo abc", "d", peer()).as_deref(), Some("abc"));
        assert_eq!(udp_answer(b"what", "d", peer()), None);
        assert_eq!(udp_answer(&[0xff, 0xfe], "d", peer()), None);
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a%20b"), "a b");
    }

    #[test]
    fn serves_http_and_udp_on_loopback() {
        use std::io::{Read, Write};
        // Find free ports, then serve on them in the background.
        let tcp_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let udp_port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = ServeOptions {
            pod: "pod-x".into(),
            tcp_ports: vec![tcp_port],
            udp_ports: vec![udp_port],
        };
        std::thread::spawn(move || serve(opts));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut stream = loop {
            match std::net::TcpStream::connect(("127.0.0.1", tcp_port)) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("server did not come up: {e}"),
            }
        };
        // Two requests on one connection (keep-alive), then one that closes.
        let local = stream.local_addr().unwrap();
        stream
            .write_all(b"GET /hostname HTTP/1.1\r\nHost: x\r\n\r\nGET /clientip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert!(text.contains("\r\n\r\npod-x"), "{text}");
        assert!(text.contains(&format!("\r\n\r\n{local}")), "{text}");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        udp.send_to(b"hostname", ("127.0.0.1", udp_port)).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = udp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pod-x");
    }
}
