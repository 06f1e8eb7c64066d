//! The flag model: a flagd flag definition, checked for shape (state,
//! variants of one type, default variant, metadata, targeting as a rule) and
//! kept in a canonical stored form with `$ref`s to shared evaluators inlined.

use serde_json::{Map, Value};

use crate::error::{ValidationError, ValidationErrors};
use crate::rule::{self, Strictness};

/// Whether a flag is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagState {
    /// Served normally.
    Enabled,
    /// Resolves with reason `DISABLED` and the caller's default.
    Disabled,
}

/// The type of a flag's variant values (all variants share it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlagType {
    /// `true` / `false`.
    Bool,
    /// Strings.
    String,
    /// Numbers (integers and floats).
    Number,
    /// JSON objects.
    Object,
}

impl FlagType {
    fn of(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(_) => Some(Self::Bool),
            Value::String(_) => Some(Self::String),
            Value::Number(_) => Some(Self::Number),
            Value::Object(_) => Some(Self::Object),
            Value::Null | Value::Array(_) => None,
        }
    }

    /// The type's name as the flagd schema spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "boolean",
            Self::String => "string",
            Self::Number => "number",
            Self::Object => "object",
        }
    }
}

/// A flag definition whose shape has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagDefinition {
    /// Enabled or disabled.
    pub state: FlagState,
    /// Variant name to value; never empty, all values of [`Self::flag_type`].
    pub variants: Map<String, Value>,
    /// The variant served when targeting selects nothing; `None` means the
    /// caller's default.
    pub default_variant: Option<String>,
    /// The targeting rule (JsonLogic with flagd's operators), `$ref`s
    /// inlined; `None` when absent or `{}`.
    pub targeting: Option<Value>,
    /// The flag's own metadata (string, number and boolean values).
    pub metadata: Map<String, Value>,
    flag_type: FlagType,
}

impl FlagDefinition {
    /// Checks a definition's shape and inlines `$ref`s to `evaluators`. In
    /// [`Strictness::Strict`] the targeting is also compiled, so a definition
    /// that is accepted is one that evaluates. Every problem found is
    /// returned, each naming the flag and the field.
    pub fn from_json(
        key: &str,
        raw: &Value,
        evaluators: &Map<String, Value>,
        strictness: Strictness,
    ) -> Result<Self, ValidationErrors> {
        let mut errors = Vec::new();
        let Some(obj) = raw.as_object() else {
            return Err(ValidationError::in_flag(key, "", "a flag must be a JSON object").into());
        };

        let state = match obj.get("state") {
            Some(Value::String(s)) if s == "ENABLED" => Some(FlagState::Enabled),
            Some(Value::String(s)) if s == "DISABLED" => Some(FlagState::Disabled),
            Some(other) => {
                errors.push(ValidationError::in_flag(
                    key,
                    "/state",
                    format!("must be \"ENABLED\" or \"DISABLED\", found {other}"),
                ));
                None
            }
            None => {
                errors.push(ValidationError::in_flag(key, "/state", "is required"));
                None
            }
        };

        let (variants, flag_type) = check_variants(key, obj.get("variants"), &mut errors);

        let default_variant = match obj.get("defaultVariant") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => {
                if variants.as_ref().is_some_and(|v| !v.contains_key(name)) {
                    errors.push(ValidationError::in_flag(
                        key,
                        "/defaultVariant",
                        format!("names \"{name}\", which is not one of the variants"),
                    ));
                }
                Some(name.clone())
            }
            Some(other) => {
                errors.push(ValidationError::in_flag(
                    key,
                    "/defaultVariant",
                    format!("must be a string or null, found {other}"),
                ));
                None
            }
        };

        let metadata = match obj.get("metadata") {
            None => Map::new(),
            Some(m) => match check_metadata(m) {
                Ok(m) => m,
                Err((path, msg)) => {
                    errors.push(ValidationError::in_flag(
                        key,
                        format!("/metadata{path}"),
                        msg,
                    ));
                    Map::new()
                }
            },
        };

        let targeting = match obj.get("targeting") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) if o.is_empty() => None,
            Some(rule @ Value::Object(_)) => {
                match rule::inline_refs(rule, evaluators, strictness) {
                    Ok(inlined) => {
                        let checked = match strictness {
                            Strictness::Strict => rule::compile(&inlined, strictness).map(drop),
                            Strictness::Lenient => rule::check_depth(&inlined),
                        };
                        if let Err(e) = checked {
                            errors.push(ValidationError::in_flag(
                                key,
                                format!("/targeting{}", e.path.trim_end_matches('/')),
                                e.message,
                            ));
                        }
                        Some(inlined)
                    }
                    Err(e) => {
                        errors.push(ValidationError::in_flag(
                            key,
                            format!("/targeting{}", e.path.trim_end_matches('/')),
                            e.message,
                        ));
                        None
                    }
                }
            }
            Some(other) => {
                errors.push(ValidationError::in_flag(
                    key,
                    "/targeting",
                    format!("must be a JSON object (a rule), found {}", kind_name(other)),
                ));
                None
            }
        };

        match (state, variants, flag_type) {
            (Some(state), Some(variants), Some(flag_type)) if errors.is_empty() => Ok(Self {
                state,
                variants,
                default_variant,
                targeting,
                metadata,
                flag_type,
            }),
            _ => Err(ValidationErrors(errors)),
        }
    }

    /// [`FlagDefinition::from_json`] as a flagd evaluator loads the flag
    /// ([`Strictness::Lenient`]), with the problems the strict check finds
    /// on top as warnings (see [`crate::FlagDocument::parse_with_warnings`]).
    pub fn from_json_with_warnings(
        key: &str,
        raw: &Value,
        evaluators: &Map<String, Value>,
    ) -> Result<(Self, Vec<ValidationError>), ValidationErrors> {
        let def = Self::from_json(key, raw, evaluators, Strictness::Lenient)?;
        let warnings = Self::from_json(key, raw, evaluators, Strictness::Strict)
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        Ok((def, warnings))
    }

    /// The type shared by every variant value.
    pub fn flag_type(&self) -> FlagType {
        self.flag_type
    }

    /// The definition as a JSON value in flagd's shape.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        let state = match self.state {
            FlagState::Enabled => "ENABLED",
            FlagState::Disabled => "DISABLED",
        };
        obj.insert("state".into(), Value::String(state.into()));
        obj.insert("variants".into(), Value::Object(self.variants.clone()));
        if let Some(d) = &self.default_variant {
            obj.insert("defaultVariant".into(), Value::String(d.clone()));
        }
        if let Some(t) = &self.targeting {
            obj.insert("targeting".into(), t.clone());
        }
        if !self.metadata.is_empty() {
            obj.insert("metadata".into(), Value::Object(self.metadata.clone()));
        }
        Value::Object(obj)
    }

    /// The canonical stored bytes: compact JSON with object keys sorted, so
    /// equal definitions always give equal bytes (and equal hashes).
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // serde_json's map is ordered by key (no `preserve_order`), and
        // writing a `Value` to a Vec cannot fail.
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }
}

