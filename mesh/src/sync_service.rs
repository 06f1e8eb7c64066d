//! The `flagmesh.v1.Sync` gRPC service over a [`Fanout`] and a [`ReportSink`].

use std::sync::Arc;

use flagmesh_proto::shared::SharedSyncEvent;
use flagmesh_proto::shared::sync_server::{Sync, SyncServer};
use flagmesh_proto::v1::{NodeReport, ReportAck, SubscribeRequest};
use tokio_stream::wrappers::ReceiverStream;
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
    type SubscribeStream = ReceiverStream<Result<SharedSyncEvent, Status>>;

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().node_id, resume = request.get_ref().resume_revision))]
    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let stream = self.fanout.subscribe(request.into_inner())?;
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
