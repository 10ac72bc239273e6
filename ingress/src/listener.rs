//! What happens on a client connection before and between requests, wrapped around Pingora's
//! HTTP proxy app:
//!
//! - TLS is accepted here (not by Pingora's listener) so that handshakes can be counted exactly
//!   (`sluice_ingress_tls_handshakes_total`) and bounded by our deadline instead of Pingora's
//!   fixed 60 s.
//! - A request head (HTTP/1.x up to its empty line; HTTP/2 up to the end of the first HEADERS
//!   block) must arrive whole within `request_head_timeout`: Pingora itself only times single
//!   reads, so a client trickling a byte now and then would hold a connection for ever
//!   ("slowloris"). At the deadline the connection is closed.
//! - An idle keep-alive connection is closed after `keepalive_timeout` (Pingora keeps an
//!   HTTP/1.1 connection without `Keep-Alive: timeout=` open indefinitely).
//! - Reads of a request body time out after `body_read_timeout` without a byte.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// The connection limits of a listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From accepting a connection to a complete TLS handshake; then from the handshake (or
    /// accept) to a complete first request head; on a reused connection, from the first byte
    /// of a request to its complete head.
    pub request_head_timeout: Duration,
    /// How long a connection may be idle between requests (HTTP/1.x keep-alive, HTTP/2).
    pub keepalive_timeout: Duration,
    /// The longest wait for the next bytes of a request body (Pingora's per-read timeout).
    pub body_read_timeout: Duration,
}

/// A listener's app: optional TLS, then the head deadline around the HTTP app `A`.
pub struct Front<A> {
    app: Arc<Sessions<A>>,
    tls: Option<Acceptor>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl<A> Front<A> {
    /// `tls`: accept TLS with this acceptor first (the HTTPS listener).
    pub fn new(app: A, tls: Option<Acceptor>, limits: Limits, metrics: Arc<Metrics>) -> Front<A> {
        Front {
            app: Arc::new(Sessions {
                inner: Arc::new(app),
                limits,
            }),
            tls,
            limits,
            metrics,
        }
    }
}

/// A TLS version as a bounded label value.
fn version_label(version: &str) -> &'static str {
    match version {
        "TLSv1_2" | "TLSv1.2" => "1.2",
        "TLSv1_3" | "TLSv1.3" => "1.3",
        _ => "other",
    }
}

fn alpn_label(alpn: Option<ALPN>) -> &'static str {
    match alpn {
        None => "",
        Some(ALPN::H2) => "h2",
        Some(ALPN::H1) => "http/1.1",
        Some(_) => "other",
    }
}

#[async_trait]
impl<A> ServerApp for Front<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let timeout = self.limits.request_head_timeout;
        let stream: Stream = match &self.tls {
            None => stream,
            Some(acceptor) => {
                let deadline = Instant::now() + timeout;
                let mut stream = stream;
                // A connection closed (or idle up to the deadline) before its first byte never
                // started a handshake (port checks, TCP health probes): not counted.
                let mut first = [0u8; 1];
                match tokio::time::timeout_at(deadline, stream.try_peek(&mut first)).await {
                    // `false`: the stream cannot peek; the handshake tells.
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return None,
                    Err(_) => {
                        self.metrics.head_timeouts.inc();
                        return None;
                    }
                }
                let client = stream
                    .get_socket_digest()
                    .and_then(|d| d.peer_addr().map(ToString::to_string))
                    .unwrap_or_default();
                // The TCP listener hands over its own stream type; the acceptor wants it typed.
                let Ok(l4) = stream.into_any().downcast::<L4Stream>() else {
                    tracing::error!(event = "tls_failed", "HTTPS listener: not a TCP stream");
                    return None;
                };
                let handshake = tokio::time::timeout_at(deadline, acceptor.tls_handshake(*l4));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        let version = tls
                            .get_ssl_digest()
                            .map_or("other", |d| version_label(&d.version));
                        let alpn = alpn_label(tls.selected_alpn_proto());
                        self.metrics
                            .tls_handshakes
                            .with_label_values(&["ok", version, alpn])
                            .inc();
                        Box::new(tls)
                    }
                    failed => {
                        self.metrics
                            .tls_handshakes
                            .with_label_values(&["failed", "", ""])
                            .inc();
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("not complete within {timeout:?}"),
                        };
                        // Info, as nginx logs clients' handshake errors: scanners are common.
                        tracing::info!(
                            event = "tls_handshake_failed",
                            client = %client,
                            error = %error,
                            "TLS handshake from {client}: {error}"
                        );
                        return None;
                    }
                }
            }
        };
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let timeouts = self.metrics.head_timeouts.clone();
        let guarded: Stream = Box::new(HeadGuard::new(stream, timeout, h2, timeouts));
        ServerApp::process_new(&self.app, guarded, shutdown).await
    }

    async fn cleanup(&self) {
        // Pingora's proxy wakes its idle keep-alive connections here on shutdown.
        ServerApp::cleanup(&*self.app).await;
    }
}

