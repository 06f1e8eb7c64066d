//! Credentials and access control shared by every flagmesh server.
//!
//! Tokens are configured as SHA-256 hashes (never as secrets), each with a
//! name (recorded as the actor in the audit trail) and a role. A request
//! presents `authorization: Bearer <token>`; the token is hashed and compared
//! in constant time with every configured hash. A tower layer checks each
//! gRPC call against the role its method requires and puts the caller's
//! [`Principal`] into the request's extensions. `--insecure-dev` turns the
//! checks off, explicitly and loudly.

use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::limits::{Limits, RateLimiter, StreamLimiter, StreamPermit};
use crate::serve::Shutdown;
use crate::tls::ServerTls;

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read flags, history, revision and propagation.
    Read,
    /// Read, and change flags and flag sets.
    Write,
    /// Everything, including deleting whole flag sets.
    Admin,
    /// A mesh node: subscribe to state and report applied revisions.
    Mesh,
    /// Evaluate flags (optionally only of some flag sets).
    Evaluate,
}

impl Role {
    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "read" => Self::Read,
            "write" => Self::Write,
            "admin" => Self::Admin,
            "mesh" => Self::Mesh,
            "evaluate" => Self::Evaluate,
            _ => return None,
        })
    }
}

/// What a method requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// Anyone (health checks, reflection).
    Public,
    /// At least [`Role::Read`].
    Read,
    /// At least [`Role::Write`].
    Write,
    /// [`Role::Admin`].
    Admin,
    /// [`Role::Mesh`] (or admin).
    Mesh,
    /// [`Role::Evaluate`] (or mesh or admin).
    Evaluate,
}

impl Requirement {
    /// Whether `role` meets this requirement.
    pub fn allows(self, role: Role) -> bool {
        use Role as R;
        match self {
            Self::Public => true,
            Self::Read => matches!(role, R::Read | R::Write | R::Admin),
            Self::Write => matches!(role, R::Write | R::Admin),
            Self::Admin => role == R::Admin,
            Self::Mesh => matches!(role, R::Mesh | R::Admin),
            Self::Evaluate => matches!(role, R::Evaluate | R::Mesh | R::Admin),
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The credential's name (the actor in the audit trail).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// For evaluation keys: the flag sets it may evaluate (empty: all).
    pub flag_sets: Vec<String>,
}

impl Principal {
    /// Whether this caller may read or evaluate `flag_set`.
    pub fn may_use_flag_set(&self, flag_set: &str) -> bool {
        self.flag_sets.is_empty() || self.flag_sets.iter().any(|s| s == flag_set)
    }
}

/// One configured credential.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenEntry {
    /// The credential's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// For evaluation keys: the flag sets it may use (empty: all).
    #[serde(default)]
    pub flag_sets: Vec<String>,
}

/// A tokens file: `[[token]]` tables.
#[derive(Debug, Deserialize)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// Why credentials could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// The tokens file could not be read.
    #[error("tokens file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The tokens file or list is malformed.
    #[error("tokens: {0}")]
    Invalid(String),
    /// Neither tokens nor development mode.
    #[error(
        "no credentials configured: pass --tokens-file or FLAGMESH_TOKENS, or --insecure-dev for local development"
    )]
    NoTokens,
}

/// The hex SHA-256 of a token, as configured in tokens files.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Checks credentials.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// `None`: development mode, every caller is an admin.
    entries: Option<Vec<(TokenEntry, [u8; 32])>>,
}

impl Authenticator {
    /// Development mode: no credential required. Logs a loud warning.
    pub fn insecure_dev() -> Self {
        tracing::warn!(
            "INSECURE DEVELOPMENT MODE: no credentials are required and every caller is an admin; never use --insecure-dev in production"
        );
        Self { entries: None }
    }

