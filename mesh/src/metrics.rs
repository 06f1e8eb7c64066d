//! Prometheus metrics of a node, rendered in the text exposition format
//! from the counters the replication pieces keep (atomics and the
//! subscriber's status): nothing is computed on the hot path for them.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::fanout::Fanout;
use crate::relay::RelayView;

/// Builds a text exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// A metric family's header.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample; `labels` as `key="value"` pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            let _ = writeln!(self.out, "{name}{{{}}} {value}", l.join(","));
        }
        self
    }

    /// A family with one unlabeled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The fan-out's metrics.
pub fn fanout(e: &mut Exposition, f: &Fanout) {
    let s = f.stats();
    let (entries, bytes) = f.ring_usage();
    e.single(
        "flagmesh_subscribers",
        "gauge",
        "Downstream subscribers connected now.",
        s.subscribers.load(Ordering::Relaxed) as f64,
    )
    .single(
        "flagmesh_subscribers_cut_off_total",
        "counter",
        "Downstream subscribers disconnected for accepting nothing before the send deadline.",
        s.cut_off.load(Ordering::Relaxed) as f64,
    )
    .single(
        "flagmesh_fanout_snapshots_sent_total",
        "counter",
        "Snapshots sent downstream.",
        s.snapshots_sent.load(Ordering::Relaxed) as f64,
    )
    .single(
        "flagmesh_fanout_events_sent_total",
        "counter",
        "Events (deltas, snapshot chunks, heartbeats) sent downstream.",
        s.deltas_sent.load(Ordering::Relaxed) as f64,
    )
    .single(
        "flagmesh_fanout_shared_sends_total",
        "counter",
        "Deltas sent downstream as bytes encoded once and shared.",
        s.shared_sends.load(Ordering::Relaxed) as f64,
    )
    .single(
        "flagmesh_fanout_sent_bytes_total",
        "counter",
        "Bytes sent downstream.",
        s.bytes_sent.load(Ordering::Relaxed) as f64,
    )
    .single(
        "flagmesh_fanout_ring_deltas",
        "gauge",
        "Deltas held in the fan-out ring.",
        entries as f64,
    )
    .single(
        "flagmesh_fanout_ring_bytes",
        "gauge",
        "Encoded bytes held in the fan-out ring.",
        bytes as f64,
    )
    .single(
        "flagmesh_head_revision",
        "gauge",
        "The newest revision this node serves downstream.",
        f.head().revision as f64,
    );
}

/// A relay's (hub or PoP) replication metrics.
pub fn relay(e: &mut Exposition, r: &RelayView) {
    let status = r.status.borrow().clone();
    let stats = &r.stats;
    let now_ms = crate::now_ms();
    let since_message = status
        .last_message
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(f64::INFINITY);
    let lag_seconds = match status.behind_since_unix_ms {
        Some(t) => ((now_ms - t).max(0) as f64) / 1000.0,
        None => 0.0,
    };
    e.single("flagmesh_applied_revision", "gauge", "The revision applied locally.", status.applied_revision as f64)
        .single("flagmesh_upstream_head_revision", "gauge", "The newest revision seen upstream.", status.head_revision as f64)
        .single(
            "flagmesh_lag_revisions",
            "gauge",
            "Revisions between the newest seen upstream and the applied one.",
            status.head_revision.saturating_sub(status.applied_revision) as f64,
        )
        .single("flagmesh_lag_seconds", "gauge", "Seconds this node has been behind the newest revision seen upstream (0 when caught up).", lag_seconds)
        .single(
            "flagmesh_last_sync_message_age_seconds",
            "gauge",
            "Seconds since the upstream stream last delivered anything (heartbeats included).",
            since_message,
        )
        .single("flagmesh_upstream_connected", "gauge", "1 when a stream to an upstream is open.", f64::from(u8::from(status.connected)))
        .single("flagmesh_stale", "gauge", "1 when this node may serve stale state (disconnected, behind, or its upstream is cut off).", f64::from(u8::from(status.stale())))
        .family("flagmesh_upstream_info", "gauge", "The upstream this node follows (label), 1 while connected.")
        .sample("flagmesh_upstream_info", &[("upstream", &status.upstream)], f64::from(u8::from(status.connected)))
        .single("flagmesh_upstream_reconnects_total", "counter", "Upstream streams opened after the first.", stats.reconnects.load(Ordering::Relaxed) as f64)
        .single("flagmesh_digest_mismatches_total", "counter", "Digest mismatches detected (each followed by a resync).", stats.digest_mismatches.load(Ordering::Relaxed) as f64)
        .single("flagmesh_gaps_total", "counter", "Gaps detected (each followed by a resubscribe).", stats.gaps.load(Ordering::Relaxed) as f64)
        .single("flagmesh_snapshots_applied_total", "counter", "Snapshots applied.", stats.snapshots.load(Ordering::Relaxed) as f64)
        .single("flagmesh_deltas_applied_total", "counter", "Deltas applied.", stats.deltas.load(Ordering::Relaxed) as f64)
        .single("flagmesh_snapshot_bytes_total", "counter", "Bytes of snapshots received.", stats.snapshot_bytes.load(Ordering::Relaxed) as f64)
        .single("flagmesh_delta_bytes_total", "counter", "Bytes of deltas received.", stats.delta_bytes.load(Ordering::Relaxed) as f64)
        .single("flagmesh_store_flags", "gauge", "Flags held in the replica store.", r.replica.flag_count() as f64);
    fanout(e, &r.fanout);
}

