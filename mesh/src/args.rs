//! The command-line options hubs and PoPs share (whom to follow, how, and
//! how to serve downstream), and building a [`RelayConfig`] from them.
//! Each relay binary flattens them into its arguments next to the options
//! every server has.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flagmesh_client::ClientTls;
use flagmesh_proto::v1::NodeRole;

use crate::fanout::FanoutConfig;
use crate::relay::RelayConfig;
use crate::subscriber::SubscriberConfig;

/// Why a relay's options are unusable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RelayArgsError(String);

/// The options of a hub or PoP.
#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// An upstream address (repeat, or comma-separate, for several).
    #[arg(long = "upstream", env = "FLAGMESH_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// This node's id in reports and metrics (default: derived from the
    /// data directory, so it is stable across restarts).
    #[arg(long = "node-id", env = "FLAGMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// This node's region.
    #[arg(long, env = "FLAGMESH_REGION", default_value = "")]
    pub region: String,
    /// The mesh credential this node presents to its upstreams.
    #[arg(
        long = "mesh-token",
        env = "FLAGMESH_MESH_TOKEN",
        hide_env_values = true
    )]
    pub mesh_token: Option<String>,
    /// CA (PEM) the upstream's certificate is verified against; turns on
    /// TLS to upstreams.
    #[arg(long = "upstream-ca", env = "FLAGMESH_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to upstreams (mTLS).
    #[arg(long = "client-cert", env = "FLAGMESH_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of `--client-cert`.
    #[arg(long = "client-key", env = "FLAGMESH_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// The name expected in upstream certificates (default: the
    /// upstream's host).
    #[arg(long = "upstream-tls-name", env = "FLAGMESH_UPSTREAM_TLS_NAME")]
    pub upstream_tls_name: Option<String>,
    /// Adopt this history: follow an upstream that serves it even though
    /// this node holds another one (after the control plane was
    /// re-initialised). Without it a node never leaves its history.
    #[arg(long = "adopt-history", env = "FLAGMESH_ADOPT_HISTORY")]
    pub adopt_history: Option<String>,
    /// Heartbeat interval of this node's downstream streams, in milliseconds.
    #[arg(
        long = "heartbeat-ms",
        env = "FLAGMESH_HEARTBEAT_MS",
        default_value_t = 2_000
    )]
    pub heartbeat_ms: u64,
    /// How long reports gather before they go upward together, in
    /// milliseconds: at most one batch per interval, however many changes
    /// and nodes it covers. Default: 250 at a hub (its subtree's reports
    /// of a change travel as one batch), 0 at a PoP (it reports only
    /// itself, and a report sent at once rides on the wake-up of the
    /// change it reports; a timer of its own would cost one more).
    #[arg(long = "report-gather-ms", env = "FLAGMESH_REPORT_GATHER_MS")]
    pub report_gather_ms: Option<u64>,
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
    /// Most bytes of deltas the fan-out ring keeps (default: 16 MiB at a
    /// hub; 2 MiB at a PoP, whose few subscribers, SDKs in local mode,
    /// take a snapshot when they fall further behind).
    #[arg(long = "ring-bytes", env = "FLAGMESH_RING_BYTES")]
    pub ring_bytes: Option<usize>,
    /// A downstream subscriber that accepts nothing this long is cut off, in milliseconds.
    #[arg(
        long = "send-timeout-ms",
        env = "FLAGMESH_SEND_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub send_timeout_ms: u64,
    /// A coalesced catch-up delta larger than this many bytes is sent to a
    /// downstream subscriber as a snapshot, in chunks.
    #[arg(
        long = "max-catch-up-delta-bytes",
        env = "FLAGMESH_MAX_CATCH_UP_DELTA_BYTES",
        default_value_t = 4 << 20
    )]
    pub max_catch_up_delta_bytes: usize,
    /// Flag sets to follow (comma-separated; default: all).
    #[arg(long = "flag-sets", env = "FLAGMESH_FLAG_SETS", value_delimiter = ',')]
    pub flag_sets: Vec<String>,
    /// Make every applied change durable (in the replica's journal) before
    /// serving it (`false`: one sled batch per change, flushed by sled in
    /// the background; no cheaper, and a crashed node may restart up to
    /// half a second behind what it served).
    #[arg(long = "sync-writes", env = "FLAGMESH_SYNC_WRITES", default_value_t = true, action = clap::ArgAction::Set)]
    pub sync_writes: bool,
}

