//! The ingress-nginx annotations Sluice understands, parsed once per compile into
//! [`RouteOptions`]. A bad value is reported (naming the Ingress and annotation) and the
//! annotation's default is used; the rest of the Ingress still applies.

use std::net::IpAddr;
use std::time::Duration;

use cluster_model::Ingress;
use ipnet::IpNet;

use crate::route::Problem;

const PREFIX: &str = "nginx.ingress.kubernetes.io/";
pub const SSL_REDIRECT: &str = "nginx.ingress.kubernetes.io/ssl-redirect";
pub const REWRITE_TARGET: &str = "nginx.ingress.kubernetes.io/rewrite-target";
pub const BACKEND_PROTOCOL: &str = "nginx.ingress.kubernetes.io/backend-protocol";
pub const PROXY_BODY_SIZE: &str = "nginx.ingress.kubernetes.io/proxy-body-size";
pub const PERMANENT_REDIRECT: &str = "nginx.ingress.kubernetes.io/permanent-redirect";
pub const PERMANENT_REDIRECT_CODE: &str = "nginx.ingress.kubernetes.io/permanent-redirect-code";
pub const FORCE_SSL_REDIRECT: &str = "nginx.ingress.kubernetes.io/force-ssl-redirect";
pub const CONNECT_TIMEOUT: &str = "nginx.ingress.kubernetes.io/proxy-connect-timeout";
pub const READ_TIMEOUT: &str = "nginx.ingress.kubernetes.io/proxy-read-timeout";
pub const SEND_TIMEOUT: &str = "nginx.ingress.kubernetes.io/proxy-send-timeout";
pub const WHITELIST_SOURCE_RANGE: &str = "nginx.ingress.kubernetes.io/whitelist-source-range";
pub const APP_ROOT: &str = "nginx.ingress.kubernetes.io/app-root";
pub const ENABLE_CORS: &str = "nginx.ingress.kubernetes.io/enable-cors";
pub const CORS_ALLOW_ORIGIN: &str = "nginx.ingress.kubernetes.io/cors-allow-origin";
pub const CORS_ALLOW_METHODS: &str = "nginx.ingress.kubernetes.io/cors-allow-methods";
pub const CORS_ALLOW_HEADERS: &str = "nginx.ingress.kubernetes.io/cors-allow-headers";
pub const CORS_ALLOW_CREDENTIALS: &str = "nginx.ingress.kubernetes.io/cors-allow-credentials";
pub const CORS_EXPOSE_HEADERS: &str = "nginx.ingress.kubernetes.io/cors-expose-headers";
pub const CORS_MAX_AGE: &str = "nginx.ingress.kubernetes.io/cors-max-age";
pub const UPSTREAM_VHOST: &str = "nginx.ingress.kubernetes.io/upstream-vhost";
pub const USE_REGEX: &str = "nginx.ingress.kubernetes.io/use-regex";
pub const CANARY: &str = "nginx.ingress.kubernetes.io/canary";
pub const CANARY_BY_HEADER: &str = "nginx.ingress.kubernetes.io/canary-by-header";
pub const CANARY_BY_HEADER_VALUE: &str = "nginx.ingress.kubernetes.io/canary-by-header-value";
pub const CANARY_BY_COOKIE: &str = "nginx.ingress.kubernetes.io/canary-by-cookie";
pub const CANARY_WEIGHT: &str = "nginx.ingress.kubernetes.io/canary-weight";
pub const CANARY_WEIGHT_TOTAL: &str = "nginx.ingress.kubernetes.io/canary-weight-total";
pub const AFFINITY: &str = "nginx.ingress.kubernetes.io/affinity";
pub const SESSION_COOKIE_NAME: &str = "nginx.ingress.kubernetes.io/session-cookie-name";
pub const SESSION_COOKIE_PATH: &str = "nginx.ingress.kubernetes.io/session-cookie-path";
pub const LOAD_BALANCE: &str = "nginx.ingress.kubernetes.io/load-balance";
pub const UPSTREAM_HASH_BY: &str = "nginx.ingress.kubernetes.io/upstream-hash-by";

