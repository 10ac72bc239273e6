//! `examples/ingress` stays valid: it reads without problems, routes what its comments promise,
//! and its certificate loads.

use std::sync::Arc;

use cluster_model::{ManifestSource, Problem};
use sluice_ingress::certs::{CertCache, self_signed};
use sluice_ingress::class::ClassConfig;
use sluice_ingress::config::compile_snapshot;

#[test]
fn the_ingress_example_compiles_cleanly() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ingress");
    let reload = ManifestSource::new(dir).reload();
    assert_eq!(reload.new_problems, Vec::<Problem>::new());
    let (compiled, problems) = compile_snapshot(&reload.snapshot, &ClassConfig::default());
    assert_eq!(problems, vec![]);
    let endpoints = |host: &str, path: &str| -> Vec<String> {
        let backend = compiled.routes.lookup(host, path).expect("a route");
        compiled.upstreams[backend]
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(endpoints("web.example", "/"), ["127.0.0.2:8080"]);
    assert_eq!(endpoints("web.example", "/api/v1"), ["127.0.0.3:8080"]);
    assert_eq!(endpoints("x.apps.example", "/"), ["127.0.0.2:8080"]);
    // annotations.yaml: a regex path with a canary attached.
    let shop = compiled
        .routes
        .lookup_route("shop.example", "/V1/cart")
        .expect("shop route");
    assert_eq!(shop.backend.service, "api");
    assert!(shop.regex.is_some() && shop.options.cors.is_some());
    assert_eq!(shop.canary.map(|c| c.backend.service.as_str()), Some("web"));
    assert!(compiled.routes.lookup("shop.example", "/v2").is_none());
    let default = Arc::new(self_signed().expect("default certificate"));
    let (store, problems) =
        CertCache::default().build(&reload.snapshot, &compiled.tls, Arc::clone(&default));
    assert_eq!(problems, vec![]);
    assert_ne!(store.choose(Some("web.example")).cert, default.cert);
    assert_eq!(
        store.choose(Some("x.apps.example")).cert,
        store.choose(Some("web.example")).cert
    );
}
