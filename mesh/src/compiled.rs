//! A replica's compiled in-memory state (what PoPs and SDKs in local mode
//! evaluate from), held in an immutable snapshot swapped atomically on each
//! apply. Each flag is compiled once, the first time it is evaluated (so a
//! restarted node serves from its store at once, and flags nobody asks for
//! cost only their stored bytes).
//! A delta rebuilds only the flag sets it touches; every other set (and
//! every unchanged flag) is shared with the previous snapshot.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::SourceSnapshot;
use crate::tier::{Tier, Uncompiled, estimated_size};
use arc_swap::ArcSwapOption;
use flagmesh_engine::{
    CompiledFlag, ErrorCode, FlagDefinition, MetaValue, Metadata, Reason, Resolution, SetMetadata,
    Strictness, ValueType,
};
use flagmesh_proto::convert::{json_to_value, struct_to_map};
use flagmesh_proto::v1 as pb;
use flagmesh_proto::v1::{Delta, Flag, FlagSet};
use serde_json::{Map, Value};
use xxhash_rust::xxh3::Xxh3Builder;

/// A flag's compiled form, or why it has none.
pub type Compiled = Result<CompiledFlag, Uncompiled>;

/// A compiled form lent from a flag's slot (or made for one evaluation):
/// `Some` whenever a [`PopFlag`] hands it out.
pub type HeldGuard = arc_swap::Guard<Option<Arc<Held>>>;

/// A compiled form and the bytes charged for it to the tier (released
/// with exactly this value when it is dropped, whoever drops it). Answers
/// encode its metadata as they are written, from the compiled flag's own
/// entries: a copy rendered for answers would cost about 100 bytes a flag,
/// to save a little CPU per answer (BENCHMARKS.md, "PoP memory").
#[derive(Debug)]
pub struct Held {
    compiled: Compiled,
    charged: usize,
}

impl Held {
    fn new(compiled: Compiled, charged: usize) -> Self {
        Self { compiled, charged }
    }
}

impl std::ops::Deref for Held {
    type Target = Compiled;

    fn deref(&self) -> &Compiled {
        &self.compiled
    }
}

/// One flag: its identity and revisions, its definition (held here, or
/// read from the store through its [`Tier`]), and its compiled form, made
/// on first use and kept while the tier's budget allows.
pub struct PopFlag {
    /// Its set's name and metadata, and the tier it is kept in.
    set: Arc<SetShared>,
    /// The key, shared with the set's map and the compiled form.
    key: Arc<str>,
    mod_revision: u64,
    create_revision: u64,
    /// The definition, when the tier keeps definitions in memory.
    definition: Option<Box<[u8]>>,
    compiled: ArcSwapOption<Held>,
    /// Used since the tier's clock hand last passed.
    referenced: AtomicBool,
    /// Named hot: compiled at start and never dropped (looked up once,
    /// when the flag is made, not on each compile).
    pub(crate) pinned: bool,
}

impl std::fmt::Debug for PopFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PopFlag")
            .field("flag_set", &self.set.name)
            .field("key", &self.key)
            .field("mod_revision", &self.mod_revision)
            .field("compiled", &self.is_compiled())
            .finish()
    }
}

impl PopFlag {
    /// A flag of a set with `set_metadata`, not compiled yet, with its
    /// definition held in memory (for flags evaluated outside a replica).
    pub fn new(stored: Flag, set_metadata: Arc<Map<String, Value>>) -> Self {
        let set = SetShared::new(stored.flag_set.as_str().into(), &set_metadata, Tier::held());
        Self::in_set(&stored, &set)
    }

    /// A flag of `set` (whose name it has), kept as the set's tier keeps
    /// flags.
    fn in_set(stored: &Flag, set: &Arc<SetShared>) -> Self {
        Self {
            pinned: set.tier.is_hot(&set.name, &stored.key),
            set: set.clone(),
            key: stored.key.as_str().into(),
            mod_revision: stored.mod_revision,
            create_revision: stored.create_revision,
            definition: set
                .tier
                .holds_definitions()
                .then(|| stored.definition_json.as_slice().into()),
            compiled: ArcSwapOption::empty(),
            referenced: AtomicBool::new(false),
        }
    }

    /// The flag's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The flag's key, to share.
    pub fn shared_key(&self) -> &Arc<str> {
        &self.key
    }

    /// The flag's set.
    pub fn flag_set(&self) -> &str {
        &self.set.name
    }

    /// The revision that last changed the flag.
    pub fn mod_revision(&self) -> u64 {
        self.mod_revision
    }

