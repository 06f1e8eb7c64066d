//! The operators' files in `deploy/`: the Prometheus alerting rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), and
//! every flagmesh metric the rules and the Grafana dashboard name is one a
//! running mesh (control, hub, PoP) serves.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use flagmesh_integration_tests::flagd_kit::workspace_root;
use flagmesh_integration_tests::tools::promtool;
use flagmesh_integration_tests::topology::{Mesh, NodeRef, TopologySpec};
use flagmesh_proto::v1::*;

fn promtool_ok(args: &[&str]) {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(workspace_root().join("deploy/prometheus"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alerting_rules_check_and_pass_their_unit_tests() {
    promtool_ok(&["check", "rules", "flagmesh-rules.yml"]);
    promtool_ok(&["test", "rules", "flagmesh-rules.test.yml"]);
}

/// The `flagmesh_*` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("flagmesh_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_and_the_dashboard_name_only_metrics_the_mesh_serves() {
    let rules =
        std::fs::read_to_string(workspace_root().join("deploy/prometheus/flagmesh-rules.yml"))
            .unwrap();
    let dashboard =
        std::fs::read_to_string(workspace_root().join("deploy/grafana/flagmesh-dashboard.json"))
            .unwrap();
    let dashboard_json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(
        dashboard_json["panels"].as_array().unwrap().len() >= 6,
        "the dashboard lost panels"
    );
    // the queries only: annotations may name series that exist only
    // while something is wrong
    let mut in_expr = false;
    let mut rule_exprs = String::new();
    for line in rules.lines() {
        let t = line.trim_start();
        if t.starts_with("expr:") {
            in_expr = true;
        } else if t.starts_with("for:") || t.starts_with("labels:") {
            in_expr = false;
        }
        if in_expr {
            rule_exprs.push_str(line);
            rule_exprs.push('\n');
        }
    }
    let mut wanted = metric_names(&rule_exprs);
    for panel in dashboard_json["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            wanted.extend(metric_names(target["expr"].as_str().unwrap_or_default()));
        }
    }
    assert!(wanted.len() >= 9, "{wanted:?}");

    tokio::time::timeout(Duration::from_secs(120), async {
        let root = tempfile::tempdir().unwrap();
        let mesh = Mesh::start(TopologySpec::test(root.path(), 1, 1))
            .await
            .unwrap();
        let mut admin = mesh.admin().await.unwrap();
        admin
            .update_flag(UpdateFlagRequest {
                flag_set: "demo".into(),
                key: "f".into(),
                definition_json:
                    r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"on"}"#
                        .into(),
                force: true,
                ..Default::default()
            })
            .await
            .unwrap();
        mesh.converged(Duration::from_secs(30)).await.unwrap();
        // an evaluation, so the PoP's evaluation counters have a sample
        mesh.eval(0)
            .await
            .unwrap()
            .evaluate(EvaluateRequest {
                flag_set: "demo".into(),
                flag_key: "f".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let served = || async {
            let mut names = BTreeSet::new();
            for n in [NodeRef::Control, NodeRef::Hub(0), NodeRef::Pop(0)] {
                for series in mesh.metrics(n).await.unwrap_or_default().keys() {
                    let name = series.split('{').next().unwrap_or_default();
                    names.insert(name.to_owned());
                }
            }
            names
        };
        // propagation time appears once every node has reported the revision
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let names = served().await;
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|w| {
                    !names.contains(*w)
                        && !names.contains(&format!("{w}_total"))
                        && !names.contains(&format!("{w}_bucket"))
                })
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "named in deploy/ but served by no node: {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("bounded");
}
