//! The result of resolving a flag for a context: value, variant, reason,
//! error and metadata, with typed accessors. Values and metadata borrow from
//! the compiled flag, so a resolution allocates nothing on success.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use serde_json::{Map, Value};

use crate::error::ErrorCode;

/// Why a resolution produced its value (flagd's reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No targeting: the default variant.
    Static,
    /// Targeting selected a variant.
    TargetingMatch,
    /// Targeting selected nothing: the default variant, or the caller's default.
    Default,
    /// The flag is disabled: the caller's default.
    Disabled,
    /// The resolution failed: the caller's default.
    Error,
}

impl Reason {
    /// The reason as flagd and OpenFeature spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Static => "STATIC",
            Self::TargetingMatch => "TARGETING_MATCH",
            Self::Default => "DEFAULT",
            Self::Disabled => "DISABLED",
            Self::Error => "ERROR",
        }
    }
}

/// A failed resolution's code and explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolutionError {
    /// The error code.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: Cow<'static, str>,
}

/// The type of value a caller expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// Whatever the flag holds.
    Any,
    /// A boolean.
    Bool,
    /// A string.
    String,
    /// An integer (a number flag whose value is integral).
    Int,
    /// A number (integers widen).
    Float,
    /// A JSON object.
    Object,
}

impl ValueType {
    /// Whether `value` is of this type.
    pub fn matches(self, value: &Value) -> bool {
        match self {
            Self::Any => true,
            Self::Bool => value.is_boolean(),
            Self::String => value.is_string(),
            Self::Int => as_int(value).is_some(),
            Self::Float => value.is_number(),
            Self::Object => value.is_object(),
        }
    }
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        _ => None,
    }
}

pub(crate) static EMPTY_METADATA: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);

/// A resolution's metadata: the flag set's, with the flag's own entries
/// over it. A flag keeps its own entries in a small slice sorted by key,
/// not in a map of its own merged with the set's (a map costs about
/// 600 bytes per flag however few entries it holds).
#[derive(Debug, Clone, Copy)]
pub struct Metadata<'a> {
    set: &'a Map<String, Value>,
    own: &'a [(Arc<str>, Value)],
}

impl<'a> Metadata<'a> {
    /// The set's entries under `own` (sorted by key, each key once).
    pub fn new(set: &'a Map<String, Value>, own: &'a [(Arc<str>, Value)]) -> Self {
        Self { set, own }
    }

    /// No metadata.
    pub fn empty() -> Metadata<'static> {
        Metadata {
            set: &EMPTY_METADATA,
            own: &[],
        }
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.own.is_empty() && self.set.is_empty()
    }

    /// The flag's own entry for `key`, else the set's.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        match self.own.binary_search_by(|(k, _)| (**k).cmp(key)) {
            Ok(i) => Some(&self.own[i].1),
            Err(_) => self.set.get(key),
        }
    }

    /// Every entry once, in key order (the order of a JSON object and of a
    /// protobuf `Struct`'s map): the flag's own entry where both have a
    /// key. Merges the two sorted sequences; nothing is allocated.
    pub fn iter(&self) -> Entries<'a> {
        Entries {
            set: self.set.iter().peekable(),
            own: self.own.iter().peekable(),
        }
    }

    /// As a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect()
    }
}

/// The entries of a [`Metadata`], in key order.
#[derive(Clone)]
pub struct Entries<'a> {
    set: std::iter::Peekable<serde_json::map::Iter<'a>>,
    own: std::iter::Peekable<std::slice::Iter<'a, (Arc<str>, Value)>>,
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a str, &'a Value);

    fn next(&mut self) -> Option<Self::Item> {
        let from_set = match (self.set.peek(), self.own.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((s, _)), Some((o, _))) => match s.as_str().cmp(&**o) {
                std::cmp::Ordering::Less => true,
                std::cmp::Ordering::Equal => {
                    // the flag's own entry overrides the set's
                    self.set.next();
                    false
                }
                std::cmp::Ordering::Greater => false,
            },
        };
        if from_set {
            self.set.next().map(|(k, v)| (k.as_str(), v))
        } else {
            self.own.next().map(|(k, v)| (&**k, v))
        }
    }
}