    /// The flag's definition and the revision it is of: its own, or a
    /// newer one when the store moved on while an older state is served.
    fn definition(&self) -> Result<(Cow<'_, [u8]>, u64), Uncompiled> {
        if let Some(d) = &self.definition {
            return Ok((Cow::Borrowed(d), self.mod_revision));
        }
        match self.set.tier.read(&self.set.name, &self.key)? {
            Some(f) => Ok((Cow::Owned(f.definition_json), f.mod_revision)),
            None => Err(Uncompiled::Store(
                "the flag was deleted while this state was served".into(),
            )),
        }
    }

    /// The flag as stored and replicated (read from the store when the
    /// tier does not hold definitions).
    pub fn stored(&self) -> Result<Flag, Uncompiled> {
        let (definition, mod_revision) = self.definition()?;
        Ok(Flag {
            flag_set: self.set.name.to_string(),
            key: self.key.to_string(),
            definition_json: definition.into_owned(),
            mod_revision,
            create_revision: self.create_revision,
        })
    }

    /// The same flag in `set` (its set under other metadata), not compiled
    /// yet.
    fn with_set(&self, set: Arc<SetShared>) -> Self {
        Self {
            set,
            key: self.key.clone(),
            mod_revision: self.mod_revision,
            create_revision: self.create_revision,
            definition: self.definition.clone(),
            compiled: ArcSwapOption::empty(),
            referenced: AtomicBool::new(false),
            pinned: self.pinned,
        }
    }

    /// The compiled flag, compiled now if it is not held (its first use,
    /// or its first since the budget dropped it). Always `Some`.
    pub fn compiled(self: &Arc<Self>) -> HeldGuard {
        self.compiled_at().0
    }

    /// [`PopFlag::compiled`] and the revision it was compiled from: the
    /// flag's own, or a newer one when the store moved on while an older
    /// state is served (then it is not kept). A held form is lent without
    /// touching its reference count, which every core evaluating the flag
    /// would otherwise contend on.
    fn compiled_at(self: &Arc<Self>) -> (HeldGuard, u64) {
        let held = self.compiled.load();
        if held.is_some() {
            if self.set.tier.is_bounded() {
                self.set.tier.hit();
                if !self.referenced.load(Ordering::Relaxed) {
                    self.referenced.store(true, Ordering::Relaxed);
                }
            }
            return (held, self.mod_revision);
        }
        drop(held);
        let started = std::time::Instant::now();
        let compiled = match self.definition() {
            Ok((d, revision)) => {
                // hot flags are held beyond the budget, so not charged to it
                let charged = if self.pinned {
                    0
                } else {
                    estimated_size(d.len())
                };
                let held = Arc::new(Held::new(
                    compile(&self.set.name, &self.key, &d, &self.set.metadata),
                    charged,
                ));
                // a newer revision read back is answered, never kept here
                if revision == self.mod_revision {
                    self.keep(&held);
                }
                (HeldGuard::from_inner(Some(held)), revision)
            }
            Err(e) => (
                HeldGuard::from_inner(Some(Arc::new(Held::new(Err(e), 0)))),
                self.mod_revision,
            ),
        };
        self.set.tier.missed(started);
        compiled
    }

    fn keep(self: &Arc<Self>, held: &Arc<Held>) {
        self.referenced.store(true, Ordering::Relaxed);
        let before = self
            .compiled
            .compare_and_swap(&None::<Arc<Held>>, Some(held.clone()));
        if before.is_none() {
            self.set.tier.admit(self, held.charged);
        }
    }

    /// Whether the compiled form is held.
    pub fn is_compiled(&self) -> bool {
        self.compiled.load().is_some()
    }

    /// Whether the flag was used since last asked (and forgets it).
    pub(crate) fn take_reference(&self) -> bool {
        self.referenced.swap(false, Ordering::Relaxed)
    }

    /// Drops the compiled form; `true` if one was held.
    pub(crate) fn drop_compiled(&self) -> bool {
        match self.compiled.swap(None) {
            Some(held) => {
                self.set.tier.release(held.charged);
                true
            }
            None => false,
        }
    }
}

impl Drop for PopFlag {
    fn drop(&mut self) {
        self.drop_compiled();
    }
}

/// What every flag of a set shares: the set's name and metadata, and the
/// tier its flags are kept in (one pointer in each flag instead of three).
#[derive(Debug)]
struct SetShared {
    name: Arc<str>,
    /// The set's metadata as its compiled flags hold it.
    metadata: Arc<SetMetadata>,
    tier: Arc<Tier>,
}

impl SetShared {
    /// The shared part of set `name`'s flags; its metadata is the very map
    /// the set holds, not a copy.
    fn new(name: Arc<str>, metadata: &Arc<Map<String, Value>>, tier: Arc<Tier>) -> Arc<Self> {
        Arc::new(Self {
            name,
            metadata: Arc::new(SetMetadata::new(Arc::clone(metadata))),
            tier,
        })
    }
}

