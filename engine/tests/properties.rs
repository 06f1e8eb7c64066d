//! Property tests of the engine: evaluation never panics on arbitrary
//! contexts and arbitrary valid targeting; `fractional` splits a large
//! population within 1% of its weights; the state digest built incrementally
//! through any order of upserts and deletes equals the digest of the final
//! state.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;

use flagmesh_engine::{CompiledFlag, FlagDefinition, StateDigest, Strictness, compile, flag_hash};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Arbitrary JSON scalars.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        "[a-z0-9.@ -]{0,12}".prop_map(Value::String),
        prop_oneof![Just("1.2.3"), Just("v2"), Just("2.0.0-beta")]
            .prop_map(|s| Value::String(s.into())),
    ]
}

/// Literals a rule may hold: scalars and arrays of them (a JSON object in a
/// rule is an operation, never a literal).
fn literal() -> impl Strategy<Value = Value> {
    prop_oneof![
        scalar(),
        prop::collection::vec(scalar(), 0..4).prop_map(Value::Array)
    ]
}

/// Arbitrary JSON values (contexts).
fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A context: an object with a few well-known keys and arbitrary extra ones.
fn context() -> impl Strategy<Value = Value> {
    (
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of("[a-z0-9]{0,10}"),
        prop::collection::btree_map("[a-z]{1,3}", json_value(), 0..4),
    )
        .prop_map(|(email, version, tk, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            if let Some(e) = email {
                m.insert("email".into(), e);
            }
            if let Some(v) = version {
                m.insert("version".into(), v);
            }
            if let Some(t) = tk {
                m.insert("targetingKey".into(), Value::String(t));
            }
            Value::Object(m)
        })
}

const VARS: &[&str] = &[
    "email",
    "version",
    "targetingKey",
    "a",
    "a.b",
    "xs",
    "$flagd.flagKey",
    "",
];
const BINARY: &[&str] = &[
    "==",
    "!=",
    "===",
    "!==",
    "<",
    "<=",
    ">",
    ">=",
    "in",
    "+",
    "-",
    "*",
    "/",
    "%",
    "starts_with",
    "ends_with",
];
const VARIADIC: &[&str] = &["and", "or", "if", "cat", "max", "min", "merge", "missing"];

/// Arbitrary valid rules over the operators flagd supports.
fn rule() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        literal(),
        prop::sample::select(VARS).prop_map(|v| json!({"var": v})),
        (prop::sample::select(VARS), literal()).prop_map(|(v, d)| json!({"var": [v, d]})),
    ];
    leaf.prop_recursive(4, 48, 4, |inner| {
        prop_oneof![
            (prop::sample::select(BINARY), inner.clone(), inner.clone())
                .prop_map(|(op, a, b)| json!({ op: [a, b] })),
            (
                prop::sample::select(VARIADIC),
                prop::collection::vec(inner.clone(), 0..4)
            )
                .prop_map(|(op, args)| json!({ op: args })),
            inner.clone().prop_map(|a| json!({"!": [a]})),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| json!({"map": [a, b]})),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| json!({"some": [a, b]})),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, b, c)| json!({"reduce": [a, b, c]})),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, b, c)| json!({"substr": [a, b, c]})),
            (
                inner.clone(),
                prop::sample::select(&["=", "!=", "<", "<=", ">", ">=", "^", "~"][..]),
                inner.clone()
            )
                .prop_map(|(a, op, b)| json!({"sem_ver": [a, op, b]})),
            (inner.clone(), 0u32..100, 0u32..100).prop_map(
                |(by, w1, w2)| json!({"fractional": [{"cat": [by]}, ["on", w1], ["off", w2]]})
            ),
            (inner.clone(), inner)
                .prop_map(|(w, v)| json!({"fractional": [[v, {"+": [w]}], ["off"]]})),
        ]
    })
}

