//! A flagmesh hub: subscribes upstream (the control plane or another hub;
//! hubs chain), persists every applied change to sled, fans the same
//! revisions out to its subscribers, and forwards its subtree's reports
//! upward. A hub behind a subscriber answers `UNAVAILABLE` rather than
//! serve older state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flagmesh_mesh::auth::{Requirement, Security, common_requirement};
use flagmesh_mesh::relay::{Relay, RelayConfig};
use flagmesh_mesh::replica::ReplicaStore;
use flagmesh_mesh::serve::{self, Readiness, Shutdown};
use flagmesh_mesh::sync_service::SyncService;

/// What a hub needs to start.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP listen address, if any.
    pub http_listen: Option<SocketAddr>,
    /// Following, fan-out and storage.
    pub relay: RelayConfig,
    /// How long shutdown waits for connections.
    pub drain: Duration,
}

/// The hub's access policy: Sync needs the mesh credential.
pub fn requirement(path: &str) -> Requirement {
    common_requirement(path).unwrap_or(Requirement::Admin)
}

/// A running hub.
pub struct RunningHub {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// Triggers shutdown.
    pub shutdown: Shutdown,
    /// The relay (replica, fan-out, subscriber status).
    pub relay: Relay,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    drain: Duration,
}

impl RunningHub {
    /// Stops accepting, then drains.
    pub async fn stop(self) {
        self.shutdown.trigger();
        for t in self.tasks.into_iter().chain(self.relay.tasks) {
            serve::drain(t, self.drain).await;
        }
    }
}

/// Opens the replica, binds, and starts following and serving.
pub async fn start(config: HubConfig, security: impl Into<Security>) -> anyhow::Result<RunningHub> {
    let security: Security = security.into();
    let replica = Arc::new(
        ReplicaStore::open(&config.relay.data_dir, config.relay.sync_writes).with_context(
            || format!("opening the replica in {}", config.relay.data_dir.display()),
        )?,
    );
    let position = replica.position();
    tracing::info!(revision = position.revision, history_id = %position.history_id, "replica opened");
    let serve::Listeners {
        grpc,
        grpc_addr,
        http,
        http_addr,
    } = serve::bind_listeners(config.listen, config.http_listen).await?;
    let shutdown = Shutdown::new();
    let relay = Relay::start(config.relay.clone(), replica, None, shutdown.clone())?;

    let routes = tonic::service::Routes::new(SyncService::server(
        relay.fanout.clone(),
        relay.reporter.clone(),
    ));
    let routes = serve::with_health_and_reflection(routes, &["flagmesh.v1.Sync"])?;
    let mut tasks = serve::start_grpc(routes, &security, Arc::new(requirement), grpc, &shutdown);
    if let Some(listener) = http {
        let ready = Readiness::default();
        let mut status = relay.status.clone();
        let ready2 = ready.clone();
        let replica = relay.replica.clone();
        ready.set(replica.position().revision > 0);
        tasks.push(tokio::spawn(async move {
            while status.changed().await.is_ok() {
                ready2.set(replica.position().revision > 0);
            }
        }));
        let router = flagmesh_mesh::metrics::relay_router(ready, relay.view(), None, &security);
        tasks.push(serve::spawn_http(router, &security, listener, &shutdown));
    }
    Ok(RunningHub {
        grpc_addr,
        http_addr,
        shutdown,
        relay,
        tasks,
        drain: config.drain,
    })
}