/// A set's flags by key. Each entry is only the flag's pointer, found by
/// the key the flag holds: a map of key to flag spent 24 bytes a slot (16
/// of them a second pointer to the same key), and a table has up to about
/// twice as many slots as flags.
#[derive(Debug, Clone, Default)]
pub struct FlagMap(HashSet<ByKey, Xxh3Builder>);

/// A flag, hashed and compared by its key (so the table is searched with
/// a `&str`).
#[derive(Debug, Clone)]
pub struct ByKey(Arc<PopFlag>);

impl std::hash::Hash for ByKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.key().hash(state);
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key() == other.0.key()
    }
}

impl Eq for ByKey {}

impl std::borrow::Borrow<str> for ByKey {
    fn borrow(&self) -> &str {
        self.0.key()
    }
}

impl FlagMap {
    /// The flag named `key`.
    pub fn get(&self, key: &str) -> Option<&Arc<PopFlag>> {
        self.0.get(key).map(|f| &f.0)
    }

    /// Whether a flag is named `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains(key)
    }

    /// Adds `flag`, in place of the one with its key.
    pub fn insert(&mut self, flag: Arc<PopFlag>) {
        self.0.replace(ByKey(flag));
    }

    /// Takes out the flag named `key`.
    pub fn remove(&mut self, key: &str) -> Option<Arc<PopFlag>> {
        self.0.take(key).map(|f| f.0)
    }

    /// How many flags.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every flag with its key, in no order.
    pub fn iter(&self) -> <&Self as IntoIterator>::IntoIter {
        self.into_iter()
    }

    /// Every key, in no order.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|f| f.0.shared_key())
    }

    /// Every flag, in no order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<PopFlag>> {
        self.0.iter().map(|f| &f.0)
    }
}

impl FromIterator<Arc<PopFlag>> for FlagMap {
    fn from_iter<I: IntoIterator<Item = Arc<PopFlag>>>(flags: I) -> Self {
        Self(flags.into_iter().map(ByKey).collect())
    }
}

impl<'a> IntoIterator for &'a FlagMap {
    type Item = (&'a Arc<str>, &'a Arc<PopFlag>);
    type IntoIter = std::iter::Map<
        std::collections::hash_set::Iter<'a, ByKey>,
        fn(&'a ByKey) -> (&'a Arc<str>, &'a Arc<PopFlag>),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|f| (f.0.shared_key(), &f.0))
    }
}

/// One flag set.
#[derive(Debug, Default)]
pub struct SetState {
    /// The set's metadata.
    pub metadata: Arc<Map<String, Value>>,
    /// Its flags by key.
    pub flags: FlagMap,
    /// Its flags ordered by key, made on first use from `flags` as they are
    /// then (a set is not changed once shared): answers listing every
    /// flag, such as bulk evaluations, need not sort on each request.
    sorted: std::sync::OnceLock<Box<[Arc<PopFlag>]>>,
}

impl SetState {
    /// A set of `flags` with `metadata`.
    pub fn new(metadata: Arc<Map<String, Value>>, flags: FlagMap) -> Self {
        Self {
            metadata,
            flags,
            sorted: std::sync::OnceLock::new(),
        }
    }

    /// Every flag, ordered by key.
    pub fn sorted(&self) -> &[Arc<PopFlag>] {
        self.sorted.get_or_init(|| {
            let mut flags: Vec<Arc<PopFlag>> = self.flags.values().cloned().collect();
            flags.sort_by(|a, b| a.key().cmp(b.key()));
            flags.into_boxed_slice()
        })
    }
}

/// A whole state at one revision.
#[derive(Debug)]
pub struct PopState {
    /// The history.
    pub history_id: String,
    /// The revision (0: no state).
    pub revision: u64,
    /// The flag sets by id.
    pub sets: HashMap<String, Arc<SetState>>,
    /// Where its flags' definitions and compiled forms are kept.
    pub tier: Arc<Tier>,
}

impl Default for PopState {
    fn default() -> Self {
        Self {
            history_id: String::new(),
            revision: 0,
            sets: HashMap::new(),
            tier: Tier::held(),
        }
    }
}

