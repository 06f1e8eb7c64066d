//! Observability of a running mesh (real processes): lag shows while a hub
//! is cut off and returns to zero when it heals; the propagation view
//! reports every PoP at the latest revision after a write (the console's
//! propagation page in a browser is `console.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use flagmesh_integration_tests::relay::LinkMode;
use flagmesh_integration_tests::topology::{Mesh, NodeRef, TopologySpec, eventually};
use flagmesh_proto::v1::*;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn set(mesh: &Mesh, value: &str) -> u64 {
    let mut a = mesh.admin().await.unwrap();
    a.update_flag(UpdateFlagRequest {
        flag_set: "demo".into(),
        key: "greeting".into(),
        definition_json: format!(
            r#"{{"state":"ENABLED","variants":{{"v":"{value}"}},"defaultVariant":"v"}}"#
        ),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_rises_while_a_hub_is_cut_off_and_heals() {
    let _g = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let root = tempfile::tempdir().unwrap();
        let mesh = Mesh::start(TopologySpec::test(root.path(), 1, 2))
            .await
            .unwrap();
        set(&mesh, "one").await;
        mesh.converged(Duration::from_secs(30)).await.unwrap();
        eventually("control knows every node", 20, || async {
            mesh.metric(NodeRef::Control, "flagmesh_nodes_known").await == 3.0
        })
        .await;

        mesh.hub_links[0].set(LinkMode::Cut);
        for i in 0..3 {
            set(&mesh, &format!("cut-{i}")).await;
        }
        let hub_lag = r#"flagmesh_node_lag_revisions{node="hub-0",role="hub"}"#;
        let pop_lag = r#"flagmesh_node_lag_revisions{node="pop-0",role="pop"}"#;
        eventually("control sees the hub and its PoPs behind", 20, || async {
            mesh.metric(NodeRef::Control, hub_lag).await >= 3.0
                && mesh.metric(NodeRef::Control, pop_lag).await >= 3.0
        })
        .await;
        eventually("the hub sees itself cut off", 20, || async {
            mesh.metric(NodeRef::Hub(0), "flagmesh_upstream_connected")
                .await
                == 0.0
                && mesh
                    .metric(NodeRef::Hub(0), "flagmesh_last_sync_message_age_seconds")
                    .await
                    > 1.0
        })
        .await;
        eventually("PoPs report themselves stale", 20, || async {
            mesh.metric(NodeRef::Pop(0), "flagmesh_stale").await == 1.0
        })
        .await;

        mesh.hub_links[0].set(LinkMode::Pass);
        let head = mesh.converged(Duration::from_secs(30)).await.unwrap().0;
        eventually("lag falls back to zero everywhere", 20, || async {
            mesh.metric(NodeRef::Control, hub_lag).await == 0.0
                && mesh.metric(NodeRef::Control, pop_lag).await == 0.0
                && mesh.metric(NodeRef::Hub(0), "flagmesh_lag_revisions").await == 0.0
                && mesh.metric(NodeRef::Pop(0), "flagmesh_lag_revisions").await == 0.0
                && mesh.metric(NodeRef::Pop(0), "flagmesh_lag_seconds").await == 0.0
                && mesh.metric(NodeRef::Pop(0), "flagmesh_stale").await == 0.0
        })
        .await;
        assert_eq!(
            mesh.metric(NodeRef::Pop(1), "flagmesh_applied_revision")
                .await,
            head as f64
        );

        // the propagation view after a write
        let revision = set(&mesh, "after").await;
        let mut a = mesh.admin().await.unwrap();
        eventually("every PoP reported the new revision", 20, || {
            let mut a = a.clone();
            async move {
                let v = a
                    .get_propagation(GetPropagationRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                let pops: Vec<_> = v
                    .nodes
                    .iter()
                    .filter(|n| n.role == NodeRole::Pop as i32)
                    .collect();
                pops.len() == 2
                    && pops
                        .iter()
                        .all(|n| n.applied_revision == revision && n.lag_revisions == 0)
            }
        })
        .await;
        let v = a
            .get_propagation(GetPropagationRequest::default())
            .await
            .unwrap()
            .into_inner();
        let latest = v.revisions.iter().find(|r| r.revision == revision).unwrap();
        assert_eq!((latest.nodes_applied, latest.nodes_total), (3, 3));
        assert!(latest.all_applied_after_ms.is_some());
        assert_eq!(v.applied_distribution.get(&revision), Some(&3));
        // evaluations are counted by reason
        let mut e = mesh.eval(0).await.unwrap();
        e.evaluate(EvaluateRequest {
            flag_set: "demo".into(),
            flag_key: "greeting".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(
            mesh.metric(
                NodeRef::Pop(0),
                r#"flagmesh_evaluations_total{reason="STATIC"}"#
            )
            .await
                >= 1.0
        );
        assert!(
            mesh.metric(
                NodeRef::Pop(0),
                "flagmesh_evaluation_duration_seconds_count"
            )
            .await
                >= 1.0
        );
    })
    .await
    .expect("bounded");
}
