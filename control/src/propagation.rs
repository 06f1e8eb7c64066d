//! The propagation view: the latest report of every node, and for recent
//! revisions when they were committed, how many nodes have applied them and
//! how long the last one took.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use flagmesh_mesh::ReportSink;
use flagmesh_proto::v1::{
    GetPropagationResponse, NodeReport, NodeRole, NodeStatus, RevisionPropagation,
};

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

/// A node role's name.
pub fn role_name(role: i32) -> &'static str {
    match NodeRole::try_from(role) {
        Ok(NodeRole::Control) => "control",
        Ok(NodeRole::Hub) => "hub",
        Ok(NodeRole::Pop) => "pop",
        Ok(NodeRole::Sdk) => "sdk",
        _ => "?",
    }
}

/// The view as JSON (for `flagctl status -o json` and the status page).
pub fn view_json(r: &GetPropagationResponse) -> serde_json::Value {
    use serde_json::json;
    json!({
        "head_revision": r.head_revision,
        "now_unix_ms": now_ms(),
        "nodes": r.nodes.iter().map(|n| json!({
            "node_id": n.node_id, "role": role_name(n.role), "region": n.region, "upstream": n.upstream,
            "applied_revision": n.applied_revision, "lag_revisions": n.lag_revisions,
            "last_report_unix_ms": n.last_report_unix_ms, "rejected_revision": n.rejected_revision,
            "rejected_error": n.rejected_error, "via": n.via,
        })).collect::<Vec<_>>(),
        "revisions": r.revisions.iter().map(|p| json!({
            "revision": p.revision, "committed_at_unix_ms": p.committed_at_unix_ms,
            "nodes_applied": p.nodes_applied, "nodes_total": p.nodes_total,
            "all_applied_after_ms": p.all_applied_after_ms,
        })).collect::<Vec<_>>(),
        "applied_distribution": r.applied_distribution.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

/// The view's metrics: per node (applied revision, lag), node count, and
/// the time the newest fully propagated revision took.
pub fn render_metrics(e: &mut flagmesh_mesh::metrics::Exposition, r: &GetPropagationResponse) {
    e.single(
        "flagmesh_nodes_known",
        "gauge",
        "Nodes that have reported to the control plane.",
        r.nodes.len() as f64,
    );
    e.family(
        "flagmesh_node_applied_revision",
        "gauge",
        "The revision each node last reported applied.",
    );
    for n in &r.nodes {
        e.sample(
            "flagmesh_node_applied_revision",
            &[("node", &n.node_id), ("role", role_name(n.role))],
            n.applied_revision as f64,
        );
    }
    e.family(
        "flagmesh_node_lag_revisions",
        "gauge",
        "Revisions each node is behind the control plane's head.",
    );
    for n in &r.nodes {
        e.sample(
            "flagmesh_node_lag_revisions",
            &[("node", &n.node_id), ("role", role_name(n.role))],
            n.lag_revisions as f64,
        );
    }
    if let Some(ms) = r.revisions.iter().find_map(|p| p.all_applied_after_ms) {
        e.single(
            "flagmesh_propagation_seconds",
            "gauge",
            "Commit to applied at every node, for the newest revision every node has.",
            ms as f64 / 1000.0,
        );
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