/// Every annotation understood; any other with our prefix is reported as unsupported.
const KNOWN: &[&str] = &[
    SSL_REDIRECT,
    REWRITE_TARGET,
    BACKEND_PROTOCOL,
    PROXY_BODY_SIZE,
    PERMANENT_REDIRECT,
    PERMANENT_REDIRECT_CODE,
    FORCE_SSL_REDIRECT,
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    SEND_TIMEOUT,
    WHITELIST_SOURCE_RANGE,
    APP_ROOT,
    ENABLE_CORS,
    CORS_ALLOW_ORIGIN,
    CORS_ALLOW_METHODS,
    CORS_ALLOW_HEADERS,
    CORS_ALLOW_CREDENTIALS,
    CORS_EXPOSE_HEADERS,
    CORS_MAX_AGE,
    UPSTREAM_VHOST,
    USE_REGEX,
    CANARY,
    CANARY_BY_HEADER,
    CANARY_BY_HEADER_VALUE,
    CANARY_BY_COOKIE,
    CANARY_WEIGHT,
    CANARY_WEIGHT_TOTAL,
    AFFINITY,
    SESSION_COOKIE_NAME,
    SESSION_COOKIE_PATH,
    LOAD_BALANCE,
    UPSTREAM_HASH_BY,
];

/// ingress-nginx's defaults for `proxy-connect-timeout`, `proxy-read-timeout` and
/// `proxy-send-timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// `enable-cors` and its settings (ingress-nginx's defaults when not given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    pub allow_origin: String,
    pub allow_methods: String,
    pub allow_headers: String,
    pub allow_credentials: bool,
    pub expose_headers: String,
    pub max_age: u64,
}

impl Default for Cors {
    fn default() -> Cors {
        Cors {
            allow_origin: "*".into(),
            allow_methods: "GET, PUT, POST, DELETE, PATCH, OPTIONS".into(),
            allow_headers: "DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,Authorization".into(),
            allow_credentials: true,
            expose_headers: String::new(),
            max_age: 1_728_000,
        }
    }
}

/// A canary Ingress's rules for sending a request to it instead of the main Ingress's backend,
/// checked in this order (as ingress-nginx): header, cookie, weight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Canary {
    /// `canary-by-header`: "always" sends to the canary, "never" to the main backend (or, with
    /// `by_header_value`, that exact value sends to the canary).
    pub by_header: Option<String>,
    pub by_header_value: Option<String>,
    /// `canary-by-cookie`: the cookie's value "always" or "never", as for the header.
    pub by_cookie: Option<String>,
    /// `canary-weight` out of `canary-weight-total` (default 100).
    pub weight: u32,
    pub weight_total: u32,
}

/// `affinity: cookie`: the endpoint is remembered in a cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Affinity {
    /// `session-cookie-name` (default `INGRESSCOOKIE`, as ingress-nginx).
    pub cookie: String,
    /// `session-cookie-path` (default `/`).
    pub path: String,
}

/// One piece of an `upstream-hash-by` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPart {
    Literal(String),
    /// `$request_uri`: path and query.
    RequestUri,
    /// `$uri`: path.
    Uri,
    /// `$remote_addr`: the client's address.
    RemoteAddr,
    /// `$host`.
    Host,
    /// `$http_NAME`: a request header (`_` for `-`).
    Header(String),
    /// `$cookie_NAME`.
    Cookie(String),
    /// `$arg_NAME`: a query parameter.
    Arg(String),
}

/// How an endpoint is chosen for a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    /// `load-balance: round_robin` (the default).
    #[default]
    RoundRobin,
    /// `load-balance: ewma` (also `least_conn`, `least_request`): the endpoint with the fewest
    /// requests in flight from this process, ties broken round-robin. Not a latency average.
    LeastRequest,
    /// `upstream-hash-by`: rendezvous hashing of the key, so an endpoint change moves only the
    /// keys of the endpoints that came or went.
    Hash(Vec<KeyPart>),
}

/// How the proxy talks to the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendProtocol {
    /// HTTP/1.1 over TCP.
    #[default]
    Http,
    /// HTTP/1.1 or HTTP/2 over TLS; the backend's certificate is not verified (as ingress-nginx
    /// with its default `proxy-ssl-verify: off`).
    Https,
    /// HTTP/2 without TLS (h2c).
    Grpc,
    /// HTTP/2 over TLS, certificate not verified.
    Grpcs,
}

