//! Traces over OTLP: with `FLAGMESH_OTLP_ENDPOINT` set, control, hub and
//! PoP processes export spans to a collector (a minimal OTLP/gRPC trace
//! receiver run by this test on loopback); a flag change carries its
//! revision, so its path (commit at control, publish and apply at the hub,
//! apply at the PoP) can be followed across the mesh.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flagmesh_integration_tests::topology::{Mesh, TopologySpec};
use flagmesh_proto::v1::UpdateFlagRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;

/// One span received: service, span name, revision attribute.
type Seen = (String, String, Option<i64>);

/// Every span received.
#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Seen>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Any::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let revision = span
                        .attributes
                        .iter()
                        .find(|a| a.key == "revision")
                        .and_then(|a| match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(Any::IntValue(i)) => Some(*i),
                            Some(Any::StringValue(s)) => s.parse().ok(),
                            _ => None,
                        });
                    seen.push((service.clone(), span.name.clone(), revision));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_can_be_followed_through_the_mesh_by_its_revision() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = collector.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(server))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        let root = tempfile::tempdir().unwrap();
        let mut spec = TopologySpec::test(root.path(), 1, 1);
        spec.envs = vec![
            ("FLAGMESH_OTLP_ENDPOINT".into(), format!("http://{addr}")),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ];
        let mesh = Mesh::start(spec).await.unwrap();
        let mut a = mesh.admin().await.unwrap();
        let revision = a
            .update_flag(UpdateFlagRequest {
                flag_set: "demo".into(),
                key: "traced".into(),
                definition_json: r#"{"state":"ENABLED","variants":{"v":"x"},"defaultVariant":"v"}"#
                    .into(),
                force: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .revision as i64;
        mesh.converged(Duration::from_secs(30)).await.unwrap();
        let want: BTreeSet<(&str, &str)> = [
            ("flagmesh-control", "commit"),
            ("flagmesh-control", "publish"),
            ("flagmesh-hub", "apply"),
            ("flagmesh-hub", "publish"),
            ("flagmesh-pop", "apply"),
        ]
        .into_iter()
        .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got: BTreeSet<(String, String)> = collector
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, _, r)| *r == Some(revision))
                .map(|(s, n, _)| (s.clone(), n.clone()))
                .collect();
            if want
                .iter()
                .all(|(s, n)| got.contains(&((*s).to_owned(), (*n).to_owned())))
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "spans of revision {revision} seen: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("bounded");
}
