//! The flag files the flagd testbed serves (`flagd-testbed/flags/` in the
//! crates.io package `open-feature-flagd` 0.3.0) load as flagd loads them,
//! and evaluate with flagd's runtime semantics where their rules are
//! malformed: a misused custom operator yields `null` (the default
//! variant, reason DEFAULT), an unknown operator or a `$ref` to a missing
//! evaluator is PARSE_ERROR, a rule naming no variant is GENERAL. The
//! strict check finds a warning in each of those flags, with its pointer.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use flagmesh_engine::{CompiledFlagSet, ErrorCode, FlagDocument, Reason, Strictness};
use flagmesh_test_support::flagd_kit::{WARNED_TESTBED_FLAGS, json_files, package_dir};
use serde_json::json;

fn testbed_files() -> Vec<std::path::PathBuf> {
    let files = json_files(&package_dir().join("flagd-testbed/flags"));
    assert!(files.len() >= 10, "the testbed's flag files: {files:?}");
    files
}

#[test]
fn every_testbed_flag_file_loads_and_malformed_rules_are_warnings() {
    let mut warned = Vec::new();
    for file in testbed_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let (doc, warnings) = FlagDocument::parse_with_warnings(&text)
            .unwrap_or_else(|e| panic!("{}: refused: {e}", file.display()));
        assert!(!doc.flags.is_empty(), "{}", file.display());
        // strict refuses exactly the documents with warnings
        assert_eq!(
            FlagDocument::parse(&text, Strictness::Strict).is_err(),
            !warnings.is_empty(),
            "{}: {warnings:?}",
            file.display()
        );
        for w in warnings {
            assert!(w.path.starts_with('/'), "a JSON pointer: {w:?}");
            warned.push(w.flag.clone().unwrap_or_default());
        }
    }
    warned.sort();
    warned.dedup();
    // 13 flags, each with one warning (counted when this test was written)
    assert_eq!(warned.len(), 13, "{warned:?}");
    for flag in WARNED_TESTBED_FLAGS {
        assert!(
            warned.iter().any(|w| w == flag),
            "{flag}: no warning in {warned:?}"
        );
    }
}

fn load(name: &str) -> CompiledFlagSet {
    let text =
        std::fs::read_to_string(package_dir().join("flagd-testbed/flags").join(name)).unwrap();
    CompiledFlagSet::from_document(&FlagDocument::parse(&text, Strictness::Lenient).unwrap())
}

#[test]
fn malformed_rules_evaluate_as_flagd_evaluates_them() {
    let edge = load("edge-case-flags.json");
    let refs = load("evaluator-refs.json");
    let ctx = json!({"targetingKey": "u1", "version": "1.0.0", "num": 7});
    for (set, key, error) in [
        (&edge, "error-targeting-flag", Some(ErrorCode::ParseError)),
        (
            &refs,
            "ref-to-nonexistent-evaluator-flag",
            Some(ErrorCode::ParseError),
        ),
        (
            &edge,
            "missing-variant-targeting-flag",
            Some(ErrorCode::General),
        ),
    ] {
        let r = set.resolve(key, &ctx);
        assert_eq!(r.reason, Reason::Error, "{key}: {r:?}");
        assert_eq!(r.error.as_ref().map(|e| e.code), error, "{key}: {r:?}");
    }
    let bad_version = json!({"targetingKey": "u1", "version": "not-a-version", "num": 7});
    for (key, ctx) in [
        ("semver-invalid-version-flag", &bad_version),
        ("semver-invalid-operator-flag", &ctx),
        ("semver-wrong-args-flag", &ctx),
        ("starts-with-non-string-flag", &ctx),
        ("ends-with-non-string-flag", &ctx),
        ("starts-with-wrong-args-flag", &ctx),
        ("ends-with-wrong-args-flag", &ctx),
        ("fractional-null-bucket-key-flag", &ctx),
        ("fractional-zero-weights-flag", &ctx),
    ] {
        let r = edge.resolve(key, ctx);
        assert_eq!(r.reason, Reason::Default, "{key}: {r:?}");
        assert_eq!(r.variant, Some("fallback"), "{key}: {r:?}");
    }
}
