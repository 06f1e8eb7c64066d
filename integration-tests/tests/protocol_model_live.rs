//! A model-based test of replication that drives the real pieces end to
//! end in one process: a control plane (change-log window 4, so catch-ups
//! past it become snapshots), a hub, and two PoPs (one following every
//! flag set through the hub, one scoped to a set and following control
//! directly), each with its real `Subscriber` loop, fan-out and gRPC
//! server on `127.0.0.1`. Snapshots are sent in tiny chunks, so restarts
//! interrupt them midway. Random sequences mix single and concurrent
//! commits, flag-set metadata changes, deleting a set and re-creating it at
//! once (inside one coalesced window), hub and PoP restarts, scope changes,
//! and a new history at control (a wiped store re-initialised, then
//! adopted by every node). Throughout, no node's revision may go back
//! within a history, and no node may take the new history before it is
//! adopted; at the end every node holds exactly control's state (within
//! its scope) at control's revision, and the whole-state nodes control's
//! digest.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flagmesh_control::node::{ControlConfig, RunningControl};
use flagmesh_hub::RunningHub;
use flagmesh_integration_tests::inproc::mesh::*;
use flagmesh_mesh::FanoutConfig;
use flagmesh_mesh::relay::RelayConfig;
use flagmesh_pop::node::RunningPop;
use flagmesh_proto::v1::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Write { set: u8, key: u8, delete: bool },
    Concurrent { writers: u8 },
    SetMetadata { set: u8 },
    RecreateSet { set: u8 },
    RestartHub,
    RestartPop { pop: u8 },
    Rescope { sets: Vec<u8> },
    NewHistory,
    Settle,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, 0u8..4, prop::bool::weighted(0.2))
            .prop_map(|(set, key, delete)| Op::Write { set, key, delete }),
        2 => (2u8..6).prop_map(|writers| Op::Concurrent { writers }),
        1 => (0u8..3).prop_map(|set| Op::SetMetadata { set }),
        1 => (0u8..3).prop_map(|set| Op::RecreateSet { set }),
        1 => Just(Op::RestartHub),
        2 => (0u8..2).prop_map(|pop| Op::RestartPop { pop }),
        1 => prop::collection::vec(0u8..3, 1..3).prop_map(|sets| Op::Rescope { sets }),
        1 => Just(Op::NewHistory),
        2 => Just(Op::Settle),
    ]
}

fn set_name(set: u8) -> String {
    ["a", "b", "c"][usize::from(set % 3)].to_owned()
}

struct World {
    root: PathBuf,
    control: Option<RunningControl>,
    control_addr: SocketAddr,
    control_dir: u32,
    hub: Option<RunningHub>,
    hub_addr: SocketAddr,
    pops: [Option<RunningPop>; 2],
    /// PoP 1's flag sets.
    scope: Vec<String>,
    /// A history adopted by every node (after a control re-init).
    adopt: Option<String>,
    /// Per node: the history it held and the highest revision seen in it.
    high_water: BTreeMap<&'static str, (String, u64)>,
    value: u64,
}

fn fanout() -> FanoutConfig {
    FanoutConfig {
        heartbeat: HEARTBEAT,
        // several chunks for even a small state: restarts cut them midway
        snapshot_chunk_bytes: 64,
        ..FanoutConfig::default()
    }
}

async fn start_control(dir: &Path, listen: SocketAddr) -> RunningControl {
    flagmesh_control::node::start(
        ControlConfig {
            retain_revisions: 4,
            fanout: fanout(),
            drain: Duration::from_millis(300),
            init: true,
            ..ControlConfig::new(listen, None, dir.to_path_buf())
        },
        dev(),
    )
    .await
    .unwrap()
}

impl World {
    async fn new(root: &Path) -> Self {
        let control = start_control(&root.join("control-0"), "127.0.0.1:0".parse().unwrap()).await;
        let control_addr = control.grpc_addr;
        let mut w = Self {
            root: root.to_path_buf(),
            control: Some(control),
            control_addr,
            control_dir: 0,
            hub: None,
            hub_addr: "127.0.0.1:0".parse().unwrap(),
            pops: [None, None],
            scope: vec!["a".into()],
            adopt: None,
            high_water: BTreeMap::new(),
            value: 0,
        };
        w.start_hub().await;
        w.start_pop(0).await;
        w.start_pop(1).await;
        w
    }

    fn relay_config(&self, id: &str, upstream: SocketAddr, scope: Vec<String>) -> RelayConfig {
        let mut r = relay(
            &self.root,
            id,
            if id == "hub" {
                NodeRole::Hub
            } else {
                NodeRole::Pop
            },
            vec![upstream.to_string()],
            None,
        );
        r.subscriber.flag_sets = scope;
        r.fanout = fanout();
        r.adopt_history = self.adopt.clone();
        r
    }

