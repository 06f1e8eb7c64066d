//! Checks an evaluation context once per request, before any flag is
//! resolved with it (so `EvaluateAll` pays for the check once, not once per
//! flag): it must be a JSON object and stay within the size and nesting
//! limits. `targetingKey` may be any JSON value, as flagd's evaluators take
//! it (callers with numeric user ids send numbers); rules see it as sent,
//! and fractional bucketing uses its text (see [`targeting_key_text`]).

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
    let Value::Object(_) = context else {
        return Err(invalid(
            "the evaluation context must be a JSON object".into(),
        ));
    };
    let mut count = 0usize;
    check_shape(context, 0, &mut count).map_err(invalid)
}

/// The text a targeting key is bucketed by: a string as it is, a number
/// or boolean in its JSON form (`42`, `true`); nothing for null, arrays and
/// objects (fractional bucketing then has no key).
pub fn targeting_key_text(key: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match key {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(std::borrow::Cow::Owned(b.to_string())),
        _ => None,
    }
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
    fn a_targeting_key_may_be_any_value_and_buckets_by_its_text() {
        for key in [json!(42), json!(4.5), json!(true), json!("u")] {
            assert!(validate_context(&json!({ "targetingKey": key })).is_ok());
        }
        assert_eq!(targeting_key_text(&json!(42)).as_deref(), Some("42"));
        assert_eq!(targeting_key_text(&json!("42")).as_deref(), Some("42"));
        assert_eq!(targeting_key_text(&json!(true)).as_deref(), Some("true"));
        assert_eq!(targeting_key_text(&json!(null)), None);
        assert_eq!(targeting_key_text(&json!({"id": 1})), None);
    }

    #[test]
    fn accepts_ordinary_contexts() {
        assert!(validate_context(&json!({"targetingKey": "u", "a": {"b": [1, 2]}})).is_ok());
        assert!(validate_context(&json!({})).is_ok());
    }

    #[test]
    fn rejects_malformed_contexts() {
        for bad in [json!([1]), json!("x")] {
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
