//! `flagmesh-hub`: a regional hub. Parses its options, starts, prints the
//! ready line, serves until SIGINT/SIGTERM, drains.

use anyhow::Context as _;
use flagmesh_hub::{HubConfig, start};
use flagmesh_mesh::args::RelayArgs;
use flagmesh_proto::v1::NodeRole;
use flagmesh_server::config::{self, CommonArgs};
use flagmesh_server::process;

/// A flagmesh regional hub.
#[derive(clap::Parser, Debug)]
#[command(name = "flagmesh-hub", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    relay: RelayArgs,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Args { common, relay } = args;
    let telemetry = common.init_telemetry("flagmesh-hub");
    let security = common.security()?;
    let config = HubConfig {
        listen: common.listen_addr(),
        http_listen: common.http_listen,
        relay: relay.relay_config(&common.require_data_dir()?, NodeRole::Hub, "hub")?,
        drain: common.drain(),
    };
    let hub = start(config, security).await.context("starting the hub")?;
    let stopped = process::announce_ready(hub.grpc_addr, hub.http_addr)
        .context("catching SIGINT and SIGTERM")?;
    tracing::info!(grpc = %hub.grpc_addr, "hub serving");
    stopped.await;
    tracing::info!("shutting down");
    hub.stop().await;
    telemetry.shutdown();
    Ok(())
}

fn main() {
    let args: Args = config::parse();
    process::run_main("flagmesh-hub", 2, run(args));
}
