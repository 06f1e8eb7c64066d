//! `flagmesh-bench`: the load tool and benchmark runner behind `make bench`.
//! Starts meshes of real (release) processes on loopback, measures, writes
//! `target/bench-results/*.json` and rewrites the tables of BENCHMARKS.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use flagmesh_client::ClientTls;
use flagmesh_integration_tests::bench::{self, load, machine, update_section, write_results};
use flagmesh_integration_tests::certs::Ca;
use flagmesh_integration_tests::process::NodeProcess;
use flagmesh_integration_tests::topology::{Mesh, TopologySpec, bin_dir};
use flagmesh_proto::v1::{ApplyFlagSetRequest, UpdateFlagRequest};
use serde_json::{Value, json};

/// flagmesh benchmarks.
#[derive(Parser, Debug)]
#[command(name = "flagmesh-bench", about)]
struct Args {
    /// Scratch folder for the meshes' data.
    #[arg(long, default_value = "target/bench-data")]
    data: PathBuf,
    /// Seconds per load step.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// Every benchmark below, in turn.
    All,
    /// gRPC Evaluate and OFREP at fixed concurrency and at fixed rates.
    Load,
    /// Commit → applied at every PoP across a scale mesh.
    Propagation {
        /// Hubs.
        #[arg(long, default_value_t = 3)]
        hubs: usize,
        /// PoPs per hub.
        #[arg(long = "pops-per-hub", default_value_t = 100)]
        pops_per_hub: usize,
        /// Changes to write.
        #[arg(long, default_value_t = 30)]
        changes: usize,
        /// Run the PoPs and hubs with `--sync-writes false`.
        #[arg(long = "no-sync-writes")]
        no_sync_writes: bool,
        /// Two control instances on a private PostgreSQL cluster.
        #[arg(long)]
        postgres: bool,
    },
    /// Commit latency and write throughput, on sled and on PostgreSQL.
    Writes,
    /// PoP memory with 1,000, 10,000 and 100,000 flags; then cold start.
    Memory {
        /// Only this many flags (default: all three sizes).
        #[arg(long)]
        flags: Option<usize>,
    },
    /// A hub's memory when many fresh subscribers ask for snapshots at once.
    Reconnect {
        /// Flags the hub holds.
        #[arg(long, default_value_t = 100_000)]
        flags: usize,
        /// Subscribers reconnecting at once.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
    },
    /// The PoP's OFREP and Unleash Edge (offline mode) side by side under
    /// wrk and at the same fixed rate, with the PoP's EvaluateAll in the
    /// same minutes (`make bench-peer` installs both tools).
    Peer,
    /// Hub CPU per change delivered to many subscribers.
    Fanout {
        /// Subscribers.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
    },
}

fn spec(root: PathBuf, hubs: usize, pops_per_hub: usize) -> TopologySpec {
    let _ = std::fs::remove_dir_all(&root);
    TopologySpec {
        root,
        bin_dir: bin_dir(),
        hubs,
        pops_per_hub,
        chained: false,
        relays: false,
        secure: false,
        heartbeat_ms: 1000,
        stall_ms: 5000,
        retain_revisions: 10_000,
        worker_threads: Some(if hubs * pops_per_hub > 20 { 1 } else { 2 }),
        control_port: 0,
        default_flag_set: "bench".into(),
        hub_ring_revisions: None,
        // benchmarks measure the mesh, not its limiters: the fan-out bench
        // opens 1,000 streams from one address, the writers are unthrottled
        envs: vec![
            ("FLAGMESH_MAX_STREAMS_PER_CLIENT".into(), "0".into()),
            ("FLAGMESH_ADMIN_RATE".into(), "0".into()),
        ],
        database_url: None,
    }
}

