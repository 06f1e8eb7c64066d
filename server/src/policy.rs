//! What each gRPC method asks of its caller. A node declares its services
//! and, per method, a [`MethodPolicy`]: the [`Requirement`] its credential
//! must meet, whether the call is a long-lived stream (counted against the
//! per-client stream limit), and whether it is rate limited. The shared
//! layer knows no node's methods: it only looks paths up in the
//! [`AccessPolicy`] the node built.

use std::collections::HashMap;
use std::sync::Arc;

use crate::credentials::Role;

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

/// What one method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodPolicy {
    /// The credential it needs.
    pub requirement: Requirement,
    /// A long-lived stream: limited per client.
    pub streaming: bool,
    /// Under the node's request rate limit (per credential).
    pub rate_limited: bool,
}

impl MethodPolicy {
    /// A unary call needing `requirement`.
    pub const fn unary(requirement: Requirement) -> Self {
        Self {
            requirement,
            streaming: false,
            rate_limited: false,
        }
    }

    /// A long-lived stream needing `requirement`.
    pub const fn stream(requirement: Requirement) -> Self {
        Self {
            requirement,
            streaming: true,
            rate_limited: false,
        }
    }

    /// The same, under the rate limit.
    pub const fn rate_limited(self) -> Self {
        Self {
            rate_limited: true,
            ..self
        }
    }
}

/// The policy of one gRPC service: a default for its methods and the
/// methods that differ.
#[derive(Debug, Clone)]
pub struct ServicePolicy {
    name: String,
    default: MethodPolicy,
    methods: HashMap<String, MethodPolicy>,
}

impl ServicePolicy {
    /// Service `name` (`package.Service`), every method `default` unless
    /// named otherwise.
    pub fn new(name: impl Into<String>, default: MethodPolicy) -> Self {
        Self {
            name: name.into(),
            default,
            methods: HashMap::new(),
        }
    }

    /// `method` (its name only) has `policy`.
    pub fn method(mut self, method: &str, policy: MethodPolicy) -> Self {
        self.methods.insert(method.to_owned(), policy);
        self
    }

    /// Every one of `methods` has `policy`.
    pub fn methods(mut self, methods: &[&str], policy: MethodPolicy) -> Self {
        for m in methods {
            self.methods.insert((*m).to_owned(), policy);
        }
        self
    }

    /// The service's full name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Every service a server exposes, with its methods' policies; a path of
/// no declared service needs [`Requirement::Admin`] (and is then refused by
/// the router as unimplemented).
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    services: HashMap<String, ServicePolicy>,
}

/// What an undeclared path asks: an admin credential.
const UNDECLARED: MethodPolicy = MethodPolicy::unary(Requirement::Admin);

impl AccessPolicy {
    /// Adds (or replaces) a service's policy.
    pub fn add(&mut self, service: ServicePolicy) {
        self.services.insert(service.name.clone(), service);
    }

    /// The policy of a call by its path `/package.Service/Method`.
    pub fn lookup(&self, path: &str) -> MethodPolicy {
        let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
            return UNDECLARED;
        };
        match self.services.get(service) {
            Some(s) => s.methods.get(method).copied().unwrap_or(s.default),
            None => UNDECLARED,
        }
    }

    /// The names of the declared services.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Shared, for the access layer.
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_override_their_service_default() {
        let mut p = AccessPolicy::default();
        p.add(
            ServicePolicy::new("a.v1.Svc", MethodPolicy::unary(Requirement::Write))
                .method("Get", MethodPolicy::unary(Requirement::Read))
                .method("Follow", MethodPolicy::stream(Requirement::Evaluate)),
        );
        assert_eq!(p.lookup("/a.v1.Svc/Get").requirement, Requirement::Read);
        assert_eq!(p.lookup("/a.v1.Svc/Put").requirement, Requirement::Write);
        assert!(p.lookup("/a.v1.Svc/Follow").streaming);
        assert!(!p.lookup("/a.v1.Svc/Put").streaming);
        assert_eq!(p.lookup("/other.Svc/X"), UNDECLARED);
        assert_eq!(p.lookup("garbage"), UNDECLARED);
    }
}