/// What a route carries besides its backend: the Ingress it comes from and its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteOptions {
    /// "namespace/name" of the Ingress.
    pub ingress: String,
    /// Whether plain HTTP to a host with TLS is redirected to HTTPS (308); `ssl-redirect`.
    pub ssl_redirect: bool,
    /// `rewrite-target`: replaces the part of the path the rule matched (Sluice has no regex
    /// paths, so no `$1` captures: `/app` → `/` sends `/app/x` as `/x`).
    pub rewrite_target: Option<String>,
    pub backend_protocol: BackendProtocol,
    /// `proxy-body-size` in bytes (`None`: no limit; the annotation's `0` also means none).
    pub max_body: Option<u64>,
    /// `permanent-redirect` and its code (default 301).
    pub permanent_redirect: Option<(String, u16)>,
    /// `force-ssl-redirect`: redirect plain HTTP to HTTPS even for hosts without `spec.tls`.
    pub force_ssl_redirect: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    /// `whitelist-source-range`: the client must be in one of these (`None`: anyone; a list
    /// with nothing usable in it refuses everyone), else 403.
    pub allow_sources: Option<Vec<IpNet>>,
    /// `app-root`: `/` is redirected (302) here.
    pub app_root: Option<String>,
    pub cors: Option<Cors>,
    /// `upstream-vhost`: the Host header sent to the backend.
    pub upstream_vhost: Option<String>,
    /// `use-regex` (or a `rewrite-target` with `$n` captures, as ingress-nginx): the paths of
    /// this Ingress's hosts, in every Ingress, are case-insensitive regular expressions
    /// anchored at the start.
    pub use_regex: bool,
    /// Set on a canary Ingress (`canary: "true"`).
    pub canary: Option<Canary>,
    pub affinity: Option<Affinity>,
    pub balance: Balance,
}

impl RouteOptions {
    /// The options without annotations.
    pub fn plain(ingress: &str) -> RouteOptions {
        RouteOptions {
            ingress: ingress.to_string(),
            ssl_redirect: true,
            rewrite_target: None,
            backend_protocol: BackendProtocol::Http,
            max_body: None,
            permanent_redirect: None,
            force_ssl_redirect: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_IO_TIMEOUT,
            send_timeout: DEFAULT_IO_TIMEOUT,
            allow_sources: None,
            app_root: None,
            cors: None,
            upstream_vhost: None,
            use_regex: false,
            canary: None,
            affinity: None,
            balance: Balance::RoundRobin,
        }
    }

