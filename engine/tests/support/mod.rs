//! Locates the unpacked crates.io package `open-feature-flagd` 0.3.0, which
//! ships the flagd testbed and the flag-definition JSON Schema test
//! documents. `cargo metadata` on the never-built `testkit/` manifest makes
//! cargo fetch the package (from the registry or its cache) and tells where
//! it is unpacked; nothing from it is copied into this repository.

use std::path::PathBuf;
use std::process::Command;

/// The root folder of the unpacked `open-feature-flagd` package.
pub fn flagd_package_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testkit/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let manifest_path = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "open-feature-flagd" && p["version"] == "0.3.0")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("open-feature-flagd 0.3.0 in cargo metadata");
    PathBuf::from(manifest_path)
        .parent()
        .expect("manifest has a folder")
        .to_path_buf()
}
