//! TLS certificates: Secrets to rustls certified keys, the choice by SNI, and the default
//! (self-signed, like ingress-nginx's fake certificate) when nothing else fits.

use std::collections::BTreeMap;
use std::sync::Arc;

use cluster_model::{ClusterSnapshot, ObjectKey, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::TlsHosts;
use crate::route::normalize_host;

/// A problem with a TLS Secret: the Secret and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertProblem {
    pub secret: ObjectKey,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for CertProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secret {}: {}: {}",
            self.secret, self.field, self.message
        )
    }
}

/// A certificate chain and key from PEM text; `Err((field, message))` naming the Secret key at
/// fault.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, (String, String)> {
    let cert_field = || format!("data[{TLS_CERT_KEY}]");
    let key_field = || format!("data[{TLS_PRIVATE_KEY_KEY}]");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| (cert_field(), format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err((cert_field(), "no PEM certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            (key_field(), "no PEM private key found".to_string())
        }
        e => (key_field(), format!("not PEM: {e}")),
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| (key_field(), format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    // A key that does not belong to the certificate would fail every handshake.
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // Unknown means the certificate's key could not be read for comparison: let it be.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(e) => Err((
            key_field(),
            format!("does not match the certificate in {TLS_CERT_KEY}: {e}"),
        )),
    }
}

/// A self-signed certificate for when no Secret covers a host (clients that verify will reject
/// it, which is the point: nothing is configured for that name).
pub fn self_signed() -> Result<CertifiedKey, String> {
    let cert = rcgen::generate_simple_self_signed(vec!["sluice-ingress-default".to_string()])
        .map_err(|e| format!("generating the default certificate: {e}"))?;
    certified_key(
        cert.cert.pem().as_bytes(),
        cert.signing_key.serialize_pem().as_bytes(),
    )
    .map_err(|(field, message)| format!("the generated default certificate: {field}: {message}"))
}

/// The certificates in use, by host.
#[derive(Clone, Debug)]
pub struct CertStore {
    exact: BTreeMap<String, Arc<CertifiedKey>>,
    /// By the suffix after "*.".
    wildcard: BTreeMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl CertStore {
    /// Only the default certificate.
    pub fn with_default(default: Arc<CertifiedKey>) -> CertStore {
        CertStore {
            exact: BTreeMap::new(),
            wildcard: BTreeMap::new(),
            default,
        }
    }

    /// The certificate for an SNI name: exact host, then a wildcard covering exactly one more
    /// label, then the default (also without SNI).
    pub fn choose(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(host) = sni.map(normalize_host) else {
            return Arc::clone(&self.default);
        };
        self.exact
            .get(&host)
            .or_else(|| {
                let (first, rest) = host.split_once('.')?;
                (!first.is_empty()).then(|| self.wildcard.get(rest))?
            })
            .unwrap_or(&self.default)
            .clone()
    }
}

/// The last good certificate of every TLS Secret seen, so a Secret that turns invalid keeps
/// serving what it served.
#[derive(Debug, Default)]
pub struct CertCache {
    by_secret: BTreeMap<ObjectKey, Cached>,
}

#[derive(Debug)]
struct Cached {
    /// The PEM texts it was made from (to skip parsing when unchanged).
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// The last good certificate; `None` if it was never valid.
    good: Option<Arc<CertifiedKey>>,
}

impl CertCache {
    /// The certificate store for `tls` from the Secrets in `snapshot`. A Secret that is invalid
    /// is reported (once per content) and its last good certificate stays; a missing Secret is
    /// reported and its hosts get the default certificate.
    pub fn build(
        &mut self,
        snapshot: &ClusterSnapshot,
        tls: &TlsHosts,
        default: Arc<CertifiedKey>,
    ) -> (CertStore, Vec<CertProblem>) {
        let mut problems = Vec::new();
        let mut by_secret: BTreeMap<ObjectKey, Option<Arc<CertifiedKey>>> = BTreeMap::new();
        for secret in tls.secrets() {
            let key = self.load(snapshot, secret, &mut problems);
            by_secret.insert(secret.clone(), key);
        }
        // Forget Secrets no Ingress names any more.
        self.by_secret.retain(|k, _| by_secret.contains_key(k));
        let pick = |hosts: &BTreeMap<String, ObjectKey>| -> BTreeMap<String, Arc<CertifiedKey>> {
            hosts
                .iter()
                .filter_map(|(host, secret)| {
                    let key = by_secret.get(secret)?.as_ref()?;
                    Some((host.clone(), Arc::clone(key)))
                })
                .collect()
        };
        let store = CertStore {
            exact: pick(&tls.exact),
            wildcard: pick(&tls.wildcard),
            default,
        };
        (store, problems)
    }

    fn load(
        &mut self,
        snapshot: &ClusterSnapshot,
        secret: &ObjectKey,
        problems: &mut Vec<CertProblem>,
    ) -> Option<Arc<CertifiedKey>> {
        let problem = |field: &str, message: String| CertProblem {
            secret: secret.clone(),
            field: field.to_string(),
            message,
        };
        let Some(object) = snapshot.secrets.get(secret) else {
            problems.push(problem(
                "metadata.name",
                "not found (or not of type kubernetes.io/tls); serving the default certificate"
                    .into(),
            ));
            self.by_secret.remove(secret);
            return None;
        };
        let data = object.data.as_ref();
        let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.as_slice());
        let (Some(cert_pem), Some(key_pem)) = (get(TLS_CERT_KEY), get(TLS_PRIVATE_KEY_KEY)) else {
            // The model rejects such Secrets; this is for snapshots built by hand.
            problems.push(problem("data", "tls.crt and tls.key are required".into()));
            return self.by_secret.get(secret).and_then(|c| c.good.clone());
        };
        if let Some(cached) = self.by_secret.get(secret)
            && cached.cert_pem == cert_pem
            && cached.key_pem == key_pem
        {
            return cached.good.clone();
        }
        let previous = self.by_secret.get(secret).and_then(|c| c.good.clone());
        let good = match certified_key(cert_pem, key_pem) {
            Ok(key) => Some(Arc::new(key)),
            Err((field, message)) => {
                let kept = if previous.is_some() {
                    "keeping its last good certificate"
                } else {
                    "serving the default certificate"
                };
                problems.push(problem(&field, format!("{message}; {kept}")));
                previous
            }
        };
        self.by_secret.insert(
            secret.clone(),
            Cached {
                cert_pem: cert_pem.to_vec(),
                key_pem: key_pem.to_vec(),
                good: good.clone(),
            },
        );
        good
    }
}

#[cfg(test)]
mod tests;