/// The HTTP app with our keep-alive and body timeouts, re-arming the head deadline for each
/// request of a reused connection.
pub struct Sessions<A> {
    inner: Arc<A>,
    limits: Limits,
}

#[async_trait]
impl<A> HttpServerApp for Sessions<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if let Some(guard) = session
            .stream()
            .and_then(|s| (**s).as_any().downcast_ref::<HeadGuard>())
        {
            guard.next_request();
        }
        if session.get_keepalive().is_some() && !*shutdown.borrow() {
            // The idle wait for this session's head is ours: Pingora would carry over what the
            // previous request's `Keep-Alive: timeout=` asked, or no limit without one. Whole
            // seconds are Pingora's unit.
            session.set_keepalive(Some(self.limits.keepalive_timeout.as_secs().max(1)));
        }
        session.set_read_timeout(Some(self.limits.body_read_timeout));
        self.inner.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

/// Where a request head ends, fed the bytes read in order.
#[derive(Debug)]
enum HeadScan {
    /// HTTP/1.x: the head ends at its first empty line (CRLF CRLF, or bare LFs as httparse
    /// accepts), not counting empty lines before the request line (which httparse skips).
    H1 { started: bool, state: u8 },
    /// HTTP/2: skip the 24-byte client preface, then walk frames until the payload of a
    /// HEADERS or CONTINUATION frame with END_HEADERS has arrived.
    H2 {
        preface_left: u8,
        header: [u8; 9],
        header_len: u8,
        payload_left: u32,
        ends_head: bool,
    },
}

const H2_PREFACE_LEN: u8 = 24;
const H2_HEADERS: u8 = 0x1;
const H2_CONTINUATION: u8 = 0x9;
const H2_END_HEADERS: u8 = 0x4;

impl HeadScan {
    fn new(h2: bool) -> HeadScan {
        if h2 {
            HeadScan::H2 {
                preface_left: H2_PREFACE_LEN,
                header: [0; 9],
                header_len: 0,
                payload_left: 0,
                ends_head: false,
            }
        } else {
            HeadScan::H1 {
                started: false,
                state: 0,
            }
        }
    }

    /// Feeds bytes; true once the head is complete (the rest of `bytes` is not looked at).
    fn feed(&mut self, bytes: &[u8]) -> bool {
        match self {
            HeadScan::H1 { started, state } => {
                for &b in bytes {
                    // state 0: inside a line; 1: just after LF; 2: after LF CR.
                    *state = match (b, *state) {
                        (b'\n', 1 | 2) if *started => return true,
                        (b'\n', _) => 1,
                        (b'\r', 1) => 2,
                        (b'\r', s) if !*started => s,
                        _ => {
                            *started = true;
                            0
                        }
                    };
                }
                false
            }
            HeadScan::H2 {
                preface_left,
                header,
                header_len,
                payload_left,
                ends_head,
            } => {
                let mut rest = bytes;
                while !rest.is_empty() {
                    if *preface_left > 0 {
                        let n = rest.len().min(usize::from(*preface_left));
                        // n <= 24, so it fits.
                        *preface_left -= n as u8;
                        rest = &rest[n..];
                    } else if *payload_left > 0 {
                        let n = rest.len().min(*payload_left as usize);
                        *payload_left -= n as u32;
                        rest = &rest[n..];
                        if *payload_left == 0 && *ends_head {
                            return true;
                        }
                    } else {
                        let at = usize::from(*header_len);
                        let n = rest.len().min(9 - at);
                        header[at..at + n].copy_from_slice(&rest[..n]);
                        *header_len += n as u8;
                        rest = &rest[n..];
                        if *header_len == 9 {
                            *header_len = 0;
                            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                            *ends_head = matches!(header[3], H2_HEADERS | H2_CONTINUATION)
                                && header[4] & H2_END_HEADERS != 0;
                            *payload_left = len;
                            if len == 0 && *ends_head {
                                return true;
                            }
                        }
                    }
                }
                false
            }
        }
    }
}

/// The client connection with the head deadline: while a request head is incomplete, a read
/// past the deadline fails (`TimedOut`) and Pingora closes the connection. Everything else is
/// passed through.
pub struct HeadGuard {
    inner: Stream,
    timeout: Duration,
    h2: bool,
    /// Until when the current head may arrive; `None` with `waiting`: from its first byte.
    deadline: Option<Instant>,
    waiting: bool,
    scan: HeadScan,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Requests begun on this connection (HTTP/1.x sessions), and whether a new one asks for the
    /// deadline to be re-armed (set through `&self`: the session only lends the stream).
    requests: AtomicU32,
    rearm: AtomicBool,
    /// Counts this connection once if the deadline closes it.
    timeouts: Option<prometheus::IntCounter>,
}

