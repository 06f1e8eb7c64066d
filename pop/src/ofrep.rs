//! OFREP, the OpenFeature Remote Evaluation Protocol, on the PoP's HTTP
//! listener: `POST /ofrep/v1/evaluate/flags/{key}` (one flag) and
//! `POST /ofrep/v1/evaluate/flags` (every flag of the set, with an `ETag`
//! honoured through `If-None-Match`). The body is `{"context": {...}}`; the
//! flag set is the `flagd-selector` header, the `flagSet` query parameter,
//! or the PoP's default. Errors carry `errorCode` and `errorDetails`:
//! `FLAG_NOT_FOUND` is 404, context, parse and type errors are 400, bad or
//! missing credentials 401 and 403.
//!
//! Every answer says which PoP answered and at which state revision
//! (`x-flagmesh-pop`, `x-flagmesh-revision`; a single flag also its
//! `x-flagmesh-mod-revision`), as gRPC `Evaluate` does: when two requests of
//! one user disagree, they tell propagation delay from a targeting change.
//! With `--cors-allowed-origins`, browser pages on those origins may call
//! it ([`cors`]): preflights are answered, `Authorization` and
//! `Content-Type` accepted, `ETag` and these headers exposed; nothing is
//! allowed by default.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flagmesh_engine::{ErrorCode, Reason, ValueType, validate_context};
use flagmesh_server::credentials::Authenticator;
use flagmesh_server::http_access::HttpAccess;
use flagmesh_server::policy::Requirement;
use serde_json::{Map, Value, json};

use crate::evaluation::{EvalContext, Outcome, Target};
use flagmesh_mesh::compiled::SetState;

/// The PoP that answered.
pub const POP_HEADER: &str = "x-flagmesh-pop";
/// The state revision it answered at.
pub const REVISION_HEADER: &str = "x-flagmesh-revision";
/// The flag's `mod_revision` (single-flag answers).
pub const MOD_REVISION_HEADER: &str = "x-flagmesh-mod-revision";

/// CORS for the OFREP routes, for browser pages on `origins` (`*`: any);
/// `None` when no origin is allowed (the default), or an error naming a
/// value that is not an origin.
pub fn cors(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, String> {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim_end_matches('/'))
                    .map_err(|_| format!("--cors-allowed-origins: \"{o}\" is not an origin"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                HeaderName::from_static("flagd-selector"),
            ])
            .expose_headers([
                header::ETAG,
                HeaderName::from_static(POP_HEADER),
                HeaderName::from_static(REVISION_HEADER),
                HeaderName::from_static(MOD_REVISION_HEADER),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    ))
}

#[derive(Clone)]
struct Ofrep {
    ctx: EvalContext,
    access: HttpAccess,
}

/// The OFREP routes.
pub fn router(ctx: EvalContext, auth: Arc<Authenticator>) -> axum::Router {
    axum::Router::new()
        .route(
            "/ofrep/v1/evaluate/flags/{key}",
            axum::routing::post(single),
        )
        .route("/ofrep/v1/evaluate/flags", axum::routing::post(bulk))
        .with_state(Ofrep {
            ctx,
            access: HttpAccess {
                auth,
                requirement: Requirement::Evaluate,
            },
        })
}

fn error_body(key: &str, code: &str, details: &str) -> Value {
    json!({"key": key, "errorCode": code, "errorDetails": details, "metadata": {}})
}

fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::FlagNotFound => StatusCode::NOT_FOUND,
        ErrorCode::InvalidContext
        | ErrorCode::TargetingKeyMissing
        | ErrorCode::ParseError
        | ErrorCode::TypeMismatch => StatusCode::BAD_REQUEST,
        ErrorCode::General => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// One flag's evaluation as OFREP JSON, borrowed from the state: nothing