impl<'a> From<&'a Map<String, Value>> for Metadata<'a> {
    fn from(set: &'a Map<String, Value>) -> Self {
        Self { set, own: &[] }
    }
}

impl PartialEq for Metadata<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.to_map() == other.to_map()
    }
}

impl serde::Serialize for Metadata<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// One flag's resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution<'a> {
    /// The value; `None` when the caller's default applies.
    pub value: Option<&'a Value>,
    /// The variant served; `None` when the caller's default applies.
    pub variant: Option<&'a str>,
    /// Why.
    pub reason: Reason,
    /// Set when `reason` is [`Reason::Error`].
    pub error: Option<ResolutionError>,
    /// Flag-set metadata merged under the flag's own metadata.
    pub metadata: Metadata<'a>,
}

impl<'a> Resolution<'a> {
    /// A failed resolution.
    pub fn error(
        code: ErrorCode,
        message: impl Into<Cow<'static, str>>,
        metadata: Metadata<'a>,
    ) -> Self {
        Self {
            value: None,
            variant: None,
            reason: Reason::Error,
            error: Some(ResolutionError {
                code,
                message: message.into(),
            }),
            metadata,
        }
    }

    /// The error code, if the resolution failed.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }

    /// Turns a value of another type than `expected` into `TYPE_MISMATCH`.
    pub fn expect_type(self, expected: ValueType) -> Self {
        match self.value {
            Some(v) if !expected.matches(v) => Self::error(
                ErrorCode::TypeMismatch,
                format!("flag value is not of the requested type {expected:?}"),
                self.metadata,
            ),
            _ => self,
        }
    }

    /// The value as a boolean.
    pub fn bool_value(&self) -> Option<bool> {
        self.value.and_then(Value::as_bool)
    }

    /// The value as a string.
    pub fn string_value(&self) -> Option<&'a str> {
        self.value.and_then(Value::as_str)
    }

    /// The value as an integer (only when it is integral).
    pub fn int_value(&self) -> Option<i64> {
        self.value.and_then(as_int)
    }

    /// The value as a float.
    pub fn float_value(&self) -> Option<f64> {
        self.value.and_then(Value::as_f64)
    }

    /// The value as an object.
    pub fn object_value(&self) -> Option<&'a Map<String, Value>> {
        self.value.and_then(Value::as_object)
    }
}

#[cfg(test)]
mod metadata_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_flags_own_entries_override_its_sets_and_each_key_appears_once() {
        let set = json!({"team": "web", "tier": 1, "region": "eu"});
        let set = set.as_object().cloned().unwrap_or_default();
        let own: Vec<(Arc<str>, Value)> =
            vec![("owner".into(), json!("ana")), ("tier".into(), json!(2))];
        let m = Metadata::new(&set, &own);
        assert_eq!(m.get("tier"), Some(&json!(2)));
        assert_eq!(m.get("team"), Some(&json!("web")));
        assert_eq!(m.get("nope"), None);
        let map = m.to_map();
        assert_eq!(
            Value::Object(map.clone()),
            json!({"team": "web", "tier": 2, "region": "eu", "owner": "ana"})
        );
        // in key order, the override once
        let keys: Vec<&str> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["owner", "region", "team", "tier"]);
        let own_only = Metadata::new(&EMPTY_METADATA, &own);
        assert_eq!(
            own_only.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["owner", "tier"]
        );
        // the set's last key sorts after every own one
        let late = json!({"zone": "b"});
        let late = late.as_object().cloned().unwrap_or_default();
        let keys: Vec<&str> = Metadata::new(&late, &own).iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["owner", "tier", "zone"]);
        // serialised as that same object
        let text = serde_json::to_string(&m).unwrap_or_default();
        assert_eq!(
            serde_json::from_str::<Value>(&text).ok(),
            Some(Value::Object(map))
        );
        assert!(Metadata::empty().is_empty());
        assert!(!Metadata::from(&set).is_empty());
        assert_eq!(Metadata::from(&set).to_map(), set);
    }
}
