//! The replica store of a hub or PoP: the flag state, its revision, history
//! and digest on sled, written together per applied event (through the
//! replica's journal, or as one sled batch without sync writes), so a crash
//! at any point recovers to a consistent revision.
//!
//! [`ReplicaStore::apply`] enforces the subscriber's rules: a delta whose
//! `to` is not above the local revision is dropped; one whose `from` equals
//! it is applied; one whose `from` is above it is a gap; snapshot chunks are
//! buffered and applied atomically on the last one. After every apply the
//! digest, maintained in O(1) per changed flag, is checked against the
//! sender's; a mismatch applies nothing and asks for a resync.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use flagmesh_engine::{StateDigest, flag_hash, flag_set_hash};
use flagmesh_proto::convert::struct_to_map;
use flagmesh_proto::v1::{Delta, Flag, FlagSet, Snapshot, SyncEvent, sync_event::Event};
use prost::Message;

use crate::journal::{CHECKPOINT_EVERY, Journal, Recovered, Writes};
use crate::keys;
use crate::source::{SourceError, SourceSnapshot};
use crate::stored;

/// What applying an event did.
#[derive(Debug, Clone)]
pub enum Applied {
    /// The whole state was replaced.
    Snapshot(Arc<SourceSnapshot>),
    /// A delta was applied.
    Delta(Arc<Delta>),
    /// A snapshot chunk was buffered (not applied yet).
    Buffered,
    /// The event was older than the local state and was dropped.
    Ignored,
    /// A heartbeat: nothing to apply.
    Progress {
        /// The revision the stream has delivered.
        revision: u64,
        /// The sender's head.
        head_revision: u64,
        /// Whether the sender is connected upstream.
        upstream_connected: bool,
    },
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A delta starts above the local revision: changes are missing.
    #[error("gap: local revision {local}, delta from {from}")]
    Gap {
        /// The local revision.
        local: u64,
        /// The delta's `from`.
        from: u64,
    },
    /// The state after applying would not have the sender's digest.
    #[error(
        "digest mismatch at revision {revision}: computed {computed:016x}, sender {expected:016x}"
    )]
    DigestMismatch {
        /// The revision.
        revision: u64,
        /// The sender's digest.
        expected: u64,
        /// The digest computed here.
        computed: u64,
    },
    /// A snapshot of another history than the one held: applied only
    /// once an operator adopts that history.
    #[error(
        "the upstream serves history {upstream}; this node holds history {local} and keeps it until an operator adopts the other (--adopt-history {upstream})"
    )]
    OtherHistory {
        /// The history held.
        local: String,
        /// The upstream's.
        upstream: String,
    },
    /// A delta of another history than the local state.
    #[error("delta of history {got}, local history {local}")]
    WrongHistory {
        /// The local history.
        local: String,
        /// The delta's history.
        got: String,
    },
    /// A malformed event (chunks out of order, an empty event).
    #[error("malformed event: {0}")]
    Malformed(String),
    /// The store failed.
    #[error("storage: {0}")]
    Storage(String),
}

impl From<sled::Error> for ApplyError {
    fn from(e: sled::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

/// Where a replica stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// The history of its state ("" when it has none).
    pub history_id: String,
    /// The applied revision (0 when it has no state).
    pub revision: u64,
    /// The digest of its state.
    pub digest: u64,
}

/// A flag among those one delta touches: a 128-bit hash of its set and
/// key. Two flags of a delta would share one with odds of about 1 in 10^29
/// at 100,000 flags; even then the digest check catches it and the replica
/// resyncs by snapshot, whose digest is taken over the flags themselves.
type FlagId = u128;

fn flag_id(set: &str, key: &str) -> FlagId {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(set.as_bytes());
    h.update(&[0]);
    h.update(key.as_bytes());
    h.digest128()
}

struct Inner {
    position: Position,
    /// How many flags the store holds.
    flags: usize,
    set_hashes: HashMap<String, u64>,
    pending: Vec<Snapshot>,
    /// The flag sets followed (empty: every set), sorted.
    scope: Vec<String>,
    /// The state held lacks sets of `scope` (the scope widened): only a
    /// snapshot makes it whole.
    needs_snapshot: bool,
}

/// Whether opening a replica returns the flags' definitions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Definitions {
    Read,
    /// Left in the store: the flags come with an empty definition.
    Left,
}

/// Where the scope a replica's state is complete for is kept: a byte (1:
/// complete, 0: waiting for a snapshot) and the sets, one per line.
const SCOPE: &[u8] = b"m:scope";

fn encode_scope(complete: bool, scope: &[String]) -> Vec<u8> {
    let mut v = vec![u8::from(complete)];
    v.extend_from_slice(scope.join("\n").as_bytes());
    v
}

/// (complete, sets); a replica from before scopes were kept: complete, every set.
fn decode_scope(b: Option<&[u8]>) -> (bool, Vec<String>) {
    match b {
        Some([flag, rest @ ..]) => {
            let sets = String::from_utf8_lossy(rest);
            let sets = sets
                .split('\n')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            (*flag == 1, sets)
        }
        _ => (true, Vec::new()),
    }
}

/// A replica of the mesh state on sled.
pub struct ReplicaStore {
    /// Held open with the tree (its flusher and segment cleaning).
    _db: sled::Db,
    tree: sled::Tree,
    inner: Mutex<Inner>,
    /// With sync writes: every applied event is journaled (and synced)
    /// before sled takes it (see [`crate::journal`]).
    journal: Option<Journal>,
    /// A history an operator adopted: its snapshot may replace another.
    adopt: Mutex<Option<String>>,
    /// The values' encoding, with the store's dictionary.
    codec: stored::Codec,
}

const META: &[u8] = b"m:position";

/// The sled tree a replica keeps its state in.
const TREE: &str = "replica";

/// sled's own flush period while the journal makes writes durable: it only
/// bounds how long sled's files lag, and runs its segment cleaning.
const SLED_FLUSH_WITH_JOURNAL_MS: u64 = 60_000;

