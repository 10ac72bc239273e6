//! Label selectors (`matchLabels` and `matchExpressions`), as NetworkPolicy uses them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cluster_model::k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// One requirement of a selector. `matchLabels: {k: v}` is `In(k, {v})`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    /// The label is present with one of the values.
    In(String, BTreeSet<String>),
    /// The label is absent, or present with none of the values.
    NotIn(String, BTreeSet<String>),
    /// The label is present (any value).
    Exists(String),
    /// The label is absent.
    DoesNotExist(String),
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

/// A parsed label selector: the AND of its requirements. No requirements: matches everything
/// (`{}`). A selector the API would reject is [`Selector::nothing`] after parsing fails.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
    /// Matches no labels at all (what an unusable selector is taken as).
    nothing: bool,
}

/// Why a label selector cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("matchExpressions[{index}]: {message}")]
pub struct SelectorError {
    pub index: usize,
    pub message: String,
}

impl Selector {
    /// `{}`: matches everything.
    pub fn everything() -> Selector {
        Selector {
            requirements: Vec::new(),
            nothing: false,
        }
    }

    /// Matches nothing.
    pub fn nothing() -> Selector {
        Selector {
            requirements: Vec::new(),
            nothing: true,
        }
    }

    /// A selector of the given requirements (all must hold).
    pub fn of(requirements: impl IntoIterator<Item = Requirement>) -> Selector {
        let mut requirements: Vec<Requirement> = requirements.into_iter().collect();
        requirements.sort();
        requirements.dedup();
        Selector {
            requirements,
            nothing: false,
        }
    }

    /// Parses a Kubernetes label selector. `In`/`NotIn` need values, `Exists`/`DoesNotExist`
    /// take none, and no other operator exists: anything else is an error (the API rejects it).
    pub fn from_k8s(selector: &LabelSelector) -> Result<Selector, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In(
                key.clone(),
                BTreeSet::from([value.clone()]),
            ));
        }
        for (index, req) in selector.match_expressions.iter().flatten().enumerate() {
            let error = |message: String| SelectorError { index, message };
            let values: BTreeSet<String> = req.values.iter().flatten().cloned().collect();
            let key = req.key.clone();
            let requirement = match req.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(error(format!(
                        "operator {} needs at least one value",
                        req.operator
                    )));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(error(format!("operator {} takes no values", req.operator)));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => return Err(error(format!("unknown operator {other:?}"))),
            };
            requirements.push(requirement);
        }
        Ok(Selector::of(requirements))
    }

    /// Parses, taking a selector the API would reject as matching nothing.
    pub fn from_k8s_or_nothing(selector: &LabelSelector) -> Selector {
        Selector::from_k8s(selector).unwrap_or_else(|_| Selector::nothing())
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        !self.nothing && self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether it matches every label set (`{}`).
    pub fn is_everything(&self) -> bool {
        !self.nothing && self.requirements.is_empty()
    }

    pub fn is_nothing(&self) -> bool {
        self.nothing
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |values: &BTreeSet<String>| {
            values
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Requirement::In(k, values) if values.len() == 1 => write!(f, "{k}={}", list(values)),
            Requirement::In(k, values) => write!(f, "{k} in ({})", list(values)),
            Requirement::NotIn(k, values) => write!(f, "{k} notin ({})", list(values)),
            Requirement::Exists(k) => f.write_str(k),
            Requirement::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// Like `kubectl`'s selector syntax: `app=web,tier in (a,b),!canary`; `{}` for everything and
/// `<nothing>` for nothing.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nothing {
            return f.write_str("<nothing>");
        }
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self.requirements.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_model::k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_string(),
            operator: operator.to_string(),
            values: values.map(|v| v.iter().map(ToString::to_string).collect()),
        }
    }

    fn selector(
        match_labels: &[(&str, &str)],
        exprs: Vec<LabelSelectorRequirement>,
    ) -> LabelSelector {
        LabelSelector {
            match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        }
    }

    /// LabelSelector (API reference): "The result of matchLabels and matchExpressions are
    /// ANDed. An empty label selector matches all objects." Each operator as documented for
    /// LabelSelectorRequirement; NotIn and DoesNotExist match objects without the key.
    #[test]
    fn operators_table() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, LabelSelector, [bool; 3])> = vec![
            (
                "empty matches all",
                selector(&[], vec![]),
                [true, true, true],
            ),
            (
                "matchLabels",
                selector(&[("app", "web")], vec![]),
                [true, false, false],
            ),
            (
                "In",
                selector(&[], vec![expr("app", "In", Some(&["web", "db"]))]),
                [true, true, false],
            ),
            (
                "NotIn matches when the key is absent",
                selector(&[], vec![expr("app", "NotIn", Some(&["web"]))]),
                [false, true, true],
            ),
            (
                "Exists",
                selector(&[], vec![expr("tier", "Exists", None)]),
                [true, false, false],
            ),
            (
                "DoesNotExist",
                selector(&[], vec![expr("tier", "DoesNotExist", Some(&[]))]),
                [false, true, true],
            ),
            (
                "matchLabels AND matchExpressions",
                selector(
                    &[("app", "web")],
                    vec![expr("tier", "NotIn", Some(&["back"]))],
                ),
                [true, false, false],
            ),
            (
                "expressions AND each other",
                selector(
                    &[],
                    vec![
                        expr("app", "Exists", None),
                        expr("app", "NotIn", Some(&["db"])),
                    ],
                ),
                [true, false, false],
            ),
        ];
        for (name, sel, expected) in cases {
            let parsed = Selector::from_k8s(&sel).expect(name);
            let got = [
                parsed.matches(&web),
                parsed.matches(&db),
                parsed.matches(&none),
            ];
            assert_eq!(got, expected, "{name}: {parsed}");
        }
    }

    /// LabelSelectorRequirement (API reference): "If the operator is In or NotIn, the values
    /// array must be non-empty. If the operator is Exists or DoesNotExist, the values array must
    /// be empty." Valid operators are In, NotIn, Exists and DoesNotExist.
    #[test]
    fn invalid_selectors_are_errors_and_match_nothing() {
        for (name, sel) in [
            ("In without values", expr("a", "In", None)),
            ("NotIn with empty values", expr("a", "NotIn", Some(&[]))),
            ("Exists with values", expr("a", "Exists", Some(&["x"]))),
            (
                "DoesNotExist with values",
                expr("a", "DoesNotExist", Some(&["x"])),
            ),
            ("unknown operator", expr("a", "Equals", Some(&["x"]))),
            (
                "operators are case-sensitive",
                expr("a", "in", Some(&["x"])),
            ),
        ] {
            let sel = selector(&[], vec![sel]);
            assert!(Selector::from_k8s(&sel).is_err(), "{name}");
            let parsed = Selector::from_k8s_or_nothing(&sel);
            assert!(parsed.is_nothing(), "{name}");
            assert!(!parsed.matches(&labels(&[("a", "x")])), "{name}");
            assert!(!parsed.matches(&labels(&[])), "{name}");
        }
    }

    #[test]
    fn display() {
        let sel = Selector::from_k8s(&selector(
            &[("app", "web")],
            vec![
                expr("tier", "In", Some(&["a", "b"])),
                expr("canary", "DoesNotExist", None),
            ],
        ))
        .expect("valid");
        assert_eq!(sel.to_string(), "app=web,tier in (a,b),!canary");
        assert_eq!(Selector::everything().to_string(), "{}");
        assert_eq!(Selector::nothing().to_string(), "<nothing>");
    }
}
