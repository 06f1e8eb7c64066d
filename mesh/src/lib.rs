//! The flagmesh replication protocol, and nothing of server plumbing.
//!
//! - [`fanout`]: the server side of `Subscribe` (shared ring of encoded
//!   deltas, per-subscriber cursors, catch-up, heartbeats, cut-off of slow
//!   subscribers), over a [`source::SyncSource`].
//! - [`coalesce`]: merging deltas and filtering them by flag set.
//! - [`snapshot_stream`]: the Subscribe stream, snapshots encoded chunk by
//!   chunk as the subscriber takes them.
//! - [`sync_service`]: the `flagmesh.v1.Sync` gRPC service.
//! - [`subscriber`], [`replica`], [`compiled`]: following upstreams into a
//!   sled replica with atomic apply, and the compiled in-memory state;
//!   [`journal`]: what makes each apply durable without flushing sled.
//! - [`reporter`], [`relay`]: reports upward, and what hubs and PoPs share.
//! - [`keys`]: the sled key layout of every flag store; [`stored`]: how a
//!   replica stores a flag (compressed against the format's words).
//! - [`metrics`]: replication metrics as prometheus-client collectors.
//! - `args` (feature `cli`): the command-line options of relays.

#[cfg(feature = "cli")]
pub mod args;
pub mod coalesce;
pub mod compiled;
pub mod fanout;
pub mod journal;
pub mod keys;
pub mod metrics;
pub mod relay;
pub mod replica;
pub mod reporter;
pub mod snapshot_stream;
pub mod source;
pub mod stored;
pub mod subscriber;
pub mod sync_service;
pub mod tier;

pub use fanout::{Cursor, Fanout, FanoutConfig, Head};
pub use source::{ReportSink, SourceError, SourceSnapshot, SyncSource};

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
