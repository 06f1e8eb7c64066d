//! Assembles a PoP: replica (loaded from sled at once), in-memory state,
//! relay (subscriber, fan-out, reports), and the gRPC and HTTP servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use flagmesh_mesh::compiled::StateSwap;
use flagmesh_mesh::metrics::RelayMetrics;
use flagmesh_mesh::relay::{Relay, RelayConfig};
use flagmesh_mesh::replica::ReplicaStore;
use flagmesh_mesh::sync_service::SyncService;
use flagmesh_mesh::tier::{Tier, TierMetrics};
use flagmesh_proto::encoded::evaluation_server::EvaluationServer;
use flagmesh_server::{
    MethodPolicy, NodeBuilder, Requirement, RunningNode, Security, ServicePolicy,
};
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
    /// Origins whose browser pages may call OFREP (`*`: any; empty: none).
    pub cors_allowed_origins: Vec<String>,
    /// How long shutdown waits for connections.
    pub drain: Duration,
    /// Memory for compiled flags, in bytes (`None`: every flag used stays
    /// compiled). Definitions stay in sled either way.
    pub memory_budget: Option<usize>,
    /// Flags compiled at start and never dropped, as (set, key).
    pub hot_flags: Vec<(String, String)>,
}

/// The default memory budget of compiled flags: 10,000 flags of the
/// benchmark's kind fit in it with room to spare.
pub const DEFAULT_MEMORY_BUDGET: usize = 32 << 20;

/// How often the flags held compiled are recorded for the next start.
const SAVE_RESIDENT_EVERY: Duration = Duration::from_secs(30);

/// What the PoP's services ask of callers: evaluation keys (scoped ones
/// only to their flag sets) evaluate and follow; reports are for mesh
/// nodes. The event and sync streams count against the per-client limit.
pub fn policies() -> [ServicePolicy; 5] {
    let evaluate = MethodPolicy::unary(Requirement::Evaluate);
    let stream = MethodPolicy::stream(Requirement::Evaluate);
    [
        ServicePolicy::new("flagmesh.v1.Evaluation", evaluate).method("Watch", stream),
        // SDKs in local mode follow a PoP with an evaluation key
        ServicePolicy::new("flagmesh.v1.Sync", stream)
            .method("Report", MethodPolicy::stream(Requirement::Mesh)),
        ServicePolicy::new("flagd.evaluation.v1.Service", evaluate).method("EventStream", stream),
        ServicePolicy::new("flagd.evaluation.v2.Service", evaluate).method("EventStream", stream),
        ServicePolicy::new("flagd.sync.v1.FlagSyncService", evaluate).method("SyncFlags", stream),
    ]
}

/// A running PoP.
pub struct RunningPop {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// The relay.
    pub relay: Relay,
    /// The in-memory state.
    pub state: Arc<ArcSwap<PopState>>,
    tier: Arc<Tier>,
    node: RunningNode,
}

impl RunningPop {
    /// Stops accepting, then drains everything under one deadline; `true`
    /// when everything ended in time.
    pub async fn stop(self) -> bool {
        let drained = self.node.stop().await;
        // states handed out may outlive the PoP; its store must not
        self.tier.close();
        drained
    }
}

/// Compiles the hot flags and those held compiled before the last stop
/// (while the budget has room), off the serving threads, then records
/// which flags are held every [`SAVE_RESIDENT_EVERY`] and at stop.
fn warm(
    state: &Arc<ArcSwap<PopState>>,
    tier: &Arc<Tier>,
    tasks: &tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) {
    let (state, tier) = (state.clone(), tier.clone());
    tasks.spawn(async move {
        let warming = tier.clone();
        let warmed = tokio::task::spawn_blocking(move || {
            let (state, tier) = (state.load(), warming);
            let mut warmed = 0usize;
            for (set, key) in tier.warm_list() {
                if !tier.has_room() && !tier.is_hot(&set, &key) {
                    continue;
                }
                if let Some(f) = state.sets.get(&set).and_then(|s| s.flags.get(key.as_str())) {
                    f.compiled();
                    warmed += 1;
                }
            }
            warmed
        })
        .await
        .unwrap_or(0);
        tracing::info!(warmed, "flags compiled ahead of use");
        let save = |tier: &Tier| {
            if let Err(e) = tier.save_resident() {
                tracing::warn!(error = %e, "recording the flags held compiled failed");
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(SAVE_RESIDENT_EVERY) => save(&tier),
            }
        }
        save(&tier);
    });
}