    /// From configured entries.
    pub fn from_entries(entries: Vec<TokenEntry>) -> Result<Self, AuthConfigError> {
        if entries.is_empty() {
            return Err(AuthConfigError::NoTokens);
        }
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let bytes = hex::decode(e.sha256.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    AuthConfigError::Invalid(format!(
                        "token \"{}\": sha256 must be 64 hex digits",
                        e.name
                    ))
                })?;
            out.push((e, bytes));
        }
        Ok(Self { entries: Some(out) })
    }

    /// From a tokens file (TOML `[[token]]` tables with `name`, `role`,
    /// `sha256`, optional `flag_sets`) and/or a list `name:role:sha256,...`
    /// (from `FLAGMESH_TOKENS`), or development mode.
    pub fn configure(
        tokens_file: Option<&std::path::Path>,
        tokens_list: Option<&str>,
        insecure_dev: bool,
    ) -> Result<Self, AuthConfigError> {
        let mut entries = Vec::new();
        if let Some(path) = tokens_file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let file: TokensFile = toml::from_str(&text)
                .map_err(|e| AuthConfigError::Invalid(format!("{}: {e}", path.display())))?;
            entries.extend(file.token);
        }
        if let Some(list) = tokens_list {
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let parts: Vec<&str> = item.split(':').collect();
                let [name, role, sha] = parts.as_slice() else {
                    return Err(AuthConfigError::Invalid(format!(
                        "\"{}\" is not name:role:sha256",
                        item.split(':').next().unwrap_or_default()
                    )));
                };
                let role = Role::parse(role).ok_or_else(|| {
                    AuthConfigError::Invalid(format!("token \"{name}\": unknown role \"{role}\""))
                })?;
                entries.push(TokenEntry {
                    name: (*name).to_owned(),
                    role,
                    sha256: (*sha).to_owned(),
                    flag_sets: Vec::new(),
                });
            }
        }
        if entries.is_empty() && insecure_dev {
            return Ok(Self::insecure_dev());
        }
        Self::from_entries(entries)
    }

    /// Whether this is development mode.
    pub fn is_insecure(&self) -> bool {
        self.entries.is_none()
    }

    /// Identifies the caller from request headers and checks `requirement`.
    pub fn authorize(
        &self,
        headers: &http::HeaderMap,
        requirement: Requirement,
    ) -> Result<Option<Principal>, Status> {
        if self.entries.is_none() {
            return Ok(Some(Principal {
                name: "dev".into(),
                role: Role::Admin,
                flag_sets: Vec::new(),
            }));
        };
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let principal = token.and_then(|t| self.lookup(t));
        if requirement == Requirement::Public {
            return Ok(principal);
        }
        let Some(principal) = principal else {
            return Err(Status::unauthenticated(if token.is_some() {
                "the bearer token is not valid"
            } else {
                "a bearer token is required (authorization: Bearer <token>)"
            }));
        };
        if !requirement.allows(principal.role) {
            return Err(Status::permission_denied(format!(
                "credential \"{}\" ({:?}) may not do this (requires {requirement:?})",
                principal.name, principal.role
            )));
        }
        Ok(Some(principal))
    }

    fn lookup(&self, token: &str) -> Option<Principal> {
        let entries = self.entries.as_ref()?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        // compare against every entry, in constant time per entry
        for (entry, hash) in entries {
            if constant_time_eq(&presented, hash) {
                found = Some(Principal {
                    name: entry.name.clone(),
                    role: entry.role,
                    flag_sets: entry.flag_sets.clone(),
                });
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Which requirement a gRPC method (by its path `/package.Service/Method`) has.
pub type Policy = Arc<dyn Fn(&str) -> Requirement + Send + Sync>;

/// The requirement of the methods every server shares: health and
/// reflection are public; `flagmesh.v1.Sync` needs the mesh credential.
pub fn common_requirement(path: &str) -> Option<Requirement> {
    if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
        Some(Requirement::Public)
    } else if path.starts_with("/flagmesh.v1.Sync/") {
        Some(Requirement::Mesh)
    } else {
        None
    }
}

/// Everything a server enforces on its callers: credentials, TLS on its
/// listeners, and limits.
#[derive(Debug, Clone)]
pub struct Security {
    /// The credentials it accepts.
    pub auth: Arc<Authenticator>,
    /// TLS of the gRPC listener (`None`: plaintext).
    pub grpc_tls: Option<Arc<ServerTls>>,
    /// TLS of the HTTP listener (`None`: plaintext).
    pub http_tls: Option<Arc<ServerTls>>,
    /// How often certificate files are checked for changes.
    pub tls_reload: std::time::Duration,
    /// Limits on callers.
    pub limits: Limits,
}

impl From<Arc<Authenticator>> for Security {
    /// Plaintext listeners and the default limits.
    fn from(auth: Arc<Authenticator>) -> Self {
        Self {
            auth,
            grpc_tls: None,
            http_tls: None,
            tls_reload: std::time::Duration::from_secs(2),
            limits: Limits::default(),
        }
    }
}

impl Security {
    /// Starts the certificate watchers of the TLS listeners.
    pub fn spawn_tls_watchers(&self, shutdown: &Shutdown) -> Vec<tokio::task::JoinHandle<()>> {
        [&self.grpc_tls, &self.http_tls]
            .into_iter()
            .flatten()
            .map(|t| t.spawn_watcher(self.tls_reload, shutdown))
            .collect()
    }

    /// Who may read `/metrics`.
    pub fn metrics_access(&self) -> HttpAccess {
        HttpAccess {
            auth: self.auth.clone(),
            requirement: if self.limits.metrics_public {
                Requirement::Public
            } else {
                Requirement::Read
            },
        }
    }
}

/// The long-lived streaming methods, limited per client.
pub fn is_stream_method(path: &str) -> bool {
    matches!(
        path,
        "/flagmesh.v1.Sync/Subscribe"
            | "/flagmesh.v1.Sync/Report"
            | "/flagmesh.v1.Evaluation/Watch"
            | "/flagd.evaluation.v1.Service/EventStream"
            | "/flagd.evaluation.v2.Service/EventStream"
            | "/flagd.sync.v1.FlagSyncService/SyncFlags"
    )
}

/// The methods under the Admin rate limit.
fn is_rate_limited(path: &str) -> bool {
    path.starts_with("/flagmesh.v1.Admin/")
}

/// A tower layer enforcing a [`Policy`] with an [`Authenticator`], and the
/// limits of [`Security`]: streams per client, the Admin rate limit, and
/// (on a listener that verifies client certificates) a verified client
/// certificate for mesh calls.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    policy: Policy,
    streams: StreamLimiter,
    rate: RateLimiter,
    mesh_needs_cert: bool,
}

impl AuthLayer {
    /// A layer checking every call against `policy`.
    pub fn new(security: &Security, policy: Policy) -> Self {
        Self {
            auth: security.auth.clone(),
            policy,
            streams: StreamLimiter::new(security.limits.streams_per_client),
            rate: RateLimiter::new(
                security.limits.admin_rate_per_sec,
                security.limits.admin_burst,
            ),
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
        let requirement = (self.policy)(path);
        let principal = self.auth.authorize(headers, requirement)?;
        if requirement == Requirement::Mesh && self.mesh_needs_cert && !has_client_cert(ext) {
            return Err(Status::unauthenticated(
                "mesh calls on this server need a client certificate signed by its client CA (mTLS)",
            ));
        }
        let name = principal.as_ref().map_or("anonymous", |p| p.name.as_str());
        if is_rate_limited(path)
            && let Err(wait) = self.rate.check(name)
        {
            return Err(Status::resource_exhausted(format!(
                "rate limit: credential \"{name}\" makes more Admin calls than allowed; retry in {} ms",
                wait.as_millis().max(1)
            )));
        }
        let permit = if is_stream_method(path) {
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

/// The caller of a tonic request, as the auth layer identified it.
pub fn principal<T>(req: &tonic::Request<T>) -> Option<&Principal> {
    req.extensions().get::<Principal>()
}

/// A tonic interceptor that adds a bearer token to every call.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// Sends `token` (or nothing when `None`).
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let value = match token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                Status::invalid_argument("the token holds characters a header cannot carry")
            })?),
            None => None,
        };
        Ok(Self(value))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        let list = format!(
            "ops:write:{},edge:mesh:{}",
            hash_token("w-secret"),
            hash_token("m-secret")
        );
        Authenticator::configure(None, Some(&list), false).expect("valid tokens")
    }

    fn headers(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        h
    }

    #[test]
    fn roles_meet_requirements() {
        let a = auth();
        assert!(
            a.authorize(&headers("w-secret"), Requirement::Write)
                .is_ok()
        );
        assert_eq!(
            a.authorize(&headers("w-secret"), Requirement::Mesh)
                .err()
                .map(|s| s.code()),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            a.authorize(&headers("nope"), Requirement::Read)
                .err()
                .map(|s| s.code()),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            a.authorize(&http::HeaderMap::new(), Requirement::Read)
                .err()
                .map(|s| s.code()),
            Some(tonic::Code::Unauthenticated)
        );
        assert!(
            a.authorize(&http::HeaderMap::new(), Requirement::Public)
                .is_ok()
        );
        let p = a
            .authorize(&headers("m-secret"), Requirement::Mesh)
            .ok()
            .flatten();
        assert_eq!(p.map(|p| p.name), Some("edge".to_owned()));
    }

    #[test]
    fn refuses_to_start_without_tokens_unless_dev() {
        assert!(matches!(
            Authenticator::configure(None, None, false),
            Err(AuthConfigError::NoTokens)
        ));
        assert!(Authenticator::configure(None, None, true).is_ok_and(|a| a.is_insecure()));
        assert!(Authenticator::configure(None, Some("x:root:abcd"), false).is_err());
    }

    #[test]
    fn errors_never_echo_the_token() {
        let a = auth();
        let e = a
            .authorize(&headers("super-secret-value"), Requirement::Read)
            .err();
        assert!(e.is_some_and(|s| !s.message().contains("super-secret-value")));
    }
}