    /// Whether `client` may use the route (`whitelist-source-range`).
    pub fn allows(&self, client: Option<IpAddr>) -> bool {
        let Some(ranges) = &self.allow_sources else {
            return true;
        };
        // An address that cannot be told (a Unix socket) is not in any range.
        client.is_some_and(|ip| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            ranges.iter().any(|net| net.contains(&ip))
        })
    }

    pub fn of(ingress: &Ingress, id: &str, problems: &mut Vec<Problem>) -> RouteOptions {
        let mut options = RouteOptions::plain(id);
        let Some(annotations) = ingress.metadata.annotations.as_ref() else {
            return options;
        };
        let mut bad = |name: &str, message: String| {
            problems.push(Problem {
                ingress: id.to_string(),
                message: format!("metadata.annotations[{name}]: {message}"),
            })
        };
        if let Some(v) = annotations.get(SSL_REDIRECT) {
            match v.as_str() {
                "true" => options.ssl_redirect = true,
                "false" => options.ssl_redirect = false,
                other => bad(
                    SSL_REDIRECT,
                    format!("must be \"true\" or \"false\", got {other:?} (using true)"),
                ),
            }
        }
        if let Some(v) = annotations.get(REWRITE_TARGET) {
            if !v.starts_with('/') {
                bad(
                    REWRITE_TARGET,
                    format!("must be an absolute path, got {v:?} (ignored)"),
                );
            } else if v
                .bytes()
                .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
            {
                bad(
                    REWRITE_TARGET,
                    format!("must be a plain path, got {v:?} (ignored)"),
                );
            } else {
                options.rewrite_target = Some(v.clone());
            }
        }
        if let Some(v) = annotations.get(BACKEND_PROTOCOL) {
            options.backend_protocol = match v.to_ascii_uppercase().as_str() {
                "HTTP" => BackendProtocol::Http,
                "HTTPS" => BackendProtocol::Https,
                "GRPC" => BackendProtocol::Grpc,
                "GRPCS" => BackendProtocol::Grpcs,
                _ => {
                    bad(
                        BACKEND_PROTOCOL,
                        format!("must be one of HTTP, HTTPS, GRPC, GRPCS, got {v:?} (using HTTP)"),
                    );
                    BackendProtocol::Http
                }
            };
        }
        if let Some(v) = annotations.get(PROXY_BODY_SIZE) {
            match parse_size(v) {
                Some(0) => options.max_body = None,
                Some(n) => options.max_body = Some(n),
                None => bad(
                    PROXY_BODY_SIZE,
                    format!("must be a size like 8m, 512k or 0, got {v:?} (no limit)"),
                ),
            }
        }
        if let Some(url) = annotations.get(PERMANENT_REDIRECT) {
            let code = match annotations.get(PERMANENT_REDIRECT_CODE) {
                None => 301,
                Some(c) => match c.parse::<u16>() {
                    Ok(c) if (300..=308).contains(&c) => c,
                    _ => {
                        bad(
                            PERMANENT_REDIRECT_CODE,
                            format!("must be a redirect code 300-308, got {c:?} (using 301)"),
                        );
                        301
                    }
                },
            };
            // A header value must not carry line breaks or other control characters.
            if url.is_empty() || url.bytes().any(|b| b.is_ascii_control()) {
                bad(
                    PERMANENT_REDIRECT,
                    format!("must be a URL, got {url:?} (ignored)"),
                );
            } else {
                options.permanent_redirect = Some((url.clone(), code));
            }
        }
        let get = |name: &str| annotations.get(name).map(String::as_str);
        let mut flag = |name: &str, default: bool| match get(name) {
            None => default,
            Some("true") => true,
            Some("false") => false,
            Some(other) => {
                bad(
                    name,
                    format!("must be \"true\" or \"false\", got {other:?} (using {default})"),
                );
                default
            }
        };
        options.force_ssl_redirect = flag(FORCE_SSL_REDIRECT, false);
        options.use_regex = flag(USE_REGEX, false)
            || options
                .rewrite_target
                .as_ref()
                .is_some_and(|t| t.contains('$'));
        let cors = flag(ENABLE_CORS, false);
        let credentials = flag(CORS_ALLOW_CREDENTIALS, true);
        let canary = flag(CANARY, false);
        let mut bad = |name: &str, message: String| {
            problems.push(Problem {
                ingress: id.to_string(),
                message: format!("metadata.annotations[{name}]: {message}"),
            })
        };
        for (name, field, default) in [
            (
                CONNECT_TIMEOUT,
                &mut options.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            ),
            (READ_TIMEOUT, &mut options.read_timeout, DEFAULT_IO_TIMEOUT),
            (SEND_TIMEOUT, &mut options.send_timeout, DEFAULT_IO_TIMEOUT),
        ] {
            if let Some(v) = get(name) {
                // Seconds, as ingress-nginx; an hour at most, so a typo cannot pin connections.
                match v.trim().trim_end_matches('s').parse::<u64>() {
                    Ok(n) if (1..=3600).contains(&n) => *field = Duration::from_secs(n),
                    _ => bad(
                        name,
                        format!(
                            "must be whole seconds from 1 to 3600, got {v:?} (using {})",
                            default.as_secs()
                        ),
                    ),
                }
            }
        }
        if let Some(v) = get(WHITELIST_SOURCE_RANGE) {
            let mut ranges = Vec::new();
            for range in v.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let parsed = range
                    .parse::<IpNet>()
                    .or_else(|_| range.parse::<IpAddr>().map(IpNet::from));
                match parsed {
                    Ok(net) => ranges.push(net.trunc()),
                    Err(_) => bad(
                        WHITELIST_SOURCE_RANGE,
                        format!("{range:?} is not a CIDR (left out)"),
                    ),
                }
            }
            if ranges.is_empty() {
                // A list with nothing usable must not open the route to everyone.
                bad(
                    WHITELIST_SOURCE_RANGE,
                    "no usable range: every client is refused".to_string(),
                );
            }
            options.allow_sources = Some(ranges);
        }
        if let Some(v) = get(APP_ROOT) {
            if v.starts_with('/') && !v.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                options.app_root = Some(v.to_string());
            } else {
                bad(
                    APP_ROOT,
                    format!("must be an absolute path, got {v:?} (ignored)"),
                );
            }
        }
        if cors {
            let mut c = Cors {
                allow_credentials: credentials,
                ..Cors::default()
            };
            for (name, field) in [
                (CORS_ALLOW_ORIGIN, &mut c.allow_origin),
                (CORS_ALLOW_METHODS, &mut c.allow_methods),
                (CORS_ALLOW_HEADERS, &mut c.allow_headers),
                (CORS_EXPOSE_HEADERS, &mut c.expose_headers),
            ] {
                if let Some(v) = get(name) {
                    if v.bytes().any(|b| b.is_ascii_control()) {
                        bad(
                            name,
                            format!("must be a header value, got {v:?} (using the default)"),
                        );
                    } else {
                        *field = v.trim().to_string();
                    }
                }
            }
            if let Some(v) = get(CORS_MAX_AGE) {
                match v.trim().parse() {
                    Ok(n) => c.max_age = n,
                    Err(_) => bad(
                        CORS_MAX_AGE,
                        format!("must be seconds, got {v:?} (using 1728000)"),
                    ),
                }
            }
            options.cors = Some(c);
        }
        if let Some(v) = get(UPSTREAM_VHOST) {
            if !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()) {
                options.upstream_vhost = Some(v.to_string());
            } else {
                bad(
                    UPSTREAM_VHOST,
                    format!("must be a host name, got {v:?} (ignored)"),
                );
            }
        }
        if canary {
            let mut c = Canary {
                by_header: get(CANARY_BY_HEADER).map(str::to_string),
                by_header_value: get(CANARY_BY_HEADER_VALUE).map(str::to_string),
                by_cookie: get(CANARY_BY_COOKIE).map(str::to_string),
                weight: 0,
                weight_total: 100,
            };
            if let Some(v) = get(CANARY_WEIGHT_TOTAL) {
                match v.trim().parse::<u32>() {
                    Ok(n) if n > 0 => c.weight_total = n,
                    _ => bad(
                        CANARY_WEIGHT_TOTAL,
                        format!("must be a positive number, got {v:?} (using 100)"),
                    ),
                }
            }
            if let Some(v) = get(CANARY_WEIGHT) {
                match v.trim().parse::<u32>() {
                    Ok(n) if n <= c.weight_total => c.weight = n,
                    _ => bad(
                        CANARY_WEIGHT,
                        format!("must be 0 to {}, got {v:?} (using 0)", c.weight_total),
                    ),
                }
            }
            options.canary = Some(c);
        }
        if let Some(v) = get(AFFINITY) {
            if v == "cookie" {
                options.affinity = Some(Affinity {
                    cookie: get(SESSION_COOKIE_NAME)
                        .filter(|n| valid_cookie_name(n))
                        .unwrap_or("INGRESSCOOKIE")
                        .to_string(),
                    path: get(SESSION_COOKIE_PATH)
                        .filter(|p| {
                            p.starts_with('/')
                                && !p.bytes().any(|b| b.is_ascii_control() || b == b';')
                        })
                        .unwrap_or("/")
                        .to_string(),
                });
                if get(SESSION_COOKIE_NAME).is_some_and(|n| !valid_cookie_name(n)) {
                    bad(
                        SESSION_COOKIE_NAME,
                        "must be a cookie name (using INGRESSCOOKIE)".to_string(),
                    );
                }
            } else {
                bad(
                    AFFINITY,
                    format!("only \"cookie\" is supported, got {v:?} (ignored)"),
                );
            }
        }
        if let Some(v) = get(LOAD_BALANCE) {
            match v {
                "round_robin" => options.balance = Balance::RoundRobin,
                "ewma" | "least_conn" | "least_request" => options.balance = Balance::LeastRequest,
                other => bad(
                    LOAD_BALANCE,
                    format!(
                        "must be round_robin, ewma or least_conn, got {other:?} (using round_robin)"
                    ),
                ),
            }
        }
        if let Some(v) = get(UPSTREAM_HASH_BY) {
            match parse_hash_key(v) {
                Ok(key) => options.balance = Balance::Hash(key),
                Err(message) => bad(UPSTREAM_HASH_BY, format!("{message} (ignored)")),
            }
        }
        for name in annotations.keys().filter(|k| k.starts_with(PREFIX)) {
            if !KNOWN.contains(&name.as_str()) {
                // Said once per compile so that users see why it has no effect; snippets in
                // particular are never run (they are how ingress-nginx got CVE-2025-1974).
                bad(name, "not supported by Sluice (ignored)".to_string());
            }
        }
        options
    }
}

