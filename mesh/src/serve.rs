//! Server plumbing every node shares: binding listeners before anything
//! else so tests and scripts can read real addresses, the ready line, gRPC
//! health and reflection, the HTTP listener with `/healthz` and `/readyz`,
//! and shutdown: signal → stop accepting → drain with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

use crate::auth::{AuthLayer, HttpAccess, Policy, Security};
use crate::tls::TlsListener;

/// A shutdown signal that many tasks can wait on.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            tx: Arc::new(tx),
            rx,
        }
    }

    /// Triggers it (idempotent).
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// Whether it has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once triggered.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Binds a TCP listener, naming the address on failure.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// A node's listeners, bound before anything is served.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC listener.
    pub grpc: TcpListener,
    /// Its bound address.
    pub grpc_addr: SocketAddr,
    /// The HTTP listener, if the node has one.
    pub http: Option<TcpListener>,
    /// Its bound address.
    pub http_addr: Option<SocketAddr>,
}

/// Binds the gRPC listener and, if asked for, the HTTP one.
pub async fn bind_listeners(
    grpc: SocketAddr,
    http: Option<SocketAddr>,
) -> std::io::Result<Listeners> {
    let grpc = bind(grpc).await?;
    let http = match http {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    Ok(Listeners {
        grpc_addr: grpc.local_addr()?,
        http_addr: http.as_ref().map(TcpListener::local_addr).transpose()?,
        grpc,
        http,
    })
}

/// Prints the ready line scripts and tests wait for:
/// `flagmesh ready grpc=ADDR http=ADDR` (`http=-` without an HTTP listener).
pub fn print_ready(grpc: SocketAddr, http: Option<SocketAddr>) {
    let http = http.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!("flagmesh ready grpc={grpc} http={http}");
}

/// gRPC health (every listed service reported serving) and reflection over
/// every flagmesh and flagd descriptor, added to `routes`.
pub fn with_health_and_reflection(
    routes: tonic::service::Routes,
    services: &[&str],
) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in services {
        let reporter = reporter.clone();
        let name = (*name).to_owned();
        // the reporter's state is a watch channel: setting it never blocks
        tokio::spawn(async move {
            reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        });
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flagmesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flagmesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// Serves gRPC on `listener` until `shutdown`, behind the auth layer, over
/// TLS when `security` has a certificate for it.
pub async fn serve_grpc(
    routes: tonic::service::Routes,
    security: &Security,
    policy: Policy,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let mut server = tonic::transport::Server::builder()
        // detect dead peers on long-lived streams
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(security.limits.max_concurrent_streams_per_connection))
        // every call is checked against the node's access policy and limits
        .layer(AuthLayer::new(security, policy));
    let router = server.add_routes(routes);
    match &security.grpc_tls {
        Some(tls) => {
            let incoming = ReceiverStream::new(tls.incoming(listener))
                .map(|(stream, _peer)| Ok::<_, std::io::Error>(stream));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    }
}

/// Serves gRPC in a task until `shutdown`; failures are logged.
pub fn spawn_grpc(
    routes: tonic::service::Routes,
    security: &Security,
    policy: Policy,
    listener: TcpListener,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<()> {
    let stop = shutdown.wait();
    let security = security.clone();
    tokio::spawn(async move {
        if let Err(e) = serve_grpc(routes, &security, policy, listener, stop).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    })
}

/// Starts a node's gRPC server and the certificate watchers of its TLS
/// listeners; the tasks to drain at shutdown.
pub fn start_grpc(
    routes: tonic::service::Routes,
    security: &Security,
    policy: Policy,
    listener: TcpListener,
    shutdown: &Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = security.spawn_tls_watchers(shutdown);
    tasks.push(spawn_grpc(routes, security, policy, listener, shutdown));
    tasks
}

/// Serves HTTP in a task until `shutdown` (over TLS when `security` has a
/// certificate for it); failures are logged.
pub fn spawn_http(
    router: axum::Router,
    security: &Security,
    listener: TcpListener,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<()> {
    let stop = shutdown.wait();
    let tls = security.http_tls.clone();
    tokio::spawn(async move {
        let served = match tls {
            Some(tls) => match TlsListener::new(listener, &tls) {
                Ok(l) => axum::serve(l, router).with_graceful_shutdown(stop).await,
                Err(e) => Err(e),
            },
            None => serve_http(router, listener, stop).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    })
}

/// Whether a node is ready to serve (`/readyz`).
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the node ready or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    /// Whether the node is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The HTTP routes every node has: `/healthz` (alive) and `/readyz` (ready).
pub fn base_http_routes(ready: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move {
                    if ready.get() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
}

/// A `/metrics` route rendering `render()` in the Prometheus text format,
/// to callers `access` admits.
pub fn metrics_route(
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    access: HttpAccess,
) -> axum::Router {
    access.guard(axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    ))
}

/// Serves HTTP on `listener` until `shutdown`.
pub async fn serve_http(
    router: axum::Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Waits for `task` at most `deadline` after shutdown began, then gives up
/// on it (connections still open are dropped when the process exits).
pub async fn drain<T>(task: tokio::task::JoinHandle<T>, deadline: Duration) -> Option<T> {
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "server task failed while draining");
            None
        }
        Err(_) => {
            tracing::warn!(
                deadline_ms = deadline.as_millis() as u64,
                "drain deadline passed; closing remaining connections"
            );
            None
        }
    }
}

/// Caps glibc's malloc at two arenas. With the default (eight per core),
/// memory freed after applying a large change stays spread over many
/// arenas and resident memory ends up far above what the node holds
/// (measured: 104 MiB instead of 75 MiB for a PoP with 10,000 flags). Call
/// first thing in `main`, before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists, so nothing races with it.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Runs a node binary's body on a multi-threaded runtime, after capping
/// malloc arenas; an error exits non-zero with one line `PROGRAM: error`.
pub fn run_main<F, E>(program: &str, body: F)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(body) {
        eprintln!("{program}: {e:#}");
        std::process::exit(1);
    }
}
