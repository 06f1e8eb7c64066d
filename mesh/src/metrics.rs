//! Prometheus metrics of replication, read from the counters the pieces
//! keep (atomics and the subscriber's status) at scrape time: nothing is
//! computed on the hot path for them. [`FanoutMetrics`] and
//! [`RelayMetrics`] are prometheus-client collectors a node registers; the
//! helpers here write one family each.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::fanout::Fanout;
use crate::relay::RelayView;

/// Writes a gauge family with one unlabelled sample.
pub fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: f64) -> fmt::Result {
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Writes a counter family with one unlabelled sample; `name` ends in
/// `_total`, as it is exposed.
pub fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let name = name.strip_suffix("_total").unwrap_or(name);
    ConstCounter::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// Writes a gauge family with one sample per label set.
pub fn gauges<'l>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (&'l [(&'l str, &'l str)], f64)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a counter family with one sample per label set; `name` ends in
/// `_total`, as it is exposed.
pub fn counters<'l>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (&'l [(&'l str, &'l str)], u64)>,
) -> fmt::Result {
    let name = name.strip_suffix("_total").unwrap_or(name);
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The fan-out's metrics, for a control plane (a relay's include them).
pub struct FanoutMetrics(pub Arc<Fanout>);

impl fmt::Debug for FanoutMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FanoutMetrics")
    }
}

impl prometheus_client::collector::Collector for FanoutMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        fanout(&mut e, &self.0)
    }
}

/// A relay's (hub or PoP) replication metrics, its fan-out's included.
pub struct RelayMetrics(pub RelayView);

impl fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RelayMetrics")
    }
}

impl prometheus_client::collector::Collector for RelayMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        relay(&mut e, &self.0)?;
        fanout(&mut e, &self.0.fanout)
    }
}

fn fanout(e: &mut DescriptorEncoder<'_>, f: &Fanout) -> fmt::Result {
    let s = f.stats();
    let (entries, bytes) = f.ring_usage();
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    gauge(
        e,
        "flagmesh_subscribers",
        "Downstream subscribers connected now.",
        s.subscribers.load(Ordering::Relaxed) as f64,
    )?;
    counter(
        e,
        "flagmesh_subscribers_cut_off_total",
        "Downstream subscribers disconnected for accepting nothing before the send deadline.",
        n(&s.cut_off),
    )?;
    counter(
        e,
        "flagmesh_fanout_snapshots_sent_total",
        "Snapshots sent downstream.",
        n(&s.snapshots_sent),
    )?;
    counter(
        e,
        "flagmesh_fanout_events_sent_total",
        "Events (deltas, snapshot chunks, heartbeats) sent downstream.",
        n(&s.deltas_sent),
    )?;
    counter(
        e,
        "flagmesh_fanout_shared_sends_total",
        "Deltas sent downstream as bytes encoded once and shared.",
        n(&s.shared_sends),
    )?;
    counter(
        e,
        "flagmesh_fanout_sent_bytes_total",
        "Bytes sent downstream.",
        n(&s.bytes_sent),
    )?;
    gauge(
        e,
        "flagmesh_fanout_ring_deltas",
        "Deltas held in the fan-out ring.",
        entries as f64,
    )?;
    gauge(
        e,
        "flagmesh_fanout_ring_bytes",
        "Encoded bytes held in the fan-out ring.",
        bytes as f64,
    )?;
    gauge(
        e,
        "flagmesh_head_revision",
        "The newest revision this node serves downstream.",
        f.head().revision as f64,
    )
}