/// Whether an Ingress asks for regex paths: `use-regex: "true"`, or a `rewrite-target` with
/// `$n` captures (which ingress-nginx treats alike).
pub fn wants_regex(ingress: &Ingress) -> bool {
    let Some(a) = ingress.metadata.annotations.as_ref() else {
        return false;
    };
    a.get(USE_REGEX).is_some_and(|v| v == "true")
        || a.get(REWRITE_TARGET).is_some_and(|v| v.contains('$'))
}

/// Whether `name` is a cookie name (an RFC 6265 token).
fn valid_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An `upstream-hash-by` value: nginx variables (`$request_uri`, `$uri`, `$remote_addr`,
/// `$host`, `$http_NAME`, `$cookie_NAME`, `$arg_NAME`, also as `${name}`) and literal text.
pub fn parse_hash_key(s: &str) -> Result<Vec<KeyPart>, String> {
    let mut parts = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let Some(at) = rest.find('$') else {
            parts.push(KeyPart::Literal(rest.to_string()));
            break;
        };
        if at > 0 {
            parts.push(KeyPart::Literal(rest[..at].to_string()));
        }
        rest = &rest[at + 1..];
        let (name, after) = if let Some(braced) = rest.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        rest = after;
        let part = match name {
            "request_uri" => KeyPart::RequestUri,
            "uri" => KeyPart::Uri,
            "remote_addr" => KeyPart::RemoteAddr,
            "host" => KeyPart::Host,
            _ => {
                if let Some(h) = name.strip_prefix("http_").filter(|h| !h.is_empty()) {
                    KeyPart::Header(h.replace('_', "-"))
                } else if let Some(c) = name.strip_prefix("cookie_").filter(|c| !c.is_empty()) {
                    KeyPart::Cookie(c.to_string())
                } else if let Some(a) = name.strip_prefix("arg_").filter(|a| !a.is_empty()) {
                    KeyPart::Arg(a.to_string())
                } else {
                    return Err(format!("unknown variable ${name} in {s:?}"));
                }
            }
        };
        parts.push(part);
    }
    if !parts.iter().any(|p| !matches!(p, KeyPart::Literal(_))) {
        return Err(format!(
            "{s:?} has no variable, so every request would hash alike"
        ));
    }
    Ok(parts)
}

