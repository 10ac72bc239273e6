//! Route table: compile (Ingresses in, table out) and lookup (host, path in, backend out).

use std::collections::BTreeMap;
use std::sync::Arc;

use cluster_model::k8s_openapi::api::networking::v1::{Ingress, IngressBackend};

/// A Service port, as the Ingress names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

/// Where a request goes: a Service port in the Ingress's namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub namespace: String,
    pub service: String,
    pub port: PortRef,
}

/// Something in an Ingress that was skipped: a rule that lost to an older Ingress's for the same
/// host, path and type (or default backend), or a field the table cannot use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// "namespace/name" of the Ingress whose rule was dropped.
    pub ingress: String,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PathKind {
    Prefix,
    /// `use-regex`: a case-insensitive regular expression anchored at the path's start, as
    /// ingress-nginx's `location ~*`.
    Regex,
    Exact,
}

/// The largest compiled size of one path regex: a path is cluster data and must not take
/// unbounded memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A canary Ingress's backend for a rule of the main Ingress with the same host and path.
#[derive(Clone, Debug)]
pub struct CanaryRoute {
    pub backend: Backend,
    /// The canary Ingress's options; its `canary` field says when it is chosen.
    pub options: Arc<RouteOptions>,
}

pub use crate::annotations::RouteOptions;

/// A route found by [`RouteTable::lookup_route`].
#[derive(Clone, Copy, Debug)]
pub struct Route<'a> {
    pub backend: &'a Backend,
    pub options: &'a Arc<RouteOptions>,
    /// The host of the rule that matched, as the Ingress writes it (lowercase; `*.foo.com` for
    /// a wildcard; "" for a rule without host and for the default backend).
    pub rule_host: &'a str,
    /// The path of the rule that matched (`None` for the default backend).
    pub rule_path: Option<&'a str>,
    /// The rule's regular expression when it is a regex path (for `$n` in `rewrite-target`).
    pub regex: Option<&'a regex::Regex>,
    pub canary: Option<&'a CanaryRoute>,
}

#[derive(Clone, Debug)]
struct PathRule {
    /// The rule's host as written (lowercase), for metrics labels.
    host: String,
    kind: PathKind,
    path: String,
    regex: Option<regex::Regex>,
    backend: Backend,
    options: Arc<RouteOptions>,
    canary: Option<CanaryRoute>,
}

/// The immutable route table.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    exact: BTreeMap<String, Vec<PathRule>>,
    /// By the suffix after "*." (e.g. "foo.com" for "*.foo.com").
    wildcard: BTreeMap<String, Vec<PathRule>>,
    any_host: Vec<PathRule>,
    default_backend: Option<(Backend, Arc<RouteOptions>)>,
}

fn backend_of(
    namespace: &str,
    backend: &IngressBackend,
    at: &str,
    ingress: &str,
    problems: &mut Vec<Problem>,
) -> Option<Backend> {
    let problem = |message: String| Problem {
        ingress: ingress.to_string(),
        message,
    };
    if backend.resource.is_some() {
        problems.push(problem(format!(
            "{at}.resource: resource backends are not supported (rule skipped)"
        )));
        return None;
    }
    let Some(service) = &backend.service else {
        problems.push(problem(format!(
            "{at}.service: required value (rule skipped)"
        )));
        return None;
    };
    let port = service.port.as_ref();
    let port = match (
        port.and_then(|p| p.number),
        port.and_then(|p| p.name.clone()),
    ) {
        (Some(n), None) => PortRef::Number(n),
        (None, Some(name)) if !name.is_empty() => PortRef::Name(name),
        _ => {
            problems.push(problem(format!(
                "{at}.service.port: exactly one of number and name is required (rule skipped)"
            )));
            return None;
        }
    };
    Some(Backend {
        namespace: namespace.to_string(),
        service: service.name.clone(),
        port,
    })
}

