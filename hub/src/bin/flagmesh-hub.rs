//! `flagmesh-hub`: a regional hub. Parses its options, starts, prints the
//! ready line, serves until SIGINT/SIGTERM, drains.

use anyhow::Context as _;
use clap::Parser;
use flagmesh_hub::{HubConfig, start};
use flagmesh_mesh::config::CommonArgs;
use flagmesh_mesh::node_args::RelayArgs;
use flagmesh_mesh::serve;
use flagmesh_proto::v1::NodeRole;

/// A flagmesh regional hub.
#[derive(Parser, Debug)]
#[command(name = "flagmesh-hub", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    relay: RelayArgs,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let common = args.common.merge_config_file()?;
    let telemetry = common.init_logging("flagmesh-hub");
    let security = common.security()?;
    let listen = common.listen_addr();
    let config = HubConfig {
        listen,
        http_listen: common.http_listen,
        relay: args.relay.relay_config(&common, NodeRole::Hub, "hub")?,
        drain: args.relay.drain(),
    };
    let hub = start(config, security).await.context("starting the hub")?;
    serve::print_ready(hub.grpc_addr, hub.http_addr);
    tracing::info!(grpc = %hub.grpc_addr, "hub serving");
    serve::signal().await;
    tracing::info!("shutting down");
    hub.stop().await;
    telemetry.shutdown();
    Ok(())
}

fn main() {
    let args = Args::parse();
    serve::run_main("flagmesh-hub", run(args));
}
