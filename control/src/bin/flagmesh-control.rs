//! `flagmesh-control`: the control plane server. Parses its options, starts
//! the node, prints the ready line, serves until SIGINT/SIGTERM, drains.

use std::time::Duration;

use anyhow::Context as _;
use flagmesh_control::node::{ControlConfig, start};
use flagmesh_mesh::FanoutConfig;
use flagmesh_server::config::{self, CommonArgs, ConfigError};
use flagmesh_server::process;

/// The flagmesh control plane.
#[derive(clap::Parser, Debug)]
#[command(name = "flagmesh-control", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// How many revisions of deltas the change log keeps before compacting.
    #[arg(
        long = "retain-revisions",
        env = "FLAGMESH_RETAIN_REVISIONS",
        default_value_t = 10_000
    )]
    retain_revisions: u64,
    /// Progress heartbeat interval on idle Subscribe streams, in milliseconds.
    #[arg(
        long = "heartbeat-ms",
        env = "FLAGMESH_HEARTBEAT_MS",
        default_value_t = 2_000
    )]
    heartbeat_ms: u64,
    /// A coalesced catch-up delta larger than this many bytes is sent as a
    /// snapshot, in chunks.
    #[arg(
        long = "max-catch-up-delta-bytes",
        env = "FLAGMESH_MAX_CATCH_UP_DELTA_BYTES",
        default_value_t = 4 << 20
    )]
    max_catch_up_delta_bytes: usize,
    /// Admin calls per second per credential (sustained); 0: no limit.
    #[arg(
        long = "admin-rate",
        env = "FLAGMESH_ADMIN_RATE",
        default_value_t = 100.0
    )]
    admin_rate: f64,
    /// Admin calls a credential may make in a burst.
    #[arg(
        long = "admin-burst",
        env = "FLAGMESH_ADMIN_BURST",
        default_value_t = 200.0
    )]
    admin_burst: f64,
    /// Largest Admin request, in bytes.
    #[arg(
        long = "max-message-bytes",
        env = "FLAGMESH_MAX_MESSAGE_BYTES",
        default_value_t = 16 << 20
    )]
    max_message_bytes: usize,
    /// Create a new mesh (a new store and history) if `--data-dir` holds
    /// none; without it, an empty data directory is refused.
    #[arg(long, env = "FLAGMESH_INIT")]
    init: bool,
    /// Keep the state in PostgreSQL instead of sled (several control
    /// instances may share one database), e.g.
    /// `postgres://flagmesh@db.internal/flagmesh`.
    #[arg(
        long = "database-url",
        env = "FLAGMESH_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// With `--database-url`: move the sled store in this folder (flags,
    /// revisions, audit trail, history id) into the empty database, then
    /// exit. Stop the sled control plane first; hubs and PoPs then resume
    /// on the database's instances by delta.
    #[arg(long = "import-sled", requires = "database_url")]
    import_sled: Option<std::path::PathBuf>,
    /// The propagation view forgets nodes that have not reported for this
    /// long, in milliseconds (0: never), so dead nodes stop counting as lagging.
    #[arg(
        long = "forget-nodes-after-ms",
        env = "FLAGMESH_FORGET_NODES_AFTER_MS",
        default_value_t = 600_000
    )]
    forget_nodes_after_ms: i64,
    /// Flags one flag set may hold.
    #[arg(
        long = "max-flags-per-set",
        env = "FLAGMESH_MAX_FLAGS_PER_SET",
        default_value_t = 10_000
    )]
    max_flags_per_set: usize,
}

impl Args {
    /// The node's configuration; out-of-range limits are refused with the
    /// option named.
    fn control_config(&self) -> Result<ControlConfig, ConfigError> {
        if self.max_flags_per_set == 0 {
            return Err(ConfigError::Invalid(
                "--max-flags-per-set 0: a flag set must be able to hold a flag".into(),
            ));
        }
        if self.max_message_bytes < 64 << 10 {
            return Err(ConfigError::Invalid(format!(
                "--max-message-bytes {}: at least 65536 (one flag may be 256 KiB)",
                self.max_message_bytes
            )));
        }
        Ok(ControlConfig {
            retain_revisions: self.retain_revisions,
            fanout: FanoutConfig {
                heartbeat: Duration::from_millis(self.heartbeat_ms.max(50)),
                max_catch_up_delta_bytes: self.max_catch_up_delta_bytes.max(1 << 10),
                ..FanoutConfig::default()
            },
            drain: self.common.drain(),
            max_message_bytes: self.max_message_bytes,
            max_flags_per_set: self.max_flags_per_set,
            init: self.init,
            database_url: self.database_url.clone(),
            forget_nodes_after_ms: self.forget_nodes_after_ms.max(0),
            ..ControlConfig::new(
                self.common.listen_addr(),
                self.common.http_listen,
                match &self.database_url {
                    // the database holds everything
                    Some(_) => self.common.data_dir.clone().unwrap_or_default(),
                    None => self.common.require_data_dir()?,
                },
            )
        })
    }
}

/// `--import-sled`: one sled store into an empty database.
fn import(args: &Args, dir: &std::path::Path, url: &str) -> anyhow::Result<()> {
    let sled = flagmesh_control::store::SledStore::open(dir, args.retain_revisions, false)
        .with_context(|| format!("opening the sled store in {}", dir.display()))?;
    let export = sled.export()?;
    flagmesh_control::postgres::PgStore::import(url, args.retain_revisions, &export)
        .context("importing into the database")?;
    println!(
        "imported history {} at revision {}: {} flags, {} flag sets, {} change-log entries, {} audit entries",
        export.head.history_id,
        export.head.revision,
        export.flags.len(),
        export.flag_sets.len(),
        export.change_log.len(),
        export.audit.len()
    );
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let telemetry = args.common.init_telemetry("flagmesh-control");
    if let (Some(dir), Some(url)) = (&args.import_sled, &args.database_url) {
        let result = import(&args, dir, url);
        telemetry.shutdown();
        return result;
    }
    let mut security = args.common.security()?;
    let (rate, burst) = config::rate_limit("admin", args.admin_rate, args.admin_burst)?;
    security.limits.rate_per_sec = rate;
    security.limits.rate_burst = burst;
    let node = start(args.control_config()?, security)
        .await
        .context("starting the control plane")?;
    let stopped = process::announce_ready(node.grpc_addr, node.http_addr)
        .context("catching SIGINT and SIGTERM")?;
    tracing::info!(grpc = %node.grpc_addr, http = ?node.http_addr, "control plane serving");
    stopped.await;
    tracing::info!("shutting down");
    node.stop().await;
    telemetry.shutdown();
    Ok(())
}

fn main() {
    let args: Args = config::parse();
    process::run_main("flagmesh-control", 2, run(args));
}