fn check_variants(
    key: &str,
    raw: Option<&Value>,
    errors: &mut Vec<ValidationError>,
) -> (Option<Map<String, Value>>, Option<FlagType>) {
    let variants = match raw {
        Some(Value::Object(v)) => v,
        Some(other) => {
            errors.push(ValidationError::in_flag(
                key,
                "/variants",
                format!(
                    "must be a JSON object of variant name to value, found {}",
                    kind_name(other)
                ),
            ));
            return (None, None);
        }
        None => {
            errors.push(ValidationError::in_flag(key, "/variants", "is required"));
            return (None, None);
        }
    };
    if variants.is_empty() {
        errors.push(ValidationError::in_flag(
            key,
            "/variants",
            "must hold at least one variant",
        ));
        return (None, None);
    }
    let mut flag_type: Option<FlagType> = None;
    let mut ok = true;
    for (name, value) in variants {
        let path = format!("/variants/{}", escape_pointer(name));
        if name.is_empty() {
            errors.push(ValidationError::in_flag(
                key,
                path.clone(),
                "variant names must not be empty",
            ));
            ok = false;
        }
        match (FlagType::of(value), flag_type) {
            (None, _) => {
                errors.push(ValidationError::in_flag(
                    key,
                    path,
                    format!(
                        "a variant must be a boolean, string, number or object, found {}",
                        kind_name(value)
                    ),
                ));
                ok = false;
            }
            (Some(t), None) => flag_type = Some(t),
            (Some(t), Some(expected)) if t != expected => {
                errors.push(ValidationError::in_flag(
                    key,
                    path,
                    format!(
                        "is a {} but the other variants are {}s: all variants of a flag share one type",
                        t.name(),
                        expected.name()
                    ),
                ));
                ok = false;
            }
            _ => {}
        }
    }
    if ok {
        (Some(variants.clone()), flag_type)
    } else {
        (None, None)
    }
}

/// Checks a metadata object: string, number and boolean values only. On
/// error returns the pointer below the metadata object and the message.
pub(crate) fn check_metadata(raw: &Value) -> Result<Map<String, Value>, (String, String)> {
    let Value::Object(m) = raw else {
        return Err((
            String::new(),
            format!("must be a JSON object, found {}", kind_name(raw)),
        ));
    };
    for (k, v) in m {
        if !matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
            return Err((
                format!("/{}", escape_pointer(k)),
                format!(
                    "metadata values must be strings, numbers or booleans, found {}",
                    kind_name(v)
                ),
            ));
        }
    }
    Ok(m.clone())
}

/// A JSON value's kind, for error messages.
pub(crate) fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Escapes one JSON pointer segment (RFC 6901: `~` as `~0`, `/` as `~1`).
pub fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(raw: Value) -> Result<FlagDefinition, ValidationErrors> {
        FlagDefinition::from_json("f", &raw, &Map::new(), Strictness::Strict)
    }

    #[test]
    fn accepts_a_minimal_flag() {
        let d = def(
            json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}),
        );
        assert!(matches!(d, Ok(ref d) if d.flag_type() == FlagType::Bool && d.targeting.is_none()));
    }

    #[test]
    fn names_flag_and_field_of_each_problem() {
        let Err(errs) =
            def(json!({"state": "ON", "variants": {"a": 1, "b": "x"}, "defaultVariant": 3}))
        else {
            panic!("accepted an invalid flag");
        };
        let text = errs.to_string();
        assert!(text.contains("flag \"f\": /state"), "{text}");
        assert!(text.contains("/variants/b"), "{text}");
        assert!(text.contains("/defaultVariant"), "{text}");
    }

    #[test]
    fn rejects_default_variant_that_is_not_a_variant() {
        let e = def(json!({"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "off"}));
        assert!(matches!(e, Err(ref e) if e.to_string().contains("not one of the variants")));
    }

    #[test]
    fn canonical_bytes_do_not_depend_on_key_order() {
        let a =
            def(json!({"variants": {"b": 2, "a": 1}, "state": "ENABLED", "defaultVariant": "a"}));
        let b =
            def(json!({"state": "ENABLED", "defaultVariant": "a", "variants": {"a": 1, "b": 2}}));
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a.to_canonical_json(), b.to_canonical_json()),
            other => panic!("unexpected {other:?}"),
        }
    }
}
