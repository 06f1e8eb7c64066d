//! A flagd flag-definition document: `flags` (a map of key to definition,
//! or an array of definitions with a `key`), shared rules in `$evaluators`,
//! and flag-set `metadata` (with `flagSetId`). Read from JSON or YAML and
//! checked as a whole, reporting every problem with its flag and field.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::definition::{FlagDefinition, check_metadata, escape_pointer, kind_name};
use crate::error::{DocumentError, ValidationError, ValidationErrors};
use crate::rule::Strictness;

/// A checked flag document.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagDocument {
    /// `metadata.flagSetId`, when the document names its flag set.
    pub flag_set_id: Option<String>,
    /// Flag-set metadata (string, number and boolean values).
    pub metadata: Map<String, Value>,
    /// The shared rules, as written (already inlined into the flags).
    pub evaluators: Map<String, Value>,
    /// The flags by key, each with `$ref`s inlined.
    pub flags: BTreeMap<String, FlagDefinition>,
}

/// A document's text as JSON: JSON, or else YAML.
fn read(text: &str) -> Result<Value, DocumentError> {
    serde_json::from_str(text).or_else(|json_err| {
        serde_yaml_ng::from_str::<Value>(text).map_err(|yaml_err| DocumentError::Syntax {
            json: json_err.to_string(),
            yaml: yaml_err.to_string(),
        })
    })
}

impl FlagDocument {
    /// Parses a document from JSON or YAML text and checks it.
    pub fn parse(text: &str, strictness: Strictness) -> Result<Self, DocumentError> {
        Ok(Self::from_json(&read(text)?, strictness)?)
    }

    /// Parses a document as a flagd evaluator loads it
    /// ([`Strictness::Lenient`]) and returns with it what the strict check
    /// finds on top: problems flagd still loads (misused operators, literals
    /// that are not versions, unknown operators, `$ref`s to missing
    /// evaluators), each naming the flag and its JSON pointer. Those flags
    /// evaluate with flagd's runtime semantics.
    pub fn parse_with_warnings(text: &str) -> Result<(Self, Vec<ValidationError>), DocumentError> {
        let value = read(text)?;
        let doc = Self::from_json(&value, Strictness::Lenient)?;
        let warnings = Self::from_json(&value, Strictness::Strict)
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        Ok((doc, warnings))
    }

    /// Checks a document already parsed into JSON.
    pub fn from_json(doc: &Value, strictness: Strictness) -> Result<Self, ValidationErrors> {
        let Some(root) = doc.as_object() else {
            return Err(ValidationError::in_document(
                "",
                format!(
                    "a flag document must be a JSON object, found {}",
                    kind_name(doc)
                ),
            )
            .into());
        };
        let mut errors = Vec::new();

        let metadata = match root.get("metadata") {
            None => Map::new(),
            Some(m) => match check_metadata(m) {
                Ok(m) => m,
                Err((path, msg)) => {
                    errors.push(ValidationError::in_document(
                        format!("/metadata{path}"),
                        msg,
                    ));
                    Map::new()
                }
            },
        };
        let flag_set_id = match metadata.get("flagSetId") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                errors.push(ValidationError::in_document(
                    "/metadata/flagSetId",
                    format!("must be a string, found {}", kind_name(other)),
                ));
                None
            }
        };

        let evaluators = match root.get("$evaluators") {
            None => Map::new(),
            Some(Value::Object(e)) => {
                for (name, rule) in e {
                    if !rule.is_object() {
                        errors.push(ValidationError::in_document(
                            format!("/$evaluators/{}", escape_pointer(name)),
                            format!(
                                "a shared rule must be a JSON object, found {}",
                                kind_name(rule)
                            ),
                        ));
                    }
                }
                e.clone()
            }
            Some(other) => {
                errors.push(ValidationError::in_document(
                    "/$evaluators",
                    format!(
                        "must be a JSON object of name to rule, found {}",
                        kind_name(other)
                    ),
                ));
                Map::new()
            }
        };

        let raw_flags = collect_flags(root, &mut errors);
        let mut flags = BTreeMap::new();
        for (key, raw) in raw_flags {
            match FlagDefinition::from_json(&key, raw, &evaluators, strictness) {
                Ok(def) => {
                    flags.insert(key, def);
                }
                Err(e) => errors.extend(e.0),
            }
        }

        if errors.is_empty() {
            Ok(Self {
                flag_set_id,
                metadata,
                evaluators,
                flags,
            })
        } else {
            Err(ValidationErrors(errors))
        }
    }

    /// The document as JSON in map form (`$ref`s stay inlined).
    pub fn to_json(&self) -> Value {
        let mut flags = Map::new();
        for (k, d) in &self.flags {
            flags.insert(k.clone(), d.to_json());
        }
        let mut root = Map::new();
        root.insert("flags".into(), Value::Object(flags));
        if !self.metadata.is_empty() {
            root.insert("metadata".into(), Value::Object(self.metadata.clone()));
        }
        Value::Object(root)
    }
}

