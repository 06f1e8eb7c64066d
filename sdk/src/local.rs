//! Local mode: the client follows a PoP's (or hub's) `Subscribe` stream
//! with the mesh subscriber, keeps the compiled state in memory (and, with a
//! data directory, on disk, so a restarted service evaluates before it
//! reconnects) and evaluates in-process: no network hop per evaluation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use flagmesh_engine::validate_context;
use flagmesh_mesh::compiled::{PopState, StateSwap, Target};
use flagmesh_mesh::replica::ReplicaStore;
use flagmesh_mesh::subscriber::{Subscriber, SubscriberConfig, SyncStatus};
use flagmesh_proto::v1::NodeRole;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::details::{Details, FromJson};

/// How a local client follows the mesh.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// PoP or hub addresses to follow (rendezvous order, failover).
    pub upstreams: Vec<String>,
    /// A credential that may follow (an evaluation key scoped to the flag
    /// set, or a mesh credential).
    pub token: Option<String>,
    /// The flag set to follow and evaluate.
    pub flag_set: String,
    /// This client's id in the mesh.
    pub node_id: String,
    /// Where to persist the state (None: memory only).
    pub data_dir: Option<PathBuf>,
    /// A silent stream is dropped after this long.
    pub stall_timeout: Duration,
    /// TLS to the upstreams (`None`: plaintext).
    pub tls: Option<flagmesh_client::ClientTls>,
}

impl LocalConfig {
    /// Follows `flag_set` from `upstreams`, in memory.
    pub fn new(upstreams: Vec<String>, flag_set: &str) -> Self {
        Self {
            upstreams,
            token: None,
            flag_set: flag_set.to_owned(),
            node_id: format!("sdk-{}", std::process::id()),
            data_dir: None,
            stall_timeout: Duration::from_secs(6),
            tls: None,
        }
    }
}

/// Why a local client could not start.
#[derive(Debug, thiserror::Error)]
#[error("local state: {0}")]
pub struct LocalError(String);

/// Evaluates in-process from a replicated state.
pub struct LocalClient {
    state: Arc<ArcSwap<PopState>>,
    status: watch::Receiver<SyncStatus>,
    changes: watch::Receiver<u64>,
    flag_set: String,
    stop: CancellationToken,
}

impl LocalClient {
    /// Loads any persisted state (usable at once) and starts following.
    pub fn start(config: LocalConfig) -> Result<Self, LocalError> {
        let (replica, loaded) = match &config.data_dir {
            Some(dir) => {
                ReplicaStore::open_scoped(dir, true, std::slice::from_ref(&config.flag_set))
            }
            None => ReplicaStore::open_temporary().map(|store| (store, Default::default())),
        }
        .map_err(|e| LocalError(e.to_string()))?;
        let replica = Arc::new(replica);
        let state = Arc::new(ArcSwap::from_pointee(PopState::from_snapshot(&loaded)));
        let (changes_tx, changes) = watch::channel(loaded.revision);
        let mut sub = SubscriberConfig::new(
            config.node_id.clone(),
            NodeRole::Sdk,
            String::new(),
            config.upstreams.clone(),
        );
        sub.mesh_token = config.token.clone();
        sub.tls = config.tls.clone();
        sub.flag_sets = vec![config.flag_set.clone()];
        sub.stall_timeout = config.stall_timeout;
        sub.backoff_max = Duration::from_secs(2);
        let subscriber = Subscriber::new(
            sub,
            replica,
            Arc::new(StateSwap {
                state: state.clone(),
                changes: changes_tx,
            }),
        );
        let status = subscriber.status();
        let stop = CancellationToken::new();
        tokio::spawn(subscriber.run(stop.clone()));
        Ok(Self {
            state,
            status,
            changes,
            flag_set: config.flag_set,
            stop,
        })
    }

    /// Waits until some state is held (from disk or upstream), at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut changes = self.changes.clone();
        tokio::time::timeout(timeout, changes.wait_for(|r| *r > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The revision held (0: none yet).
    pub fn revision(&self) -> u64 {
        self.state.load().revision
    }

    /// Whether answers may be stale.
    pub fn stale(&self) -> bool {
        self.revision() == 0 || self.status.borrow().stale()
    }

    /// Follows changes (the revision after each).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Every flag key of the followed set.
    pub fn keys(&self) -> Vec<String> {
        let state = self.state.load();
        let mut keys: Vec<String> = state
            .sets
            .get(&self.flag_set)
            .map(|s| s.flags.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// A typed evaluation, in-process; always returns a value.
    pub fn value<T: FromJson>(&self, key: &str, context: &Value, default: T) -> Details<T> {
        let state = self.state.load();
        let context_error = validate_context(context).err();
        let stale = self.stale();
        let target = Target::lookup(&state, &self.flag_set, key);
        let o = target.resolve(context, context_error.as_ref(), T::TYPE);
        let r = &o.resolution;
        let (value, variant) = match (r.value.and_then(T::from_json), &r.error) {
            (Some(v), None) => (v, r.variant.map(str::to_owned)),
            _ => (default, None),
        };
        Details {
            value,
            variant,
            reason: r.reason.as_str().to_owned(),
            error_code: r.error.as_ref().map(|e| e.code.as_str().to_owned()),
            error_message: r.error.as_ref().map(|e| e.message.to_string()),
            metadata: r.metadata.to_map(),
            revision: state.revision,
            pop_id: String::new(),
            stale,
        }
    }

    /// A boolean flag, or `default`.
    pub fn bool_value(&self, key: &str, context: &Value, default: bool) -> Details<bool> {
        self.value(key, context, default)
    }

    /// A string flag, or `default`.
    pub fn string_value(&self, key: &str, context: &Value, default: &str) -> Details<String> {
        self.value(key, context, default.to_owned())
    }

    /// An integer flag, or `default`.
    pub fn int_value(&self, key: &str, context: &Value, default: i64) -> Details<i64> {
        self.value(key, context, default)
    }

    /// A number flag, or `default`.
    pub fn float_value(&self, key: &str, context: &Value, default: f64) -> Details<f64> {
        self.value(key, context, default)
    }

    /// An object flag, or `default`.
    pub fn json_value(
        &self,
        key: &str,
        context: &Value,
        default: serde_json::Map<String, Value>,
    ) -> Details<serde_json::Map<String, Value>> {
        self.value(key, context, default)
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
