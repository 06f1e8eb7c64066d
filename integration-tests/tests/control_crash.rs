//! Durability of the control store under SIGKILL: a real `flagmesh-control`
//! process is killed in the middle of a stream of writes, three times over,
//! and restarted on the same data. Each time the store holds a prefix of the
//! writes that includes every acknowledged one, the revision never goes
//! backwards, and replaying the change log from empty gives the digest the
//! store reports.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use flagmesh_engine::{StateDigest, flag_hash, flag_set_hash};
use flagmesh_integration_tests::inproc::admin::*;
use flagmesh_integration_tests::process::NodeProcess;
use flagmesh_proto::v1::*;

const KEYS: u64 = 7;

fn start(dir: &Path) -> NodeProcess {
    let args = vec![
        "--data-dir".to_owned(),
        dir.join("store").display().to_string(),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--insecure-dev".to_owned(),
        "--init".to_owned(),
    ];
    NodeProcess::start(
        &flagmesh_integration_tests::topology::bin_dir().join("flagmesh-control"),
        &args,
        &[],
        &dir.join("control.log"),
    )
    .unwrap()
}

/// Write number `i` sets flag `f{i % KEYS}` to `v{i}`.
fn write_request(i: u64) -> UpdateFlagRequest {
    UpdateFlagRequest {
        flag_set: "crash".into(),
        key: format!("f{}", i % KEYS),
        definition_json: string_flag(&format!("v{i}")),
        force: true,
        ..Default::default()
    }
}

/// Every change set, oldest first.
async fn all_history(a: &mut Admin) -> Vec<ChangeSet> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = a
            .list_history(ListHistoryRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.change_sets);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    out.reverse();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_leaves_a_durable_consistent_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path());
    let mut next = 1u64; // the next write number
    let mut last_acked = 0u64;
    let mut last_revision = 0u64;
    for cycle in 0..3 {
        // stream writes; kill the process while they flow
        let uri = node.grpc;
        let first = next;
        let writer = tokio::spawn(async move {
            let mut a = admin(uri, None).await;
            let mut acked = Vec::new();
            let mut i = first;
            loop {
                match a.update_flag(write_request(i)).await {
                    Ok(r) => acked.push((i, r.into_inner().revision)),
                    Err(_) => return (acked, i),
                }
                i += 1;
            }
        });
        tokio::time::sleep(Duration::from_millis(300 + 150 * cycle)).await;
        node.kill();
        let (acked, attempted) = bounded("the writer", 30, writer).await.unwrap();
        assert!(
            !acked.is_empty(),
            "cycle {cycle}: no write was acknowledged before the kill"
        );
        for (i, rev) in &acked {
            assert_eq!(i, rev, "write {i} should have committed as revision {i}");
        }
        last_acked = acked.last().map(|(i, _)| *i).unwrap_or(last_acked);

        node = start(dir.path());
        let mut a = admin(node.grpc, None).await;
        let head = a
            .get_revision(GetRevisionRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            head.revision >= last_acked,
            "cycle {cycle}: acknowledged revision {last_acked} lost (store at {})",
            head.revision
        );
        assert!(
            head.revision <= attempted,
            "cycle {cycle}: revision {} beyond the last attempted write {attempted}",
            head.revision
        );
        assert!(
            head.revision >= last_revision,
            "cycle {cycle}: the revision went backwards"
        );
        last_revision = head.revision;
        next = head.revision + 1;

        // the state is exactly writes 1..=revision applied in order
        let list = a
            .list_flags(ListFlagsRequest {
                flag_set: "crash".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let state: BTreeMap<String, String> = list
            .flags
            .iter()
            .map(|f| {
                (
                    f.key.clone(),
                    String::from_utf8_lossy(&f.definition_json).into_owned(),
                )
            })
            .collect();
        for k in 0..KEYS {
            let last_write = (1..=head.revision).rev().find(|i| i % KEYS == k);
            match last_write {
                Some(i) => assert!(
                    state[&format!("f{k}")].contains(&format!("\"v{i}\"")),
                    "cycle {cycle}: f{k} should hold v{i}"
                ),
                None => assert!(!state.contains_key(&format!("f{k}"))),
            }
        }

        // the change log replays to the same digest
        let history = all_history(&mut a).await;
        let revisions: Vec<u64> = history.iter().map(|c| c.revision).collect();
        assert_eq!(
            revisions,
            (1..=head.revision).collect::<Vec<_>>(),
            "cycle {cycle}: change log has gaps"
        );
        let mut replay: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
        for cs in &history {
            for ch in &cs.changes {
                let id = (ch.flag_set.clone(), ch.key.clone());
                if ch.after_json.is_empty() {
                    replay.remove(&id);
                } else {
                    replay.insert(id, ch.after_json.clone().into_bytes());
                }
            }
        }
        let digest = StateDigest::of(replay.iter().map(|((s, k), bytes)| {
            if k.is_empty() {
                flag_set_hash(s, bytes)
            } else {
                flag_hash(s, k, bytes)
            }
        }));
        assert_eq!(
            digest.0, head.digest,
            "cycle {cycle}: replaying the change log gives another digest"
        );
    }
    assert!(
        node.terminate(Duration::from_secs(10)),
        "control did not stop on SIGTERM"
    );
}