fn encode_position(p: &Position) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + p.history_id.len());
    v.extend_from_slice(&p.revision.to_be_bytes());
    v.extend_from_slice(&p.digest.to_be_bytes());
    v.extend_from_slice(p.history_id.as_bytes());
    v
}

fn decode_position(b: &[u8]) -> Option<Position> {
    if b.len() < 16 {
        return None;
    }
    Some(Position {
        revision: u64::from_be_bytes(b[..8].try_into().ok()?),
        digest: u64::from_be_bytes(b[8..16].try_into().ok()?),
        history_id: String::from_utf8(b[16..].to_vec()).ok()?,
    })
}

/// The digest of a whole state: every flag and every flag set's metadata.
pub fn digest_of(state: &SourceSnapshot) -> u64 {
    StateDigest::of(
        state
            .flags
            .iter()
            .map(|f| flag_hash(&f.flag_set, &f.key, &f.definition_json))
            .chain(state.flag_sets.iter().map(set_hash)),
    )
    .0
}

/// The digest contribution of a flag set's metadata.
pub fn set_hash(set: &FlagSet) -> u64 {
    let md = set.metadata.as_ref().map(struct_to_map).unwrap_or_default();
    flag_set_hash(&set.id, &serde_json::to_vec(&md).unwrap_or_default())
}

impl ReplicaStore {
    /// Opens (or creates) a replica in `dir`. With `sync_writes`, every
    /// applied event is on disk (in the replica's journal) before it is
    /// served, so a restarted node never serves older state than it served
    /// before.
    pub fn open(dir: &Path, sync_writes: bool) -> Result<Self, ApplyError> {
        Self::open_with_state(dir, sync_writes).map(|(store, _)| store)
    }

    /// [`ReplicaStore::open`], also returning what it holds (read once, for
    /// nodes that load their state at start).
    pub fn open_with_state(
        dir: &Path,
        sync_writes: bool,
    ) -> Result<(Self, SourceSnapshot), ApplyError> {
        Self::open_reading(dir, sync_writes, Definitions::Read)
    }

    fn open_reading(
        dir: &Path,
        sync_writes: bool,
        definitions: Definitions,
    ) -> Result<(Self, SourceSnapshot), ApplyError> {
        // the state is also held in memory: sled's page cache need not be
        // big. With the journal, sled's own flusher runs rarely (its
        // segment cleaning rides on it); the journal's checkpoints flush.
        let mut config = sled::Config::new().path(dir).cache_capacity(2 << 20);
        if sync_writes {
            config = config.flush_every_ms(Some(SLED_FLUSH_WITH_JOURNAL_MS));
        }
        let db = keys::open_db(&config, keys::LOCK_WAIT)?;
        let tree = db.open_tree(TREE)?;
        let journal = if sync_writes {
            Some(
                Journal::open(&dir.join("journal"), &db, &tree, CHECKPOINT_EVERY)
                    .map_err(|e| ApplyError::Storage(format!("the replica's journal: {e}")))?,
            )
        } else {
            None
        };
        Self::from_db(db, tree, journal, definitions)
    }

    /// A replica that lives in memory only (gone when dropped).
    pub fn open_temporary() -> Result<Self, ApplyError> {
        let db = sled::Config::new().temporary(true).open()?;
        let tree = db.open_tree(TREE)?;
        Self::from_db(db, tree, None, Definitions::Read).map(|(store, _)| store)
    }

    fn from_db(
        db: sled::Db,
        tree: sled::Tree,
        journal: Option<Journal>,
        definitions: Definitions,
    ) -> Result<(Self, SourceSnapshot), ApplyError> {
        let position = match tree.get(META)? {
            Some(b) => {
                decode_position(&b).ok_or_else(|| ApplyError::Storage("corrupt position".into()))?
            }
            None => Position::default(),
        };
        let codec = stored::Codec::open(&tree).map_err(|e| ApplyError::Storage(e.to_string()))?;
        let state = read_state(&tree, &codec, &position, None, definitions)?;
        let set_hashes = state
            .flag_sets
            .iter()
            .map(|s| (s.id.clone(), set_hash(s)))
            .collect();
        let store = Self {
            _db: db,
            tree,
            inner: Mutex::new(Inner {
                position,
                flags: state.flags.len(),
                set_hashes,
                pending: Vec::new(),
                scope: Vec::new(),
                needs_snapshot: false,
            }),
            journal,
            adopt: Mutex::new(None),
            codec,
        };
        Ok((store, state))
    }

