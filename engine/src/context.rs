//! Checks an evaluation context once per request, before any flag is
//! resolved with it (so `EvaluateAll` pays for the check once, not once per
//! flag): it must be a JSON object, `targetingKey` (when present) a string,
//! and it must stay within the size and nesting limits.

use serde_json::Value;

use crate::error::ErrorCode;
use crate::resolution::ResolutionError;

/// Deepest nesting of objects and arrays a context may have.
pub const MAX_CONTEXT_DEPTH: usize = 16;

/// Most values (of any kind, counted recursively) a context may hold.
pub const MAX_CONTEXT_VALUES: usize = 4096;

/// Checks a context; the error carries `INVALID_CONTEXT`.
pub fn validate_context(context: &Value) -> Result<(), ResolutionError> {
    let invalid = |message: String| ResolutionError {
        code: ErrorCode::InvalidContext,
        message: message.into(),
    };
    let Value::Object(map) = context else {
        return Err(invalid(
            "the evaluation context must be a JSON object".into(),
        ));
    };
    match map.get("targetingKey") {
        None | Some(Value::String(_)) | Some(Value::Null) => {}
        Some(_) => return Err(invalid("targetingKey must be a string".into())),
    }
    let mut count = 0usize;
    check_shape(context, 0, &mut count).map_err(invalid)
}

fn check_shape(v: &Value, depth: usize, count: &mut usize) -> Result<(), String> {
    *count += 1;
    if *count > MAX_CONTEXT_VALUES {
        return Err(format!(
            "the evaluation context holds more than {MAX_CONTEXT_VALUES} values"
        ));
    }
    if depth > MAX_CONTEXT_DEPTH {
        return Err(format!(
            "the evaluation context nests deeper than {MAX_CONTEXT_DEPTH} levels"
        ));
    }
    match v {
        Value::Object(m) => m
            .values()
            .try_for_each(|c| check_shape(c, depth + 1, count)),
        Value::Array(a) => a.iter().try_for_each(|c| check_shape(c, depth + 1, count)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_ordinary_contexts() {
        assert!(validate_context(&json!({"targetingKey": "u", "a": {"b": [1, 2]}})).is_ok());
        assert!(validate_context(&json!({})).is_ok());
    }

    #[test]
    fn rejects_malformed_contexts() {
        for bad in [json!([1]), json!("x"), json!({"targetingKey": 5})] {
            let e = validate_context(&bad).err();
            assert_eq!(e.map(|e| e.code), Some(ErrorCode::InvalidContext), "{bad}");
        }
        let mut deep = json!(1);
        for _ in 0..=MAX_CONTEXT_DEPTH {
            deep = json!({ "x": deep });
        }
        assert!(validate_context(&deep).is_err());
        let wide = Value::Array((0..=MAX_CONTEXT_VALUES).map(|i| json!(i)).collect());
        assert!(validate_context(&json!({ "w": wide })).is_err());
    }
}
