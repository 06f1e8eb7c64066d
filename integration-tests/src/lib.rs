//! The flagmesh test harness: starting real node processes on
//! `127.0.0.1` ports chosen by the OS (each reports its addresses on its
//! ready line), stopping them by signal or SIGKILL, nodes inside the test
//! process ([`inproc`]), and the flagd test kit shipped in the crates.io
//! package `open-feature-flagd` 0.3.0.

pub mod bench;
/// The flagd test kit locator (see `flagmesh-test-support`).
pub use flagmesh_test_support::flagd_kit;
pub mod certs;
pub mod fuzzing;
pub mod inproc;
pub mod postgres;
pub mod process;
pub mod relay;
pub mod tools;
pub mod topology;
