//! The propagation view (`Admin/GetPropagation`) in the forms people read:
//! node role names and the JSON that `flagctl status -o json` prints and
//! control's status page polls.

use crate::v1::{GetPropagationResponse, NodeRole};

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
        "now_unix_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
        "nodes": r.nodes.iter().map(|n| json!({
            "node_id": n.node_id, "role": role_name(n.role), "region": n.region, "upstream": n.upstream,
            "applied_revision": n.applied_revision, "lag_revisions": n.lag_revisions,
            "last_report_unix_ms": n.last_report_unix_ms, "rejected_revision": n.rejected_revision,
            "rejected_error": n.rejected_error, "via": n.via,
            "history_id": n.history_id, "conflict_history_id": n.conflict_history_id,
        })).collect::<Vec<_>>(),
        "revisions": r.revisions.iter().map(|p| json!({
            "revision": p.revision, "committed_at_unix_ms": p.committed_at_unix_ms,
            "nodes_applied": p.nodes_applied, "nodes_total": p.nodes_total,
            "all_applied_after_ms": p.all_applied_after_ms,
        })).collect::<Vec<_>>(),
        "applied_distribution": r.applied_distribution.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}
