use super::*;
use cluster_model::{ManifestFormat, parse_manifests};

/// (cert PEM, key PEM) for `names`, self-signed.
fn pem(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(ToString::to_string).collect();
    let c = rcgen::generate_simple_self_signed(names).expect("test certificate");
    (c.cert.pem(), c.signing_key.serialize_pem())
}

fn secret_yaml(name: &str, cert: &str, key: &str) -> String {
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(cert),
        indent(key)
    )
}

fn snapshot(yaml: &str) -> ClusterSnapshot {
    let (objects, problems) = parse_manifests(yaml, ManifestFormat::Yaml, None);
    assert_eq!(problems, vec![]);
    ClusterSnapshot::from_objects(objects)
}

fn der(key: &CertifiedKey) -> Vec<u8> {
    key.cert[0].to_vec()
}

#[test]
fn bad_pem_names_the_field() {
    let (cert, key) = pem(&["a.example"]);
    let (_, other_key) = pem(&["b.example"]);
    let field = |c: &str, k: &str| certified_key(c.as_bytes(), k.as_bytes()).err().map(|e| e.0);
    assert_eq!(field(&cert, &key), None);
    assert_eq!(field("garbage", &key).as_deref(), Some("data[tls.crt]"));
    assert_eq!(field(&cert, "garbage").as_deref(), Some("data[tls.key]"));
    assert_eq!(
        field(&cert, &other_key).as_deref(),
        Some("data[tls.key]"),
        "mismatched key"
    );
}

#[test]
fn sni_chooses_exact_then_wildcard_then_default_and_invalid_keeps_last_good() {
    let (a_cert, a_key) = pem(&["a.example"]);
    let (w_cert, w_key) = pem(&["*.wild.example"]);
    let yaml = format!(
        "{}{}",
        secret_yaml("a-tls", &a_cert, &a_key),
        secret_yaml("w-tls", &w_cert, &w_key)
    );
    let tls = TlsHosts {
        exact: [("a.example".to_string(), ObjectKey::new("default", "a-tls"))].into(),
        wildcard: [(
            "wild.example".to_string(),
            ObjectKey::new("default", "w-tls"),
        )]
        .into(),
    };
    let default = Arc::new(self_signed().expect("default certificate"));
    let mut cache = CertCache::default();
    let (store, problems) = cache.build(&snapshot(&yaml), &tls, Arc::clone(&default));
    assert_eq!(problems, vec![]);
    let chosen = |sni: Option<&str>| der(&store.choose(sni));
    let a = chosen(Some("A.example"));
    let w = chosen(Some("x.wild.example"));
    assert_ne!(a, w);
    assert_eq!(chosen(Some("y.x.wild.example")), der(&default));
    assert_eq!(chosen(Some("other.example")), der(&default));
    assert_eq!(chosen(None), der(&default));

    // a-tls turns to garbage: reported, and the last good certificate stays.
    let yaml = format!(
        "{}{}",
        secret_yaml("a-tls", "not a certificate", &a_key),
        secret_yaml("w-tls", &w_cert, &w_key)
    );
    let (store, problems) = cache.build(&snapshot(&yaml), &tls, Arc::clone(&default));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].secret, ObjectKey::new("default", "a-tls"));
    assert_eq!(problems[0].field, "data[tls.crt]");
    assert!(
        problems[0]
            .to_string()
            .contains("keeping its last good certificate")
    );
    assert_eq!(der(&store.choose(Some("a.example"))), a);

    // w-tls gone: its hosts get the default.
    let (store, problems) = cache.build(
        &snapshot(&secret_yaml("a-tls", &a_cert, &a_key)),
        &tls,
        Arc::clone(&default),
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(der(&store.choose(Some("x.wild.example"))), der(&default));
    assert_eq!(der(&store.choose(Some("a.example"))), a);
}
