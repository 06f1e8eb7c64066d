//! Evaluation benchmark of the flagmesh engine per flag kind (static,
//! targeting with several clauses, fractional, semver, object), with two
//! peers measured in the same run on the same rules and contexts:
//! `datalogic-rs` 5.4 (rule compiled once; the request's JSON context
//! converted into its arena on every call, as a request would need) and
//! `flagd-evaluation-engine` 0.1 (through its public `Operator::apply`, which
//! takes the rule text and an OpenFeature context per call).
//!
//! A counting allocator reports heap allocations per evaluation. After
//! criterion has run, the medians are read back from criterion's estimates
//! and written to `target/bench-results/engine.json` and to the engine
//! section of `BENCHMARKS.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::Criterion;
use flagmesh_engine::{CompiledFlag, FlagDefinition, Strictness};
use serde_json::{Map, Value, json};

use flagmesh_test_support::counting::{ALLOCATIONS, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One benchmark case: a flag and the request contexts it is evaluated with.
struct Case {
    name: &'static str,
    flag: Value,
    contexts: Vec<Value>,
}

/// Contexts of 64 distinct users, so no case measures a single hot path.
fn users() -> Vec<Value> {
    let countries = ["NL", "DE", "US", "FR"];
    let plans = ["free", "pro", "enterprise"];
    (0..64)
        .map(|i| {
            json!({
                "targetingKey": format!("user-{i:04}-7f3a"),
                "email": format!("user{i}@{}", if i % 3 == 0 { "example.com" } else { "mail.test" }),
                "country": countries[i % countries.len()],
                "plan": plans[i % plans.len()],
                "age": 16 + (i % 40),
                "version": format!("{}.{}.{}", 1 + i % 3, i % 5, i % 7),
                "tier": if i % 2 == 0 { "gold" } else { "basic" },
            })
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let ctx = users();
    vec![
        Case {
            name: "static",
            flag: json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}),
            contexts: ctx.clone(),
        },
        Case {
            name: "targeting",
            flag: json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                "targeting": {"if": [{"and": [
                    {"==": [{"var": "country"}, "NL"]},
                    {"in": [{"var": "plan"}, ["pro", "enterprise"]]},
                    {">=": [{"var": "age"}, 21]}
                ]}, "on", "off"]}}),
            contexts: ctx.clone(),
        },
        Case {
            name: "fractional",
            flag: json!({"state": "ENABLED", "variants": {"a": "A", "b": "B", "c": "C"}, "defaultVariant": "a",
            "targeting": {"fractional": [
                {"cat": [{"var": "$flagd.flagKey"}, {"var": "targetingKey"}]},
                ["a", 50], ["b", 30], ["c", 20]
            ]}}),
            contexts: ctx.clone(),
        },
        Case {
            name: "semver",
            flag: json!({"state": "ENABLED", "variants": {"new": "new", "old": "old"}, "defaultVariant": "old",
                "targeting": {"if": [{"sem_ver": [{"var": "version"}, ">=", "2.1.0"]}, "new", "old"]}}),
            contexts: ctx.clone(),
        },
        Case {
            name: "object",
            flag: json!({"state": "ENABLED", "defaultVariant": "plain", "variants": {
                    "plain": {"theme": "light", "widgets": 3, "beta": false},
                    "rich": {"theme": "dark", "widgets": 12, "beta": true, "banner": {"text": "hi", "ttl": 30}}
                },
                "targeting": {"if": [{"==": [{"var": "tier"}, "gold"]}, "rich", "plain"]}}),
            contexts: ctx,
        },
    ]
}

const FLAG_KEY: &str = "bench-flag";

fn compile_ours(case: &Case) -> CompiledFlag {
    let def = FlagDefinition::from_json(FLAG_KEY, &case.flag, &Map::new(), Strictness::Strict)
        .expect("valid flag");
    CompiledFlag::new(FLAG_KEY, def, &Map::new())
}

/// The context a generic JsonLogic engine needs: the request's context plus
/// flagd's injected `$flagd` properties.
fn with_flagd_props(ctx: &Value) -> Value {
    let mut m = ctx.as_object().cloned().unwrap_or_default();
    m.insert(
        "$flagd".into(),
        json!({"flagKey": FLAG_KEY, "timestamp": 1_700_000_000}),
    );
    Value::Object(m)
}

fn to_open_feature(ctx: &Value) -> open_feature::EvaluationContext {
    let mut ec = open_feature::EvaluationContext::default();
    for (k, v) in ctx.as_object().into_iter().flatten() {
        match (k.as_str(), v) {
            ("targetingKey", Value::String(s)) => ec = ec.with_targeting_key(s.clone()),
            (_, Value::String(s)) => ec = ec.with_custom_field(k.clone(), s.clone()),
            (_, Value::Number(n)) if n.is_i64() => {
                ec = ec.with_custom_field(k.clone(), n.as_i64().unwrap_or(0))
            }
            (_, Value::Number(n)) => {
                ec = ec.with_custom_field(k.clone(), n.as_f64().unwrap_or(0.0))
            }
            (_, Value::Bool(b)) => ec = ec.with_custom_field(k.clone(), *b),
            _ => {}
        }
    }
    ec
}

