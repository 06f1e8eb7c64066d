//! Assembles a control-plane node with the shared node builder: store,
//! fan-out, the Admin and Sync services with their access policies, the
//! Admin API as JSON, the web console, the propagation API, and the
//! control plane's metrics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flagmesh_mesh::metrics::FanoutMetrics;
use flagmesh_mesh::sync_service::SyncService;
use flagmesh_mesh::{Fanout, FanoutConfig, Head};
use flagmesh_proto::v1::admin_server::AdminServer;
use flagmesh_server::http_access::HttpAccess;
use flagmesh_server::{
    MethodPolicy, NodeBuilder, Requirement, RunningNode, Security, ServicePolicy,
};
use prometheus_client::encoding::DescriptorEncoder;

use crate::admin::AdminService;
use crate::postgres::PgStore;
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
    /// How long a stop waits, in all, for connections and tasks.
    pub drain: Duration,
    /// Largest Admin request, in bytes.
    pub max_message_bytes: usize,
    /// Flags one flag set may hold.
    pub max_flags_per_set: usize,
    /// Create a new store (a new history) when `data_dir` (or the
    /// database) holds none.
    pub init: bool,
    /// Keep the state in this PostgreSQL database (several instances may
    /// share it) instead of sled in `data_dir`.
    pub database_url: Option<String>,
    /// The propagation view forgets nodes silent this long (0: never).
    pub forget_nodes_after_ms: i64,
}

impl ControlConfig {
    /// The defaults of everything but where it listens and stores.
    pub fn new(listen: SocketAddr, http_listen: Option<SocketAddr>, data_dir: PathBuf) -> Self {
        Self {
            listen,
            http_listen,
            data_dir,
            retain_revisions: 10_000,
            fanout: FanoutConfig::default(),
            drain: Duration::from_secs(5),
            max_message_bytes: 16 << 20,
            max_flags_per_set: 10_000,
            init: false,
            database_url: None,
            forget_nodes_after_ms: crate::propagation::FORGET_AFTER_MS,
        }
    }
}

/// What the control plane's services ask of callers: reading needs a read
/// credential, changing a write one, anything else (deleting a flag set)
/// an admin; every Admin call is rate limited per credential. Sync is for
/// mesh nodes.
pub fn policies() -> [ServicePolicy; 2] {
    let read = MethodPolicy::unary(Requirement::Read).rate_limited();
    let write = MethodPolicy::unary(Requirement::Write).rate_limited();
    [
        ServicePolicy::new(
            "flagmesh.v1.Admin",
            MethodPolicy::unary(Requirement::Admin).rate_limited(),
        )
        .methods(
            &[
                "GetFlag",
                "ListFlags",
                "ListFlagSets",
                "ExportFlagSet",
                "ListHistory",
                "GetRevision",
                "GetPropagation",
                "PreviewEvaluation",
                "WhoAmI",
            ],
            read,
        )
        .methods(
            &[
                "CreateFlag",
                "UpdateFlag",
                "DeleteFlag",
                "ApplyFlagSet",
                "Revert",
            ],
            write,
        ),
        ServicePolicy::new("flagmesh.v1.Sync", MethodPolicy::stream(Requirement::Mesh)),
    ]
}

/// A running control node.
pub struct RunningControl {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// The store.
    pub store: Arc<dyn FlagStore>,
    node: RunningNode,
}

impl RunningControl {
    /// Stops accepting, then drains everything under one deadline; `true`
    /// when everything ended in time.
    pub async fn stop(self) -> bool {
        self.node.stop().await
    }
}