    /// The sled tree the replica keeps its flags in (under [`keys::flag`]),
    /// for reading definitions that are not held in memory.
    pub fn tree(&self) -> sled::Tree {
        self.tree.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a snapshot of `history` replace the state held even when that
    /// is of another history (an operator's adoption). Without it, a
    /// replica that holds a state never leaves its history: an upstream
    /// on another one (a control plane restarted on an empty store, a hub
    /// on an older history) is refused with [`ApplyError::OtherHistory`].
    pub fn adopt_history(&self, history: Option<String>) {
        *self.adopt.lock().unwrap_or_else(|p| p.into_inner()) = history;
    }

    fn adopts(&self, history: &str) -> bool {
        self.adopt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(history)
    }

    /// [`ReplicaStore::open_with_state`] for a node following `scope` (the
    /// flag sets it follows; empty: every set): see
    /// [`ReplicaStore::rescope`]. What it returns is already in scope.
    pub fn open_scoped(
        dir: &Path,
        sync_writes: bool,
        scope: &[String],
    ) -> Result<(Self, SourceSnapshot), ApplyError> {
        Self::open_scoped_reading(dir, sync_writes, scope, Definitions::Read)
    }

    /// [`ReplicaStore::open_scoped`] for a node that reads definitions from
    /// the store when it needs them: the flags returned carry their
    /// identity and revisions, and an empty definition. Opening then holds
    /// one flag's definition at a time, not every one (38 MB at 100,000
    /// realistic flags).
    pub fn open_scoped_without_definitions(
        dir: &Path,
        sync_writes: bool,
        scope: &[String],
    ) -> Result<(Self, SourceSnapshot), ApplyError> {
        Self::open_scoped_reading(dir, sync_writes, scope, Definitions::Left)
    }

    fn open_scoped_reading(
        dir: &Path,
        sync_writes: bool,
        scope: &[String],
        definitions: Definitions,
    ) -> Result<(Self, SourceSnapshot), ApplyError> {
        let (store, state) = Self::open_reading(dir, sync_writes, definitions)?;
        if store.rescope(scope)? {
            drop(state);
            let state = store.read(None, definitions)?;
            return Ok((store, state));
        }
        Ok((store, state))
    }

    /// The flag sets followed are part of the replica's position. When
    /// they narrow, the sets left out are removed at once (what remains is
    /// whole for the new scope); when they widen, the sets left out are
    /// removed too and the replica waits for a snapshot of the new scope
    /// ([`ReplicaStore::needs_snapshot`]), across restarts, before it is
    /// whole again. No partial state is ever taken for a whole one.
    /// `true` when the state held changed.
    pub fn rescope(&self, scope: &[String]) -> Result<bool, ApplyError> {
        let mut new = scope.to_vec();
        new.sort();
        new.dedup();
        let mut inner = self.lock();
        let (complete, held) = decode_scope(self.tree.get(SCOPE)?.as_deref());
        inner.scope = new.clone();
        if inner.position.revision == 0 {
            let mut writes = Writes::default();
            writes.insert(SCOPE, encode_scope(true, &new));
            self.persist(writes)?;
            inner.needs_snapshot = false;
            return Ok(false);
        }
        if complete && held == new {
            inner.needs_snapshot = false;
            return Ok(false);
        }
        let covered = complete
            && (held.is_empty() || (!new.is_empty() && new.iter().all(|s| held.contains(s))));
        let keep = |set: &str| new.is_empty() || new.iter().any(|s| s == set);
        let mut digest = StateDigest(inner.position.digest);
        let mut writes = Writes::default();
        // the flags of the sets left out, and their hashes, from the store
        let mut flags_out = 0usize;
        for kv in self.tree.scan_prefix(keys::FLAGS) {
            let (k, v) = kv?;
            let Some((set, key)) = keys::parse_flag(&k) else {
                continue;
            };
            if keep(set) {
                continue;
            }
            digest.remove(self.hash_of(set, key, &v)?);
            writes.remove(k);
            flags_out += 1;
        }
        let sets_out: Vec<String> = inner
            .set_hashes
            .keys()
            .filter(|set| !keep(set))
            .cloned()
            .collect();
        for set in &sets_out {
            if let Some(h) = inner.set_hashes.remove(set) {
                digest.remove(h);
            }
            writes.remove(keys::flag_set(set));
        }
        inner.position.digest = digest.0;
        writes.insert(META, encode_position(&inner.position));
        writes.insert(SCOPE, encode_scope(covered, &new));
        self.persist(writes)?;
        inner.flags -= flags_out;
        inner.needs_snapshot = !covered;
        tracing::info!(
            from = ?held,
            to = ?new,
            removed_flags = flags_out,
            needs_snapshot = !covered,
            "the flag sets followed changed"
        );
        Ok(flags_out > 0 || !sets_out.is_empty())
    }

    /// Whether the state lacks sets of the scope followed (it widened): the
    /// next subscription asks for a snapshot.
    pub fn needs_snapshot(&self) -> bool {
        self.lock().needs_snapshot
    }

    /// The flag sets followed (empty: every set), sorted.
    pub fn scope(&self) -> Vec<String> {
        self.lock().scope.clone()
    }

    /// How many flags the replica holds.
    pub fn flag_count(&self) -> usize {
        self.lock().flags
    }

    /// Where the replica stands.
    pub fn position(&self) -> Position {
        self.lock().position.clone()
    }

    /// Every flag and flag set held.
    pub fn load(&self) -> Result<SourceSnapshot, ApplyError> {
        self.read(None, Definitions::Read)
    }

    /// The flags and records of `sets` only, at the replica's position
    /// (its digest is the whole state's): what a subscriber following
    /// those sets is sent, read without the other sets.
    pub fn load_sets(&self, sets: &HashSet<String>) -> Result<SourceSnapshot, ApplyError> {
        self.read(Some(sets), Definitions::Read)
    }

    /// [`read_state`] at the replica's position, under its lock.
    fn read(
        &self,
        sets: Option<&HashSet<String>>,
        definitions: Definitions,
    ) -> Result<SourceSnapshot, ApplyError> {
        let inner = self.lock();
        read_state(&self.tree, &self.codec, &inner.position, sets, definitions)
    }

    /// What was recovered from the journal when the replica opened.
    pub fn journal_recovered(&self) -> Recovered {
        self.journal
            .as_ref()
            .map(Journal::recovered)
            .unwrap_or_default()
    }

    /// The journal's checkpoints since the replica opened.
    pub fn journal_checkpoints(&self) -> u64 {
        self.journal.as_ref().map(Journal::checkpoints).unwrap_or(0)
    }

    /// The dictionary to compress a write of `flags` with: the store's,
    /// else one made for it (see [`stored::Codec::propose`]), whose record
    /// is put first in `writes`. [`stored::Codec::install`] it once the
    /// write is kept.
    fn dictionary_for<'a>(
        &self,
        flags: impl ExactSizeIterator<Item = &'a Flag>,
        writes: &mut Writes,
    ) -> Result<Option<Arc<stored::Dictionary>>, ApplyError> {
        if let Some(d) = self.codec.dictionary() {
            return Ok(Some(d.clone()));
        }
        let fresh = self
            .codec
            .propose(&self.tree, flags)
            .map_err(|e| ApplyError::Storage(e.to_string()))?;
        if let Some(d) = &fresh {
            writes.insert(stored::DICTIONARY_KEY, d.record());
        }
        Ok(fresh)
    }

    /// Whether the store held flag (set, key) before a delta, and its hash
    /// as of the part of the delta applied so far: what the delta already
    /// set it to, else that of the flag the store holds.
    fn current_hash(
        &self,
        changed: &HashMap<FlagId, (bool, Option<u64>)>,
        id: &FlagId,
        set: &str,
        key: &str,
    ) -> Result<(bool, Option<u64>), ApplyError> {
        if let Some(change) = changed.get(id) {
            return Ok(*change);
        }
        let stored = self
            .tree
            .get(keys::flag(set, key))?
            .map(|v| self.hash_of(set, key, &v))
            .transpose()?;
        Ok((stored.is_some(), stored))
    }

