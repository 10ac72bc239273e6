//! `sluice-ingress`: serves HTTP and HTTPS for the Ingresses of our class, read from a watched
//! manifest directory or the Kubernetes API. I/O lives here; what to serve is compiled by the library (pure).

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use arc_swap::ArcSwap;
use clap::Parser;
use cluster_model::{ClusterSnapshot, ClusterSource, Kind, KubeSource, kube_client};
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::listening::Service;
use rustls::sign::CertifiedKey;
use sluice_ingress::certs::{CertCache, CertStore, certified_key, self_signed};
use sluice_ingress::class::{ClassConfig, DEFAULT_CLASS, DEFAULT_CONTROLLER};
use sluice_ingress::config::{Compiled, compile_snapshot};
use sluice_ingress::listener::{Front, Limits};
use sluice_ingress::metrics::Metrics;
use sluice_ingress::proxy::{Balancer, IngressProxy, SharedState, SniResolver, State};
use sluice_ingress::publish::{Publisher, Sink};
use sluice_ingress::status::Publish;

#[derive(Parser, Debug)]
#[command(
    name = "sluice-ingress",
    about = "Sluice's Ingress controller (Pingora)"
)]
struct Args {
    /// Directory of YAML/JSON manifests to read Ingresses, IngressClasses, TLS Secrets,
    /// Services, EndpointSlices and Pods from; watched, changes apply without restart. Without
    /// it, the Kubernetes API is watched instead.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API (default: KUBECONFIG, ~/.kube/config, or the in-cluster
    /// service account). Only without --manifests.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Plain HTTP listener.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// HTTPS listener (TLS 1.2/1.3, HTTP/2 and HTTP/1.1 by ALPN, certificate by SNI).
    #[arg(long, default_value = "0.0.0.0:8443")]
    https_listen: SocketAddr,
    /// `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:10254")]
    metrics_listen: SocketAddr,
    /// Our IngressClass name (what `kubernetes.io/ingress.class` must say).
    #[arg(long, default_value = DEFAULT_CLASS)]
    class: String,
    /// Our controller name (what an IngressClass `spec.controller` must say).
    #[arg(long, default_value = DEFAULT_CONTROLLER)]
    controller: String,
    /// PEM certificate chain served when no Secret covers the SNI name (with --default-key);
    /// without it a self-signed certificate is generated at start.
    #[arg(long, requires = "default_key")]
    default_cert: Option<PathBuf>,
    /// PEM private key of --default-cert.
    #[arg(long, requires = "default_cert")]
    default_key: Option<PathBuf>,
    /// The port redirects to HTTPS point at (default: that of --https-listen).
    #[arg(long)]
    https_redirect_port: Option<u16>,
    /// How long manifest changes settle before they are read (milliseconds).
    #[arg(long, default_value_t = 100)]
    settle_ms: u64,
    /// Proxy worker threads per listener.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// On SIGTERM: stop accepting, let requests in flight finish for at most this long, then exit
    /// (SIGINT exits at once). `/readyz` answers 503 meanwhile.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_seconds: u64,
    /// Seconds a client has for a whole request head (and, on HTTPS, as long again for the TLS
    /// handshake before it); on a keep-alive connection from the request's first byte. Past it
    /// the connection is closed, however slowly bytes trickle in (as nginx's
    /// client_header_timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    request_head_timeout: u64,
    /// Seconds a connection may stay idle between requests (HTTP/1.x keep-alive and HTTP/2) before
    /// it is closed (as nginx's keepalive_timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_timeout: u64,
    /// Seconds without a byte while reading a request body (or an upgraded connection's client
    /// side) before the request fails (as nginx's client_body_timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    client_body_timeout: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Publish this Service's load balancer addresses (else its externalIPs) as our Ingresses'
    /// status address, as ingress-nginx's flag of the same name ("namespace/name").
    #[arg(long, value_name = "NAMESPACE/NAME")]
    publish_service: Option<String>,
    /// Publish these addresses (comma-separated IPs or hostnames) instead; wins over
    /// --publish-service.
    #[arg(long, value_name = "ADDRESSES")]
    publish_status_address: Option<String>,
    /// Manifest mode: also write our Ingresses' status addresses to this JSON file (what
    /// `sluice lab status` shows). In Kubernetes mode status goes to the API.
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    init_tracing(args.log_json);
    if let Err(e) = run(args) {
        tracing::error!(event = "fatal", error = %format!("{e:#}"), "{e:#}");
        std::process::exit(1);
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes would garble logs written to files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load_default_cert(args: &Args) -> anyhow::Result<CertifiedKey> {
    match (&args.default_cert, &args.default_key) {
        (Some(cert), Some(key)) => {
            let read =
                |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            certified_key(&read(cert)?, &read(key)?).map_err(|(field, message)| {
                anyhow!(
                    "--default-cert/--default-key: {message} ({})",
                    field
                        .replace("data[tls.crt]", "certificate")
                        .replace("data[tls.key]", "key")
                )
            })
        }
        _ => self_signed().map_err(|e| anyhow!(e)),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Two providers may be compiled in (through dependencies): choose ring, once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let default_cert = Arc::new(load_default_cert(&args)?);
    let state: SharedState = Arc::new(ArcSwap::from_pointee(State {
        compiled: Compiled::default(),
        certs: CertStore::with_default(Arc::clone(&default_cert)),
    }));
    let ready = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::new().context("setting up metrics")?);

    let health = std::net::TcpListener::bind(args.metrics_listen)
        .with_context(|| format!("listening on {} (--metrics-listen)", args.metrics_listen))?;
    spawn_health(
        health,
        Arc::clone(&ready),
        Arc::clone(&draining),
        Arc::clone(&metrics),
    )?;

    let class = ClassConfig {
        controller: args.controller.clone(),
        class: args.class.clone(),
    };
    let source = match &args.manifests {
        Some(dir) => Source::Manifests(dir.clone(), Duration::from_millis(args.settle_ms)),
        None => Source::Kubernetes(args.kubeconfig.clone()),
    };
    let publish = Publish::from_flags(
        args.publish_status_address.as_deref(),
        args.publish_service.as_deref(),
    );
    if publish == Publish::Nothing {
        tracing::info!(
            event = "status_not_published",
            "no --publish-service or --publish-status-address: Ingress status is left alone"
        );
    }
    spawn_reloader(
        source,
        (publish, args.status_file.clone()),
        class,
        Arc::clone(&state),
        default_cert,
        ready,
        Arc::clone(&metrics),
    )?;

    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let conf = ServerConf {
        threads: args.threads.max(1),
        // Pingora sleeps this long after SIGTERM whatever is in flight; the drain thread exits
        // before, as soon as nothing is or at the grace period (this is only a backstop).
        grace_period_seconds: Some(args.shutdown_grace_seconds.saturating_add(2)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let https_port = Some(args.https_redirect_port.unwrap_or(args.https_listen.port()));
    let balancer = Arc::new(Balancer::default());

    let limits = Limits {
        request_head_timeout: Duration::from_secs(args.request_head_timeout),
        keepalive_timeout: Duration::from_secs(args.keepalive_timeout),
        body_read_timeout: Duration::from_secs(args.client_body_timeout),
    };
    let proxy = |https: bool| {
        let mut proxy = pingora_proxy::http_proxy(
            &server.configuration,
            IngressProxy::new(
                Arc::clone(&state),
                https,
                https_port,
                Arc::clone(&balancer),
                Arc::clone(&metrics),
            ),
        );
        let mut options = HttpServerOptions::default();
        options.h2_idle_timeout = Some(limits.keepalive_timeout);
        proxy.server_options = Some(options);
        proxy
    };

    let mut http = Service::new(
        "sluice-ingress http".to_string(),
        Front::new(proxy(false), None, limits, Arc::clone(&metrics)),
    );
    http.add_tcp(&args.http_listen.to_string());

    let mut tls = TlsSettings::intermediate("", "").map_err(|e| anyhow!("TLS settings: {e}"))?;
    tls.set_cert_resolver(Arc::new(SniResolver(Arc::clone(&state))));
    tls.enable_h2();
    // TLS is accepted by `Front` (counted, and under the head deadline), so the listener is TCP.
    let mut https = Service::new(
        "sluice-ingress https".to_string(),
        Front::new(proxy(true), Some(tls.build()), limits, Arc::clone(&metrics)),
    );
    https.add_tcp(&args.https_listen.to_string());

    server.add_service(http);
    server.add_service(https);
    tracing::info!(
        event = "started",
        http = %args.http_listen,
        https = %args.https_listen,
        metrics = %args.metrics_listen,
        source = %args
            .manifests
            .as_ref()
            .map_or_else(|| "kubernetes".to_string(), |d| d.display().to_string()),
        "sluice-ingress listening"
    );
    spawn_drain(Arc::clone(&draining), grace, Arc::clone(&metrics))?;
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnTerm(draining)),
    });
    std::process::exit(0)
}

/// SIGTERM (and SIGQUIT: binary upgrades are not used here) starts a drain; SIGINT exits at once.
struct DrainOnTerm(Arc<AtomicBool>);

#[async_trait::async_trait]
impl ShutdownSignalWatch for DrainOnTerm {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut quit), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!(
                event = "signals_failed",
                "cannot install signal handlers; only SIGKILL stops the process"
            );
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = quit.recv() => {}
            _ = int.recv() => return ShutdownSignal::FastShutdown,
        }
        self.0.store(true, Ordering::Relaxed);
        ShutdownSignal::GracefulTerminate
    }
}

