//! Locates the unpacked crates.io package `open-feature-flagd` 0.3.0, which
//! ships the flagd testbed (`flagd-testbed/`, release 3.10.3) and the
//! flag-definition JSON Schema with its test documents (`schemas/json/`).
//! `cargo metadata` on the never-built `testkit/` manifest makes cargo fetch
//! the package and says where it is unpacked; nothing from it is copied into
//! this repository.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags of the testbed's `flags/` files that flagd loads although an
/// operator in their targeting is misused or refers to nothing: flagmesh
/// accepts them with a warning (the engine's and control's tests both
/// check these are among the warned).
pub const WARNED_TESTBED_FLAGS: [&str; 5] = [
    "error-targeting-flag",
    "ref-to-nonexistent-evaluator-flag",
    "semver-wrong-args-flag",
    "starts-with-wrong-args-flag",
    "ends-with-wrong-args-flag",
];

/// The root folder of the unpacked `open-feature-flagd` package.
///
/// # Panics
/// When cargo cannot fetch or describe the package (a test that needs the
/// kit cannot run without it).
pub fn package_dir() -> PathBuf {
    let manifest = workspace_root().join("testkit/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .unwrap_or_else(|e| panic!("running cargo metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("cargo metadata output: {e}"));
    let manifest_path = meta["packages"]
        .as_array()
        .and_then(|ps| {
            ps.iter()
                .find(|p| p["name"] == "open-feature-flagd" && p["version"] == "0.3.0")
        })
        .and_then(|p| p["manifest_path"].as_str())
        .unwrap_or_else(|| panic!("open-feature-flagd 0.3.0 is not in cargo metadata"));
    Path::new(manifest_path)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("{manifest_path} has no folder"))
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The JSON files of a folder, sorted.
pub fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}