/// Flags compiled by this process so far.
static COMPILATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many flags this process has compiled (each on its first use after
/// it changed): a sign of activity for releasing memory when quiet.
pub fn compilations() -> u64 {
    COMPILATIONS.load(Ordering::Relaxed)
}

fn compile(set: &str, key: &Arc<str>, definition: &[u8], metadata: &Arc<SetMetadata>) -> Compiled {
    COMPILATIONS.fetch_add(1, Ordering::Relaxed);
    let compiled = serde_json::from_slice::<Value>(definition)
        .map_err(|e| format!("definition is not JSON: {e}"))
        .and_then(|v| {
            FlagDefinition::from_json(key, &v, &Map::new(), Strictness::Lenient)
                .map_err(|e| e.to_string())
        })
        .map(|d| CompiledFlag::with_shared_metadata(key.clone(), d, metadata));
    if let Err(e) = &compiled {
        tracing::warn!(flag_set = %set, key = %key, error = %e, "flag does not compile");
    }
    compiled.map_err(Uncompiled::Definition)
}

fn metadata_of(set: &FlagSet) -> Arc<Map<String, Value>> {
    Arc::new(set.metadata.as_ref().map(struct_to_map).unwrap_or_default())
}

/// A set being rebuilt: what its flags share, and its contents.
struct Building {
    shared: Arc<SetShared>,
    set: SetState,
}

impl PopState {
    /// The state of a snapshot, with definitions held in memory.
    pub fn from_snapshot(s: &SourceSnapshot) -> Self {
        Self::from_snapshot_in(s, Tier::held())
    }

    /// The state of a snapshot, its flags kept as `tier` keeps them.
    pub fn from_snapshot_in(s: &SourceSnapshot, tier: Arc<Tier>) -> Self {
        let mut sets: HashMap<String, Building> = s
            .flag_sets
            .iter()
            .map(|fs| {
                let metadata = metadata_of(fs);
                let shared = SetShared::new(fs.id.as_str().into(), &metadata, tier.clone());
                let set = SetState::new(metadata, FlagMap::default());
                (fs.id.clone(), Building { shared, set })
            })
            .collect();
        for f in &s.flags {
            let b = sets.entry(f.flag_set.clone()).or_insert_with(|| {
                let set = SetState::default();
                let shared =
                    SetShared::new(f.flag_set.as_str().into(), &set.metadata, tier.clone());
                Building { shared, set }
            });
            let flag = PopFlag::in_set(f, &b.shared);
            b.set.flags.insert(Arc::new(flag));
        }
        Self {
            history_id: s.history_id.clone(),
            revision: s.revision,
            sets: sets
                .into_iter()
                .map(|(k, b)| (k, Arc::new(b.set)))
                .collect(),
            tier,
        }
    }

    /// The state after a delta; untouched sets are shared.
    pub fn apply(&self, d: &Delta) -> Self {
        let mut sets = self.sets.clone();
        let mut touched: HashMap<String, Building> = HashMap::new();
        let take = |id: &str,
                    sets: &HashMap<String, Arc<SetState>>,
                    touched: &mut HashMap<String, Building>| {
            if !touched.contains_key(id) {
                let set = sets
                    .get(id)
                    .map(|s| SetState::new(s.metadata.clone(), s.flags.clone()))
                    .unwrap_or_default();
                let shared = set.flags.values().next().map_or_else(
                    || SetShared::new(id.into(), &set.metadata, self.tier.clone()),
                    |f| f.set.clone(),
                );
                touched.insert(id.to_owned(), Building { shared, set });
            }
        };
        for id in &d.flag_set_deletes {
            sets.remove(id);
        }
        for fs in &d.flag_set_upserts {
            take(&fs.id, &sets, &mut touched);
            if let Some(b) = touched.get_mut(&fs.id) {
                b.set.metadata = metadata_of(fs);
                b.shared =
                    SetShared::new(b.shared.name.clone(), &b.set.metadata, self.tier.clone());
                // merged metadata changed: the set's flags compile anew
                b.set.flags = b
                    .set
                    .flags
                    .values()
                    .map(|f| Arc::new(f.with_set(b.shared.clone())))
                    .collect();
            }
        }
        for r in &d.deletes {
            take(&r.flag_set, &sets, &mut touched);
            if let Some(b) = touched.get_mut(&r.flag_set) {
                b.set.flags.remove(r.key.as_str());
            }
        }
        for f in &d.upserts {
            take(&f.flag_set, &sets, &mut touched);
            if let Some(b) = touched.get_mut(&f.flag_set) {
                b.set.flags.insert(Arc::new(PopFlag::in_set(f, &b.shared)));
            }
        }
        for (id, b) in touched {
            if d.flag_set_deletes.contains(&id) && b.set.flags.is_empty() {
                continue;
            }
            sets.insert(id, Arc::new(b.set));
        }
        Self {
            history_id: d.history_id.clone(),
            revision: d.to_revision,
            sets,
            tier: self.tier.clone(),
        }
    }

    /// Every flag, for checks: (set, key) -> definition bytes.
    pub fn definitions(
        &self,
    ) -> Result<std::collections::BTreeMap<(String, String), Vec<u8>>, Uncompiled> {
        let mut out = std::collections::BTreeMap::new();
        for (id, s) in &self.sets {
            for (k, f) in &s.flags {
                out.insert((id.clone(), k.to_string()), f.stored()?.definition_json);
            }
        }
        Ok(out)
    }
}

/// The outcome of one evaluation, before it is encoded.
pub struct Outcome<'a> {
    /// The resolution.
    pub resolution: Resolution<'a>,
    /// The flag's mod revision (0 when not found).
    pub mod_revision: u64,
}

