//! Resident memory of a PoP holding N realistic flags under a memory
//! budget for compiled flags (or none): steady (VmRSS once every flag was
//! evaluated and the PoP is quiet) and peak (VmHWM), the bytes per flag
//! that implies over an empty PoP; then, with the flags in place, what a
//! first evaluation of a flag that is not compiled costs against one that
//! is, and the hit rate of a skewed workload (90% of evaluations on 1% of
//! the flags).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{distinct_flag, document_of, realistic_flag, rss_file_kib, rss_kib};
use crate::topology::{Mesh, NodeRef, TopologySpec};

/// Flags per ApplyFlagSet call (keeps each request well under 4 MiB).
const PER_SET: usize = 5_000;

/// Loads `flags` flags into a fresh control + one PoP and measures the PoP;
/// with `distinct`, no two flags have the same targeting; `budget` is the
/// PoP's `--memory-budget-mb` (MiB, or `unlimited`).
pub async fn run(
    mut spec: TopologySpec,
    flags: usize,
    distinct: bool,
    budget: &str,
) -> Result<(Value, Mesh), String> {
    spec.envs
        .push(("FLAGMESH_MEMORY_BUDGET_MB".into(), budget.into()));
    let make = if distinct {
        distinct_flag
    } else {
        realistic_flag
    };
    let mut mesh = Mesh::start(spec).await.map_err(|e| e.to_string())?;
    let pid = pop_pid(&mesh)?;
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
    // no snapshot for the check: the PoP holds only what it received
    mesh.converged_at_head(Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = mesh
        .metrics(NodeRef::Pop(0))
        .await
        .map_err(|e| e.to_string())?
        .get("flagmesh_store_flags")
        .copied()
        .unwrap_or(0.0);
    let (loaded_kib, _) = rss_kib(pid);
    let mut eval = mesh.eval(0).await.map_err(|e| e.to_string())?;
    // flags not compiled yet (nothing was evaluated since they arrived)
    let (cold_us, warm_us) = cold_and_warm(&mut eval, flags).await?;
    // evaluate every flag once: each is compiled on first use
    evaluate_every_set(&mut eval, set).await?;
    // steady: once the PoP has been quiet for a moment (it hands memory
    // freed after a burst of work back to the system within a second)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (steady_kib, peak_kib) = rss_kib(pid);
    let steady_file_kib = rss_file_kib(pid);
    let per_flag = (steady_kib.saturating_sub(empty_kib) * 1024) as f64 / flags.max(1) as f64;
    let held_compiled = mesh
        .metric(NodeRef::Pop(0), "flagmesh_compiled_flags")
        .await;
    let estimated = mesh
        .metric(NodeRef::Pop(0), "flagmesh_compiled_flags_bytes")
        .await;
    let hit_rate = skewed_hit_rate(&mesh, &mut eval, flags).await?;
    // what serving a snapshot leaves behind: to a subscriber following one
    // set (an SDK in local mode), then to one following every set
    let one_set_kib = after_snapshot(&mesh, pid, &["set-0"], PER_SET.min(flags)).await?;
    let whole_kib = after_snapshot(&mesh, pid, &[], flags).await?;
    let restarted_kib = restarted(&mut mesh, set).await?;
    Ok((
        json!({
            "flags": flags,
            "budget_mib": budget,
            "compiled_held": held_compiled,
            "compiled_estimated_mib": estimated / 1048576.0,
            "cold_first_evaluation_us_p50": cold_us,
            "warm_evaluation_us_p50": warm_us,
            "skewed_hit_rate": hit_rate,
            "rules": if distinct { "all distinct" } else { "repeated" },
            "flags_held": held,
            "empty_rss_mib": empty_kib as f64 / 1024.0,
            "loaded_rss_mib": loaded_kib as f64 / 1024.0,
            "steady_rss_mib": steady_kib as f64 / 1024.0,
            "steady_file_mib": steady_file_kib as f64 / 1024.0,
            "restarted_rss_mib": restarted_kib as f64 / 1024.0,
            "after_one_set_snapshot_rss_mib": one_set_kib as f64 / 1024.0,
            "after_whole_snapshot_rss_mib": whole_kib as f64 / 1024.0,
            "peak_rss_mib": peak_kib as f64 / 1024.0,
            "bytes_per_flag": per_flag.round(),
        }),
        mesh,
    ))
}

/// VmRSS of PoP 0 (process `pid`) 2 s after it served a whole snapshot of
/// `sets` (empty: every set), which must hold `expected` flags.
async fn after_snapshot(
    mesh: &Mesh,
    pid: u32,
    sets: &[&str],
    expected: usize,
) -> Result<u64, String> {
    let got = mesh
        .snapshot_flags(NodeRef::Pop(0), sets)
        .await
        .map_err(|e| e.to_string())?;
    if got != expected {
        return Err(format!(
            "a snapshot of {sets:?} held {got} flags, not {expected}"
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(rss_kib(pid).0)
}

/// The process id of PoP 0.
fn pop_pid(mesh: &Mesh) -> Result<u32, String> {
    mesh.pops[0]
        .process
        .as_ref()
        .map(|p| p.pid())
        .ok_or_else(|| "no PoP process".to_owned())
}

/// The flag `i` of the benchmark's sets.
fn request(i: usize, flags: usize) -> flagmesh_proto::v1::EvaluateRequest {
    let i = i % flags.max(1);
    flagmesh_proto::v1::EvaluateRequest {
        flag_set: format!("set-{}", i / PER_SET),
        flag_key: format!("flag-{i}"),
        context: json!({"targetingKey": "user-7", "country": "IN", "email": "a@example.com", "version": "2.0.0"})
            .as_object()
            .map(flagmesh_proto::convert::map_to_struct),
        ..Default::default()
    }
}

/// Median round trip (µs) of 200 flags evaluated for the first time (not
/// compiled yet), each then at once again (compiled).
async fn cold_and_warm(
    eval: &mut crate::topology::Eval,
    flags: usize,
) -> Result<(f64, f64), String> {
    let picks: Vec<usize> = (0..200).map(|k| (k * 7_919 + 13) % flags.max(1)).collect();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for &i in &picks {
        for times in [&mut cold, &mut warm] {
            let started = Instant::now();
            eval.evaluate(request(i, flags))
                .await
                .map_err(|e| e.to_string())?;
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2] * 10.0).round() / 10.0
    };
    Ok((median(&mut cold), median(&mut warm)))
}

/// Hits over lookups for 5,000 evaluations, 90% on the first 1% of the
/// flags and 10% spread over all (counted from the PoP's metrics; `null`
/// without a budget, where hits are not counted).
async fn skewed_hit_rate(
    mesh: &Mesh,
    eval: &mut crate::topology::Eval,
    flags: usize,
) -> Result<Value, String> {
    let hot = (flags / 100).max(1);
    let (h0, m0) = (
        mesh.metric(NodeRef::Pop(0), "flagmesh_compiled_flag_hits_total")
            .await,
        mesh.metric(NodeRef::Pop(0), "flagmesh_compiled_flag_misses_total")
            .await,
    );
    let mut x: usize = 12_345;
    for k in 0..5_000usize {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let i = if k % 10 == 0 {
            (x >> 16) % flags.max(1)
        } else {
            (x >> 16) % hot
        };
        eval.evaluate(request(i, flags))
            .await
            .map_err(|e| e.to_string())?;
    }
    let (h1, m1) = (
        mesh.metric(NodeRef::Pop(0), "flagmesh_compiled_flag_hits_total")
            .await,
        mesh.metric(NodeRef::Pop(0), "flagmesh_compiled_flag_misses_total")
            .await,
    );
    let (hits, misses) = (h1 - h0, m1 - m0);
    Ok(if hits + misses > 0.0 && hits > 0.0 {
        json!(((hits / (hits + misses)) * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    })
}

/// VmRSS of PoP 0 restarted on its store (its state read from sled, not
/// received), once every flag was evaluated again and it is quiet: what a
/// long-running PoP holds without the buffers a large delta left behind.
async fn restarted(mesh: &mut Mesh, sets: usize) -> Result<u64, String> {
    if !mesh.stop(NodeRef::Pop(0)) {
        return Err("the PoP did not stop cleanly".into());
    }
    mesh.restart(NodeRef::Pop(0)).map_err(|e| e.to_string())?;
    let pid = pop_pid(mesh)?;
    let mut eval = mesh.eval(0).await.map_err(|e| e.to_string())?;
    evaluate_every_set(&mut eval, sets).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(rss_kib(pid).0)
}

/// `EvaluateAll` over sets `set-0` to `set-{sets - 1}`.
async fn evaluate_every_set(eval: &mut crate::topology::Eval, sets: usize) -> Result<(), String> {
    for s in 0..sets {
        eval.evaluate_all(flagmesh_proto::v1::EvaluateAllRequest {
            flag_set: format!("set-{s}"),
            context: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}
