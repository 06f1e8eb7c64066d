//! `flagmesh-control`: the control plane server. Parses its options, starts
//! the node, prints the ready line, serves until SIGINT/SIGTERM, drains.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use flagmesh_control::node::{ControlConfig, start};
use flagmesh_mesh::FanoutConfig;
use flagmesh_mesh::config::CommonArgs;
use flagmesh_mesh::serve;

/// The flagmesh control plane.
#[derive(Parser, Debug)]
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
    /// How long shutdown waits for open connections, in milliseconds.
    #[arg(long = "drain-ms", env = "FLAGMESH_DRAIN_MS", default_value_t = 5_000)]
    drain_ms: u64,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let common = args.common.merge_config_file()?;
    let telemetry = common.init_logging("flagmesh-control");
    let security = common.security()?;
    let config = ControlConfig {
        listen: common.listen_addr(),
        http_listen: common.http_listen,
        data_dir: common.require_data_dir()?,
        retain_revisions: args.retain_revisions,
        fanout: FanoutConfig {
            heartbeat: Duration::from_millis(args.heartbeat_ms.max(50)),
            ..FanoutConfig::default()
        },
        drain: Duration::from_millis(args.drain_ms),
    };
    let node = start(config, security)
        .await
        .context("starting the control plane")?;
    serve::print_ready(node.grpc_addr, node.http_addr);
    tracing::info!(grpc = %node.grpc_addr, http = ?node.http_addr, "control plane serving");
    serve::signal().await;
    tracing::info!("shutting down");
    node.stop().await;
    telemetry.shutdown();
    Ok(())
}

fn main() {
    let args = Args::parse();
    serve::run_main("flagmesh-control", run(args));
}
