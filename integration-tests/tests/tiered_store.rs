//! The tiered store of a PoP: definitions stay in sled, compiled flags are
//! held up to a memory budget and the least recently used are dropped.
//!
//! Under a budget that holds only a few flags, every flag of the flagd
//! test kit evaluates exactly as a state that holds every definition and
//! never drops anything, for random contexts; and after changes, a flag
//! dropped and compiled again (or held across the change) never answers
//! with its former definition. The first test runs the real replica and
//! state code in-process, so it can drive thousands of evaluations and
//! read the tier's counters; the second runs two PoP processes, one with
//! `--memory-budget-mb` a few flags wide, and compares them over gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use std::time::Duration;

use flagmesh_engine::{FlagDocument, Strictness, ValueType};
use flagmesh_integration_tests::topology::{Eval, Mesh, NodeRef, TopologySpec, eventually};
use flagmesh_mesh::SourceSnapshot;
use flagmesh_mesh::compiled::{PopState, Target};
use flagmesh_mesh::replica::{Applied, ReplicaStore, digest_of};
use flagmesh_mesh::tier::Tier;
use flagmesh_proto::convert::map_to_struct;
use flagmesh_proto::v1::sync_event::Event;
use flagmesh_proto::v1::{
    ApplyFlagSetRequest, Delta, EvaluateRequest, EvaluateResponse, Flag, FlagSet, Snapshot,
    SyncEvent, UpdateFlagRequest,
};
use flagmesh_test_support::flagd_kit::{json_files, package_dir};
use serde_json::{Map, Value, json};

/// A small deterministic generator (xorshift64*), seeded per test so a
/// failure names what reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Every flag of the test kit's flag files, each file its own flag set
/// (named by the file), with definitions as control stores them.
fn testbed() -> (Vec<FlagSet>, Vec<Flag>) {
    let mut sets = Vec::new();
    let mut flags = Vec::new();
    for file in json_files(&package_dir().join("flagd-testbed/flags")) {
        let set = file.file_stem().unwrap().to_str().unwrap().to_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        let doc = FlagDocument::parse(&text, Strictness::Lenient).unwrap();
        sets.push(FlagSet {
            id: set.clone(),
            metadata: Some(map_to_struct(&doc.metadata)),
            ..Default::default()
        });
        for (key, def) in &doc.flags {
            flags.push(Flag {
                flag_set: set.clone(),
                key: key.clone(),
                definition_json: def.to_canonical_json(),
                mod_revision: 1,
                create_revision: 1,
            });
        }
    }
    assert!(flags.len() > 50, "the kit's flags: {}", flags.len());
    (sets, flags)
}

/// What the flags' rules read (`var` names) and compare against (string
/// and number literals): random contexts are drawn from these, so that
/// they take the rules' branches rather than miss them all.
#[derive(Default)]
struct Vocabulary {
    vars: Vec<String>,
    strings: Vec<String>,
    numbers: Vec<f64>,
}

impl Vocabulary {
    fn of(flags: &[Flag]) -> Self {
        fn walk(v: &Value, voc: &mut Vocabulary) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(name)) = m.get("var") {
                        voc.vars.push(name.clone());
                    }
                    if let Some(Value::Array(a)) = m.get("var")
                        && let Some(Value::String(name)) = a.first()
                    {
                        voc.vars.push(name.clone());
                    }
                    m.values().for_each(|x| walk(x, voc));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, voc)),
                Value::String(s) => voc.strings.push(s.clone()),
                Value::Number(n) => voc.numbers.extend(n.as_f64()),
                _ => {}
            }
        }
        let mut voc = Self::default();
        for f in flags {
            let def: Value = serde_json::from_slice(&f.definition_json).unwrap();
            if let Some(t) = def.get("targeting") {
                walk(t, &mut voc);
            }
        }
        for v in [&mut voc.vars, &mut voc.strings] {
            v.sort();
            v.dedup();
        }
        voc.vars.retain(|v| !v.starts_with("$flagd"));
        voc
    }

    fn context(&self, rng: &mut Rng) -> Value {
        let mut ctx = Map::new();
        if rng.below(4) != 0 {
            ctx.insert(
                "targetingKey".into(),
                json!(format!("user-{}", rng.below(50))),
            );
        }
        for var in &self.vars {
            let value = match rng.below(6) {
                0 => continue,
                1 | 2 if !self.strings.is_empty() => json!(rng.pick(&self.strings)),
                3 if !self.numbers.is_empty() => json!(rng.pick(&self.numbers)),
                4 => json!(rng.below(2) == 0),
                _ => json!(format!(
                    "{}.{}.{}",
                    rng.below(3),
                    rng.below(5),
                    rng.below(5)
                )),
            };
            // `a.b` reads field b of object a
            let mut at = &mut ctx;
            let mut parts = var.split('.').peekable();
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    at.insert(part.to_owned(), value.clone());
                    break;
                }
                let next = at
                    .entry(part.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !next.is_object() {
                    *next = Value::Object(Map::new());
                }
                let Value::Object(m) = next else { break };
                at = m;
            }
        }
        Value::Object(ctx)
    }
}

