//! The bootstrap pattern flagmesh is built for: a server renders a page
//! whose first HTML already carries every flag value (one `EvaluateAll` on
//! a PoP, embedded as `window.__FLAGS__` and as the text of the page), so
//! there is no flag request before first paint. In the browser the
//! OpenFeature web SDK then takes over with the OFREP web provider, polling
//! the PoP (which must allow this page's origin: `--cors-allowed-origins`),
//! and the page follows every change.
//!
//! ```sh
//! make run                                   # a local mesh; note a PoP's grpc and http
//! (cd examples/bootstrap-web/web && npm ci && npm run build)
//! cargo run -p flagmesh-example-bootstrap -- --pop POP_GRPC --ofrep-url http://POP_HTTP
//! ```
//!
//! `POST /report` takes what the page shows and prints it on stdout, one
//! JSON line each (`page {...}`): the page reports every render, which is
//! how the example's test watches a real browser.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use flagmesh_sdk::{RemoteClient, RemoteConfig, bootstrap, script_tag};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "flagmesh-bootstrap-example",
    about = "A page rendered with its flag values, then following changes over OFREP"
)]
struct Args {
    /// Where the page is served.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// A PoP's gRPC address, for the server-side `EvaluateAll` (repeat for
    /// failover).
    #[arg(long = "pop", required = true)]
    pops: Vec<String>,
    /// The PoP's HTTP base URL as browsers reach it, for OFREP.
    #[arg(long)]
    ofrep_url: String,
    /// The flag set the page reads.
    #[arg(long, default_value = "demo")]
    flag_set: String,
    /// An evaluation key for the server's calls, if the PoP requires one.
    #[arg(long, env = "FLAGMESH_TOKEN")]
    token: Option<String>,
    /// How often the browser polls the PoP, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// The bundled browser code (`npm run build` in `web/`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/web/dist"))]
    assets: PathBuf,
}

struct Page {
    client: RemoteClient,
    ofrep_url: String,
    flag_set: String,
    poll_ms: u64,
    assets: PathBuf,
}

/// Escapes text for HTML content and attribute values.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page: every flag's value in its own element, the payload for the
/// browser code, and the browser code itself.
fn render(payload: &Value, config: &Value) -> String {
    let mut rows = String::new();
    if let Some(flags) = payload["flags"].as_object() {
        for (key, f) in flags {
            let key = escape(key);
            rows.push_str(&format!(
                "<tr><td>{key}</td><td><code id=\"flag-{key}\">{}</code></td></tr>\n",
                escape(&f["value"].to_string())
            ));
        }
    }
    let config_json = config.to_string().replace('<', "\\u003c");
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>flagmesh bootstrap example</title>
{flags}
<script>window.__FLAGMESH__ = {config_json};</script>
</head>
<body>
<h1>Flags for this visitor</h1>
<p id="source">embedded at revision {revision}</p>
<table>
{rows}</table>
<script src="/app.js"></script>
</body>
</html>
"#,
        flags = script_tag(payload),
        revision = payload["revision"],
    )
}

#[derive(serde::Deserialize)]
struct Visitor {
    user: Option<String>,
}

async fn index(State(page): State<Arc<Page>>, Query(v): Query<Visitor>) -> Response {
    let context = json!({"targetingKey": v.user.unwrap_or_else(|| "visitor".into())});
    match bootstrap(&page.client, &context).await {
        Ok(payload) => {
            let config = json!({
                "ofrepUrl": page.ofrep_url,
                "flagSet": page.flag_set,
                "context": context,
                "pollMs": page.poll_ms,
                "reportUrl": "/report",
            });
            Html(render(&payload, &config)).into_response()
        }
        // no PoP answered: the page still renders, with its own defaults
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Html(format!(
                "<p>no PoP answered: {}</p>",
                escape(&e.to_string())
            )),
        )
            .into_response(),
    }
}

async fn app_js(State(page): State<Arc<Page>>) -> Response {
    match tokio::fs::read(page.assets.join("app.js")).await {
        Ok(js) => ([(header::CONTENT_TYPE, "text/javascript")], js).into_response(),
        Err(e) => (
            StatusCode::NOT_FOUND,
            format!(
                "{}: {e} (build it: cd examples/bootstrap-web/web && npm ci && npm run build)",
                page.assets.join("app.js").display()
            ),
        )
            .into_response(),
    }
}

async fn report(body: String) -> StatusCode {
    match serde_json::from_str::<Value>(&body) {
        Ok(v) => {
            println!("page {v}");
            StatusCode::NO_CONTENT
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = RemoteConfig::new(args.pops);
    config.flag_set = args.flag_set.clone();
    config.token = args.token;
    let client = RemoteClient::new(config).context("the PoP addresses")?;
    let page = Arc::new(Page {
        client,
        ofrep_url: args.ofrep_url.trim_end_matches('/').to_owned(),
        flag_set: args.flag_set,
        poll_ms: args.poll_ms,
        assets: args.assets,
    });
    let app = Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/report", post(report))
        .with_state(page);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("bootstrap example on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_keys_are_escaped_in_the_page() {
        let page = render(
            &json!({"flags": {"a<b": {"value": "</code><script>"}}, "revision": 3}),
            &json!({"ofrepUrl": "http://x"}),
        );
        assert!(page.contains("flag-a&lt;b"));
        assert!(page.contains("&quot;&lt;/code&gt;&lt;script&gt;&quot;"));
        assert!(!page.contains("</code><script>"));
    }
}