async fn run_load(args: &Args) -> anyhow::Result<Value> {
    let mesh = Mesh::start(spec(args.data.join("load"), 1, 1)).await?;
    let mut admin = mesh.admin().await?;
    admin
        .apply_flag_set(ApplyFlagSetRequest {
            document: bench::document("bench", "flag", 0, 200),
            ..Default::default()
        })
        .await?;
    mesh.converged(Duration::from_secs(60))
        .await
        .map_err(anyhow::Error::msg)?;
    let pop = &mesh.pops[0];
    let target = load::Target {
        grpc: pop.grpc,
        http: pop.http.context("the PoP has no HTTP listener")?,
        flag_set: "bench".into(),
        keys: (0..200).map(|i| format!("flag-{i}")).collect(),
        tls: None,
        contexts: Arc::new(bench::contexts(4096)),
    };
    let d = Duration::from_secs(args.seconds);
    let mut closed = Vec::new();
    for (name, p) in [
        ("grpc", load::Protocol::Grpc),
        ("ofrep", load::Protocol::Ofrep),
    ] {
        for c in [1, 8, 32] {
            let mut r = load::closed_loop(&target, p, c, d).await;
            r["protocol"] = json!(name);
            eprintln!("closed loop {name} x{c}: {r}");
            closed.push(r);
        }
    }
    // every flag of a set for one context: the browser bootstrap path
    admin
        .apply_flag_set(ApplyFlagSetRequest {
            document: bench::document("bulk", "flag", 0, 100),
            ..Default::default()
        })
        .await?;
    mesh.converged(Duration::from_secs(60))
        .await
        .map_err(anyhow::Error::msg)?;
    let bulk_target = load::Target {
        flag_set: "bulk".into(),
        ..target.clone()
    };
    for (name, p) in [
        ("ofrep bulk, 100 flags", load::Protocol::OfrepBulk),
        ("grpc EvaluateAll, 100 flags", load::Protocol::GrpcAll),
    ] {
        let mut r = load::closed_loop(&bulk_target, p, 16, d).await;
        r["protocol"] = json!(name);
        eprintln!("closed loop {name} x16: {r}");
        closed.push(r);
    }
    // the same OFREP paths under wrk, the tool other flag servers' figures
    // are quoted with (16 connections, as they are)
    for (name, t, p) in [
        ("ofrep (wrk)", &target, load::Protocol::Ofrep),
        (
            "ofrep bulk, 100 flags (wrk)",
            &bulk_target,
            load::Protocol::OfrepBulk,
        ),
    ] {
        let mut r = load::wrk(t, p, 16, d, &args.data.join("load")).map_err(anyhow::Error::msg)?;
        r["protocol"] = json!(name);
        r["concurrency"] = json!(16);
        eprintln!("wrk {name} x16: {r}");
        closed.push(r);
    }
    // the same over TLS: a second PoP, following the same hub, serving
    // gRPC with a certificate of a CA made here
    let (tls_pop, tls_target) = start_tls_pop(&mesh, &args.data.join("load"), &target).await?;
    for c in [1, 8] {
        let mut r = load::closed_loop(&tls_target, load::Protocol::Grpc, c, d).await;
        r["protocol"] = json!("grpc+tls");
        eprintln!("closed loop grpc+tls x{c}: {r}");
        closed.push(r);
    }
    let mut open = Vec::new();
    let mut r = load::open_loop(&tls_target, load::Protocol::Grpc, 2000, d).await;
    r["protocol"] = json!("grpc+tls");
    eprintln!("open loop grpc+tls at 2000/s: {r}");
    open.push(r);
    drop(tls_pop);
    for (name, p, rate) in [
        ("grpc", load::Protocol::Grpc, 2000),
        ("grpc", load::Protocol::Grpc, 8000),
        ("ofrep", load::Protocol::Ofrep, 2000),
    ] {
        let mut r = load::open_loop(&target, p, rate, d).await;
        r["protocol"] = json!(name);
        eprintln!("open loop {name} at {rate}/s: {r}");
        open.push(r);
    }
    // the same rates while changes arrive: a flag of the evaluated set
    // rewritten every 50 ms, each change applied at the PoP (journal sync
    // included) while it answers
    for rate in [2000, 8000] {
        let changes = tokio::spawn(churn(admin.clone(), d, Duration::from_millis(50)));
        let mut r = load::open_loop(&target, load::Protocol::Grpc, rate, d).await;
        let changes = changes.await??;
        mesh.converged(Duration::from_secs(60))
            .await
            .map_err(anyhow::Error::msg)?;
        r["protocol"] = json!(format!("grpc, {changes} changes applied meanwhile"));
        eprintln!("open loop grpc at {rate}/s during {changes} changes: {r}");
        open.push(r);
    }
    let result = json!({"machine": machine(), "flags": 200, "contexts": 4096, "closed_loop": closed, "open_loop": open});
    write_results("load", &result);
    let mut t = String::from(
        "| protocol | mode | load | throughput (req/s) | p50 | p99 | p99.9 | errors |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in result["closed_loop"].as_array().into_iter().flatten() {
        t.push_str(&format!(
            "| {} | closed loop | {} {} | {} | {} | {} | {} | {} |\n",
            r["protocol"].as_str().unwrap_or(""),
            r["concurrency"],
            if r["protocol"].as_str().is_some_and(|p| p.ends_with("(wrk)")) {
                "connections"
            } else {
                "in flight"
            },
            r["throughput_rps"],
            micros(&r["p50_us"]),
            micros(&r["p99_us"]),
            micros(&r["p999_us"]),
            r["errors"]
        ));
    }
    for r in result["open_loop"].as_array().into_iter().flatten() {
        t.push_str(&format!(
            "| {} | open loop | {} req/s offered | {} | {} | {} | {} | {} |\n",
            r["protocol"].as_str().unwrap_or(""),
            r["target_rps"],
            r["achieved_rps"],
            micros(&r["p50_us"]),
            micros(&r["p99_us"]),
            micros(&r["p999_us"]),
            r["errors"]
        ));
    }
    update_section("load", &t);
    Ok(result)
}

