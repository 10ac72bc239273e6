//! Which Ingresses are ours: IngressClass selection.

use cluster_model::{ClusterSnapshot, Ingress};

/// The default controller name (`spec.controller` of our IngressClass).
pub const DEFAULT_CONTROLLER: &str = "sluice.dev/ingress";
/// The default IngressClass name.
pub const DEFAULT_CLASS: &str = "sluice";
/// Marks the class used by Ingresses that name none.
pub const ANNOTATION_DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";
/// The class annotation that predates `spec.ingressClassName`.
pub const ANNOTATION_INGRESS_CLASS: &str = "kubernetes.io/ingress.class";

/// Who we are, for class selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassConfig {
    /// Our controller name, matched against IngressClass `spec.controller`.
    pub controller: String,
    /// Our class name, matched against the `kubernetes.io/ingress.class` annotation.
    pub class: String,
}

impl Default for ClassConfig {
    fn default() -> Self {
        ClassConfig {
            controller: DEFAULT_CONTROLLER.to_string(),
            class: DEFAULT_CLASS.to_string(),
        }
    }
}

impl ClassConfig {
    /// Whether the IngressClass named `name` exists and is ours.
    fn class_is_ours(&self, snapshot: &ClusterSnapshot, name: &str) -> bool {
        snapshot.ingress_classes.get(name).is_some_and(|c| {
            c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(&self.controller)
        })
    }

    /// Whether one of our IngressClasses is annotated as the cluster's default.
    fn default_class_is_ours(&self, snapshot: &ClusterSnapshot) -> bool {
        snapshot.ingress_classes.iter().any(|(name, c)| {
            let default = c
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_DEFAULT_CLASS))
                .is_some_and(|v| v == "true");
            default && self.class_is_ours(snapshot, name)
        })
    }

    /// Whether `ingress` is ours:
    /// - `spec.ingressClassName` names an IngressClass whose `spec.controller` is ours;
    /// - else the `kubernetes.io/ingress.class` annotation is our class name (or names a class
    ///   that is ours);
    /// - else (no class at all) one of our IngressClasses is the default class.
    pub fn is_ours(&self, snapshot: &ClusterSnapshot, ingress: &Ingress) -> bool {
        if let Some(name) = ingress
            .spec
            .as_ref()
            .and_then(|s| s.ingress_class_name.as_deref())
            .filter(|n| !n.is_empty())
        {
            return self.class_is_ours(snapshot, name);
        }
        if let Some(name) = ingress
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_INGRESS_CLASS))
        {
            return *name == self.class || self.class_is_ours(snapshot, name);
        }
        self.default_class_is_ours(snapshot)
    }

    /// Our Ingresses in the snapshot, in key order.
    pub fn select<'a>(&self, snapshot: &'a ClusterSnapshot) -> Vec<&'a Ingress> {
        snapshot
            .ingresses
            .values()
            .filter(|i| self.is_ours(snapshot, i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_model::{ManifestFormat, parse_manifests};

    fn snapshot(yaml: &str) -> ClusterSnapshot {
        let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
        assert_eq!(problems, vec![]);
        ClusterSnapshot::from_objects(objects)
    }

    const CLASSES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: sluice}
spec: {controller: sluice.dev/ingress}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: nginx, annotations: {ingressclass.kubernetes.io/is-default-class: "true"}}
spec: {controller: k8s.io/ingress-nginx}
"#;

    fn ingress(name: &str, class: &str, annotation: &str) -> String {
        let class = if class.is_empty() {
            String::new()
        } else {
            format!("ingressClassName: {class}, ")
        };
        let annotations = if annotation.is_empty() {
            String::new()
        } else {
            format!(", annotations: {{kubernetes.io/ingress.class: {annotation}}}")
        };
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}{annotations}}}\n\
             spec: {{{class}defaultBackend: {{service: {{name: web, port: {{number: 80}}}}}}}}\n"
        )
    }

    fn ours(yaml: &str) -> Vec<String> {
        let snap = snapshot(yaml);
        ClassConfig::default()
            .select(&snap)
            .iter()
            .map(|i| i.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn class_name_annotation_and_default_class() {
        let yaml = format!(
            "{CLASSES}{}{}{}{}{}{}",
            ingress("by-class", "sluice", ""),
            ingress("other-class", "nginx", ""),
            ingress("unknown-class", "missing", ""),
            ingress("by-annotation", "", "sluice"),
            ingress("other-annotation", "", "nginx"),
            ingress("no-class", "", ""),
        );
        // The default class is nginx's, so "no-class" is not ours.
        assert_eq!(ours(&yaml), ["by-annotation", "by-class"]);
        // Class name wins over the annotation.
        let yaml = format!("{CLASSES}{}", ingress("both", "nginx", "sluice"));
        assert_eq!(ours(&yaml), Vec::<String>::new());
    }

    #[test]
    fn ingress_without_class_is_ours_when_our_class_is_default() {
        let yaml = format!(
            r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {{name: sluice, annotations: {{ingressclass.kubernetes.io/is-default-class: "true"}}}}
spec: {{controller: sluice.dev/ingress}}
{}"#,
            ingress("no-class", "", "")
        );
        assert_eq!(ours(&yaml), ["no-class"]);
        // Without any IngressClass nothing is ours.
        assert_eq!(
            ours(&ingress("no-class", "sluice", "")),
            Vec::<String>::new()
        );
    }
}