fn bench(c: &mut Criterion, cases: &[Case]) {
    let dl_engine = datalogic_rs::Engine::builder().build();
    let flagd_op = flagd_evaluation_engine::Operator::new();
    for case in cases {
        let mut group = c.benchmark_group(case.name);
        let ours = compile_ours(case);
        let ctxs = &case.contexts;
        let mut i = 0usize;
        group.bench_function("flagmesh", |b| {
            b.iter(|| {
                i = (i + 1) % ctxs.len();
                let r = ours.resolve(black_box(&ctxs[i]));
                black_box((r.value, r.variant, r.reason));
            })
        });
        if let Some(targeting) = case.flag.get("targeting") {
            let dl_ctxs: Vec<Value> = ctxs.iter().map(with_flagd_props).collect();
            let compiled = dl_engine
                .compile(&targeting.to_string())
                .expect("datalogic compiles the rule");
            let mut session = dl_engine.session();
            let mut j = 0usize;
            group.bench_function("datalogic-rs", |b| {
                b.iter(|| {
                    j = (j + 1) % dl_ctxs.len();
                    {
                        let r = session
                            .eval_borrowed(&compiled, black_box(&dl_ctxs[j]))
                            .expect("evaluates");
                        black_box(r.as_str().map(str::len));
                    }
                    session.reset();
                })
            });
            let rule_text = targeting.to_string();
            let of_ctxs: Vec<open_feature::EvaluationContext> =
                ctxs.iter().map(to_open_feature).collect();
            let mut k = 0usize;
            group.bench_function("flagd-evaluation-engine", |b| {
                b.iter(|| {
                    k = (k + 1) % of_ctxs.len();
                    let r = flagd_op.apply(FLAG_KEY, black_box(&rule_text), black_box(&of_ctxs[k]));
                    black_box(r.ok());
                })
            });
        }
        group.finish();
    }
}

/// Heap allocations per flagmesh evaluation, per case.
fn allocations_per_eval(cases: &[Case]) -> Vec<(&'static str, f64)> {
    cases
        .iter()
        .map(|case| {
            let flag = compile_ours(case);
            let n = 10_000u64;
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            for i in 0..n {
                let ctx = &case.contexts[(i as usize) % case.contexts.len()];
                let r = flag.resolve(black_box(ctx));
                black_box((r.value, r.variant, r.reason));
            }
            let after = ALLOCATIONS.load(Ordering::Relaxed);
            (case.name, (after - before) as f64 / n as f64)
        })
        .collect()
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("criterion")
}

/// The median (ns) criterion estimated for `group/bench`.
fn median_ns(group: &str, bench: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let est: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    est["median"]["point_estimate"].as_f64()
}

fn fmt_ns(v: Option<f64>) -> String {
    v.map(|n| format!("{n:.1} ns"))
        .unwrap_or_else(|| "—".into())
}

fn fmt_ratio(peer: Option<f64>, ours: Option<f64>) -> String {
    match (peer, ours) {
        (Some(p), Some(o)) if o > 0.0 => format!("{:.1}x", p / o),
        _ => "—".into(),
    }
}

fn report(cases: &[Case], allocs: &[(&'static str, f64)]) {
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for (case, (_, alloc)) in cases.iter().zip(allocs) {
        let ours = median_ns(case.name, "flagmesh");
        let dl = median_ns(case.name, "datalogic-rs");
        let fe = median_ns(case.name, "flagd-evaluation-engine");
        rows.push(format!(
            "| {} | {} | {alloc:.2} | {} | {} | {} | {} |",
            case.name,
            fmt_ns(ours),
            fmt_ns(dl),
            fmt_ratio(dl, ours),
            fmt_ns(fe),
            fmt_ratio(fe, ours),
        ));
        json_rows.push(json!({
            "case": case.name,
            "flagmesh_median_ns": ours,
            "flagmesh_allocations_per_eval": alloc,
            "datalogic_rs_median_ns": dl,
            "flagd_evaluation_engine_median_ns": fe,
        }));
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let results = json!({"benchmark": "engine-evaluate", "cpus": cpus, "cases": json_rows});
    let out = workspace_root().join("target/bench-results");
    if std::fs::create_dir_all(&out).is_ok() {
        let _ = std::fs::write(
            out.join("engine.json"),
            serde_json::to_string_pretty(&results).unwrap_or_default(),
        );
    }
    let table = format!(
        "| flag kind | flagmesh median | allocations / eval | datalogic-rs 5.4 (compiled) | ratio | flagd-evaluation-engine 0.1 | ratio |\n\
         |---|---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("\n{table}");
    update_benchmarks_md(&workspace_root().join("BENCHMARKS.md"), &table);
}

/// Replaces the text between the engine markers of BENCHMARKS.md.
fn update_benchmarks_md(path: &Path, table: &str) {
    const BEGIN: &str = "<!-- engine-results:begin -->";
    const END: &str = "<!-- engine-results:end -->";
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        return;
    };
    let updated = format!("{}{BEGIN}\n{table}{}", &text[..b], &text[e..]);
    let _ = std::fs::write(path, updated);
}

fn main() {
    let cases = cases();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(800))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c, &cases);
    c.final_summary();
    // `cargo test` runs this target once per benchmark as a smoke test
    // (without `--bench`); only a real benchmark run writes results.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let allocs = allocations_per_eval(&cases);
    report(&cases, &allocs);
}