/// Compiles Ingresses (already filtered to our class) into a route table. Rules for one host are
/// merged across Ingresses; when two define the same host, path and type (or both a default
/// backend), the oldest Ingress (creationTimestamp, then namespace/name) wins and the other is
/// reported.
pub fn compile(ingresses: &[Ingress]) -> (RouteTable, Vec<Problem>) {
    let mut ordered: Vec<&Ingress> = ingresses.iter().collect();
    ordered.sort_by_key(|i| {
        (
            i.metadata.creation_timestamp.as_ref().map(|t| t.0),
            i.metadata.namespace.clone().unwrap_or_default(),
            i.metadata.name.clone().unwrap_or_default(),
        )
    });
    let mut table = RouteTable::default();
    let mut problems = Vec::new();
    // As ingress-nginx: `use-regex` on one Ingress makes every path of its hosts a regex.
    let regex_hosts: std::collections::BTreeSet<String> = ordered
        .iter()
        .filter(|i| crate::annotations::wants_regex(i))
        .flat_map(|i| i.spec.iter().flat_map(|s| s.rules.iter().flatten()))
        .map(|r| r.host.as_deref().unwrap_or("").to_ascii_lowercase())
        .collect();
    // Canary Ingresses attach to the main Ingresses' rules, so those come first.
    let mut canaries = Vec::new();
    for ing in ordered {
        let namespace = ing.metadata.namespace.as_deref().unwrap_or("default");
        let id = format!("{namespace}/{}", ing.metadata.name.as_deref().unwrap_or(""));
        let Some(spec) = &ing.spec else { continue };
        let options = Arc::new(RouteOptions::of(ing, &id, &mut problems));
        if options.canary.is_some() {
            canaries.push((ing, namespace, id, options));
            continue;
        }
        if let Some(db) = &spec.default_backend
            && let Some(backend) =
                backend_of(namespace, db, "spec.defaultBackend", &id, &mut problems)
        {
            if table.default_backend.is_some() {
                problems.push(Problem {
                    ingress: id.clone(),
                    message: "spec.defaultBackend: an older Ingress already sets the default backend (ignored)".into(),
                });
            } else {
                table.default_backend = Some((backend, Arc::clone(&options)));
            }
        }
        for (ri, rule) in spec.rules.iter().flatten().enumerate() {
            let host = rule.host.as_deref().unwrap_or("").to_ascii_lowercase();
            let paths = table.host_rules(&host);
            for (pi, p) in rule.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
                let at = format!("spec.rules[{ri}].http.paths[{pi}]");
                let Some((kind, path, regex, backend)) = path_rule(
                    namespace,
                    p,
                    &at,
                    &id,
                    regex_hosts.contains(&host),
                    &mut problems,
                ) else {
                    continue;
                };
                if paths.iter().any(|r| r.kind == kind && r.path == path) {
                    problems.push(Problem {
                        ingress: id.clone(),
                        message: format!(
                            "{at}: host {host:?} path {path:?} is already routed by an older Ingress (ignored)"
                        ),
                    });
                    continue;
                }
                paths.push(PathRule {
                    host: host.clone(),
                    kind,
                    path,
                    regex,
                    backend,
                    options: Arc::clone(&options),
                    canary: None,
                });
            }
        }
    }
    for (ing, namespace, id, options) in canaries {
        let Some(spec) = &ing.spec else { continue };
        if spec.default_backend.is_some() {
            problems.push(Problem {
                ingress: id.clone(),
                message: "spec.defaultBackend: not supported on a canary Ingress (ignored)".into(),
            });
        }
        for (ri, rule) in spec.rules.iter().flatten().enumerate() {
            let host = rule.host.as_deref().unwrap_or("").to_ascii_lowercase();
            let paths = table.host_rules(&host);
            for (pi, p) in rule.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
                let at = format!("spec.rules[{ri}].http.paths[{pi}]");
                let Some((kind, path, _, backend)) = path_rule(
                    namespace,
                    p,
                    &at,
                    &id,
                    regex_hosts.contains(&host),
                    &mut problems,
                ) else {
                    continue;
                };
                // The main rule is the one for the same host and path; its kind may differ
                // only by use-regex, which the main Ingress decides.
                let main = paths.iter_mut().find(|r| {
                    r.path == path && (r.kind == PathKind::Exact) == (kind == PathKind::Exact)
                });
                match main {
                    Some(main) if main.canary.is_none() => {
                        main.canary = Some(CanaryRoute {
                            backend,
                            options: Arc::clone(&options),
                        });
                    }
                    Some(_) => problems.push(Problem {
                        ingress: id.clone(),
                        message: format!(
                            "{at}: host {host:?} path {path:?} already has an older canary (ignored)"
                        ),
                    }),
                    None => problems.push(Problem {
                        ingress: id.clone(),
                        message: format!(
                            "{at}: a canary needs a main Ingress with host {host:?} and path {path:?} (ignored)"
                        ),
                    }),
                }
            }
        }
    }
    (table, problems)
}

