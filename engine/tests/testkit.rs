//! Runs the flagd evaluator test kit (`flagd-testbed/evaluator/`: testkit
//! flags and gherkin scenarios, testbed release 3.10.3, shipped in the
//! crates.io package `open-feature-flagd` 0.3.0) against the flagmesh
//! engine with the `cucumber` crate. Every scenario runs except those tagged
//! `@fractional-v1` (flagmesh buckets with flagd's v2 algorithm); the run
//! fails on any failed or skipped step and prints how many scenarios passed.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cucumber::gherkin::Step;
use cucumber::writer::Stats as _;
use cucumber::{World, given, then, when};
use flagmesh_engine::{CompiledFlagSet, FlagDocument, Strictness, ValueType};
use serde_json::{Map, Value, json};

fn testbed() -> PathBuf {
    flagmesh_test_support::flagd_kit::package_dir().join("flagd-testbed/evaluator")
}

/// The test kit's flags, compiled once like a flagd evaluator loads them.
fn flags() -> Arc<CompiledFlagSet> {
    static FLAGS: OnceLock<Arc<CompiledFlagSet>> = OnceLock::new();
    FLAGS
        .get_or_init(|| {
            let text = std::fs::read_to_string(testbed().join("flags/testkit-flags.json"))
                .expect("testkit flags readable");
            let doc = FlagDocument::parse(&text, Strictness::Lenient)
                .unwrap_or_else(|e| panic!("testkit flags rejected: {e}"));
            Arc::new(CompiledFlagSet::from_document(&doc))
        })
        .clone()
}

/// The outcome of one evaluation, as OpenFeature's evaluation details.
#[derive(Debug, Clone)]
struct Details {
    value: Value,
    reason: String,
    error_code: Option<String>,
    metadata: Map<String, Value>,
}

#[derive(Debug, Default, World)]
struct EvaluatorWorld {
    flags: Option<Arc<CompiledFlagSet>>,
    flag_type: String,
    key: String,
    fallback: Value,
    context: Map<String, Value>,
    details: Option<Details>,
}

/// The kit writes `\"` inside table cells for a plain quote.
fn unescape(s: &str) -> String {
    s.replace("\\\"", "\"")
}

/// Reads a step's value text as the flag type names it.
fn typed(flag_type: &str, raw: &str) -> Value {
    let raw = raw.to_owned();
    match flag_type {
        "Boolean" => Value::Bool(
            raw.parse()
                .unwrap_or_else(|_| panic!("not a boolean: {raw}")),
        ),
        "Integer" => json!(
            raw.parse::<i64>()
                .unwrap_or_else(|_| panic!("not an integer: {raw}"))
        ),
        "Float" => json!(
            raw.parse::<f64>()
                .unwrap_or_else(|_| panic!("not a float: {raw}"))
        ),
        "Object" => serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}")),
        _ => Value::String(raw),
    }
}

fn value_type(flag_type: &str) -> ValueType {
    match flag_type {
        "Boolean" => ValueType::Bool,
        "Integer" => ValueType::Int,
        "Float" => ValueType::Float,
        "Object" => ValueType::Object,
        "String" => ValueType::String,
        other => panic!("unknown flag type {other}"),
    }
}

#[given("an evaluator")]
fn an_evaluator(w: &mut EvaluatorWorld) {
    w.flags = Some(flags());
}

#[given(regex = r#"^an? (\w+)-flag with key "([^"]*)" and a fallback value "(.*)"$"#)]
fn a_flag(w: &mut EvaluatorWorld, flag_type: String, key: String, fallback: String) {
    w.fallback = typed(&flag_type, &fallback);
    w.flag_type = flag_type;
    w.key = key;
}

#[given(
    regex = r#"^a context containing a key "([^"]*)", with type "(\w+)" and with value "(.*)"$"#
)]
fn a_context_key(w: &mut EvaluatorWorld, key: String, ty: String, value: String) {
    w.context.insert(key, typed(&ty, &value));
}

#[given(regex = r#"^a context containing a targeting key with value "(.*)"$"#)]
fn a_targeting_key(w: &mut EvaluatorWorld, value: String) {
    w.context
        .insert("targetingKey".into(), Value::String(value));
}

#[given(
    regex = r#"^a context containing a nested property with outer key "([^"]*)" and inner key "([^"]*)", with value "(.*)"$"#
)]
fn a_nested_property(w: &mut EvaluatorWorld, outer: String, inner: String, value: String) {
    let mut m = Map::new();
    m.insert(inner, Value::String(value));
    w.context.insert(outer, Value::Object(m));
}

