//! How `flagctl` shows what the Admin API answers: aligned tables for
//! people (the default), JSON for scripts (`--output json`), unified diffs
//! of changes.

use std::fmt::Write as _;

use flagmesh_proto::v1::*;
use flagmesh_proto::view::role_name;
use serde_json::{Value, json};

/// Aligns rows into columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub(crate) fn flag_json(f: &Flag) -> Value {
    json!({
        "flag_set": f.flag_set,
        "key": f.key,
        "definition": serde_json::from_slice::<Value>(&f.definition_json).unwrap_or(Value::Null),
        "mod_revision": f.mod_revision,
        "create_revision": f.create_revision,
    })
}

pub(crate) fn summary(def: &[u8]) -> (String, String, String) {
    let v: Value = serde_json::from_slice(def).unwrap_or(Value::Null);
    let state = v["state"].as_str().unwrap_or("?").to_owned();
    let default = v["defaultVariant"].as_str().unwrap_or("-").to_owned();
    let targeting = if v.get("targeting").is_some() {
        "yes"
    } else {
        "no"
    }
    .to_owned();
    (state, default, targeting)
}

pub(crate) fn kind_name(k: i32) -> &'static str {
    match ChangeKind::try_from(k) {
        Ok(ChangeKind::Create) => "create",
        Ok(ChangeKind::Update) => "update",
        Ok(ChangeKind::Delete) => "delete",
        _ => "change",
    }
}

pub(crate) fn change_json(c: &FlagChange) -> Value {
    let parse = |s: &str| {
        if s.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(s).unwrap_or(Value::Null)
        }
    };
    json!({
        "flag_set": c.flag_set,
        "key": c.key,
        "kind": kind_name(c.kind),
        "before": parse(&c.before_json),
        "after": parse(&c.after_json),
    })
}

pub(crate) fn warning_json(w: &ValidationWarning) -> Value {
    json!({
        "flag_set": w.flag_set,
        "key": w.key,
        "pointer": w.pointer,
        "message": w.message,
    })
}

/// Warnings, one line each (`warning: SET/KEY POINTER: MESSAGE`), for
/// stderr; nothing when there are none.
pub fn render_warnings(warnings: &[ValidationWarning]) -> String {
    let mut out = String::new();
    for w in warnings {
        let _ = writeln!(
            out,
            "warning: {}/{} {}: {} (flagd loads it; --strict refuses it)",
            w.flag_set, w.key, w.pointer, w.message
        );
    }
    out
}

pub(crate) fn pretty(json: &str) -> String {
    serde_json::from_str::<Value>(json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .map(|s| s + "\n")
        .unwrap_or_default()
}

/// A change as a diff: a header line and, for updates, a unified diff.
pub fn render_change(c: &FlagChange) -> String {
    let what = if c.key.is_empty() {
        format!("{} (flag-set metadata)", c.flag_set)
    } else {
        format!("{}/{}", c.flag_set, c.key)
    };
    let sign = match kind_name(c.kind) {
        "create" => "+",
        "delete" => "-",
        _ => "~",
    };
    let mut out = format!("{sign} {} {what}\n", kind_name(c.kind));
    let (before, after) = (pretty(&c.before_json), pretty(&c.after_json));
    let diff = similar::TextDiff::from_lines(&before, &after);
    for change in diff.iter_all_changes() {
        let mark = match change.tag() {
            similar::ChangeTag::Delete => "-",
            similar::ChangeTag::Insert => "+",
            similar::ChangeTag::Equal => " ",
        };
        if kind_name(c.kind) == "update" || change.tag() != similar::ChangeTag::Equal {
            let _ = write!(out, "    {mark} {change}");
        }
    }
    out
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A node's history, and the other history it refuses when in conflict.
fn history_cell(n: &NodeStatus) -> String {
    let short = |h: &str| h.chars().take(8).collect::<String>();
    match (n.history_id.as_str(), n.conflict_history_id.as_str()) {
        ("", _) => "-".into(),
        (h, "") => short(h),
        (h, other) => format!("{} CONFLICT: upstream serves {other}", short(h)),
    }
}

pub(crate) fn print_status(r: &GetPropagationResponse, json_out: bool) {
    if json_out {
        print_json(&flagmesh_proto::view::view_json(r));
        return;
    }
    println!("head revision {}", r.head_revision);
    let mut dist: Vec<(&u64, &u32)> = r.applied_distribution.iter().collect();
    dist.sort();
    let parts: Vec<String> = dist
        .iter()
        .rev()
        .map(|(rev, n)| format!("r{rev}: {n}"))
        .collect();
    println!(
        "nodes by applied revision: {}",
        if parts.is_empty() {
            "none reported".into()
        } else {
            parts.join(", ")
        }
    );
    let rows: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node_id.clone(),
                role_name(n.role).into(),
                n.region.clone(),
                n.upstream.clone(),
                n.applied_revision.to_string(),
                n.lag_revisions.to_string(),
                format_ms(n.last_report_unix_ms),
                history_cell(n),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "NODE",
                "ROLE",
                "REGION",
                "UPSTREAM",
                "APPLIED",
                "LAG",
                "LAST REPORT (UTC)",
                "HISTORY"
            ],
            &rows
        )
    );
    let rows: Vec<Vec<String>> = r
        .revisions
        .iter()
        .map(|p| {
            vec![
                p.revision.to_string(),
                format_ms(p.committed_at_unix_ms),
                format!("{}/{}", p.nodes_applied, p.nodes_total),
                p.all_applied_after_ms
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_else(|| "pending".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "REVISION",
                "COMMITTED (UTC)",
                "APPLIED",
                "ALL APPLIED AFTER"
            ],
            &rows
        )
    );
}

/// Formats Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (Howard Hinnant's algorithm, public domain)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_ms(0), "-");
        assert_eq!(format_ms(1_700_000_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn aligns_tables() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }
}
