//! A relay: what hubs and PoPs share. It follows its upstreams into a
//! replica store, serves the same state downstream through a fan-out (a
//! PoP serves SDKs in local mode this way), and reports its applied
//! revision (and its subtree's reports) upward.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flagmesh_proto::v1::NodeReport;
use tokio::sync::watch;

use crate::fanout::{Fanout, FanoutConfig, Head};
use crate::replica::{Applied, ApplyError, ReplicaSource, ReplicaStore};
use crate::reporter::Reporter;
use crate::subscriber::{
    ReplicaObserver, Subscriber, SubscriberConfig, SubscriberStats, SyncStatus,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The replica's folder.
    pub data_dir: PathBuf,
    /// Whom to follow, and how.
    pub subscriber: SubscriberConfig,
    /// The downstream fan-out.
    pub fanout: FanoutConfig,
    /// How often the node reports itself when nothing changes.
    pub report_interval: Duration,
    /// How long reports gather before they are sent upward together
    /// ([`Reporter`]).
    pub report_gather: Duration,
    /// Flush every applied event before serving it.
    pub sync_writes: bool,
    /// A history an operator adopted: an upstream serving it may replace
    /// the state held, even of another history.
    pub adopt_history: Option<String>,
}

/// A running relay.
pub struct Relay {
    /// The replica.
    pub replica: Arc<ReplicaStore>,
    /// The downstream fan-out.
    pub fanout: Arc<Fanout>,
    /// The subscriber's status.
    pub status: watch::Receiver<SyncStatus>,
    /// The subscriber's counters.
    pub stats: Arc<SubscriberStats>,
    /// Sends reports upward; also the sink for the subtree's reports.
    pub reporter: Arc<Reporter>,
    /// Who hears of the node's readiness ([`Relay::watch_readiness`]).
    readiness: Arc<ReadinessSlot>,
}

/// Called with whether the node is ready and why not (empty when it is).
type ReadinessFn = Box<dyn Fn(bool, String) + Send + Sync>;

/// The readiness callback, set once, and a wake-up for the status task
/// when it is.
#[derive(Default)]
struct ReadinessSlot {
    report: std::sync::OnceLock<ReadinessFn>,
    set: tokio::sync::Notify,
}

/// Whether `replica` serves (it holds a state that is whole for the flag
/// sets followed: after the scope widened, only once their snapshot came),
/// and the detail: a history conflict or the snapshot awaited (empty when
/// none).
fn readiness(replica: &ReplicaStore, s: &SyncStatus) -> (bool, String) {
    let incomplete = replica.needs_snapshot();
    let detail = match &s.history_conflict {
        Some(c) => format!(
            "history conflict: this node serves history {}; upstream {} serves history {} (refused until adopted: --adopt-history {})",
            replica.position().history_id,
            c.upstream,
            c.history_id,
            c.history_id
        ),
        None if incomplete => format!(
            "the flag sets followed ({}) widened: waiting for their snapshot",
            replica.scope().join(", ")
        ),
        None => String::new(),
    };
    (replica.position().revision > 0 && !incomplete, detail)
}

/// The shareable parts of a relay.
#[derive(Clone)]
pub struct RelayView {
    /// The replica.
    pub replica: Arc<ReplicaStore>,
    /// The downstream fan-out.
    pub fanout: Arc<Fanout>,
    /// The subscriber's status.
    pub status: watch::Receiver<SyncStatus>,
    /// The subscriber's counters.
    pub stats: Arc<SubscriberStats>,
}

struct RelayObserver {
    fanout: Arc<Fanout>,
    extra: Option<Arc<dyn ReplicaObserver>>,
}

impl ReplicaObserver for RelayObserver {
    fn applied(&self, applied: &Applied) {
        if let Some(extra) = &self.extra {
            extra.applied(applied);
        }
        match applied {
            Applied::Snapshot(s) => self.fanout.reset(&s.history_id, s.revision, Some(s.digest)),
            Applied::Delta(d) => self.fanout.publish_shared(d.clone()),
            _ => {}
        }
    }
}

