//! The ingress-nginx annotations Sluice understands, parsed once per compile into
//! [`RouteOptions`]. A bad value is reported (naming the Ingress and annotation) and the
//! annotation's default is used; the rest of the Ingress still applies.

use cluster_model::Ingress;

use crate::route::Problem;

const PREFIX: &str = "nginx.ingress.kubernetes.io/";
pub const SSL_REDIRECT: &str = "nginx.ingress.kubernetes.io/ssl-redirect";
pub const REWRITE_TARGET: &str = "nginx.ingress.kubernetes.io/rewrite-target";
pub const BACKEND_PROTOCOL: &str = "nginx.ingress.kubernetes.io/backend-protocol";
pub const PROXY_BODY_SIZE: &str = "nginx.ingress.kubernetes.io/proxy-body-size";
pub const PERMANENT_REDIRECT: &str = "nginx.ingress.kubernetes.io/permanent-redirect";
pub const PERMANENT_REDIRECT_CODE: &str = "nginx.ingress.kubernetes.io/permanent-redirect-code";

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
        }
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
            } else if v.contains('$') {
                bad(
                    REWRITE_TARGET,
                    format!(
                        "capture groups need regex paths, which Sluice does not support: {v:?} (ignored)"
                    ),
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
        for name in annotations.keys().filter(|k| k.starts_with(PREFIX)) {
            if ![
                SSL_REDIRECT,
                REWRITE_TARGET,
                BACKEND_PROTOCOL,
                PROXY_BODY_SIZE,
                PERMANENT_REDIRECT,
                PERMANENT_REDIRECT_CODE,
            ]
            .contains(&name.as_str())
            {
                // Said once per compile so that users see why it has no effect; snippets in
                // particular are never run (they are how ingress-nginx got CVE-2025-1974).
                bad(name, "not supported by Sluice (ignored)".to_string());
            }
        }
        options
    }
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
            (REWRITE_TARGET, "/$2"),
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
