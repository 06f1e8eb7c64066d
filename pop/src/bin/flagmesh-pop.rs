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
    /// Memory for compiled flags, in MiB (decimals allowed), or
    /// `unlimited`. Flags past it stay in sled and are compiled on use;
    /// the least recently used are dropped first.
    #[arg(
        long = "memory-budget-mb",
        env = "FLAGMESH_MEMORY_BUDGET_MB",
        default_value = "32",
        value_parser = memory_budget
    )]
    memory_budget: Budget,
    /// Flags compiled at start and never dropped from memory, as
    /// `SET/KEY` (or `KEY` of the default flag set), comma-separated.
    #[arg(long = "hot-flags", env = "FLAGMESH_HOT_FLAGS", value_delimiter = ',')]
    hot_flags: Vec<String>,
}

/// A memory budget in bytes (`None`: unlimited).
#[derive(Debug, Clone, Copy)]
struct Budget(Option<usize>);

fn memory_budget(s: &str) -> Result<Budget, String> {
    if s == "unlimited" {
        return Ok(Budget(None));
    }
    match s.parse::<f64>() {
        Ok(mb) if mb.is_finite() && mb > 0.0 => Ok(Budget(Some((mb * 1048576.0) as usize))),
        _ => Err(format!(
            "\"{s}\" is not a budget: give MiB above zero (such as 32 or 0.5), or `unlimited`"
        )),
    }
}

/// `SET/KEY` or `KEY` (of `default_set`) as (set, key).
fn hot_flag(s: &str, default_set: &str) -> (String, String) {
    match s.split_once('/') {
        Some((set, key)) => (set.to_owned(), key.to_owned()),
        None => (default_set.to_owned(), s.to_owned()),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        common,
        relay,
        default_flag_set,
        cors_allowed_origins,
        memory_budget,
        hot_flags,
    } = args;
    let hot_flags = hot_flags
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| hot_flag(s, &default_flag_set))
        .collect();
    let telemetry = common.init_telemetry("flagmesh-pop");
    let security = common.security()?;
    let config = PopConfig {
        listen: common.listen_addr(),
        http_listen: common.http_listen,
        relay: relay.relay_config(&common.require_data_dir()?, NodeRole::Pop, "pop")?,
        default_flag_set,
        cors_allowed_origins,
        drain: common.drain(),
        memory_budget: memory_budget.0,
        hot_flags,
    };
    let pop = start(config, security).await.context("starting the PoP")?;
    let stopped = process::announce_ready(pop.grpc_addr, pop.http_addr)
        .context("catching SIGINT and SIGTERM")?;
    tracing::info!(grpc = %pop.grpc_addr, "PoP serving");
    stopped.await;
    tracing::info!("shutting down");
    pop.stop().await;
    telemetry.shutdown();
    Ok(())
}

fn main() {
    let args: Args = config::parse();
    // one arena: measured 4–5 MiB less resident with 10,000 flags than
    // two, and steadier (BENCHMARKS.md, PoP memory)
    process::run_main("flagmesh-pop", 1, run(args));
}
