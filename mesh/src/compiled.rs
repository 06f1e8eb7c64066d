//! A replica's compiled in-memory state (what PoPs and SDKs in local mode
//! evaluate from), held in an immutable snapshot swapped atomically on each
//! apply. Each flag is compiled once, the first time it is evaluated (so a
//! restarted node serves from its store at once, and flags nobody asks for
//! cost only their stored bytes).
//! A delta rebuilds only the flag sets it touches; every other set (and
//! every unchanged flag) is shared with the previous snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use crate::SourceSnapshot;
use flagmesh_engine::{
    CompiledFlag, ErrorCode, FlagDefinition, Metadata, Reason, Resolution, Strictness, ValueType,
};
use flagmesh_proto::convert::{json_to_value, struct_to_map};
use flagmesh_proto::v1 as pb;
use flagmesh_proto::v1::{Delta, Flag, FlagSet};
use serde_json::{Map, Value};
use xxhash_rust::xxh3::Xxh3Builder;

/// One flag: as stored, and compiled on first use.
#[derive(Debug)]
pub struct PopFlag {
    /// The flag as stored and replicated.
    pub stored: Flag,
    set_metadata: Arc<Map<String, Value>>,
    compiled: std::sync::OnceLock<Result<CompiledFlag, String>>,
}

impl PopFlag {
    /// A flag of a set with `set_metadata`, not compiled yet.
    pub fn new(stored: Flag, set_metadata: Arc<Map<String, Value>>) -> Self {
        Self {
            stored,
            set_metadata,
            compiled: std::sync::OnceLock::new(),
        }
    }

    /// The compiled flag (compiled now if it is the first use); `Err` holds
    /// why the definition does not compile (it then resolves with
    /// `PARSE_ERROR`).
    pub fn compiled(&self) -> &Result<CompiledFlag, String> {
        self.compiled
            .get_or_init(|| compile(&self.stored, &self.set_metadata))
    }
}

/// One flag set.
#[derive(Debug, Default)]
pub struct SetState {
    /// The set's metadata.
    pub metadata: Arc<Map<String, Value>>,
    /// Its flags by key.
    pub flags: HashMap<Box<str>, Arc<PopFlag>, Xxh3Builder>,
    /// Its flags ordered by key, made on first use from `flags` as they are
    /// then (a set is not changed once shared): answers listing every
    /// flag, such as bulk evaluations, need not sort on each request.
    sorted: std::sync::OnceLock<Box<[Arc<PopFlag>]>>,
}

impl SetState {
    /// A set of `flags` with `metadata`.
    pub fn new(
        metadata: Arc<Map<String, Value>>,
        flags: HashMap<Box<str>, Arc<PopFlag>, Xxh3Builder>,
    ) -> Self {
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
            flags.sort_by(|a, b| a.stored.key.cmp(&b.stored.key));
            flags.into_boxed_slice()
        })
    }
}

/// A whole state at one revision.
#[derive(Debug, Default)]
pub struct PopState {
    /// The history.
    pub history_id: String,
    /// The revision (0: no state).
    pub revision: u64,
    /// The flag sets by id.
    pub sets: HashMap<String, Arc<SetState>>,
}

