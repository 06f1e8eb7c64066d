//! The `flagmesh.v1.Sync` gRPC service over a [`Fanout`] and a [`ReportSink`].

use std::sync::Arc;

use flagmesh_proto::shared::sync_server::{Sync, SyncServer};
use flagmesh_proto::v1::{NodeReport, ReportAck, SubscribeRequest};
use tonic::{Request, Response, Status, Streaming};

use crate::fanout::Fanout;
use crate::source::ReportSink;

/// Serves Subscribe from a fan-out and hands reports to a sink.
pub struct SyncService {
    fanout: Arc<Fanout>,
    reports: Arc<dyn ReportSink>,
}

impl SyncService {
    /// The service, ready to add to a router.
    pub fn server(fanout: Arc<Fanout>, reports: Arc<dyn ReportSink>) -> SyncServer<Self> {
        SyncServer::new(Self { fanout, reports })
            // snapshots of large states come in chunks of about 1 MiB
            .max_encoding_message_size(64 << 20)
    }
}

#[tonic::async_trait]
impl Sync for SyncService {
    type SubscribeStream = crate::snapshot_stream::SubscribeStream;

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().node_id, resume = request.get_ref().resume_revision))]
    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let principal = flagmesh_client::identity::principal(&request).cloned();
        let mut req = request.into_inner();
        // a key scoped to flag sets follows only those: no filter means
        // "all of mine", and a set outside its scope is refused
        if let Some(p) = principal.filter(|p| !p.flag_sets.is_empty()) {
            if req.flag_sets.is_empty() {
                req.flag_sets = p.flag_sets.clone();
            } else if let Some(other) = req.flag_sets.iter().find(|s| !p.may_use_flag_set(s)) {
                return Err(Status::permission_denied(format!(
                    "credential \"{}\" may not follow flag set \"{other}\"",
                    p.name
                )));
            }
        }
        let stream = self.fanout.subscribe(req)?;
        Ok(Response::new(stream))
    }

    async fn report(
        &self,
        request: Request<Streaming<NodeReport>>,
    ) -> Result<Response<ReportAck>, Status> {
        let mut stream = request.into_inner();
        let mut received = 0u64;
        while let Some(report) = stream.message().await? {
            received += 1;
            self.reports.report(report);
        }
        Ok(Response::new(ReportAck { received }))
    }
}
