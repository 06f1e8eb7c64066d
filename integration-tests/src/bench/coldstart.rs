//! Cold start: a PoP restarted on a sled store of N flags with every
//! upstream unreachable; the time from starting the process to the first
//! successful `Evaluate` (a value served from what it loaded).

use std::time::{Duration, Instant};

use flagmesh_client::BearerToken;
use flagmesh_proto::v1::EvaluateRequest;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use serde_json::{Value, json};

use crate::process::NodeProcess;
use crate::topology::Mesh;

/// Restarts PoP 0 of `mesh` (already loaded) `runs` times with a dead upstream.
pub async fn run(mesh: &mut Mesh, flag_set: &str, key: &str, runs: usize) -> Result<Value, String> {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| e.to_string())?
        .local_addr()
        .map_err(|e| e.to_string())?;
    let pop = &mut mesh.pops[0];
    let mut args = pop_args(pop.args_for_restart(), dead.to_string());
    args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    if let Some(mut p) = pop.process.take() {
        p.terminate(Duration::from_secs(10));
    }
    let mut samples = Vec::new();
    for run in 0..runs {
        let log = mesh.spec.root.join(format!("coldstart-{run}.log"));
        let t0 = Instant::now();
        let mut p = NodeProcess::start(&mesh.spec.bin_dir.join("flagmesh-pop"), &args, &[], &log)
            .map_err(|e| e.to_string())?;
        let ready = t0.elapsed();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", p.grpc))
            .map_err(|e| e.to_string())?
            .connect_lazy();
        let mut c = EvaluationClient::with_interceptor(
            channel,
            BearerToken::new(None).map_err(|e| e.to_string())?,
        );
        let served = loop {
            if let Ok(r) = c
                .evaluate(EvaluateRequest {
                    flag_set: flag_set.into(),
                    flag_key: key.into(),
                    ..Default::default()
                })
                .await
                && r.get_ref().value.is_some()
            {
                break t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err("no evaluation within 30 s".into());
            }
        };
        p.terminate(Duration::from_secs(10));
        samples.push((ready, served));
    }
    let mut served: Vec<f64> = samples.iter().map(|s| s.1.as_secs_f64() * 1000.0).collect();
    served.sort_by(f64::total_cmp);
    Ok(json!({
        "runs": runs,
        "ready_line_ms": samples.iter().map(|s| s.0.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        "first_evaluation_ms": served.clone(),
        "median_ms": served.get(served.len() / 2).copied().unwrap_or(0.0),
        "max_ms": served.last().copied().unwrap_or(0.0),
    }))
}

/// The PoP's arguments with its upstream replaced.
fn pop_args(args: Vec<String>, upstream: String) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--upstream" {
            let _ = it.next();
            out.push(a);
            out.push(upstream.clone());
        } else {
            out.push(a);
        }
    }
    out
}