/// What an evaluation resolves: a flag, with its compiled form held for
/// the evaluation (the tier may drop it meanwhile), or why there is none.
pub enum Target<'s> {
    /// The flag's compiled form and the revision it is of.
    Flag(HeldGuard, u64),
    /// No such flag (or no state at all).
    Missing(ErrorCode, String, Metadata<'s>),
}

impl<'s> Target<'s> {
    /// A flag, compiled if it is not held.
    pub fn of(flag: &'s Arc<PopFlag>) -> Self {
        let (compiled, revision) = flag.compiled_at();
        Self::Flag(compiled, revision)
    }

    /// Finds `key` of `set` in `state`.
    pub fn lookup(state: &'s PopState, set_name: &str, key: &str) -> Self {
        if state.revision == 0 {
            return Self::Missing(
                ErrorCode::General,
                "this PoP has no flag state yet (it has never synced); use your default".into(),
                Metadata::empty(),
            );
        }
        let Some(set) = state.sets.get(set_name) else {
            return Self::Missing(
                ErrorCode::FlagNotFound,
                format!("flag set \"{set_name}\" not found"),
                Metadata::empty(),
            );
        };
        match set.flags.get(key) {
            Some(flag) => Self::of(flag),
            None => Self::Missing(
                ErrorCode::FlagNotFound,
                format!("flag \"{key}\" not found in flag set \"{set_name}\""),
                Metadata::from(&*set.metadata),
            ),
        }
    }

    /// The compiled form resolved; `None` for a missing flag.
    pub fn held(&self) -> Option<&Held> {
        match self {
            Self::Flag(held, _) => held.as_deref(),
            Self::Missing(..) => None,
        }
    }

    /// Resolves the target for an already validated context (a context
    /// that failed validation is passed as `context_error`).
    pub fn resolve<'a>(
        &'a self,
        context: &'a Value,
        context_error: Option<&flagmesh_engine::ResolutionError>,
        expected: ValueType,
    ) -> Outcome<'a> {
        match self {
            Self::Missing(code, message, metadata) => Outcome {
                resolution: Resolution::error(*code, message.clone(), *metadata),
                mod_revision: 0,
            },
            Self::Flag(_, revision) => match self.held() {
                Some(held) => {
                    resolve_compiled(&held.compiled, *revision, context, context_error, expected)
                }
                None => Outcome {
                    resolution: Resolution::error(
                        ErrorCode::General,
                        "the flag's compiled form is missing".to_owned(),
                        Metadata::empty(),
                    ),
                    mod_revision: *revision,
                },
            },
        }
    }
}

/// Resolves one flag from its compiled form.
fn resolve_compiled<'a>(
    compiled: &'a Compiled,
    mod_revision: u64,
    context: &'a Value,
    context_error: Option<&flagmesh_engine::ResolutionError>,
    expected: ValueType,
) -> Outcome<'a> {
    let resolution = match (compiled, context_error) {
        (Err(e @ Uncompiled::Definition(_)), _) => {
            Resolution::error(ErrorCode::ParseError, e.to_string(), Metadata::empty())
        }
        (Err(e @ Uncompiled::Store(_)), _) => {
            Resolution::error(ErrorCode::General, e.to_string(), Metadata::empty())
        }
        (Ok(c), Some(err)) => Resolution::error(err.code, err.message.clone(), c.metadata()),
        (Ok(c), None) => c.resolve_typed(context, expected),
    };
    Outcome {
        resolution,
        mod_revision,
    }
}

/// The protobuf answer for an outcome: the resolution and the flag's mod
/// revision (the node fills in its own revision, id and staleness).
pub fn evaluate_response(key: &str, o: &Outcome<'_>) -> pb::EvaluateResponse {
    let r = &o.resolution;
    pb::EvaluateResponse {
        flag_key: key.to_owned(),
        value: r.value.map(json_to_value),
        variant: r.variant.unwrap_or_default().to_owned(),
        reason: reason(r.reason) as i32,
        error_code: r
            .error
            .as_ref()
            .map(|e| error_code(e.code) as i32)
            .unwrap_or(0),
        error_message: r
            .error
            .as_ref()
            .map(|e| e.message.to_string())
            .unwrap_or_default(),
        metadata: (!r.metadata.is_empty()).then(|| metadata_struct(r.metadata)),
        mod_revision: o.mod_revision,
        ..Default::default()
    }
}