/// Flags compiled by this process so far.
static COMPILATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many flags this process has compiled (each on its first use after
/// it changed): a sign of activity for releasing memory when quiet.
pub fn compilations() -> u64 {
    COMPILATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

fn compile(flag: &Flag, metadata: &Arc<Map<String, Value>>) -> Result<CompiledFlag, String> {
    COMPILATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let compiled = serde_json::from_slice::<Value>(&flag.definition_json)
        .map_err(|e| format!("definition is not JSON: {e}"))
        .and_then(|v| {
            FlagDefinition::from_json(&flag.key, &v, &Map::new(), Strictness::Lenient)
                .map_err(|e| e.to_string())
        })
        .map(|d| CompiledFlag::with_shared_metadata(&flag.key, d, metadata));
    if let Err(e) = &compiled {
        tracing::warn!(flag_set = %flag.flag_set, key = %flag.key, error = %e, "flag does not compile");
    }
    compiled
}

fn metadata_of(set: &FlagSet) -> Arc<Map<String, Value>> {
    Arc::new(set.metadata.as_ref().map(struct_to_map).unwrap_or_default())
}

impl PopState {
    /// The state of a snapshot.
    pub fn from_snapshot(s: &SourceSnapshot) -> Self {
        let mut sets: HashMap<String, SetState> = s
            .flag_sets
            .iter()
            .map(|fs| {
                (
                    fs.id.clone(),
                    SetState::new(metadata_of(fs), HashMap::default()),
                )
            })
            .collect();
        for f in &s.flags {
            let set = sets.entry(f.flag_set.clone()).or_default();
            let flag = PopFlag::new(f.clone(), set.metadata.clone());
            set.flags.insert(f.key.as_str().into(), Arc::new(flag));
        }
        Self {
            history_id: s.history_id.clone(),
            revision: s.revision,
            sets: sets.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        }
    }

    /// The state after a delta; untouched sets are shared.
    pub fn apply(&self, d: &Delta) -> Self {
        let mut sets = self.sets.clone();
        let mut touched: HashMap<String, SetState> = HashMap::new();
        let take = |id: &str,
                    sets: &HashMap<String, Arc<SetState>>,
                    touched: &mut HashMap<String, SetState>| {
            if !touched.contains_key(id) {
                let copy = sets
                    .get(id)
                    .map(|s| SetState::new(s.metadata.clone(), s.flags.clone()))
                    .unwrap_or_default();
                touched.insert(id.to_owned(), copy);
            }
        };
        for id in &d.flag_set_deletes {
            sets.remove(id);
        }
        for fs in &d.flag_set_upserts {
            take(&fs.id, &sets, &mut touched);
            if let Some(set) = touched.get_mut(&fs.id) {
                set.metadata = metadata_of(fs);
                // merged metadata changed: recompile the set's flags
                let flags: Vec<Flag> = set.flags.values().map(|f| f.stored.clone()).collect();
                for f in flags {
                    let flag = PopFlag::new(f.clone(), set.metadata.clone());
                    set.flags.insert(f.key.as_str().into(), Arc::new(flag));
                }
            }
        }
        for r in &d.deletes {
            take(&r.flag_set, &sets, &mut touched);
            if let Some(set) = touched.get_mut(&r.flag_set) {
                set.flags.remove(r.key.as_str());
            }
        }
        for f in &d.upserts {
            take(&f.flag_set, &sets, &mut touched);
            if let Some(set) = touched.get_mut(&f.flag_set) {
                let flag = PopFlag::new(f.clone(), set.metadata.clone());
                set.flags.insert(f.key.as_str().into(), Arc::new(flag));
            }
        }
        for (id, set) in touched {
            if d.flag_set_deletes.contains(&id) && set.flags.is_empty() {
                continue;
            }
            sets.insert(id, Arc::new(set));
        }
        Self {
            history_id: d.history_id.clone(),
            revision: d.to_revision,
            sets,
        }
    }

    /// Every flag, for checks: (set, key) -> definition bytes.
    pub fn definitions(&self) -> std::collections::BTreeMap<(String, String), Vec<u8>> {
        self.sets
            .iter()
            .flat_map(|(id, s)| {
                s.flags.iter().map(move |(k, f)| {
                    (
                        (id.clone(), k.to_string()),
                        f.stored.definition_json.clone(),
                    )
                })
            })
            .collect()
    }
}

/// The outcome of one evaluation, before it is encoded.
pub struct Outcome<'a> {
    /// The resolution.
    pub resolution: Resolution<'a>,
    /// The flag's mod revision (0 when not found).
    pub mod_revision: u64,
}

/// Resolves `key` of `set` for an already validated context.
pub fn resolve<'a>(
    state: &'a PopState,
    set_name: &str,
    key: &str,
    context: &'a Value,
    context_error: Option<&flagmesh_engine::ResolutionError>,
    expected: ValueType,
) -> Outcome<'a> {
    let failed = |code, message: String, md: Metadata<'a>| Outcome {
        resolution: Resolution::error(code, message, md),
        mod_revision: 0,
    };
    if state.revision == 0 {
        return failed(
            ErrorCode::General,
            "this PoP has no flag state yet (it has never synced); use your default".into(),
            Metadata::empty(),
        );
    }
    let Some(set) = state.sets.get(set_name) else {
        return failed(
            ErrorCode::FlagNotFound,
            format!("flag set \"{set_name}\" not found"),
            Metadata::empty(),
        );
    };
    let Some(flag) = set.flags.get(key) else {
        return failed(
            ErrorCode::FlagNotFound,
            format!("flag \"{key}\" not found in flag set \"{set_name}\""),
            Metadata::from(&*set.metadata),
        );
    };
    resolve_flag(flag, context, context_error, expected)
}

/// Resolves one flag.
pub fn resolve_flag<'a>(
    flag: &'a PopFlag,
    context: &'a Value,
    context_error: Option<&flagmesh_engine::ResolutionError>,
    expected: ValueType,
) -> Outcome<'a> {
    let mod_revision = flag.stored.mod_revision;
    let resolution = match (flag.compiled(), context_error) {
        (Err(e), _) => Resolution::error(
            ErrorCode::ParseError,
            format!("flag does not compile: {e}"),
            Metadata::empty(),
        ),
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

/// Metadata as a protobuf `Struct`.
pub fn metadata_struct(m: Metadata<'_>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.to_owned(), json_to_value(v)))
            .collect(),
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
            crate::replica::Applied::Snapshot(s) => PopState::from_snapshot(s),
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
    use flagmesh_proto::v1::FlagRef;

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

    #[test]
    fn a_sets_flags_are_listed_by_key_and_a_delta_lists_anew() {
        let keys = |s: &SetState| -> Vec<String> {
            s.sorted().iter().map(|f| f.stored.key.clone()).collect()
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
        let f = &next.sets["x"].flags["f"];
        let ctx = serde_json::json!({});
        let r = f
            .compiled()
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
        assert_eq!(last.definitions().len(), 1);
    }
}
