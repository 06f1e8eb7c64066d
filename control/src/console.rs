//! The web console: one HTML page, a script and a stylesheet, embedded in
//! the binary (nothing is fetched from elsewhere, no build step). The page
//! holds no data: everything it shows comes from the Admin API as JSON
//! under `/api`, with the signed-in token, checked there like any gRPC
//! call. Every console address (`/`, `/sets/NAME`, `/sets/NAME/flags/KEY`,
//! `/history`, `/propagation`, `/signin`) answers the same page, so deep
//! links work on reload; the script draws the page the address names.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/app.css");

/// Only the console's own script and styles run, it talks only to control,
/// and no other site may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // a new control binary may bring a new console: always revalidate
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The console's routes.
pub fn routes() -> axum::Router {
    let page = get(|| async { asset(INDEX, "text/html; charset=utf-8") });
    axum::Router::new()
        .route("/", page.clone())
        .route("/signin", page.clone())
        .route("/history", page.clone())
        .route("/propagation", page.clone())
        .route("/sets", page.clone())
        .route("/sets/{*rest}", page)
        .route(
            "/console/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
}