    /// The hash of flag (set, key) stored as `value`.
    fn hash_of(&self, set: &str, key: &str, value: &[u8]) -> Result<u64, ApplyError> {
        let f = self
            .codec
            .decode(value, &self.tree)
            .map_err(|e| ApplyError::Storage(e.to_string()))?;
        Ok(flag_hash(set, key, &f.definition_json))
    }

    /// With the journal: journals `writes` (synced), then gives them to
    /// sled; without: gives them to sled as one batch.
    fn persist(&self, writes: Writes) -> Result<(), ApplyError> {
        match &self.journal {
            Some(journal) => {
                let record = writes.record();
                journal
                    .write(&record, || {
                        writes.apply_each(&self.tree).map_err(std::io::Error::other)
                    })
                    .map_err(|e| ApplyError::Storage(format!("the replica's journal: {e}")))?;
            }
            None => self.tree.apply_batch(writes.into_batch())?,
        }
        Ok(())
    }

    /// Applies one event of a Subscribe stream (taken by value: an applied
    /// delta is kept, not copied).
    pub fn apply(&self, event: SyncEvent) -> Result<Applied, ApplyError> {
        match event.event {
            Some(Event::Progress(p)) => {
                // anti-entropy: at the sender's head, in the same history,
                // the digests must agree, or this replica diverged
                let position = self.position();
                if let Some(expected) = p.head_digest
                    && p.history_id == position.history_id
                    && p.revision == p.head_revision
                    && p.revision == position.revision
                    && expected != position.digest
                {
                    return Err(ApplyError::DigestMismatch {
                        revision: position.revision,
                        expected,
                        computed: position.digest,
                    });
                }
                Ok(Applied::Progress {
                    revision: p.revision,
                    head_revision: p.head_revision,
                    upstream_connected: p.upstream_connected,
                })
            }
            Some(Event::Snapshot(s)) => self.apply_snapshot_chunk(s),
            Some(Event::Delta(d)) => self.apply_delta(d),
            None => Err(ApplyError::Malformed("an event with no content".into())),
        }
    }

    fn apply_snapshot_chunk(&self, chunk: Snapshot) -> Result<Applied, ApplyError> {
        let mut inner = self.lock();
        // checked on the first chunk: another history is never buffered
        let held = &inner.position.history_id;
        if !held.is_empty()
            && !chunk.history_id.is_empty()
            && chunk.history_id != *held
            && !self.adopts(&chunk.history_id)
        {
            let local = held.clone();
            inner.pending.clear();
            return Err(ApplyError::OtherHistory {
                local,
                upstream: chunk.history_id,
            });
        }
        let expected_chunk = inner.pending.len() as u32;
        let consistent = inner
            .pending
            .first()
            .is_none_or(|f| f.revision == chunk.revision && f.history_id == chunk.history_id);
        if chunk.chunk != expected_chunk || !consistent {
            inner.pending.clear();
            return Err(ApplyError::Malformed(format!(
                "snapshot chunk {} arrived where chunk {expected_chunk} was expected",
                chunk.chunk
            )));
        }
        let header = Snapshot {
            history_id: chunk.history_id.clone(),
            revision: chunk.revision,
            digest: chunk.digest,
            chunk: chunk.chunk,
            last: chunk.last,
            ..Default::default()
        };
        inner.pending.push(chunk);
        if !header.last {
            return Ok(Applied::Buffered);
        }
        let chunks = std::mem::take(&mut inner.pending);
        let chunk = header;
        if chunk.history_id.is_empty() {
            return Err(ApplyError::Malformed("a snapshot without a history".into()));
        }
        if chunk.history_id == inner.position.history_id && chunk.revision < inner.position.revision
        {
            // never go back to an older state of the same history
            return Ok(Applied::Ignored);
        }
        let flags: Vec<Flag> = chunks
            .iter()
            .flat_map(|c| c.flags.iter().cloned())
            .collect();
        let flag_sets: Vec<FlagSet> = chunks
            .iter()
            .flat_map(|c| c.flag_sets.iter().cloned())
            .collect();
        let set_hashes: HashMap<String, u64> = flag_sets
            .iter()
            .map(|s| (s.id.clone(), set_hash(s)))
            .collect();
        let digest = StateDigest::of(
            flags
                .iter()
                .map(|f| flag_hash(&f.flag_set, &f.key, &f.definition_json))
                .chain(set_hashes.values().copied()),
        )
        .0;
        if let Some(expected) = chunk.digest
            && digest != expected
        {
            return Err(ApplyError::DigestMismatch {
                revision: chunk.revision,
                expected,
                computed: digest,
            });
        }
        let mut writes = Writes::default();
        let dictionary = self.dictionary_for(flags.iter(), &mut writes)?;
        for kv in self
            .tree
            .scan_prefix(keys::FLAGS)
            .chain(self.tree.scan_prefix(keys::FLAG_SETS))
        {
            writes.remove(kv?.0);
        }
        for f in &flags {
            writes.insert(
                keys::flag(&f.flag_set, &f.key),
                stored::encode_flag_with(f, dictionary.as_deref()),
            );
        }
        for s in &flag_sets {
            writes.insert(keys::flag_set(&s.id), s.encode_to_vec());
        }
        let position = Position {
            history_id: chunk.history_id.clone(),
            revision: chunk.revision,
            digest,
        };
        writes.insert(META, encode_position(&position));
        // a snapshot is the whole state of the scope it was asked for
        writes.insert(SCOPE, encode_scope(true, &inner.scope));
        self.persist(writes)?;
        if let Some(d) = dictionary {
            self.codec.install(d);
        }
        inner.needs_snapshot = false;
        inner.position = position.clone();
        inner.flags = flags.len();
        inner.set_hashes = set_hashes;
        Ok(Applied::Snapshot(Arc::new(SourceSnapshot {
            history_id: position.history_id,
            revision: position.revision,
            digest,
            flags,
            flag_sets,
        })))
    }