/// Once draining: exits when no request is in flight (after a short pause, so the listeners have
/// stopped accepting) or when the grace period is over, whichever comes first.
fn spawn_drain(
    draining: Arc<AtomicBool>,
    grace: Duration,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    const POLL: Duration = Duration::from_millis(20);
    const SETTLE: Duration = Duration::from_millis(200);
    std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            while !draining.load(Ordering::Relaxed) {
                std::thread::sleep(POLL);
            }
            let start = std::time::Instant::now();
            tracing::info!(
                event = "draining",
                in_flight = metrics.in_flight.get(),
                grace_seconds = grace.as_secs(),
                "SIGTERM: draining"
            );
            loop {
                let in_flight = metrics.in_flight.get();
                let elapsed = start.elapsed();
                if in_flight <= 0 && elapsed >= SETTLE.min(grace) {
                    tracing::info!(
                        event = "drained",
                        after_ms = elapsed.as_millis() as u64,
                        "drained; exiting"
                    );
                    std::process::exit(0);
                }
                if elapsed >= grace {
                    tracing::warn!(
                        event = "grace_over",
                        in_flight,
                        "grace period over with {in_flight} requests in flight; exiting"
                    );
                    std::process::exit(0);
                }
                std::thread::sleep(POLL);
            }
        })?;
    Ok(())
}

