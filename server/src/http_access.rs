//! Access to HTTP routes: the same credentials as gRPC, checked by a route
//! layer ([`HttpAccess::guard`]) or by a handler ([`HttpAccess::check`]),
//! with 401 for a missing or wrong credential and 403 for one that may not.

use std::sync::Arc;

use crate::credentials::{Authenticator, Principal};
use crate::policy::Requirement;

/// Access to an HTTP route: a credential meeting `requirement`.
#[derive(Debug, Clone)]
pub struct HttpAccess {
    /// The credentials.
    pub auth: Arc<Authenticator>,
    /// What the route requires.
    pub requirement: Requirement,
}

impl HttpAccess {
    /// The caller, or the HTTP status (401 without or with a wrong
    /// credential, 403 with one that may not) and message refusing it.
    pub fn check(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<Option<Principal>, (http::StatusCode, String)> {
        self.auth
            .authorize(headers, self.requirement)
            .map_err(|s| (http_status(s.code()), s.message().to_owned()))
    }
}

impl HttpAccess {
    /// `router`'s routes behind this check: a refused request gets the
    /// status (401 or 403) and the reason as text, and never reaches them.
    pub fn guard(self, router: axum::Router) -> axum::Router {
        use axum::response::IntoResponse as _;
        router.route_layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let refused = self.check(request.headers()).err();
                async move {
                    match refused {
                        None => next.run(request).await,
                        Some((status, message)) => (status, format!("{message}\n")).into_response(),
                    }
                }
            },
        ))
    }
}

/// The HTTP status of a gRPC code, as gRPC's HTTP mapping gives it
/// (google.rpc.Code's documentation), except that a stale write
/// (FAILED_PRECONDITION) answers 409 Conflict, as it is one here. Access
/// errors are 401, 403 and 429; the JSON gateway answers every code.
pub fn http_status(code: tonic::Code) -> http::StatusCode {
    use http::StatusCode as S;
    use tonic::Code as C;
    match code {
        C::Ok => S::OK,
        C::Cancelled => S::from_u16(499).unwrap_or(S::BAD_REQUEST),
        C::InvalidArgument | C::OutOfRange => S::BAD_REQUEST,
        C::DeadlineExceeded => S::GATEWAY_TIMEOUT,
        C::NotFound => S::NOT_FOUND,
        C::AlreadyExists | C::Aborted | C::FailedPrecondition => S::CONFLICT,
        C::PermissionDenied => S::FORBIDDEN,
        C::Unauthenticated => S::UNAUTHORIZED,
        C::ResourceExhausted => S::TOO_MANY_REQUESTS,
        C::Unimplemented => S::NOT_IMPLEMENTED,
        C::Unavailable => S::SERVICE_UNAVAILABLE,
        C::Unknown | C::Internal | C::DataLoss => S::INTERNAL_SERVER_ERROR,
    }
}
