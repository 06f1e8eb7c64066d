//! Options hubs and PoPs share on top of [`CommonArgs`](crate::config::CommonArgs),
//! and building a [`RelayConfig`] from them.

use std::time::Duration;

use flagmesh_proto::v1::NodeRole;

use crate::config::{CommonArgs, ConfigError};
use crate::fanout::FanoutConfig;
use crate::relay::RelayConfig;
use crate::subscriber::SubscriberConfig;

/// Replication tuning of a hub or PoP.
#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// Heartbeat interval of this node's downstream streams, in milliseconds.
    #[arg(
        long = "heartbeat-ms",
        env = "FLAGMESH_HEARTBEAT_MS",
        default_value_t = 2_000
    )]
    pub heartbeat_ms: u64,
    /// An upstream stream silent this long (missed heartbeats) is dropped, in milliseconds.
    #[arg(long = "stall-ms", env = "FLAGMESH_STALL_MS", default_value_t = 6_000)]
    pub stall_ms: u64,
    /// Longest reconnect backoff, in milliseconds.
    #[arg(
        long = "backoff-max-ms",
        env = "FLAGMESH_BACKOFF_MAX_MS",
        default_value_t = 5_000
    )]
    pub backoff_max_ms: u64,
    /// Deltas kept in the fan-out ring.
    #[arg(
        long = "ring-revisions",
        env = "FLAGMESH_RING_REVISIONS",
        default_value_t = 1024
    )]
    pub ring_revisions: usize,
    /// A downstream subscriber that accepts nothing this long is cut off, in milliseconds.
    #[arg(
        long = "send-timeout-ms",
        env = "FLAGMESH_SEND_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub send_timeout_ms: u64,
    /// Flag sets to follow (comma-separated; default: all).
    #[arg(long = "flag-sets", env = "FLAGMESH_FLAG_SETS", value_delimiter = ',')]
    pub flag_sets: Vec<String>,
    /// Flush every applied change to disk before serving it (`false`: sled
    /// flushes in the background; faster, but a crashed node may restart up
    /// to half a second behind what it served).
    #[arg(long = "sync-writes", env = "FLAGMESH_SYNC_WRITES", default_value_t = true, action = clap::ArgAction::Set)]
    pub sync_writes: bool,
    /// How long shutdown waits for open connections, in milliseconds.
    #[arg(long = "drain-ms", env = "FLAGMESH_DRAIN_MS", default_value_t = 5_000)]
    pub drain_ms: u64,
}

impl RelayArgs {
    /// The relay configuration of a node with these options.
    /// Without `--node-id`, the id is `{prefix}-` and a hash of the data
    /// directory, so it is stable across restarts.
    pub fn relay_config(
        &self,
        common: &CommonArgs,
        role: NodeRole,
        prefix: &str,
    ) -> Result<RelayConfig, ConfigError> {
        if common.upstream.is_empty() {
            return Err(ConfigError::Missing(
                "--upstream (FLAGMESH_UPSTREAM) is required".into(),
            ));
        }
        let data_dir = common.require_data_dir()?;
        // create it now so its canonical path (and so the default id) is stable
        let _ = std::fs::create_dir_all(&data_dir);
        let node_id = common.node_id.clone().unwrap_or_else(|| {
            let path = std::fs::canonicalize(&data_dir).unwrap_or_else(|_| data_dir.clone());
            let h = xxhash_rust::xxh3::xxh3_64(path.to_string_lossy().as_bytes());
            format!("{prefix}-{:08x}", h as u32)
        });
        let mut sub = SubscriberConfig::new(
            node_id,
            role,
            common.region.clone().unwrap_or_default(),
            common.upstream.clone(),
        );
        sub.mesh_token = common.mesh_token.clone();
        sub.tls = common.client_tls();
        sub.flag_sets = self.flag_sets.clone();
        sub.stall_timeout = Duration::from_millis(self.stall_ms.max(100));
        sub.backoff_max = Duration::from_millis(self.backoff_max_ms.max(100));
        let heartbeat = Duration::from_millis(self.heartbeat_ms.max(50));
        Ok(RelayConfig {
            data_dir,
            subscriber: sub,
            fanout: FanoutConfig {
                heartbeat,
                ring_revisions: self.ring_revisions.max(1),
                send_timeout: Duration::from_millis(self.send_timeout_ms.max(100)),
                ..FanoutConfig::default()
            },
            report_interval: heartbeat,
            sync_writes: self.sync_writes,
        })
    }

    /// The drain deadline.
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }
}
