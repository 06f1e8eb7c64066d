//! `flagctl`, the operator CLI over the control plane's Admin API:
//! commands, and their output as human-readable tables (default) or JSON
//! (`--output json`). Every failure becomes one clear line on stderr and a
//! non-zero exit. It links the Admin client and nothing of a server.

mod args;
mod commands;
mod render;

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = args::Cli::parse();
    if let Err(e) = commands::run(cli).await {
        eprintln!("flagctl: {e}");
        std::process::exit(1);
    }
}