/// The flags of a document as (key, raw definition); map or array form.
fn collect_flags<'a>(
    root: &'a Map<String, Value>,
    errors: &mut Vec<ValidationError>,
) -> Vec<(String, &'a Value)> {
    match root.get("flags") {
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(k, v)| {
                if k.is_empty() {
                    errors.push(ValidationError::in_document(
                        "/flags",
                        "flag keys must not be empty",
                    ));
                    None
                } else {
                    Some((k.clone(), v))
                }
            })
            .collect(),
        Some(Value::Array(items)) => {
            // The provider schema (flags.json) allows only the map form; the
            // flagd schema (flagd.json) also allows an array.
            if let Some(Value::String(schema)) = root.get("$schema")
                && schema.rsplit('/').next() == Some("flags.json")
            {
                errors.push(ValidationError::in_document(
                    "/flags",
                    "this document declares the provider schema (flags.json), which takes flags as a map of key to flag, not an array",
                ));
                return Vec::new();
            }
            let mut out: Vec<(String, &Value)> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item.get("key") {
                    Some(Value::String(k)) if !k.is_empty() => {
                        if out.iter().any(|(seen, _)| seen == k) {
                            errors.push(ValidationError::in_document(
                                format!("/flags/{i}/key"),
                                format!("flag \"{k}\" is defined more than once"),
                            ));
                        } else {
                            out.push((k.clone(), item));
                        }
                    }
                    _ => errors.push(ValidationError::in_document(
                        format!("/flags/{i}/key"),
                        "each flag of the array form needs a non-empty string \"key\"",
                    )),
                }
            }
            out
        }
        Some(other) => {
            errors.push(ValidationError::in_document(
                "/flags",
                format!(
                    "must be a map of key to flag or an array of flags, found {}",
                    kind_name(other)
                ),
            ));
            Vec::new()
        }
        None => {
            errors.push(ValidationError::in_document("/flags", "is required"));
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml() {
        let doc = FlagDocument::parse(
            "flags:\n  f:\n    state: ENABLED\n    variants: {on: true, off: false}\n    defaultVariant: 'on'\n",
            Strictness::Strict,
        );
        assert!(
            matches!(doc, Ok(ref d) if d.flags.contains_key("f")),
            "{doc:?}"
        );
    }

    #[test]
    fn reports_syntax_errors_of_both_formats() {
        let e = FlagDocument::parse("{\"flags\": [", Strictness::Strict);
        assert!(matches!(e, Err(DocumentError::Syntax { .. })));
    }

    #[test]
    fn rejects_duplicate_keys_in_array_form() {
        let doc = serde_json::json!({"flags": [
            {"key": "a", "state": "ENABLED", "variants": {"x": 1}},
            {"key": "a", "state": "ENABLED", "variants": {"x": 1}}
        ]});
        let e = FlagDocument::from_json(&doc, Strictness::Strict);
        assert!(matches!(e, Err(ref e) if e.to_string().contains("more than once")));
    }
}
