//! Who a caller is: the roles a credential may hold and the authenticated
//! [`Principal`] a server puts into each request's extensions. Servers
//! decide with it; services read it (a scoped key follows only its flag
//! sets).

use serde::Deserialize;

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

    /// The role's name, as [`Role::parse`] reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
            Self::Mesh => "mesh",
            Self::Evaluate => "evaluate",
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

/// The caller of a tonic request, as the server's access layer identified it.
pub fn principal<T>(req: &tonic::Request<T>) -> Option<&Principal> {
    req.extensions().get::<Principal>()
}
