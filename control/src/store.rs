//! The control plane's store: flag sets and flags in canonical form, the
//! global revision and history id, the change log of deltas (kept for a
//! window of revisions, compacted after it) and the audit trail.
//!
//! [`FlagStore`] is the small interface the rest of the control plane uses,
//! so a server database can back it later; [`SledStore`] is the embedded
//! implementation. Every commit is one atomic sled batch on one tree,
//! flushed before it is acknowledged: a crash leaves all of a change set or
//! none of it. Commits are serialized by a lock, under which the caller's
//! plan reads the current state and checks its preconditions.

use flagmesh_mesh::keys;

use crate::change::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use flagmesh_mesh::{SourceError, SourceSnapshot, SyncSource};
use flagmesh_proto::convert::{map_to_struct, struct_to_map};
use flagmesh_proto::v1::{ChangeSet, Delta, Flag, FlagChange, FlagSet};
use prost::Message;
use serde_json::{Map, Value};

use crate::error::ControlError;

/// The head of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreHead {
    /// The history id (random, made when the store was created).
    pub history_id: String,
    /// The newest committed revision.
    pub revision: u64,
    /// The change log holds the deltas of revisions above this one.
    pub compacted_through: u64,
    /// The digest of the state at `revision`.
    pub digest: u64,
}

/// One flag to write: `definition` is canonical JSON, `None` deletes.
#[derive(Debug, Clone)]
pub struct FlagWrite {
    /// The flag set.
    pub flag_set: String,
    /// The flag key.
    pub key: String,
    /// The new canonical definition, or `None` to delete.
    pub definition: Option<Vec<u8>>,
}

/// One flag set to write: `metadata` replaces its metadata; `delete`
/// removes the set (its flags must be deleted in the same change).
#[derive(Debug, Clone)]
pub struct SetWrite {
    /// The flag set.
    pub flag_set: String,
    /// The new metadata (ignored when deleting).
    pub metadata: Map<String, Value>,
    /// Remove the set.
    pub delete: bool,
}

/// A change set to commit.
#[derive(Debug, Clone, Default)]
pub struct ChangeRequest {
    /// Who (the credential's name).
    pub actor: String,
    /// The operation name for the audit trail.
    pub operation: String,
    /// The caller's note.
    pub comment: String,
    /// Flags to write.
    pub flags: Vec<FlagWrite>,
    /// Flag sets to write.
    pub sets: Vec<SetWrite>,
    /// What the write was accepted with, for the audit trail.
    pub warnings: Vec<flagmesh_proto::v1::ValidationWarning>,
}

/// The outcome of a commit (or of a dry run).
#[derive(Debug, Clone)]
pub struct CommitOutcome {
    /// The revision committed; the current one when nothing changed or on a dry run.
    pub revision: u64,
    /// What changed, per flag (and per set metadata, with an empty key).
    pub changes: Vec<FlagChange>,
    /// The delta to publish; `None` when nothing changed or on a dry run.
    pub delta: Option<Delta>,
}

/// Read access to the current state, for plans checking preconditions.
pub trait StateView {
    /// One flag.
    fn flag(&self, flag_set: &str, key: &str) -> Result<Option<Flag>, ControlError>;
    /// Every flag of a set, ordered by key.
    fn flags_of(&self, flag_set: &str) -> Result<Vec<Flag>, ControlError>;
    /// One flag set.
    fn flag_set(&self, flag_set: &str) -> Result<Option<FlagSet>, ControlError>;
}

/// A plan: reads the current state, checks preconditions, returns what to write.
pub type Plan<'a> = &'a mut dyn FnMut(&dyn StateView) -> Result<ChangeRequest, ControlError>;

