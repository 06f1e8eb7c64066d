//! The flagmesh replication protocol and the plumbing every node shares.
//!
//! - [`fanout`]: the server side of `Subscribe` (shared ring of encoded
//!   deltas, per-subscriber cursors, catch-up, heartbeats, cut-off of slow
//!   subscribers), over a [`source::SyncSource`].
//! - [`coalesce`]: merging deltas and filtering them by flag set.
//! - [`sync_service`]: the `flagmesh.v1.Sync` gRPC service.
//! - [`auth`], [`config`], [`serve`]: credentials, common options, and
//!   server plumbing (listeners, ready line, health, reflection, shutdown).
//! - [`tls`], [`limits`]: TLS on listeners and mesh links (certificates
//!   reloaded when their files change), streams per client, rate limits.

pub mod auth;
pub mod coalesce;
pub mod compiled;
pub mod config;
pub mod fanout;
pub mod limits;
pub mod metrics;
pub mod node_args;
pub mod relay;
pub mod replica;
pub mod reporter;
pub mod serve;
pub mod source;
pub mod subscriber;
pub mod sync_service;
pub mod tls;

pub use fanout::{Cursor, Fanout, FanoutConfig, Head};
pub use source::{ReportSink, SourceError, SourceSnapshot, SyncSource};

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
