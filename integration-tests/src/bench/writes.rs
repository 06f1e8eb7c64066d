//! Commit latency and write throughput at the control plane: sequential
//! `UpdateFlag` calls (each acknowledged once durable: flushed to sled, or
//! committed in PostgreSQL), then concurrent writers for a fixed time.

use std::time::{Duration, Instant};

use flagmesh_proto::v1::UpdateFlagRequest;
use serde_json::{Value, json};

use super::percentiles;
use crate::topology::Mesh;

fn write(key: String, i: u64) -> UpdateFlagRequest {
    UpdateFlagRequest {
        flag_set: "bench".into(),
        key,
        definition_json: format!(
            r#"{{"state":"ENABLED","variants":{{"v":{i}}},"defaultVariant":"v"}}"#
        ),
        force: true,
        ..Default::default()
    }
}

/// `sequential` writes one after another, then `writers` concurrent
/// writers for `seconds`.
pub async fn run(
    mesh: &Mesh,
    sequential: u64,
    writers: usize,
    seconds: u64,
) -> Result<Value, String> {
    let mut admin = mesh.admin().await.map_err(|e| e.to_string())?;
    let mut latency = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for i in 0..sequential {
        let t = Instant::now();
        admin
            .update_flag(write(format!("seq-{}", i % 50), i))
            .await
            .map_err(|e| e.to_string())?;
        let _ = latency.record(t.elapsed().as_micros() as u64);
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut admin = mesh.admin().await.map_err(|e| e.to_string())?;
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                if admin
                    .update_flag(write(format!("w{w}-{}", done % 20), done))
                    .await
                    .is_ok()
                {
                    done += 1;
                }
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())?;
    }
    Ok(json!({
        "sequential": sequential,
        "commit_latency_us": percentiles(&latency),
        "writers": writers,
        "seconds": seconds,
        "writes_per_second": total as f64 / seconds as f64,
    }))
}