/// Loads the replica, binds, serves at once, and starts following.
pub async fn start(config: PopConfig, security: impl Into<Security>) -> anyhow::Result<RunningPop> {
    let (replica, loaded) = ReplicaStore::open_scoped_without_definitions(
        &config.relay.data_dir,
        config.relay.sync_writes,
        &config.relay.subscriber.flag_sets,
    )
    .with_context(|| format!("opening the replica in {}", config.relay.data_dir.display()))?;
    let replica = Arc::new(replica);
    // definitions stay in sled (read from it on first use, so opening
    // reads none into memory); compiled flags are held up to the budget
    let tier = Arc::new(Tier::new(
        Some(replica.tree()),
        config.memory_budget,
        config.hot_flags.clone(),
    ));
    let state = Arc::new(ArcSwap::from_pointee(PopState::from_snapshot_in(
        &loaded,
        tier.clone(),
    )));
    drop(loaded);
    let revision = state.load().revision;
    tracing::info!(
        revision,
        flags = replica.flag_count(),
        "state loaded from sled"
    );
    let (changes_tx, changes_rx) = watch::channel(revision);

    let mut node = NodeBuilder::bind(
        config.listen,
        config.http_listen,
        security.into(),
        config.drain,
    )
    .await?;
    let observer = Arc::new(StateSwap {
        state: state.clone(),
        changes: changes_tx,
    });
    let relay = Relay::start(
        config.relay.clone(),
        replica,
        Some(observer),
        &node.stop_token(),
        node.tasks(),
    )?;
    // what applying a change, compiling flags or serving snapshots to
    // local-mode SDKs allocated for a moment goes back to the system once
    // the PoP is quiet again
    let (revision, fanout) = (changes_rx.clone(), relay.fanout.clone());
    flagmesh_server::process::release_memory_when_quiet(
        move || {
            *revision.borrow()
                ^ flagmesh_mesh::compiled::compilations().rotate_left(32)
                ^ fanout.activity().rotate_left(3)
        },
        node.tasks(),
        node.stop_token(),
    );
    let eval = EvalContext {
        state: state.clone(),
        changes: changes_rx,
        status: relay.status.clone(),
        pop_id: config.relay.subscriber.node_id.clone(),
        default_flag_set: config.default_flag_set.clone(),
        stats: Arc::new(crate::stats::EvalStats::default()),
    };

    // ready once it holds a state; a history conflict shows in /readyz
    let ready = node.readiness();
    relay.watch_readiness(move |has_state, detail| {
        ready.set(has_state);
        ready.set_detail(detail);
    });
    node.metrics()
        .register_collector(Box::new(RelayMetrics(relay.view())));
    node.metrics()
        .register_collector(Box::new(eval.stats.clone()));
    node.metrics()
        .register_collector(Box::new(TierMetrics(tier.clone())));
    warm(&state, &tier, node.tasks(), node.stop_token());
    let ofrep = crate::ofrep::router(eval.clone(), node.security().auth.clone());
    let ofrep =
        match crate::ofrep::cors(&config.cors_allowed_origins).map_err(anyhow::Error::msg)? {
            Some(cors) => ofrep.layer(cors),
            None => ofrep,
        };
    let flagd = Flagd::new(eval.clone());
    let [evaluation, sync, flagd_v1, flagd_v2, flagd_sync] = policies();
    let node = node
        .service(
            EvaluationServer::new(EvaluationService::new(eval)),
            evaluation,
        )
        .service(
            SyncService::server(relay.fanout.clone(), relay.reporter.clone()),
            sync,
        )
        .service(
            flagd_v1::service_server::ServiceServer::new(flagd.clone()),
            flagd_v1,
        )
        .service(
            flagd_v2::service_server::ServiceServer::new(flagd.clone()),
            flagd_v2,
        )
        .service(
            flagd_sync::flag_sync_service_server::FlagSyncServiceServer::new(flagd),
            flagd_sync,
        )
        .http_routes(ofrep)
        .start()?;
    Ok(RunningPop {
        grpc_addr: node.grpc_addr,
        http_addr: node.http_addr,
        relay,
        state,
        tier,
        node,
    })
}
