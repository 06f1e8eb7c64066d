//! The propagation view: the latest report of every node, and for recent
//! revisions when they were committed, how many nodes have applied them and
//! how long the last one took.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use flagmesh_mesh::{ReportSink, metrics};
use flagmesh_proto::v1::{GetPropagationResponse, NodeReport, NodeStatus, RevisionPropagation};
use flagmesh_proto::view::role_name;
use prometheus_client::encoding::DescriptorEncoder;

use crate::store::now_ms;

/// How many recent commits and per-node apply times are remembered.
const REMEMBERED: usize = 512;

#[derive(Debug, Default)]
struct NodeRecord {
    latest: NodeReport,
    last_report_ms: i64,
    /// (revision, when applied) for each revision change seen, oldest first.
    applied: VecDeque<(u64, i64)>,
}

/// Tracks reports and commits.
#[derive(Debug, Default)]
pub struct Propagation {
    nodes: Mutex<HashMap<String, NodeRecord>>,
    commits: Mutex<VecDeque<(u64, i64)>>,
    /// Reports dropped because their node id is not a valid id.
    rejected: AtomicU64,
    /// A node silent this long is forgotten (0: never).
    forget_after_ms: i64,
}

/// How long a silent node stays in the view by default: ten minutes.
pub const FORGET_AFTER_MS: i64 = 600_000;

/// Whether `id` may name a node: 1 to 128 ASCII letters, digits and
/// `.-_:@/`. Ids arrive in remote reports and become label values and
/// table cells, so nothing else is let in.
pub fn valid_node_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:@/".contains(&b))
}

impl Propagation {
    /// A view that forgets nodes silent for `forget_after_ms` (0: never),
    /// so dead nodes stop counting as lagging.
    pub fn new(forget_after_ms: i64) -> Self {
        Self {
            forget_after_ms,
            ..Self::default()
        }
    }

    /// A revision was committed at `at_ms`.
    pub fn committed(&self, revision: u64, at_ms: i64) {
        let mut c = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        c.push_back((revision, at_ms));
        while c.len() > REMEMBERED {
            c.pop_front();
        }
    }

    /// The view, for `recent` revisions newest first, at `head`.
    pub fn view(&self, head: u64, recent: usize) -> GetPropagationResponse {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if self.forget_after_ms > 0 {
            let horizon = now_ms() - self.forget_after_ms;
            nodes.retain(|_, n| n.last_report_ms >= horizon);
        }
        let commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = GetPropagationResponse {
            head_revision: head,
            ..Default::default()
        };
        let mut ids: Vec<&String> = nodes.keys().collect();
        ids.sort();
        let mut distribution: BTreeMap<u64, u32> = BTreeMap::new();
        for id in ids {
            let n = &nodes[id];
            *distribution.entry(n.latest.applied_revision).or_default() += 1;
            out.nodes.push(NodeStatus {
                node_id: id.clone(),
                role: n.latest.role,
                region: n.latest.region.clone(),
                upstream: n.latest.upstream.clone(),
                applied_revision: n.latest.applied_revision,
                lag_revisions: head.saturating_sub(n.latest.applied_revision),
                last_report_unix_ms: n.last_report_ms,
                rejected_revision: n.latest.rejected_revision,
                rejected_error: n.latest.rejected_error.clone(),
                via: n.latest.via.clone(),
                history_id: n.latest.history_id.clone(),
                conflict_history_id: n.latest.conflict_history_id.clone(),
            });
        }
        out.applied_distribution = distribution.into_iter().collect();
        let total = nodes.len() as u32;
        for &(revision, committed) in commits.iter().rev().take(recent) {
            let mut applied = 0u32;
            let mut slowest: Option<i64> = Some(committed);
            for n in nodes.values() {
                // when the node first reported this revision or a later one
                match n.applied.iter().find(|(r, _)| *r >= revision) {
                    Some(&(_, at)) => {
                        applied += 1;
                        slowest = slowest.map(|s| s.max(at));
                    }
                    None => slowest = None,
                }
            }
            out.revisions.push(RevisionPropagation {
                revision,
                committed_at_unix_ms: committed,
                nodes_applied: applied,
                nodes_total: total,
                all_applied_after_ms: match slowest {
                    Some(s) if total > 0 => Some((s - committed).max(0)),
                    _ => None,
                },
            });
        }
        out
    }
}