/// An nginx size: a number of bytes with an optional k/m/g suffix (either case).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_lowercase()),
        _ => (s, 'b'),
    };
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match unit {
        'b' => 1,
        'k' => 1 << 10,
        'm' => 1 << 20,
        'g' => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// The path sent upstream for `path` matched by a rule with `rule_path`, with `target` put in
/// place of the matched part: `/app` + `/` turns `/app/x` into `/x`, `/app` into `/`.
pub fn rewrite_path(path: &str, rule_path: &str, target: &str) -> String {
    let matched = rule_path.trim_end_matches('/');
    // The rule matched by path elements; a request with doubled slashes may not start with the
    // rule's text, and is then sent as the target plus its whole path.
    let rest = path.strip_prefix(matched).unwrap_or(path);
    let rest = if rest.is_empty() || rest.starts_with('/') {
        rest
    } else {
        path
    };
    if rest.is_empty() || rest == "/" {
        if rest == "/" && !target.ends_with('/') {
            return format!("{target}/");
        }
        return target.to_string();
    }
    format!("{}{rest}", target.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(annotations: &[(&str, &str)]) -> (RouteOptions, Vec<String>) {
        let ingress = Ingress {
            metadata: cluster_model::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut problems = Vec::new();
        let o = RouteOptions::of(&ingress, "default/i", &mut problems);
        (o, problems.into_iter().map(|p| p.message).collect())
    }

    #[test]
    fn timeouts_sources_hash_keys_canary_and_affinity() {
        let (o, problems) = options(&[
            (CONNECT_TIMEOUT, "10"),
            (READ_TIMEOUT, "120s"),
            (SEND_TIMEOUT, "0"),
            (WHITELIST_SOURCE_RANGE, "10.0.0.0/8, 192.168.1.7,bogus"),
            (UPSTREAM_HASH_BY, "$host$request_uri"),
            (CANARY, "true"),
            (CANARY_WEIGHT, "150"),
            (AFFINITY, "cookie"),
        ]);
        assert_eq!(o.connect_timeout, Duration::from_secs(10));
        assert_eq!(o.read_timeout, Duration::from_secs(120));
        assert_eq!(o.send_timeout, DEFAULT_IO_TIMEOUT, "0 is refused");
        assert!(o.allows(Some("10.1.2.3".parse().expect("ip"))));
        assert!(o.allows(Some("192.168.1.7".parse().expect("ip"))));
        assert!(
            o.allows(Some("::ffff:10.0.0.1".parse().expect("ip"))),
            "v4-mapped"
        );
        assert!(!o.allows(Some("192.168.1.8".parse().expect("ip"))));
        assert!(!o.allows(None));
        assert_eq!(
            o.balance,
            Balance::Hash(vec![KeyPart::Host, KeyPart::RequestUri])
        );
        assert_eq!(o.canary.as_ref().map(|c| c.weight), Some(0));
        assert_eq!(
            o.affinity.as_ref().map(|a| a.cookie.as_str()),
            Some("INGRESSCOOKIE")
        );
        assert_eq!(problems.len(), 3, "{problems:#?}");
        // A list with nothing usable refuses everyone rather than no one.
        let (o, _) = options(&[(WHITELIST_SOURCE_RANGE, "nonsense")]);
        assert!(!o.allows(Some("127.0.0.1".parse().expect("ip"))));
        assert_eq!(
            parse_hash_key("${http_x_user}-$cookie_s$arg_id"),
            Ok(vec![
                KeyPart::Header("x-user".into()),
                KeyPart::Literal("-".into()),
                KeyPart::Cookie("s".into()),
                KeyPart::Arg("id".into()),
            ])
        );
        assert!(parse_hash_key("$nope").is_err());
        assert!(parse_hash_key("constant").is_err());
        assert!(parse_hash_key("${unclosed").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("8k"), Some(8192));
        assert_eq!(parse_size("8M"), Some(8 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("1t"), None);
        assert_eq!(parse_size("m"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999999999999g"), None);
    }

    #[test]
    fn rewrites_replace_the_matched_prefix() {
        assert_eq!(rewrite_path("/app", "/app", "/"), "/");
        assert_eq!(rewrite_path("/app/", "/app", "/"), "/");
        assert_eq!(rewrite_path("/app/x/y", "/app", "/"), "/x/y");
        assert_eq!(rewrite_path("/app/x", "/app/", "/v2"), "/v2/x");
        assert_eq!(rewrite_path("/app/", "/app", "/v2"), "/v2/");
        assert_eq!(rewrite_path("/x", "/", "/base"), "/base/x");
        assert_eq!(rewrite_path("//app/x", "/app", "/v2"), "/v2//app/x");
    }

    #[test]
    fn annotations_parse_and_bad_values_are_reported() {
        let (o, problems) = options(&[]);
        assert_eq!(o, RouteOptions::plain("default/i"));
        assert!(problems.is_empty());
        let (o, problems) = options(&[
            (SSL_REDIRECT, "false"),
            (REWRITE_TARGET, "/"),
            (BACKEND_PROTOCOL, "https"),
            (PROXY_BODY_SIZE, "1k"),
            (PERMANENT_REDIRECT, "https://example.com/new"),
            (PERMANENT_REDIRECT_CODE, "308"),
        ]);
        assert_eq!(problems, Vec::<String>::new());
        assert!(!o.ssl_redirect);
        assert_eq!(o.rewrite_target.as_deref(), Some("/"));
        assert_eq!(o.backend_protocol, BackendProtocol::Https);
        assert_eq!(o.max_body, Some(1024));
        assert_eq!(
            o.permanent_redirect,
            Some(("https://example.com/new".to_string(), 308))
        );
        let (o, problems) = options(&[
            (SSL_REDIRECT, "yes"),
            (REWRITE_TARGET, "relative"),
            (BACKEND_PROTOCOL, "FCGI"),
            (PROXY_BODY_SIZE, "lots"),
            (PERMANENT_REDIRECT, "https://example.com/"),
            (PERMANENT_REDIRECT_CODE, "200"),
            (
                "nginx.ingress.kubernetes.io/configuration-snippet",
                "more_set_headers x;",
            ),
        ]);
        assert_eq!(o.backend_protocol, BackendProtocol::Http);
        assert!(o.ssl_redirect && o.rewrite_target.is_none() && o.max_body.is_none());
        assert_eq!(
            o.permanent_redirect,
            Some(("https://example.com/".to_string(), 301))
        );
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(
            problems
                .iter()
                .all(|p| p.starts_with("metadata.annotations[nginx.ingress.kubernetes.io/"))
        );
        assert!(problems.last().is_some_and(|p| p.contains("configuration-snippet") && p.contains("not supported")));
    }
}
