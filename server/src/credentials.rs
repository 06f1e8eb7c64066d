//! Credentials a server accepts. Tokens are configured as SHA-256 hashes
//! (never as secrets), each with a name (recorded as the actor in the audit
//! trail) and a role. A request presents `authorization: Bearer <token>`;
//! the token is hashed and compared in constant time with every configured
//! hash. `--insecure-dev` turns the checks off, explicitly and loudly.

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tonic::Status;

pub use flagmesh_client::identity::{Principal, Role};
pub use flagmesh_client::token::hash_token;

use crate::policy::Requirement;

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
