//! Evaluation counters of a PoP: evaluations by reason and a latency
//! histogram (time spent resolving inside the PoP, without the network),
//! kept in atomics so recording costs a few relaxed increments.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flagmesh_engine::Reason;
use flagmesh_mesh::metrics;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.005,
    0.025,
];

const REASONS: [Reason; 5] = [
    Reason::Static,
    Reason::TargetingMatch,
    Reason::Default,
    Reason::Disabled,
    Reason::Error,
];

/// Counters of one PoP's evaluations.
#[derive(Debug, Default)]
pub struct EvalStats {
    by_reason: [AtomicU64; 5],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    /// OFREP bulk answers with the flags, and `304 Not Modified` ones.
    bulk_full: AtomicU64,
    bulk_not_modified: AtomicU64,
}

fn reason_index(r: Reason) -> usize {
    match r {
        Reason::Static => 0,
        Reason::TargetingMatch => 1,
        Reason::Default => 2,
        Reason::Disabled => 3,
        Reason::Error => 4,
    }
}

fn bucket_index(took: Duration) -> Option<usize> {
    let secs = took.as_secs_f64();
    BUCKETS.iter().position(|b| secs <= *b)
}

impl EvalStats {
    /// Records one evaluation.
    pub fn record(&self, reason: Reason, took: Duration) {
        self.by_reason[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
        if let Some(i) = bucket_index(took) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Records the evaluations of one request counted in `batch`, with
    /// one update per counter rather than one per flag (the counters are
    /// shared by every core).
    pub fn record_batch(&self, batch: &EvalBatch) {
        for (n, c) in batch.by_reason.iter().zip(&self.by_reason) {
            if *n > 0 {
                c.fetch_add(*n, Ordering::Relaxed);
            }
        }
        for (n, c) in batch.buckets.iter().zip(&self.buckets) {
            if *n > 0 {
                c.fetch_add(*n, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(batch.count, Ordering::Relaxed);
        self.sum_nanos.fetch_add(batch.sum_nanos, Ordering::Relaxed);
    }
}

/// The evaluations of one request, counted locally (see
/// [`EvalStats::record_batch`]).
#[derive(Debug, Default)]
pub struct EvalBatch {
    by_reason: [u64; 5],
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_nanos: u64,
}

impl EvalBatch {
    /// Counts one evaluation.
    pub fn record(&mut self, reason: Reason, took: Duration) {
        self.by_reason[reason_index(reason)] += 1;
        if let Some(i) = bucket_index(took) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_nanos += took.as_nanos() as u64;
    }
}

impl EvalStats {
    /// Records one OFREP bulk answer: the flags, or `304 Not Modified`.
    pub fn record_bulk(&self, not_modified: bool) {
        let n = if not_modified {
            &self.bulk_not_modified
        } else {
            &self.bulk_full
        };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

impl prometheus_client::collector::Collector for EvalStats {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let by_reason: Vec<(&[(&str, &str)], u64)> = REASONS
            .iter()
            .map(|r| {
                let labels: &[(&str, &str)] = match r {
                    Reason::Static => &[("reason", "STATIC")],
                    Reason::TargetingMatch => &[("reason", "TARGETING_MATCH")],
                    Reason::Default => &[("reason", "DEFAULT")],
                    Reason::Disabled => &[("reason", "DISABLED")],
                    Reason::Error => &[("reason", "ERROR")],
                };
                (
                    labels,
                    self.by_reason[reason_index(*r)].load(Ordering::Relaxed),
                )
            })
            .collect();
        metrics::counters(
            &mut e,
            "flagmesh_evaluations_total",
            "Flag evaluations served, by reason.",
            by_reason,
        )?;
        metrics::counters(
            &mut e,
            "flagmesh_ofrep_bulk_answers_total",
            "OFREP bulk evaluations answered, with the flags (full) or 304 Not Modified.",
            [
                (
                    &[("answer", "full")][..],
                    self.bulk_full.load(Ordering::Relaxed),
                ),
                (
                    &[("answer", "not_modified")][..],
                    self.bulk_not_modified.load(Ordering::Relaxed),
                ),
            ],
        )?;
        let count = self.count.load(Ordering::Relaxed);
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(b, n)| (*b, n.load(Ordering::Relaxed)))
            .collect();
        let counted: u64 = buckets.iter().map(|(_, n)| n).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(counted)));
        let histogram = e.encode_descriptor(
            "flagmesh_evaluation_duration_seconds",
            "Time to resolve one flag inside the PoP (network excluded).",
            None,
            MetricType::Histogram,
        )?;
        let mut histogram = histogram;
        histogram.encode_histogram::<NoLabelSet>(
            self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            &buckets,
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let s = EvalStats::default();
        s.record(Reason::Static, Duration::from_nanos(500));
        let mut batch = EvalBatch::default();
        batch.record(Reason::Error, Duration::from_micros(30));
        batch.record(Reason::Static, Duration::from_secs(1));
        s.record_batch(&batch);
        s.record_bulk(true);
        s.record_bulk(true);
        s.record_bulk(false);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(s));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
        assert!(
            text.contains("flagmesh_evaluations_total{reason=\"STATIC\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("flagmesh_ofrep_bulk_answers_total{answer=\"not_modified\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("flagmesh_ofrep_bulk_answers_total{answer=\"full\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("flagmesh_evaluation_duration_seconds_bucket{le=\"0.000001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("flagmesh_evaluation_duration_seconds_bucket{le=\"0.00005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("flagmesh_evaluation_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
    }
}