fn flag_with(targeting: Value) -> CompiledFlag {
    let raw = json!({
        "state": "ENABLED",
        "variants": {"on": "ON", "off": "OFF", "true": "T", "false": "F"},
        "defaultVariant": "off",
        "targeting": targeting,
    });
    let def = FlagDefinition::from_json("prop-flag", &raw, &Map::new(), Strictness::Lenient)
        .expect("flag shape is valid");
    CompiledFlag::new("prop-flag", def, &Map::new())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any rule built from the supported operators compiles, and evaluating
    /// it on any context returns a resolution without panicking.
    #[test]
    fn evaluation_never_panics(targeting in rule(), ctx in context()) {
        if !targeting.is_object() {
            return Ok(());
        }
        prop_assert!(compile(&targeting, Strictness::Lenient).is_ok(), "rule did not compile: {targeting}");
        let flag = flag_with(targeting);
        let r = flag.resolve(&ctx);
        // a value is served exactly when no error and a variant exist
        prop_assert_eq!(r.value.is_some(), r.variant.is_some());
        prop_assert_eq!(r.error.is_some(), r.reason == flagmesh_engine::Reason::Error);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Over 100,000 distinct targeting keys, each bucket's share is within
    /// one percentage point of its weight's share.
    #[test]
    fn fractional_splits_within_one_percent(weights in prop::collection::vec(1u64..100, 2..6), salt in "[a-z]{4}") {
        let buckets: Vec<Value> = weights.iter().enumerate().map(|(i, w)| json!([format!("v{i}"), w])).collect();
        let variants: Map<String, Value> = (0..weights.len()).map(|i| (format!("v{i}"), json!(i))).collect();
        let raw = json!({"state": "ENABLED", "variants": variants, "defaultVariant": "v0",
                         "targeting": {"fractional": buckets}});
        let def = FlagDefinition::from_json("split", &raw, &Map::new(), Strictness::Strict).expect("valid");
        let flag = CompiledFlag::new("split", def, &Map::new());
        let total: u64 = weights.iter().sum();
        let n = 100_000u32;
        let mut counts = vec![0u32; weights.len()];
        for i in 0..n {
            let ctx = json!({"targetingKey": format!("{salt}-user-{i}")});
            let r = flag.resolve(&ctx);
            let idx = r.int_value().expect("a bucket is chosen") as usize;
            counts[idx] += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            let want = *w as f64 / total as f64;
            let got = f64::from(counts[i]) / f64::from(n);
            prop_assert!((got - want).abs() < 0.01, "bucket {i}: {got:.4} vs weight share {want:.4} ({weights:?})");
        }
    }
}

/// One operation on a replicated state.
#[derive(Debug, Clone)]
enum Op {
    Upsert(String, String, Vec<u8>),
    Delete(String, String),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let key = ("[ab]", "[a-e]");
    prop::collection::vec(
        prop_oneof![
            (key, prop::collection::vec(any::<u8>(), 0..8))
                .prop_map(|((s, k), b)| Op::Upsert(s, k, b)),
            key.prop_map(|(s, k)| Op::Delete(s, k)),
        ],
        0..64,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The digest maintained in O(1) per change equals the digest computed
    /// from scratch over the final state, whatever the order of changes.
    #[test]
    fn incremental_digest_equals_full_digest(ops in ops(), shuffle_seed in any::<u64>()) {
        let mut state: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
        let mut digest = StateDigest::default();
        for op in &ops {
            match op {
                Op::Upsert(s, k, bytes) => {
                    let old = state.insert((s.clone(), k.clone()), bytes.clone());
                    digest.replace(old.map(|o| flag_hash(s, k, &o)), Some(flag_hash(s, k, bytes)));
                }
                Op::Delete(s, k) => {
                    if let Some(old) = state.remove(&(s.clone(), k.clone())) {
                        digest.remove(flag_hash(s, k, &old));
                    }
                }
            }
        }
        let full = StateDigest::of(state.iter().map(|((s, k), b)| flag_hash(s, k, b)));
        prop_assert_eq!(digest, full);

        // building the same final state in another order gives the same digest
        let mut entries: Vec<_> = state.iter().collect();
        let len = entries.len().max(1);
        entries.rotate_left((shuffle_seed as usize) % len);
        let reordered = StateDigest::of(entries.iter().map(|((s, k), b)| flag_hash(s, k, b)));
        prop_assert_eq!(reordered, full);
    }
}
