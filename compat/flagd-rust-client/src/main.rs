//! Resolves the compatibility test's flags at a flagd-compatible endpoint
//! with the Rust `open-feature-flagd` RPC resolver and prints the details
//! as one JSON object. Usage: flagd-rust-client HOST PORT

use open_feature::EvaluationContext;
use open_feature::provider::FeatureProvider;
use open_feature_flagd::{FlagdOptions, FlagdProvider, ResolverType};
use serde_json::{Value, json};

fn reason<T>(r: &open_feature::provider::ResolutionDetails<T>) -> Value {
    r.reason.as_ref().map(|x| json!(format!("{x}"))).unwrap_or(Value::Null)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let host = args.next().unwrap_or_else(|| "127.0.0.1".into());
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8013);
    let provider = match FlagdProvider::new(FlagdOptions {
        host,
        port,
        resolver_type: ResolverType::Rpc,
        cache_settings: None,
        ..Default::default()
    })
    .await
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("flagd-rust-client: cannot create the provider: {e:?}");
            std::process::exit(2);
        }
    };
    let ctx = EvaluationContext::default()
        .with_targeting_key("user-1")
        .with_custom_field("email", "ana@example.com");
    let mut out = serde_json::Map::new();
    match provider.resolve_bool_value("bool-flag", &ctx).await {
        Ok(r) => out.insert("bool-flag".into(), json!({"value": r.value, "reason": reason(&r)})),
        Err(e) => out.insert("bool-flag".into(), json!({"error": format!("{:?}", e.code)})),
    };
    match provider.resolve_string_value("string-flag", &ctx).await {
        Ok(r) => out.insert("string-flag".into(), json!({"value": r.value, "reason": reason(&r)})),
        Err(e) => out.insert("string-flag".into(), json!({"error": format!("{:?}", e.code)})),
    };
    match provider.resolve_int_value("int-flag", &ctx).await {
        Ok(r) => out.insert("int-flag".into(), json!({"value": r.value, "reason": reason(&r)})),
        Err(e) => out.insert("int-flag".into(), json!({"error": format!("{:?}", e.code)})),
    };
    match provider.resolve_float_value("float-flag", &ctx).await {
        Ok(r) => out.insert("float-flag".into(), json!({"value": r.value, "reason": reason(&r)})),
        Err(e) => out.insert("float-flag".into(), json!({"error": format!("{:?}", e.code)})),
    };
    match provider.resolve_struct_value("object-flag", &ctx).await {
        Ok(r) => {
            let fields: serde_json::Map<String, Value> =
                r.value.fields.iter().map(|(k, v)| (k.clone(), json!(format!("{v:?}")))).collect();
            out.insert("object-flag".into(), json!({"value": fields, "reason": reason(&r)}))
        }
        Err(e) => out.insert("object-flag".into(), json!({"error": format!("{:?}", e.code)})),
    };
    match provider.resolve_string_value("no-such-flag", &ctx).await {
        Ok(r) => out.insert("missing".into(), json!({"value": r.value})),
        Err(e) => out.insert("missing".into(), json!({"error": format!("{:?}", e.code)})),
    };
    println!("{}", Value::Object(out));
}