/// Writes into `buf` the encoding of [`evaluate_response`] for `o`, with
/// the node's `revision`, `pop_id` and `stale` filled in: the same bytes
/// prost writes for that message, without building it.
pub fn write_evaluate_response(
    buf: &mut Vec<u8>,
    key: &str,
    o: &Outcome<'_>,
    revision: u64,
    pop_id: &str,
    stale: bool,
) {
    use flagmesh_proto::wire;
    let r = &o.resolution;
    wire::bytes(1, key.as_bytes(), buf);
    if let Some(v) = r.value {
        wire::message(2, &json_to_value(v), buf);
    }
    wire::bytes(3, r.variant.unwrap_or_default().as_bytes(), buf);
    // enums are int32 on the wire: prost writes them sign-extended
    wire::varint(4, i64::from(reason(r.reason) as i32) as u64, buf);
    if let Some(e) = &r.error {
        wire::varint(5, i64::from(error_code(e.code) as i32) as u64, buf);
        wire::bytes(6, e.message.as_bytes(), buf);
    }
    if !r.metadata.is_empty() {
        wire::json_struct(7, r.metadata.iter().map(|(k, v)| (k, struct_value(v))), buf);
    }
    wire::varint(8, o.mod_revision, buf);
    wire::varint(9, revision, buf);
    wire::bytes(10, pop_id.as_bytes(), buf);
    wire::boolean(11, stale, buf);
}

/// Metadata as a protobuf `Struct`.
pub fn metadata_struct(m: Metadata<'_>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.to_owned(), struct_value(v).to_value()))
            .collect(),
    }
}