/// The default ring size of a PoP (see `--ring-bytes`).
pub const POP_RING_BYTES: usize = 2 << 20;

impl RelayArgs {
    /// The relay configuration of a node with these options and its data
    /// directory. Without `--node-id`, the id is `{prefix}-` and a hash of
    /// the data directory, so it is stable across restarts.
    pub fn relay_config(
        &self,
        data_dir: &Path,
        role: NodeRole,
        prefix: &str,
    ) -> Result<RelayConfig, RelayArgsError> {
        if self.upstream.is_empty() {
            return Err(RelayArgsError(
                "--upstream (FLAGMESH_UPSTREAM) is required".into(),
            ));
        }
        let data_dir = data_dir.to_path_buf();
        // create it now so its canonical path (and so the default id) is stable
        let _ = std::fs::create_dir_all(&data_dir);
        let node_id = self.node_id.clone().unwrap_or_else(|| {
            let path = std::fs::canonicalize(&data_dir).unwrap_or_else(|_| data_dir.clone());
            let h = xxhash_rust::xxh3::xxh3_64(path.to_string_lossy().as_bytes());
            format!("{prefix}-{:08x}", h as u32)
        });
        let mut sub =
            SubscriberConfig::new(node_id, role, self.region.clone(), self.upstream.clone());
        sub.mesh_token = self.mesh_token.clone();
        sub.tls = self.client_tls();
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
                ring_bytes: self.ring_bytes.unwrap_or(match role {
                    NodeRole::Pop => POP_RING_BYTES,
                    _ => FanoutConfig::default().ring_bytes,
                }),
                send_timeout: Duration::from_millis(self.send_timeout_ms.max(100)),
                max_catch_up_delta_bytes: self.max_catch_up_delta_bytes.max(1 << 10),
                ring_without_subscribers: role != NodeRole::Pop,
                ..FanoutConfig::default()
            },
            report_interval: heartbeat,
            report_gather: self
                .report_gather_ms
                .map(Duration::from_millis)
                .unwrap_or_else(|| crate::reporter::default_gather(role)),
            sync_writes: self.sync_writes,
            adopt_history: self.adopt_history.clone(),
        })
    }

    /// TLS to upstreams, if configured.
    pub fn client_tls(&self) -> Option<ClientTls> {
        let tls = ClientTls {
            ca: self.upstream_ca.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
            domain: self.upstream_tls_name.clone(),
        };
        tls.enabled().then_some(tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        relay: RelayArgs,
    }

    fn ring_bytes(args: &[&str], role: NodeRole) -> usize {
        let cli = Cli::parse_from([&["node", "--upstream", "127.0.0.1:1"], args].concat());
        let dir = tempfile::tempdir().expect("tempdir");
        cli.relay
            .relay_config(dir.path(), role, "n")
            .expect("config")
            .fanout
            .ring_bytes
    }

    #[test]
    fn a_pop_keeps_a_smaller_ring_than_a_hub_unless_told() {
        assert_eq!(ring_bytes(&[], NodeRole::Pop), POP_RING_BYTES);
        assert_eq!(
            ring_bytes(&[], NodeRole::Hub),
            FanoutConfig::default().ring_bytes
        );
        assert_eq!(ring_bytes(&["--ring-bytes", "1000"], NodeRole::Pop), 1000);
    }
}
