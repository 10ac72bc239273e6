//! The Pingora proxy: routes each request by the current [`State`] (swapped whole, atomically,
//! when the cluster changes), redirects plain HTTP for TLS hosts, balances over endpoints.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::annotations::{BackendProtocol, Balance, Canary, KeyPart, RouteOptions, rewrite_path};
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
    balancer: Arc<Balancer>,
    ids: RequestIds,
    metrics: Arc<Metrics>,
}

impl IngressProxy {
    pub fn new(
        state: SharedState,
        https: bool,
        https_port: Option<u16>,
        balancer: Arc<Balancer>,
        metrics: Arc<Metrics>,
    ) -> IngressProxy {
        IngressProxy {
            state,
            https,
            https_port,
            balancer,
            ids: RequestIds::default(),
            metrics,
        }
    }
}

/// How long an endpoint that refused a connection is passed over (unless every endpoint is).
pub const EJECT_FOR: Duration = Duration::from_secs(10);
/// Past this many tracked endpoints, entries no longer needed are dropped (memory stays
/// bounded whatever the cluster does).
const TRACKED_MAX: usize = 4096;

/// What endpoint choice shares across requests and both listeners: the round-robin position,
/// requests in flight per endpoint (least-request) and endpoints ejected after failing to connect.
#[derive(Default)]
pub struct Balancer {
    next: AtomicUsize,
    in_flight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    ejected: Mutex<HashMap<SocketAddr, Instant>>,
}

/// A request counted against its endpoint until dropped.
struct Outstanding(Arc<AtomicUsize>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Locks a mutex even if a thread panicked holding it (the maps stay usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Balancer {
    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        let mut map = lock(&self.in_flight);
        if map.len() >= TRACKED_MAX && !map.contains_key(&addr) {
            // Counters nobody holds are at zero and can be made again.
            map.retain(|_, c| Arc::strong_count(c) > 1);
        }
        Arc::clone(map.entry(addr).or_default())
    }

    fn eject(&self, addr: SocketAddr) {
        let now = Instant::now();
        let mut map = lock(&self.ejected);
        if map.len() >= TRACKED_MAX {
            map.retain(|_, until| *until > now);
        }
        map.insert(addr, now + EJECT_FOR);
    }

    fn readmit(&self, addr: SocketAddr) {
        let mut map = lock(&self.ejected);
        if !map.is_empty() {
            map.remove(&addr);
        }
    }

    /// The endpoint for an attempt: not yet failed in this request, not ejected (unless all
    /// are), then the affinity cookie's endpoint, else the route's balancing.
    fn choose(
        &self,
        endpoints: &[SocketAddr],
        failed: &[SocketAddr],
        balance: &Balance,
        hash_key: Option<u64>,
        sticky: Option<&str>,
    ) -> Option<SocketAddr> {
        let untried: Vec<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(|a| !failed.contains(a))
            .collect();
        if untried.is_empty() {
            return None;
        }
        let now = Instant::now();
        let healthy: Vec<SocketAddr> = {
            let ejected = lock(&self.ejected);
            if ejected.is_empty() {
                untried.clone()
            } else {
                untried
                    .iter()
                    .copied()
                    .filter(|a| ejected.get(a).is_none_or(|until| *until <= now))
                    .collect()
            }
        };
        let pool = if healthy.is_empty() { untried } else { healthy };
        if let Some(token) = sticky
            && let Some(addr) = pool.iter().find(|a| endpoint_token(**a) == token)
        {
            return Some(*addr);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        Some(match (balance, hash_key) {
            (Balance::Hash(_), Some(key)) => *pool
                .iter()
                .max_by_key(|a| rendezvous(key, **a))
                .unwrap_or(&pool[0]),
            (Balance::LeastRequest, _) => {
                let n = pool.len();
                (0..n)
                    .map(|i| pool[(start + i) % n])
                    .min_by_key(|a| self.counter(*a).load(Ordering::Relaxed))
                    .unwrap_or(pool[0])
            }
            _ => pool[start % pool.len()],
        })
    }
}

/// FNV-1a: a hash that is the same in every process and version, for values other replicas
/// (cookies) or later requests (hash keys) must agree on.
fn fnv(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A final mix, so close inputs spread over the whole range.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The weight of `addr` for `key` in rendezvous hashing: the key goes to the heaviest endpoint,
/// so removing one endpoint moves only its own keys.
fn rendezvous(key: u64, addr: SocketAddr) -> u64 {
    fnv(addr.to_string().as_bytes(), key)
}

/// The affinity cookie's value for an endpoint: a hash, so the cookie does not reveal the pod
/// address, and the same on every replica.
fn endpoint_token(addr: SocketAddr) -> String {
    format!("{:016x}", fnv(addr.to_string().as_bytes(), 0))
}

/// A cookie's value from the request's Cookie headers.
fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim())
        })
}

