//! Fault scenarios against real `flagmesh-control`, `flagmesh-hub` and
//! `flagmesh-pop` processes on loopback, with a controllable relay on every
//! link. Each scenario bounds its own time, cleans up its processes even
//! when it fails (the mesh kills them when dropped), and ends with the
//! convergence check: every hub and PoP serves control's revision with
//! control's digest. Scenarios run one at a time (2 cores).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use flagmesh_integration_tests::relay::LinkMode;
use flagmesh_integration_tests::topology::{Eval, Mesh, NodeRef, TopologySpec, eventually};
use flagmesh_proto::v1::*;
use prost_types::value::Kind;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONVERGE: Duration = Duration::from_secs(30);

/// Runs a scenario with a deadline, one at a time.
async fn scenario<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    let _guard = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("scenario did not finish within {secs}s"));
}

fn flag(value: &str) -> String {
    format!(r#"{{"state":"ENABLED","variants":{{"v":"{value}"}},"defaultVariant":"v"}}"#)
}

async fn set(mesh: &Mesh, key: &str, value: &str) -> u64 {
    let mut a = mesh.admin().await.unwrap();
    a.update_flag(UpdateFlagRequest {
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

async fn evaluate(e: &mut Eval, key: &str) -> EvaluateResponse {
    e.evaluate(EvaluateRequest {
        flag_set: "demo".into(),
        flag_key: key.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

fn string_of(r: &EvaluateResponse) -> Option<String> {
    match r.value.as_ref()?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// 1. A write at control reaches every PoP of a 2-hub, 6-PoP mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_propagation() {
    scenario(120, async {
        let root = tempfile::tempdir().unwrap();
        let mesh = Mesh::start(TopologySpec::test(root.path(), 2, 3))
            .await
            .unwrap();
        set(&mesh, "greeting", "hello").await;
        mesh.converged(CONVERGE).await.unwrap();
        let revision = set(&mesh, "greeting", "bonjour").await;
        for i in 0..mesh.pops.len() {
            let e = mesh.eval(i).await.unwrap();
            eventually("the PoP serves the new value", 20, || {
                let mut e = e.clone();
                async move {
                    let r = evaluate(&mut e, "greeting").await;
                    string_of(&r).as_deref() == Some("bonjour")
                        && r.revision == revision
                        && r.mod_revision == revision
                }
            })
            .await;
            let r = evaluate(&mut e.clone(), "greeting").await;
            assert_eq!(r.pop_id, format!("pop-{i}"));
        }
        mesh.converged(CONVERGE).await.unwrap();
    })
    .await;
}

/// Reads every PoP's revision repeatedly, failing if any goes backwards.
fn watch_revisions(
    mesh: &Mesh,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<HashMap<usize, u64>>,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let addrs: Vec<_> = mesh.pops.iter().map(|p| p.grpc).collect();
    let secure = mesh.spec.secure;
    let task = tokio::spawn(async move {
        let mut highest: HashMap<usize, u64> = HashMap::new();
        let mut clients = Vec::new();
        for a in &addrs {
            let ch = tonic::transport::Channel::from_shared(format!("http://{a}"))
                .unwrap()
                .connect_lazy();
            let token = flagmesh_client::BearerToken::new(
                secure.then_some(flagmesh_integration_tests::topology::EVAL_TOKEN),
            )
            .unwrap();
            clients.push(
                flagmesh_proto::v1::evaluation_client::EvaluationClient::with_interceptor(
                    ch, token,
                ),
            );
        }
        while !*stop_rx.borrow() {
            for (i, c) in clients.iter_mut().enumerate() {
                if let Ok(r) = c
                    .evaluate(EvaluateRequest {
                        flag_set: "demo".into(),
                        flag_key: "counter".into(),
                        ..Default::default()
                    })
                    .await
                {
                    let r = r.into_inner();
                    let prev = highest.entry(i).or_default();
                    assert!(
                        r.revision >= *prev,
                        "pop-{i} went back from revision {prev} to {}",
                        r.revision
                    );
                    *prev = r.revision;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        highest
    });
    (stop_tx, task)
}

/// 2. SIGKILL a hub under a stream of writes: its PoPs fail over to the
/// other hub, miss nothing, never go back; the restarted hub catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_hub_loss() {
    scenario(180, async {
        let root = tempfile::tempdir().unwrap();
        let mut mesh = Mesh::start(TopologySpec::test(root.path(), 2, 3))
            .await
            .unwrap();
        set(&mesh, "counter", "0").await;
        mesh.converged(CONVERGE).await.unwrap();
        let (stop, watcher) = watch_revisions(&mesh);
        let mut last = 0;
        for i in 1..=40 {
            last = set(&mesh, "counter", &i.to_string()).await;
            if i == 10 {
                mesh.kill(NodeRef::Hub(0));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // every PoP (those of hub-0 through hub-1) reaches the last write
        mesh.converged(CONVERGE).await.unwrap();
        for i in 0..mesh.pops.len() {
            let mut e = mesh.eval(i).await.unwrap();
            let r = evaluate(&mut e, "counter").await;
            assert_eq!(
                (string_of(&r).as_deref(), r.revision),
                (Some("40"), last),
                "pop-{i}"
            );
        }
        stop.send_replace(true);
        let highest = watcher.await.unwrap();
        assert_eq!(highest.len(), mesh.pops.len(), "some PoP was never read");
        mesh.restart(NodeRef::Hub(0)).unwrap();
        mesh.converged(CONVERGE).await.unwrap();
    })
    .await;
}

/// 3. Stop control: every PoP keeps answering from memory and reports
/// itself stale; when control returns, everything converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_origin_loss() {
    scenario(120, async {
        let root = tempfile::tempdir().unwrap();
        let mut mesh = Mesh::start(TopologySpec::test(root.path(), 2, 2))
            .await
            .unwrap();
        set(&mesh, "greeting", "hello").await;
        mesh.converged(CONVERGE).await.unwrap();
        assert!(mesh.stop(NodeRef::Control), "control did not stop cleanly");
        for i in 0..mesh.pops.len() {
            let e = mesh.eval(i).await.unwrap();
            eventually("the PoP reports itself stale", 20, || {
                let mut e = e.clone();
                async move { evaluate(&mut e, "greeting").await.stale }
            })
            .await;
            let r = evaluate(&mut e.clone(), "greeting").await;
            assert_eq!(string_of(&r).as_deref(), Some("hello"));
            assert_eq!(mesh.metric(NodeRef::Pop(i), "flagmesh_stale").await, 1.0);
        }
        mesh.restart(NodeRef::Control).unwrap();
        let revision = set(&mesh, "greeting", "back").await;
        mesh.converged(CONVERGE).await.unwrap();
        for i in 0..mesh.pops.len() {
            let e = mesh.eval(i).await.unwrap();
            eventually("the PoP is fresh again", 20, || {
                let mut e = e.clone();
                async move {
                    let r = evaluate(&mut e, "greeting").await;
                    !r.stale && r.revision == revision
                }
            })
            .await;
        }
    })
    .await;
}

/// 4. SIGKILL a PoP during a burst of writes; restart it with every
/// upstream cut: it answers at once from sled; when the links return it
/// converges by delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_pop_crash() {
    scenario(120, async {
        let root = tempfile::tempdir().unwrap();
        let mut mesh = Mesh::start(TopologySpec::test(root.path(), 2, 1))
            .await
            .unwrap();
        set(&mesh, "counter", "0").await;
        mesh.converged(CONVERGE).await.unwrap();
        for i in 1..=30 {
            set(&mesh, "counter", &i.to_string()).await;
            if i == 15 {
                mesh.kill(NodeRef::Pop(0));
            }
        }
        for link in &mesh.pop_links[0] {
            link.set(LinkMode::Cut);
        }
        mesh.restart(NodeRef::Pop(0)).unwrap();
        let mut e = mesh.eval(0).await.unwrap();
        let r = evaluate(&mut e, "counter").await;
        assert!(string_of(&r).is_some(), "no answer from sled: {r:?}");
        assert!(r.stale && r.revision >= 1 && r.revision < 31, "{r:?}");
        for link in &mesh.pop_links[0] {
            link.set(LinkMode::Pass);
        }
        mesh.converged(CONVERGE).await.unwrap();
        let r = evaluate(&mut e, "counter").await;
        assert_eq!(string_of(&r).as_deref(), Some("30"));
        assert_eq!(
            mesh.metric(NodeRef::Pop(0), "flagmesh_snapshots_applied_total")
                .await,
            0.0,
            "caught up by snapshot"
        );
        assert!(
            mesh.metric(NodeRef::Pop(0), "flagmesh_deltas_applied_total")
                .await
                >= 1.0
        );
    })
    .await;
}

/// 5. Cut and restore links through the relays, including a stalled (not
/// closed) connection that only missed heartbeats reveal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_partition_and_heal() {
    scenario(180, async {
        let root = tempfile::tempdir().unwrap();
        let mesh = Mesh::start(TopologySpec::test(root.path(), 2, 2))
            .await
            .unwrap();
        set(&mesh, "greeting", "one").await;
        mesh.converged(CONVERGE).await.unwrap();

        // cut every PoP from hub-1: they all follow hub-0
        for links in &mesh.pop_links {
            links[1].set(LinkMode::Cut);
        }
        let revision = set(&mesh, "greeting", "two").await;
        mesh.converged(CONVERGE).await.unwrap();
        for i in 0..mesh.pops.len() {
            let mut e = mesh.eval(i).await.unwrap();
            let r = evaluate(&mut e, "greeting").await;
            assert_eq!(
                (string_of(&r).as_deref(), r.revision),
                (Some("two"), revision)
            );
        }
        for links in &mesh.pop_links {
            links[1].set(LinkMode::Pass);
        }

        // stall hub-0's link to control: it notices by missed heartbeats
        mesh.hub_links[0].set(LinkMode::Stall);
        eventually("hub-0 notices the stall", 20, || async {
            mesh.metric(NodeRef::Hub(0), "flagmesh_upstream_connected")
                .await
                == 0.0
        })
        .await;
        let revision = set(&mesh, "greeting", "three").await;
        // hub-1 has it; PoPs left on hub-0 see their hub cut off and move
        for i in 0..mesh.pops.len() {
            let e = mesh.eval(i).await.unwrap();
            eventually(
                "every PoP gets the change despite the stalled hub",
                30,
                || {
                    let mut e = e.clone();
                    async move { evaluate(&mut e, "greeting").await.revision == revision }
                },
            )
            .await;
        }
        mesh.hub_links[0].set(LinkMode::Pass);
        mesh.converged(CONVERGE).await.unwrap();
        eventually("hub-0 reconnects", 20, || async {
            mesh.metric(NodeRef::Hub(0), "flagmesh_upstream_connected")
                .await
                == 1.0
        })
        .await;
    })
    .await;
}

/// 6. A PoP offline for longer than the retained window gets a snapshot
/// and drops the flags deleted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_compaction() {
    scenario(120, async {
        let root = tempfile::tempdir().unwrap();
        let mut spec = TopologySpec::test(root.path(), 1, 2);
        spec.retain_revisions = 5;
        spec.hub_ring_revisions = Some(5);
        let mut mesh = Mesh::start(spec).await.unwrap();
        set(&mesh, "doomed", "here").await;
        set(&mesh, "kept", "v0").await;
        mesh.converged(CONVERGE).await.unwrap();
        assert!(mesh.stop(NodeRef::Pop(0)));
        let mut a = mesh.admin().await.unwrap();
        a.delete_flag(DeleteFlagRequest {
            flag_set: "demo".into(),
            key: "doomed".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        for i in 1..=10 {
            set(&mesh, "kept", &format!("v{i}")).await;
        }
        mesh.restart(NodeRef::Pop(0)).unwrap();
        mesh.converged(CONVERGE).await.unwrap();
        assert_eq!(
            mesh.metric(NodeRef::Pop(0), "flagmesh_snapshots_applied_total")
                .await,
            1.0
        );
        let mut e = mesh.eval(0).await.unwrap();
        let r = evaluate(&mut e, "doomed").await;
        assert_eq!(r.error_code, ErrorCode::FlagNotFound as i32, "{r:?}");
        assert_eq!(
            string_of(&evaluate(&mut e, "kept").await).as_deref(),
            Some("v10")
        );
    })
    .await;
}

/// 7. Chained hubs (control → hub → hub → PoP) propagate the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_chained_hubs() {
    scenario(120, async {
        let root = tempfile::tempdir().unwrap();
        let mut spec = TopologySpec::test(root.path(), 2, 1);
        spec.chained = true;
        let mesh = Mesh::start(spec).await.unwrap();
        let revision = set(&mesh, "greeting", "via-two-hubs").await;
        mesh.converged(CONVERGE).await.unwrap();
        for i in 0..mesh.pops.len() {
            let mut e = mesh.eval(i).await.unwrap();
            let r = evaluate(&mut e, "greeting").await;
            assert_eq!(
                (string_of(&r).as_deref(), r.revision),
                (Some("via-two-hubs"), revision)
            );
        }
        // reports travel up the chain too
        let a = mesh.admin().await.unwrap();
        eventually("control hears from every node", 20, || {
            let mut a = a.clone();
            async move {
                let v = a
                    .get_propagation(GetPropagationRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                v.nodes.len() == 4 && v.nodes.iter().all(|n| n.applied_revision == revision)
            }
        })
        .await;
        let v = a
            .clone()
            .get_propagation(GetPropagationRequest::default())
            .await
            .unwrap()
            .into_inner();
        let via = |id: &str| {
            v.nodes
                .iter()
                .find(|n| n.node_id == id)
                .map(|n| n.via.clone())
        };
        assert_eq!(
            via("pop-0").as_deref(),
            Some("hub-1"),
            "the PoP's report enters the mesh at its hub"
        );
        assert_eq!(
            via("hub-1").as_deref(),
            Some("hub-0"),
            "the chained hub reports through the first"
        );
    })
    .await;
}
