//! Everything a server enforces on its callers: credentials, TLS on its
//! listeners, and limits.

use std::sync::Arc;

use crate::credentials::Authenticator;
use crate::http_access::HttpAccess;
use crate::limits::Limits;
use crate::policy::Requirement;
use crate::tls::ServerTls;

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
    /// Starts the certificate watchers of the TLS listeners on `tasks`,
    /// until `stop`.
    pub fn spawn_tls_watchers(
        &self,
        tasks: &tokio_util::task::TaskTracker,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        for tls in [&self.grpc_tls, &self.http_tls].into_iter().flatten() {
            tls.spawn_watcher(self.tls_reload, tasks, stop);
        }
    }

    /// The TLS listeners, by name (`grpc`, `http`).
    pub fn tls_listeners(&self) -> impl Iterator<Item = (&'static str, &Arc<ServerTls>)> {
        [("grpc", &self.grpc_tls), ("http", &self.http_tls)]
            .into_iter()
            .filter_map(|(name, t)| Some((name, t.as_ref()?)))
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