/// is copied to encode it.
#[derive(serde::Serialize)]
struct FlagJson<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(rename = "errorCode", skip_serializing_if = "Option::is_none")]
    error_code: Option<&'static str>,
    #[serde(rename = "errorDetails", skip_serializing_if = "Option::is_none")]
    error_details: Option<&'a str>,
    /// Written after the other fields by [`write_flag_json`].
    #[serde(skip)]
    metadata: flagmesh_engine::Metadata<'a>,
}

/// Writes `json` into `out`: its fields, then its metadata, whose own
/// entries are copied as they are rather than serialised anew.
fn write_flag_json(out: &mut Vec<u8>, json: &FlagJson<'_>) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *out, json)?;
    // a struct is written as an object: reopen it for the last field
    if out.last() == Some(&b'}') {
        out.pop();
    }
    out.extend_from_slice(b",\"metadata\":");
    json.metadata.write_json(out)?;
    out.push(b'}');
    Ok(())
}

/// One flag's outcome as OFREP JSON, with the status a single-flag answer
/// has.
fn flag_json<'a>(key: &'a str, o: &'a Outcome<'_>) -> (StatusCode, FlagJson<'a>) {
    let r = &o.resolution;
    let mut json = FlagJson {
        key,
        value: None,
        variant: None,
        reason: None,
        error_code: None,
        error_details: None,
        metadata: r.metadata,
    };
    if let Some(e) = &r.error {
        json.error_code = Some(e.code.as_str());
        json.error_details = Some(&e.message);
        return (status_for(e.code), json);
    }
    json.reason = Some(r.reason.as_str());
    // value and variant are omitted when the caller's default applies
    if r.reason != Reason::Disabled
        && let (Some(v), Some(variant)) = (r.value, r.variant)
    {
        json.value = Some(v);
        json.variant = Some(variant);
    }
    (StatusCode::OK, json)
}

/// A JSON answer from bytes already encoded.
fn json_response(code: StatusCode, body: Vec<u8>) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from(body),
    )
        .into_response()
}

/// The evaluation context of an OFREP request body (`{"context": {...}}`;
/// an empty body or a missing context is an empty one), checked against
/// the context limits; on failure, the message to answer with.
pub fn request_context(body: &[u8]) -> Result<Value, String> {
    let context = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Map::new())
    } else {
        let parsed: Value = serde_json::from_slice(body)
            .map_err(|e| format!("the request body is not JSON: {e}"))?;
        match parsed {
            Value::Object(mut o) => match o.remove("context") {
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(c) => c,
            },
            _ => return Err("the request body must be a JSON object".into()),
        }
    };
    validate_context(&context).map_err(|e| e.message)?;
    Ok(context)
}

/// Checks credentials and reads the flag set and context of a request;
/// on failure, the status and error body to answer with.
fn prepare(
    s: &Ofrep,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &Bytes,
    key: &str,
) -> Result<(String, Value), (StatusCode, Value)> {
    let principal = s
        .access
        .check(headers)
        .map_err(|(status, message)| (status, error_body(key, "GENERAL", &message)))?;
    let selector = headers
        .get("flagd-selector")
        .and_then(|v| v.to_str().ok())
        .or_else(|| query.get("flagSet").map(String::as_str))
        .unwrap_or("");
    let set = s
        .ctx
        .set_name(selector.strip_prefix("flagSetId=").unwrap_or(selector))
        .to_owned();
    if let Some(p) = principal
        && !p.may_use_flag_set(&set)
    {
        let msg = format!(
            "credential \"{}\" may not evaluate flag set \"{set}\"",
            p.name
        );
        return Err((StatusCode::FORBIDDEN, error_body(key, "GENERAL", &msg)));
    }
    let context = request_context(body).map_err(|msg| {
        (
            StatusCode::BAD_REQUEST,
            error_body(key, "INVALID_CONTEXT", &msg),
        )
    })?;
    Ok((set, context))
}