    fn apply_delta(&self, d: Delta) -> Result<Applied, ApplyError> {
        let mut inner = self.lock();
        inner.pending.clear();
        let local = inner.position.revision;
        if d.history_id != inner.position.history_id {
            return Err(ApplyError::WrongHistory {
                local: inner.position.history_id.clone(),
                got: d.history_id.clone(),
            });
        }
        if d.to_revision <= local {
            return Ok(Applied::Ignored);
        }
        if d.from_revision != local {
            return Err(ApplyError::Gap {
                local,
                from: d.from_revision,
            });
        }
        let mut digest = StateDigest(inner.position.digest);
        // each flag the delta touches: whether the store held it before,
        // and its hash after the delta so far (None: deleted)
        let mut flag_changes: HashMap<FlagId, (bool, Option<u64>)> = HashMap::new();
        let mut set_changes: Vec<(String, Option<u64>)> = Vec::new();
        let mut writes = Writes::default();
        let dictionary = self.dictionary_for(d.upserts.iter(), &mut writes)?;
        for r in &d.deletes {
            let id = flag_id(&r.flag_set, &r.key);
            let (held, old) = self.current_hash(&flag_changes, &id, &r.flag_set, &r.key)?;
            if let Some(old) = old {
                digest.remove(old);
            }
            writes.remove(keys::flag(&r.flag_set, &r.key));
            flag_changes.insert(id, (held, None));
        }
        for f in &d.upserts {
            let id = flag_id(&f.flag_set, &f.key);
            let (held, old) = self.current_hash(&flag_changes, &id, &f.flag_set, &f.key)?;
            let new = flag_hash(&f.flag_set, &f.key, &f.definition_json);
            digest.replace(old, Some(new));
            writes.insert(
                keys::flag(&f.flag_set, &f.key),
                stored::encode_flag_with(f, dictionary.as_deref()),
            );
            flag_changes.insert(id, (held, Some(new)));
        }
        for s in &d.flag_set_deletes {
            if let Some(old) = inner.set_hashes.get(s) {
                digest.remove(*old);
            }
            writes.remove(keys::flag_set(s));
            set_changes.push((s.clone(), None));
        }
        for s in &d.flag_set_upserts {
            let new = set_hash(s);
            digest.replace(inner.set_hashes.get(&s.id).copied(), Some(new));
            writes.insert(keys::flag_set(&s.id), s.encode_to_vec());
            set_changes.push((s.id.clone(), Some(new)));
        }
        if let Some(expected) = d.digest
            && digest.0 != expected
        {
            return Err(ApplyError::DigestMismatch {
                revision: d.to_revision,
                expected,
                computed: digest.0,
            });
        }
        let (added, removed) = flag_changes
            .values()
            .fold((0, 0), |(a, r), change| match change {
                (false, Some(_)) => (a + 1, r),
                (true, None) => (a, r + 1),
                _ => (a, r),
            });
        let position = Position {
            history_id: d.history_id.clone(),
            revision: d.to_revision,
            digest: digest.0,
        };
        writes.insert(META, encode_position(&position));
        self.persist(writes)?;
        if let Some(d) = dictionary {
            self.codec.install(d);
        }
        inner.position = position;
        inner.flags = inner.flags + added - removed;
        for (id, h) in set_changes {
            match h {
                Some(h) => inner.set_hashes.insert(id, h),
                None => inner.set_hashes.remove(&id),
            };
        }
        Ok(Applied::Delta(Arc::new(d)))
    }

    /// Whether part of a snapshot was received and awaits the rest.
    pub fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    /// Drops a half-received snapshot (the stream it came on ended).
    pub fn discard_pending(&self) {
        self.lock().pending.clear();
    }
}

/// The flags and flag sets a replica tree holds, at `position`: every
/// set's, or only those of `sets`. Each flag is shown to `each` as it is
/// read, and keeps its definition only with [`Definitions::Read`].
fn read_state(
    tree: &sled::Tree,
    codec: &stored::Codec,
    position: &Position,
    sets: Option<&HashSet<String>>,
    definitions: Definitions,
) -> Result<SourceSnapshot, ApplyError> {
    let storage = |e: &dyn std::fmt::Display| ApplyError::Storage(e.to_string());
    let mut sorted: Vec<&String> = sets.into_iter().flatten().collect();
    sorted.sort();
    let flag_prefixes: Vec<Vec<u8>> = match sets {
        None => vec![keys::FLAGS.to_vec()],
        Some(_) => sorted.iter().map(|set| keys::flags_of(set)).collect(),
    };
    let mut flags = Vec::new();
    for prefix in flag_prefixes {
        for kv in tree.scan_prefix(prefix) {
            let mut flag = codec
                .decode(kv?.1.as_ref(), tree)
                .map_err(|e| storage(&e))?;
            if definitions == Definitions::Left {
                flag.definition_json = Vec::new();
            }
            flags.push(flag);
        }
    }
    // a set's record is its exact key ("s:a" is a prefix of "s:ab")
    let records: Vec<sled::IVec> = match sets {
        None => tree
            .scan_prefix(keys::FLAG_SETS)
            .map(|kv| kv.map(|(_, v)| v))
            .collect::<Result<_, _>>()?,
        Some(_) => sorted
            .iter()
            .filter_map(|set| tree.get(keys::flag_set(set)).transpose())
            .collect::<Result<_, _>>()?,
    };
    let flag_sets = records
        .iter()
        .map(|v| FlagSet::decode(v.as_ref()).map_err(|e| storage(&e)))
        .collect::<Result<_, _>>()?;
    Ok(SourceSnapshot {
        history_id: position.history_id.clone(),
        revision: position.revision,
        digest: position.digest,
        flags,
        flag_sets,
    })
}

/// Serves a hub's snapshots from its replica; it keeps no older deltas
/// than its fan-out ring.
pub struct ReplicaSource(pub Arc<ReplicaStore>);

impl crate::source::SyncSource for ReplicaSource {
    fn snapshot(&self) -> Result<SourceSnapshot, SourceError> {
        self.0.load().map_err(|e| SourceError(e.to_string()))
    }