fn own_report(config: &SubscriberConfig, replica: &ReplicaStore, s: &SyncStatus) -> NodeReport {
    let position = replica.position();
    NodeReport {
        node_id: config.node_id.clone(),
        role: config.role as i32,
        region: config.region.clone(),
        upstream: if s.connected {
            s.upstream.clone()
        } else {
            String::new()
        },
        history_id: position.history_id,
        applied_revision: position.revision,
        applied_at_unix_ms: s.applied_at_unix_ms,
        rejected_revision: s.rejected_revision,
        rejected_error: s.rejected_error.clone(),
        head_revision: s.head_revision,
        via: String::new(),
        conflict_history_id: s
            .history_conflict
            .as_ref()
            .map(|c| c.history_id.clone())
            .unwrap_or_default(),
    }
}

impl Relay {
    /// Calls `report(ready, detail)` now and whenever the subscriber's
    /// status changes ([`readiness`]), from the task that reports the
    /// node upward: one task wakes per applied change, not one for each.
    /// A second call is ignored.
    pub fn watch_readiness(&self, report: impl Fn(bool, String) + Send + Sync + 'static) {
        if self.readiness.report.set(Box::new(report)).is_ok() {
            self.readiness.set.notify_one();
        }
    }

    /// The shareable parts.
    pub fn view(&self) -> RelayView {
        RelayView {
            replica: self.replica.clone(),
            fanout: self.fanout.clone(),
            status: self.status.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Opens the replica and starts following, serving and reporting.
    /// `extra` sees every applied change first (a PoP's in-memory state).
    /// Its tasks run on `tasks` until `stop`.
    pub fn start(
        config: RelayConfig,
        replica: Arc<ReplicaStore>,
        extra: Option<Arc<dyn ReplicaObserver>>,
        stop: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Self, ApplyError> {
        replica.adopt_history(config.adopt_history.clone());
        let position = replica.position();
        // a relay following some flag sets serves only those
        let fanout_config = FanoutConfig {
            scope: config.subscriber.flag_sets.clone(),
            ..config.fanout.clone()
        };
        let fanout = Fanout::new(
            Arc::new(ReplicaSource(replica.clone())),
            Head {
                history_id: position.history_id.as_str().into(),
                revision: position.revision,
                upstream_connected: false,
                digest: Some(position.digest),
            },
            fanout_config,
            stop.clone(),
        );
        let observer = Arc::new(RelayObserver {
            fanout: fanout.clone(),
            extra,
        });
        let subscriber = Subscriber::new(config.subscriber.clone(), replica.clone(), observer);
        let status = subscriber.status();
        let stats = subscriber.stats();
        let reporter = Reporter::new(
            config.subscriber.node_id.clone(),
            config.subscriber.mesh_token.clone(),
            config.subscriber.tls.clone(),
            config.report_gather,
        );
        tasks.spawn(subscriber.run(stop.clone()));
        tasks.spawn(reporter.clone().run(status.clone(), stop.clone()));

        // report on every change of status, and every interval when idle;
        // tell downstream whether this relay is connected, and the node
        // whether it is ready
        let readiness_slot = Arc::new(ReadinessSlot::default());
        let (mut watch_status, reporter2, fanout2, replica2, slot) = (
            status.clone(),
            reporter.clone(),
            fanout.clone(),
            replica.clone(),
            readiness_slot.clone(),
        );
        let sub_config = config.subscriber.clone();
        let interval = config.report_interval;
        let stop = stop.clone();
        tasks.spawn(async move {
            loop {
                let (own, readiness_now) = {
                    let s = watch_status.borrow_and_update();
                    fanout2.set_upstream_connected(s.connected && s.upstream_connected);
                    let readiness_now = slot
                        .report
                        .get()
                        .map(|tell| (tell, readiness(&replica2, &s)));
                    (own_report(&sub_config, &replica2, &s), readiness_now)
                };
                if let Some((tell, (ready, detail))) = readiness_now {
                    tell(ready, detail);
                }
                reporter2.submit(own);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = watch_status.changed() => if r.is_err() { return },
                    _ = slot.set.notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
        Ok(Self {
            replica,
            fanout,
            status,
            stats,
            reporter,
            readiness: readiness_slot,
        })
    }
}