/// One path of a rule: its kind, path, regex (for regex paths) and backend, or `None` when it
/// is skipped (reported).
fn path_rule(
    namespace: &str,
    p: &cluster_model::k8s_openapi::api::networking::v1::HTTPIngressPath,
    at: &str,
    id: &str,
    use_regex: bool,
    problems: &mut Vec<Problem>,
) -> Option<(PathKind, String, Option<regex::Regex>, Backend)> {
    let mut problem = |message: String| {
        problems.push(Problem {
            ingress: id.to_string(),
            message,
        })
    };
    let kind = match p.path_type.as_str() {
        "Exact" => PathKind::Exact,
        "Prefix" | "ImplementationSpecific" if use_regex => PathKind::Regex,
        // ImplementationSpecific is ours to define: it means Prefix here.
        "Prefix" | "ImplementationSpecific" => PathKind::Prefix,
        other => {
            problem(format!(
                "{at}.pathType: unsupported value {other:?} (rule skipped)"
            ));
            return None;
        }
    };
    let path = p.path.clone().unwrap_or_else(|| "/".to_string());
    if !path.starts_with('/') {
        problem(format!(
            "{at}.path: must be an absolute path, got {path:?} (rule skipped)"
        ));
        return None;
    }
    let regex = if kind == PathKind::Regex {
        match regex::RegexBuilder::new(&format!("^(?:{path})"))
            .case_insensitive(true)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
        {
            Ok(r) => Some(r),
            Err(e) => {
                problem(format!(
                    "{at}.path: not a usable regular expression ({e}) (rule skipped)"
                ));
                return None;
            }
        }
    } else {
        None
    };
    let backend = backend_of(
        namespace,
        &p.backend,
        &format!("{at}.backend"),
        id,
        problems,
    )?;
    Some((kind, path, regex, backend))
}

/// A request's host as routes and certificates are keyed: the port (if any) dropped, a trailing
/// dot dropped, lowercase.
pub fn normalize_host(host: &str) -> String {
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The path's elements split on '/', empty ones (from leading, trailing or doubled slashes) left
/// out, so trailing slashes do not matter for Prefix matching.
fn elements(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|e| !e.is_empty())
}

fn prefix_matches(rule: &str, path: &str) -> bool {
    let mut request = elements(path);
    elements(rule).all(|e| request.next() == Some(e))
}

/// The best rule for `path`: the longest matching path; at equal length Exact beats Prefix.
fn best<'a>(rules: &'a [PathRule], path: &str) -> Option<&'a PathRule> {
    rules
        .iter()
        .filter(|r| match r.kind {
            PathKind::Exact => r.path == path,
            PathKind::Prefix => prefix_matches(&r.path, path),
            PathKind::Regex => r.regex.as_ref().is_some_and(|re| re.is_match(path)),
        })
        .max_by_key(|r| (r.path.trim_end_matches('/').len(), r.kind))
}

impl RouteTable {
    /// The backend for a request, or `None` (the controller answers 404). `host` may carry a
    /// port; it is compared case-insensitively. The most specific host that has rules is
    /// chosen (exact, then a wildcard covering exactly one label, then rules without host); when
    /// no path of it matches, the default backend serves.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Backend> {
        self.lookup_route(host, path).map(|r| r.backend)
    }

    /// Like [`RouteTable::lookup`], with the route's options.
    pub fn lookup_route(&self, host: &str, path: &str) -> Option<Route<'_>> {
        let host = normalize_host(host);
        let rules = self
            .exact
            .get(&host)
            .or_else(|| {
                let (first, rest) = host.split_once('.')?;
                (!first.is_empty()).then(|| self.wildcard.get(rest))?
            })
            .unwrap_or(&self.any_host);
        match best(rules, path) {
            Some(rule) => Some(Route {
                rule_host: &rule.host,
                backend: &rule.backend,
                options: &rule.options,
                rule_path: Some(&rule.path),
                regex: rule.regex.as_ref(),
                canary: rule.canary.as_ref(),
            }),
            None => self
                .default_backend
                .as_ref()
                .map(|(backend, options)| Route {
                    rule_host: "",
                    backend,
                    options,
                    rule_path: None,
                    regex: None,
                    canary: None,
                }),
        }
    }

    /// Every route's backend and options (with repeats), default backend included.
    pub fn routes(&self) -> impl Iterator<Item = (&Backend, &RouteOptions)> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .flatten()
            .chain(&self.any_host)
            .flat_map(|r| {
                std::iter::once((&r.backend, &*r.options))
                    .chain(r.canary.as_ref().map(|c| (&c.backend, &*c.options)))
            })
            .chain(self.default_backend.as_ref().map(|(b, o)| (b, &**o)))
    }

    /// The rules of a host as written in a rule ("" for none, "*.x" for a wildcard).
    fn host_rules(&mut self, host: &str) -> &mut Vec<PathRule> {
        match host.strip_prefix("*.") {
            _ if host.is_empty() => &mut self.any_host,
            Some(suffix) => self.wildcard.entry(suffix.to_string()).or_default(),
            None => self.exact.entry(host.to_string()).or_default(),
        }
    }
}

#[cfg(test)]
mod tests;
