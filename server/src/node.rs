//! One builder assembles every server: it binds the listeners first (so
//! the real addresses are known before anything is served), takes the
//! node's gRPC services with their access policies, its HTTP routes and
//! metric collectors, and adds what every server has: gRPC health and
//! reflection, `/healthz`, `/readyz`, `/metrics`, TLS with certificate
//! reload, and the access layer. Every task of the node (servers, watchers,
//! the node's own loops) runs on one [`TaskTracker`] and stops on one
//! [`CancellationToken`], so a stop drains everything under one deadline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use axum::serve::ListenerExt as _;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::AuthLayer;
use crate::policy::{AccessPolicy, MethodPolicy, Requirement, ServicePolicy};
use crate::security::Security;
use crate::tls::TlsListener;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Reflection could not read a descriptor set.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The HTTP/JSON gateway could not be built.
    #[error(transparent)]
    Gateway(#[from] crate::json_gateway::GatewayError),
}

/// Whether a node is ready to serve (`/readyz`), and a detail an operator
/// should see either way (a history conflict, say).
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    detail: Arc<std::sync::Mutex<String>>,
}

impl Readiness {
    /// Marks the node ready or not.
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Sets the detail `/readyz` shows (empty: none).
    pub fn set_detail(&self, detail: String) {
        *self.detail.lock().unwrap_or_else(|p| p.into_inner()) = detail;
    }

    /// Whether the node is ready.
    pub fn get(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// What `/readyz` answers: its status and body.
    fn answer(&self) -> (StatusCode, String) {
        let detail = self
            .detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (status, word) = if self.get() {
            (StatusCode::OK, "ready")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready")
        };
        if detail.is_empty() {
            (status, format!("{word}\n"))
        } else {
            (status, format!("{word}; {detail}\n"))
        }
    }
}

/// Binds a TCP listener.
async fn bind(addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { addr, source })
}

/// The services of a gRPC router with their access policies.
pub struct Services {
    routes: tonic::service::Routes,
    policy: AccessPolicy,
    names: Vec<String>,
}

/// Builds a node's HTTP/JSON gateway routes from its gRPC stack. The
/// builder holds this instead of calling [`crate::json_gateway::routes`]
/// itself, so only the binaries that serve a gateway (control) link the
/// gateway and its protobuf reflection; a PoP's and a hub's code stay
/// without them.
type GatewayRoutes = Box<
    dyn FnOnce(
            crate::json_gateway::GrpcService,
        ) -> Result<axum::Router, crate::json_gateway::GatewayError>
        + Send,
>;

