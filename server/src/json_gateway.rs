//! gRPC methods over HTTP with JSON: `POST <prefix>/<package.Service>/<Method>`
//! with the request message in the proto3 JSON mapping answers the response
//! message the same way. The call goes through the node's own gRPC stack
//! (its access layer, policies and rate limit, then the service), so the
//! gateway adds no rule of its own: a browser gets exactly what `grpcurl`
//! gets. Errors answer `{"code": "FAILED_PRECONDITION", "message": "..."}`
//! with the HTTP status of the gRPC code. Only unary methods of the services
//! named are served.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use http_body_util::BodyExt as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, SerializeOptions};
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

use crate::http_access::http_status;

/// A node's gRPC stack, as the gateway calls it.
pub type GrpcService = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

#[derive(Clone)]
struct Gateway {
    grpc: GrpcService,
    pool: Arc<DescriptorPool>,
    services: Arc<Vec<String>>,
}

/// Why the gateway cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The descriptor set does not decode.
    #[error("the gateway's descriptor set: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    /// A service to serve is not described.
    #[error("the gateway's descriptor set has no service {0}")]
    NoService(String),
}

/// The gateway's routes under `prefix` (such as `/api`), for `services`
/// (full names) described by the encoded descriptor set `descriptors`.
///
/// # Errors
/// When the descriptor set does not decode or lacks one of the services.
pub fn routes(
    prefix: &str,
    grpc: GrpcService,
    descriptors: &[u8],
    services: &[&str],
) -> Result<axum::Router, GatewayError> {
    let pool = DescriptorPool::decode(descriptors)?;
    for s in services {
        if pool.get_service_by_name(s).is_none() {
            return Err(GatewayError::NoService((*s).to_owned()));
        }
    }
    let gateway = Gateway {
        grpc,
        pool: Arc::new(pool),
        services: Arc::new(services.iter().map(|s| (*s).to_owned()).collect()),
    };
    Ok(axum::Router::new()
        .route(
            &format!("{prefix}/{{service}}/{{method}}"),
            axum::routing::post(call),
        )
        .with_state(gateway))
}

/// An error answer: the gRPC code's name and HTTP status, and the message.
fn error(code: tonic::Code, message: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "code": code_name(code),
        "message": message.into(),
    });
    let mut r = (http_status(code), axum::Json(body)).into_response();
    no_store(r.headers_mut());
    r
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

impl Gateway {
    /// The unary method `service`/`method`, if the gateway serves it.
    fn method(&self, service: &str, method: &str) -> Option<MethodDescriptor> {
        if !self.services.iter().any(|s| s == service) {
            return None;
        }
        self.pool
            .get_service_by_name(service)?
            .methods()
            .find(|m| m.name() == method && !m.is_client_streaming() && !m.is_server_streaming())
    }
}

/// The body arrives whole, within axum's default limit of 2 MiB (a larger
/// one is refused with 413 before it gets here).
async fn call(
    State(gateway): State<Gateway>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(descriptor) = gateway.method(&service, &method) else {
        return error(
            tonic::Code::Unimplemented,
            format!("no unary method {service}/{method} is served here"),
        );
    };
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    let mut json = serde_json::Deserializer::from_slice(text);
    let message = match DynamicMessage::deserialize(descriptor.input(), &mut json)
        .and_then(|m| json.end().map(|()| m))
    {
        Ok(m) => m,
        Err(e) => {
            return error(
                tonic::Code::InvalidArgument,
                format!(
                    "the body is not a {} in JSON: {e}",
                    descriptor.input().full_name()
                ),
            );
        }
    };
    let request = match grpc_request(&service, &method, &headers, &message) {
        Ok(r) => r,
        Err(e) => return error(tonic::Code::InvalidArgument, e),
    };
    let response = match gateway.grpc.oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    answer(response, &descriptor).await
}

/// The gRPC request for `message`: length-prefixed, with the caller's
/// credential.
fn grpc_request(
    service: &str,
    method: &str,
    headers: &HeaderMap,
    message: &DynamicMessage,
) -> Result<http::Request<tonic::body::Body>, String> {
    use prost_reflect::prost::Message as _;
    let len = message.encoded_len();
    let mut frame = BytesMut::with_capacity(5 + len);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(len).map_err(|_| "the request is too large".to_owned())?);
    message
        .encode(&mut frame)
        .map_err(|e| format!("the request does not encode: {e}"))?;
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("/{service}/{method}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers");
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, auth);
    }
    request
        .body(tonic::body::Body::new(http_body_util::Full::new(
            frame.freeze(),
        )))
        .map_err(|e| format!("the request cannot be built: {e}"))
}

/// The JSON answer for a gRPC response.
async fn answer(
    response: http::Response<tonic::body::Body>,
    method: &MethodDescriptor,
) -> Response {
    let (parts, body) = response.into_parts();
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(e) => return error(tonic::Code::Internal, format!("the reply failed: {e}")),
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    // a trailers-only reply carries its status in the headers
    let status = tonic::Status::from_header_map(&trailers)
        .or_else(|| tonic::Status::from_header_map(&parts.headers));
    if let Some(status) = status
        && status.code() != tonic::Code::Ok
    {
        return error(status.code(), status.message());
    }
    let bytes: Bytes = collected.to_bytes();
    let Some(payload) = bytes.get(5..) else {
        return error(tonic::Code::Internal, "the reply holds no message");
    };
    let message = match DynamicMessage::decode(method.output(), payload) {
        Ok(m) => m,
        Err(e) => {
            return error(
                tonic::Code::Internal,
                format!("the reply does not decode: {e}"),
            );
        }
    };
    let options = SerializeOptions::new()
        .stringify_64_bit_integers(false)
        .skip_default_fields(false);
    let mut out = Vec::with_capacity(payload.len() * 2);
    let mut ser = serde_json::Serializer::new(&mut out);
    if let Err(e) = message.serialize_with_options(&mut ser, &options) {
        return error(
            tonic::Code::Internal,
            format!("the reply does not serialise: {e}"),
        );
    }
    let mut r = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        out,
    )
        .into_response();
    no_store(r.headers_mut());
    r
}

/// The gRPC code as the proto3 JSON mapping and `grpcurl` spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}
