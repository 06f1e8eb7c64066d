//! The flagmesh replication protocol and the plumbing every node shares.
//!
//! - [`fanout`]: the server side of `Subscribe` (shared ring of encoded
//!   deltas, per-subscriber cursors, catch-up, heartbeats, cut-off of slow
//!   subscribers), over a [`source::SyncSource`].
//! - [`coalesce`]: merging deltas and filtering them by flag set.
//! - [`sync_service`]: the `flagmesh.v1.Sync` gRPC service.
//! - [`auth`], [`config`], [`serve`]: credentials, common options, and
//!   server plumbing (listeners, ready line, health, reflection, shutdown).

pub mod auth;
pub mod coalesce;
pub mod config;
pub mod fanout;
pub mod serve;
pub mod source;
pub mod sync_service;

pub use fanout::{Fanout, FanoutConfig, Head};
pub use source::{ReportSink, SourceError, SourceSnapshot, SyncSource};
