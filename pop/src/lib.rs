//! A flagmesh edge PoP: follows its hubs (in rendezvous order, failing over
//! between them), persists every applied change to sled, keeps one
//! immutable compiled state in memory swapped atomically on each apply, and
//! serves evaluations from it: `flagmesh.v1.Evaluation` (`Evaluate`,
//! `EvaluateAll`, `Watch`). It also serves `flagmesh.v1.Sync` downstream,
//! so SDKs in local mode can follow it. On start it loads sled and serves
//! at once, before any upstream answers.

pub mod evaluation;
pub mod flagd;
pub mod node;
pub mod ofrep;
pub mod stats;
/// The compiled in-memory state (shared with SDKs in local mode).
pub use flagmesh_mesh::compiled as state;