fn relay(e: &mut DescriptorEncoder<'_>, r: &RelayView) -> fmt::Result {
    let status = r.status.borrow().clone();
    let stats = &r.stats;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let since_message = status
        .last_message
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(f64::INFINITY);
    let lag_seconds = match status.behind_since_unix_ms {
        Some(t) => ((crate::now_ms() - t).max(0) as f64) / 1000.0,
        None => 0.0,
    };
    let flag = |b: bool| f64::from(u8::from(b));
    gauge(
        e,
        "flagmesh_applied_revision",
        "The revision applied locally.",
        status.applied_revision as f64,
    )?;
    gauge(
        e,
        "flagmesh_upstream_head_revision",
        "The newest revision seen upstream.",
        status.head_revision as f64,
    )?;
    gauge(
        e,
        "flagmesh_lag_revisions",
        "Revisions between the newest seen upstream and the applied one.",
        status.head_revision.saturating_sub(status.applied_revision) as f64,
    )?;
    gauge(
        e,
        "flagmesh_lag_seconds",
        "Seconds this node has been behind the newest revision seen upstream (0 when caught up).",
        lag_seconds,
    )?;
    gauge(
        e,
        "flagmesh_last_sync_message_age_seconds",
        "Seconds since the upstream stream last delivered anything (heartbeats included).",
        since_message,
    )?;
    gauge(
        e,
        "flagmesh_upstream_connected",
        "1 when a stream to an upstream is open.",
        flag(status.connected),
    )?;
    gauge(
        e,
        "flagmesh_stale",
        "1 when this node may serve stale state (disconnected, behind, or its upstream is cut off).",
        flag(status.stale()),
    )?;
    gauges(
        e,
        "flagmesh_upstream_info",
        "The upstream this node follows (label), 1 while connected.",
        [(
            &[("upstream", status.upstream.as_str())][..],
            flag(status.connected),
        )],
    )?;
    counter(
        e,
        "flagmesh_upstream_reconnects_total",
        "Upstream streams opened after the first.",
        n(&stats.reconnects),
    )?;
    counter(
        e,
        "flagmesh_upstream_stream_renewals_total",
        "Upstream streams renewed on the same connection once quiet after a large message, releasing the receive buffer it grew.",
        n(&stats.stream_renewals),
    )?;
    counter(
        e,
        "flagmesh_digest_mismatches_total",
        "Digest mismatches detected (each followed by a resync).",
        n(&stats.digest_mismatches),
    )?;
    counter(
        e,
        "flagmesh_gaps_total",
        "Gaps detected (each followed by a resubscribe).",
        n(&stats.gaps),
    )?;
    counter(
        e,
        "flagmesh_snapshots_applied_total",
        "Snapshots applied.",
        n(&stats.snapshots),
    )?;
    counter(
        e,
        "flagmesh_deltas_applied_total",
        "Deltas applied.",
        n(&stats.deltas),
    )?;
    counter(
        e,
        "flagmesh_snapshot_bytes_total",
        "Bytes of snapshots received.",
        n(&stats.snapshot_bytes),
    )?;
    counter(
        e,
        "flagmesh_delta_bytes_total",
        "Bytes of deltas received.",
        n(&stats.delta_bytes),
    )?;
    let conflict = status.history_conflict.as_ref();
    gauge(
        e,
        "flagmesh_history_conflict",
        "1 while an upstream serves another history than the one held (refused until an operator adopts it).",
        flag(conflict.is_some()),
    )?;
    let labels = conflict.map(|c| {
        [
            ("local_history", status.history_id.as_str()),
            ("upstream_history", c.history_id.as_str()),
            ("upstream", c.upstream.as_str()),
        ]
    });
    gauges(
        e,
        "flagmesh_history_conflict_info",
        "The history held, and the other one an upstream serves, while in conflict.",
        labels.iter().map(|l| (&l[..], 1.0)),
    )?;
    counter(
        e,
        "flagmesh_history_conflicts_total",
        "Snapshots of another history refused.",
        n(&stats.history_conflicts),
    )?;
    gauge(
        e,
        "flagmesh_scope_incomplete",
        "1 while the flag sets followed widened and the replica waits for their snapshot (not ready meanwhile).",
        flag(r.replica.needs_snapshot()),
    )?;
    gauge(
        e,
        "flagmesh_store_flags",
        "Flags held in the replica store.",
        r.replica.flag_count() as f64,
    )?;
    gauge(
        e,
        "flagmesh_journal_recovered_records",
        "Journal records given to sled again when the replica opened (writes sled had not flushed before the node stopped).",
        r.replica.journal_recovered().records as f64,
    )?;
    counter(
        e,
        "flagmesh_journal_checkpoints_total",
        "Journal checkpoints: sled flushed and the journal before it deleted.",
        r.replica.journal_checkpoints(),
    )
}
