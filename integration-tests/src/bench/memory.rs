//! Resident memory of a PoP holding N realistic flags: steady (VmRSS once
//! converged) and peak (VmHWM), and the bytes per flag that implies over an
//! empty PoP.

use std::time::Duration;

use serde_json::{Value, json};

use super::{distinct_flag, document_of, realistic_flag, rss_kib};
use crate::topology::{Mesh, NodeRef, TopologySpec};

/// Flags per ApplyFlagSet call (keeps each request well under 4 MiB).
const PER_SET: usize = 5_000;

/// Loads `flags` flags into a fresh control + one PoP and measures the PoP;
/// with `distinct`, no two flags have the same targeting.
pub async fn run(
    spec: TopologySpec,
    flags: usize,
    distinct: bool,
) -> Result<(Value, Mesh), String> {
    let make = if distinct {
        distinct_flag
    } else {
        realistic_flag
    };
    let mesh = Mesh::start(spec).await.map_err(|e| e.to_string())?;
    let pid = mesh.pops[0]
        .process
        .as_ref()
        .map(|p| p.pid())
        .ok_or("no PoP process")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (empty_kib, _) = rss_kib(pid);
    let mut admin = mesh.admin().await.map_err(|e| e.to_string())?;
    let mut start = 0;
    let mut set = 0;
    while start < flags {
        let count = PER_SET.min(flags - start);
        admin
            .apply_flag_set(flagmesh_proto::v1::ApplyFlagSetRequest {
                document: document_of(&format!("set-{set}"), "flag", start, count, make),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        start += count;
        set += 1;
    }
    mesh.converged(Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = mesh
        .metrics(NodeRef::Pop(0))
        .await
        .map_err(|e| e.to_string())?
        .get("flagmesh_store_flags")
        .copied()
        .unwrap_or(0.0);
    let (loaded_kib, _) = rss_kib(pid);
    // evaluate every flag once: each is compiled on first use
    let mut eval = mesh.eval(0).await.map_err(|e| e.to_string())?;
    for s in 0..set {
        eval.evaluate_all(flagmesh_proto::v1::EvaluateAllRequest {
            flag_set: format!("set-{s}"),
            context: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    // steady: once the PoP has been quiet for a moment (it hands memory
    // freed after a burst of work back to the system within a second)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (steady_kib, peak_kib) = rss_kib(pid);
    let per_flag = (steady_kib.saturating_sub(empty_kib) * 1024) as f64 / flags.max(1) as f64;
    Ok((
        json!({
            "flags": flags,
            "rules": if distinct { "all distinct" } else { "repeated" },
            "flags_held": held,
            "empty_rss_mib": empty_kib as f64 / 1024.0,
            "loaded_rss_mib": loaded_kib as f64 / 1024.0,
            "steady_rss_mib": steady_kib as f64 / 1024.0,
            "peak_rss_mib": peak_kib as f64 / 1024.0,
            "bytes_per_flag": per_flag.round(),
        }),
        mesh,
    ))
}