/// A metadata value as the wire writer takes it.
fn struct_value(v: MetaValue<'_>) -> flagmesh_proto::wire::StructValue<'_> {
    use flagmesh_proto::wire::StructValue;
    match v {
        MetaValue::Json(v) => StructValue::Json(v),
        MetaValue::Str(s) => StructValue::Str(s),
        MetaValue::Number(n) => StructValue::Number(n.as_f64().unwrap_or(0.0)),
        MetaValue::Bool(b) => StructValue::Bool(b),
        MetaValue::Other(v) => StructValue::Owned(v),
    }
}

fn reason(r: Reason) -> pb::Reason {
    match r {
        Reason::Static => pb::Reason::Static,
        Reason::TargetingMatch => pb::Reason::TargetingMatch,
        Reason::Default => pb::Reason::Default,
        Reason::Disabled => pb::Reason::Disabled,
        Reason::Error => pb::Reason::Error,
    }
}

fn error_code(c: ErrorCode) -> pb::ErrorCode {
    match c {
        ErrorCode::FlagNotFound => pb::ErrorCode::FlagNotFound,
        ErrorCode::ParseError => pb::ErrorCode::ParseError,
        ErrorCode::TypeMismatch => pb::ErrorCode::TypeMismatch,
        ErrorCode::TargetingKeyMissing => pb::ErrorCode::TargetingKeyMissing,
        ErrorCode::InvalidContext => pb::ErrorCode::InvalidContext,
        ErrorCode::General => pb::ErrorCode::General,
    }
}

/// Keeps a compiled state current: swaps in the new state after every
/// applied snapshot or delta and announces the new revision.
pub struct StateSwap {
    /// The current state.
    pub state: Arc<arc_swap::ArcSwap<PopState>>,
    /// Announces each new revision.
    pub changes: tokio::sync::watch::Sender<u64>,
}

impl crate::subscriber::ReplicaObserver for StateSwap {
    fn applied(&self, applied: &crate::replica::Applied) {
        let next = match applied {
            crate::replica::Applied::Snapshot(s) => {
                PopState::from_snapshot_in(s, self.state.load().tier.clone())
            }
            crate::replica::Applied::Delta(d) => self.state.load().apply(d),
            _ => return,
        };
        let revision = next.revision;
        self.state.store(Arc::new(next));
        self.changes.send_replace(revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flagmesh_proto::v1::{FlagRef, FlagSet};

    fn flag(set: &str, key: &str, default: &str) -> Flag {
        Flag {
            flag_set: set.into(),
            key: key.into(),
            definition_json: format!(
                r#"{{"state":"ENABLED","variants":{{"a":"A","b":"B"}},"defaultVariant":"{default}"}}"#
            )
            .into_bytes(),
            mod_revision: 1,
            create_revision: 1,
        }
    }

    /// A set's flags are found by the key each flag holds; a flag with a
    /// key already there takes its place.
    #[test]
    fn a_flag_map_finds_replaces_and_removes_by_key() {
        let meta = Arc::new(Map::new());
        let pop = |key: &str, default: &str| {
            Arc::new(PopFlag::new(flag("s", key, default), meta.clone()))
        };
        let mut m: FlagMap = [pop("a", "a"), pop("b", "a")].into_iter().collect();
        assert_eq!(
            (m.len(), m.contains_key("a"), m.contains_key("c")),
            (2, true, false)
        );
        let newer = pop("a", "b");
        m.insert(newer.clone());
        assert_eq!(m.len(), 2);
        assert!(Arc::ptr_eq(m.get("a").expect("a"), &newer));
        let mut keys: Vec<&str> = m.keys().map(|k| &**k).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["a", "b"]);
        assert!(m.iter().all(|(k, f)| **k == *f.key()));
        assert!(m.remove("b").is_some());
        assert!(m.remove("b").is_none());
        assert_eq!((m.len(), m.get("b").is_none()), (1, true));
    }

    #[test]
    fn a_sets_flags_are_listed_by_key_and_a_delta_lists_anew() {
        let keys = |s: &SetState| -> Vec<String> {
            s.sorted().iter().map(|f| f.key().to_owned()).collect()
        };
        let s = PopState::from_snapshot(&SourceSnapshot {
            history_id: "h".into(),
            revision: 1,
            digest: 0,
            flags: vec![
                flag("x", "c", "a"),
                flag("x", "a", "a"),
                flag("x", "b", "a"),
            ],
            flag_sets: vec![],
        });
        assert_eq!(keys(&s.sets["x"]), ["a", "b", "c"]);
        let next = s.apply(&Delta {
            history_id: "h".into(),
            from_revision: 1,
            to_revision: 2,
            upserts: vec![flag("x", "aa", "a")],
            deletes: vec![FlagRef {
                flag_set: "x".into(),
                key: "b".into(),
            }],
            ..Default::default()
        });
        assert_eq!(keys(&next.sets["x"]), ["a", "aa", "c"]);
        // the earlier state's listing is its own
        assert_eq!(keys(&s.sets["x"]), ["a", "b", "c"]);
    }

    /// The answer written field by field decodes as the message
    /// `evaluate_response` builds, for every kind of outcome: values of
    /// each type, targeting, disabled, no default variant, errors, a
    /// targeting rule that does not compile, metadata of the set and the
    /// flag, a missing flag; twice, the second from the compiled forms the
    /// first kept.
    #[test]
    fn a_written_answer_decodes_as_the_built_one() {
        let def = |set: &str, key: &str, json: serde_json::Value| Flag {
            flag_set: set.into(),
            key: key.into(),
            definition_json: json.to_string().into_bytes(),
            mod_revision: 3,
            create_revision: 2,
        };
        let flags = vec![
            def(
                "s",
                "bool",
                serde_json::json!({"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
                "targeting":{"if":[{"ends_with":[{"var":"email"},"@example.com"]},"on"]},"metadata":{"owner":"web","n":2}}),
            ),
            def(
                "s",
                "string",
                serde_json::json!({"state":"ENABLED","variants":{"a":"A é\"","b":""},"defaultVariant":"a"}),
            ),
            def(
                "s",
                "number",
                serde_json::json!({"state":"ENABLED","variants":{"x":1.5,"y":-3},"defaultVariant":"y"}),
            ),
            def(
                "s",
                "object",
                serde_json::json!({"state":"ENABLED","variants":{"o":{"k":[1,null,{"z":true}]}},"defaultVariant":"o"}),
            ),
            def(
                "s",
                "disabled",
                serde_json::json!({"state":"DISABLED","variants":{"a":1},"defaultVariant":"a"}),
            ),
            def(
                "s",
                "no-default",
                serde_json::json!({"state":"ENABLED","variants":{"a":1}}),
            ),
            def(
                "s",
                "missing-variant",
                serde_json::json!({"state":"ENABLED","variants":{"a":1},"defaultVariant":"a",
                "targeting":{"if":[true,"nope"]}}),
            ),
            def(
                "s",
                "bad-rule",
                serde_json::json!({"state":"ENABLED","variants":{"a":1},"defaultVariant":"a",
                "targeting":{"no-such-operator":[1]}}),
            ),
            def("s", "undecodable", serde_json::json!("not a flag")),
        ];
        let state = PopState::from_snapshot(&SourceSnapshot {
            history_id: "h".into(),
            revision: 9,
            digest: 0,
            flags,
            flag_sets: vec![FlagSet {
                id: "s".into(),
                metadata: Some(flagmesh_proto::convert::map_to_struct(
                    serde_json::json!({"team":"core","owner":"set"})
                        .as_object()
                        .expect("object"),
                )),
                ..Default::default()
            }],
        });
        let contexts = [
            serde_json::json!({"targetingKey":"u1","email":"a@example.com"}),
            serde_json::json!({"email":"b@mail.test"}),
            serde_json::json!([1]),
        ];
        for round in 0..2 {
            for ctx in &contexts {
                let keys = [
                    "bool",
                    "string",
                    "number",
                    "object",
                    "disabled",
                    "no-default",
                    "missing-variant",
                    "bad-rule",
                    "undecodable",
                    "not-there",
                ];
                for key in keys {
                    let target = Target::lookup(&state, "s", key);
                    for stale in [false, true] {
                        let o = target.resolve(ctx, None, ValueType::Any);
                        let built = pb::EvaluateResponse {
                            revision: state.revision,
                            pop_id: "pop-é".into(),
                            stale,
                            ..evaluate_response(key, &o)
                        };
                        let mut buf = Vec::new();
                        write_evaluate_response(&mut buf, key, &o, state.revision, "pop-é", stale);
                        let decoded =
                            <pb::EvaluateResponse as prost::Message>::decode(buf.as_slice())
                                .expect("decodes");
                        assert_eq!(decoded, built, "round {round}, {key}, {ctx}");
                        assert_eq!(
                            buf,
                            prost::Message::encode_to_vec(&built),
                            "{key}: the same bytes"
                        );
                    }
                }
            }
        }
    }

    /// A set's metadata is held once: the set and its flags' shared part
    /// point at the same map, from a snapshot and after a delta changes it.
    #[test]
    fn a_set_and_its_flags_hold_one_copy_of_its_metadata() {
        let set = |team: &str| FlagSet {
            id: "x".into(),
            metadata: Some(flagmesh_proto::convert::map_to_struct(
                serde_json::json!({ "team": team })
                    .as_object()
                    .expect("object"),
            )),
            ..Default::default()
        };
        let one_copy = |s: &PopState| {
            let x = &s.sets["x"];
            assert!(!x.flags.is_empty());
            x.flags
                .values()
                .all(|f| Arc::ptr_eq(&x.metadata, f.set.metadata.map()))
        };
        let s = PopState::from_snapshot(&SourceSnapshot {
            history_id: "h".into(),
            revision: 1,
            digest: 0,
            flags: vec![flag("x", "f", "a"), flag("x", "g", "a")],
            flag_sets: vec![set("core")],
        });
        assert_eq!(s.sets["x"].metadata["team"], "core");
        assert!(one_copy(&s));
        let next = s.apply(&Delta {
            history_id: "h".into(),
            from_revision: 1,
            to_revision: 2,
            flag_set_upserts: vec![set("web")],
            upserts: vec![flag("x", "h", "a")],
            ..Default::default()
        });
        assert_eq!(next.sets["x"].metadata["team"], "web");
        assert!(one_copy(&next));
    }

    #[test]
    fn deltas_rebuild_only_touched_sets() {
        let s = PopState::from_snapshot(&SourceSnapshot {
            history_id: "h".into(),
            revision: 1,
            digest: 0,
            flags: vec![flag("x", "f", "a"), flag("y", "g", "a")],
            flag_sets: vec![],
        });
        let next = s.apply(&Delta {
            history_id: "h".into(),
            from_revision: 1,
            to_revision: 2,
            upserts: vec![flag("x", "f", "b")],
            ..Default::default()
        });
        assert_eq!(next.revision, 2);
        assert!(
            Arc::ptr_eq(&s.sets["y"], &next.sets["y"]),
            "an untouched set is shared"
        );
        let f = next.sets["x"].flags.get("f").expect("f");
        let ctx = serde_json::json!({});
        let compiled = f.compiled();
        let r = compiled
            .as_deref()
            .expect("compiled")
            .as_ref()
            .map(|c| c.resolve(&ctx).string_value().map(str::to_owned));
        assert_eq!(r, Ok(Some("B".to_owned())));
        let last = next.apply(&Delta {
            history_id: "h".into(),
            from_revision: 2,
            to_revision: 3,
            deletes: vec![FlagRef {
                flag_set: "x".into(),
                key: "f".into(),
            }],
            ..Default::default()
        });
        assert!(last.sets["x"].flags.is_empty());
        assert_eq!(last.definitions().map(|d| d.len()), Ok(1));
    }
}
