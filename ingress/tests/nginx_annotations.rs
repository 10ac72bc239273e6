//! The ingress-nginx annotations beyond the basics, and endpoint selection (canary, affinity,
//! hashing, ejection), through the real binary over real sockets.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// A plain HTTP request through the ingress: (status, body, headers).
async fn send(
    ingress: &Ingress,
    method: reqwest::Method,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, reqwest::header::HeaderMap) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut req = client
        .request(method, format!("http://{}{path}", ingress.http))
        .header("Host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.text().await.unwrap_or_default(), headers)
}

fn h<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

const A: &str = "nginx.ingress.kubernetes.io/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_access_cors_vhost_regex_rewrite_and_timeouts() {
    let a = backend("a", [127, 0, 0, 41]).await;
    let ca = Ca::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    write(
        &dir,
        "10-backends.yaml",
        &service_with_slice("a", &[a.addr]),
    );
    write(
        &dir,
        "30-secret.yaml",
        &tls_secret("t", &ca.leaf(&["tls.example"])),
    );
    write(
        &dir,
        "20-ingress.yaml",
        &[
            ingress_yaml(
                "force",
                &format!("{A}force-ssl-redirect: 'true'"),
                "force.example",
                "Prefix",
                "/",
                "a",
            ),
            ingress_yaml("plain", "", "plain.example", "Prefix", "/", "a"),
            ingress_yaml(
                "deny",
                &format!("{A}whitelist-source-range: '10.0.0.0/8, 192.168.0.0/16'"),
                "deny.example",
                "Prefix",
                "/",
                "a",
            ),
            ingress_yaml(
                "allow",
                &format!("{A}whitelist-source-range: '10.0.0.0/8,127.0.0.0/8'"),
                "allow.example",
                "Prefix",
                "/",
                "a",
            ),
            ingress_yaml(
                "root",
                &format!("{A}app-root: /app1"),
                "root.example",
                "Prefix",
                "/",
                "a",
            ),
            ingress_yaml(
                "cors",
                &format!("{A}enable-cors: 'true'"),
                "cors.example",
                "Prefix",
                "/",
                "a",
            ),
            ingress_yaml(
                "cors-set",
                &format!(
                    "{A}enable-cors: 'true', {A}cors-allow-origin: 'https://app.example', \
                     {A}cors-allow-methods: 'GET, POST', {A}cors-allow-credentials: 'false', {A}cors-max-age: '600'"
                ),
                "cors2.example",
                "Prefix",
                "/",
                "a",
            ),
            ingress_yaml(
                "vhost",
                &format!("{A}upstream-vhost: internal.svc"),
                "vhost.example",
                "Prefix",
                "/",
                "a",
            ),
            ingress_yaml(
                "regex",
                &format!("{A}use-regex: 'true', {A}rewrite-target: '/$2'"),
                "regex.example",
                "ImplementationSpecific",
                "/something(/|$)(.*)",
                "a",
            ),
            ingress_yaml(
                "slow",
                &format!("{A}proxy-read-timeout: '1'"),
                "timeout.example",
                "Prefix",
                "/",
                "a",
            ),
            // tls.example has a Secret: redirected without force-ssl-redirect too.
            (
                "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: tls}\nspec:\n  ingressClassName: sluice\n  \
                 tls: [{hosts: [tls.example], secretName: t}]\n  rules: [{host: tls.example, http: {paths: [{path: /, pathType: Prefix, \
                 backend: {service: {name: a, port: {number: 80}}}}]}}]\n"
            )
            .to_string(),
        ]
        .concat(),
    );
    let ingress = Ingress::start(&dir).await;
    let get = reqwest::Method::GET;
    let port = ingress.https.port();

    // force-ssl-redirect: 308 to HTTPS though the host has no spec.tls; without it, no redirect.
    let (status, _, headers) = ingress.get("force.example", "/p?q=1").await;
    assert_eq!(status, 308);
    assert_eq!(
        h(&headers, "location"),
        format!("https://force.example:{port}/p?q=1")
    );
    assert_eq!(ingress.get("plain.example", "/p").await.0, 200);
    assert_eq!(ingress.get("tls.example", "/p").await.0, 308);

    // whitelist-source-range: the client (127.0.0.1) is outside the first list, inside the second.
    let (status, body, _) = ingress.get("deny.example", "/").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(ingress.get("allow.example", "/").await.0, 200);

    // app-root: only / is redirected, with 302.
    let (status, _, headers) = ingress.get("root.example", "/").await;
    assert_eq!((status, h(&headers, "location")), (302, "/app1"));
    let (status, body, _) = ingress.get("root.example", "/app1").await;
    assert_eq!((status, field(&body, "path")), (200, "/app1"));

    // enable-cors: the preflight is answered with ingress-nginx's defaults; other answers carry
    // the headers too.
    let (status, body, headers) = send(
        &ingress,
        reqwest::Method::OPTIONS,
        "cors.example",
        "/api",
        &[
            ("Origin", "https://x.example"),
            ("Access-Control-Request-Method", "PUT"),
        ],
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert!(body.is_empty(), "preflight reached the backend: {body}");
    assert_eq!(h(&headers, "access-control-allow-origin"), "*");
    assert_eq!(
        h(&headers, "access-control-allow-methods"),
        "GET, PUT, POST, DELETE, PATCH, OPTIONS"
    );
    assert_eq!(
        h(&headers, "access-control-allow-headers"),
        "DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,Authorization"
    );
    assert_eq!(h(&headers, "access-control-allow-credentials"), "true");
    assert_eq!(h(&headers, "access-control-max-age"), "1728000");
    let (status, body, headers) = send(
        &ingress,
        get.clone(),
        "cors.example",
        "/api",
        &[("Origin", "https://x.example")],
    )
    .await;
    assert_eq!((status, field(&body, "backend")), (200, "a"));
    assert_eq!(h(&headers, "access-control-allow-origin"), "*");
    let (status, _, headers) = send(
        &ingress,
        reqwest::Method::OPTIONS,
        "cors2.example",
        "/",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        h(&headers, "access-control-allow-origin"),
        "https://app.example"
    );
    assert_eq!(h(&headers, "access-control-allow-methods"), "GET, POST");
    assert_eq!(h(&headers, "access-control-max-age"), "600");
    assert!(headers.get("access-control-allow-credentials").is_none());
    // Without enable-cors, OPTIONS goes to the backend and no CORS header is added.
    let (status, body, headers) = send(
        &ingress,
        reqwest::Method::OPTIONS,
        "plain.example",
        "/",
        &[],
    )
    .await;
    assert_eq!((status, field(&body, "backend")), (200, "a"));
    assert!(headers.get("access-control-allow-origin").is_none());

    // upstream-vhost: the backend sees that Host; X-Forwarded-Host keeps the client's.
    let (_, body, _) = ingress.get("vhost.example", "/").await;
    assert_eq!(field(&body, "host"), "internal.svc");
    assert_eq!(field(&body, "xfh"), "vhost.example");

    // use-regex + rewrite-target with a capture group (ingress-nginx's documented example);
    // regex paths match case-insensitively from the start of the path.
    for (path, upstream) in [
        ("/something", "/"),
        ("/something/", "/"),
        ("/something/new", "/new"),
        ("/SOMETHING/a/b?x=1", "/a/b?x=1"),
    ] {
        let (status, body, _) = ingress.get("regex.example", path).await;
        assert_eq!((status, field(&body, "path")), (200, upstream), "{path}");
    }
    assert_eq!(ingress.get("regex.example", "/other").await.0, 404);
    assert_eq!(ingress.get("regex.example", "/somethingelse").await.0, 404);

    // proxy-read-timeout: 1 s. A backend slower than that is a 504, soon; a faster one passes.
    let start = Instant::now();
    let (status, _, _) = ingress.get("timeout.example", "/?sleep=4000").await;
    assert_eq!(status, 504);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let (status, _, _) = ingress.get("timeout.example", "/?sleep=300").await;
    assert_eq!(status, 200);
    // The default (60 s) waits longer than 1 s.
    let (status, _, _) = ingress.get("plain.example", "/?sleep=1500").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_affinity_hashing_least_request_and_ejection() {
    let a = backend("a", [127, 0, 0, 42]).await;
    let b = backend("b", [127, 0, 0, 43]).await;
    // An address nothing listens on: connections are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.44:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    write(
        &dir,
        "10-backends.yaml",
        &[
            service_with_slice("a", &[a.addr]),
            service_with_slice("b", &[b.addr]),
            service_with_slices("ab", &[a.addr, b.addr]),
            service_with_slices("dead-a", &[dead, a.addr]),
        ]
        .concat(),
    );
    let canary = |name: &str, host: &str, annotations: &str| {
        [
            ingress_yaml(&format!("{name}-main"), "", host, "Prefix", "/", "a"),
            ingress_yaml(
                &format!("{name}-canary"),
                &format!("{A}canary: 'true', {annotations}"),
                host,
                "Prefix",
                "/",
                "b",
            ),
        ]
        .concat()
    };
    write(
        &dir,
        "20-ingress.yaml",
        &[
            canary(
                "hc",
                "canary.example",
                &format!("{A}canary-by-header: X-Canary, {A}canary-by-cookie: canary"),
            ),
            canary(
                "hv",
                "value.example",
                &format!("{A}canary-by-header: X-Version, {A}canary-by-header-value: v2"),
            ),
            canary("w", "weight.example", &format!("{A}canary-weight: '30'")),
            canary("w0", "zero.example", &format!("{A}canary-weight: '0'")),
            ingress_yaml(
                "sticky",
                &format!("{A}affinity: cookie, {A}session-cookie-name: route"),
                "sticky.example",
                "Prefix",
                "/",
                "ab",
            ),
            ingress_yaml(
                "hash",
                &format!("{A}upstream-hash-by: '$arg_user'"),
                "hash.example",
                "Prefix",
                "/",
                "ab",
            ),
            ingress_yaml(
                "least",
                &format!("{A}load-balance: ewma"),
                "least.example",
                "Prefix",
                "/",
                "ab",
            ),
            ingress_yaml("rr", "", "rr.example", "Prefix", "/", "ab"),
            ingress_yaml("eject", "", "eject.example", "Prefix", "/", "dead-a"),
        ]
        .concat(),
    );
    let ingress = Ingress::start(&dir).await;
    let get = reqwest::Method::GET;
    let who = |body: &str| field(body, "backend").to_string();
    let hit = |host: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let ingress = &ingress;
        let get = get.clone();
        async move {
            let (status, body, _) = send(ingress, get, host, "/", &headers).await;
            assert_eq!(status, 200, "{host}: {body}");
            who(&body)
        }
    };

    // Canary by header ("always"/"never") and cookie; header first.
    assert_eq!(hit("canary.example", vec![]).await, "a");
    assert_eq!(
        hit("canary.example", vec![("X-Canary", "always")]).await,
        "b"
    );
    assert_eq!(
        hit("canary.example", vec![("X-Canary", "never")]).await,
        "a"
    );
    assert_eq!(
        hit("canary.example", vec![("X-Canary", "other")]).await,
        "a"
    );
    assert_eq!(
        hit("canary.example", vec![("Cookie", "x=1; canary=always")]).await,
        "b"
    );
    assert_eq!(
        hit("canary.example", vec![("Cookie", "canary=never")]).await,
        "a"
    );
    assert_eq!(
        hit(
            "canary.example",
            vec![("X-Canary", "never"), ("Cookie", "canary=always")]
        )
        .await,
        "a"
    );
    // By header value.
    assert_eq!(hit("value.example", vec![("X-Version", "v2")]).await, "b");
    assert_eq!(hit("value.example", vec![("X-Version", "v1")]).await, "a");
    assert_eq!(hit("value.example", vec![]).await, "a");
    // By weight: about 30 of 100 (bounds loose enough for chance), 0 never.
    let mut canaried = 0;
    for _ in 0..200 {
        if hit("weight.example", vec![]).await == "b" {
            canaried += 1;
        }
        assert_eq!(hit("zero.example", vec![]).await, "a");
    }
    assert!(
        (30..=100).contains(&canaried),
        "{canaried} of 200 to the canary at weight 30"
    );

    // Round-robin by default: both endpoints serve.
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        *seen.entry(hit("rr.example", vec![]).await).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&5), "{seen:?}");

    // affinity: cookie. The first answer sets the cookie; with it, always the same endpoint.
    let (_, body, headers) = send(&ingress, get.clone(), "sticky.example", "/", &[]).await;
    let first = who(&body);
    let set_cookie = h(&headers, "set-cookie").to_string();
    assert!(set_cookie.starts_with("route="), "{set_cookie}");
    assert!(set_cookie.contains("Path=/") && set_cookie.contains("HttpOnly"));
    let cookie = set_cookie.split(';').next().unwrap_or("").to_string();
    for _ in 0..10 {
        let (_, body, headers) = send(
            &ingress,
            get.clone(),
            "sticky.example",
            "/",
            &[("Cookie", cookie.as_str())],
        )
        .await;
        assert_eq!(who(&body), first);
        assert!(headers.get("set-cookie").is_none(), "cookie set again");
    }
    // A cookie naming no endpoint is replaced.
    let (_, _, headers) = send(
        &ingress,
        get.clone(),
        "sticky.example",
        "/",
        &[("Cookie", "route=0000")],
    )
    .await;
    assert!(h(&headers, "set-cookie").starts_with("route="));

    // upstream-hash-by: one user, one endpoint; many users use both.
    let mut users = BTreeMap::new();
    for user in 0..20 {
        let path = format!("/?user=u{user}");
        let (_, first, _) = send(&ingress, get.clone(), "hash.example", &path, &[]).await;
        for _ in 0..3 {
            let (_, again, _) = send(&ingress, get.clone(), "hash.example", &path, &[]).await;
            assert_eq!(who(&again), who(&first), "user {user}");
        }
        *users.entry(who(&first)).or_insert(0) += 1;
    }
    assert_eq!(users.len(), 2, "{users:?}");

    // load-balance ewma (least requests in flight): while a slow request holds one endpoint,
    // the next requests all go to the other.
    let slow = {
        let url = format!("http://{}/?sleep=2000", ingress.http);
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .get(url)
                .header("Host", "least.example")
                .send()
                .await
                .expect("slow request");
            field(&resp.text().await.expect("body"), "backend").to_string()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut others = BTreeMap::new();
    for _ in 0..6 {
        *others
            .entry(hit("least.example", vec![]).await)
            .or_insert(0) += 1;
    }
    let busy = slow.await.expect("slow task");
    assert_eq!(others.len(), 1, "{others:?}");
    assert!(
        !others.contains_key(&busy),
        "{others:?} while {busy} was busy"
    );

    // Ejection: the dead endpoint refuses one connection (retried on the live one), then is
    // passed over; round-robin alone would try it every other request.
    for _ in 0..10 {
        assert_eq!(hit("eject.example", vec![]).await, "a");
    }
    let failures = ingress
        .log_text()
        .lines()
        .filter(|l| l.contains("connect_failed") && l.contains(&dead.to_string()))
        .count();
    assert_eq!(failures, 1, "{}", ingress.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_send_timeouts() {
    // A listener whose accept queue is full: further SYNs are dropped, so connecting hangs.
    let full = tokio::net::TcpSocket::new_v4().expect("socket");
    full.bind("127.0.0.45:0".parse().expect("addr"))
        .expect("bind");
    let full = full.listen(0).expect("listen");
    let full_addr = full.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        // Some of these complete (they fill the queue), the rest hang: either way, stop soon.
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(full_addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    // A backend that accepts and never reads: a large request body cannot be sent.
    let deaf = tokio::net::TcpListener::bind("127.0.0.46:0")
        .await
        .expect("bind");
    let deaf_addr = deaf.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = deaf.accept().await {
            held.push(s);
        }
    });
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).expect("manifest dir");
    write(&dir, "00-class.yaml", CLASS);
    write(
        &dir,
        "10-backends.yaml",
        &[
            service_with_slice("full", &[full_addr]),
            service_with_slice("deaf", &[deaf_addr]),
        ]
        .concat(),
    );
    write(
        &dir,
        "20-ingress.yaml",
        &[
            ingress_yaml(
                "connect",
                &format!("{A}proxy-connect-timeout: '1'"),
                "connect.example",
                "Prefix",
                "/",
                "full",
            ),
            ingress_yaml(
                "send",
                // Pingora, after a send timeout, still waits for the answer until the read
                // timeout: both bound the request.
                &format!("{A}proxy-send-timeout: '1', {A}proxy-read-timeout: '2'"),
                "send.example",
                "Prefix",
                "/",
                "deaf",
            ),
        ]
        .concat(),
    );
    let ingress = Ingress::start(&dir).await;

    let start = Instant::now();
    let (status, _, _) = ingress.get("connect.example", "/").await;
    let took = start.elapsed();
    assert_eq!(status, 504, "{}", ingress.log_text());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "connect timeout after {took:?}"
    );

    let start = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("http://{}/upload", ingress.http))
        .header("Host", "send.example")
        .body(vec![b'x'; 64 << 20])
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    let took = start.elapsed();
    // The proxy gives up writing after 1 s (and waiting after 2 more): a 504, or the connection
    // closed mid-upload.
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 504);
    }
    assert!(took < Duration::from_secs(7), "send timeout after {took:?}");
    assert!(
        ingress.log_text().contains("WriteTimedout"),
        "{}",
        ingress.log_text()
    );
    holder.abort();
    drop(fillers);
}
