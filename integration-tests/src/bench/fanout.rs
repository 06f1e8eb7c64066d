//! Fan-out cost: CPU time a hub spends per change delivered to many
//! subscribers (each change is encoded once and its bytes shared).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flagmesh_client::BearerToken;
use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_proto::v1::sync_event::Event;
use flagmesh_proto::v1::{SubscribeRequest, UpdateFlagRequest};
use serde_json::{Value, json};

use super::cpu_seconds;
use crate::topology::Mesh;

/// Opens `subscribers` streams on hub 0, writes `changes` changes, and
/// measures the hub's CPU time until every stream has every change.
pub async fn run(mesh: &Mesh, subscribers: usize, changes: u64) -> Result<Value, String> {
    let hub = &mesh.hubs[0];
    let pid = hub
        .process
        .as_ref()
        .map(|p| p.pid())
        .ok_or("no hub process")?;
    let (revision0, _) = mesh.converged(Duration::from_secs(30)).await?;
    let reached = Arc::new(AtomicU64::new(0));
    let target = revision0 + changes;
    let mut tasks = Vec::new();
    // a few HTTP/2 connections, many streams each
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", hub.grpc))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    for i in 0..subscribers {
        let mut c = SyncClient::with_interceptor(
            channels[i % channels.len()].clone(),
            BearerToken::new(None).map_err(|e| e.to_string())?,
        );
        let mut stream = c
            .subscribe(SubscribeRequest {
                node_id: format!("bench-{i}"),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let reached = reached.clone();
        tasks.push(tokio::spawn(async move {
            let mut at = 0;
            while let Ok(Some(ev)) = stream.message().await {
                let rev = match ev.event {
                    Some(Event::Snapshot(s)) if s.last => s.revision,
                    Some(Event::Delta(d)) => d.to_revision,
                    _ => continue,
                };
                at = rev;
                if at >= target {
                    reached.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            let _ = at;
        }));
    }
    // let every stream take its snapshot before measuring
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut admin = mesh.admin().await.map_err(|e| e.to_string())?;
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    for c in 0..changes {
        admin
            .update_flag(UpdateFlagRequest {
                flag_set: "bench".into(),
                key: "fanout-probe".into(),
                definition_json: format!(
                    r#"{{"state":"ENABLED","variants":{{"v":{c}}},"defaultVariant":"v"}}"#
                ),
                force: true,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while reached.load(Ordering::Relaxed) < subscribers as u64 {
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {subscribers} subscribers got every change",
                reached.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_seconds(pid) - cpu0;
    for t in tasks {
        t.abort();
    }
    Ok(json!({
        "subscribers": subscribers,
        "changes": changes,
        "hub_cpu_seconds": cpu,
        "hub_cpu_ms_per_change": cpu * 1000.0 / changes as f64,
        "hub_cpu_us_per_delivery": cpu * 1e6 / (changes as f64 * subscribers as f64),
        "wall_seconds": elapsed.as_secs_f64(),
    }))
}