/// Assembles a node; see the module documentation.
pub struct NodeBuilder {
    security: Security,
    drain: Duration,
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    http: Option<TcpListener>,
    http_addr: Option<SocketAddr>,
    services: Option<Services>,
    http_routes: axum::Router,
    json_gateway: Option<GatewayRoutes>,
    registry: Registry,
    readiness: Readiness,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl NodeBuilder {
    /// Binds the gRPC listener and, if asked for, the HTTP one. A stop
    /// waits at most `drain` for everything the node runs.
    pub async fn bind(
        grpc: SocketAddr,
        http: Option<SocketAddr>,
        security: Security,
        drain: Duration,
    ) -> Result<Self, NodeError> {
        let grpc_listener = bind(grpc).await?;
        let http_listener = match http {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let local = |l: &TcpListener, asked: SocketAddr| {
            l.local_addr().map_err(|source| NodeError::Bind {
                addr: asked,
                source,
            })
        };
        let grpc_addr = local(&grpc_listener, grpc)?;
        let http_addr = match (&http_listener, http) {
            (Some(l), Some(asked)) => Some(local(l, asked)?),
            _ => None,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(crate::metrics::TlsMetrics(
            security
                .tls_listeners()
                .map(|(name, tls)| (name, tls.clone()))
                .collect(),
        )));
        Ok(Self {
            security,
            drain,
            grpc: grpc_listener,
            grpc_addr,
            http: http_listener,
            http_addr,
            services: None,
            http_routes: axum::Router::new(),
            json_gateway: None,
            registry,
            readiness: Readiness::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address, if any.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// What the node enforces on callers.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// Cancelled when the node stops: the node's own loops end on it.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Where the node's own tasks run, so a stop waits for them too.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// `/readyz`: not ready until the node says so.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// The registry `/metrics` serves; the node adds its collectors.
    pub fn metrics(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Adds a gRPC service; `policy` says what each of its methods asks of
    /// callers, and the service is reported serving by gRPC health.
    pub fn service<S>(mut self, service: S, policy: ServicePolicy) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let services = match self.services.take() {
            Some(mut s) => {
                s.routes = s.routes.add_service(service);
                s
            }
            None => Services {
                routes: tonic::service::Routes::new(service),
                policy: AccessPolicy::default(),
                names: Vec::new(),
            },
        };
        let mut services = services;
        services.names.push(policy.name().to_owned());
        services.policy.add(policy);
        self.services = Some(services);
        self
    }

    /// Adds HTTP routes (served only when the node has an HTTP listener).
    pub fn http_routes(mut self, router: axum::Router) -> Self {
        self.http_routes = self.http_routes.merge(router);
        self
    }

    /// Serves the unary methods of `services` over HTTP with JSON under
    /// `prefix` (see [`crate::json_gateway`]), through the same access
    /// layer as gRPC.
    pub fn json_gateway(mut self, prefix: &str, services: &[&'static str]) -> Self {
        let (prefix, services) = (prefix.to_owned(), services.to_vec());
        self.json_gateway = Some(Box::new(move |grpc| {
            crate::json_gateway::routes(
                &prefix,
                grpc,
                flagmesh_proto::FILE_DESCRIPTOR_SET,
                &services,
            )
        }));
        self
    }

    /// Starts serving: gRPC (with health and reflection), HTTP (with
    /// `/healthz`, `/readyz` and `/metrics`), and the TLS watchers.
    pub fn start(self) -> Result<RunningNode, NodeError> {
        let Self {
            security,
            drain,
            grpc,
            grpc_addr,
            http,
            http_addr,
            services,
            mut http_routes,
            json_gateway,
            registry,
            readiness,
            stop,
            tasks,
        } = self;
        let Services {
            routes,
            mut policy,
            names,
        } = services.unwrap_or_else(|| Services {
            routes: tonic::service::Routes::default(),
            policy: AccessPolicy::default(),
            names: Vec::new(),
        });
        let routes = with_health_and_reflection(routes, &names, &mut policy)?;
        security.spawn_tls_watchers(&tasks, &stop);
        let layer = AuthLayer::new(&security, policy.shared());
        if let Some(gateway) = json_gateway {
            let grpc = tower::ServiceBuilder::new()
                .layer(layer.clone())
                .service(routes.clone());
            http_routes = http_routes.merge(gateway(tower::util::BoxCloneSyncService::new(grpc))?);
        }
        let (grpc_security, grpc_stop) = (security.clone(), stop.clone());
        tasks.spawn(async move {
            if let Err(e) = serve_grpc(routes, &grpc_security, layer, grpc, grpc_stop).await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        if let Some(listener) = http {
            let router = base_routes(readiness)
                .merge(crate::metrics::route(
                    Arc::new(registry),
                    security.metrics_access(),
                ))
                .merge(http_routes);
            let (tls, http_stop) = (security.http_tls.clone(), stop.clone());
            tasks.spawn(async move {
                let stopped = http_stop.cancelled_owned();
                let served = match tls {
                    Some(tls) => match TlsListener::new(listener, &tls) {
                        Ok(l) => axum::serve(l, router).with_graceful_shutdown(stopped).await,
                        Err(e) => Err(e),
                    },
                    None => {
                        // replies go out at once, not after the peer's ACK
                        let listener = listener.tap_io(|tcp| {
                            let _ = tcp.set_nodelay(true);
                        });
                        axum::serve(listener, router)
                            .with_graceful_shutdown(stopped)
                            .await
                    }
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            });
        }
        Ok(RunningNode {
            grpc_addr,
            http_addr,
            stop,
            tasks,
            drain,
        })
    }
}

/// gRPC health (every listed service reported serving) and reflection over
/// every flagmesh and flagd descriptor, added to `routes` and, as public
/// methods, to `policy`.
fn with_health_and_reflection(
    routes: tonic::service::Routes,
    services: &[String],
    policy: &mut AccessPolicy,
) -> Result<tonic::service::Routes, NodeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in services {
        let reporter = reporter.clone();
        let name = name.clone();
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
    for public in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        policy.add(ServicePolicy::new(
            public,
            MethodPolicy::unary(Requirement::Public),
        ));
    }
    Ok(routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// Serves gRPC on `listener` until `stop`, behind the access layer, over
/// TLS when `security` has a certificate for it.
async fn serve_grpc(
    routes: tonic::service::Routes,
    security: &Security,
    layer: AuthLayer,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let mut server = tonic::transport::Server::builder()
        // detect dead peers on long-lived streams
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(security.limits.max_concurrent_streams_per_connection))
        // every call is checked against the node's access policy and limits
        .layer(layer);
    let router = server.add_routes(routes);
    let stopped = stop.cancelled_owned();
    match &security.grpc_tls {
        Some(tls) => {
            let incoming = ReceiverStream::new(tls.incoming(listener))
                .map(|(stream, _peer)| Ok::<_, std::io::Error>(stream));
            router.serve_with_incoming_shutdown(incoming, stopped).await
        }
        None => {
            // the builder's tcp_nodelay covers only listeners tonic binds
            // itself: without it, a reply larger than a segment waits for
            // the peer's delayed ACK (about 40 ms)
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, stopped).await
        }
    }
}

/// The HTTP routes every node has: `/healthz` (alive) and `/readyz` (ready,
/// or 503; with the node's detail, if any).
fn base_routes(ready: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move { ready.answer() }
            }),
        )
}

/// A node that is serving.
#[derive(Debug)]
pub struct RunningNode {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    stop: CancellationToken,
    tasks: TaskTracker,
    drain: Duration,
}

impl RunningNode {
    /// Cancelled when the node stops.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops accepting, ends every stream and loop, and waits for all of
    /// the node's tasks at most the drain deadline, in all. `true` when
    /// everything ended in time; what is still running after the deadline
    /// is left to end with the process.
    pub async fn stop(self) -> bool {
        self.stop.cancel();
        self.tasks.close();
        let drained = tokio::time::timeout(self.drain, self.tasks.wait())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                deadline_ms = self.drain.as_millis() as u64,
                open = self.tasks.len(),
                "drain deadline passed; closing remaining connections"
            );
        }
        drained
    }
}
