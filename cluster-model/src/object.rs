//! Object identity and the registry of kinds the model understands.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope, Resource};

use crate::validate::ApiKind;

/// Identity of an object of a known kind: namespace is "" for cluster-scoped objects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a cluster-scoped object.
    pub fn cluster(name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: String::new(),
            name: name.into(),
        }
    }

    /// The key named by an object's metadata (missing parts are "").
    pub fn of(meta: &ObjectMeta) -> Self {
        ObjectKey {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Whether a k8s-openapi resource scope is namespaced.
pub(crate) trait ScopeKind {
    const NAMESPACED: bool;
}
impl ScopeKind for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}
impl ScopeKind for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// Declares the kinds the model reads. Adding a kind is one line here, plus its [`ApiKind`] impl
/// (name rule, defaults, validation) and where it lands in [`crate::ClusterSnapshot`].
/// Documents of kinds not listed are ignored (debug log only).
macro_rules! known_kinds {
    ($($variant:ident => $ty:ty,)*) => {
        /// A kind of object the model reads.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Kind {
            $($variant,)*
        }

        /// One object of a known kind.
        // Objects are built once per reload and moved into maps: boxing buys nothing here.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, Debug, PartialEq)]
        pub enum Object {
            $($variant($ty),)*
        }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$variant,)*];

            /// The `kind` field, e.g. "Service".
            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$variant => <$ty as Resource>::KIND,)*
                }
            }

            /// The `kind` of this kind's list type, e.g. "ServiceList".
            pub fn list_name(self) -> &'static str {
                match self {
                    $(Kind::$variant => <$ty as k8s_openapi::ListableResource>::LIST_KIND,)*
                }
            }

            /// The only `apiVersion` accepted for it, e.g. "discovery.k8s.io/v1".
            pub fn api_version(self) -> &'static str {
                match self {
                    $(Kind::$variant => <$ty as Resource>::API_VERSION,)*
                }
            }

            pub fn namespaced(self) -> bool {
                match self {
                    $(Kind::$variant => <<$ty as Resource>::Scope as ScopeKind>::NAMESPACED,)*
                }
            }

            /// Deserializes `value` as this kind, naming the field path on error.
            pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
                self,
                value: D,
            ) -> Result<Object, serde_path_to_error::Error<D::Error>> {
                match self {
                    $(Kind::$variant => serde_path_to_error::deserialize::<_, $ty>(value).map(Object::$variant),)*
                }
            }
        }

        impl Object {
            pub fn kind(&self) -> Kind {
                match self {
                    $(Object::$variant(_) => Kind::$variant,)*
                }
            }

            pub fn metadata(&self) -> &ObjectMeta {
                match self {
                    $(Object::$variant(o) => &o.metadata,)*
                }
            }

            pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
                match self {
                    $(Object::$variant(o) => &mut o.metadata,)*
                }
            }

            pub(crate) fn apply_defaults(&mut self) {
                match self {
                    $(Object::$variant(o) => ApiKind::apply_defaults(o),)*
                }
            }

            pub(crate) fn validate(&self, findings: &mut crate::validate::Findings) {
                crate::validate::validate_metadata(
                    self.metadata(),
                    self.kind().namespaced(),
                    self.name_rule(),
                    findings,
                );
                match self {
                    $(Object::$variant(o) => ApiKind::validate(o, findings),)*
                }
            }

            fn name_rule(&self) -> crate::validate::NameRule {
                match self {
                    $(Object::$variant(_) => <$ty as ApiKind>::NAME_RULE,)*
                }
            }
        }

        $(
            impl From<$ty> for Object {
                fn from(o: $ty) -> Object {
                    Object::$variant(o)
                }
            }
        )*
    };
}

known_kinds! {
    Node => k8s_openapi::api::core::v1::Node,
    Namespace => k8s_openapi::api::core::v1::Namespace,
    Pod => k8s_openapi::api::core::v1::Pod,
    Service => k8s_openapi::api::core::v1::Service,
    EndpointSlice => k8s_openapi::api::discovery::v1::EndpointSlice,
    NetworkPolicy => k8s_openapi::api::networking::v1::NetworkPolicy,
    Ingress => k8s_openapi::api::networking::v1::Ingress,
    IngressClass => k8s_openapi::api::networking::v1::IngressClass,
    Secret => k8s_openapi::api::core::v1::Secret,
}

/// The only Secret type the model keeps: Ingress TLS certificates. Other Secrets are ignored
/// (not errors), so the model never holds credentials it does not need.
pub const SECRET_TYPE_TLS: &str = "kubernetes.io/tls";

impl Kind {
    /// The kinds the service proxy reads (the proxy never watches Ingresses or Secrets).
    pub const PROXY: &'static [Kind] = &[
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
    ];

    /// The kinds the Ingress controller reads.
    pub const INGRESS: &'static [Kind] = &[
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Ingress,
        Kind::IngressClass,
        Kind::Secret,
    ];

    /// The kind whose `kind` field is `name` (exactly).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Object {
    /// The object's key as stored in the snapshot (namespace "" when cluster-scoped).
    pub fn key(&self) -> ObjectKey {
        let mut key = ObjectKey::of(self.metadata());
        if !self.kind().namespaced() {
            key.namespace.clear();
        }
        key
    }

    /// "Service default/web", as problems name objects.
    pub fn describe(&self) -> String {
        format!("{} {}", self.kind(), self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_display() {
        assert_eq!(ObjectKey::new("default", "web").to_string(), "default/web");
        assert_eq!(ObjectKey::cluster("node-a").to_string(), "node-a");
    }

    #[test]
    fn kind_registry() {
        assert_eq!(Kind::from_name("EndpointSlice"), Some(Kind::EndpointSlice));
        assert_eq!(Kind::EndpointSlice.api_version(), "discovery.k8s.io/v1");
        assert_eq!(Kind::Service.list_name(), "ServiceList");
        assert!(Kind::Pod.namespaced());
        assert!(!Kind::Node.namespaced());
        assert!(!Kind::Namespace.namespaced());
        assert_eq!(Kind::from_name("NetworkPolicy"), Some(Kind::NetworkPolicy));
        assert_eq!(Kind::NetworkPolicy.api_version(), "networking.k8s.io/v1");
        assert!(Kind::NetworkPolicy.namespaced());
        assert_eq!(Kind::from_name("ConfigMap"), None);
        assert_eq!(Kind::Ingress.api_version(), "networking.k8s.io/v1");
        assert!(!Kind::IngressClass.namespaced());
        assert_eq!(Kind::Secret.api_version(), "v1");
        assert!(Kind::Secret.namespaced());
        assert!(!Kind::PROXY.contains(&Kind::Secret));
        for k in Kind::PROXY.iter().chain(Kind::INGRESS) {
            assert!(Kind::ALL.contains(k));
        }
    }
}
