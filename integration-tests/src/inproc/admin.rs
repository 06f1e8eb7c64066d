//! Shared helpers of the control-plane tests: an in-process control node on
//! `127.0.0.1:0` over a temporary store, and authenticated clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flagmesh_client::{BearerToken, hash_token};
use flagmesh_control::node::{ControlConfig, RunningControl, start};
use flagmesh_mesh::FanoutConfig;
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_server::credentials::Authenticator;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;
pub type Sync = SyncClient<InterceptedService<Channel, BearerToken>>;

/// Tokens of the auth tests: each role's secret is its name.
pub fn tokens() -> String {
    ["read", "write", "admin", "mesh"]
        .iter()
        .map(|r| format!("{r}-user:{r}:{}", hash_token(&format!("{r}-secret"))))
        .collect::<Vec<_>>()
        .join(",")
}

/// A control node with its temporary store.
pub struct Control {
    pub node: RunningControl,
    pub addr: SocketAddr,
    /// Its HTTP listener (the console and the JSON gateway).
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
}

/// Starts a control node; `secured` uses [`tokens`], else development mode.
pub async fn control(retain: u64, secured: bool) -> Control {
    let dir = tempfile::tempdir().unwrap();
    control_in(dir, retain, secured).await
}

/// Starts a control node over an existing folder.
pub async fn control_in(dir: tempfile::TempDir, retain: u64, secured: bool) -> Control {
    let auth = if secured {
        Authenticator::configure(None, Some(&tokens()), false).unwrap()
    } else {
        Authenticator::configure(None, None, true).unwrap()
    };
    let config = ControlConfig {
        retain_revisions: retain,
        fanout: FanoutConfig {
            heartbeat: Duration::from_millis(200),
            ..FanoutConfig::default()
        },
        drain: Duration::from_secs(1),
        init: true,
        ..ControlConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            Some("127.0.0.1:0".parse().unwrap()),
            dir.path().join("store"),
        )
    };
    let node = start(config, Arc::new(auth)).await.unwrap();
    Control {
        addr: node.grpc_addr,
        http: node.http_addr.unwrap(),
        node,
        dir,
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn admin(addr: SocketAddr, token: Option<&str>) -> Admin {
    AdminClient::with_interceptor(channel(addr).await, BearerToken::new(token).unwrap())
}

/// Control's current revision.
pub async fn revision(a: &mut Admin) -> u64 {
    a.get_revision(flagmesh_proto::v1::GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner()
        .revision
}

pub async fn sync(addr: SocketAddr, token: Option<&str>) -> Sync {
    SyncClient::with_interceptor(channel(addr).await, BearerToken::new(token).unwrap())
}

/// A boolean flag definition whose default variant is `on` or `off`.
pub fn bool_flag(on: bool) -> String {
    format!(
        r#"{{"state":"ENABLED","variants":{{"on":true,"off":false}},"defaultVariant":"{}"}}"#,
        if on { "on" } else { "off" }
    )
}

/// A string flag whose only variant holds `value`.
pub fn string_flag(value: &str) -> String {
    format!(r#"{{"state":"ENABLED","variants":{{"v":"{value}"}},"defaultVariant":"v"}}"#)
}

/// Runs a future with a deadline, failing the test when it passes.
pub async fn bounded<T>(what: &str, secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs}s"))
}