/// Everything an evaluation answers, comparable.
fn answer(state: &PopState, set: &str, key: &str, context: &Value) -> String {
    let target = Target::lookup(state, set, key);
    let o = target.resolve(context, None, ValueType::Any);
    let r = &o.resolution;
    format!(
        "value={:?} variant={:?} reason={:?} error={:?} metadata={:?} mod_revision={}",
        r.value,
        r.variant,
        r.reason,
        r.error.as_ref().map(|e| (e.code, e.message.to_string())),
        r.metadata.to_map(),
        o.mod_revision
    )
}

fn snapshot(sets: &[FlagSet], flags: &[Flag]) -> SyncEvent {
    let digest = digest_of(&SourceSnapshot {
        history_id: "h".into(),
        revision: 1,
        digest: 0,
        flags: flags.to_vec(),
        flag_sets: sets.to_vec(),
    });
    SyncEvent {
        event: Some(Event::Snapshot(Snapshot {
            history_id: "h".into(),
            revision: 1,
            digest: Some(digest),
            chunk: 0,
            last: true,
            flags: flags.to_vec(),
            flag_sets: sets.to_vec(),
        })),
    }
}

/// `flag` changed so that it answers differently: another default
/// variant when it has one to move to, else its state flipped.
fn changed(flag: &Flag, revision: u64) -> Flag {
    let mut def: Value = serde_json::from_slice(&flag.definition_json).unwrap();
    let variants: Vec<String> = def
        .get("variants")
        .and_then(Value::as_object)
        .map(|v| v.keys().cloned().collect())
        .unwrap_or_default();
    let default = def
        .get("defaultVariant")
        .and_then(Value::as_str)
        .map(str::to_owned);
    match variants
        .iter()
        .find(|v| Some(v.as_str()) != default.as_deref())
    {
        Some(other) if default.is_some() => def["defaultVariant"] = json!(other),
        _ => {
            let enabled = def.get("state") == Some(&json!("ENABLED"));
            def["state"] = json!(if enabled { "DISABLED" } else { "ENABLED" });
        }
    }
    Flag {
        definition_json: serde_json::to_vec(&def).unwrap(),
        mod_revision: revision,
        ..flag.clone()
    }
}

