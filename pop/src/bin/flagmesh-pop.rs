//! `flagmesh-pop`: an edge PoP. Parses its options, loads its state from
//! sled, prints the ready line (it serves from that moment, before any
//! upstream answers), serves until SIGINT/SIGTERM, drains.

use anyhow::Context as _;
use flagmesh_mesh::args::RelayArgs;
use flagmesh_pop::node::{PopConfig, start};
use flagmesh_proto::v1::NodeRole;
use flagmesh_server::config::{self, CommonArgs};
use flagmesh_server::process;

/// A flagmesh edge PoP.
#[derive(clap::Parser, Debug)]
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
    /// Origins whose browser pages may call OFREP (comma-separated, `*`
    /// for any); none by default.
    #[arg(
        long = "cors-allowed-origins",
        env = "FLAGMESH_CORS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    cors_allowed_origins: Vec<String>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        common,
        relay,
        default_flag_set,
        cors_allowed_origins,
    } = args;
    let telemetry = common.init_telemetry("flagmesh-pop");
    let security = common.security()?;
    let config = PopConfig {
        listen: common.listen_addr(),
        http_listen: common.http_listen,
        relay: relay.relay_config(&common.require_data_dir()?, NodeRole::Pop, "pop")?,
        default_flag_set,
        cors_allowed_origins,
        drain: common.drain(),
    };
    let pop = start(config, security).await.context("starting the PoP")?;
    process::print_ready(pop.grpc_addr, pop.http_addr);
    tracing::info!(grpc = %pop.grpc_addr, "PoP serving");
    process::signal().await;
    tracing::info!("shutting down");
    pop.stop().await;
    telemetry.shutdown();
    Ok(())
}

fn main() {
    let args: Args = config::parse();
    process::run_main("flagmesh-pop", run(args));
}
