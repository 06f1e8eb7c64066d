//! In-process evaluation from a followed stream against `make run`'s mesh:
//! `cargo run -p flagmesh-sdk --example local -- POP_ADDR`

use std::time::Duration;

use flagmesh_sdk::{LocalClient, LocalConfig};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pops: Vec<String> = std::env::args().skip(1).collect();
    if pops.is_empty() {
        return Err("usage: local POP_ADDR [POP_ADDR…] (make run prints the addresses)".into());
    }
    let flags = LocalClient::start(LocalConfig::new(pops, "demo"))?;
    if !flags.wait_ready(Duration::from_secs(10)).await {
        return Err("no state within 10 s".into());
    }
    let ctx = json!({"targetingKey": "user-1", "email": "bob@example.org", "country": "NL"});
    let mut changes = flags.changes();
    loop {
        let banner = flags.string_value("banner-text", &ctx, "Hello");
        println!(
            "revision {}: banner-text = {:?} ({})",
            flags.revision(),
            banner.value,
            banner.reason
        );
        // change it with flagctl and watch this line update
        if tokio::time::timeout(Duration::from_secs(60), changes.changed())
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}