impl ReportSink for Propagation {
    fn report(&self, report: NodeReport) {
        if !valid_node_id(&report.node_id) {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                len = report.node_id.len(),
                "report with an invalid node id dropped"
            );
            return;
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let record = nodes.entry(report.node_id.clone()).or_default();
        let at = if report.applied_at_unix_ms > 0 {
            report.applied_at_unix_ms
        } else {
            now_ms()
        };
        if record
            .applied
            .back()
            .is_none_or(|(r, _)| *r != report.applied_revision)
        {
            record.applied.push_back((report.applied_revision, at));
            while record.applied.len() > REMEMBERED {
                record.applied.pop_front();
            }
        }
        record.last_report_ms = now_ms();
        record.latest = report;
    }
}

impl Propagation {
    /// Reports dropped for an invalid node id.
    pub fn rejected_reports(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// The view's metrics: per node (applied revision, lag), node count, the
/// time the newest fully propagated revision took, and dropped reports.
pub fn encode_metrics(
    e: &mut DescriptorEncoder<'_>,
    r: &GetPropagationResponse,
    rejected_reports: u64,
) -> std::fmt::Result {
    metrics::gauge(
        e,
        "flagmesh_nodes_known",
        "Nodes that have reported to the control plane.",
        r.nodes.len() as f64,
    )?;
    let labels: Vec<[(&str, &str); 2]> = r
        .nodes
        .iter()
        .map(|n| [("node", n.node_id.as_str()), ("role", role_name(n.role))])
        .collect();
    metrics::gauges(
        e,
        "flagmesh_node_applied_revision",
        "The revision each node last reported applied.",
        labels
            .iter()
            .zip(&r.nodes)
            .map(|(l, n)| (&l[..], n.applied_revision as f64)),
    )?;
    metrics::gauges(
        e,
        "flagmesh_node_lag_revisions",
        "Revisions each node is behind the control plane's head.",
        labels
            .iter()
            .zip(&r.nodes)
            .map(|(l, n)| (&l[..], n.lag_revisions as f64)),
    )?;
    metrics::counter(
        e,
        "flagmesh_reports_rejected_total",
        "Node reports dropped because their node id is not a valid id.",
        rejected_reports,
    )?;
    if let Some(ms) = r.revisions.iter().find_map(|p| p.all_applied_after_ms) {
        metrics::gauge(
            e,
            "flagmesh_propagation_seconds",
            "Commit to applied at every node, for the newest revision every node has.",
            ms as f64 / 1000.0,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_time_until_every_node_applied() {
        let p = Propagation::default();
        p.committed(5, 1_000);
        for (node, at) in [("a", 1_020), ("b", 1_070)] {
            p.report(NodeReport {
                node_id: node.into(),
                applied_revision: 5,
                applied_at_unix_ms: at,
                ..Default::default()
            });
        }
        let v = p.view(5, 10);
        assert_eq!(v.revisions[0].nodes_applied, 2);
        assert_eq!(v.revisions[0].all_applied_after_ms, Some(70));
        assert_eq!(v.applied_distribution.get(&5), Some(&2));
    }

    #[test]
    fn reports_with_invalid_node_ids_are_dropped() {
        let p = Propagation::default();
        for id in ["", "a\"b", "x\ny", "evil}{", &"n".repeat(129)] {
            p.report(NodeReport {
                node_id: id.into(),
                applied_revision: 1,
                ..Default::default()
            });
        }
        p.report(NodeReport {
            node_id: "pop-eu.1:7071".into(),
            applied_revision: 1,
            ..Default::default()
        });
        let v = p.view(1, 1);
        assert_eq!(v.nodes.len(), 1);
        assert_eq!(v.nodes[0].node_id, "pop-eu.1:7071");
        assert_eq!(p.rejected_reports(), 5);
    }

    #[test]
    fn silent_nodes_are_forgotten() {
        let p = Propagation::new(50);
        p.report(NodeReport {
            node_id: "gone".into(),
            applied_revision: 1,
            ..Default::default()
        });
        assert_eq!(p.view(1, 1).nodes.len(), 1);
        std::thread::sleep(std::time::Duration::from_millis(80));
        p.report(NodeReport {
            node_id: "alive".into(),
            applied_revision: 1,
            ..Default::default()
        });
        let ids: Vec<String> = p.view(1, 1).nodes.into_iter().map(|n| n.node_id).collect();
        assert_eq!(ids, ["alive"]);
    }
}
