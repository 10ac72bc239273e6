//! The Pingora proxy: routes each request by the current [`State`] (swapped whole, atomically,
//! when the cluster changes), redirects plain HTTP for TLS hosts, balances over endpoints.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::annotations::{BackendProtocol, rewrite_path};
use crate::certs::CertStore;
use crate::config::Compiled;
use crate::metrics::Metrics;
use crate::route::{Backend, normalize_host};

/// Everything a request or handshake reads, replaced as one value.
#[derive(Debug)]
pub struct State {
    pub compiled: Compiled,
    pub certs: CertStore,
}

/// The state shared by the listeners and the reloader.
pub type SharedState = Arc<ArcSwap<State>>;

/// Chooses the certificate by SNI from the current state (rustls calls this synchronously during
/// the handshake; the lookup is a map read, no I/O).
#[derive(Debug)]
pub struct SniResolver(pub SharedState);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().certs.choose(hello.server_name()))
    }
}

/// One listener's proxy (plain HTTP or HTTPS).
pub struct IngressProxy {
    state: SharedState,
    /// Whether this listener is the HTTPS one (X-Forwarded-Proto, no redirect).
    https: bool,
    /// Where redirects to HTTPS point (`None`: no HTTPS listener, so no redirect).
    https_port: Option<u16>,
    /// Round-robin position, shared by all backends (cheap, and fair enough per backend).
    next: AtomicUsize,
    ids: RequestIds,
    metrics: Arc<Metrics>,
}

impl IngressProxy {
    pub fn new(
        state: SharedState,
        https: bool,
        https_port: Option<u16>,
        metrics: Arc<Metrics>,
    ) -> IngressProxy {
        IngressProxy {
            state,
            https,
            https_port,
            next: AtomicUsize::new(0),
            ids: RequestIds::default(),
            metrics,
        }
    }
}

/// Request IDs: 128 bits from a per-process random key hashing a counter (unique per process,
/// unpredictable enough for correlation; not a secret).
#[derive(Default)]
struct RequestIds {
    keys: (RandomState, RandomState),
    counter: AtomicU64,
}

