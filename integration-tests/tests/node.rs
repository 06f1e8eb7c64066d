//! What every node binary shares, checked on real processes: options in a
//! `--config` file take effect (a PoP's own options included) and an
//! unknown key is refused by name; a stop with many open streams ends
//! within one `--drain-ms`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use flagmesh_integration_tests::inproc::mesh::*;
use flagmesh_integration_tests::process::NodeProcess;
use flagmesh_integration_tests::topology::bin_dir;
use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_proto::v1::{
    EvaluateRequest, NodeRole, SubscribeRequest, UpdateFlagRequest, WatchRequest,
};
use prost_types::value::Kind;

async fn write_flag(addr: std::net::SocketAddr, set: &str, key: &str, value: &str) {
    admin(addr)
        .await
        .update_flag(UpdateFlagRequest {
            flag_set: set.into(),
            key: key.into(),
            definition_json: string_flag(value),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
}

fn pop_process(dir: &Path, config: &str, args: &[&str]) -> std::io::Result<NodeProcess> {
    let file = dir.join("pop.toml");
    std::fs::write(&file, config).unwrap();
    let mut all = vec!["--config".to_owned(), file.to_string_lossy().into_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    NodeProcess::start(
        &bin_dir().join("flagmesh-pop"),
        &all,
        &[],
        &dir.join("pop.log"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop_options_come_from_the_config_file_and_unknown_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    write_flag(control.grpc_addr, "from-file", "greeting", "hello").await;
    let config = format!(
        "insecure-dev = true\nlisten = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nupstream = [\"{}\"]\nnode-id = \"pop-from-file\"\ndefault-flag-set = \"from-file\"\nheartbeat-ms = 100\n",
        dir.path().join("pop-data").display(),
        control.grpc_addr
    );
    let pop = pop_process(dir.path(), &config, &[]).unwrap();
    let mut e = eval(pop.grpc, None).await;
    // no flag set named: the default set of the file; the id of the file
    let mut answer = None;
    for _ in 0..250 {
        let r = e
            .evaluate(EvaluateRequest {
                flag_key: "greeting".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.revision > 0 {
            answer = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = answer.expect("the PoP syncs within 5 s");
    assert_eq!(r.pop_id, "pop-from-file");
    assert!(matches!(r.value.and_then(|v| v.kind), Some(Kind::StringValue(s)) if s == "hello"));
    drop(pop);

    // the command line wins over the file
    let pop = pop_process(dir.path(), &config, &["--node-id", "pop-from-cli"]).unwrap();
    let mut e = eval(pop.grpc, None).await;
    let r = e
        .evaluate(EvaluateRequest {
            flag_key: "greeting".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.pop_id, "pop-from-cli");
    drop(pop);

    // an unknown key: no start, the key named
    let bad = format!("{config}heartbeat-msec = 5\n");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, bad).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin_dir().join("flagmesh-pop"))
            .arg("--config")
            .arg(&file)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("\"heartbeat-msec\""), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("flagmesh ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_many_open_streams_ends_within_one_drain_deadline() {
    const DRAIN_MS: u64 = 1_500;
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    write_flag(control.grpc_addr, "web", "f", "1").await;
    let config = format!(
        "insecure-dev = true\ndata-dir = \"{}\"\nupstream = [\"{}\"]\ndefault-flag-set = \"web\"\ndrain-ms = {DRAIN_MS}\n",
        dir.path().join("pop-data").display(),
        control.grpc_addr
    );
    let mut pop = pop_process(dir.path(), &config, &[]).unwrap();
    // 40 open streams of two kinds, each of which would run forever
    let mut streams = Vec::new();
    for i in 0..20 {
        let mut e = eval(pop.grpc, None).await;
        streams.push(tokio::spawn(async move {
            let mut s = e.watch(WatchRequest::default()).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }));
        let mut sync = SyncClient::connect(format!("http://{}", pop.grpc))
            .await
            .unwrap();
        streams.push(tokio::spawn(async move {
            let mut s = sync
                .subscribe(SubscribeRequest {
                    node_id: format!("sdk-{i}"),
                    role: NodeRole::Sdk as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "every stream is open"
    );
    let started = Instant::now();
    let exited = tokio::task::spawn_blocking(move || pop.terminate(Duration::from_secs(20)))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(exited, "the PoP exits by itself");
    // one deadline for everything, plus the process's own exit
    assert!(
        took < Duration::from_millis(DRAIN_MS + 1_000),
        "stop took {took:?} with a {DRAIN_MS} ms drain deadline"
    );
}