/// `/healthz` (alive), `/readyz` (the manifests have been read once) and `/metrics` on their own
/// port, on a thread of their own so a busy proxy does not fail its probes.
fn spawn_health(
    listener: std::net::TcpListener,
    ready: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(event = "health_failed", error = %e, "health listener: {e}");
                        return;
                    }
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let ready = Arc::clone(&ready);
                    let draining = Arc::clone(&draining);
                    let metrics = Arc::clone(&metrics);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let ready = ready.load(Ordering::Relaxed);
                            let draining = draining.load(Ordering::Relaxed);
                            let resp = if req.uri().path() == "/metrics" {
                                text_response(200, metrics.render())
                            } else {
                                health_response(req.uri().path(), ready, draining)
                            };
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
        })?;
    Ok(())
}

fn health_response(
    path: &str,
    ready: bool,
    draining: bool,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, body) = match path {
        "/healthz" => (200, "ok\n"),
        "/readyz" if draining => (503, "draining\n"),
        "/readyz" if ready => (200, "ready\n"),
        "/readyz" => (503, "not ready: manifests not read yet\n"),
        _ => (404, "not found\n"),
    };
    text_response(status, body.to_string())
}

fn text_response(status: u16, body: String) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    resp
}

/// What the status publisher gets after each reload.
struct PublishJob {
    snapshot: Arc<ClusterSnapshot>,
    /// (Ingress "namespace/name", message) of problems not reported before.
    new_problems: Vec<(String, String)>,
}

/// Writes status and Events on a task of their own, so a slow or unreachable API never delays
/// a route swap. Jobs queued meanwhile are coalesced: every problem is reported, status is
/// brought up to date with the newest snapshot only.
fn spawn_publisher(
    mut publisher: Publisher,
    class: ClassConfig,
) -> tokio::sync::mpsc::UnboundedSender<PublishJob> {
    let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<PublishJob>();
    tokio::spawn(async move {
        while let Some(mut job) = queue.recv().await {
            let mut problems = std::mem::take(&mut job.new_problems);
            while let Ok(mut newer) = queue.try_recv() {
                problems.append(&mut newer.new_problems);
                job = newer;
            }
            for (ingress, message) in &problems {
                publisher
                    .report_problem(&job.snapshot, ingress, message)
                    .await;
            }
            publisher.update(&job.snapshot, &class).await;
        }
    });
    jobs
}

