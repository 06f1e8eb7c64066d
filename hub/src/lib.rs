//! A flagmesh hub: subscribes upstream (the control plane or another hub;
//! hubs chain), persists every applied change to sled, fans the same
//! revisions out to its subscribers, and forwards its subtree's reports
//! upward. A hub behind a subscriber answers `UNAVAILABLE` rather than
//! serve older state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flagmesh_mesh::metrics::RelayMetrics;
use flagmesh_mesh::relay::{Relay, RelayConfig};
use flagmesh_mesh::replica::ReplicaStore;
use flagmesh_mesh::sync_service::SyncService;
use flagmesh_server::{
    MethodPolicy, NodeBuilder, Requirement, RunningNode, Security, ServicePolicy,
};

/// What a hub needs to start.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP listen address, if any.
    pub http_listen: Option<SocketAddr>,
    /// Following, fan-out and storage.
    pub relay: RelayConfig,
    /// How long a stop waits, in all, for connections and tasks.
    pub drain: Duration,
}

/// The hub's one service: Sync, for mesh nodes only.
pub fn sync_policy() -> ServicePolicy {
    ServicePolicy::new("flagmesh.v1.Sync", MethodPolicy::stream(Requirement::Mesh))
}

/// A running hub.
pub struct RunningHub {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// The relay (replica, fan-out, subscriber status).
    pub relay: Relay,
    node: RunningNode,
}

impl RunningHub {
    /// Stops accepting, then drains everything under one deadline; `true`
    /// when everything ended in time.
    pub async fn stop(self) -> bool {
        self.node.stop().await
    }
}

/// Opens the replica, binds, and starts following and serving.
pub async fn start(config: HubConfig, security: impl Into<Security>) -> anyhow::Result<RunningHub> {
    let (replica, _) = ReplicaStore::open_scoped_without_definitions(
        &config.relay.data_dir,
        config.relay.sync_writes,
        &config.relay.subscriber.flag_sets,
    )
    .with_context(|| format!("opening the replica in {}", config.relay.data_dir.display()))?;
    let replica = Arc::new(replica);
    let position = replica.position();
    tracing::info!(revision = position.revision, history_id = %position.history_id, "replica opened");
    let mut node = NodeBuilder::bind(
        config.listen,
        config.http_listen,
        security.into(),
        config.drain,
    )
    .await?;
    let relay = Relay::start(
        config.relay.clone(),
        replica,
        None,
        &node.stop_token(),
        node.tasks(),
    )?;
    // what a burst (a large change, a storm of snapshots) allocated goes
    // back to the system once the hub is quiet again
    let fanout = relay.fanout.clone();
    flagmesh_server::process::release_memory_when_quiet(
        move || fanout.activity(),
        node.tasks(),
        node.stop_token(),
    );
    // ready once it holds a state; a history conflict shows in /readyz
    let ready = node.readiness();
    relay.watch_readiness(move |has_state, detail| {
        ready.set(has_state);
        ready.set_detail(detail);
    });
    node.metrics()
        .register_collector(Box::new(RelayMetrics(relay.view())));
    let node = node
        .service(
            SyncService::server(relay.fanout.clone(), relay.reporter.clone()),
            sync_policy(),
        )
        .start()?;
    Ok(RunningHub {
        grpc_addr: node.grpc_addr,
        http_addr: node.http_addr,
        relay,
        node,
    })
}
