//! The propagation view: the latest report of every node, and for recent
//! revisions when they were committed, how many nodes have applied them and
//! how long the last one took.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use flagmesh_mesh::ReportSink;
use flagmesh_proto::v1::{GetPropagationResponse, NodeReport, NodeStatus, RevisionPropagation};

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
}

impl Propagation {
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
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
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
        if report.node_id.is_empty() {
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
}