async fn single(
    State(s): State<Ofrep>,
    Path(key): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (set, context) = match prepare(&s, &headers, &query, &body, &key) {
        Ok(v) => v,
        Err((code, body)) => return (code, axum::Json(body)).into_response(),
    };
    let state = s.ctx.state.load();
    let started = std::time::Instant::now();
    let target = Target::lookup(&state, &set, &key);
    let o = target.resolve(&context, None, ValueType::Any);
    s.ctx.stats.record(o.resolution.reason, started.elapsed());
    let (code, json) = flag_json(&key, &o);
    let mut body = Vec::with_capacity(192);
    let mut response = match write_flag_json(&mut body, &json) {
        Ok(()) => json_response(code, body),
        Err(e) => internal(&key, &e),
    };
    versions(&mut response, &s.ctx.pop_id, state.revision);
    if o.mod_revision > 0 {
        response
            .headers_mut()
            .insert(MOD_REVISION_HEADER, o.mod_revision.into());
    }
    response
}

async fn bulk(
    State(s): State<Ofrep>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (set, context) = match prepare(&s, &headers, &query, &body, "") {
        Ok(v) => v,
        Err((code, body)) => return (code, axum::Json(body)).into_response(),
    };
    let state = s.ctx.state.load();
    // the state's revision and what was asked (the set, the body as sent)
    let mut asked = xxhash_rust::xxh3::Xxh3::new();
    asked.update(set.as_bytes());
    asked.update(&[0]);
    asked.update(&body);
    let tag = format!("\"{:x}-{:016x}\"", state.revision, asked.digest());
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(tag.as_str())
    {
        s.ctx.stats.record_bulk(true);
        let mut response = (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
        versions(&mut response, &s.ctx.pop_id, state.revision);
        return response;
    }
    let empty = SetState::default();
    let set_state = state.sets.get(&set).map_or(&empty, |s| s.as_ref());
    s.ctx.stats.record_bulk(false);
    let mut response = match bulk_json(set_state, &context) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => return internal("", &e),
    };
    response
        .headers_mut()
        .insert(header::ETAG, header_value(&tag));
    versions(&mut response, &s.ctx.pop_id, state.revision);
    response
}

/// The bulk answer: every flag of the set, resolved and written one after
/// the other into one buffer, then the set's metadata.
fn bulk_json(set: &SetState, context: &Value) -> serde_json::Result<Vec<u8>> {
    let flags = set.sorted();
    // about what a flag with a little metadata takes, so that a usual
    // answer is written without growing the buffer
    let mut out = Vec::with_capacity(64 + flags.len() * 192);
    out.extend_from_slice(b"{\"flags\":[");
    for (i, f) in flags.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let target = Target::of(f);
        let o = target.resolve(context, None, ValueType::Any);
        write_flag_json(&mut out, &flag_json(f.key(), &o).1)?;
    }
    out.extend_from_slice(b"],\"metadata\":");
    serde_json::to_writer(&mut out, &*set.metadata)?;
    out.push(b'}');
    Ok(out)
}

/// An answer that could not be encoded (never expected: every value came
/// from JSON).
fn internal(key: &str, e: &serde_json::Error) -> Response {
    let body = error_body(key, "GENERAL", &format!("encoding the answer: {e}"));
    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
}

/// A header value from text made here (ASCII).
fn header_value(text: &str) -> axum::http::HeaderValue {
    axum::http::HeaderValue::from_str(text)
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static(""))
}

/// Which PoP answered, at which state revision.
fn versions(response: &mut Response, pop_id: &str, revision: u64) {
    let headers = response.headers_mut();
    if let Ok(pop) = axum::http::HeaderValue::from_str(pop_id) {
        headers.insert(POP_HEADER, pop);
    }
    headers.insert(REVISION_HEADER, revision.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_is_off_by_default_and_refuses_values_that_are_not_origins() {
        assert!(cors(&[]).is_ok_and(|c| c.is_none()));
        assert!(cors(&["*".into()]).is_ok_and(|c| c.is_some()));
        assert!(cors(&["https://app.example".into()]).is_ok_and(|c| c.is_some()));
        let e = cors(&["https://bad\norigin".into()]).err();
        assert!(e.is_some_and(|m| m.contains("--cors-allowed-origins")));
    }
}
