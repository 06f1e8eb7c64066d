//! Assembles a PoP: replica (loaded from sled at once), in-memory state,
//! relay (subscriber, fan-out, reports), and the gRPC and HTTP servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use flagmesh_mesh::auth::{Requirement, Security, common_requirement};
use flagmesh_mesh::compiled::StateSwap;
use flagmesh_mesh::relay::{Relay, RelayConfig};
use flagmesh_mesh::replica::ReplicaStore;
use flagmesh_mesh::serve::{self, Readiness, Shutdown};
use flagmesh_mesh::sync_service::SyncService;
use flagmesh_proto::v1::evaluation_server::EvaluationServer;
use tokio::sync::watch;

use crate::evaluation::{EvalContext, EvaluationService};
use crate::flagd::Flagd;
use crate::state::PopState;
use flagmesh_proto::flagd::evaluation::{v1 as flagd_v1, v2 as flagd_v2};
use flagmesh_proto::flagd::sync::v1 as flagd_sync;

/// What a PoP needs to start.
#[derive(Debug, Clone)]
pub struct PopConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP listen address, if any.
    pub http_listen: Option<SocketAddr>,
    /// Following, fan-out and storage.
    pub relay: RelayConfig,
    /// The flag set of requests that name none.
    pub default_flag_set: String,
    /// How long shutdown waits for connections.
    pub drain: Duration,
}

/// The PoP's access policy.
pub fn requirement(path: &str) -> Requirement {
    // SDKs in local mode follow a PoP with an evaluation key (scoped keys
    // follow only their flag sets); reports stay for mesh nodes
    if path == "/flagmesh.v1.Sync/Subscribe" {
        return Requirement::Evaluate;
    }
    if let Some(r) = common_requirement(path) {
        return r;
    }
    if path.starts_with("/flagmesh.v1.Evaluation/")
        || path.starts_with("/flagd.evaluation.")
        || path.starts_with("/flagd.sync.")
    {
        return Requirement::Evaluate;
    }
    Requirement::Admin
}

/// A running PoP.
pub struct RunningPop {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// Triggers shutdown.
    pub shutdown: Shutdown,
    /// The relay.
    pub relay: Relay,
    /// The in-memory state.
    pub state: Arc<ArcSwap<PopState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    drain: Duration,
}

impl RunningPop {
    /// Stops accepting, then drains.
    pub async fn stop(self) {
        self.shutdown.trigger();
        for t in self.tasks.into_iter().chain(self.relay.tasks) {
            serve::drain(t, self.drain).await;
        }
    }
}

/// Loads the replica, binds, serves at once, and starts following.
pub async fn start(config: PopConfig, security: impl Into<Security>) -> anyhow::Result<RunningPop> {
    let security: Security = security.into();
    let (replica, loaded) =
        ReplicaStore::open_with_state(&config.relay.data_dir, config.relay.sync_writes)
            .with_context(|| {
                format!("opening the replica in {}", config.relay.data_dir.display())
            })?;
    let replica = Arc::new(replica);
    let state = Arc::new(ArcSwap::from_pointee(PopState::from_snapshot(&loaded)));
    tracing::info!(
        revision = loaded.revision,
        flags = loaded.flags.len(),
        "state loaded from sled"
    );
    let (changes_tx, changes_rx) = watch::channel(loaded.revision);

    let serve::Listeners {
        grpc,
        grpc_addr,
        http,
        http_addr,
    } = serve::bind_listeners(config.listen, config.http_listen).await?;
    let shutdown = Shutdown::new();
    let observer = Arc::new(StateSwap {
        state: state.clone(),
        changes: changes_tx,
    });
    let relay = Relay::start(
        config.relay.clone(),
        replica,
        Some(observer),
        shutdown.clone(),
    )?;
    let eval = EvalContext {
        state: state.clone(),
        changes: changes_rx,
        status: relay.status.clone(),
        pop_id: config.relay.subscriber.node_id.clone(),
        default_flag_set: config.default_flag_set.clone(),
        stats: Arc::new(crate::stats::EvalStats::default()),
    };

    let flagd = Flagd::new(eval.clone());
    let routes =
        tonic::service::Routes::new(EvaluationServer::new(EvaluationService::new(eval.clone())))
            .add_service(SyncService::server(
                relay.fanout.clone(),
                relay.reporter.clone(),
            ))
            .add_service(flagd_v1::service_server::ServiceServer::new(flagd.clone()))
            .add_service(flagd_v2::service_server::ServiceServer::new(flagd.clone()))
            .add_service(flagd_sync::flag_sync_service_server::FlagSyncServiceServer::new(flagd));
    let routes = serve::with_health_and_reflection(
        routes,
        &[
            "flagmesh.v1.Evaluation",
            "flagmesh.v1.Sync",
            "flagd.evaluation.v1.Service",
            "flagd.evaluation.v2.Service",
            "flagd.sync.v1.FlagSyncService",
        ],
    )?;
    let mut tasks = serve::start_grpc(routes, &security, Arc::new(requirement), grpc, &shutdown);
    if let Some(listener) = http {
        let ready = Readiness::default();
        ready.set(state.load().revision > 0);
        let (ready2, mut changes, state2) = (ready.clone(), eval.changes.clone(), state.clone());
        tasks.push(tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                ready2.set(state2.load().revision > 0);
            }
        }));
        let stats = eval.stats.clone();
        let extra: flagmesh_mesh::metrics::ExtraMetrics = Arc::new(move |e| stats.render(e));
        let router =
            flagmesh_mesh::metrics::relay_router(ready, relay.view(), Some(extra), &security)
                .merge(crate::ofrep::router(eval.clone(), security.auth.clone()));
        tasks.push(serve::spawn_http(router, &security, listener, &shutdown));
    }
    Ok(RunningPop {
        grpc_addr,
        http_addr,
        shutdown,
        relay,
        state,
        tasks,
        drain: config.drain,
    })
}
