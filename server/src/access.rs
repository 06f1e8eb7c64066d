//! The access layer in front of every gRPC router: each call is checked
//! against the node's [`AccessPolicy`] (credential, client certificate on
//! mTLS listeners for mesh calls, rate limit, streams per client) before
//! it reaches a service; the caller's [`Principal`] goes into the request's
//! extensions, and a stream's place is held until its response body ends.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use crate::credentials::{Authenticator, Principal};
use crate::limits::{RateLimiter, StreamLimiter, StreamPermit};
use crate::policy::{AccessPolicy, Requirement};
use crate::security::Security;

/// A tower layer enforcing an [`AccessPolicy`] with an [`Authenticator`],
/// and the limits of [`Security`]: streams per client, the rate limit, and
/// (on a listener that verifies client certificates) a verified client
/// certificate for mesh calls.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    policy: Arc<AccessPolicy>,
    streams: StreamLimiter,
    rate: RateLimiter,
    mesh_needs_cert: bool,
}

impl AuthLayer {
    /// A layer checking every call against `policy`.
    pub fn new(security: &Security, policy: Arc<AccessPolicy>) -> Self {
        Self {
            auth: security.auth.clone(),
            policy,
            streams: StreamLimiter::new(security.limits.streams_per_client),
            rate: RateLimiter::new(security.limits.rate_per_sec, security.limits.rate_burst),
            mesh_needs_cert: security
                .grpc_tls
                .as_ref()
                .is_some_and(|t| t.verifies_clients()),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a gRPC router.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

type TlsInfo = tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>;

/// The peer's address, over plaintext or TLS.
fn peer_ip(ext: &http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| ext.get::<TlsInfo>().and_then(|i| i.get_ref().remote_addr()))
        .map(|a| a.ip())
}

/// Whether the connection presented a client certificate that the
/// listener verified (rustls refuses the handshake of an unverified one).
fn has_client_cert(ext: &http::Extensions) -> bool {
    ext.get::<TlsInfo>()
        .and_then(|i| i.peer_certs())
        .is_some_and(|c| !c.is_empty())
}

impl AuthLayer {
    /// Checks a call; on success, the caller and (for streams) its permit.
    fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        ext: &http::Extensions,
    ) -> Result<(Option<Principal>, Option<StreamPermit>), Status> {
        let policy = self.policy.lookup(path);
        let requirement = policy.requirement;
        let principal = self.auth.authorize(headers, requirement)?;
        if requirement == Requirement::Mesh && self.mesh_needs_cert && !has_client_cert(ext) {
            return Err(Status::unauthenticated(
                "mesh calls on this server need a client certificate signed by its client CA (mTLS)",
            ));
        }
        let name = principal.as_ref().map_or("anonymous", |p| p.name.as_str());
        if policy.rate_limited
            && let Err(wait) = self.rate.check(name)
        {
            return Err(Status::resource_exhausted(format!(
                "rate limit: credential \"{name}\" makes more calls than allowed; retry in {} ms",
                wait.as_millis().max(1)
            )));
        }
        let permit = if policy.streaming {
            Some(
                self.streams
                    .acquire(name, peer_ip(ext))
                    .map_err(Status::resource_exhausted)?,
            )
        } else {
            None
        };
        Ok((principal, permit))
    }
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self
            .layer
            .admit(req.uri().path(), req.headers(), req.extensions())
        {
            Ok((principal, permit)) => {
                if let Some(p) = principal {
                    req.extensions_mut().insert(p);
                }
                // take the service that was polled ready, leave a clone
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let call = inner.call(req);
                Box::pin(async move {
                    let response = call.await?;
                    Ok(match permit {
                        // the stream's place is held until its body ends
                        Some(permit) => response.map(|body| {
                            tonic::body::Body::new(PermitBody {
                                inner: body,
                                _permit: permit,
                            })
                        }),
                        None => response,
                    })
                })
            }
            Err(status) => {
                tracing::debug!(path = %req.uri().path(), code = ?status.code(), "request refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// A response body holding a stream's [`StreamPermit`] until it ends.
struct PermitBody {
    inner: tonic::body::Body,
    _permit: StreamPermit,
}

impl http_body::Body for PermitBody {
    type Data = tonic::codegen::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
