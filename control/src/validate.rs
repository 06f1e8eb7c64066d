//! What the Admin API checks before anything is written: names of flag
//! sets and flags, the size and validity of a definition (compiled by the
//! engine, strict), flag counts per set, and expected revisions
//! (optimistic concurrency). Every refusal names the field.

use flagmesh_engine::{
    FlagDefinition, Strictness, ValidationError, ValidationErrors, escape_pointer,
};
use flagmesh_proto::v1::ValidationWarning;
use serde_json::{Map, Value};

use crate::error::ControlError;

/// Largest flag definition accepted, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 256 << 10;
/// Largest flag key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest flag-set id, in bytes.
pub const MAX_FLAG_SET_BYTES: usize = 128;

/// Refuses a flag set that would hold more than `max` flags.
pub fn check_flag_count(flag_set: &str, count: usize, max: usize) -> Result<(), ControlError> {
    if count > max {
        return Err(ControlError::ResourceExhausted(format!(
            "flag set \"{flag_set}\" would hold {count} flags; the limit is {max} (--max-flags-per-set)"
        )));
    }
    Ok(())
}

/// Checks a flag-set id: 1..=128 bytes of letters, digits, `.`, `_`, `-`, `:`.
pub fn check_flag_set(id: &str) -> Result<(), ControlError> {
    if id.is_empty() {
        return Err(ControlError::InvalidArgument(
            "flag_set: must not be empty".into(),
        ));
    }
    if id.len() > MAX_FLAG_SET_BYTES
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
    {
        return Err(ControlError::InvalidArgument(format!(
            "flag_set \"{}\": use at most {MAX_FLAG_SET_BYTES} letters, digits, '.', '_', '-' or ':'",
            id.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// Checks a flag key: 1..=256 bytes without control characters.
pub fn check_key(key: &str) -> Result<(), ControlError> {
    if key.is_empty() {
        return Err(ControlError::InvalidArgument(
            "key: must not be empty".into(),
        ));
    }
    if key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
        return Err(ControlError::InvalidArgument(format!(
            "key \"{}\": use at most {MAX_KEY_BYTES} bytes and no control characters",
            key.chars()
                .filter(|c| !c.is_control())
                .take(40)
                .collect::<String>()
        )));
    }
    Ok(())
}

/// Parses and validates one flag definition; returns its canonical bytes
/// and the problems flagd would still load it with (warnings; refused
/// instead when `strict`).
pub fn validate_definition(
    key: &str,
    json: &str,
    strict: bool,
) -> Result<(Vec<u8>, Vec<ValidationError>), ControlError> {
    if json.len() > MAX_DEFINITION_BYTES {
        return Err(ControlError::InvalidArgument(format!(
            "flag \"{key}\": definition_json: larger than {MAX_DEFINITION_BYTES} bytes"
        )));
    }
    let value: Value = serde_json::from_str(json).map_err(|e| {
        ControlError::InvalidArgument(format!(
            "flag \"{key}\": definition_json: not valid JSON: {e}"
        ))
    })?;
    let invalid = |e: ValidationErrors| ControlError::InvalidArgument(e.to_string());
    if strict {
        let def = FlagDefinition::from_json(key, &value, &Map::new(), Strictness::Strict)
            .map_err(invalid)?;
        return Ok((def.to_canonical_json(), Vec::new()));
    }
    let (def, warnings) =
        FlagDefinition::from_json_with_warnings(key, &value, &Map::new()).map_err(invalid)?;
    Ok((def.to_canonical_json(), warnings))
}

/// Warnings as the Admin API returns and records them, each pointer into
/// what was sent: under `/flags/KEY` when `in_document`, else into the one
/// flag's definition.
pub fn warnings_of(
    flag_set: &str,
    warnings: &[ValidationError],
    in_document: bool,
) -> Vec<ValidationWarning> {
    warnings
        .iter()
        .map(|w| {
            let key = w.flag.clone().unwrap_or_default();
            let pointer = match (&w.flag, in_document) {
                (Some(k), true) => format!("/flags/{}{}", escape_pointer(k), w.path),
                _ => w.path.clone(),
            };
            ValidationWarning {
                flag_set: flag_set.to_owned(),
                key,
                pointer,
                message: w.message.clone(),
            }
        })
        .collect()
}

/// Checks an optimistic-concurrency expectation: `current` is the
/// thing's `mod_revision` (`None`: it does not exist), `expected` what the
/// caller read (0: no check, or "must not exist" when `creating`).
pub fn expect_revision(
    what: &str,
    current: Option<u64>,
    expected: u64,
    force: bool,
    creating: bool,
) -> Result<(), ControlError> {
    if force {
        return Ok(());
    }
    match (current, expected) {
        (None, 0) if creating => Ok(()),
        (Some(cur), 0) if creating => Err(ControlError::FailedPrecondition(format!(
            "{what} exists (mod_revision {cur}); pass expected_mod_revision {cur} to replace it"
        ))),
        (None, _) => Err(ControlError::NotFound(format!("{what} not found"))),
        (Some(_), 0) => Ok(()),
        (Some(cur), exp) if cur == exp => Ok(()),
        (Some(cur), exp) => Err(ControlError::FailedPrecondition(format!(
            "{what} changed: its mod_revision is {cur}, not the expected {exp}; read it again"
        ))),
    }
}
