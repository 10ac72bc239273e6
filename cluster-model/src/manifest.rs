//! Parsing manifest text into objects: pure, no file system.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_yaml::Value;

use crate::object::{Kind, Object, ObjectKey, SECRET_TYPE_TLS};
use crate::problem::Problem;
use crate::validate::{FieldError, Findings};

/// How manifest text is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestFormat {
    /// YAML, possibly several documents separated by `---`.
    Yaml,
    /// One JSON value.
    Json,
}

impl ManifestFormat {
    /// The format of a manifest file by its extension (`.yaml`, `.yml`, `.json`), if it is one.
    pub fn of_path(path: &Path) -> Option<ManifestFormat> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(ManifestFormat::Yaml),
            "json" => Some(ManifestFormat::Json),
            _ => None,
        }
    }
}

/// The outcome of one document (or one `items[]` entry of a List).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub(crate) enum Entry {
    /// A valid object, defaulted; `warnings` are problems that did not stop it. Shared, as the
    /// manifest source keeps it across reloads.
    Valid {
        object: Arc<Object>,
        warnings: Vec<Problem>,
    },
    /// An object of a known kind and identity that is invalid.
    Invalid {
        kind: Kind,
        key: ObjectKey,
        problems: Vec<Problem>,
    },
    /// A document that cannot be used at all, not even identified.
    Unusable { problems: Vec<Problem> },
}

/// Parses manifest text into objects (defaulted and validated) plus the problems found.
/// Invalid objects are left out; `file` only names the file in problems.
pub fn parse_manifests(
    text: &str,
    format: ManifestFormat,
    file: Option<&Path>,
) -> (Vec<Object>, Vec<Problem>) {
    match parse_text(text, format, file) {
        Err(problem) => (Vec::new(), vec![problem]),
        Ok(entries) => {
            let mut objects = Vec::new();
            let mut problems = Vec::new();
            for entry in entries {
                match entry {
                    Entry::Valid { object, warnings } => {
                        objects.push(Arc::unwrap_or_clone(object));
                        problems.extend(warnings);
                    }
                    Entry::Invalid { problems: p, .. } | Entry::Unusable { problems: p } => {
                        problems.extend(p)
                    }
                }
            }
            (objects, problems)
        }
    }
}

/// Parses a whole file. `Err` when the text itself cannot be parsed (the file is then unusable as
/// a whole); otherwise one entry per object document, in order.
pub(crate) fn parse_text(
    text: &str,
    format: ManifestFormat,
    file: Option<&Path>,
) -> Result<Vec<Entry>, Problem> {
    let with_file = |p: Problem| match file {
        Some(f) => p.in_file(f),
        None => p,
    };
    let documents: Vec<Value> = match format {
        ManifestFormat::Json => {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| with_file(Problem::new(format!("invalid JSON: {e}"))))?;
            vec![value]
        }
        ManifestFormat::Yaml => {
            let mut docs = Vec::new();
            for doc in serde_yaml::Deserializer::from_str(text) {
                let mut value = Value::deserialize(doc)
                    .map_err(|e| with_file(Problem::new(format!("invalid YAML: {e}"))))?;
                value
                    .apply_merge()
                    .map_err(|e| with_file(Problem::new(format!("invalid YAML: {e}"))))?;
                docs.push(value);
            }
            docs
        }
    };
    let mut entries = Vec::new();
    for (i, value) in documents.iter().enumerate() {
        let label = format!("document {}", i + 1);
        parse_document(value, &label, &mut entries);
    }
    for entry in &mut entries {
        let problems = match entry {
            Entry::Valid { warnings, .. } => warnings,
            Entry::Invalid { problems, .. } | Entry::Unusable { problems } => problems,
        };
        for p in problems.iter_mut() {
            if let (None, Some(f)) = (&p.file, file) {
                p.file = Some(f.to_path_buf());
            }
        }
    }
    Ok(entries)
}

fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// Parses one document (`label` says where it is, e.g. "document 2" or "document 1 items[3]").
fn parse_document(value: &Value, label: &str, out: &mut Vec<Entry>) {
    if value.is_null() {
        return; // empty document, e.g. after a trailing `---`
    }
    let unusable = |problem: Problem| Entry::Unusable {
        problems: vec![problem],
    };
    if !value.is_mapping() {
        out.push(unusable(Problem::new(format!(
            "{label} is not an object (a mapping)"
        ))));
        return;
    }
    let kind_name = match str_field(value, "kind") {
        Some(k) if !k.is_empty() => k,
        _ => {
            out.push(unusable(
                Problem::new("required value")
                    .for_object(label)
                    .at_field("kind"),
            ));
            return;
        }
    };
    let Some(api_version) = str_field(value, "apiVersion").filter(|v| !v.is_empty()) else {
        out.push(unusable(
            Problem::new("required value")
                .for_object(format!("{kind_name} ({label})"))
                .at_field("apiVersion"),
        ));
        return;
    };

    if let Some(items) = list_items(kind_name, api_version) {
        match value.get("items") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(seq)) => {
                for (i, item) in seq.iter().enumerate() {
                    parse_document(item, &format!("{label} items[{i}]"), out);
                }
            }
            Some(_) => out.push(unusable(
                Problem::new("must be a list")
                    .for_object(format!("{items} ({label})"))
                    .at_field("items"),
            )),
        }
        return;
    }

    let Some(kind) = Kind::from_name(kind_name) else {
        if let Some(known) = Kind::ALL
            .iter()
            .find(|k| k.name().eq_ignore_ascii_case(kind_name))
        {
            out.push(unusable(
                Problem::new(format!(
                    "unknown kind {kind_name:?} (did you mean {known}?)"
                ))
                .for_object(label)
                .at_field("kind"),
            ));
        } else {
            tracing::debug!(
                kind = kind_name,
                api_version,
                "ignoring a kind the model does not read"
            );
        }
        return;
    };
    if api_version != kind.api_version() {
        out.push(unusable(
            Problem::new(format!(
                "unsupported apiVersion {api_version:?} for kind {kind} (expected {:?})",
                kind.api_version()
            ))
            .for_object(describe_raw(kind, value, label))
            .at_field("apiVersion"),
        ));
        return;
    }

    if kind == Kind::Secret && str_field(value, "type") != Some(SECRET_TYPE_TLS) {
        // Only TLS Secrets are read; the others are none of the model's business.
        tracing::debug!(
            secret = %describe_raw(kind, value, label),
            "ignoring a Secret that is not of type kubernetes.io/tls"
        );
        return;
    }
    let key = raw_key(kind, value);
    let object_label = describe_raw(kind, value, label);
    let as_problem = |e: FieldError| {
        Problem::new(e.message)
            .for_object(&object_label)
            .at_field(e.field)
    };
    let fail = |problems: Vec<Problem>| match &key {
        Some(key) => Entry::Invalid {
            kind,
            key: key.clone(),
            problems,
        },
        None => Entry::Unusable { problems },
    };

    let mut object = match kind.deserialize(value) {
        Ok(object) => object,
        Err(e) => {
            let path = e.path().to_string();
            let mut problem = Problem::new(e.into_inner().to_string()).for_object(&object_label);
            if path != "." {
                problem = problem.at_field(path);
            }
            out.push(fail(vec![problem]));
            return;
        }
    };
    if kind.namespaced() {
        let ns = &mut object.metadata_mut().namespace;
        if ns.as_deref().is_none_or(str::is_empty) {
            *ns = Some("default".to_string());
        }
    } else {
        // The API server drops a namespace given for a cluster-scoped object.
        object.metadata_mut().namespace = None;
    }
    object.apply_defaults();
    let mut findings = Findings::default();
    object.validate(&mut findings);
    let warnings = findings.warnings.into_iter().map(as_problem).collect();
    if findings.errors.is_empty() {
        out.push(Entry::Valid {
            object: Arc::new(object),
            warnings,
        });
    } else {
        let mut problems: Vec<Problem> = findings.errors.into_iter().map(as_problem).collect();
        problems.extend::<Vec<Problem>>(warnings);
        out.push(fail(problems));
    }
}

/// Whether `kind` is a list whose `items` to read: `v1 List`, or `<Kind>List` of a known kind.
fn list_items(kind_name: &str, api_version: &str) -> Option<&'static str> {
    if kind_name == "List" && api_version == "v1" {
        return Some("List");
    }
    Kind::ALL
        .iter()
        .find(|k| k.list_name() == kind_name && k.api_version() == api_version)
        .map(|k| k.list_name())
}

/// The key the document names, if it names one (namespace defaulted).
fn raw_key(kind: Kind, value: &Value) -> Option<ObjectKey> {
    let meta = value.get("metadata")?;
    let name = str_field(meta, "name").filter(|n| !n.is_empty())?;
    let namespace = if kind.namespaced() {
        str_field(meta, "namespace")
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    } else {
        ""
    };
    Some(ObjectKey::new(namespace, name))
}

/// "Service default/web", or "Service (document 2)" when the document names no object.
fn describe_raw(kind: Kind, value: &Value, label: &str) -> String {
    match raw_key(kind, value) {
        Some(key) => format!("{kind} {key}"),
        None => format!("{kind} ({label})"),
    }
}

#[cfg(test)]
mod tests;
