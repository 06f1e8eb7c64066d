//! A model-based test of the replication protocol, on the real pieces: the
//! control plane's store (with a small change-log window, so compaction
//! happens), the fan-out's catch-up (ring, coalescing, snapshots), and the
//! replica stores of two hubs and three PoPs (gap, digest and history
//! rules). Streams are simulated deterministically: each link queues what
//! its upstream's session would send, and random operations write, deliver
//! part of a queue, drop streams, restart hubs, crash PoPs, and let
//! subscribers lag until they are cut off. After each sequence every link is
//! healed; then every replica must equal the control plane at the same
//! revision (state and digest), no replica's revision may ever have gone
//! backwards, and every applied delta must have chained on the previous
//! revision. Hundreds of sequences per run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use flagmesh_control::propagation::Propagation;
use flagmesh_control::store::{ChangeRequest, FlagStore, FlagWrite, SledStore, StoreSource};
use flagmesh_mesh::replica::{Applied, ApplyError, ReplicaSource, ReplicaStore};
use flagmesh_mesh::{Cursor, Fanout, FanoutConfig, Head, ReportSink};
use flagmesh_proto::v1::{NodeReport, SyncEvent};
use proptest::prelude::*;
use prost::Message;
use tokio_util::sync::CancellationToken;

const HUBS: usize = 2;
const POPS: usize = 3;
/// A link queueing more than this is a subscriber that does not read: cut off.
const QUEUE_MAX: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    Write { key: u8, delete: bool },
    WriteMany { keys: Vec<u8> },
    Deliver { link: usize, n: usize },
    Drop { link: usize },
    Connect { link: usize, choice: usize },
    HubRestart { hub: usize },
    PopCrash { pop: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let links = HUBS + POPS;
    prop_oneof![
        4 => (0u8..6, prop::bool::weighted(0.2)).prop_map(|(key, delete)| Op::Write { key, delete }),
        1 => prop::collection::vec(0u8..6, 1..4).prop_map(|keys| Op::WriteMany { keys }),
        6 => (0..links, 1usize..4).prop_map(|(link, n)| Op::Deliver { link, n }),
        1 => (0..links).prop_map(|link| Op::Drop { link }),
        2 => (0..links, 0usize..2).prop_map(|(link, choice)| Op::Connect { link, choice }),
        1 => (0..HUBS).prop_map(|hub| Op::HubRestart { hub }),
        1 => (0..POPS).prop_map(|pop| Op::PopCrash { pop }),
    ]
}

/// Where a link's events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Control,
    Hub(usize),
}

struct Session {
    upstream: Upstream,
    cursor: Cursor,
    queue: VecDeque<SyncEvent>,
}

struct Node {
    dir: PathBuf,
    replica: Arc<ReplicaStore>,
    /// Hubs only: the fan-out serving PoPs.
    fanout: Option<Arc<Fanout>>,
    session: Option<Session>,
    force_snapshot: bool,
    /// The highest revision this replica ever held.
    high_water: u64,
    /// A report written after an apply but not sent yet (a crash loses it).
    pending_report: Option<u64>,
}

struct Sim {
    _root: tempfile::TempDir,
    control: Arc<SledStore>,
    control_fanout: Arc<Fanout>,
    nodes: Vec<Node>,
    next_value: u64,
    restarts: u64,
    shutdown: CancellationToken,
    propagation: Propagation,
}

fn fanout_config(ring: usize) -> FanoutConfig {
    FanoutConfig {
        ring_revisions: ring,
        ..FanoutConfig::default()
    }
}