/// Rewrites the flag `churn` of the load set every `every` for `duration`
/// (two definitions in turn); returns how many changes were written.
async fn churn(
    mut admin: flagmesh_integration_tests::topology::Admin,
    duration: Duration,
    every: Duration,
) -> anyhow::Result<u64> {
    let end = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(every);
    let mut written = 0u64;
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let variant = if written.is_multiple_of(2) {
            "on"
        } else {
            "off"
        };
        admin
            .update_flag(UpdateFlagRequest {
                flag_set: "bench".into(),
                key: "churn".into(),
                definition_json: format!(
                    r#"{{"state":"ENABLED","variants":{{"on":true,"off":false}},"defaultVariant":"{variant}"}}"#
                ),
                force: true,
                ..Default::default()
            })
            .await
            .context("a change during the load")?;
        written += 1;
    }
    Ok(written)
}

/// One row of the side-by-side table: `r` labelled (an open loop's achieved
/// rate as its throughput) and printed.
fn peer_row(mut r: Value, server: &str, endpoint: &str, round: usize) -> Value {
    r["server"] = json!(server);
    r["endpoint"] = json!(endpoint);
    r["round"] = json!(round);
    if r.get("throughput_rps").is_none() {
        r["throughput_rps"] = r["achieved_rps"].clone();
    }
    eprintln!("peer: {r}");
    r
}

/// Fixed rates of the side-by-side run's open-loop rows: about half of
/// what Unleash Edge serves at saturation on this machine (every flag about
/// 5,500 req/s, one flag 16,000-19,000).
const PEER_RATE_EVERY_FLAG: u64 = 2_500;
const PEER_RATE_ONE_FLAG: u64 = 8_000;