/// The `upstream-hash-by` key of a request.
fn hash_key(parts: &[KeyPart], req: &RequestHeader, host: &str, client: Option<IpAddr>) -> u64 {
    let mut key = String::new();
    for part in parts {
        match part {
            KeyPart::Literal(s) => key.push_str(s),
            KeyPart::RequestUri => {
                key.push_str(req.uri.path_and_query().map_or("/", |p| p.as_str()))
            }
            KeyPart::Uri => key.push_str(req.uri.path()),
            KeyPart::RemoteAddr => {
                if let Some(ip) = client {
                    key.push_str(&ip.to_string());
                }
            }
            KeyPart::Host => key.push_str(&normalize_host(host)),
            KeyPart::Header(name) => key.push_str(header(req, name).unwrap_or("")),
            KeyPart::Cookie(name) => key.push_str(cookie(req, name).unwrap_or("")),
            KeyPart::Arg(name) => {
                let value = req.uri.query().and_then(|q| {
                    q.split('&').find_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then_some(v)
                    })
                });
                key.push_str(value.unwrap_or(""));
            }
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        key.push('\u{1f}');
    }
    fnv(key.as_bytes(), 0)
}

/// Whether a canary Ingress takes this request: by header, then cookie, then weight (as
/// ingress-nginx).
fn canary_takes(canary: &Canary, req: &RequestHeader, dice: u64) -> bool {
    if let Some(name) = &canary.by_header
        && let Some(value) = header(req, name)
    {
        match &canary.by_header_value {
            Some(wanted) => {
                if value == wanted {
                    return true;
                }
            }
            None => match value {
                "always" => return true,
                "never" => return false,
                _ => {}
            },
        }
    }
    if let Some(name) = &canary.by_cookie
        && let Some(value) = cookie(req, name)
    {
        match value {
            "always" => return true,
            "never" => return false,
            _ => {}
        }
    }
    canary.weight > 0 && dice % u64::from(canary.weight_total.max(1)) < u64::from(canary.weight)
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

    /// A number for weighted choices (canary weight): uniform enough, not cryptographic.
    fn dice(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut h = self.keys.0.build_hasher();
        h.write_u64(n ^ 0x5bd1_e995);
        h.finish()
    }
}

