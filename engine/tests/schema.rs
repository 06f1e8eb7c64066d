//! Validation against the flagd flag-definition JSON Schema's own test
//! documents (`schemas/json/test/` of the crates.io package
//! `open-feature-flagd` 0.3.0): every negative document is rejected with an
//! error naming the flag (where the problem is inside one) and the field;
//! every positive document (map and array form) is accepted; every negative
//! targeting rule fails to compile and every positive one compiles.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};

use flagmesh_engine::rule::inline_refs;
use flagmesh_engine::{DocumentError, FlagDocument, Strictness, compile};
use flagmesh_test_support::flagd_kit::json_files;

fn schema_tests() -> PathBuf {
    flagmesh_test_support::flagd_kit::package_dir().join("schemas/json/test")
}

fn parse(path: &Path) -> Result<FlagDocument, DocumentError> {
    let text = std::fs::read_to_string(path).expect("readable");
    FlagDocument::parse(&text, Strictness::Strict)
}

/// Where each negative document's problem is: (flag, field path prefix).
const NEGATIVE: &[(&str, Option<&str>, &str)] = &[
    ("empty-variants.json", Some("myBoolFlag"), "/variants"),
    ("malformed-flag.json", Some("not-a-flag"), "/state"),
    ("missing-variants.json", Some("myBoolFlag"), "/variants"),
    (
        "mixed-variant-types.ffconfig.json",
        Some("myBoolFlag"),
        "/variants/",
    ),
    ("state-set-incorrectly.json", Some("myBoolFlag"), "/state"),
    ("with-array-flags.json", None, "/flags"),
    (
        "with-invalid-flag-metadata.json",
        Some("myBoolFlag"),
        "/metadata/invalid",
    ),
    (
        "with-invalid-flag-set-metadata.json",
        None,
        "/metadata/invalid",
    ),
    (
        "with-invalid-targeting.json",
        Some("targetedFlag"),
        "/targeting/not-a-real-rule",
    ),
];

#[test]
fn every_negative_document_is_rejected_naming_flag_and_field() {
    let files = json_files(&schema_tests().join("flags/negative"));
    assert_eq!(
        files.len(),
        NEGATIVE.len(),
        "the package's negative documents changed: {files:?}"
    );
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (_, flag, field) = NEGATIVE
            .iter()
            .find(|(n, _, _)| *n == name)
            .unwrap_or_else(|| panic!("no expectation for {name}"));
        let errors = match parse(&path) {
            Err(DocumentError::Invalid(e)) => e,
            other => panic!("{name}: expected a validation error, got {other:?}"),
        };
        assert!(
            errors
                .0
                .iter()
                .any(|e| e.flag.as_deref() == *flag && e.path.starts_with(field)),
            "{name}: no error at flag {flag:?} field {field}: {errors}"
        );
        let message = errors.to_string();
        if let Some(flag) = flag {
            assert!(
                message.contains(flag),
                "{name}: message does not name the flag: {message}"
            );
        }
        assert!(
            message.contains(field.trim_end_matches('/')),
            "{name}: message does not name the field: {message}"
        );
    }
}

#[test]
fn every_positive_document_is_accepted_in_map_and_array_form() {
    let mut count = 0;
    for sub in ["flags/positive", "flagd/positive"] {
        for path in json_files(&schema_tests().join(sub)) {
            let doc = parse(&path).unwrap_or_else(|e| panic!("{}: rejected: {e}", path.display()));
            assert!(!doc.flags.is_empty(), "{}: no flags read", path.display());
            count += 1;
        }
    }
    assert!(count >= 10, "only {count} positive documents found");
}

/// The targeting test documents hold a rule, or (for the positive ones) an
/// object `{"*": [rules...]}` listing many rules.
fn rules_of(path: &Path) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    match v.get("*").and_then(|list| list.as_array()) {
        Some(list) if v.as_object().is_some_and(|o| o.len() == 1) => list.clone(),
        _ => vec![v],
    }
}

#[test]
fn every_negative_targeting_rule_is_rejected_with_a_path() {
    let files = json_files(&schema_tests().join("targeting/negative"));
    assert!(
        files.len() >= 7,
        "negative targeting documents missing: {files:?}"
    );
    for path in files {
        let rule = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        match compile(&rule, Strictness::Strict) {
            Err(e) => assert!(
                e.path.len() > 1,
                "{}: error without a path: {e}",
                path.display()
            ),
            Ok(_) => panic!("{}: accepted an invalid rule", path.display()),
        }
    }
}

/// Names of every `$ref` in a rule.
fn refs(rule: &serde_json::Value, out: &mut Vec<String>) {
    match rule {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::String(name)) = o.get("$ref") {
                out.push(name.clone());
            }
            o.values().for_each(|v| refs(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_positive_targeting_rule_compiles() {
    let mut count = 0;
    for path in json_files(&schema_tests().join("targeting/positive")) {
        for rule in rules_of(&path) {
            // A rule alone cannot resolve `$ref`s (they name a document's
            // `$evaluators`): give each name a shared rule, as a document would.
            let mut names = Vec::new();
            refs(&rule, &mut names);
            let evaluators = names
                .into_iter()
                .map(|n| (n, serde_json::json!({"==": [1, 1]})))
                .collect();
            let rule = inline_refs(&rule, &evaluators, Strictness::Strict).expect("refs resolve");
            compile(&rule, Strictness::Strict)
                .unwrap_or_else(|e| panic!("{}: {rule} rejected: {e}", path.display()));
            count += 1;
        }
    }
    assert!(count >= 40, "only {count} positive rules found");
}