#[test]
fn under_a_budget_of_a_few_flags_every_flag_evaluates_as_without_one() {
    let seed = 0x5EED_F1A6_u64;
    let mut rng = Rng(seed);
    let (sets, mut flags) = testbed();
    let voc = Vocabulary::of(&flags);
    let dir = tempfile::tempdir().unwrap();
    let replica = ReplicaStore::open(dir.path(), false).unwrap();
    // about four of the kit's flags fit
    let budget = 8 << 10;
    let tier = Arc::new(Tier::new(Some(replica.tree()), Some(budget), Vec::new()));
    let Ok(Applied::Snapshot(s)) = replica.apply(snapshot(&sets, &flags)) else {
        panic!("the snapshot applies");
    };
    let mut tiered = PopState::from_snapshot_in(&s, tier.clone());
    // the reference holds every definition and compiled flag
    let mut reference = PopState::from_snapshot(&s);
    let check =
        |flags: &[Flag], tiered: &PopState, reference: &PopState, rng: &mut Rng, rounds: usize| {
            for _ in 0..rounds {
                let f = rng.pick(flags);
                let ctx = voc.context(rng);
                assert_eq!(
                    answer(tiered, &f.flag_set, &f.key, &ctx),
                    answer(reference, &f.flag_set, &f.key, &ctx),
                    "{}/{} for {ctx} (seed {seed:#x})",
                    f.flag_set,
                    f.key
                );
            }
        };
    // every flag at least once, then at random
    for f in &flags {
        let ctx = voc.context(&mut rng);
        assert_eq!(
            answer(&tiered, &f.flag_set, &f.key, &ctx),
            answer(&reference, &f.flag_set, &f.key, &ctx),
            "{}/{} for {ctx}",
            f.flag_set,
            f.key
        );
    }
    check(&flags, &tiered, &reference, &mut rng, 5_000);
    let stats = tier.stats();
    assert!(
        stats.used <= budget + 4096,
        "the budget holds (within one flag): {stats:?}"
    );
    assert!(
        stats.resident < flags.len() / 4,
        "only a few flags stay compiled: {stats:?}"
    );
    assert!(
        stats.evictions > flags.len() as u64,
        "flags were dropped and compiled again: {stats:?}"
    );
    assert!(stats.hits > 0, "recently used flags were found: {stats:?}");

    // changes: each round makes some flags compiled (used just before),
    // changes them and others, and checks every changed flag answers its
    // new definition, whether it was held, dropped or never compiled
    let mut revision = 1;
    for _round in 0..20 {
        let mut upserts = Vec::new();
        for _ in 0..8 {
            let i = rng.below(flags.len());
            let f = flags[i].clone();
            let ctx = voc.context(&mut rng);
            answer(&tiered, &f.flag_set, &f.key, &ctx);
            upserts.push(i);
        }
        revision += 1;
        upserts.sort();
        upserts.dedup();
        let mut delta = Delta {
            history_id: "h".into(),
            from_revision: revision - 1,
            to_revision: revision,
            ..Default::default()
        };
        for &i in &upserts {
            flags[i] = changed(&flags[i], revision);
            delta.upserts.push(flags[i].clone());
        }
        let event = SyncEvent {
            event: Some(Event::Delta(delta)),
        };
        let Ok(Applied::Delta(d)) = replica.apply(event) else {
            panic!("the delta applies");
        };
        tiered = tiered.apply(&d);
        reference = reference.apply(&d);
        let ctx = json!({});
        for &i in &upserts {
            let f = &flags[i];
            let got = answer(&tiered, &f.flag_set, &f.key, &ctx);
            assert_eq!(got, answer(&reference, &f.flag_set, &f.key, &ctx));
            assert!(
                got.ends_with(&format!("mod_revision={revision}")),
                "{}/{} answers its new definition: {got}",
                f.flag_set,
                f.key
            );
        }
        check(&flags, &tiered, &reference, &mut rng, 300);
    }
    // a restart: a tier over the same store warms what was held
    let held = tier.stats().resident;
    assert!(tier.save_resident().unwrap() > 0);
    let warm = Tier::new(Some(replica.tree()), Some(budget), Vec::new()).warm_list();
    assert_eq!(warm.len(), held, "the held flags are listed for warming");
}

#[test]
fn hot_flags_stay_compiled_and_a_held_flag_answers_its_change() {
    let (sets, flags) = testbed();
    let dir = tempfile::tempdir().unwrap();
    let replica = ReplicaStore::open(dir.path(), false).unwrap();
    let hot = (flags[0].flag_set.clone(), flags[0].key.clone());
    let tier = Arc::new(Tier::new(Some(replica.tree()), Some(1), vec![hot.clone()]));
    let Ok(Applied::Snapshot(s)) = replica.apply(snapshot(&sets, &flags)) else {
        panic!("the snapshot applies");
    };
    let state = PopState::from_snapshot_in(&s, tier.clone());
    let flag_of = |state: &PopState, set: &str, key: &str| {
        state.sets[set]
            .flags
            .get(key)
            .cloned()
            .expect("the flag is in the state")
    };
    let ctx = json!({});
    for f in &flags {
        answer(&state, &f.flag_set, &f.key, &ctx);
    }
    // a budget of one byte holds nothing but the hot flag
    assert!(flag_of(&state, &hot.0, &hot.1).is_compiled());
    let compiled: usize = flags
        .iter()
        .filter(|f| flag_of(&state, &f.flag_set, &f.key).is_compiled())
        .count();
    assert!(
        compiled <= 2,
        "{compiled} flags held under a budget of one byte"
    );
    assert_eq!(tier.warm_list().first(), Some(&hot), "hot flags warm first");

    // the hot flag changes while compiled: the new state answers the change
    let new = changed(&flags[0], 2);
    let event = SyncEvent {
        event: Some(Event::Delta(Delta {
            history_id: "h".into(),
            from_revision: 1,
            to_revision: 2,
            upserts: vec![new.clone()],
            ..Default::default()
        })),
    };
    let Ok(Applied::Delta(d)) = replica.apply(event) else {
        panic!("the delta applies");
    };
    let next = state.apply(&d);
    let want = PopState::from_snapshot(&SourceSnapshot {
        history_id: "h".into(),
        revision: 2,
        digest: 0,
        flags: vec![new.clone()],
        flag_sets: sets.clone(),
    });
    assert_eq!(
        answer(&next, &hot.0, &hot.1, &ctx),
        answer(&want, &hot.0, &hot.1, &ctx)
    );
    // the former state, still served to a request in flight, answers
    // from the definition it held
    assert!(answer(&state, &hot.0, &hot.1, &ctx).ends_with("mod_revision=1"));
}

