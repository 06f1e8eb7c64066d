//! The bodies of the fuzz targets (`fuzz/`, run by `make fuzz` under
//! libFuzzer), kept here so that `make test` runs the same code over the
//! seed corpus and every saved crash (`fuzz/regressions/`).
//!
//! Each function takes arbitrary bytes, must never panic, and checks the
//! properties that must hold whatever the input.

use std::sync::OnceLock;

use flagmesh_engine::{CompiledFlagSet, FlagDocument, Strictness, ValueType, validate_context};
use flagmesh_mesh::compiled::PopState;
use flagmesh_mesh::replica::{Applied, ReplicaStore};
use flagmesh_proto::v1::SyncEvent;
use prost::Message as _;
use serde_json::{Value, json};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (as in `fuzz/fuzz_targets/` and the corpus folders).
pub const TARGETS: &[(&str, Target)] = &[
    ("document", document),
    ("evaluate", evaluate),
    ("sync_events", sync_events),
    ("ofrep_body", ofrep_body),
];

const TYPES: [ValueType; 6] = [
    ValueType::Any,
    ValueType::Bool,
    ValueType::String,
    ValueType::Int,
    ValueType::Float,
    ValueType::Object,
];

fn resolve_all(set: &CompiledFlagSet, context: &Value) {
    for flag in set.iter() {
        let r = flag.resolve(context);
        std::hint::black_box(&r);
        for t in TYPES {
            std::hint::black_box(flag.resolve_typed(context, t));
        }
    }
}

/// Flag documents: parsing, validation and compilation (strict and
/// lenient), then resolving every flag. A document accepted once is
/// accepted again from its own canonical JSON.
pub fn document(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let context =
        json!({"targetingKey": "user-1", "email": "a@example.com", "age": 42, "version": "1.2.3"});
    for strictness in [Strictness::Strict, Strictness::Lenient] {
        let Ok(doc) = FlagDocument::parse(text, strictness) else {
            continue;
        };
        let set = CompiledFlagSet::from_document(&doc);
        resolve_all(&set, &context);
        let again = FlagDocument::from_json(&doc.to_json(), strictness);
        assert!(
            again.is_ok(),
            "an accepted document is refused in canonical form: {again:?}"
        );
    }
}

/// The flags every evaluation input runs against: each kind of targeting.
fn flags() -> &'static CompiledFlagSet {
    static SET: OnceLock<CompiledFlagSet> = OnceLock::new();
    SET.get_or_init(|| {
        let text = include_str!("../../examples/flags/demo.json");
        let mut set = FlagDocument::parse(text, Strictness::Strict)
            .map(|d| CompiledFlagSet::from_document(&d))
            .unwrap_or_default();
        let extra = r#"{"flags":{
          "sem": {"state":"ENABLED","variants":{"a":1,"b":2},"defaultVariant":"a",
            "targeting":{"if":[{"sem_ver":[{"var":"version"},">=","1.2.0"]},"b","a"]}},
          "frac": {"state":"ENABLED","variants":{"x":"x","y":"y","z":"z"},"defaultVariant":"x",
            "targeting":{"fractional":[{"cat":[{"var":"$flagd.flagKey"},{"var":"email"}]},["x",50],["y",30],["z",20]]}},
          "math": {"state":"ENABLED","variants":{"lo":0.5,"hi":1.5},"defaultVariant":"lo",
            "targeting":{"if":[{"and":[{">":[{"var":"age"},18]},{"<=":[{"+":[{"var":"age"},{"var":"n"}]},100]},{"!":{"var":"blocked"}}]},"hi",
              {"or":[{"starts_with":[{"var":"email"},"admin@"]},{"in":["beta",{"var":"groups"}]}]},"hi",null]}},
          "obj": {"state":"ENABLED","variants":{"o":{"k":[1,2]},"p":{}},"defaultVariant":"o",
            "targeting":{"if":[{"==":[{"var":"user.address.city"},{"var":["fallback","Berlin"]}]},"p","o"]}},
          "off": {"state":"DISABLED","variants":{"t":true},"defaultVariant":"t"}
        }}"#;
        if let Ok(doc) = FlagDocument::parse(extra, Strictness::Strict) {
            for f in CompiledFlagSet::from_document(&doc).iter() {
                set.insert(f.clone());
            }
        }
        assert!(set.len() >= 8, "the fuzz flags failed to compile");
        set
    })
}

/// Evaluation with arbitrary contexts (JSON): contexts over the limits are
/// refused by `validate_context`; every other one resolves every flag.
pub fn evaluate(data: &[u8]) {
    let Ok(context) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if validate_context(&context).is_err() {
        return;
    }
    resolve_all(flags(), &context);
}

/// OFREP request bodies: either a clear error or a context that then
/// resolves every flag.
pub fn ofrep_body(data: &[u8]) {
    match flagmesh_pop::ofrep::request_context(data) {
        Ok(context) => resolve_all(flags(), &context),
        Err(message) => assert!(!message.is_empty(), "an empty error message"),
    }
}

/// A stream of arbitrary `SyncEvent`s applied to a fresh replica store:
/// input is a sequence of chunks, each a little-endian u16 length and that
/// many bytes of protobuf. Within one history the applied revision never
/// goes back, and the store's own state always has the digest it reports.
pub fn sync_events(data: &[u8]) {
    let Ok(store) = ReplicaStore::open_temporary() else {
        return;
    };
    let mut state: Option<PopState> = None;
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let chunk = &rest[2..(2 + n).min(rest.len())];
        rest = &rest[(2 + n).min(rest.len())..];
        let Ok(event) = SyncEvent::decode(chunk) else {
            continue;
        };
        let before = store.position();
        match store.apply(event) {
            Ok(Applied::Snapshot(s)) => state = Some(PopState::from_snapshot(&s)),
            Ok(Applied::Delta(d)) => state = state.map(|st| st.apply(&d)),
            Ok(_) | Err(_) => {}
        }
        let after = store.position();
        if after.history_id == before.history_id {
            assert!(
                after.revision >= before.revision,
                "revision went back from {} to {}",
                before.revision,
                after.revision
            );
        }
        if let Some(st) = &state {
            std::hint::black_box(st.revision);
        }
    }
    // what the store holds is what it says it holds
    if let Ok(loaded) = store.load() {
        let position = store.position();
        assert_eq!(loaded.revision, position.revision);
        assert_eq!(
            flagmesh_mesh::replica::digest_of(&loaded),
            position.digest,
            "the stored state does not have the digest the replica reports"
        );
    }
}
