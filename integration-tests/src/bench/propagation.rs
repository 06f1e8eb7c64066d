//! Propagation across a scale mesh: every PoP is followed through its
//! `Watch` stream (no polling); for each change written at control, the time
//! from just before the write to the moment each PoP delivered the new
//! revision, and to the moment the last PoP did.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flagmesh_client::BearerToken;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use flagmesh_proto::v1::{UpdateFlagRequest, WatchRequest};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::topology::Mesh;

/// Writes `changes` changes and measures how long each took to reach every PoP.
pub async fn run(
    mesh: &Mesh,
    flag_set: &str,
    changes: usize,
    spacing: Duration,
) -> Result<Value, String> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let mut watchers = Vec::new();
    for (i, p) in mesh.pops.iter().enumerate() {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", p.grpc))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut c = EvaluationClient::with_interceptor(
            channel,
            BearerToken::new(None).map_err(|e| e.to_string())?,
        );
        let mut stream = c
            .watch(WatchRequest {
                flag_set: flag_set.into(),
                since_revision: 0,
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let tx = tx.clone();
        watchers.push(tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.message().await {
                let _ = tx.send((i, ev.revision, Instant::now()));
            }
        }));
    }
    drop(tx);
    // CPU of the PoPs and hubs: idle for a moment first (heartbeats,
    // reports), then through the changes
    let pids = |nodes: &[crate::topology::MeshNode]| -> Vec<u32> {
        nodes
            .iter()
            .filter_map(|n| n.process.as_ref().map(|p| p.pid()))
            .collect()
    };
    let (pop_pids, hub_pids) = (pids(&mesh.pops), pids(&mesh.hubs));
    let cpu = |pids: &[u32]| pids.iter().map(|p| super::cpu_seconds(*p)).sum::<f64>();
    let idle_started = (Instant::now(), cpu(&pop_pids), cpu(&hub_pids));
    // long enough that one journal checkpoint in it does not set the
    // baseline (it is scaled to the whole busy time)
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_secs = idle_started.0.elapsed().as_secs_f64();
    let idle_pop = (cpu(&pop_pids) - idle_started.1) / idle_secs;
    let idle_hub = (cpu(&hub_pids) - idle_started.2) / idle_secs;
    let busy_started = (Instant::now(), cpu(&pop_pids), cpu(&hub_pids));
    let mut admin = mesh.admin().await.map_err(|e| e.to_string())?;
    let pops = mesh.pops.len();
    let mut per_pop =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut pending: Vec<(usize, u64, Instant)> = Vec::new();
    for c in 0..changes {
        let t0 = Instant::now();
        let revision = admin
            .update_flag(UpdateFlagRequest {
                flag_set: flag_set.into(),
                key: "propagation-probe".into(),
                definition_json: format!(
                    r#"{{"state":"ENABLED","variants":{{"v":{c}}},"defaultVariant":"v"}}"#
                ),
                force: true,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .revision;
        let mut arrived: HashMap<usize, Instant> = HashMap::new();
        pending.retain(|(pop, rev, at)| {
            if *rev >= revision {
                arrived.entry(*pop).or_insert(*at);
                false
            } else {
                true
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while arrived.len() < pops {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((pop, rev, at))) if rev >= revision => {
                    arrived.entry(pop).or_insert(at);
                }
                Ok(Some(other)) => pending.push(other),
                Ok(None) | Err(_) => {
                    return Err(format!(
                        "change {c} (revision {revision}) reached {} of {pops} PoPs",
                        arrived.len()
                    ));
                }
            }
        }
        let mut last = Duration::ZERO;
        for at in arrived.values() {
            let d = at.duration_since(t0);
            last = last.max(d);
            let _ = per_pop.record(d.as_micros().max(1) as u64);
        }
        let _ = all.record(last.as_micros().max(1) as u64);
        rows.push(json!({"revision": revision, "all_applied_ms": last.as_secs_f64() * 1000.0}));
        tokio::time::sleep(spacing).await;
    }
    let busy_secs = busy_started.0.elapsed().as_secs_f64();
    // CPU beyond what the same time idle costs, per node and per change
    let per_change = |busy: f64, idle_rate: f64, nodes: usize| {
        ((busy - idle_rate * busy_secs) * 1000.0 / (changes.max(1) * nodes.max(1)) as f64).max(0.0)
    };
    let (pop_busy, hub_busy) = (
        cpu(&pop_pids) - busy_started.1,
        cpu(&hub_pids) - busy_started.2,
    );
    let pop_cpu = per_change(pop_busy, idle_pop, pop_pids.len());
    let hub_cpu = per_change(hub_busy, idle_hub, hub_pids.len());
    for w in watchers {
        w.abort();
    }
    Ok(json!({
        "pops": pops,
        "hubs": mesh.hubs.len(),
        "changes": changes,
        "cpu_ms_per_change": {"pop": pop_cpu, "hub": hub_cpu},
        // the raw figures behind it: CPU seconds of all PoPs and all hubs
        // over the changes, their rate idle, and how long the changes took
        "cpu_seconds": {
            "busy_secs": busy_secs,
            "pops_busy": pop_busy, "hubs_busy": hub_busy,
            "pops_idle_per_sec": idle_pop, "hubs_idle_per_sec": idle_hub,
        },
        "commit_to_every_pop_ms": {
            "p50": all.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": all.value_at_quantile(0.99) as f64 / 1000.0,
            "max": all.max() as f64 / 1000.0,
        },
        "commit_to_each_pop_ms": {
            "p50": per_pop.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": per_pop.value_at_quantile(0.99) as f64 / 1000.0,
            "max": per_pop.max() as f64 / 1000.0,
        },
        "per_change": rows,
    }))
}
