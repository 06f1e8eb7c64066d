//! Writes the generated part of the fuzz seed corpus: `SyncEvent` streams
//! (snapshot, deltas, heartbeats, a gap, a digest mismatch) in the input
//! format of the `sync_events` target. Run from the repository root:
//! `cargo run -p flagmesh-integration-tests --example fuzz_seeds`.

use flagmesh_mesh::replica::digest_of;
use flagmesh_mesh::source::SourceSnapshot;
use flagmesh_proto::v1::sync_event::Event;
use flagmesh_proto::v1::{Delta, Flag, FlagRef, FlagSet, Progress, Snapshot, SyncEvent};
use prost::Message as _;

fn flag(set: &str, key: &str, value: &str, rev: u64) -> Flag {
    Flag {
        flag_set: set.into(),
        key: key.into(),
        definition_json: format!(
            r#"{{"state":"ENABLED","variants":{{"v":"{value}"}},"defaultVariant":"v"}}"#
        )
        .into_bytes(),
        mod_revision: rev,
        create_revision: rev,
    }
}

fn encode(events: &[SyncEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        let bytes = e.encode_to_vec();
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

fn main() -> std::io::Result<()> {
    let h = "h-seed".to_owned();
    let sets = vec![FlagSet {
        id: "web".into(),
        ..Default::default()
    }];
    let mut state = SourceSnapshot {
        history_id: h.clone(),
        revision: 2,
        digest: 0,
        flags: vec![flag("web", "a", "one", 1), flag("web", "b", "two", 2)],
        flag_sets: sets.clone(),
    };
    let snapshot = SyncEvent {
        event: Some(Event::Snapshot(Snapshot {
            history_id: h.clone(),
            revision: 2,
            digest: Some(digest_of(&state)),
            chunk: 0,
            last: true,
            flags: state.flags.clone(),
            flag_sets: sets.clone(),
        })),
    };
    // revision 3: change a, delete b, add c
    state.flags = vec![flag("web", "a", "uno", 3), flag("web", "c", "three", 3)];
    state.revision = 3;
    let delta = SyncEvent {
        event: Some(Event::Delta(Delta {
            history_id: h.clone(),
            from_revision: 2,
            to_revision: 3,
            digest: Some(digest_of(&state)),
            upserts: state.flags.clone(),
            deletes: vec![FlagRef {
                flag_set: "web".into(),
                key: "b".into(),
            }],
            ..Default::default()
        })),
    };
    let progress = SyncEvent {
        event: Some(Event::Progress(Progress {
            revision: 3,
            head_revision: 5,
            history_id: h.clone(),
            upstream_connected: true,
            head_digest: None,
        })),
    };
    let gap = SyncEvent {
        event: Some(Event::Delta(Delta {
            history_id: h.clone(),
            from_revision: 7,
            to_revision: 8,
            ..Default::default()
        })),
    };
    let mut wrong = delta.clone();
    if let Some(Event::Delta(d)) = &mut wrong.event {
        d.digest = d.digest.map(|x| x ^ 1);
    }
    let dir = std::path::Path::new("fuzz/corpus/sync_events");
    std::fs::create_dir_all(dir)?;
    let seeds: [(&str, Vec<SyncEvent>); 4] = [
        (
            "snapshot-delta",
            vec![snapshot.clone(), delta.clone(), progress.clone()],
        ),
        ("snapshot-gap", vec![snapshot.clone(), gap]),
        ("snapshot-wrong-digest", vec![snapshot.clone(), wrong]),
        ("delta-without-state", vec![delta, snapshot]),
    ];
    for (name, events) in seeds {
        std::fs::write(dir.join(name), encode(&events))?;
    }
    Ok(())
}
