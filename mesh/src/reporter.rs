//! Reports flow up the mesh: every node reports its applied revision (and
//! any revision it refused) to its current upstream on a `Report` stream;
//! hubs forward the reports of their subtree the same way. Only the latest
//! report per node is kept while waiting to be sent, so memory is bounded by
//! the subtree's size.
//!
//! At a hub, reports gather for an interval before they go
//! (`--report-gather-ms`, 250 ms): its hundred PoPs' reports of a change
//! go up as one batch, and a burst of changes costs one report per node
//! per interval. A report carries when its revision was applied, so what
//! the gathering delays is the report, never the time it tells. A PoP
//! reports at once: measured, a timer of its own costs it more thread
//! wake-ups than the reports it saves (BENCHMARKS.md, propagation).

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

/// How long a hub's reports gather by default, in milliseconds.
pub const DEFAULT_GATHER_MS: u64 = 250;

/// How long a node of `role` gathers its reports by default: a PoP sends
/// at once (see the module's comment).
pub fn default_gather(role: flagmesh_proto::v1::NodeRole) -> Duration {
    match role {
        flagmesh_proto::v1::NodeRole::Pop => Duration::ZERO,
        _ => Duration::from_millis(DEFAULT_GATHER_MS),
    }
}

/// Sends reports to the upstream the subscriber follows.
pub struct Reporter {
    node_id: String,
    pending: Mutex<HashMap<String, NodeReport>>,
    notify: Notify,
    token: Option<String>,
    tls: Option<flagmesh_client::ClientTls>,
    gather: Duration,
}

impl Reporter {
    /// A reporter for `node_id`, presenting `token` (over `tls`, if any),
    /// sending what `gather` collects together.
    pub fn new(
        node_id: String,
        token: Option<String>,
        tls: Option<flagmesh_client::ClientTls>,
        gather: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            pending: Mutex::new(HashMap::new()),
            notify: Notify::new(),
            token,
            tls,
            gather,
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
                // not woken by every change of status (each applied
                // change is one): a new upstream comes with a report of
                // this node's, which wakes it, and the one-second tick is a
                // backstop
                let notified = tokio::select! {
                    _ = stop.cancelled() => break 'stream,
                    _ = self.notify.notified() => true,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                };
                if status.has_changed().is_err()
                    || report_target(&status.borrow()).as_ref() != Some(&upstream)
                {
                    break 'stream;
                }
                // what else comes within the interval goes with it
                if notified && !self.gather.is_zero() {
                    tokio::select! {
                        _ = stop.cancelled() => break 'stream,
                        _ = tokio::time::sleep(self.gather) => {}
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use flagmesh_proto::shared::sync_server::{Sync, SyncServer};
    use flagmesh_proto::v1::{NodeReport, ReportAck, SubscribeRequest};
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;
    use tonic::{Request, Response, Status, Streaming};

    use super::Reporter;
    use crate::subscriber::SyncStatus;

    /// An upstream that keeps every report it receives, in order.
    #[derive(Clone, Default)]
    struct Upstream(std::sync::Arc<Mutex<Vec<NodeReport>>>);

    #[tonic::async_trait]
    impl Sync for Upstream {
        type SubscribeStream = crate::snapshot_stream::SubscribeStream;

        async fn subscribe(
            &self,
            _: Request<SubscribeRequest>,
        ) -> Result<Response<Self::SubscribeStream>, Status> {
            Err(Status::unimplemented("reports only"))
        }

        async fn report(
            &self,
            request: Request<Streaming<NodeReport>>,
        ) -> Result<Response<ReportAck>, Status> {
            let mut stream = request.into_inner();
            let mut received = 0;
            while let Some(r) = stream.message().await? {
                received += 1;
                self.0.lock().unwrap().push(r);
            }
            Ok(Response::new(ReportAck { received }))
        }
    }

    fn report(node: &str, revision: u64) -> NodeReport {
        NodeReport {
            node_id: node.into(),
            applied_revision: revision,
            ..NodeReport::default()
        }
    }

    /// A burst of changes at a node and its subtree: what the interval
    /// gathers goes up as one report per node, the latest of each; then
    /// one more change, after a quiet moment, is reported on its own.
    #[tokio::test]
    async fn reports_of_an_interval_go_together_and_the_latest_is_never_lost() {
        let upstream = Upstream::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SyncServer::new(upstream.clone()))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        let reporter = Reporter::new("hub-1".into(), None, None, Duration::from_millis(300));
        let (_status_tx, status) = watch::channel(SyncStatus {
            connected: true,
            upstream: addr.to_string(),
            ..SyncStatus::default()
        });
        let running = tokio::spawn(reporter.clone().run(status, stop.clone()));

        // 40 revisions of the hub and of two PoPs under it, the reporter
        // free to run between them: well within one interval
        for revision in 1..=40 {
            for node in ["hub-1", "pop-1", "pop-2"] {
                reporter.submit(report(node, revision));
            }
            tokio::task::yield_now().await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let latest = |got: &[NodeReport], node: &str| {
            got.iter()
                .filter(|r| r.node_id == node)
                .map(|r| r.applied_revision)
                .next_back()
        };
        loop {
            let got = upstream.0.lock().unwrap().clone();
            if ["hub-1", "pop-1", "pop-2"]
                .iter()
                .all(|n| latest(&got, n) == Some(40))
            {
                // the first report opened an interval and everything else
                // of the burst waited for its end: at most two per node
                for node in ["hub-1", "pop-1", "pop-2"] {
                    let sent = got.iter().filter(|r| r.node_id == node).count();
                    assert!(sent <= 2, "{node}: {sent} reports for a burst of 40");
                }
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the burst's last revisions never arrived: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // quiet, then one change: it arrives, alone
        let before = upstream.0.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        reporter.submit(report("pop-1", 41));
        loop {
            let got = upstream.0.lock().unwrap().clone();
            if latest(&got, "pop-1") == Some(41) {
                assert_eq!(got.len(), before + 1, "{:?}", &got[before..]);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "revision 41 never arrived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        let _ = running.await;
        let _ = server.await;
    }
}