/// The answer of one PoP, without what names the PoP.
async fn served(eval: &mut Eval, f: &Flag, ctx: &Value) -> EvaluateResponse {
    let r = eval
        .evaluate(EvaluateRequest {
            flag_set: f.flag_set.clone(),
            flag_key: f.key.clone(),
            context: ctx.as_object().map(map_to_struct),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{}/{}: {e:?}", f.flag_set, f.key))
        .into_inner();
    EvaluateResponse {
        pop_id: String::new(),
        ..r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_with_a_budget_of_a_few_flags_answers_as_one_without_a_budget() {
    let root = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(TopologySpec::test(root.path(), 1, 2))
        .await
        .unwrap();
    let (_, mut flags) = testbed();
    let voc = Vocabulary::of(&flags);
    let mut admin = mesh.admin().await.unwrap();
    for file in json_files(&package_dir().join("flagd-testbed/flags")) {
        let set = file.file_stem().unwrap().to_str().unwrap().to_owned();
        let mut doc: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        if let Some(m) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("flagSetId");
        }
        admin
            .apply_flag_set(ApplyFlagSetRequest {
                flag_set: set.clone(),
                document: doc.to_string(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{set}: {e:?}"));
    }
    // PoP 0 keeps everything compiled; PoP 1 holds about one kit flag
    for (pop, budget) in [(0, "unlimited"), (1, "0.002")] {
        let node = mesh.node(NodeRef::Pop(pop));
        let mut args = node.args_for_restart();
        args.extend(["--memory-budget-mb".into(), budget.into()]);
        node.set_args(args);
        assert!(mesh.stop(NodeRef::Pop(pop)));
        mesh.restart(NodeRef::Pop(pop)).unwrap();
    }
    mesh.converged(Duration::from_secs(30)).await.unwrap();
    let (mut uncapped, mut capped) = (mesh.eval(0).await.unwrap(), mesh.eval(1).await.unwrap());
    // both connected upstream again (a PoP serving from sled alone says
    // it is stale)
    for eval in [&uncapped, &capped] {
        let (eval, probe) = (eval.clone(), flags[0].clone());
        eventually("the restarted PoPs are current", 30, || {
            let (mut eval, probe) = (eval.clone(), probe.clone());
            async move { !served(&mut eval, &probe, &json!({})).await.stale }
        })
        .await;
    }
    let mut rng = Rng(0x7153_0B0D);
    let compare = async |flags: &[Flag], rng: &mut Rng, uncapped: &mut Eval, capped: &mut Eval| {
        for f in flags {
            let ctx = voc.context(rng);
            assert_eq!(
                served(capped, f, &ctx).await,
                served(uncapped, f, &ctx).await,
                "{}/{} for {ctx}",
                f.flag_set,
                f.key
            );
        }
    };
    for _ in 0..3 {
        compare(&flags, &mut rng, &mut uncapped, &mut capped).await;
    }
    let evictions = mesh
        .metric(NodeRef::Pop(1), "flagmesh_compiled_flag_evictions_total")
        .await;
    assert!(
        evictions > flags.len() as f64,
        "the capped PoP dropped flags and compiled them again: {evictions}"
    );
    let held = mesh
        .metric(NodeRef::Pop(1), "flagmesh_compiled_flags")
        .await;
    assert!(held <= 2.0, "the capped PoP holds {held} compiled flags");

    // changes, each to a flag just used (so held compiled at the capped
    // PoP if it fits, else dropped): both PoPs answer the new definitions
    let mut changed_flags = Vec::new();
    for i in (0..flags.len()).step_by(7) {
        served(&mut capped, &flags[i], &json!({})).await;
        let new = changed(&flags[i], 0);
        let revision = admin
            .update_flag(UpdateFlagRequest {
                flag_set: new.flag_set.clone(),
                key: new.key.clone(),
                definition_json: String::from_utf8(new.definition_json.clone()).unwrap(),
                force: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .revision;
        flags[i] = Flag {
            mod_revision: revision,
            ..new
        };
        changed_flags.push(flags[i].clone());
    }
    mesh.converged(Duration::from_secs(30)).await.unwrap();
    for f in &changed_flags {
        let got = served(&mut capped, f, &json!({})).await;
        assert_eq!(
            got.mod_revision, f.mod_revision,
            "{}/{}: {got:?}",
            f.flag_set, f.key
        );
    }
    compare(&changed_flags, &mut rng, &mut uncapped, &mut capped).await;
    compare(&flags, &mut rng, &mut uncapped, &mut capped).await;
    mesh.stop_all();
}
