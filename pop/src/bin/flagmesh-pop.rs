//! `flagmesh-pop`: an edge PoP. Parses its options, loads its state from
//! sled, prints the ready line (it serves from that moment, before any
//! upstream answers), serves until SIGINT/SIGTERM, drains.

use anyhow::Context as _;
use clap::Parser;
use flagmesh_mesh::config::CommonArgs;
use flagmesh_mesh::node_args::RelayArgs;
use flagmesh_mesh::serve;
use flagmesh_pop::node::{PopConfig, start};
use flagmesh_proto::v1::NodeRole;

/// A flagmesh edge PoP.
#[derive(Parser, Debug)]
#[command(name = "flagmesh-pop", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    relay: RelayArgs,
    /// The flag set of evaluations that name none.
    #[arg(
        long = "default-flag-set",
        env = "FLAGMESH_DEFAULT_FLAG_SET",
        default_value = ""
    )]
    default_flag_set: String,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let common = args.common.merge_config_file()?;
    let telemetry = common.init_logging("flagmesh-pop");
    let security = common.security()?;
    let config = PopConfig {
        listen: common.listen_addr(),
        http_listen: common.http_listen,
        relay: args.relay.relay_config(&common, NodeRole::Pop, "pop")?,
        default_flag_set: args.default_flag_set.clone(),
        drain: args.relay.drain(),
    };
    let pop = start(config, security).await.context("starting the PoP")?;
    serve::print_ready(pop.grpc_addr, pop.http_addr);
    tracing::info!(grpc = %pop.grpc_addr, "PoP serving");
    serve::signal().await;
    tracing::info!("shutting down");
    pop.stop().await;
    telemetry.shutdown();
    Ok(())
}

fn main() {
    let args = Args::parse();
    serve::run_main("flagmesh-pop", run(args));
}
