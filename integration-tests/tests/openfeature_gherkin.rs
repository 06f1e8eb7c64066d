//! The flagd testbed's provider-level gherkin (`flagd-testbed/gherkin/` in
//! the crates.io package `open-feature-flagd` 0.3.0) through the
//! OpenFeature Python flagd provider (`openfeature-provider-flagd` 0.6.1),
//! in RPC mode (flagd.evaluation, answered by the PoP's engine) and in
//! in-process mode (flagd.sync from the PoP, evaluated by the provider),
//! against a PoP of a running mesh. The mesh holds the testbed's flags as
//! flagd serves them: every file of `flags/` but the `selector-` ones
//! deep-merged into one document in file order (the testbed's
//! `allFlags.json`, here the PoP's default flag set `testbed`), and the
//! selector files as flag sets of their own. Which tags are skipped, and why, is in `SKIPPED`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Stdio;
use std::time::Duration;

use flagmesh_integration_tests::flagd_kit::{json_files, package_dir, workspace_root};
use flagmesh_integration_tests::tools::python_path;
use flagmesh_integration_tests::topology::{Mesh, TopologySpec};
use flagmesh_proto::v1::*;
use serde_json::Value;

/// The features run; the others need the testbed's own flagd process
/// (`connection`, `events`, `contextEnrichment`, `sync-payload`,
/// `rpc-caching`: restarting it, cutting its connection, changing its
/// files) or test the provider's own option parsing (`config`).
const FEATURES: &str =
    "targeting.feature,evaluation.feature,disabled.feature,selector.feature,metadata.feature";

/// Tags not run, per mode, with the reason.
const SKIPPED: &[(&str, &str, &str)] = &[
    // "deprecated and @no-default-variant should be used instead" (the
    // suite's words): it expects FLAG_NOT_FOUND where the current
    // @no-default-variant scenarios, which run, expect the code default
    ("rpc", "@deprecated", "superseded by @no-default-variant"),
    (
        "in-process",
        "@deprecated",
        "superseded by @no-default-variant",
    ),
    // flagmesh buckets `fractional` with flagd's v2 algorithm; the v1 and
    // v3 scenarios expect other buckets for the same inputs
    ("rpc", "@fractional-v1", "another bucketing algorithm"),
    ("rpc", "@fractional-v3", "another bucketing algorithm"),
    // in-process mode evaluates in the Python provider 0.6.1, whose own
    // evaluator buckets with v3
    (
        "in-process",
        "@fractional-v1",
        "the provider buckets with v3",
    ),
    (
        "in-process",
        "@fractional-v2",
        "the provider buckets with v3",
    ),
];

/// `b` merged into `a` as the testbed's launchpad merges its flag files:
/// objects key by key, anything else replaced.
fn deep_merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

/// A flag document without `metadata.flagSetId` (the sets are named here).
fn unnamed(mut doc: Value) -> String {
    if let Some(m) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("flagSetId");
    }
    doc.to_string()
}

async fn mesh(root: &std::path::Path) -> Mesh {
    let mut spec = TopologySpec::test(root, 1, 1);
    spec.secure = false; // flagd providers send no bearer tokens
    spec.relays = false;
    spec.default_flag_set = "testbed".into();
    let mesh = Mesh::start(spec).await.unwrap();
    let mut a = mesh.admin().await.unwrap();
    let flags = package_dir().join("flagd-testbed/flags");
    let mut all = Value::Object(Default::default());
    for file in json_files(&flags) {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let stem = file.file_stem().unwrap().to_str().unwrap().to_owned();
        // the selector files are sources of their own, outside the merge
        if stem.starts_with("selector-") {
            a.apply_flag_set(ApplyFlagSetRequest {
                flag_set: stem.clone(),
                document: unnamed(doc),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{stem}: {e:?}"));
            continue;
        }
        deep_merge(&mut all, doc);
    }
    a.apply_flag_set(ApplyFlagSetRequest {
        flag_set: "testbed".into(),
        document: unnamed(all),
        ..Default::default()
    })
    .await
    .unwrap();
    mesh.converged(Duration::from_secs(30)).await.unwrap();
    mesh
}

async fn run(mode: &str) {
    let root = tempfile::tempdir().unwrap();
    let mesh = mesh(root.path()).await;
    let skip: Vec<&str> = SKIPPED
        .iter()
        .filter(|(m, _, _)| *m == mode)
        .map(|(_, tag, _)| *tag)
        .collect();
    let script = workspace_root().join("integration-tests/tests/python/gherkin_provider.py");
    let gherkin = package_dir().join("flagd-testbed/gherkin");
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new("python3")
            .arg(&script)
            .args([
                "127.0.0.1",
                &mesh.pops[0].grpc.port().to_string(),
                mode,
                gherkin.to_str().unwrap(),
                FEATURES,
                &skip.join(","),
            ])
            .env("PYTHONPATH", python_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the scenarios end within 240 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "{mode}: no summary; stdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let failed = summary["failed"].as_array().unwrap();
    let passed = summary["passed"].as_u64().unwrap();
    eprintln!(
        "{mode}: {passed} scenarios passed, {} failed; skipped by tag {}; {} not for this mode",
        failed.len(),
        summary["skipped"],
        summary["not_for_mode"]
    );
    assert!(
        failed.is_empty(),
        "{mode}: {} scenarios failed:\n{}",
        failed.len(),
        failed
            .iter()
            .map(|f| format!("{} / {}: {}", f["feature"], f["scenario"], f["error"]))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(passed >= 100, "{mode}: only {passed} scenarios ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testbed_gherkin_through_the_python_provider_in_rpc_mode() {
    run("rpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testbed_gherkin_through_the_python_provider_in_in_process_mode() {
    run("in-process").await;
}
