//! Subscribe against a real control node: a subscriber with no state gets a
//! snapshot whose digest matches the flags it carries; one that resumes
//! inside the retained window gets exactly the missing changes as one
//! delta, then live deltas chained to it; one that resumes before the
//! compaction point, or is of another history, gets a snapshot; one ahead
//! of the server is refused with UNAVAILABLE.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use flagmesh_control::store::metadata_bytes;
use flagmesh_engine::{StateDigest, flag_hash, flag_set_hash};
use flagmesh_integration_tests::inproc::admin::*;
use flagmesh_proto::convert::struct_to_map;
use flagmesh_proto::v1::sync_event::Event;
use flagmesh_proto::v1::*;
use tonic::{Code, Streaming};

async fn write(a: &mut Admin, key: &str, value: &str) -> u64 {
    a.update_flag(UpdateFlagRequest {
        flag_set: "s".into(),
        key: key.into(),
        definition_json: string_flag(value),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .revision
}

async fn open(s: &mut Sync, history: &str, resume: u64) -> Streaming<SyncEvent> {
    s.subscribe(SubscribeRequest {
        node_id: "test".into(),
        role: NodeRole::Pop as i32,
        history_id: history.into(),
        resume_revision: resume,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// The next snapshot or delta (skipping heartbeats).
async fn next_change(stream: &mut Streaming<SyncEvent>) -> Event {
    bounded("the next event", 10, async {
        loop {
            match stream.message().await.unwrap().and_then(|e| e.event) {
                Some(Event::Progress(_)) => continue,
                Some(e) => return e,
                None => panic!("stream ended"),
            }
        }
    })
    .await
}

fn snapshot_digest(s: &Snapshot) -> u64 {
    StateDigest::of(
        s.flags
            .iter()
            .map(|f| flag_hash(&f.flag_set, &f.key, &f.definition_json))
            .chain(s.flag_sets.iter().map(|fs| {
                flag_set_hash(
                    &fs.id,
                    &metadata_bytes(&fs.metadata.as_ref().map(struct_to_map).unwrap_or_default()),
                )
            })),
    )
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_resume_within_window_then_live() {
    let c = control(5, false).await;
    let mut a = admin(c.addr, None).await;
    for i in 0..3 {
        write(&mut a, &format!("f{i}"), "one").await;
    }
    let head = a
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut s = sync(c.addr, None).await;
    let mut stream = open(&mut s, "", 0).await;
    let Event::Snapshot(snap) = next_change(&mut stream).await else {
        panic!("expected a snapshot")
    };
    assert!(snap.last);
    assert_eq!((snap.revision, snap.flags.len()), (3, 3));
    assert_eq!(snap.digest, Some(head.digest));
    assert_eq!(
        snapshot_digest(&snap),
        head.digest,
        "digest must cover exactly the state sent"
    );
    drop(stream);

    // three more changes while away: f1 changed twice, f3 created
    write(&mut a, "f1", "two").await;
    write(&mut a, "f3", "new").await;
    write(&mut a, "f1", "three").await;
    let mut stream = open(&mut s, &head.history_id, 3).await;
    let Event::Delta(d) = next_change(&mut stream).await else {
        panic!("expected a delta")
    };
    assert_eq!((d.from_revision, d.to_revision), (3, 6));
    let mut keys: Vec<&str> = d.upserts.iter().map(|f| f.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["f1", "f3"], "exactly the missing changes");
    assert!(
        String::from_utf8_lossy(
            &d.upserts
                .iter()
                .find(|f| f.key == "f1")
                .unwrap()
                .definition_json
        )
        .contains("three")
    );
    assert!(d.deletes.is_empty());

    // live: the next change arrives as a delta chained to the previous one
    a.delete_flag(DeleteFlagRequest {
        flag_set: "s".into(),
        key: "f0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let Event::Delta(live) = next_change(&mut stream).await else {
        panic!("expected a live delta")
    };
    assert_eq!((live.from_revision, live.to_revision), (6, 7));
    assert_eq!(live.deletes.len(), 1);
    let now = a
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(live.digest, Some(now.digest));
    c.node.stop().await;
}

#[tokio::test]
async fn resume_before_compaction_or_other_history_gets_a_snapshot() {
    let c = control(5, false).await;
    let mut a = admin(c.addr, None).await;
    for i in 0..12 {
        write(&mut a, &format!("f{}", i % 4), &format!("v{i}")).await;
    }
    let head = a
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((head.revision, head.oldest_revision), (12, 8));
    let mut s = sync(c.addr, None).await;

    // resume at 4: compacted away -> snapshot
    let mut stream = open(&mut s, &head.history_id, 4).await;
    let Event::Snapshot(snap) = next_change(&mut stream).await else {
        panic!("expected a snapshot")
    };
    assert_eq!((snap.revision, snap.flags.len()), (12, 4));

    // resume at 7, the compaction point: still servable by delta
    let mut stream = open(&mut s, &head.history_id, 7).await;
    let Event::Delta(d) = next_change(&mut stream).await else {
        panic!("expected a delta")
    };
    assert_eq!((d.from_revision, d.to_revision), (7, 12));

    // another history -> snapshot, whatever the revision
    let mut stream = open(&mut s, "some-other-history", 11).await;
    assert!(matches!(next_change(&mut stream).await, Event::Snapshot(_)));

    // ahead of the server -> UNAVAILABLE
    let err = s
        .subscribe(SubscribeRequest {
            node_id: "x".into(),
            history_id: head.history_id.clone(),
            resume_revision: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    c.node.stop().await;
}

#[tokio::test]
async fn idle_streams_carry_progress_heartbeats() {
    let c = control(5, false).await;
    let mut a = admin(c.addr, None).await;
    write(&mut a, "f", "x").await;
    let mut s = sync(c.addr, None).await;
    let mut stream = open(&mut s, "", 0).await;
    assert!(matches!(next_change(&mut stream).await, Event::Snapshot(_)));
    let progress = bounded("a heartbeat", 5, async {
        loop {
            if let Some(Event::Progress(p)) = stream.message().await.unwrap().and_then(|e| e.event)
            {
                return p;
            }
        }
    })
    .await;
    assert_eq!((progress.revision, progress.head_revision), (1, 1));
    assert!(progress.upstream_connected);
    c.node.stop().await;
}
