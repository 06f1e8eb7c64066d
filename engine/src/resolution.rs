//! The result of resolving a flag for a context: value, variant, reason,
//! error and metadata, with typed accessors. Values and metadata borrow from
//! the compiled flag, so a resolution allocates nothing on success.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::error::ErrorCode;
pub use crate::metadata::Metadata;

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
