//! A reconnect storm at a hub: N fresh subscribers (each needs a snapshot)
//! open their streams at once against a hub holding many flags. The hub's
//! memory must not grow with N copies of the state: snapshots are encoded
//! chunk by chunk as each subscriber takes them, from one shared read.
//! Half the subscribers read their whole snapshot; the other half take one
//! chunk and then stall (slow reconnectors). Measured: the hub's resident
//! memory before, its peak during the storm, and how long the readers took.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flagmesh_client::BearerToken;
use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_proto::v1::sync_event::Event;
use flagmesh_proto::v1::{ApplyFlagSetRequest, SubscribeRequest};
use serde_json::{Value, json};

use super::{document, rss_kib};
use crate::topology::Mesh;

/// Flags per ApplyFlagSet call.
const PER_SET: usize = 5_000;

/// Loads `flags` flags, then storms hub 0 with `subscribers` snapshots.
pub async fn run(mesh: &Mesh, flags: usize, subscribers: usize) -> Result<Value, String> {
    let hub = &mesh.hubs[0];
    let pid = hub
        .process
        .as_ref()
        .map(|p| p.pid())
        .ok_or("no hub process")?;
    let mut admin = mesh.admin().await.map_err(|e| e.to_string())?;
    let mut start = 0;
    let mut set = 0;
    while start < flags {
        let count = PER_SET.min(flags - start);
        admin
            .apply_flag_set(ApplyFlagSetRequest {
                document: document(&format!("set-{set}"), "flag", start, count),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        start += count;
        set += 1;
    }
    mesh.converged(Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (before_kib, _) = rss_kib(pid);
    let mut channels = Vec::new();
    for _ in 0..16 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", hub.grpc))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let complete = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..subscribers {
        let mut client = SyncClient::with_interceptor(
            channels[i % channels.len()].clone(),
            BearerToken::new(None).map_err(|e| e.to_string())?,
        )
        .max_decoding_message_size(64 << 20);
        let (complete, bytes) = (complete.clone(), bytes.clone());
        let reader = i % 2 == 0;
        tasks.push(tokio::spawn(async move {
            let mut stream = client
                .subscribe(SubscribeRequest {
                    node_id: format!("storm-{i}"),
                    ..Default::default()
                })
                .await?
                .into_inner();
            while let Some(ev) = stream.message().await? {
                if let Some(Event::Snapshot(s)) = ev.event {
                    bytes.fetch_add(
                        s.flags.iter().map(|f| f.definition_json.len() as u64).sum(),
                        Ordering::Relaxed,
                    );
                    if s.last {
                        complete.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    if !reader {
                        // a slow reconnector: holds its stream, reads nothing
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
            }
            // keep the stream open until the storm ends
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, tonic::Status>(())
        }));
    }
    let readers = subscribers.div_ceil(2) as u64;
    let mut peak_kib = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while complete.load(Ordering::Relaxed) < readers {
        if Instant::now() > deadline {
            break;
        }
        peak_kib = peak_kib.max(rss_kib(pid).0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let readers_seconds = t0.elapsed().as_secs_f64();
    // stalled streams still open: what the hub holds for them
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (held_kib, hwm_kib) = rss_kib(pid);
    for t in tasks {
        t.abort();
    }
    // the storm over, every stream closed: what the hub keeps
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after_kib, _) = rss_kib(pid);
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(json!({
        "flags": flags,
        "subscribers": subscribers,
        "readers_complete": complete.load(Ordering::Relaxed),
        "readers_seconds": readers_seconds,
        "snapshot_bytes_received": bytes.load(Ordering::Relaxed),
        "hub_rss_before_mib": mib(before_kib),
        "hub_rss_peak_sampled_mib": mib(peak_kib.max(held_kib)),
        "hub_rss_hwm_mib": mib(hwm_kib),
        "hub_rss_with_stalled_streams_mib": mib(held_kib),
        "hub_rss_after_mib": mib(after_kib),
    }))
}
