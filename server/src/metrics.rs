//! Metrics exposition: every node keeps a prometheus-client [`Registry`]
//! of collectors that read the node's counters at scrape time, served at
//! `/metrics` in the OpenMetrics text format (label values escaped by the
//! encoder), plus the TLS counters of the node's own listeners.

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::http_access::HttpAccess;
use crate::tls::ServerTls;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

/// A `/metrics` route serving `registry` to callers `access` admits.
pub fn route(registry: Arc<Registry>, access: HttpAccess) -> axum::Router {
    access.guard(axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    render(&registry),
                )
            }
        }),
    ))
}

/// The TLS counters of a node's listeners (nothing without TLS).
#[derive(Debug)]
pub struct TlsMetrics(pub Vec<(&'static str, Arc<ServerTls>)>);

impl prometheus_client::collector::Collector for TlsMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        type Count = fn(&ServerTls) -> u64;
        let counters: [(&str, &str, Count); 3] = [
            (
                "flagmesh_tls_reloads",
                "Certificate reloads after the files changed.",
                ServerTls::reloads,
            ),
            (
                "flagmesh_tls_reload_failures",
                "Changed certificate files that failed to load (the previous certificate stays in use).",
                ServerTls::reload_failures,
            ),
            (
                "flagmesh_tls_handshake_failures",
                "TLS handshakes that failed or timed out (untrusted or missing client certificates, plaintext clients).",
                ServerTls::handshake_failures,
            ),
        ];
        for (name, help, count) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (listener, tls) in &self.0 {
                ConstCounter::new(count(tls))
                    .encode(family.encode_family(&[("listener", *listener)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "flagmesh_tls_certificate_expiry_timestamp_seconds",
            "When the certificate in use expires, Unix time (0: could not be read).",
            None,
            MetricType::Gauge,
        )?;
        for (listener, tls) in &self.0 {
            ConstGauge::new(tls.not_after())
                .encode(family.encode_family(&[("listener", *listener)])?)?;
        }
        Ok(())
    }
}