async fn run_peer(args: &Args) -> anyhow::Result<Value> {
    let edge_bin = flagmesh_integration_tests::flagd_kit::workspace_root()
        .join("target/tools/unleash-edge/bin/unleash-edge");
    let dir = args.data.join("peer");
    let mesh = Mesh::start(spec(dir.join("mesh"), 0, 0).with_direct_pop()).await?;
    let mut admin = mesh.admin().await?;
    admin
        .apply_flag_set(ApplyFlagSetRequest {
            document: bench::peer::flagd_document("peer"),
            ..Default::default()
        })
        .await?;
    mesh.converged(Duration::from_secs(60))
        .await
        .map_err(anyhow::Error::msg)?;
    let pop = mesh.pops[0].http.context("the PoP has no HTTP listener")?;
    let edge = bench::peer::Edge::start(&edge_bin, &dir.join("edge"))
        .await
        .map_err(anyhow::Error::msg)?;
    let (ours, theirs) = bench::peer::flags_on(pop, "peer", &edge)
        .await
        .map_err(anyhow::Error::msg)?;
    eprintln!("flags on over every user: flagmesh {ours}, Unleash Edge {theirs}");
    let all_target = load::Target {
        grpc: mesh.pops[0].grpc,
        http: pop,
        flag_set: "peer".into(),
        keys: (0..bench::peer::FLAGS)
            .map(|i| format!("flag-{i}"))
            .collect(),
        tls: None,
        contexts: Arc::new(bench::peer::contexts()),
    };
    let d = Duration::from_secs(args.seconds);
    let mut rows = Vec::new();
    // alternate the two servers, twice, so that both see the same minutes
    const POP: &str = "flagmesh PoP, OFREP";
    const EDGE: &str = "Unleash Edge 20.1.0, frontend API";
    for round in 1..=2 {
        for bulk in [true, false] {
            let endpoint = if bulk { "every flag (100)" } else { "one flag" };
            let calls = bench::peer::ofrep_calls("peer", bulk);
            let wrk_file = dir.join(format!("wrk-pop-{bulk}.lua"));
            let r =
                load::run_wrk(pop, &calls, &[], 16, d, &wrk_file).map_err(anyhow::Error::msg)?;
            rows.push(peer_row(r, POP, endpoint, round));
            if bulk {
                // the gRPC bulk call, in the same minutes (wrk speaks no
                // gRPC: the project's load tool, 16 tasks, as wrk's 16
                // connections)
                let r = load::closed_loop(&all_target, load::Protocol::GrpcAll, 16, d).await;
                rows.push(peer_row(
                    r,
                    "flagmesh PoP, gRPC EvaluateAll",
                    endpoint,
                    round,
                ));
            }
            let r = edge.wrk(bulk, d, &dir).map_err(anyhow::Error::msg)?;
            rows.push(peer_row(r, EDGE, endpoint, round));
        }
    }
    // the same request rate at both, below either one's saturation: the
    // latency each adds, rather than the wait for a core that a saturating
    // load measures
    for round in 1..=2 {
        for (bulk, rate) in [(true, PEER_RATE_EVERY_FLAG), (false, PEER_RATE_ONE_FLAG)] {
            let endpoint = if bulk {
                format!("every flag (100), at {rate}/s")
            } else {
                format!("one flag, at {rate}/s")
            };
            let calls = bench::peer::ofrep_calls("peer", bulk);
            let r = load::open_loop_http(pop, calls, Vec::new(), rate, d).await;
            rows.push(peer_row(r, POP, &endpoint, round));
            let r = edge.open_loop(bulk, rate, d).await;
            rows.push(peer_row(r, EDGE, &endpoint, round));
        }
    }
    // a server answering errors is not measured: its figures mean nothing
    if let Some(r) = rows.iter().find(|r| r["errors"].as_u64() != Some(0)) {
        anyhow::bail!("errors under load, so no comparison: {r}");
    }
    drop(edge);
    let result = json!({"machine": machine(), "flags": bench::peer::FLAGS, "connections": 16,
        "flags_on": {"flagmesh": ours, "unleash_edge": theirs}, "rows": rows});
    write_results("peer", &result);
    let mut t = String::from(
        "| round | server | endpoint | throughput (req/s) | p50 | p99 | errors |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r["round"],
            r["server"].as_str().unwrap_or(""),
            r["endpoint"].as_str().unwrap_or(""),
            r["throughput_rps"],
            micros(&r["p50_us"]),
            micros(&r["p99_us"]),
            r["errors"]
        ));
    }
    t.push_str(&format!(
        "\n(user, flag) pairs on over the 1,024 users: flagmesh {ours}, Unleash Edge {theirs} \
         (the same clauses; each rolls out 10% by its own hash).\n"
    ));
    update_section("peer", &t);
    Ok(result)
}