impl HeadGuard {
    fn new(
        inner: Stream,
        timeout: Duration,
        h2: bool,
        timeouts: prometheus::IntCounter,
    ) -> HeadGuard {
        HeadGuard {
            inner,
            timeout,
            h2,
            // The first head: from the accept (or the handshake's end).
            deadline: Some(Instant::now() + timeout),
            waiting: true,
            scan: HeadScan::new(h2),
            sleep: None,
            requests: AtomicU32::new(0),
            rearm: AtomicBool::new(false),
            timeouts: Some(timeouts),
        }
    }

    /// An HTTP/1.x session is about to read a request head: from the second on (keep-alive),
    /// the deadline starts at that request's first byte (the idle time before is Pingora's
    /// keep-alive timeout).
    fn next_request(&self) {
        if self.requests.fetch_add(1, Ordering::Relaxed) > 0 {
            self.rearm.store(true, Ordering::Relaxed);
        }
    }

    fn timed_out(&mut self) -> io::Error {
        if let Some(counter) = self.timeouts.take() {
            counter.inc();
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("request head not complete within {:?}", self.timeout),
        )
    }
}

impl fmt::Debug for HeadGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadGuard")
            .field("inner", &self.inner)
            .field("waiting", &self.waiting)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl AsyncRead for HeadGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rearm.swap(false, Ordering::Relaxed) {
            this.waiting = true;
            this.deadline = None;
            this.sleep = None;
            this.scan = HeadScan::new(this.h2);
        }
        if !this.waiting {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.deadline.is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(Err(this.timed_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() && this.deadline.is_none() {
                    this.deadline = Some(Instant::now() + this.timeout);
                }
                if this.scan.feed(new) {
                    this.waiting = false;
                    this.sleep = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Some(deadline) = this.deadline else {
                    return Poll::Pending;
                };
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                    Poll::Pending => Poll::Pending,
                }
            }
            other => other,
        }
    }
}

impl AsyncWrite for HeadGuard {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeadGuard {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeadGuard {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadGuard {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadGuard {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadGuard {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for HeadGuard {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for HeadGuard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where (byte count) the head is complete when fed one byte at a time, and when fed whole.
    fn ends(h2: bool, bytes: &[u8]) -> Option<usize> {
        let mut whole = HeadScan::new(h2);
        let at_once = whole.feed(bytes);
        let mut scan = HeadScan::new(h2);
        let one_by_one = (0..bytes.len())
            .find(|&i| scan.feed(&bytes[i..=i]))
            .map(|i| i + 1);
        assert_eq!(at_once, one_by_one.is_some(), "{bytes:?}");
        one_by_one
    }

    #[test]
    fn an_http1_head_ends_at_its_first_empty_line_not_before_the_request_line() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(ends(false, head), Some(head.len()));
        assert_eq!(ends(false, b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
        assert_eq!(ends(false, b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(ends(false, b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
        // Empty lines before the request line do not end it (httparse skips them).
        assert_eq!(ends(false, b"\r\n\r\n\n\n"), None);
        assert_eq!(ends(false, b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"), Some(22));
        // A body after the head is not looked at.
        assert_eq!(ends(false, b"POST / HTTP/1.1\r\n\r\nxyz"), Some(19));
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn an_http2_head_ends_with_the_payload_of_the_frame_that_ends_the_headers() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, &[0; 6])); // SETTINGS
        bytes.extend(frame(0x8, 0, &[0; 4])); // WINDOW_UPDATE
        let before = bytes.len();
        bytes.extend(frame(H2_HEADERS, 0, &[7; 10])); // HEADERS without END_HEADERS
        assert_eq!(ends(true, &bytes), None);
        bytes.extend(frame(H2_CONTINUATION, H2_END_HEADERS, &[7; 5]));
        assert_eq!(ends(true, &bytes), Some(bytes.len()));
        // A single HEADERS frame with END_HEADERS (and END_STREAM).
        let mut one = bytes[..before].to_vec();
        one.extend(frame(H2_HEADERS, H2_END_HEADERS | 0x1, &[7; 3]));
        assert_eq!(ends(true, &one), Some(one.len()));
        // The preface alone, or a frame header without its payload, is not a head.
        assert_eq!(ends(true, &one[..24]), None);
        assert_eq!(ends(true, &one[..one.len() - 1]), None);
    }
}