/// Opens the store, binds the listeners and starts serving.
pub async fn start(
    config: ControlConfig,
    security: impl Into<Security>,
) -> anyhow::Result<RunningControl> {
    let store: Arc<dyn FlagStore> = match &config.database_url {
        Some(url) => Arc::new(
            PgStore::open(url, config.retain_revisions, config.init)
                .context("opening the store in PostgreSQL")?,
        ),
        None => Arc::new(
            SledStore::open(&config.data_dir, config.retain_revisions, config.init)
                .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
        ),
    };
    let head = store.head()?;
    tracing::info!(revision = head.revision, history_id = %head.history_id, "store opened");
    let mut node = NodeBuilder::bind(
        config.listen,
        config.http_listen,
        security.into(),
        config.drain,
    )
    .await?;
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
            digest: Some(head.digest),
        },
        fanout_config,
        node.stop_token(),
    );
    // commits reach the fan-out in revision order: from inside the store
    // (sled), or from the database's change log (PostgreSQL)
    let publish = fanout.clone();
    store.publish_to(
        Box::new(move |delta| publish.publish(delta.clone())),
        &node.stop_token(),
    )?;
    // what a burst (a large apply, a storm of snapshots) allocated goes
    // back to the system once control is quiet again
    let quiet = fanout.clone();
    flagmesh_server::process::release_memory_when_quiet(
        move || quiet.activity(),
        node.tasks(),
        node.stop_token(),
    );
    let propagation = Arc::new(Propagation::new(config.forget_nodes_after_ms));
    // ready while the store can serve writes; /readyz says what is wrong
    let (ready, watched, stop) = (node.readiness(), store.clone(), node.stop_token());
    ready.set(true);
    node.tasks().spawn(async move {
        loop {
            let store = watched.clone();
            let health = tokio::task::spawn_blocking(move || store.health()).await;
            match health {
                Ok(Ok(())) => {
                    ready.set(true);
                    ready.set_detail(String::new());
                }
                Ok(Err(e)) => {
                    ready.set(false);
                    ready.set_detail(format!("{e}; fan-out and reads from memory go on"));
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    node.metrics().register_collector(Box::new(ControlMetrics {
        store: store.clone(),
        propagation: propagation.clone(),
    }));
    node.metrics()
        .register_collector(Box::new(FanoutMetrics(fanout.clone())));
    let http = http_routes(store.clone(), propagation.clone(), node.security());
    let [admin, sync] = policies();
    let node = node
        .service(
            AdminServer::new(AdminService::new(
                store.clone(),
                propagation.clone(),
                config.max_flags_per_set,
            ))
            .max_decoding_message_size(config.max_message_bytes),
            admin,
        )
        .service(SyncService::server(fanout, propagation), sync)
        .http_routes(http)
        .json_gateway("/api", &["flagmesh.v1.Admin"])
        .start()?;
    Ok(RunningControl {
        grpc_addr: node.grpc_addr,
        http_addr: node.http_addr,
        store,
        node,
    })
}

/// The control plane's own metrics: its head, its change log's window and
/// the propagation view.
struct ControlMetrics {
    store: Arc<dyn FlagStore>,
    propagation: Arc<Propagation>,
}

impl std::fmt::Debug for ControlMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlMetrics")
    }
}

impl prometheus_client::collector::Collector for ControlMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let Ok(head) = self.store.head() else {
            return Ok(());
        };
        flagmesh_mesh::metrics::gauge(
            &mut e,
            "flagmesh_control_revision",
            "The newest committed revision.",
            head.revision as f64,
        )?;
        flagmesh_mesh::metrics::gauge(
            &mut e,
            "flagmesh_control_oldest_revision",
            "The oldest revision the change log holds.",
            (head.compacted_through + 1) as f64,
        )?;
        crate::propagation::encode_metrics(
            &mut e,
            &self.propagation.view(head.revision, 20),
            self.propagation.rejected_reports(),
        )
    }
}

/// Control's own HTTP routes: the console (see [`crate::console`]) and
/// the propagation view's data at `/api/propagation` (the node adds the
/// Admin API as JSON under `/api`, and `/healthz`, `/readyz`, `/metrics`).
fn http_routes(
    store: Arc<dyn FlagStore>,
    propagation: Arc<Propagation>,
    security: &Security,
) -> axum::Router {
    let access = HttpAccess {
        auth: security.auth.clone(),
        requirement: Requirement::Read,
    };
    let api = axum::routing::get(move || {
        let (store, propagation) = (store.clone(), propagation.clone());
        async move {
            let head = store.head().map(|h| h.revision).unwrap_or(0);
            axum::Json(flagmesh_proto::view::view_json(&propagation.view(head, 30)))
        }
    });
    crate::console::routes().merge(access.guard(axum::Router::new().route("/api/propagation", api)))
}
