//! Replication safety on real processes (control, one hub, two PoPs, a
//! relay on every link): concurrent writers never leave the mesh behind
//! control, and a control plane restarted on an empty data directory never
//! wipes the fleet: it refuses to start without `--init`, and with it every
//! node keeps serving what it holds and reports the conflict until an
//! operator adopts the new history.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use flagmesh_integration_tests::topology::{
    Mesh, NodeRef, TopologySpec, eventually, http_get, http_request,
};
use flagmesh_proto::v1::*;
use prost_types::value::Kind;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONVERGE: Duration = Duration::from_secs(20);

fn flag(value: &str) -> String {
    format!(r#"{{"state":"ENABLED","variants":{{"v":"{value}"}},"defaultVariant":"v"}}"#)
}

async fn set(mesh: &Mesh, key: &str, value: &str) -> u64 {
    mesh.admin()
        .await
        .unwrap()
        .update_flag(UpdateFlagRequest {
            flag_set: "demo".into(),
            key: key.into(),
            definition_json: flag(value),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

async fn value_at(mesh: &Mesh, pop: usize, key: &str) -> Option<String> {
    let r = mesh
        .eval(pop)
        .await
        .unwrap()
        .evaluate(EvaluateRequest {
            flag_set: "demo".into(),
            flag_key: key.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match r.value.and_then(|v| v.kind) {
        Some(Kind::StringValue(s)) => Some(s),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_leave_the_mesh_behind() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut spec = TopologySpec::test(root.path(), 1, 2);
    // 320 writes and the convergence checks between rounds, as fast as the
    // machine goes: on a fast run they exceed the Admin rate limit (100/s,
    // bursts of 200), which this test is not about (bad_input.rs tests it)
    spec.envs.push(("FLAGMESH_ADMIN_RATE".into(), "0".into()));
    let mesh = Mesh::start(spec).await.unwrap();
    // one client (one connection) per writer, so the calls really overlap
    let mut writers = Vec::new();
    for _ in 0..8 {
        writers.push(mesh.admin().await.unwrap());
    }
    for round in 0..40 {
        let calls: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(w, admin)| {
                let mut admin = admin.clone();
                tokio::spawn(async move {
                    admin
                        .update_flag(UpdateFlagRequest {
                            flag_set: "demo".into(),
                            key: format!("w{}", w % 3),
                            definition_json: flag(&format!("r{round}-w{w}")),
                            force: true,
                            ..Default::default()
                        })
                        .await
                        .map(|r| r.into_inner().revision)
                })
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        let (revision, _) = mesh
            .converged(CONVERGE)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(revision, 8 * (round + 1), "every write is one revision");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_restarted_on_an_empty_directory_never_wipes_the_fleet() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(TopologySpec::test(root.path(), 1, 2))
        .await
        .unwrap();
    set(&mesh, "banner", "old").await;
    set(&mesh, "limit", "10").await;
    let (old_revision, _) = mesh.converged(CONVERGE).await.unwrap();
    let old_history = mesh
        .admin()
        .await
        .unwrap()
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner()
        .history_id;

    // control loses its data: stopped, its directory moved away
    assert!(mesh.stop(NodeRef::Control));
    std::fs::rename(
        root.path().join("control"),
        root.path().join("control-lost"),
    )
    .unwrap();

    // without --init it refuses to start, saying why
    let with_init = mesh.node(NodeRef::Control).args_for_restart();
    let without: Vec<String> = with_init
        .iter()
        .filter(|a| *a != "--init")
        .cloned()
        .collect();
    mesh.node(NodeRef::Control).set_args(without);
    let refused = mesh.restart(NodeRef::Control).err().map(|e| e.to_string());
    assert!(
        refused.as_deref().is_some_and(|m| m.contains("--init")),
        "{refused:?}"
    );
    assert!(!root.path().join("control").join("db").exists());

    // with --init: a new mesh, on the same address
    mesh.node(NodeRef::Control).set_args(with_init);
    mesh.restart(NodeRef::Control).unwrap();
    set(&mesh, "banner", "new").await;
    let new_history = mesh
        .admin()
        .await
        .unwrap()
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner()
        .history_id;
    assert_ne!(new_history, old_history);

    // the hub refuses the new history and reports the conflict everywhere
    // an operator looks; every PoP keeps its last values
    eventually("the hub reports the conflict", 20, || async {
        mesh.metric(NodeRef::Hub(0), "flagmesh_history_conflict")
            .await
            == 1.0
    })
    .await;
    let readyz = http_get(mesh.hubs[0].http.unwrap(), "/readyz")
        .await
        .unwrap();
    assert!(
        readyz.contains("history conflict") && readyz.contains(&new_history),
        "{readyz}"
    );
    eventually("flagctl status shows the conflict", 20, || async {
        let view = mesh
            .admin()
            .await
            .unwrap()
            .get_propagation(GetPropagationRequest::default())
            .await
            .unwrap()
            .into_inner();
        view.nodes.iter().any(|n| {
            n.node_id == mesh.hubs[0].name
                && n.history_id == old_history
                && n.conflict_history_id == new_history
        })
    })
    .await;
    for pop in 0..2 {
        assert_eq!(value_at(&mesh, pop, "banner").await.as_deref(), Some("old"));
        assert_eq!(value_at(&mesh, pop, "limit").await.as_deref(), Some("10"));
        assert_eq!(
            mesh.metric(NodeRef::Pop(pop), "flagmesh_applied_revision")
                .await,
            old_revision as f64
        );
    }

    // the operator adopts the new history: the fleet follows it, PoPs too
    for n in [NodeRef::Hub(0), NodeRef::Pop(0), NodeRef::Pop(1)] {
        assert!(mesh.stop(n));
        let mut args = mesh.node(n).args_for_restart();
        args.extend(["--adopt-history".into(), new_history.clone()]);
        mesh.node(n).set_args(args);
        mesh.restart(n).unwrap();
    }
    mesh.converged(CONVERGE).await.unwrap();
    for pop in 0..2 {
        assert_eq!(value_at(&mesh, pop, "banner").await.as_deref(), Some("new"));
        assert_eq!(
            value_at(&mesh, pop, "limit").await,
            None,
            "the new mesh has no such flag"
        );
    }
    assert_eq!(
        mesh.metric(NodeRef::Hub(0), "flagmesh_history_conflict")
            .await,
        0.0
    );
    // lag and staleness belong to the new history
    for pop in 0..2 {
        eventually("the PoP is fresh again", 20, || async {
            mesh.metric(NodeRef::Pop(pop), "flagmesh_stale").await == 0.0
                && mesh
                    .metric(NodeRef::Pop(pop), "flagmesh_lag_revisions")
                    .await
                    == 0.0
        })
        .await;
    }
}

/// What control holds of `set`: each flag's key and value (each test flag
/// has one string variant).
async fn control_flags(mesh: &Mesh, set: &str) -> Vec<(String, String)> {
    let r = mesh
        .admin()
        .await
        .unwrap()
        .list_flags(ListFlagsRequest {
            flag_set: set.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out: Vec<(String, String)> = r
        .flags
        .iter()
        .map(|f| {
            let def: serde_json::Value = serde_json::from_slice(&f.definition_json).unwrap();
            (
                f.key.clone(),
                def["variants"]["v"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// What PoP 0 serves of `set`.
async fn pop_flags(mesh: &Mesh, set: &str) -> Vec<(String, String)> {
    let r = mesh
        .eval(0)
        .await
        .unwrap()
        .evaluate_all(EvaluateAllRequest {
            flag_set: set.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out: Vec<(String, String)> = r
        .flags
        .into_iter()
        .filter_map(|f| match f.value.and_then(|v| v.kind) {
            Some(Kind::StringValue(s)) => Some((f.flag_key, s)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_changes_converge_to_exactly_the_in_scope_flags() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(TopologySpec::test(root.path(), 1, 1))
        .await
        .unwrap();
    let mut admin = mesh.admin().await.unwrap();
    for set in ["a", "b", "c"] {
        for i in 0..3 {
            admin
                .update_flag(UpdateFlagRequest {
                    flag_set: set.into(),
                    key: format!("{set}{i}"),
                    definition_json: flag(&format!("{set}-{i}")),
                    force: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    mesh.converged(CONVERGE).await.unwrap();
    let base = mesh.node(NodeRef::Pop(0)).args_for_restart();
    // narrow, widen, move, and back to every set, each across a restart;
    // changes made while the PoP is down must show up too
    for (step, scope) in [vec!["a"], vec!["a", "b"], vec!["b"], vec![]]
        .into_iter()
        .enumerate()
    {
        assert!(mesh.stop(NodeRef::Pop(0)));
        admin
            .update_flag(UpdateFlagRequest {
                flag_set: "b".into(),
                key: "b0".into(),
                definition_json: flag(&format!("b-changed-{step}")),
                force: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut args = base.clone();
        if !scope.is_empty() {
            args.extend(["--flag-sets".into(), scope.join(",")]);
        }
        mesh.node(NodeRef::Pop(0)).set_args(args);
        mesh.restart(NodeRef::Pop(0)).unwrap();
        for set in ["a", "b", "c"] {
            let in_scope = scope.is_empty() || scope.contains(&set);
            let expected = if in_scope {
                control_flags(&mesh, set).await
            } else {
                Vec::new()
            };
            eventually(
                &format!("step {step} ({scope:?}): set {set}"),
                20,
                || async { pop_flags(&mesh, set).await == expected },
            )
            .await;
        }
    }

    // widened while its upstream is away: the PoP serves what it holds
    // but is not ready (and says why) until the snapshot of the new
    // scope comes
    for (scope, hub_up) in [(vec!["a"], true), (vec!["a", "c"], false)] {
        assert!(mesh.stop(NodeRef::Pop(0)));
        if !hub_up {
            assert!(mesh.stop(NodeRef::Hub(0)));
        }
        let mut args = base.clone();
        args.extend(["--flag-sets".into(), scope.join(",")]);
        mesh.node(NodeRef::Pop(0)).set_args(args);
        mesh.restart(NodeRef::Pop(0)).unwrap();
        if hub_up {
            let expected = control_flags(&mesh, "a").await;
            eventually("narrowed to a", 20, || async {
                pop_flags(&mesh, "a").await == expected
            })
            .await;
        }
    }
    let http = mesh.pops[0].http.unwrap();
    eventually(
        "the widened PoP says it waits for a snapshot",
        20,
        || async {
            let (status, _, body) = http_request(http, "GET", "/readyz", "", &[])
                .await
                .unwrap_or_default();
            status == 503 && body.contains("waiting for their snapshot")
        },
    )
    .await;
    assert_eq!(
        mesh.metric(NodeRef::Pop(0), "flagmesh_scope_incomplete")
            .await,
        1.0
    );
    assert_eq!(pop_flags(&mesh, "c").await, Vec::new());
    assert_eq!(pop_flags(&mesh, "a").await, control_flags(&mesh, "a").await);
    mesh.restart(NodeRef::Hub(0)).unwrap();
    let expected = control_flags(&mesh, "c").await;
    eventually("the widened scope filled", 20, || async {
        pop_flags(&mesh, "c").await == expected
    })
    .await;
    eventually("ready once whole", 20, || async {
        let (status, _, _) = http_request(http, "GET", "/readyz", "", &[])
            .await
            .unwrap_or_default();
        status == 200
    })
    .await;
    assert_eq!(
        mesh.metric(NodeRef::Pop(0), "flagmesh_scope_incomplete")
            .await,
        0.0
    );
}

/// With sync writes (the default), what a PoP served just before a SIGKILL
/// it serves after the restart, cut off from its hub: sled had not flushed
/// the last changes (it is flushed by the journal's checkpoints, tens of
/// seconds apart), so the journal is what brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_killed_right_after_applying_serves_what_it_served() {
    use flagmesh_integration_tests::relay::LinkMode;
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(TopologySpec::test(root.path(), 1, 1))
        .await
        .unwrap();
    for round in 0..3 {
        for i in 0..20 {
            set(&mesh, &format!("k{}", i % 5), &format!("r{round}-{i}")).await;
        }
        mesh.converged(CONVERGE).await.unwrap();
        let served = mesh.served_state(NodeRef::Pop(0)).await.unwrap();
        assert_eq!(served, mesh.control_head().await.unwrap());
        mesh.kill(NodeRef::Pop(0));
        for link in &mesh.pop_links[0] {
            link.set(LinkMode::Cut);
        }
        mesh.restart(NodeRef::Pop(0)).unwrap();
        assert_eq!(
            mesh.served_state(NodeRef::Pop(0)).await.unwrap(),
            served,
            "round {round}: the restarted PoP lost what it served"
        );
        assert!(
            mesh.metric(NodeRef::Pop(0), "flagmesh_journal_recovered_records")
                .await
                >= 1.0,
            "round {round}: nothing was recovered from the journal"
        );
        for link in &mesh.pop_links[0] {
            link.set(LinkMode::Pass);
        }
        mesh.converged(CONVERGE).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_crashed_without_flushes_restarts_at_a_state_control_had() {
    use flagmesh_integration_tests::relay::LinkMode;
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(TopologySpec::test(root.path(), 1, 1))
        .await
        .unwrap();
    // the PoP flushes in the background only (--sync-writes false)
    assert!(mesh.stop(NodeRef::Pop(0)));
    let mut args = mesh.node(NodeRef::Pop(0)).args_for_restart();
    args.extend(["--sync-writes".into(), "false".into()]);
    mesh.node(NodeRef::Pop(0)).set_args(args);
    mesh.restart(NodeRef::Pop(0)).unwrap();

    // every state control had: (revision, digest)
    let mut had = std::collections::HashSet::new();
    had.insert(mesh.control_head().await.unwrap());
    for crash in 0..3 {
        for i in 0..40 {
            set(&mesh, &format!("k{}", i % 7), &format!("c{crash}-{i}")).await;
            had.insert(mesh.control_head().await.unwrap());
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // SIGKILL while changes arrive, then restart cut off from its hub
        mesh.kill(NodeRef::Pop(0));
        for link in &mesh.pop_links[0] {
            link.set(LinkMode::Cut);
        }
        mesh.restart(NodeRef::Pop(0)).unwrap();
        let served = mesh.served_state(NodeRef::Pop(0)).await.unwrap();
        assert!(
            had.contains(&served),
            "crash {crash}: the PoP serves {served:?}, a state control never had"
        );
        for link in &mesh.pop_links[0] {
            link.set(LinkMode::Pass);
        }
        mesh.converged(CONVERGE).await.unwrap();
    }
}

/// A delta over 1 MiB (a bulk import) grows the receive buffer of the
/// stream it came on; once the stream is quiet, the hub and the PoP each
/// open a new stream on the same connection, resuming from what they hold.
/// Nothing is missed across the renewal, and small deltas never cause one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_carried_a_large_delta_is_renewed_and_misses_nothing() {
    use flagmesh_integration_tests::bench::{document_of, realistic_flag};
    const RENEWALS: &str = "flagmesh_upstream_stream_renewals_total";
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(TopologySpec::test(root.path(), 1, 1))
        .await
        .unwrap();
    for i in 0..5 {
        set(&mesh, &format!("k{i}"), "small").await;
    }
    mesh.converged(CONVERGE).await.unwrap();
    // several heartbeats (200 ms apart) on streams that carried only small deltas
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mesh.metric(NodeRef::Pop(0), RENEWALS).await, 0.0);
    assert_eq!(mesh.metric(NodeRef::Hub(0), RENEWALS).await, 0.0);

    // 3,000 flags of about 450 bytes: one delta of about 1.4 MB
    mesh.admin()
        .await
        .unwrap()
        .apply_flag_set(ApplyFlagSetRequest {
            document: document_of("bulk", "flag", 0, 3_000, realistic_flag),
            ..Default::default()
        })
        .await
        .unwrap();
    mesh.converged(CONVERGE).await.unwrap();
    let mesh = &mesh;
    for node in [NodeRef::Hub(0), NodeRef::Pop(0)] {
        eventually("the stream is renewed", 20, || async move {
            mesh.metric(node, RENEWALS).await >= 1.0
        })
        .await;
    }
    // changes after the renewal arrive, in order, and nothing is lost
    for i in 0..5 {
        set(mesh, &format!("k{i}"), &format!("after-{i}")).await;
    }
    mesh.converged(CONVERGE).await.unwrap();
    assert_eq!(
        mesh.served_state(NodeRef::Pop(0)).await.unwrap(),
        mesh.control_head().await.unwrap()
    );
    for i in 0..5 {
        assert_eq!(
            value_at(mesh, 0, &format!("k{i}")).await.as_deref(),
            Some(format!("after-{i}").as_str())
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        mesh.metric(NodeRef::Pop(0), RENEWALS).await,
        1.0,
        "only the large delta renews the stream"
    );
}

/// A node stopped cleanly (SIGTERM) checkpoints its journal before it
/// exits: restarted, it has nothing to recover, and serves what it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_nothing_for_the_journal_to_recover() {
    const RECOVERED: &str = "flagmesh_journal_recovered_records";
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(TopologySpec::test(root.path(), 1, 1))
        .await
        .unwrap();
    for i in 0..10 {
        set(&mesh, &format!("k{}", i % 3), &format!("v{i}")).await;
    }
    mesh.converged(CONVERGE).await.unwrap();
    let served = mesh.served_state(NodeRef::Pop(0)).await.unwrap();
    for node in [NodeRef::Pop(0), NodeRef::Hub(0)] {
        assert!(mesh.stop(node), "{node:?} did not stop cleanly");
        mesh.restart(node).unwrap();
        assert_eq!(
            mesh.metric(node, RECOVERED).await,
            0.0,
            "{node:?}: a clean stop left journal records behind"
        );
    }
    assert_eq!(mesh.served_state(NodeRef::Pop(0)).await.unwrap(), served);
    // the journal still works after such a stop: a change after it is
    // recovered by a kill
    set(&mesh, "k0", "after").await;
    mesh.converged(CONVERGE).await.unwrap();
    mesh.kill(NodeRef::Pop(0));
    mesh.restart(NodeRef::Pop(0)).unwrap();
    assert!(mesh.metric(NodeRef::Pop(0), RECOVERED).await >= 1.0);
    assert_eq!(value_at(&mesh, 0, "k0").await.as_deref(), Some("after"));
}
