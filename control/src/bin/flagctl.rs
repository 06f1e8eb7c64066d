//! `flagctl`: the flagmesh operator CLI (see `flagmesh_control::cli`).

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = flagmesh_control::cli::Cli::parse();
    if let Err(e) = flagmesh_control::cli::run(cli).await {
        eprintln!("flagctl: {e}");
        std::process::exit(1);
    }
}