    fn snapshot_of(&self, flag_sets: &HashSet<String>) -> Result<SourceSnapshot, SourceError> {
        self.0
            .load_sets(flag_sets)
            .map_err(|e| SourceError(e.to_string()))
    }

    fn reads_sets_alone(&self) -> bool {
        true
    }

    fn deltas(
        &self,
        _history_id: &str,
        _from: u64,
        _to: u64,
    ) -> Result<Option<Vec<Delta>>, SourceError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flagmesh_proto::v1::FlagRef;

    fn flag(key: &str, v: &str, rev: u64) -> Flag {
        Flag {
            flag_set: "s".into(),
            key: key.into(),
            definition_json: v.as_bytes().to_vec(),
            mod_revision: rev,
            create_revision: rev,
        }
    }

    fn digest_of(flags: &[Flag]) -> u64 {
        StateDigest::of(
            flags
                .iter()
                .map(|f| flag_hash(&f.flag_set, &f.key, &f.definition_json)),
        )
        .0
    }

    fn snapshot(rev: u64, flags: Vec<Flag>) -> SyncEvent {
        SyncEvent {
            event: Some(Event::Snapshot(Snapshot {
                history_id: "h".into(),
                revision: rev,
                digest: Some(digest_of(&flags)),
                chunk: 0,
                last: true,
                flags,
                flag_sets: vec![],
            })),
        }
    }

