//! What a typed evaluation returns: always a value (the caller's default
//! when nothing better is known) and why.

use serde_json::{Map, Value};

/// The outcome of a typed evaluation. `value` is always usable: it is the
/// caller's default whenever the flag could not be resolved (then `reason`
/// is `ERROR` and `error_code` says why) or the flag says so (`DISABLED`,
/// `DEFAULT` without a default variant).
#[derive(Debug, Clone, PartialEq)]
pub struct Details<T> {
    /// The value to use.
    pub value: T,
    /// The variant served, if a flag variant was.
    pub variant: Option<String>,
    /// `STATIC`, `TARGETING_MATCH`, `DEFAULT`, `DISABLED` or `ERROR`.
    pub reason: String,
    /// The error code when `reason` is `ERROR` (`FLAG_NOT_FOUND`,
    /// `TYPE_MISMATCH`, `GENERAL`, …).
    pub error_code: Option<String>,
    /// A human-readable error.
    pub error_message: Option<String>,
    /// Flag metadata.
    pub metadata: Map<String, Value>,
    /// The state revision that answered (0 when none did).
    pub revision: u64,
    /// The PoP that answered (empty in local mode or when none did).
    pub pop_id: String,
    /// Whether the answer may be stale.
    pub stale: bool,
}

impl<T> Details<T> {
    /// The caller's default, with an error.
    pub fn fallback(default: T, code: &str, message: impl Into<String>) -> Self {
        Self {
            value: default,
            variant: None,
            reason: "ERROR".into(),
            error_code: Some(code.into()),
            error_message: Some(message.into()),
            metadata: Map::new(),
            revision: 0,
            pop_id: String::new(),
            stale: true,
        }
    }

    /// Whether the value came from the flag (not the caller's default).
    pub fn from_flag(&self) -> bool {
        self.variant.is_some()
    }
}

/// Extracts a typed value from a JSON value.
pub trait FromJson: Sized {
    /// The engine's name for the type.
    const TYPE: flagmesh_engine::ValueType;
    /// The value, if of this type.
    fn from_json(v: &Value) -> Option<Self>;
}

impl FromJson for bool {
    const TYPE: flagmesh_engine::ValueType = flagmesh_engine::ValueType::Bool;
    fn from_json(v: &Value) -> Option<Self> {
        v.as_bool()
    }
}

impl FromJson for String {
    const TYPE: flagmesh_engine::ValueType = flagmesh_engine::ValueType::String;
    fn from_json(v: &Value) -> Option<Self> {
        v.as_str().map(str::to_owned)
    }
}

impl FromJson for i64 {
    const TYPE: flagmesh_engine::ValueType = flagmesh_engine::ValueType::Int;
    fn from_json(v: &Value) -> Option<Self> {
        v.as_i64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        })
    }
}

impl FromJson for f64 {
    const TYPE: flagmesh_engine::ValueType = flagmesh_engine::ValueType::Float;
    fn from_json(v: &Value) -> Option<Self> {
        v.as_f64()
    }
}

impl FromJson for Map<String, Value> {
    const TYPE: flagmesh_engine::ValueType = flagmesh_engine::ValueType::Object;
    fn from_json(v: &Value) -> Option<Self> {
        v.as_object().cloned()
    }
}

impl FromJson for Value {
    const TYPE: flagmesh_engine::ValueType = flagmesh_engine::ValueType::Any;
    fn from_json(v: &Value) -> Option<Self> {
        Some(v.clone())
    }
}
