//! Remote evaluation through PoPs against `make run`'s mesh:
//! `cargo run -p flagmesh-sdk --example remote -- POP_ADDR [POP_ADDR…]`

use flagmesh_sdk::{RemoteClient, RemoteConfig};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pops: Vec<String> = std::env::args().skip(1).collect();
    if pops.is_empty() {
        return Err("usage: remote POP_ADDR [POP_ADDR…] (make run prints the addresses)".into());
    }
    let mut config = RemoteConfig::new(pops);
    config.flag_set = "demo".into();
    let flags = RemoteClient::new(config)?;
    let ctx = json!({"targetingKey": "user-1", "email": "ana@example.com", "tier": "gold", "appVersion": "2.3.0"});
    let checkout = flags.bool_value("new-checkout", &ctx, false).await;
    let banner = flags.string_value("banner-text", &ctx, "Hello").await;
    let items = flags.int_value("max-items", &ctx, 5).await;
    let theme = flags.json_value("theme", &ctx, Default::default()).await;
    println!(
        "new-checkout = {} ({}, from {})",
        checkout.value, checkout.reason, checkout.pop_id
    );
    println!("banner-text  = {:?} ({})", banner.value, banner.reason);
    println!("max-items    = {} ({})", items.value, items.reason);
    println!(
        "theme        = {} ({})",
        serde_json::Value::Object(theme.value),
        theme.reason
    );
    Ok(())
}