    fn delta(from: u64, upserts: Vec<Flag>, deletes: &[&str], after: &[Flag]) -> SyncEvent {
        SyncEvent {
            event: Some(Event::Delta(Delta {
                history_id: "h".into(),
                from_revision: from,
                to_revision: from + 1,
                digest: Some(digest_of(after)),
                upserts,
                deletes: deletes
                    .iter()
                    .map(|k| FlagRef {
                        flag_set: "s".into(),
                        key: (*k).into(),
                    })
                    .collect(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn deltas_keep_the_count_and_the_digest_from_the_stored_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = (flag("a", "1", 1), flag("b", "2", 1), flag("c", "3", 2));
        {
            let r = ReplicaStore::open(dir.path(), true).expect("open");
            assert!(r.apply(snapshot(1, vec![a.clone(), b.clone()])).is_ok());
            assert_eq!(r.flag_count(), 2);
            // one added, one replaced, one deleted: each old hash is the
            // stored flag's, or the sender's digest would not match
            let a2 = flag("a", "4", 2);
            let d = delta(
                1,
                vec![c.clone(), a2.clone()],
                &["b"],
                &[a2.clone(), c.clone()],
            );
            assert!(matches!(r.apply(d), Ok(Applied::Delta(_))));
            assert_eq!(r.flag_count(), 2);
            // deleted and written again in one delta, and a delete of a
            // flag the store does not hold
            let c3 = flag("c", "5", 3);
            let d = delta(2, vec![c3.clone()], &["c", "zz"], &[a2.clone(), c3.clone()]);
            assert!(matches!(r.apply(d), Ok(Applied::Delta(_))));
            assert_eq!(r.flag_count(), 2);
            // a sender whose digest counts the old definition is refused
            let d = delta(3, vec![flag("a", "6", 4)], &[], &[a2.clone(), c3.clone()]);
            assert!(matches!(r.apply(d), Err(ApplyError::DigestMismatch { .. })));
            assert_eq!(r.position().digest, digest_of(&[a2.clone(), c3.clone()]));
        }
        let r = ReplicaStore::open(dir.path(), true).expect("reopen");
        assert_eq!(r.flag_count(), 2);
        let d = delta(3, vec![], &["a"], &[flag("c", "5", 3)]);
        assert!(matches!(r.apply(d), Ok(Applied::Delta(_))));
        assert_eq!(r.flag_count(), 1);
    }

    #[test]
    fn applies_in_order_drops_old_and_detects_gaps_and_mismatches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = ReplicaStore::open(dir.path(), false).expect("open");
        let a1 = flag("a", "1", 1);
        assert!(matches!(
            r.apply(snapshot(1, vec![a1.clone()])),
            Ok(Applied::Snapshot(_))
        ));
        let b2 = flag("b", "2", 2);
        let d2 = delta(1, vec![b2.clone()], &[], &[a1.clone(), b2.clone()]);
        assert!(matches!(r.apply(d2.clone()), Ok(Applied::Delta(_))));
        assert!(matches!(r.apply(d2.clone()), Ok(Applied::Ignored)));
        let gap = delta(5, vec![], &[], &[]);
        assert_eq!(
            r.apply(gap).err(),
            Some(ApplyError::Gap { local: 2, from: 5 })
        );
        let mut bad = delta(
            2,
            vec![flag("c", "3", 3)],
            &["a"],
            std::slice::from_ref(&b2),
        );
        if let Some(Event::Delta(d)) = &mut bad.event {
            d.digest = d.digest.map(|x| x ^ 1);
        }
        assert!(matches!(
            r.apply(bad),
            Err(ApplyError::DigestMismatch { .. })
        ));
        assert_eq!(r.position().revision, 2, "a refused delta changes nothing");
        let c3 = flag("c", "3", 3);
        let ok = delta(2, vec![c3.clone()], &["a"], &[b2.clone(), c3.clone()]);
        assert!(matches!(r.apply(ok), Ok(Applied::Delta(_))));
        drop(r);
        // reopened, it stands where it stopped, with the same digest
        let r = ReplicaStore::open(dir.path(), false).expect("reopen");
        let p = r.position();
        assert_eq!((p.revision, p.digest), (3, digest_of(&[b2, c3])));
        assert_eq!(r.load().expect("load").flags.len(), 2);
    }

    #[test]
    fn chunked_snapshots_apply_only_on_the_last_chunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = ReplicaStore::open(dir.path(), false).expect("open");
        let flags = vec![flag("a", "1", 1), flag("b", "1", 1)];
        let digest = Some(digest_of(&flags));
        let chunk = |i: u32, last: bool, f: Vec<Flag>| SyncEvent {
            event: Some(Event::Snapshot(Snapshot {
                history_id: "h".into(),
                revision: 4,
                digest,
                chunk: i,
                last,
                flags: f,
                flag_sets: vec![],
            })),
        };
        assert!(matches!(
            r.apply(chunk(0, false, vec![flags[0].clone()])),
            Ok(Applied::Buffered)
        ));
        assert_eq!(r.position().revision, 0);
        assert!(matches!(
            r.apply(chunk(1, true, vec![flags[1].clone()])),
            Ok(Applied::Snapshot(_))
        ));
        assert_eq!(r.position().revision, 4);
        // out-of-order chunks are refused
        assert!(r.apply(chunk(3, true, vec![])).is_err());
    }

    fn in_history(history: &str, mut event: SyncEvent) -> SyncEvent {
        match &mut event.event {
            Some(Event::Snapshot(s)) => s.history_id = history.into(),
            Some(Event::Delta(d)) => d.history_id = history.into(),
            _ => {}
        }
        event
    }

    #[test]
    fn another_history_is_refused_until_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = ReplicaStore::open(dir.path(), false).expect("open");
        // a replica without state takes any history
        let a1 = flag("a", "1", 1);
        assert!(r.apply(snapshot(3, vec![a1.clone()])).is_ok());
        // a wiped control plane's empty state: refused, nothing changes
        let empty = in_history("new", snapshot(0, vec![]));
        assert_eq!(
            r.apply(empty.clone()).err(),
            Some(ApplyError::OtherHistory {
                local: "h".into(),
                upstream: "new".into()
            })
        );
        let held = r.position();
        assert_eq!((held.history_id.as_str(), held.revision), ("h", 3));
        assert_eq!(r.flag_count(), 1);
        // also when it arrives in chunks: the first one is refused
        let mut first = in_history("new", snapshot(0, vec![]));
        if let Some(Event::Snapshot(s)) = &mut first.event {
            s.last = false;
        }
        assert!(matches!(
            r.apply(first),
            Err(ApplyError::OtherHistory { .. })
        ));
        // adopted by an operator: applied, and the old one is refused from then on
        r.adopt_history(Some("new".into()));
        assert!(matches!(r.apply(empty), Ok(Applied::Snapshot(_))));
        assert_eq!(r.position().history_id, "new");
        assert!(matches!(
            r.apply(snapshot(4, vec![a1])),
            Err(ApplyError::OtherHistory { .. })
        ));
    }

    #[test]
    fn an_idle_replica_at_the_head_with_another_digest_is_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = ReplicaStore::open(dir.path(), false).expect("open");
        let a1 = flag("a", "1", 1);
        assert!(r.apply(snapshot(3, vec![a1.clone()])).is_ok());
        let progress = |revision: u64, head: u64, digest: Option<u64>| SyncEvent {
            event: Some(Event::Progress(flagmesh_proto::v1::Progress {
                revision,
                head_revision: head,
                history_id: "h".into(),
                upstream_connected: true,
                head_digest: digest,
            })),
        };
        let good = digest_of(&[a1]);
        assert!(matches!(
            r.apply(progress(3, 3, Some(good))),
            Ok(Applied::Progress { .. })
        ));
        // not checked: no digest, or not at the head
        assert!(r.apply(progress(3, 3, None)).is_ok());
        assert!(r.apply(progress(3, 5, Some(good ^ 1))).is_ok());
        // the empty state's digest (0) is a digest like any other
        assert!(matches!(
            r.apply(progress(3, 3, Some(0))),
            Err(ApplyError::DigestMismatch {
                revision: 3,
                expected: 0,
                ..
            })
        ));
    }

    #[test]
    fn the_scope_is_part_of_the_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r");
        let in_set = |set: &str| Flag {
            flag_set: set.into(),
            ..flag("f", "1", 1)
        };
        let (a, b) = (in_set("a"), in_set("b"));
        {
            let (r, _) = ReplicaStore::open_scoped(&path, false, &[]).expect("open");
            assert!(r.apply(snapshot(3, vec![a.clone(), b.clone()])).is_ok());
        }
        // narrowed: the other set is gone at once, no snapshot needed
        let narrow = ["a".to_owned()];
        let (r, state) = ReplicaStore::open_scoped(&path, false, &narrow).expect("open");
        let sets: Vec<&str> = state.flags.iter().map(|f| f.flag_set.as_str()).collect();
        assert_eq!(sets, ["a"]);
        assert_eq!(r.position().digest, digest_of(std::slice::from_ref(&a)));
        assert_eq!(r.position().revision, 3, "still at its revision");
        assert!(!r.needs_snapshot());
        drop(r);
        // widened again: not whole until a snapshot, even across restarts
        let wide = ["a".to_owned(), "b".to_owned()];
        let (r, state) = ReplicaStore::open_scoped(&path, false, &wide).expect("open");
        assert_eq!(state.flags.len(), 1);
        assert!(r.needs_snapshot());
        drop(r);
        let (r, _) = ReplicaStore::open_scoped(&path, false, &wide).expect("open");
        assert!(
            r.needs_snapshot(),
            "a restart does not forget the missing sets"
        );
        assert!(r.apply(snapshot(4, vec![a.clone(), b.clone()])).is_ok());
        assert!(!r.needs_snapshot());
        drop(r);
        let (r, state) = ReplicaStore::open_scoped(&path, false, &wide).expect("open");
        assert!(!r.needs_snapshot());
        assert_eq!(state.flags.len(), 2);
        drop(r);
        // from some sets to every set: a snapshot of everything is needed
        let (r, _) = ReplicaStore::open_scoped(&path, false, &[]).expect("open");
        assert!(r.needs_snapshot());
    }

