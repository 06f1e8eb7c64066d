//! In-process mesh nodes for the PoP tests: a control plane, hubs and PoPs
//! on `127.0.0.1`, each over a temporary folder, with fast heartbeats.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flagmesh_client::BearerToken;
use flagmesh_control::node::{ControlConfig, RunningControl};
use flagmesh_hub::{HubConfig, RunningHub};
use flagmesh_mesh::FanoutConfig;
use flagmesh_mesh::relay::RelayConfig;
use flagmesh_mesh::subscriber::SubscriberConfig;
use flagmesh_pop::node::{PopConfig, RunningPop};
use flagmesh_proto::v1::NodeRole;
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use flagmesh_server::credentials::Authenticator;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;
pub type Eval = EvaluationClient<InterceptedService<Channel, BearerToken>>;

pub const HEARTBEAT: Duration = Duration::from_millis(100);

pub fn dev() -> Arc<Authenticator> {
    Arc::new(Authenticator::configure(None, None, true).unwrap())
}

pub async fn control(dir: &Path, auth: Arc<Authenticator>) -> RunningControl {
    flagmesh_control::node::start(
        ControlConfig {
            retain_revisions: 1000,
            fanout: FanoutConfig {
                heartbeat: HEARTBEAT,
                ..FanoutConfig::default()
            },
            drain: Duration::from_millis(500),
            init: true,
            ..ControlConfig::new("127.0.0.1:0".parse().unwrap(), None, dir.join("control"))
        },
        auth,
    )
    .await
    .unwrap()
}

pub fn relay(
    dir: &Path,
    id: &str,
    role: NodeRole,
    upstreams: Vec<String>,
    token: Option<&str>,
) -> RelayConfig {
    let mut sub = SubscriberConfig::new(id.into(), role, "test".into(), upstreams);
    sub.mesh_token = token.map(str::to_owned);
    sub.stall_timeout = Duration::from_millis(1000);
    sub.backoff_min = Duration::from_millis(20);
    sub.backoff_max = Duration::from_millis(200);
    sub.connect_timeout = Duration::from_millis(500);
    RelayConfig {
        data_dir: dir.join(id),
        subscriber: sub,
        fanout: FanoutConfig {
            heartbeat: HEARTBEAT,
            ..FanoutConfig::default()
        },
        report_interval: HEARTBEAT,
        report_gather: flagmesh_mesh::reporter::default_gather(role),
        sync_writes: true,
        adopt_history: None,
    }
}

pub async fn hub_at(
    relay: RelayConfig,
    listen: SocketAddr,
    auth: Arc<Authenticator>,
) -> RunningHub {
    flagmesh_hub::start(
        HubConfig {
            listen,
            http_listen: None,
            relay,
            drain: Duration::from_millis(500),
        },
        auth,
    )
    .await
    .unwrap()
}

pub async fn pop(relay: RelayConfig, default_set: &str, auth: Arc<Authenticator>) -> RunningPop {
    flagmesh_pop::node::start(
        PopConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: None,
            relay,
            default_flag_set: default_set.into(),
            cors_allowed_origins: Vec::new(),
            drain: Duration::from_millis(500),
            memory_budget: Some(flagmesh_pop::node::DEFAULT_MEMORY_BUDGET),
            hot_flags: Vec::new(),
        },
        auth,
    )
    .await
    .unwrap()
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn admin(addr: SocketAddr) -> Admin {
    AdminClient::with_interceptor(channel(addr).await, BearerToken::new(None).unwrap())
}

pub async fn eval(addr: SocketAddr, token: Option<&str>) -> Eval {
    EvaluationClient::with_interceptor(channel(addr).await, BearerToken::new(token).unwrap())
}

/// Polls `f` every 20 ms until it holds, failing after `secs`.
pub async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A string flag whose only variant holds `value`.
pub fn string_flag(value: &str) -> String {
    format!(r#"{{"state":"ENABLED","variants":{{"v":"{value}"}},"defaultVariant":"v"}}"#)
}