#[when("the flag was evaluated with details")]
fn evaluate(w: &mut EvaluatorWorld) {
    let flags = w.flags.clone().expect("an evaluator was given");
    let ctx = Value::Object(w.context.clone());
    let r = flags.resolve_typed(&w.key, &ctx, value_type(&w.flag_type));
    let value = match w.flag_type.as_str() {
        "Boolean" => r.bool_value().map(Value::Bool),
        "Integer" => r.int_value().map(Value::from),
        "Float" => r.float_value().map(Value::from),
        "Object" => r.object_value().map(|o| Value::Object(o.clone())),
        _ => r.string_value().map(|s| Value::String(s.to_owned())),
    };
    w.details = Some(Details {
        value: value.unwrap_or_else(|| w.fallback.clone()),
        reason: r.reason.as_str().to_owned(),
        error_code: r.error_code().map(|c| c.as_str().to_owned()),
        metadata: r.metadata.to_map(),
    });
}

fn details(w: &EvaluatorWorld) -> &Details {
    w.details.as_ref().expect("the flag was evaluated")
}

#[then(regex = r#"^the resolved details value should be "(.*)"$"#)]
fn value_should_be(w: &mut EvaluatorWorld, expected: String) {
    let want = typed(&w.flag_type, &expected);
    let got = &details(w).value;
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(x)) => assert!((g - x).abs() < 1e-12, "value {got}, expected {want}"),
        _ => assert_eq!(got, &want, "value of {}", w.key),
    }
}

#[then(regex = r#"^the reason should be "(\w+)"$"#)]
fn reason_should_be(w: &mut EvaluatorWorld, expected: String) {
    assert_eq!(details(w).reason, expected, "reason of {}", w.key);
}

#[then(regex = r#"^the error-code should be "(\w+)"$"#)]
fn error_code_should_be(w: &mut EvaluatorWorld, expected: String) {
    assert_eq!(
        details(w).error_code.as_deref(),
        Some(expected.as_str()),
        "error code of {}",
        w.key
    );
}

#[then("the resolved metadata should contain")]
fn metadata_should_contain(w: &mut EvaluatorWorld, step: &Step) {
    let table = step.table.as_ref().expect("a metadata table");
    let md = &details(w).metadata;
    for row in table.rows.iter().skip(1) {
        let (key, ty, raw) = (&row[0], &row[1], &row[2]);
        let want = typed(ty, raw);
        let got = md
            .get(key)
            .unwrap_or_else(|| panic!("metadata lacks {key}: {md:?}"));
        match (got.as_f64(), want.as_f64()) {
            (Some(g), Some(x)) => assert!((g - x).abs() < 1e-12, "metadata {key}: {got} != {want}"),
            _ => assert_eq!(got, &want, "metadata {key}"),
        }
    }
}

#[then("the resolved metadata is empty")]
fn metadata_is_empty(w: &mut EvaluatorWorld) {
    assert!(
        details(w).metadata.is_empty(),
        "metadata {:?}",
        details(w).metadata
    );
}

/// The kit's feature files, copied to a scratch folder with one change: the
/// `\"` escape inside table cells (which the `gherkin` crate's parser
/// rejects) becomes a plain quote, which is what the kit means by it.
fn features() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flagmesh-testkit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    for entry in std::fs::read_dir(testbed().join("gherkin")).expect("gherkin folder") {
        let path = entry.expect("folder entry").path();
        if path.extension().is_some_and(|e| e == "feature") {
            let text = std::fs::read_to_string(&path).expect("feature readable");
            let name = path.file_name().expect("file name");
            std::fs::write(dir.join(name), unescape(&text)).expect("feature copied");
        }
    }
    dir
}

fn main() {
    let features = features();
    let writer = futures::executor::block_on(
        EvaluatorWorld::cucumber()
            .fail_on_skipped()
            .filter_run(&features, |_, _, scenario| {
                !scenario.tags.iter().any(|t| t == "fractional-v1")
            }),
    );
    let _ = std::fs::remove_dir_all(&features);
    let failed = writer.failed_steps()
        + writer.skipped_steps()
        + writer.parsing_errors()
        + writer.hook_errors();
    println!(
        "flagd-testkit: {} passed, {} failed",
        writer.passed_steps(),
        failed
    );
    if writer.execution_has_failed() || failed > 0 || writer.passed_steps() == 0 {
        std::process::exit(1);
    }
}
