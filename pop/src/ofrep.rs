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

use crate::evaluation::{EvalContext, Outcome, resolve, resolve_flag};

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

/// One flag's evaluation as OFREP JSON.
fn flag_json(key: &str, o: &Outcome<'_>) -> (StatusCode, Value) {
    let r = &o.resolution;
    if let Some(e) = &r.error {
        let mut body = error_body(key, e.code.as_str(), &e.message);
        body["metadata"] = Value::Object(r.metadata.clone());
        return (status_for(e.code), body);
    }
    let mut body = Map::new();
    body.insert("key".into(), Value::String(key.to_owned()));
    body.insert("reason".into(), Value::String(r.reason.as_str().to_owned()));
    // value and variant are omitted when the caller's default applies
    if r.reason != Reason::Disabled
        && let (Some(v), Some(variant)) = (r.value, r.variant)
    {
        body.insert("value".into(), v.clone());
        body.insert("variant".into(), Value::String(variant.to_owned()));
    }
    body.insert("metadata".into(), Value::Object(r.metadata.clone()));
    (StatusCode::OK, Value::Object(body))
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
    let o = resolve(&state, &set, &key, &context, None, ValueType::Any);
    s.ctx.stats.record(o.resolution.reason, started.elapsed());
    let (code, body) = flag_json(&key, &o);
    let mut response = (code, axum::Json(body)).into_response();
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
    let tag = format!(
        "\"{:x}-{:016x}\"",
        state.revision,
        xxhash_rust::xxh3::xxh3_64(format!("{set}\u{0}{context}").as_bytes())
    );
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
    let mut flags = Vec::new();
    let metadata = match state.sets.get(&set) {
        Some(set_state) => {
            let mut keys: Vec<&Box<str>> = set_state.flags.keys().collect();
            keys.sort();
            for k in keys {
                if let Some(f) = set_state.flags.get(k) {
                    let o = resolve_flag(f, &context, None, ValueType::Any);
                    flags.push(flag_json(k, &o).1);
                }
            }
            (*set_state.metadata).clone()
        }
        None => Map::new(),
    };
    s.ctx.stats.record_bulk(false);
    let mut response = (
        StatusCode::OK,
        [(header::ETAG, tag)],
        axum::Json(json!({"flags": flags, "metadata": metadata})),
    )
        .into_response();
    versions(&mut response, &s.ctx.pop_id, state.revision);
    response
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