    #[test]
    fn flags_are_stored_compressed_and_a_store_of_plain_values_still_serves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let targeted = |key: &str, rev| {
            flag(
                key,
                r#"{"defaultVariant":"off","state":"ENABLED","targeting":{"if":[{"ends_with":[{"var":"email"},"@acme.test"]},"on","off"]},"variants":{"off":false,"on":true}}"#,
                rev,
            )
        };
        let (a, b) = (targeted("a", 1), targeted("b", 2));
        {
            let r = ReplicaStore::open(dir.path(), true).expect("open");
            assert!(r.apply(snapshot(1, vec![a.clone()])).is_ok());
            let held = r
                .tree()
                .get(keys::flag("s", "a"))
                .expect("get")
                .expect("held");
            assert_eq!(held[0], 0x01, "a targeted flag is stored compressed");
            assert!(held.len() < a.encode_to_vec().len());
            // as a replica written before compression would hold it
            r.tree()
                .insert(keys::flag("s", "a"), a.encode_to_vec())
                .expect("insert");
            let d = delta(1, vec![b.clone()], &[], &[a.clone(), b.clone()]);
            assert!(matches!(r.apply(d), Ok(Applied::Delta(_))));
        }
        let (r, state) = ReplicaStore::open_with_state(dir.path(), true).expect("reopen");
        assert_eq!(state.flags, [a.clone(), b.clone()], "both forms read back");
        assert_eq!(r.position().digest, digest_of(&[a, b]));
    }

    #[test]
    fn a_store_makes_its_dictionary_from_its_first_flags_and_reads_back_through_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet: Vec<Flag> = (0..40)
            .map(|i| {
                flag(
                    &format!("flag-{i:02}"),
                    &format!(
                        r#"{{"defaultVariant":"off","metadata":{{"owner":"team-{}"}},"state":"ENABLED","targeting":{{"if":[{{"in":[{{"var":"country"}},["NL","DE"]]}},"on",{{"fractional":[["on",{}],["off",100]]}}]}},"variants":{{"off":false,"on":true}}}}"#,
                        i % 5,
                        i % 50
                    ),
                    1,
                )
            })
            .collect();
        let late = flag(
            "late",
            r#"{"defaultVariant":"on","state":"ENABLED","targeting":{"if":[{"in":[{"var":"country"},["FR"]]},"off","on"]},"variants":{"off":false,"on":true}}"#,
            2,
        );
        let mut all = fleet.clone();
        all.push(late.clone());
        all.sort_by(|a, b| a.key.cmp(&b.key));
        {
            let r = ReplicaStore::open(dir.path(), true).expect("open");
            assert!(r.apply(snapshot(1, fleet.clone())).is_ok());
            let dictionary = r.tree().get(stored::DICTIONARY_KEY).expect("get");
            assert!(dictionary.is_some(), "made with the first flags");
            let held = |key: &str| {
                r.tree()
                    .get(keys::flag("s", key))
                    .expect("get")
                    .expect("held")
            };
            assert_eq!(held("flag-07")[0], 0x02);
            assert!(held("flag-07").len() * 2 < stored::encode_flag(&fleet[7]).len());
            let d = delta(1, vec![late.clone()], &[], &all);
            assert!(matches!(r.apply(d), Ok(Applied::Delta(_))));
            assert_eq!(held("late")[0], 0x02, "later flags use the same one");
            assert_eq!(
                r.tree().get(stored::DICTIONARY_KEY).expect("get"),
                dictionary,
                "never replaced"
            );
            // a snapshot replacing every flag keeps it too
            assert!(r.apply(snapshot(3, all.clone())).is_ok());
            assert_eq!(
                r.tree().get(stored::DICTIONARY_KEY).expect("get"),
                dictionary
            );
        }
        let (r, state) = ReplicaStore::open_with_state(dir.path(), true).expect("reopen");
        assert_eq!(state.flags, all, "read back whole");
        assert_eq!(r.position().digest, digest_of(&all));
        // a tier reading definitions from the tree finds the dictionary
        let tier = crate::tier::Tier::new(Some(r.tree()), None, Vec::new());
        let read = tier.read("s", "flag-07").expect("read").expect("held");
        assert_eq!(read, fleet[7]);
    }

    #[test]
    fn opened_without_definitions_the_state_has_none_and_the_digest_stays_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (flag("a", "1", 1), flag("b", "2", 1));
        {
            let r = ReplicaStore::open(dir.path(), true).expect("open");
            assert!(r.apply(snapshot(1, vec![a.clone(), b.clone()])).is_ok());
        }
        let (r, state) =
            ReplicaStore::open_scoped_without_definitions(dir.path(), true, &[]).expect("reopen");
        let held: Vec<(&str, u64, usize)> = state
            .flags
            .iter()
            .map(|f| (f.key.as_str(), f.mod_revision, f.definition_json.len()))
            .collect();
        assert_eq!(held, [("a", 1, 0), ("b", 1, 0)]);
        assert_eq!(state.digest, digest_of(&[a.clone(), b.clone()]));
        // the hash a delta replaces is taken from the stored definition: a
        // delta replacing one is checked against the sender's digest
        let a2 = flag("a", "3", 2);
        let d = delta(1, vec![a2.clone()], &[], &[a2.clone(), b.clone()]);
        assert!(matches!(r.apply(d), Ok(Applied::Delta(_))));
        assert_eq!(
            r.load().expect("load").flags,
            [a2, b],
            "the store keeps them"
        );
    }

    #[test]
    fn a_read_of_some_sets_holds_those_sets_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let in_set = |set: &str, key: &str| Flag {
            flag_set: set.into(),
            ..flag(key, "1", 1)
        };
        // "ab" shares a prefix with "a" in the store's key order
        let flags = vec![in_set("a", "x"), in_set("ab", "y"), in_set("b", "z")];
        let r = ReplicaStore::open(dir.path(), false).expect("open");
        assert!(r.apply(snapshot(4, flags.clone())).is_ok());
        let whole = r.load().expect("load");
        let some = r
            .load_sets(&HashSet::from(["a".to_owned(), "b".to_owned()]))
            .expect("load");
        let keys: Vec<(&str, &str)> = some
            .flags
            .iter()
            .map(|f| (f.flag_set.as_str(), f.key.as_str()))
            .collect();
        assert_eq!(keys, [("a", "x"), ("b", "z")]);
        assert_eq!(
            (some.history_id, some.revision, some.digest),
            (whole.history_id, whole.revision, whole.digest)
        );
        assert!(r.load_sets(&HashSet::new()).expect("load").flags.is_empty());
    }
}