/// Where the cluster model comes from.
enum Source {
    /// A manifest directory and how long its changes settle.
    Manifests(PathBuf, Duration),
    /// The Kubernetes API, through this kubeconfig (or the inferred configuration).
    Kubernetes(Option<PathBuf>),
}

/// Watches the source and swaps in a new [`State`] after every change. Fails at once if the
/// directory cannot be watched or no Kubernetes client can be built.
fn spawn_reloader(
    source: Source,
    (publish, status_file): (Publish, Option<PathBuf>),
    class: ClassConfig,
    state: SharedState,
    default_cert: Arc<CertifiedKey>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The pod's name (downward API) tells replicas' Events apart.
    let instance = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let (mut source, sink) = match source {
        Source::Manifests(dir, settle) => {
            if !dir.is_dir() {
                bail!("--manifests {}: not a directory", dir.display());
            }
            let source = runtime
                .block_on(async { ClusterSource::manifests(&dir, settle) })
                .with_context(|| format!("watching {} (--manifests)", dir.display()))?;
            (source, Sink::Local(status_file))
        }
        Source::Kubernetes(kubeconfig) => runtime.block_on(async {
            let client = kube_client(kubeconfig.as_deref()).await?;
            // Only what the controller reads: never Pods or Nodes, and only TLS Secrets.
            let source = KubeSource::start_kinds(client.clone(), Kind::INGRESS, Default::default());
            anyhow::Ok((ClusterSource::kubernetes(source), Sink::Api(client)))
        })?,
    };
    let publisher = Publisher::new(publish, sink, instance);
    std::thread::Builder::new()
        .name("reloader".into())
        .spawn(move || {
            runtime.block_on(async move {
                let publish_jobs = spawn_publisher(publisher, class.clone());
                let mut certs = CertCache::default();
                let mut reported: HashSet<String> = HashSet::new();
                while let Some(why) = source.changed().await {
                    let Some(reload) = source.reload() else {
                        continue;
                    };
                    for p in &reload.new_problems {
                        tracing::warn!(event = "manifest_problem", problem = %p, "{p}");
                    }
                    let snapshot: &ClusterSnapshot = &reload.snapshot;
                    let (compiled, route_problems) = compile_snapshot(snapshot, &class);
                    let (store, cert_problems) =
                        certs.build(snapshot, &compiled.tls, Arc::clone(&default_cert));
                    // Problems of the compile recur on every reload: log each once while it lasts.
                    let now: HashSet<String> = route_problems
                        .iter()
                        .map(|p| format!("Ingress {}: {}", p.ingress, p.message))
                        .chain(cert_problems.iter().map(ToString::to_string))
                        .collect();
                    for p in now.difference(&reported) {
                        tracing::warn!(event = "config_problem", problem = %p, "{p}");
                    }
                    let new_route_problems = route_problems
                        .iter()
                        .filter(|p| {
                            !reported.contains(&format!("Ingress {}: {}", p.ingress, p.message))
                        })
                        .map(|p| (p.ingress.clone(), p.message.clone()))
                        .collect();
                    let _ = publish_jobs.send(PublishJob {
                        snapshot: Arc::clone(&reload.snapshot),
                        new_problems: new_route_problems,
                    });
                    metrics
                        .problems
                        .set(i64::try_from(now.len()).unwrap_or(i64::MAX));
                    reported = now;
                    let hosts = compiled.tls.exact.len() + compiled.tls.wildcard.len();
                    let backends = compiled.upstreams.len();
                    state.store(Arc::new(State {
                        compiled,
                        certs: store,
                    }));
                    ready.store(true, Ordering::Relaxed);
                    metrics.reloads.inc();
                    metrics
                        .tls_hosts
                        .set(i64::try_from(hosts).unwrap_or(i64::MAX));
                    tracing::info!(
                        event = "reloaded",
                        reason = why,
                        ingresses = snapshot.ingresses.len(),
                        backends,
                        tls_hosts = hosts,
                        "configuration applied ({why})"
                    );
                }
                tracing::error!(
                    event = "source_ended",
                    "the manifest watch ended; serving the last configuration"
                );
            });
        })?;
    Ok(())
}