impl Sim {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let control =
            Arc::new(SledStore::open_with(&root.path().join("control"), 4, false, true).unwrap());
        let head = control.head().unwrap();
        let shutdown = CancellationToken::new();
        let control_fanout = Fanout::new(
            Arc::new(StoreSource(control.clone())),
            Head {
                history_id: head.history_id.as_str().into(),
                revision: 0,
                upstream_connected: true,
                digest: Some(head.digest),
            },
            fanout_config(4),
            shutdown.clone(),
        );
        let mut sim = Self {
            control,
            control_fanout,
            nodes: Vec::new(),
            next_value: 0,
            restarts: 0,
            shutdown,
            propagation: Propagation::default(),
            _root: root,
        };
        for i in 0..HUBS + POPS {
            let dir = sim._root.path().join(format!("node-{i}"));
            let replica = Arc::new(ReplicaStore::open(&dir, false).unwrap());
            let fanout = (i < HUBS).then(|| sim.hub_fanout(&replica));
            sim.nodes.push(Node {
                dir,
                replica,
                fanout,
                session: None,
                force_snapshot: false,
                high_water: 0,
                pending_report: None,
            });
        }
        sim
    }

    fn hub_fanout(&self, replica: &Arc<ReplicaStore>) -> Arc<Fanout> {
        let p = replica.position();
        Fanout::new(
            Arc::new(ReplicaSource(replica.clone())),
            Head {
                history_id: p.history_id.as_str().into(),
                revision: p.revision,
                upstream_connected: true,
                digest: Some(p.digest),
            },
            fanout_config(3),
            self.shutdown.clone(),
        )
    }

    fn upstream_fanout(&self, u: Upstream) -> Arc<Fanout> {
        match u {
            Upstream::Control => self.control_fanout.clone(),
            Upstream::Hub(h) => self.nodes[h].fanout.clone().unwrap(),
        }
    }

    fn write(&mut self, keys: &[u8], delete: bool) {
        let mut writes = Vec::new();
        for k in keys {
            self.next_value += 1;
            writes.push(FlagWrite {
                flag_set: "sim".into(),
                key: format!("f{k}"),
                definition: (!delete).then(|| {
                    format!(
                        r#"{{"state":"ENABLED","variants":{{"v":{}}},"defaultVariant":"v"}}"#,
                        self.next_value
                    )
                    .into_bytes()
                }),
            });
        }
        let mut plan = |_: &dyn flagmesh_control::store::StateView| {
            Ok(ChangeRequest {
                actor: "sim".into(),
                operation: "sim".into(),
                flags: writes.clone(),
                ..Default::default()
            })
        };
        let outcome = self.control.commit(&mut plan, false).unwrap();
        if let Some(d) = outcome.delta {
            self.control_fanout.publish(d);
        }
    }

    /// Opens a stream for node `i` to `choice` (hubs follow control; PoPs
    /// one of the hubs). Refused (like UNAVAILABLE) when the upstream is
    /// behind the node.
    fn connect(&mut self, i: usize, choice: usize) -> bool {
        if self.nodes[i].session.is_some() {
            return true;
        }
        let upstream = if i < HUBS {
            Upstream::Control
        } else {
            Upstream::Hub(choice % HUBS)
        };
        let head = self.upstream_fanout(upstream).head();
        let node = &self.nodes[i];
        let p = node.replica.position();
        // the server's rules: no state yet, or behind the subscriber -> UNAVAILABLE
        if head.history_id.is_empty()
            || (*head.history_id == p.history_id && p.revision > head.revision)
        {
            return false;
        }
        let cursor: Cursor = (!node.force_snapshot && p.revision > 0)
            .then(|| (p.history_id.as_str().into(), p.revision));
        self.nodes[i].session = Some(Session {
            upstream,
            cursor,
            queue: VecDeque::new(),
        });
        true
    }

    fn drop_stream(&mut self, i: usize) {
        self.nodes[i].session = None;
        self.nodes[i].replica.discard_pending();
    }

    /// Sends the reports written since the last pump.
    fn send_reports(&mut self) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(revision) = n.pending_report.take() {
                self.propagation.report(NodeReport {
                    node_id: format!("node-{i}"),
                    applied_revision: revision,
                    ..Default::default()
                });
            }
        }
    }

    /// Every session queues what its upstream's fan-out would send now.
    fn pump(&mut self) {
        for i in 0..self.nodes.len() {
            let Some(s) = &self.nodes[i].session else {
                continue;
            };
            let (upstream, cursor) = (s.upstream, s.cursor.clone());
            let fanout = self.upstream_fanout(upstream);
            let (catch_up, next) = fanout.catch_up(&cursor, None).unwrap();
            let events = catch_up.into_events();
            let s = self.nodes[i].session.as_mut().unwrap();
            for e in events {
                s.queue
                    .push_back(SyncEvent::decode(e.bytes().as_ref()).unwrap());
            }
            s.cursor = next;
            if s.queue.len() > QUEUE_MAX {
                // accepts nothing while events pile up: cut off
                self.drop_stream(i);
            }
        }
    }

    /// Node `i` applies up to `n` queued events.
    fn deliver(&mut self, i: usize, n: usize) {
        for _ in 0..n {
            let Some(event) = self.nodes[i]
                .session
                .as_mut()
                .and_then(|s| s.queue.pop_front())
            else {
                return;
            };
            let before = self.nodes[i].replica.position();
            match self.nodes[i].replica.apply(event) {
                Ok(applied) => {
                    let after = self.nodes[i].replica.position();
                    match &applied {
                        Applied::Delta(d) => {
                            assert_eq!(
                                d.from_revision, before.revision,
                                "node {i}: a delta did not chain"
                            );
                            assert_eq!(after.revision, d.to_revision);
                        }
                        Applied::Snapshot(s) => {
                            if s.history_id == before.history_id {
                                assert!(
                                    s.revision >= before.revision,
                                    "node {i}: a snapshot went back"
                                );
                            }
                            self.nodes[i].force_snapshot = false;
                        }
                        _ => {}
                    }
                    assert!(
                        after.revision >= self.nodes[i].high_water,
                        "node {i}: revision went backwards"
                    );
                    self.nodes[i].high_water = after.revision;
                    self.nodes[i].pending_report = Some(after.revision);
                    if let Some(f) = &self.nodes[i].fanout {
                        match &applied {
                            Applied::Snapshot(s) => {
                                f.reset(&s.history_id, s.revision, Some(s.digest))
                            }
                            Applied::Delta(d) => f.publish_shared(d.clone()),
                            _ => {}
                        }
                    }
                }
                Err(ApplyError::Gap { .. }) => {
                    self.drop_stream(i);
                    return;
                }
                Err(
                    e @ (ApplyError::DigestMismatch { .. }
                    | ApplyError::WrongHistory { .. }
                    | ApplyError::Malformed(_)),
                ) => {
                    panic!("node {i}: the protocol produced a refused event: {e}");
                }
                Err(e) => panic!("node {i}: storage failed: {e}"),
            }
        }
    }

    fn restart(&mut self, i: usize) {
        // a crash between the sled write and the report loses the report
        self.nodes[i].pending_report = None;
        self.drop_stream(i);
        if i < HUBS {
            // its PoPs lose their streams with it
            for p in HUBS..self.nodes.len() {
                if self.nodes[p]
                    .session
                    .as_ref()
                    .is_some_and(|s| s.upstream == Upstream::Hub(i))
                {
                    self.drop_stream(p);
                }
            }
        }
        let dir = self.nodes[i].dir.clone();
        self.nodes[i].fanout = None;
        // release the store (sled locks its folder) before reopening it
        self.restarts += 1;
        let scratch = self._root.path().join(format!("scratch-{}", self.restarts));
        drop(std::mem::replace(
            &mut self.nodes[i].replica,
            Arc::new(ReplicaStore::open(&scratch, false).unwrap()),
        ));
        let replica = Arc::new(ReplicaStore::open(&dir, false).unwrap());
        let p = replica.position();
        assert!(
            p.revision >= self.nodes[i].high_water,
            "node {i}: came back older than it was"
        );
        if i < HUBS {
            self.nodes[i].fanout = Some(self.hub_fanout(&replica));
        }
        self.nodes[i].replica = replica;
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Write { key, delete } => self.write(&[*key], *delete),
            Op::WriteMany { keys } => self.write(keys, false),
            Op::Deliver { link, n } => self.deliver(*link, *n),
            Op::Drop { link } => self.drop_stream(*link),
            Op::Connect { link, choice } => {
                self.connect(*link, *choice);
            }
            Op::HubRestart { hub } => self.restart(*hub),
            Op::PopCrash { pop } => self.restart(HUBS + pop),
        }
        self.pump();
        if matches!(op, Op::Deliver { .. }) {
            self.send_reports();
        }
        self.check_reports();
    }

    /// Heals every link and runs until every replica stands at control's head.
    fn converge(&mut self) {
        let head = self.control.head().unwrap();
        for round in 0..200 {
            for i in 0..self.nodes.len() {
                if self.nodes[i].session.is_none() && !self.connect(i, round) {
                    self.connect(i, round + 1);
                }
            }
            self.pump();
            for i in 0..self.nodes.len() {
                self.deliver(i, 64);
            }
            self.pump();
            if self.nodes.iter().all(|n| {
                let p = n.replica.position();
                p.revision == head.revision && p.history_id == head.history_id
            }) {
                return;
            }
        }
        let positions: Vec<u64> = self
            .nodes
            .iter()
            .map(|n| n.replica.position().revision)
            .collect();
        panic!(
            "no convergence to revision {}: {positions:?}",
            head.revision
        );
    }

    /// No node is ever reported at a revision it does not hold.
    fn check_reports(&self) {
        let view = self
            .propagation
            .view(self.control.head().unwrap().revision, 0);
        for n in &view.nodes {
            let i: usize = n.node_id.trim_start_matches("node-").parse().unwrap();
            assert!(
                n.applied_revision <= self.nodes[i].replica.position().revision,
                "{} reported {} but holds {}",
                n.node_id,
                n.applied_revision,
                self.nodes[i].replica.position().revision
            );
        }
    }

    fn check(&mut self) {
        // the periodic report of every node (a crash may have lost the last one)
        for n in self.nodes.iter_mut() {
            n.pending_report = Some(n.replica.position().revision);
        }
        self.send_reports();
        let head_revision = self.control.head().unwrap().revision;
        let view = self.propagation.view(head_revision, 0);
        for n in &view.nodes {
            assert_eq!(
                n.applied_revision, head_revision,
                "{} is reported behind after convergence",
                n.node_id
            );
        }
        let head = self.control.head().unwrap();
        let truth: BTreeMap<(String, String), Vec<u8>> = self
            .control
            .snapshot()
            .unwrap()
            .flags
            .into_iter()
            .map(|f| ((f.flag_set, f.key), f.definition_json))
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            let p = n.replica.position();
            assert_eq!(
                (p.history_id.as_str(), p.revision, p.digest),
                (head.history_id.as_str(), head.revision, head.digest),
                "node {i}"
            );
            let state: BTreeMap<(String, String), Vec<u8>> = n
                .replica
                .load()
                .unwrap()
                .flags
                .into_iter()
                .map(|f| ((f.flag_set, f.key), f.definition_json))
                .collect();
            assert_eq!(state, truth, "node {i}: state differs from control");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_without_loss_reorder_or_regression(ops in prop::collection::vec(op(), 1..60)) {
        let mut sim = Sim::new();
        for op in &ops {
            sim.run(op);
        }
        sim.converge();
        sim.check();
    }
}