/// Counts a request in flight from its context's creation to its drop (whatever way the request
/// ends), so a graceful shutdown knows when it may exit.
pub struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(gauge: &prometheus::IntGauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per-request state.
pub struct Ctx {
    _in_flight: InFlight,
    start: Instant,
    request_id: String,
    host: String,
    /// "namespace/name" of the Ingress whose route matched ("" when none did).
    ingress: String,
    /// The matched rule's host and path as the Ingress writes them ("" when none matched): the
    /// metrics labels, bounded by the cluster's objects whatever clients send.
    rule_host: String,
    rule_path: String,
    backend: Option<Backend>,
    endpoints: Arc<[SocketAddr]>,
    /// Endpoints that failed to connect for this request (not tried again).
    failed: Vec<SocketAddr>,
    /// The endpoint of the latest attempt, and how many attempts there were.
    upstream: Option<SocketAddr>,
    attempts: usize,
    options: Option<Arc<RouteOptions>>,
    hash_key: Option<u64>,
    /// The affinity cookie's value the client sent.
    sticky: Option<String>,
    outstanding: Option<Outstanding>,
    /// The client sent an Origin (CORS headers are added to the answer).
    cors: bool,
    /// What answered when the proxy did itself: "no_route", "redirect", "no_endpoints",
    /// "too_large".
    local: Option<&'static str>,
    /// The path and query to send upstream when `rewrite-target` changed them.
    rewritten: Option<String>,
    protocol: BackendProtocol,
    max_body: Option<u64>,
    body_seen: u64,
}

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

/// An answer without body (a CORS preflight).
async fn respond_empty(session: &mut Session, status: u16, headers: &[(&str, &str)]) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 2))?;
    for (name, value) in headers {
        resp.insert_header(name.to_string(), value.to_string())?;
    }
    resp.insert_header("Content-Type", "text/plain; charset=utf-8")?;
    resp.insert_header("Content-Length", "0")?;
    session.write_response_header(Box::new(resp), true).await
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
            _in_flight: InFlight::new(&self.metrics.in_flight),
            start: Instant::now(),
            request_id: String::new(),
            host: String::new(),
            ingress: String::new(),
            rule_host: String::new(),
            rule_path: String::new(),
            backend: None,
            endpoints: Arc::from(Vec::new()),
            failed: Vec::new(),
            upstream: None,
            attempts: 0,
            options: None,
            hash_key: None,
            sticky: None,
            outstanding: None,
            cors: false,
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
        ctx.ingress.clone_from(&route.options.ingress);
        ctx.rule_host = route.rule_host.to_string();
        ctx.rule_path = route.rule_path.unwrap_or("").to_string();
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if !route.options.allows(client) {
            ctx.local = Some("forbidden");
            respond(session, 403, &[]).await?;
            return Ok(true);
        }
        if !self.https
            && let Some(port) = self.https_port
            && (route.options.force_ssl_redirect
                || (route.options.ssl_redirect && state.compiled.tls.lookup(&ctx.host).is_some()))
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
        if let Some((url, code)) = &options.permanent_redirect {
            ctx.local = Some("redirect");
            respond(session, *code, &[("Location", url)]).await?;
            return Ok(true);
        }
        if let Some(root) = &options.app_root
            && path == "/"
        {
            ctx.local = Some("redirect");
            respond(session, 302, &[("Location", root)]).await?;
            return Ok(true);
        }
        if let Some(cors) = &options.cors {
            if req.method == http::Method::OPTIONS {
                // A preflight is answered here, as ingress-nginx does.
                ctx.local = Some("cors_preflight");
                let max_age = cors.max_age.to_string();
                let mut headers = vec![
                    ("Access-Control-Allow-Origin", cors.allow_origin.as_str()),
                    ("Access-Control-Allow-Methods", cors.allow_methods.as_str()),
                    ("Access-Control-Allow-Headers", cors.allow_headers.as_str()),
                    ("Access-Control-Max-Age", max_age.as_str()),
                ];
                if cors.allow_credentials {
                    headers.push(("Access-Control-Allow-Credentials", "true"));
                }
                respond_empty(session, 204, &headers).await?;
                return Ok(true);
            }
            ctx.cors = true;
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
            let mut rewritten = match route.regex.and_then(|re| re.captures(&path)) {
                // nginx's `rewrite`: the whole path becomes the target, `$n` filled in.
                Some(captures) => {
                    let mut out = String::new();
                    captures.expand(target, &mut out);
                    out
                }
                None => rewrite_path(&path, rule_path, target),
            };
            if let Some(query) = req.uri.query() {
                rewritten.push('?');
                rewritten.push_str(query);
            }
            ctx.rewritten = Some(rewritten);
        }
        ctx.protocol = options.backend_protocol;
        let mut backend = route.backend;
        if let Some(canary) = route.canary
            && let Some(rules) = &canary.options.canary
            && canary_takes(rules, req, self.ids.dice())
        {
            backend = &canary.backend;
            ctx.ingress.clone_from(&canary.options.ingress);
        }
        let endpoints = state
            .compiled
            .upstreams
            .get(backend)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()));
        ctx.backend = Some(backend.clone());
        if let Balance::Hash(parts) = &options.balance {
            ctx.hash_key = Some(hash_key(parts, req, &ctx.host, client));
        }
        if let Some(affinity) = &options.affinity {
            ctx.sticky = cookie(req, &affinity.cookie).map(str::to_string);
        }
        ctx.options = Some(Arc::clone(route.options));
        if endpoints.is_empty() {
            ctx.local = Some("no_endpoints");
            respond(session, 503, &[]).await?;
            return Ok(true);
        }
        ctx.endpoints = endpoints;
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let plain = RouteOptions::plain("");
        let options = ctx.options.as_deref().unwrap_or(&plain);
        let chosen = self.balancer.choose(
            &ctx.endpoints,
            &ctx.failed,
            &options.balance,
            ctx.hash_key,
            ctx.sticky.as_deref(),
        );
        let Some(addr) = chosen else {
            return Err(Error::explain(
                ErrorType::ConnectError,
                "every endpoint of the backend failed to connect",
            ));
        };
        let (connect_timeout, read_timeout, send_timeout) = (
            options.connect_timeout,
            options.read_timeout,
            options.send_timeout,
        );
        // Replacing the previous attempt's count ends it.
        ctx.outstanding = None;
        let counter = self.balancer.counter(addr);
        counter.fetch_add(1, Ordering::Relaxed);
        ctx.outstanding = Some(Outstanding(counter));
        ctx.upstream = Some(addr);
        ctx.attempts += 1;
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
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.read_timeout = Some(read_timeout);
        peer.options.write_timeout = Some(send_timeout);
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
        let addr = peer.address().as_inet().copied();
        if let Some(addr) = addr {
            ctx.failed.push(addr);
            self.balancer.eject(addr);
        }
        let more = ctx.failed.len() < ctx.endpoints.len();
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

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut Ctx) -> FailToProxy {
        use pingora_core::{ErrorSource, ErrorType as T};
        // As Pingora's default, except that an upstream timing out is 504, as nginx answers.
        let code = match (e.etype(), e.esource()) {
            (T::HTTPStatus(code), _) => *code,
            (T::ConnectTimedout | T::ReadTimedout | T::WriteTimedout, ErrorSource::Upstream) => 504,
            (_, ErrorSource::Upstream) => 502,
            // The client's connection is gone: nothing to answer on.
            (T::WriteError | T::ReadError | T::ConnectionClosed, ErrorSource::Downstream) => 0,
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if code > 0 {
            let _ = session.respond_error(code).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // An ejected endpoint that was tried (every other one was ejected too) and answers is
        // back.
        if let Some(addr) = ctx.upstream {
            self.balancer.readmit(addr);
        }
        Ok(())
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
        if let Some(vhost) = ctx.options.as_ref().and_then(|o| o.upstream_vhost.as_ref()) {
            upstream.insert_header("Host", vhost.as_str())?;
        } else if upstream.headers.get("host").is_none() && !ctx.host.is_empty() {
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
        let Some(options) = ctx.options.as_ref() else {
            return Ok(());
        };
        if ctx.cors
            && let Some(cors) = &options.cors
        {
            response.insert_header("Access-Control-Allow-Origin", cors.allow_origin.as_str())?;
            response.insert_header("Access-Control-Allow-Methods", cors.allow_methods.as_str())?;
            response.insert_header("Access-Control-Allow-Headers", cors.allow_headers.as_str())?;
            if cors.allow_credentials {
                response.insert_header("Access-Control-Allow-Credentials", "true")?;
            }
            if !cors.expose_headers.is_empty() {
                response.insert_header(
                    "Access-Control-Expose-Headers",
                    cors.expose_headers.as_str(),
                )?;
            }
        }
        if let (Some(affinity), Some(addr)) = (&options.affinity, ctx.upstream) {
            let token = endpoint_token(addr);
            if ctx.sticky.as_deref() != Some(token.as_str()) {
                response.append_header(
                    "Set-Cookie",
                    format!(
                        "{}={token}; Path={}; HttpOnly",
                        affinity.cookie, affinity.path
                    ),
                )?;
            }
        }
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
        let upstream = ctx.upstream.map(|a| a.to_string()).unwrap_or_default();
        let client = session
            .client_addr()
            .map(ToString::to_string)
            .unwrap_or_default();
        let elapsed = ctx.start.elapsed();
        let listener = if self.https { "https" } else { "http" };
        let status_label = status.to_string();
        self.metrics
            .requests
            .with_label_values(&[
                ctx.ingress.as_str(),
                ctx.rule_host.as_str(),
                ctx.rule_path.as_str(),
                listener,
                status_label.as_str(),
            ])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[
                ctx.ingress.as_str(),
                ctx.rule_host.as_str(),
                ctx.rule_path.as_str(),
            ])
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
            attempts = ctx.attempts,
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

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    #[test]
    fn round_robin_skips_failed_and_ejected_endpoints_unless_all_are() {
        let b = Balancer::default();
        let eps = addrs(3);
        let picks: Vec<_> = (0..6)
            .filter_map(|_| b.choose(&eps, &[], &Balance::RoundRobin, None, None))
            .collect();
        assert_eq!(picks, [eps[0], eps[1], eps[2], eps[0], eps[1], eps[2]]);
        b.eject(eps[1]);
        for _ in 0..6 {
            let pick = b.choose(&eps, &[eps[0]], &Balance::RoundRobin, None, None);
            assert_eq!(pick, Some(eps[2]));
        }
        // Every untried one ejected: they are tried anyway; none left: None.
        assert_eq!(
            b.choose(&eps, &[eps[0], eps[2]], &Balance::RoundRobin, None, None),
            Some(eps[1])
        );
        assert_eq!(b.choose(&eps, &eps, &Balance::RoundRobin, None, None), None);
        b.readmit(eps[1]);
        assert!(lock(&b.ejected).is_empty());
    }

    #[test]
    fn hashing_is_stable_and_moves_only_the_removed_endpoints_keys() {
        let b = Balancer::default();
        let eps = addrs(5);
        let hash = Balance::Hash(vec![KeyPart::Uri]);
        let before: Vec<_> = (0..200u64)
            .map(|k| b.choose(&eps, &[], &hash, Some(fnv(&k.to_le_bytes(), 0)), None))
            .collect();
        let fewer: Vec<SocketAddr> = eps.iter().copied().filter(|a| *a != eps[2]).collect();
        let mut used = std::collections::BTreeSet::new();
        for (k, was) in (0..200u64).zip(&before) {
            let now = b.choose(&fewer, &[], &hash, Some(fnv(&k.to_le_bytes(), 0)), None);
            if *was != Some(eps[2]) {
                assert_eq!(now, *was, "key {k} moved");
            }
            used.insert(now);
        }
        assert_eq!(used.len(), 4, "keys spread over every endpoint");
    }

    #[test]
    fn least_request_prefers_idle_endpoints_and_affinity_wins() {
        let b = Balancer::default();
        let eps = addrs(2);
        let busy = b.counter(eps[0]);
        busy.fetch_add(1, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(
                b.choose(&eps, &[], &Balance::LeastRequest, None, None),
                Some(eps[1])
            );
        }
        let token = endpoint_token(eps[0]);
        assert_eq!(
            b.choose(&eps, &[], &Balance::LeastRequest, None, Some(&token)),
            Some(eps[0])
        );
        assert_eq!(token.len(), 16);
        assert_ne!(token, endpoint_token(eps[1]));
    }

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