/// The control plane's source of truth.
pub trait FlagStore: Send + Sync + 'static {
    /// The head.
    fn head(&self) -> Result<StoreHead, ControlError>;
    /// One flag.
    fn get_flag(&self, flag_set: &str, key: &str) -> Result<Option<Flag>, ControlError>;
    /// Flags ordered by (set, key), after `after`, at most `limit`.
    fn list_flags(
        &self,
        flag_set: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Flag>, ControlError>;
    /// Every flag set.
    fn list_flag_sets(&self) -> Result<Vec<FlagSet>, ControlError>;
    /// One flag set.
    fn get_flag_set(&self, flag_set: &str) -> Result<Option<FlagSet>, ControlError>;
    /// Runs `plan` against the current state and commits its changes
    /// atomically under the next revision (nothing when it changes nothing,
    /// or when `dry_run`).
    fn commit(&self, plan: Plan<'_>, dry_run: bool) -> Result<CommitOutcome, ControlError>;
    /// Change sets newest first, below `before` (exclusive), filtered.
    fn history(
        &self,
        before: Option<u64>,
        limit: usize,
        flag_set: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<ChangeSet>, ControlError>;
    /// The whole state, consistently.
    fn snapshot(&self) -> Result<SourceSnapshot, ControlError>;
    /// Retained single-revision deltas from `from` to `to`.
    fn deltas(
        &self,
        history_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<Delta>>, ControlError>;
    /// Whether the store can serve writes now; the error says why not.
    fn health(&self) -> Result<(), ControlError> {
        self.head().map(drop)
    }
    /// Sends every later commit's delta to `publisher`, in revision order
    /// (until `stop`, where publication runs on its own).
    fn publish_to(
        &self,
        publisher: Publisher,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), ControlError>;
}

const META_HISTORY: &[u8] = b"m:history";
const META_REVISION: &[u8] = b"m:revision";
const META_COMPACTED: &[u8] = b"m:compacted";
const META_DIGEST: &[u8] = b"m:digest";

fn rev_key(prefix: &[u8], rev: u64) -> Vec<u8> {
    [prefix, &rev.to_be_bytes()].concat()
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, ControlError> {
    Ok(match tree.get(key)? {
        Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
            ControlError::Storage(format!("corrupt {}", String::from_utf8_lossy(key)))
        })?),
        None => 0,
    })
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Normalizes metadata the way it travels (protobuf `Struct`), so hashes
/// computed here and at replicas agree.
pub fn normalize_metadata(m: &Map<String, Value>) -> Map<String, Value> {
    struct_to_map(&map_to_struct(m))
}

/// The canonical bytes of flag-set metadata.
pub fn metadata_bytes(m: &Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

/// Everything a store holds, for moving a mesh to another store.
#[derive(Debug, Clone, Default)]
pub struct StoreExport {
    /// Its head (history, revision, digest, compaction point).
    pub head: StoreHead,
    /// Every flag.
    pub flags: Vec<Flag>,
    /// Every flag set's record.
    pub flag_sets: Vec<FlagSet>,
    /// The retained change log, oldest first.
    pub change_log: Vec<Delta>,
    /// The audit trail, oldest first.
    pub audit: Vec<ChangeSet>,
}

/// Reads of a snapshot tried without the writer lock before one takes it.
const SNAPSHOT_ATTEMPTS: usize = 16;

/// Where committed deltas go, in commit order (the node's fan-out).
pub type Publisher = Box<dyn Fn(&Delta) + Send + Sync>;

/// The embedded store.
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    write: Mutex<()>,
    retain: u64,
    durable: bool,
    publisher: std::sync::OnceLock<Publisher>,
    /// A commit could not be flushed: nothing more is served.
    failed: std::sync::atomic::AtomicBool,
}

impl SledStore {
    /// Opens the store in `dir`, keeping the deltas of the last `retain`
    /// revisions. An empty `dir` becomes a new store (a new history) only
    /// with `init`: a control plane restarted on a lost or wrong data
    /// directory refuses to start rather than wipe the mesh.
    pub fn open(dir: &Path, retain: u64, init: bool) -> Result<Self, ControlError> {
        Self::open_with(dir, retain, true, init)
    }

    /// Like [`SledStore::open`]; without `durable` commits are not flushed
    /// before they are acknowledged (for simulations, never for serving).
    pub fn open_with(
        dir: &Path,
        retain: u64,
        durable: bool,
        init: bool,
    ) -> Result<Self, ControlError> {
        let empty = !dir.exists()
            || std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none());
        if empty && !init {
            return Err(ControlError::NotInitialised(dir.display().to_string()));
        }
        let db = keys::open_db(&sled::Config::new().path(dir), keys::LOCK_WAIT)?;
        let tree = db.open_tree("control")?;
        if tree.get(META_HISTORY)?.is_none() {
            if !init {
                return Err(ControlError::NotInitialised(dir.display().to_string()));
            }
            let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            tree.insert(META_HISTORY, id.as_bytes())?;
            db.flush()?;
            tracing::warn!(history_id = %id, dir = %dir.display(), "created a new control store: a new history");
        }
        Ok(Self {
            db,
            tree,
            write: Mutex::new(()),
            retain: retain.max(1),
            durable,
            publisher: std::sync::OnceLock::new(),
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Everything the store holds, read under the writer lock.
    pub fn export(&self) -> Result<StoreExport, ControlError> {
        let _guard = self.lock();
        let head = self.read_head()?;
        let (_, state) = self.read_state(head.clone())?;
        let mut change_log = Vec::new();
        for kv in self.tree.scan_prefix(b"l:") {
            change_log.push(Delta::decode(kv?.1.as_ref())?);
        }
        let mut audit = Vec::new();
        for kv in self.tree.scan_prefix(b"a:") {
            audit.push(ChangeSet::decode(kv?.1.as_ref())?);
        }
        Ok(StoreExport {
            head,
            flags: state.flags,
            flag_sets: state.flag_sets,
            change_log,
            audit,
        })
    }

    /// Every flag and flag set, labelled with `head` (consistent only if no
    /// commit happened while reading: the caller checks).
    fn read_state(&self, head: StoreHead) -> Result<(StoreHead, SourceSnapshot), ControlError> {
        let flags = self
            .tree
            .scan_prefix(keys::FLAGS)
            .map(|kv| Self::decode_flag(&kv?.1))
            .collect::<Result<Vec<_>, _>>()?;
        let flag_sets = self.list_flag_sets()?;
        let state = SourceSnapshot {
            history_id: head.history_id.clone(),
            revision: head.revision,
            digest: head.digest,
            flags,
            flag_sets,
        };
        Ok((head, state))
    }

    /// Every later commit's delta goes to `publisher`, called under the
    /// writer lock once the commit is durable: deltas are published in
    /// revision order, whatever the concurrency of writers, and never one
    /// a crash could take back (a commit whose flush fails stops the
    /// store). Set once; `false` when a publisher was already set.
    pub fn publish_to(&self, publisher: Publisher) -> bool {
        self.publisher.set(publisher).is_ok()
    }

    fn decode_flag(bytes: &[u8]) -> Result<Flag, ControlError> {
        Ok(Flag::decode(bytes)?)
    }

    fn read_head(&self) -> Result<StoreHead, ControlError> {
        if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ControlError::Storage(
                "a commit could not be flushed to disk; this control plane serves nothing from its store until it is restarted".into(),
            ));
        }
        let history_id = self
            .tree
            .get(META_HISTORY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .ok_or_else(|| ControlError::Storage("missing history id".into()))?;
        Ok(StoreHead {
            history_id,
            revision: read_u64(&self.tree, META_REVISION)?,
            compacted_through: read_u64(&self.tree, META_COMPACTED)?,
            digest: read_u64(&self.tree, META_DIGEST)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StateView for SledStore {
    fn flag(&self, flag_set: &str, key: &str) -> Result<Option<Flag>, ControlError> {
        self.tree
            .get(keys::flag(flag_set, key))?
            .map(|v| Self::decode_flag(&v))
            .transpose()
    }

    fn flags_of(&self, flag_set: &str) -> Result<Vec<Flag>, ControlError> {
        self.tree
            .scan_prefix(keys::flags_of(flag_set))
            .map(|kv| Self::decode_flag(&kv?.1))
            .collect()
    }

    fn flag_set(&self, flag_set: &str) -> Result<Option<FlagSet>, ControlError> {
        Ok(self
            .tree
            .get(keys::flag_set(flag_set))?
            .map(|v| FlagSet::decode(v.as_ref()))
            .transpose()?)
    }
}

impl FlagStore for SledStore {
    fn publish_to(
        &self,
        publisher: Publisher,
        _stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), ControlError> {
        if SledStore::publish_to(self, publisher) {
            Ok(())
        } else {
            Err(ControlError::Storage("the store publishes already".into()))
        }
    }

    fn head(&self) -> Result<StoreHead, ControlError> {
        self.read_head()
    }

    fn get_flag(&self, flag_set: &str, key: &str) -> Result<Option<Flag>, ControlError> {
        self.flag(flag_set, key)
    }

    fn list_flags(
        &self,
        flag_set: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Flag>, ControlError> {
        let prefix = match flag_set {
            Some(s) => keys::flags_of(s),
            None => keys::FLAGS.to_vec(),
        };
        let start = match after {
            Some((s, k)) => {
                let mut k = keys::flag(s, k);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for kv in self.tree.range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(Self::decode_flag(&v)?);
        }
        Ok(out)
    }

    fn list_flag_sets(&self) -> Result<Vec<FlagSet>, ControlError> {
        self.tree
            .scan_prefix(keys::FLAG_SETS)
            .map(|kv| Ok(FlagSet::decode(kv?.1.as_ref())?))
            .collect()
    }

    fn get_flag_set(&self, flag_set: &str) -> Result<Option<FlagSet>, ControlError> {
        self.flag_set(flag_set)
    }

    fn commit(&self, plan: Plan<'_>, dry_run: bool) -> Result<CommitOutcome, ControlError> {
        let _guard = self.lock();
        let request = plan(self)?;
        let head = self.read_head()?;
        let c = crate::change::compute(self, &head, request, now_ms())?;
        if c.changes.is_empty() || dry_run {
            return Ok(CommitOutcome {
                revision: head.revision,
                changes: c.changes,
                delta: None,
            });
        }
        let revision = c.revision;
        let mut batch = sled::Batch::default();
        for w in &c.writes {
            match w {
                Write::Flag(f) => batch.insert(keys::flag(&f.flag_set, &f.key), f.encode_to_vec()),
                Write::DeleteFlag { flag_set, key } => batch.remove(keys::flag(flag_set, key)),
                Write::FlagSet(set) => batch.insert(keys::flag_set(&set.id), set.encode_to_vec()),
                Write::DeleteFlagSet(id) => batch.remove(keys::flag_set(id)),
            }
        }
        batch.insert(META_REVISION, &revision.to_be_bytes());
        batch.insert(META_DIGEST, &c.digest.to_be_bytes());
        batch.insert(rev_key(b"l:", revision), c.delta.encode_to_vec());
        batch.insert(rev_key(b"a:", revision), c.audit.encode_to_vec());
        if revision.saturating_sub(head.compacted_through) > self.retain {
            let through = revision - self.retain;
            for r in head.compacted_through + 1..=through {
                batch.remove(rev_key(b"l:", r));
            }
            batch.insert(META_COMPACTED, &through.to_be_bytes());
        }
        self.tree.apply_batch(batch)?;
        // published only once durable: no reader ever sees a revision a
        // crash could take back. A commit that cannot be flushed stops the
        // store: nothing more is read or written until a restart recovers
        // what is on disk, so the revision is either durable or never seen
        if self.durable
            && let Err(e) = self.db.flush()
        {
            self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(error = %e, revision, "a commit could not be flushed; the store stops serving until a restart");
            return Err(e.into());
        }
        if let Some(publish) = self.publisher.get() {
            publish(&c.delta);
        }
        Ok(CommitOutcome {
            revision,
            changes: c.changes,
            delta: Some(c.delta),
        })
    }

    fn history(
        &self,
        before: Option<u64>,
        limit: usize,
        flag_set: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<ChangeSet>, ControlError> {
        let end = rev_key(b"a:", before.unwrap_or(u64::MAX));
        let mut out = Vec::new();
        for kv in self.tree.range(b"a:".to_vec()..end).rev() {
            let (_, v) = kv?;
            let cs = ChangeSet::decode(v.as_ref())?;
            let matches = cs.changes.iter().any(|c| {
                flag_set.is_none_or(|s| c.flag_set == s) && key.is_none_or(|k| c.key == k)
            });
            if matches {
                out.push(cs);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn snapshot(&self) -> Result<SourceSnapshot, ControlError> {
        // without the writer lock: commits go on while a snapshot is read.
        // A commit is one atomic batch that also moves the head, so a read
        // that finds the same head before and after saw no commit between
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let before = self.read_head()?;
            let state = self.read_state(before)?;
            if self.read_head()? == state.0 {
                return Ok(state.1);
            }
        }
        // writes never paused long enough: read under the lock this once
        let _guard = self.lock();
        let head = self.read_head()?;
        Ok(self.read_state(head)?.1)
    }

    fn deltas(
        &self,
        history_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<Delta>>, ControlError> {
        let head = self.read_head()?;
        if history_id != head.history_id || from < head.compacted_through || to > head.revision {
            return Ok(None);
        }
        let mut out = Vec::with_capacity((to - from) as usize);
        for r in from + 1..=to {
            match self.tree.get(rev_key(b"l:", r))? {
                Some(v) => out.push(Delta::decode(v.as_ref())?),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }
}

/// Serves snapshots and retained deltas to the fan-out.
pub struct StoreSource<S: ?Sized>(pub std::sync::Arc<S>);

impl<S: FlagStore + ?Sized> SyncSource for StoreSource<S> {
    fn snapshot(&self) -> Result<SourceSnapshot, SourceError> {
        self.0.snapshot().map_err(|e| SourceError(e.to_string()))
    }

    fn deltas(
        &self,
        history_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<Delta>>, SourceError> {
        self.0
            .deltas(history_id, from, to)
            .map_err(|e| SourceError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn concurrent_commits_are_published_in_revision_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open_with(dir.path(), 10_000, false, true).expect("store"));
        let published: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
        let seen = published.clone();
        assert!(store.publish_to(Box::new(move |d| {
            seen.lock()
                .expect("lock")
                .push((d.from_revision, d.to_revision))
        })));
        // eight writers, fifty commits each, all at once
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let write = FlagWrite {
                            flag_set: "race".into(),
                            key: format!("w{w}"),
                            definition: Some(
                                format!(r#"{{"state":"ENABLED","variants":{{"v":{i}}},"defaultVariant":"v"}}"#)
                                    .into_bytes(),
                            ),
                        };
                        let mut plan = |_: &dyn StateView| {
                            Ok(ChangeRequest {
                                flags: vec![write.clone()],
                                ..Default::default()
                            })
                        };
                        store.commit(&mut plan, false).expect("commit");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let published = published.lock().expect("lock").clone();
        let expected: Vec<(u64, u64)> = (1..=400).map(|r| (r - 1, r)).collect();
        assert_eq!(published, expected, "every revision once, in order");
        assert_eq!(store.head().expect("head").revision, 400);
    }

    #[test]
    fn an_empty_directory_is_a_new_store_only_when_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let refused = SledStore::open(&path, 10, false)
            .err()
            .map(|e| e.to_string());
        assert!(
            refused.as_deref().is_some_and(|m| m.contains("--init")),
            "{refused:?}"
        );
        assert!(!path.exists(), "a refused start leaves nothing behind");
        let history = SledStore::open(&path, 10, true)
            .and_then(|s| s.head())
            .expect("initialised")
            .history_id;
        // an existing store opens with or without the option, same history
        for init in [false, true] {
            let again = SledStore::open(&path, 10, init).and_then(|s| s.head());
            assert_eq!(again.expect("reopened").history_id, history);
        }
    }

    #[test]
    fn snapshots_read_alongside_commits_are_consistent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open_with(dir.path(), 10_000, false, true).expect("store"));
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..400 {
                    let write = FlagWrite {
                        flag_set: "s".into(),
                        key: format!("f{}", i % 37),
                        definition: Some(
                            format!(r#"{{"state":"ENABLED","variants":{{"v":{i}}},"defaultVariant":"v"}}"#)
                                .into_bytes(),
                        ),
                    };
                    let mut plan = |_: &dyn StateView| {
                        Ok(ChangeRequest {
                            flags: vec![write.clone()],
                            ..Default::default()
                        })
                    };
                    store.commit(&mut plan, false).expect("commit");
                }
            })
        };
        let mut revisions = Vec::new();
        while !writer.is_finished() {
            let snap = store.snapshot().expect("snapshot");
            let digest = flagmesh_engine::StateDigest::of(
                snap.flags
                    .iter()
                    .map(|f| flagmesh_engine::flag_hash(&f.flag_set, &f.key, &f.definition_json))
                    .chain(snap.flag_sets.iter().map(flagmesh_mesh::replica::set_hash)),
            );
            assert_eq!(
                digest.0, snap.digest,
                "snapshot at revision {}",
                snap.revision
            );
            revisions.push(snap.revision);
        }
        writer.join().expect("writer");
        assert!(revisions.windows(2).all(|w| w[0] <= w[1]));
    }
}
