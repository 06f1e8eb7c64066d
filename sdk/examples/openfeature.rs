//! flagmesh behind the OpenFeature API against `make run`'s mesh:
//! `cargo run -p flagmesh-sdk --example openfeature -- POP_ADDR`

use flagmesh_sdk::{FlagmeshProvider, RemoteClient, RemoteConfig};
use open_feature::{EvaluationContext, OpenFeature};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pops: Vec<String> = std::env::args().skip(1).collect();
    if pops.is_empty() {
        return Err(
            "usage: openfeature POP_ADDR [POP_ADDR…] (make run prints the addresses)".into(),
        );
    }
    let mut config = RemoteConfig::new(pops);
    config.flag_set = "demo".into();
    let mut api = OpenFeature::singleton_mut().await;
    api.set_provider(FlagmeshProvider::remote(RemoteClient::new(config)?))
        .await;
    let client = api.create_client();
    let ctx = EvaluationContext::default()
        .with_targeting_key("user-1")
        .with_custom_field("email", "ana@example.com");
    let details = client
        .get_bool_details("new-checkout", Some(&ctx), None)
        .await;
    println!("{details:?}");
    Ok(())
}