/// TLS counters of a node's listeners (none without TLS).
pub fn tls(e: &mut Exposition, security: &crate::auth::Security) {
    let listeners: Vec<(&str, &crate::tls::ServerTls)> = [
        ("grpc", security.grpc_tls.as_deref()),
        ("http", security.http_tls.as_deref()),
    ]
    .into_iter()
    .filter_map(|(name, t)| Some((name, t?)))
    .collect();
    if listeners.is_empty() {
        return;
    }
    type Counter = fn(&crate::tls::ServerTls) -> u64;
    let families: [(&str, &str, Counter); 3] = [
        (
            "flagmesh_tls_reloads_total",
            "Certificate reloads after the files changed.",
            crate::tls::ServerTls::reloads,
        ),
        (
            "flagmesh_tls_reload_failures_total",
            "Changed certificate files that failed to load (the previous certificate stays in use).",
            crate::tls::ServerTls::reload_failures,
        ),
        (
            "flagmesh_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out (untrusted or missing client certificates, plaintext clients).",
            crate::tls::ServerTls::handshake_failures,
        ),
    ];
    for (name, help, value) in families {
        e.family(name, "counter", help);
        for (listener, t) in &listeners {
            e.sample(name, &[("listener", listener)], value(t) as f64);
        }
    }
    let expiry = "flagmesh_tls_certificate_expiry_timestamp_seconds";
    e.family(
        expiry,
        "gauge",
        "When the certificate in use expires, Unix time (0: could not be read).",
    );
    for (listener, t) in &listeners {
        e.sample(expiry, &[("listener", listener)], t.not_after() as f64);
    }
}

/// What a node adds to its metrics beyond replication.
pub type ExtraMetrics = std::sync::Arc<dyn Fn(&mut Exposition) + Send + Sync>;

/// The HTTP routes of a hub or PoP: `/healthz`, `/readyz`, and `/metrics`
/// with the relay's metrics and `extra`.
pub fn relay_router(
    ready: crate::serve::Readiness,
    view: RelayView,
    extra: Option<ExtraMetrics>,
    security: &crate::auth::Security,
) -> axum::Router {
    let access = security.metrics_access();
    let security = security.clone();
    let render = std::sync::Arc::new(move || {
        let mut e = Exposition::default();
        relay(&mut e, &view);
        if let Some(extra) = &extra {
            extra(&mut e);
        }
        tls(&mut e, &security);
        e.finish()
    });
    crate::serve::base_http_routes(ready).merge(crate::serve::metrics_route(render, access))
}