    async fn start_hub(&mut self) {
        let config = self.relay_config("hub", self.control_addr, Vec::new());
        let hub = hub_at(config, self.hub_addr, dev()).await;
        self.hub_addr = hub.grpc_addr;
        self.hub = Some(hub);
    }

    async fn start_pop(&mut self, i: usize) {
        let config = if i == 0 {
            self.relay_config("pop-0", self.hub_addr, Vec::new())
        } else {
            self.relay_config("pop-1", self.control_addr, self.scope.clone())
        };
        self.pops[i] = Some(pop(config, "a", dev()).await);
    }

    async fn admin(&self) -> Admin {
        admin(self.control_addr).await
    }

    fn next_value(&mut self) -> String {
        self.value += 1;
        string_flag(&format!("v{}", self.value))
    }

    async fn write(&mut self, set: u8, key: u8, delete: bool) {
        let mut a = self.admin().await;
        let (flag_set, key) = (set_name(set), format!("k{key}"));
        if delete {
            let _ = a
                .delete_flag(DeleteFlagRequest {
                    flag_set,
                    key,
                    ..Default::default()
                })
                .await;
        } else {
            let definition_json = self.next_value();
            a.update_flag(UpdateFlagRequest {
                flag_set,
                key,
                definition_json,
                force: true,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }

    async fn run(&mut self, op: &Op) {
        match op {
            Op::Write { set, key, delete } => self.write(*set, *key, *delete).await,
            Op::Concurrent { writers } => {
                let mut calls = Vec::new();
                for w in 0..*writers {
                    let mut a = self.admin().await;
                    let definition_json = self.next_value();
                    calls.push(tokio::spawn(async move {
                        a.update_flag(UpdateFlagRequest {
                            flag_set: set_name(w),
                            key: format!("k{}", w % 4),
                            definition_json,
                            force: true,
                            ..Default::default()
                        })
                        .await
                    }));
                }
                for c in calls {
                    c.await.unwrap().unwrap();
                }
            }
            Op::SetMetadata { set } => {
                let flag = self.next_value();
                let doc = format!(
                    r#"{{"metadata":{{"owner":"team-{}"}},"flags":{{"k0":{flag}}}}}"#,
                    self.value
                );
                self.admin()
                    .await
                    .apply_flag_set(ApplyFlagSetRequest {
                        flag_set: set_name(*set),
                        document: doc,
                        mode: ApplyMode::Merge as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            Op::RecreateSet { set } => {
                // gone and back within the change-log window: subscribers
                // catching up get both in one coalesced delta
                let mut a = self.admin().await;
                let _ = a
                    .delete_flag_set(DeleteFlagSetRequest {
                        flag_set: set_name(*set),
                        ..Default::default()
                    })
                    .await;
                self.write(*set, 1, false).await;
            }
            Op::RestartHub => {
                if let Some(h) = self.hub.take() {
                    h.stop().await;
                }
                self.start_hub().await;
            }
            Op::RestartPop { pop } => {
                let i = usize::from(*pop);
                if let Some(p) = self.pops[i].take() {
                    p.stop().await;
                }
                self.start_pop(i).await;
            }
            Op::Rescope { sets } => {
                let mut scope: Vec<String> = sets.iter().map(|s| set_name(*s)).collect();
                scope.sort();
                scope.dedup();
                self.scope = scope;
                if let Some(p) = self.pops[1].take() {
                    p.stop().await;
                }
                self.start_pop(1).await;
            }
            Op::NewHistory => self.new_history().await,
            Op::Settle => tokio::time::sleep(Duration::from_millis(150)).await,
        }
        self.check_no_regression().await;
    }

    /// Control loses its store and is re-initialised on the same address;
    /// no node takes the new history until every node adopts it.
    async fn new_history(&mut self) {
        if let Some(c) = self.control.take() {
            c.stop().await;
        }
        self.control_dir += 1;
        let dir = self.root.join(format!("control-{}", self.control_dir));
        let control = start_control(&dir, self.control_addr).await;
        let history = control.store.head().unwrap().history_id;
        self.control = Some(control);
        self.write(0, 0, false).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.check_no_regression().await;
        // adoption: every node restarted with the new history allowed
        self.adopt = Some(history);
        if let Some(h) = self.hub.take() {
            h.stop().await;
        }
        for p in self.pops.iter_mut() {
            if let Some(p) = p.take() {
                p.stop().await;
            }
        }
        self.start_hub().await;
        self.start_pop(0).await;
        self.start_pop(1).await;
    }

    /// Whether every node's state is whole for the sets it follows.
    fn whole(&self) -> bool {
        let relays = self
            .hub
            .iter()
            .map(|h| &h.relay)
            .chain(self.pops.iter().flatten().map(|p| &p.relay));
        relays.into_iter().all(|r| !r.replica.needs_snapshot())
    }

    fn positions(&self) -> Vec<(&'static str, flagmesh_mesh::replica::Position)> {
        let mut out = Vec::new();
        if let Some(h) = &self.hub {
            out.push(("hub", h.relay.replica.position()));
        }
        for (name, p) in ["pop-0", "pop-1"].into_iter().zip(&self.pops) {
            if let Some(p) = p {
                out.push((name, p.relay.replica.position()));
            }
        }
        out
    }

    /// Within a history a node's revision never goes back; a node leaves
    /// its history only for the adopted one.
    async fn check_no_regression(&mut self) {
        for (name, p) in self.positions() {
            if p.history_id.is_empty() {
                continue;
            }
            match self.high_water.get(name) {
                Some((history, revision)) if *history == p.history_id => {
                    assert!(
                        p.revision >= *revision,
                        "{name}: revision went back from {revision} to {}",
                        p.revision
                    );
                }
                Some((history, _)) => assert_eq!(
                    Some(&p.history_id),
                    self.adopt.as_ref(),
                    "{name} left history {history} for one nobody adopted"
                ),
                None => {}
            }
            self.high_water
                .insert(name, (p.history_id.clone(), p.revision));
        }
    }

    /// Every node reaches control's head; whole-state nodes hold control's
    /// digest; each holds exactly control's flags within its scope.
    async fn converge(&mut self) {
        let control = self.control.as_ref().unwrap();
        let head = control.store.head().unwrap();
        let truth = control.store.snapshot().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let positions = self.positions();
            let done = positions.iter().all(|(name, p)| {
                p.history_id == head.history_id
                    && p.revision == head.revision
                    && (*name == "pop-1" || p.digest == head.digest)
            });
            // a widened scope is whole once its snapshot came, whatever
            // the revision says
            if done && self.whole() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no convergence to {} r{}: {positions:?}",
                head.history_id,
                head.revision
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.check_no_regression().await;
        let flags = |state: &flagmesh_mesh::SourceSnapshot, scope: &[String]| {
            state
                .flags
                .iter()
                .filter(|f| scope.is_empty() || scope.contains(&f.flag_set))
                .map(|f| {
                    (
                        (f.flag_set.clone(), f.key.clone()),
                        f.definition_json.clone(),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        let hub = self.hub.as_ref().unwrap().relay.replica.load().unwrap();
        assert_eq!(flags(&hub, &[]), flags(&truth, &[]), "hub");
        let pop0 = self.pops[0].as_ref().unwrap().relay.replica.load().unwrap();
        assert_eq!(flags(&pop0, &[]), flags(&truth, &[]), "pop-0");
        let pop1 = self.pops[1].as_ref().unwrap().relay.replica.load().unwrap();
        assert_eq!(
            flags(&pop1, &[]),
            flags(&truth, &self.scope),
            "pop-1 holds exactly its scope {:?}",
            self.scope
        );
    }

    async fn stop(mut self) {
        for p in self.pops.iter_mut() {
            if let Some(p) = p.take() {
                p.stop().await;
            }
        }
        if let Some(h) = self.hub.take() {
            h.stop().await;
        }
        if let Some(c) = self.control.take() {
            c.stop().await;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn real_subscribers_converge_without_loss_regression_or_silent_history_change(
        ops in prop::collection::vec(op(), 1..24)
    ) {
        run_ops(&ops);
    }
}

/// Runs `ops` on a new world, then checks it converges.
fn run_ops(ops: &[Op]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let root = tempfile::tempdir().unwrap();
        let mut world = World::new(root.path()).await;
        for op in ops {
            world.run(op).await;
        }
        world.converge().await;
        world.stop().await;
    });
}

/// A sequence CI found: a scope widened then moved to a set created while
/// the PoP followed others.
#[test]
fn a_scope_moved_to_a_set_created_meanwhile_is_filled_by_a_snapshot() {
    for _ in 0..8 {
        run_ops(&[
            Op::Write {
                set: 0,
                key: 0,
                delete: false,
            },
            Op::Rescope { sets: vec![1, 0] },
            Op::RestartHub,
            Op::SetMetadata { set: 0 },
            Op::Write {
                set: 1,
                key: 3,
                delete: false,
            },
            Op::RestartHub,
            Op::Concurrent { writers: 4 },
            Op::Rescope { sets: vec![2, 2] },
        ]);
    }
}
