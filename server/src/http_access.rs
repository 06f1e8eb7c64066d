//! Access to HTTP routes: the same credentials as gRPC, checked by a route
//! layer ([`HttpAccess::guard`]) or by a handler ([`HttpAccess::check`]),
//! with 401 for a missing or wrong credential and 403 for one that may not.

use std::sync::Arc;

use tonic::Status;

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
            .map_err(|s| (http_status(&s), s.message().to_owned()))
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

/// The HTTP status of an access error.
pub fn http_status(status: &Status) -> http::StatusCode {
    match status.code() {
        tonic::Code::Unauthenticated => http::StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => http::StatusCode::FORBIDDEN,
        tonic::Code::ResourceExhausted => http::StatusCode::TOO_MANY_REQUESTS,
        _ => http::StatusCode::BAD_REQUEST,
    }
}
