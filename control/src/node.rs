//! Assembles a control-plane node: store, fan-out, Admin and Sync services
//! behind the auth layer, health and reflection, the HTTP listener, and
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flagmesh_mesh::auth::{HttpAccess, Requirement, Security, common_requirement};
use flagmesh_mesh::serve::{self, Readiness, Shutdown};
use flagmesh_mesh::sync_service::SyncService;
use flagmesh_mesh::{Fanout, FanoutConfig, Head};
use flagmesh_proto::v1::admin_server::AdminServer;

use crate::admin::AdminService;
use crate::propagation::Propagation;
use crate::store::{FlagStore, SledStore, StoreSource};

/// What a control node needs to start.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP listen address, if any.
    pub http_listen: Option<SocketAddr>,
    /// The store's folder.
    pub data_dir: PathBuf,
    /// How many revisions of deltas the change log keeps.
    pub retain_revisions: u64,
    /// Fan-out tuning (heartbeat, ring, cut-off deadline).
    pub fanout: FanoutConfig,
    /// How long shutdown waits for connections to finish.
    pub drain: Duration,
}

/// The access policy of the control plane's methods.
pub fn requirement(path: &str) -> Requirement {
    if let Some(r) = common_requirement(path) {
        return r;
    }
    let Some(method) = path.strip_prefix("/flagmesh.v1.Admin/") else {
        return Requirement::Admin;
    };
    match method {
        "GetFlag" | "ListFlags" | "ListFlagSets" | "ExportFlagSet" | "ListHistory"
        | "GetRevision" | "GetPropagation" => Requirement::Read,
        "CreateFlag" | "UpdateFlag" | "DeleteFlag" | "ApplyFlagSet" => Requirement::Write,
        _ => Requirement::Admin,
    }
}

/// A running control node.
pub struct RunningControl {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// Triggers shutdown.
    pub shutdown: Shutdown,
    /// The store.
    pub store: Arc<SledStore>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    drain: Duration,
}

impl RunningControl {
    /// Stops accepting, then waits for connections at most the drain deadline.
    pub async fn stop(self) {
        self.shutdown.trigger();
        for t in self.tasks {
            serve::drain(t, self.drain).await;
        }
    }
}

/// Opens the store, binds the listeners and starts serving.
pub async fn start(
    config: ControlConfig,
    security: impl Into<Security>,
) -> anyhow::Result<RunningControl> {
    let security: Security = security.into();
    let store = Arc::new(
        SledStore::open(&config.data_dir, config.retain_revisions)
            .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
    );
    let head = store.head()?;
    tracing::info!(revision = head.revision, history_id = %head.history_id, "store opened");
    let shutdown = Shutdown::new();
    // the ring never holds more than the change log retains, so "compacted"
    // means the same thing to every subscriber
    let retain = usize::try_from(config.retain_revisions)
        .unwrap_or(usize::MAX)
        .max(1);
    let fanout_config = FanoutConfig {
        ring_revisions: config.fanout.ring_revisions.min(retain),
        ..config.fanout.clone()
    };
    let fanout = Fanout::new(
        Arc::new(StoreSource(store.clone())),
        Head {
            history_id: head.history_id.as_str().into(),
            revision: head.revision,
            upstream_connected: true,
        },
        fanout_config,
        shutdown.clone(),
    );
    let propagation = Arc::new(Propagation::default());

    let serve::Listeners {
        grpc,
        grpc_addr,
        http,
        http_addr,
    } = serve::bind_listeners(config.listen, config.http_listen).await?;

    let routes = tonic::service::Routes::new(
        AdminServer::new(AdminService::new(
            store.clone(),
            fanout.clone(),
            propagation.clone(),
            security.limits.max_flags_per_set,
        ))
        .max_decoding_message_size(security.limits.max_message_bytes),
    )
    .add_service(SyncService::server(fanout.clone(), propagation.clone()));
    let routes =
        serve::with_health_and_reflection(routes, &["flagmesh.v1.Admin", "flagmesh.v1.Sync"])?;
    let mut tasks = serve::start_grpc(routes, &security, Arc::new(requirement), grpc, &shutdown);
    let ready = Readiness::default();
    ready.set(true);
    if let Some(listener) = http {
        let router = http_routes(
            ready,
            store.clone(),
            fanout.clone(),
            propagation.clone(),
            &security,
        );
        tasks.push(serve::spawn_http(router, &security, listener, &shutdown));
    }
    Ok(RunningControl {
        grpc_addr,
        http_addr,
        shutdown,
        store,
        tasks,
        drain: config.drain,
    })
}

/// The propagation page: one self-contained HTML page (no build step) that
/// polls `api/propagation` every second.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// Control's HTTP routes: `/healthz`, `/readyz`, `/metrics`, the status
/// page at `/`, and its data at `/api/propagation`.
fn http_routes(
    ready: Readiness,
    store: Arc<SledStore>,
    fanout: Arc<Fanout>,
    propagation: Arc<Propagation>,
    security: &Security,
) -> axum::Router {
    let (store2, propagation2, security2) = (store.clone(), propagation.clone(), security.clone());
    let render = Arc::new(move || {
        let mut e = flagmesh_mesh::metrics::Exposition::default();
        if let Ok(head) = store2.head() {
            e.single(
                "flagmesh_control_revision",
                "gauge",
                "The newest committed revision.",
                head.revision as f64,
            )
            .single(
                "flagmesh_control_oldest_revision",
                "gauge",
                "The oldest revision the change log holds.",
                (head.compacted_through + 1) as f64,
            );
            crate::propagation::render_metrics(&mut e, &propagation2.view(head.revision, 20));
        }
        flagmesh_mesh::metrics::fanout(&mut e, &fanout);
        flagmesh_mesh::metrics::tls(&mut e, &security2);
        e.finish()
    });
    // the page itself holds no data; what it shows needs a read credential
    // (the page sends the token given in its address: `/#token=...`)
    let access = HttpAccess {
        auth: security.auth.clone(),
        requirement: Requirement::Read,
    };
    let api = axum::routing::get(move || {
        let (store, propagation) = (store.clone(), propagation.clone());
        async move {
            let head = store.head().map(|h| h.revision).unwrap_or(0);
            axum::Json(crate::propagation::view_json(&propagation.view(head, 30)))
        }
    });
    serve::base_http_routes(ready)
        .merge(serve::metrics_route(render, security.metrics_access()))
        .route(
            "/",
            axum::routing::get(|| async { axum::response::Html(STATUS_PAGE) }),
        )
        .merge(access.guard(axum::Router::new().route("/api/propagation", api)))
}
