//! A bootstrap payload for a web page against `make run`'s mesh:
//! `cargo run -p flagmesh-sdk --example bootstrap -- POP_ADDR`

use flagmesh_sdk::{RemoteClient, RemoteConfig, bootstrap, script_tag};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pops: Vec<String> = std::env::args().skip(1).collect();
    if pops.is_empty() {
        return Err("usage: bootstrap POP_ADDR [POP_ADDR…] (make run prints the addresses)".into());
    }
    let mut config = RemoteConfig::new(pops);
    config.flag_set = "demo".into();
    let client = RemoteClient::new(config)?;
    let payload = bootstrap(
        &client,
        &json!({"targetingKey": "visitor-7", "country": "NL"}),
    )
    .await?;
    println!("{}", script_tag(&payload));
    Ok(())
}
