//! Reports flow up the mesh: every node reports its applied revision (and
//! any revision it refused) to its current upstream on a `Report` stream;
//! hubs forward the reports of their subtree the same way. Only the latest
//! report per node is kept while waiting to be sent, so memory is bounded by
//! the subtree's size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flagmesh_proto::v1::NodeReport;
use flagmesh_proto::v1::sync_client::SyncClient;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::source::ReportSink;
use crate::subscriber::SyncStatus;
use flagmesh_client::BearerToken;
use tokio_util::sync::CancellationToken;

/// Sends reports to the upstream the subscriber follows.
pub struct Reporter {
    node_id: String,
    pending: Mutex<HashMap<String, NodeReport>>,
    notify: Notify,
    token: Option<String>,
    tls: Option<flagmesh_client::ClientTls>,
}

impl Reporter {
    /// A reporter for `node_id`, presenting `token` (over `tls`, if any).
    pub fn new(
        node_id: String,
        token: Option<String>,
        tls: Option<flagmesh_client::ClientTls>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            pending: Mutex::new(HashMap::new()),
            notify: Notify::new(),
            token,
            tls,
        })
    }

    /// Queues a report (replacing an unsent older one of the same node).
    pub fn submit(&self, report: NodeReport) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(report.node_id.clone(), report);
        self.notify.notify_one();
    }

    fn drain(&self) -> Vec<NodeReport> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect()
    }

    /// Sends queued reports to the current upstream until `stop` is cancelled.
    pub async fn run(
        self: Arc<Self>,
        mut status: watch::Receiver<SyncStatus>,
        stop: CancellationToken,
    ) {
        loop {
            let upstream = report_target(&status.borrow_and_update());
            let Some(upstream) = upstream else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = status.changed() => if r.is_err() { return },
                }
                continue;
            };
            // a TLS file being replaced or an upstream down: try again soon
            let connected = match flagmesh_client::endpoint(&upstream, self.tls.as_ref()) {
                Ok(e) => e
                    .connect_timeout(Duration::from_secs(2))
                    .connect()
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let channel = match connected {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(upstream = %upstream, error = %e, "report stream: cannot connect");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let Ok(token) = BearerToken::new(self.token.as_deref()) else {
                return;
            };
            let mut client = SyncClient::with_interceptor(channel, token);
            let (tx, rx) = mpsc::channel(256);
            let call = tokio::spawn(async move { client.report(ReceiverStream::new(rx)).await });
            'stream: loop {
                for r in self.drain() {
                    if tx.send(r).await.is_err() {
                        break 'stream;
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break 'stream,
                    _ = self.notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    r = status.changed() => {
                        if r.is_err() {
                            break 'stream;
                        }
                        if report_target(&status.borrow()).as_ref() != Some(&upstream) {
                            break 'stream;
                        }
                    }
                }
                if call.is_finished() {
                    break;
                }
            }
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(1), call).await;
            if stop.is_cancelled() {
                return;
            }
        }
    }
}

/// Where reports go: the upstream followed; while in a history conflict,
/// the conflicting upstream, which still hears of it (that is where an
/// operator looks).
fn report_target(s: &SyncStatus) -> Option<String> {
    if s.connected {
        Some(s.upstream.clone())
    } else {
        s.history_conflict.as_ref().map(|c| c.upstream.clone())
    }
}

impl ReportSink for Reporter {
    /// A report from this node's subtree: forwarded upward.
    fn report(&self, mut report: NodeReport) {
        if report.via.is_empty() {
            report.via = self.node_id.clone();
        }
        self.submit(report);
    }
}