impl RequestIds {
    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut a = self.keys.0.build_hasher();
        a.write_u64(n);
        let mut b = self.keys.1.build_hasher();
        b.write_u64(n);
        format!("{:016x}{:016x}", a.finish(), b.finish())
    }
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    request_id: String,
    host: String,
    /// "namespace/name" of the Ingress whose route matched ("" when none did).
    ingress: String,
    backend: Option<Backend>,
    endpoints: Arc<[SocketAddr]>,
    tried: Vec<SocketAddr>,
    /// What answered when the proxy did itself: "no_route", "redirect", "no_endpoints",
    /// "too_large".
    local: Option<&'static str>,
    /// The path and query to send upstream when `rewrite-target` changed them.
    rewritten: Option<String>,
    protocol: BackendProtocol,
    max_body: Option<u64>,
    body_seen: u64,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an upstream may stay silent mid-request or mid-response (ingress-nginx's default
/// proxy-read-timeout and proxy-send-timeout), so a hung backend does not hold a client forever.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn header<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether a client-sent X-Request-ID is safe to pass on and log (short, plain characters).
fn usable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

async fn respond(session: &mut Session, status: u16, headers: &[(&str, &str)]) -> Result<()> {
    let body = Bytes::from(format!("{status}\n"));
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 2))?;
    for (name, value) in headers {
        resp.insert_header(name.to_string(), value.to_string())?;
    }
    resp.insert_header("Content-Type", "text/plain")?;
    resp.insert_header("Content-Length", body.len().to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

#[async_trait]
impl ProxyHttp for IngressProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            request_id: String::new(),
            host: String::new(),
            ingress: String::new(),
            backend: None,
            endpoints: Arc::from(Vec::new()),
            tried: Vec::new(),
            local: None,
            rewritten: None,
            protocol: BackendProtocol::Http,
            max_body: None,
            body_seen: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = match header(req, "x-request-id") {
            Some(id) if usable_request_id(id) => id.to_string(),
            _ => self.ids.next(),
        };
        // HTTP/2 has :authority (in the URI) and may lack Host.
        ctx.host = header(req, "host")
            .map(str::to_string)
            .or_else(|| req.uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let path = req.uri.path().to_string();
        let state = self.state.load();
        let Some(route) = state.compiled.routes.lookup_route(&ctx.host, &path) else {
            ctx.local = Some("no_route");
            respond(session, 404, &[]).await?;
            return Ok(true);
        };
        if !self.https
            && route.options.ssl_redirect
            && let Some(port) = self.https_port
            && state.compiled.tls.lookup(&ctx.host).is_some()
        {
            let host = normalize_host(&ctx.host);
            let authority = if port == 443 {
                host
            } else {
                format!("{host}:{port}")
            };
            let path_and_query = req
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            let location = format!("https://{authority}{path_and_query}");
            ctx.local = Some("redirect");
            respond(session, 308, &[("Location", &location)]).await?;
            return Ok(true);
        }
        let options = route.options;
        ctx.ingress.clone_from(&options.ingress);
        if let Some((url, code)) = &options.permanent_redirect {
            ctx.local = Some("redirect");
            respond(session, *code, &[("Location", url)]).await?;
            return Ok(true);
        }
        if let Some(max) = options.max_body {
            let declared = header(req, "content-length").and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                ctx.local = Some("too_large");
                respond(session, 413, &[]).await?;
                return Ok(true);
            }
            // Chunked bodies are counted as they stream (request_body_filter).
            ctx.max_body = Some(max);
        }
        if let (Some(target), Some(rule_path)) = (&options.rewrite_target, route.rule_path) {
            let mut rewritten = rewrite_path(&path, rule_path, target);
            if let Some(query) = req.uri.query() {
                rewritten.push('?');
                rewritten.push_str(query);
            }
            ctx.rewritten = Some(rewritten);
        }
        ctx.protocol = options.backend_protocol;
        let endpoints = state
            .compiled
            .upstreams
            .get(route.backend)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()));
        ctx.backend = Some(route.backend.clone());
        if endpoints.is_empty() {
            ctx.local = Some("no_endpoints");
            respond(session, 503, &[]).await?;
            return Ok(true);
        }
        ctx.endpoints = endpoints;
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let n = ctx.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let untried = (0..n)
            .map(|i| ctx.endpoints[(start + i) % n])
            .find(|a| !ctx.tried.contains(a));
        let Some(addr) = untried else {
            return Err(Error::explain(
                ErrorType::ConnectError,
                "every endpoint of the backend failed to connect",
            ));
        };
        ctx.tried.push(addr);
        let tls = matches!(
            ctx.protocol,
            BackendProtocol::Https | BackendProtocol::Grpcs
        );
        // The SNI for TLS backends is the request's host, as a client would have sent.
        let sni = if tls {
            crate::route::normalize_host(&ctx.host)
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, tls, sni);
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.read_timeout = Some(IO_TIMEOUT);
        peer.options.write_timeout = Some(IO_TIMEOUT);
        if tls {
            // As ingress-nginx by default (proxy-ssl-verify off): backends inside the cluster
            // commonly serve self-signed certificates.
            peer.options.verify_cert = false;
            peer.options.verify_hostname = false;
        }
        if matches!(ctx.protocol, BackendProtocol::Grpc | BackendProtocol::Grpcs) {
            peer.options.set_http_version(2, 2);
        }
        Ok(Box::new(peer))
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (Some(max), Some(chunk)) = (ctx.max_body, body.as_ref()) {
            ctx.body_seen = ctx.body_seen.saturating_add(chunk.len() as u64);
            if ctx.body_seen > max {
                ctx.local = Some("too_large");
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body larger than proxy-body-size",
                ));
            }
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent yet: another endpoint can take the request.
        let more = ctx.tried.len() < ctx.endpoints.len();
        self.metrics.connect_failures.inc();
        tracing::warn!(
            event = "connect_failed",
            request_id = %ctx.request_id,
            upstream = %peer.address(),
            retry = more,
            error = %e,
            "connecting to {}: {e}", peer.address()
        );
        if more {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string());
        if let Some(client) = &client {
            let forwarded = match header(upstream, "x-forwarded-for") {
                Some(previous) => format!("{previous}, {client}"),
                None => client.clone(),
            };
            upstream.insert_header("X-Forwarded-For", forwarded)?;
            upstream.insert_header("X-Real-IP", client.as_str())?;
        }
        let proto = if self.https { "https" } else { "http" };
        upstream.insert_header("X-Forwarded-Proto", proto)?;
        upstream.insert_header("X-Forwarded-Host", ctx.host.as_str())?;
        upstream.insert_header("X-Request-ID", ctx.request_id.as_str())?;
        if let Some(rewritten) = &ctx.rewritten {
            let uri = rewritten.parse::<http::Uri>().map_err(|e| {
                Error::explain(
                    ErrorType::InternalError,
                    format!("rewritten path {rewritten:?}: {e}"),
                )
            })?;
            upstream.set_uri(uri);
        }
        if upstream.headers.get("host").is_none() && !ctx.host.is_empty() {
            // An HTTP/2 client gave only :authority; the HTTP/1.1 upstream needs Host.
            upstream.insert_header("Host", ctx.host.as_str())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        response.insert_header("X-Request-ID", ctx.request_id.as_str())?;
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let req = session.req_header();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let backend = ctx
            .backend
            .as_ref()
            .map(|b| format!("{}/{}", b.namespace, b.service))
            .unwrap_or_default();
        let upstream = ctx
            .tried
            .last()
            .map(ToString::to_string)
            .unwrap_or_default();
        let client = session
            .client_addr()
            .map(ToString::to_string)
            .unwrap_or_default();
        let elapsed = ctx.start.elapsed();
        let listener = if self.https { "https" } else { "http" };
        let status_label = status.to_string();
        self.metrics
            .requests
            .with_label_values(&[ctx.ingress.as_str(), listener, status_label.as_str()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[ctx.ingress.as_str()])
            .observe(elapsed.as_secs_f64());
        tracing::info!(
            event = "access",
            request_id = %ctx.request_id,
            client = %client,
            method = %req.method,
            host = %ctx.host,
            path = %req.uri.path(),
            version = ?req.version,
            tls = self.https,
            status,
            backend = %backend,
            upstream = %upstream,
            attempts = ctx.tried.len(),
            local = ctx.local.unwrap_or(""),
            ingress = %ctx.ingress,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            error = %e.map(ToString::to_string).unwrap_or_default(),
            "{} {} {} {status}", req.method, ctx.host, req.uri.path()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_hex_and_client_ids_are_checked() {
        let ids = RequestIds::default();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(usable_request_id("abc-123_x.y"));
        assert!(!usable_request_id(""));
        assert!(!usable_request_id("a b"));
        assert!(!usable_request_id(&"x".repeat(129)));
    }
}
