//! Several control instances on one PostgreSQL (a private cluster of
//! Debian's server, started by the test), as real processes: a write at one
//! is read at the other; compare-and-swap writers spread over both race and
//! exactly one wins each round, with gap-free revisions; `kill -9` of the
//! instance a hub follows while writes flow loses no acknowledged write,
//! the hub fails over and resumes by delta, and the PoP converges; the
//! database stopped and started while writes flow: writes fail with a
//! clear `UNAVAILABLE`, nothing acknowledged is lost, and afterwards writes
//! succeed and the mesh converges.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use flagmesh_integration_tests::postgres::PgCluster;
use flagmesh_integration_tests::process::NodeProcess;
use flagmesh_integration_tests::topology::{bin_dir, eventually, http_get};
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_proto::v1::sync_event::Event;
use flagmesh_proto::v1::*;
use tonic::transport::Channel;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start(dir: &Path, binary: &str, name: &str, args: &[String]) -> NodeProcess {
    let mut all: Vec<String> = [
        "--insecure-dev",
        "--http-listen",
        "127.0.0.1:0",
        "--heartbeat-ms",
        "200",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if !args.iter().any(|a| a == "--listen") {
        all.extend(["--listen".into(), "127.0.0.1:0".into()]);
    }
    all.extend(args.iter().cloned());
    NodeProcess::start(
        &bin_dir().join(binary),
        &all,
        &[],
        &dir.join(format!("{name}.log")),
    )
    .unwrap()
}

fn control(dir: &Path, name: &str, pg: &PgCluster) -> NodeProcess {
    start(
        dir,
        "flagmesh-control",
        name,
        &["--init".into(), "--database-url".into(), pg.url()],
    )
}

fn relay(dir: &Path, binary: &str, name: &str, upstreams: &[SocketAddr]) -> NodeProcess {
    let upstreams: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
    start(
        dir,
        binary,
        name,
        &[
            "--node-id".into(),
            name.into(),
            "--data-dir".into(),
            dir.join(name).display().to_string(),
            "--upstream".into(),
            upstreams.join(","),
            "--stall-ms".into(),
            "1000".into(),
            "--backoff-max-ms".into(),
            "300".into(),
        ],
    )
}

async fn admin(addr: SocketAddr) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A flag definition, in the canonical form the store keeps (keys sorted).
fn flag(value: &str) -> String {
    format!(r#"{{"defaultVariant":"v","state":"ENABLED","variants":{{"v":"{value}"}}}}"#)
}

fn update(key: &str, value: &str, expected: u64) -> UpdateFlagRequest {
    UpdateFlagRequest {
        flag_set: "ha".into(),
        key: key.into(),
        definition_json: flag(value),
        expected_mod_revision: expected,
        force: expected == 0,
        ..Default::default()
    }
}

/// The (revision, digest) a node serves, from the snapshot its Sync service
/// sends a fresh subscriber.
async fn served(addr: SocketAddr) -> Option<(u64, u64)> {
    let mut c = SyncClient::connect(format!("http://{addr}")).await.ok()?;
    let mut s = c
        .subscribe(SubscribeRequest {
            node_id: "test-check".into(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    while let Ok(Some(ev)) = s.message().await {
        if let Some(Event::Snapshot(snap)) = ev.event
            && snap.last
        {
            return Some((snap.revision, snap.digest?));
        }
    }
    None
}

async fn head(addr: SocketAddr) -> (u64, u64) {
    let r = admin(addr)
        .await
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner();
    (r.revision, r.digest)
}

async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let text = http_get(addr, "/metrics").await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// The audit trail, oldest first.
async fn audit(addr: SocketAddr) -> Vec<ChangeSet> {
    let mut a = admin(addr).await;
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = a
            .list_history(ListHistoryRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.change_sets);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    out.reverse();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_database_and_serialise_writers() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let pg = PgCluster::start().unwrap();
    let root = tempfile::tempdir().unwrap();
    let a = control(root.path(), "control-a", &pg);
    let b = control(root.path(), "control-b", &pg);
    // a write at one is read at the other
    let written = admin(a.grpc)
        .await
        .update_flag(update("shared", "from-a", 0))
        .await
        .unwrap();
    let read = admin(b.grpc)
        .await
        .get_flag(GetFlagRequest {
            flag_set: "ha".into(),
            key: "shared".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .flag
        .unwrap();
    assert_eq!(read.definition_json, flag("from-a").into_bytes());
    assert_eq!(read.mod_revision, written.into_inner().revision);

    // compare-and-swap races over both instances: exactly one wins each
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(admin(if i % 2 == 0 { a.grpc } else { b.grpc }).await);
    }
    for round in 0..10 {
        let current = admin(b.grpc)
            .await
            .get_flag(GetFlagRequest {
                flag_set: "ha".into(),
                key: "shared".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .flag
            .unwrap()
            .mod_revision;
        let races: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    c.update_flag(update("shared", &format!("r{round}-w{i}"), current))
                        .await
                })
            })
            .collect();
        let mut wins = 0;
        for r in races {
            match r.await.unwrap() {
                Ok(_) => wins += 1,
                Err(s) => assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}");
    }
    // gap-free revisions, the same head at both
    let (revision, digest) = head(a.grpc).await;
    assert_eq!(revision, 11);
    assert_eq!(head(b.grpc).await, (revision, digest));
    let revisions: Vec<u64> = audit(b.grpc).await.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, (1..=revision).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_loses_nothing_and_the_hub_resumes_by_delta() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let pg = PgCluster::start().unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut controls = [
        Some(control(root.path(), "control-a", &pg)),
        Some(control(root.path(), "control-b", &pg)),
    ];
    let addrs = [
        controls[0].as_ref().unwrap().grpc,
        controls[1].as_ref().unwrap().grpc,
    ];
    let hub = relay(root.path(), "flagmesh-hub", "hub", &addrs);
    let pop = relay(root.path(), "flagmesh-pop", "pop", &[hub.grpc]);
    admin(addrs[0])
        .await
        .update_flag(update("k0", "start", 0))
        .await
        .unwrap();
    let hub_http = hub.http.unwrap();
    eventually("the hub syncs", 20, || async {
        metric(hub_http, "flagmesh_applied_revision").await == 1.0
    })
    .await;
    // the instance the hub follows
    let followed = http_get(hub_http, "/metrics").await.unwrap();
    let victim = if followed.contains(&format!("upstream=\"{}\"", addrs[0])) {
        0
    } else {
        1
    };

    // writes flow over both instances; the followed one is killed midway
    let mut acknowledged: BTreeMap<u64, (String, String)> = BTreeMap::new();
    for i in 0..60 {
        if i == 20 {
            let mut p = controls[victim].take().unwrap();
            p.kill();
        }
        let key = format!("k{}", i % 5);
        let value = format!("w{i}");
        for target in [i % 2, (i + 1) % 2] {
            if controls[target].is_none() {
                continue;
            }
            if let Ok(r) = admin(addrs[target])
                .await
                .update_flag(update(&key, &value, 0))
                .await
            {
                acknowledged.insert(r.into_inner().revision, (key.clone(), value.clone()));
                break;
            }
        }
    }
    let survivor = addrs[1 - victim];
    let (revision, digest) = head(survivor).await;
    // every acknowledged write is there exactly once, in its revision
    let audit = audit(survivor).await;
    assert_eq!(
        audit.iter().map(|c| c.revision).collect::<Vec<_>>(),
        (1..=revision).collect::<Vec<_>>(),
        "gap-free"
    );
    for (rev, (key, value)) in &acknowledged {
        let cs = &audit[(*rev - 1) as usize];
        assert!(
            cs.changes.len() == 1
                && cs.changes[0].key == *key
                && cs.changes[0].after_json == flag(value),
            "revision {rev}: {cs:?}"
        );
    }
    assert_eq!(
        acknowledged.len() as u64 + 1,
        revision,
        "nothing else was committed"
    );
    // the hub failed over and resumed by delta; the PoP converged
    eventually("the PoP serves the head", 30, || async {
        served(pop.grpc).await == Some((revision, digest))
    })
    .await;
    assert_eq!(served(hub.grpc).await, Some((revision, digest)));
    assert_eq!(
        metric(hub_http, "flagmesh_snapshots_applied_total").await,
        1.0
    );
    assert!(metric(hub_http, "flagmesh_upstream_reconnects_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_fails_writes_clearly_and_loses_nothing() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let pg = PgCluster::start().unwrap();
    let root = tempfile::tempdir().unwrap();
    let a = control(root.path(), "control-a", &pg);
    let hub = relay(root.path(), "flagmesh-hub", "hub", &[a.grpc]);
    let mut c = admin(a.grpc).await;
    for i in 0..5 {
        c.update_flag(update("k", &format!("before-{i}"), 0))
            .await
            .unwrap();
    }
    pg.pause().unwrap();
    let refused = c.update_flag(update("k", "during", 0)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("database"),
        "{}",
        refused.message()
    );
    let control_http = a.http.unwrap();
    eventually("/readyz says what is wrong", 20, || async {
        let r = flagmesh_integration_tests::topology::http_request(
            control_http,
            "GET",
            "/readyz",
            "",
            &[],
        )
        .await;
        r.is_ok_and(|(status, _, body)| status == 503 && body.contains("database is unavailable"))
    })
    .await;
    // the fan-out goes on: the hub still serves what it has
    assert_eq!(served(hub.grpc).await.map(|s| s.0), Some(5));
    pg.resume().unwrap();
    let mut written = None;
    for _ in 0..100 {
        if let Ok(r) = c.update_flag(update("k", "after", 0)).await {
            written = Some(r.into_inner().revision);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        written,
        Some(6),
        "the refused write never happened; the next is revision 6"
    );
    eventually("ready again", 20, || async {
        http_get(control_http, "/readyz")
            .await
            .is_ok_and(|b| b.starts_with("ready"))
    })
    .await;
    let (revision, digest) = head(a.grpc).await;
    eventually("the hub converges", 30, || async {
        served(hub.grpc).await == Some((revision, digest))
    })
    .await;
    let values: Vec<String> = audit(a.grpc)
        .await
        .iter()
        .map(|c| c.changes[0].after_json.clone())
        .collect();
    let expected: Vec<String> = (0..5)
        .map(|i| flag(&format!("before-{i}")))
        .chain([flag("after")])
        .collect();
    assert_eq!(values, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_mesh_moves_into_postgres_and_hubs_resume_by_delta() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let pg = PgCluster::start().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("sled-control");
    let sled_args = vec![
        "--init".to_owned(),
        "--data-dir".into(),
        store.display().to_string(),
    ];
    let mut sled = start(root.path(), "flagmesh-control", "sled", &sled_args);
    let address = sled.grpc;
    let hub = relay(root.path(), "flagmesh-hub", "hub", &[address]);
    let pop = relay(root.path(), "flagmesh-pop", "pop", &[hub.grpc]);
    for i in 0..10 {
        admin(address)
            .await
            .update_flag(update(&format!("k{i}"), "sled", 0))
            .await
            .unwrap();
    }
    let before = head(address).await;
    let history = admin(address)
        .await
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner()
        .history_id;
    eventually("the PoP syncs", 20, || async {
        served(pop.grpc).await == Some(before)
    })
    .await;
    assert!(sled.terminate(Duration::from_secs(10)));

    // one command moves the store
    let out = tokio::process::Command::new(bin_dir().join("flagmesh-control"))
        .args([
            "--import-sled",
            &store.display().to_string(),
            "--database-url",
            &pg.url(),
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("imported history {history} at revision 10")),
        "{stdout}"
    );
    // a second import into the same database is refused
    let again = std::process::Command::new(bin_dir().join("flagmesh-control"))
        .args([
            "--import-sled",
            &store.display().to_string(),
            "--database-url",
            &pg.url(),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("holds a mesh already"));

    // a PostgreSQL instance on the same address: same history, revision,
    // digest and audit trail; the hub resumes without a snapshot
    let pg_control = start(
        root.path(),
        "flagmesh-control",
        "pg-control",
        &[
            "--database-url".into(),
            pg.url(),
            "--listen".into(),
            address.to_string(),
        ],
    );
    assert_eq!(pg_control.grpc, address);
    assert_eq!(head(address).await, before);
    assert_eq!(audit(address).await.len(), 10);
    admin(address)
        .await
        .update_flag(update("k0", "postgres", 0))
        .await
        .unwrap();
    let after = head(address).await;
    eventually("the PoP follows the moved mesh", 30, || async {
        served(pop.grpc).await == Some(after)
    })
    .await;
    let hub_http = hub.http.unwrap();
    assert_eq!(
        metric(hub_http, "flagmesh_snapshots_applied_total").await,
        1.0
    );
    assert_eq!(metric(hub_http, "flagmesh_history_conflict").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_lagging_past_compaction_gets_a_snapshot_then_deltas() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let pg = PgCluster::start().unwrap();
    let root = tempfile::tempdir().unwrap();
    let control = start(
        root.path(),
        "flagmesh-control",
        "control",
        &[
            "--init".into(),
            "--database-url".into(),
            pg.url(),
            "--retain-revisions".into(),
            "5".into(),
        ],
    );
    let mut hub = relay(root.path(), "flagmesh-hub", "hub", &[control.grpc]);
    for i in 0..3 {
        admin(control.grpc)
            .await
            .update_flag(update("k", &format!("v{i}"), 0))
            .await
            .unwrap();
    }
    eventually("the hub syncs", 20, || async {
        served(hub.grpc).await.map(|s| s.0) == Some(3)
    })
    .await;
    assert!(hub.terminate(Duration::from_secs(10)));
    for i in 3..23 {
        admin(control.grpc)
            .await
            .update_flag(update("k", &format!("v{i}"), 0))
            .await
            .unwrap();
    }
    // revision 3 is long compacted: the restarted hub needs a snapshot
    let hub = relay(root.path(), "flagmesh-hub", "hub", &[control.grpc]);
    let hub_http = hub.http.unwrap();
    eventually("the hub catches up", 20, || async {
        served(hub.grpc).await.map(|s| s.0) == Some(23)
    })
    .await;
    assert_eq!(
        metric(hub_http, "flagmesh_snapshots_applied_total").await,
        1.0
    );
    admin(control.grpc)
        .await
        .update_flag(update("k", "v23", 0))
        .await
        .unwrap();
    let now = head(control.grpc).await;
    eventually("then deltas", 20, || async {
        served(hub.grpc).await == Some(now)
    })
    .await;
    assert!(metric(hub_http, "flagmesh_deltas_applied_total").await >= 1.0);
    assert_eq!(
        metric(hub_http, "flagmesh_snapshots_applied_total").await,
        1.0
    );
}
