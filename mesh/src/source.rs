//! What a Subscribe server serves from: the control plane's store or a
//! hub's replica. The fan-out keeps recent deltas itself; it asks the source
//! for whole snapshots and for older deltas.

use std::collections::HashSet;

use flagmesh_proto::v1::{Delta, Flag, FlagSet, NodeReport};

/// A consistent copy of a whole state.
#[derive(Debug, Clone, Default)]
pub struct SourceSnapshot {
    /// The history it belongs to.
    pub history_id: String,
    /// Its revision.
    pub revision: u64,
    /// Its digest.
    pub digest: u64,
    /// Every flag.
    pub flags: Vec<Flag>,
    /// Every flag set.
    pub flag_sets: Vec<FlagSet>,
}

/// Why the source could not answer.
#[derive(Debug, thiserror::Error)]
#[error("state source: {0}")]
pub struct SourceError(pub String);

/// The state behind a fan-out.
pub trait SyncSource: Send + Sync + 'static {
    /// The whole current state.
    fn snapshot(&self) -> Result<SourceSnapshot, SourceError>;

    /// The current state of `flag_sets` only (their flags and records; the
    /// digest stays the whole state's), for a subscriber that follows those
    /// sets. The default reads the whole state, which the snapshot then
    /// filters; a source that can read a set alone reads no more.
    fn snapshot_of(&self, flag_sets: &HashSet<String>) -> Result<SourceSnapshot, SourceError> {
        let _ = flag_sets;
        self.snapshot()
    }

    /// Whether [`SyncSource::snapshot_of`] reads less than the whole state.
    /// When it does not, filtered subscribers share the whole read with
    /// every other subscriber, as one read serves them all.
    fn reads_sets_alone(&self) -> bool {
        false
    }

    /// The single-revision deltas that lead from `from` to `to` in
    /// `history_id`, or `None` when they are no longer retained.
    fn deltas(
        &self,
        history_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<Delta>>, SourceError>;
}

/// Where a Report stream's messages go.
pub trait ReportSink: Send + Sync + 'static {
    /// One node's report arrived.
    fn report(&self, report: NodeReport);
}