/// A latency cell: microseconds, or "–" where the tool gives none (wrk
/// reports no p99.9).
fn micros(v: &Value) -> String {
    match v.as_f64() {
        Some(us) => format!("{us} µs"),
        None => "–".to_owned(),
    }
}

/// Starts a PoP serving gRPC over TLS beside the load mesh's PoP (same hub,
/// same options otherwise) and waits until it serves the flags.
async fn start_tls_pop(
    mesh: &Mesh,
    dir: &std::path::Path,
    plain: &load::Target,
) -> anyhow::Result<(NodeProcess, load::Target)> {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    let ca = Ca::new(&certs, "bench-ca")?;
    let server = ca.server(&certs, "pop-tls")?;
    let hub = mesh.hubs.first().context("the load mesh has no hub")?;
    let s = |p: &std::path::Path| p.display().to_string();
    let args: Vec<String> = [
        "--data-dir",
        &s(&dir.join("pop-tls")),
        "--node-id",
        "pop-tls",
        "--upstream",
        &hub.grpc.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--insecure-dev",
        "--default-flag-set",
        "bench",
        "--tls-cert",
        &s(&server.cert),
        "--tls-key",
        &s(&server.key),
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    let envs = [("TOKIO_WORKER_THREADS", "2")];
    let pop = NodeProcess::start(
        &mesh.spec.bin_dir.join("flagmesh-pop"),
        &args,
        &envs,
        &dir.join("pop-tls.log"),
    )?;
    let target = load::Target {
        grpc: pop.grpc,
        tls: Some(ClientTls {
            ca: Some(ca.cert.clone()),
            ..ClientTls::default()
        }),
        ..plain.clone()
    };
    let endpoint = flagmesh_client::endpoint(&pop.grpc.to_string(), target.tls.as_ref())
        .map_err(anyhow::Error::msg)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = endpoint.connect().await {
            let served = flagmesh_proto::v1::evaluation_client::EvaluationClient::new(ch)
                .evaluate(flagmesh_proto::v1::EvaluateRequest {
                    flag_set: "bench".into(),
                    flag_key: plain.keys[0].clone(),
                    ..Default::default()
                })
                .await
                .is_ok_and(|r| r.into_inner().value.is_some());
            if served {
                return Ok((pop, target));
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the TLS PoP did not get the flags within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_memory(args: &Args, only: Option<usize>) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    let mut coldstart = Value::Null;
    // (flags, all-distinct targeting, the PoP's --memory-budget-mb)
    let sizes = match only {
        Some(n) => vec![(n, false, "unlimited"), (n, false, "32"), (n, true, "32")],
        None => vec![
            (1_000usize, false, "32"),
            (10_000, false, "unlimited"),
            (10_000, false, "32"),
            (10_000, false, "4"),
            (10_000, true, "unlimited"),
            (10_000, true, "32"),
            (100_000, false, "unlimited"),
            (100_000, false, "32"),
            (100_000, false, "8"),
        ],
    };
    for (flags, distinct, budget) in sizes {
        let (r, mut mesh) = bench::memory::run(
            spec(
                args.data.join(format!(
                    "memory-{flags}{}-{budget}",
                    if distinct { "-distinct" } else { "" }
                )),
                0,
                0,
            )
            .with_direct_pop(),
            flags,
            distinct,
            budget,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        eprintln!("memory with {flags} flags: {r}");
        rows.push(r);
        if flags == 10_000 && !distinct && budget == "32" {
            coldstart = bench::coldstart::run(&mut mesh, "set-0", "flag-0", 5)
                .await
                .map_err(anyhow::Error::msg)?;
            eprintln!("cold start with {flags} flags: {coldstart}");
        }
    }
    let result = json!({"machine": machine(), "memory": rows, "cold_start_10k": coldstart});
    write_results("memory", &result);
    let mut t = String::from(
        "| flags | targeting | budget (MiB) | PoP RSS empty | loaded (not yet evaluated) | steady, every flag evaluated | of it file-backed (code, libraries) | then after serving one set's snapshot | and a snapshot of every set | the same, restarted from sled | peak | bytes per flag | compiled held (estimated MiB) | first evaluation of a cold flag, p50 | then warm, p50 | hit rate, 90% on 1% of flags |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in result["memory"].as_array().into_iter().flatten() {
        t.push_str(&format!(
            "| {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {} ({:.1}) | {} µs | {} µs | {} |\n",
            r["flags"],
            r["rules"].as_str().unwrap_or("repeated"),
            r["budget_mib"].as_str().unwrap_or("?"),
            r["empty_rss_mib"].as_f64().unwrap_or(0.0),
            r["loaded_rss_mib"].as_f64().unwrap_or(0.0),
            r["steady_rss_mib"].as_f64().unwrap_or(0.0),
            r["steady_file_mib"].as_f64().unwrap_or(0.0),
            r["after_one_set_snapshot_rss_mib"].as_f64().unwrap_or(0.0),
            r["after_whole_snapshot_rss_mib"].as_f64().unwrap_or(0.0),
            r["restarted_rss_mib"].as_f64().unwrap_or(0.0),
            r["peak_rss_mib"].as_f64().unwrap_or(0.0),
            r["bytes_per_flag"].as_f64().unwrap_or(0.0) as u64,
            r["compiled_held"].as_f64().unwrap_or(0.0) as u64,
            r["compiled_estimated_mib"].as_f64().unwrap_or(0.0),
            r["cold_first_evaluation_us_p50"],
            r["warm_evaluation_us_p50"],
            match &r["skewed_hit_rate"] {
                Value::Null => "all held".to_owned(),
                v => v.to_string(),
            },
        ));
    }
    update_section("memory", &t);
    let c = &result["cold_start_10k"];
    update_section(
        "coldstart",
        &format!(
            "| flags in sled | runs | first evaluation, median | max | all runs (ms) |\n|---|---|---|---|---|\n| 10,000 | {} | {:.1} ms | {:.1} ms | {} |\n",
            c["runs"],
            c["median_ms"].as_f64().unwrap_or(0.0),
            c["max_ms"].as_f64().unwrap_or(0.0),
            c["first_evaluation_ms"]
                .as_array()
                .map(|a| a
                    .iter()
                    .map(|v| format!("{:.1}", v.as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ),
    );
    Ok(result)
}

async fn run_writes(args: &Args) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for postgres in [false, true] {
        let mut s = spec(args.data.join("writes"), 1, 1);
        let cluster = postgres
            .then(flagmesh_integration_tests::postgres::PgCluster::start)
            .transpose()?;
        s.database_url = cluster.as_ref().map(|c| c.url());
        let mesh = Mesh::start(s).await?;
        let r = bench::writes::run(&mesh, 500, 8, args.seconds)
            .await
            .map_err(anyhow::Error::msg)?;
        eprintln!(
            "writes ({}): {r}",
            if postgres { "postgres" } else { "sled" }
        );
        rows.push(json!({"store": if postgres { "postgresql" } else { "sled" }, "writes": r}));
        drop(mesh);
        drop(cluster);
    }
    let result = json!({"machine": machine(), "writes": rows});
    write_results("writes", &result);
    let mut t = String::from(
        "| store | commit latency p50 | p99 | p99.9 | writes/s, 8 concurrent writers |\n|---|---|---|---|---|\n",
    );
    for r in &rows {
        let w = &r["writes"];
        let l = &w["commit_latency_us"];
        t.push_str(&format!(
            "| {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} |\n",
            r["store"].as_str().unwrap_or(""),
            l["p50_us"].as_f64().unwrap_or(0.0),
            l["p99_us"].as_f64().unwrap_or(0.0),
            l["p999_us"].as_f64().unwrap_or(0.0),
            w["writes_per_second"].as_f64().unwrap_or(0.0)
        ));
    }
    update_section("writes", &t);
    Ok(result)
}

async fn run_reconnect(args: &Args, flags: usize, subscribers: usize) -> anyhow::Result<Value> {
    let spec = spec(args.data.join("reconnect"), 1, 0);
    let mesh = Mesh::start(spec).await?;
    let r = bench::reconnect::run(&mesh, flags, subscribers)
        .await
        .map_err(anyhow::Error::msg)?;
    eprintln!("reconnect storm: {r}");
    let result = json!({"machine": machine(), "reconnect": r});
    write_results("reconnect", &result);
    let f = &result["reconnect"];
    update_section(
        "reconnect",
        &format!(
            "| flags | subscribers at once | hub RSS before | peak during the storm | with half the streams stalled | readers done in | after, every stream closed |\n|---|---|---|---|---|---|---|\n| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} s | {:.1} MiB |\n",
            f["flags"],
            f["subscribers"],
            f["hub_rss_before_mib"].as_f64().unwrap_or(0.0),
            f["hub_rss_hwm_mib"].as_f64().unwrap_or(0.0),
            f["hub_rss_with_stalled_streams_mib"]
                .as_f64()
                .unwrap_or(0.0),
            f["readers_seconds"].as_f64().unwrap_or(0.0),
            f["hub_rss_after_mib"].as_f64().unwrap_or(0.0)
        ),
    );
    Ok(result)
}

async fn run_fanout(args: &Args, subscribers: usize) -> anyhow::Result<Value> {
    let mesh = Mesh::start(spec(args.data.join("fanout"), 1, 0)).await?;
    let mut admin = mesh.admin().await?;
    admin
        .apply_flag_set(ApplyFlagSetRequest {
            document: bench::document("bench", "flag", 0, 20),
            ..Default::default()
        })
        .await?;
    let r = bench::fanout::run(&mesh, subscribers, 50)
        .await
        .map_err(anyhow::Error::msg)?;
    eprintln!("fan-out: {r}");
    let result = json!({"machine": machine(), "fanout": r});
    write_results("fanout", &result);
    let f = &result["fanout"];
    update_section(
        "fanout",
        &format!(
            "| subscribers | changes | hub CPU per change | hub CPU per delivery |\n|---|---|---|---|\n| {} | {} | {:.2} ms | {:.2} µs |\n",
            f["subscribers"],
            f["changes"],
            f["hub_cpu_ms_per_change"].as_f64().unwrap_or(0.0),
            f["hub_cpu_us_per_delivery"].as_f64().unwrap_or(0.0)
        ),
    );
    Ok(result)
}

async fn run_propagation(
    args: &Args,
    hubs: usize,
    pops_per_hub: usize,
    changes: usize,
    sync_writes: bool,
    postgres: bool,
) -> anyhow::Result<Value> {
    eprintln!(
        "starting {} control, {hubs} hubs, {} PoPs (sync writes: {sync_writes})",
        if postgres { "2 PostgreSQL" } else { "1 sled" },
        hubs * pops_per_hub
    );
    let mut s = spec(args.data.join("propagation"), hubs, pops_per_hub);
    s.envs
        .push(("FLAGMESH_SYNC_WRITES".into(), sync_writes.to_string()));
    let cluster = postgres
        .then(flagmesh_integration_tests::postgres::PgCluster::start)
        .transpose()?;
    s.database_url = cluster.as_ref().map(|c| c.url());
    let mesh = Mesh::start(s).await?;
    let mut admin = mesh.admin().await?;
    admin
        .apply_flag_set(ApplyFlagSetRequest {
            document: bench::document("bench", "flag", 0, 50),
            ..Default::default()
        })
        .await?;
    mesh.converged(Duration::from_secs(120))
        .await
        .map_err(anyhow::Error::msg)?;
    let r = bench::propagation::run(&mesh, "bench", changes, Duration::from_millis(100))
        .await
        .map_err(anyhow::Error::msg)?;
    let result = json!({"machine": machine(), "sync_writes": sync_writes, "propagation": r});
    let name = match (postgres, sync_writes) {
        (true, _) => "propagation-postgres",
        (false, true) => "propagation",
        (false, false) => "propagation-no-sync",
    };
    write_results(name, &result);
    let p = &result["propagation"];
    eprintln!(
        "propagation: {}; CPU per change (ms): {}; CPU (s): {}",
        p["commit_to_every_pop_ms"], p["cpu_ms_per_change"], p["cpu_seconds"]
    );
    let every = &p["commit_to_every_pop_ms"];
    let each = &p["commit_to_each_pop_ms"];
    update_section(
        name,
        &format!(
            "| mesh | changes | commit → every PoP p50 | p99 | max | commit → one PoP p50 | p99 | CPU per change: each PoP | each hub |\n|---|---|---|---|---|---|---|---|---|\n| {} hubs × {} PoPs | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} ms | {:.2} ms |\n",
            p["hubs"],
            p["pops"].as_u64().unwrap_or(0) / p["hubs"].as_u64().unwrap_or(1).max(1),
            p["changes"],
            every["p50"].as_f64().unwrap_or(0.0),
            every["p99"].as_f64().unwrap_or(0.0),
            every["max"].as_f64().unwrap_or(0.0),
            each["p50"].as_f64().unwrap_or(0.0),
            each["p99"].as_f64().unwrap_or(0.0),
            p["cpu_ms_per_change"]["pop"].as_f64().unwrap_or(0.0),
            p["cpu_ms_per_change"]["hub"].as_f64().unwrap_or(0.0)
        ),
    );
    Ok(result)
}

trait DirectPop {
    fn with_direct_pop(self) -> Self;
}

impl DirectPop for TopologySpec {
    /// One PoP following control directly (no hub).
    fn with_direct_pop(mut self) -> Self {
        self.hubs = 0;
        self.pops_per_hub = 1;
        self
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let m = machine();
    update_section(
        "machine",
        &format!(
            "{} cores ({}), {} GiB memory; release builds.",
            m["cpus"],
            m["cpu"].as_str().unwrap_or("?"),
            m["memory_gib"]
        ),
    );
    match &args.what {
        What::Load => {
            run_load(&args).await?;
        }
        What::Propagation {
            hubs,
            pops_per_hub,
            changes,
            no_sync_writes,
            postgres,
        } => {
            run_propagation(
                &args,
                *hubs,
                *pops_per_hub,
                *changes,
                !*no_sync_writes,
                *postgres,
            )
            .await?;
        }
        What::Writes => {
            run_writes(&args).await?;
        }
        What::Peer => {
            run_peer(&args).await?;
        }
        What::Memory { flags } => {
            run_memory(&args, *flags).await?;
        }
        What::Fanout { subscribers } => {
            run_fanout(&args, *subscribers).await?;
        }
        What::Reconnect { flags, subscribers } => {
            run_reconnect(&args, *flags, *subscribers).await?;
        }
        What::All => {
            run_load(&args).await?;
            run_peer(&args).await?;
            run_fanout(&args, 1000).await?;
            run_reconnect(&args, 100_000, 1000).await?;
            run_memory(&args, None).await?;
            run_writes(&args).await?;
            run_propagation(&args, 3, 100, 30, true, false).await?;
            run_propagation(&args, 3, 100, 30, false, false).await?;
            run_propagation(&args, 3, 100, 30, true, true).await?;
        }
    }
    let _ = std::fs::remove_dir_all(&args.data);
    Ok(())
}
