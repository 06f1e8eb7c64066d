//! A control plane, a hub and PoPs in one process: the PoP serves from sled
//! when restarted with its upstream unreachable (stale) and then catches up
//! by delta, not snapshot; a hub's memory stays bounded with a subscriber
//! that never reads, while the others receive every change; evaluation
//! errors come back in-band, never as a panic or a hang; evaluation keys
//! are scoped to flag sets; EvaluateAll and Watch follow the state.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flagmesh_integration_tests::inproc::mesh::*;
use flagmesh_proto::convert::{json_to_value, map_to_struct};
use flagmesh_proto::v1::*;
use flagmesh_server::credentials::{Authenticator, hash_token};
use prost_types::value::Kind;
use tonic::Code;

async fn write(a: &mut Admin, set: &str, key: &str, value: &str) -> u64 {
    a.update_flag(UpdateFlagRequest {
        flag_set: set.into(),
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

fn string_of(r: &EvaluateResponse) -> Option<&str> {
    match r.value.as_ref()?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

async fn evaluate(e: &mut Eval, set: &str, key: &str) -> EvaluateResponse {
    e.evaluate(EvaluateRequest {
        flag_set: set.into(),
        flag_key: key.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_pop_serves_from_sled_then_catches_up_by_delta() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    for i in 0..5 {
        write(&mut a, "web", &format!("f{i}"), "one").await;
    }
    let hub_relay = relay(
        dir.path(),
        "hub-1",
        NodeRole::Hub,
        vec![control.grpc_addr.to_string()],
        None,
    );
    let hub = hub_at(hub_relay.clone(), "127.0.0.1:0".parse().unwrap(), dev()).await;
    let hub_addr = hub.grpc_addr;
    let pop_relay = relay(
        dir.path(),
        "pop-1",
        NodeRole::Pop,
        vec![hub_addr.to_string()],
        None,
    );
    let p = pop(pop_relay.clone(), "web", dev()).await;
    let state = p.state.clone();
    eventually("the PoP applies revision 5", 10, || {
        state.load().revision == 5
    })
    .await;
    p.stop().await;
    hub.stop().await;

    // changes while the PoP is down and its hub is gone
    for i in 0..3 {
        write(&mut a, "web", &format!("f{i}"), "two").await;
    }
    let p = pop(pop_relay, "web", dev()).await;
    let mut e = eval(p.grpc_addr, None).await;
    let r = evaluate(&mut e, "", "f0").await;
    assert_eq!(
        string_of(&r),
        Some("one"),
        "serves the last applied value from sled"
    );
    assert_eq!((r.revision, r.stale), (5, true));
    assert_eq!(r.mod_revision, 1);

    // the hub returns on the same address; the PoP resumes by delta
    let hub = hub_at(hub_relay, hub_addr, dev()).await;
    let state = p.state.clone();
    eventually("the PoP catches up to revision 8", 10, || {
        state.load().revision == 8
    })
    .await;
    let stats = p.relay.stats.clone();
    assert_eq!(
        stats.snapshots.load(Ordering::Relaxed),
        0,
        "caught up by snapshot"
    );
    assert!(stats.deltas.load(Ordering::Relaxed) >= 1);
    let status = p.relay.status.clone();
    eventually("the PoP is fresh again", 10, || !status.borrow().stale()).await;
    let r = evaluate(&mut e, "", "f0").await;
    assert_eq!(
        (string_of(&r), r.revision, r.stale),
        (Some("two"), 8, false)
    );
    let digest = a
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner()
        .digest;
    assert_eq!(p.relay.replica.position().digest, digest);
    p.stop().await;
    hub.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_memory_stays_bounded_with_a_subscriber_that_never_reads() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    write(&mut a, "big", "seed", "x").await;
    let mut hub_relay = relay(
        dir.path(),
        "hub-1",
        NodeRole::Hub,
        vec![control.grpc_addr.to_string()],
        None,
    );
    hub_relay.fanout.ring_revisions = 16;
    hub_relay.fanout.send_timeout = Duration::from_millis(500);
    let hub = hub_at(hub_relay, "127.0.0.1:0".parse().unwrap(), dev()).await;
    let p = pop(
        relay(
            dir.path(),
            "pop-1",
            NodeRole::Pop,
            vec![hub.grpc_addr.to_string()],
            None,
        ),
        "big",
        dev(),
    )
    .await;
    let state = p.state.clone();
    eventually("the PoP has the seed", 10, || state.load().revision == 1).await;

    // a subscriber that opens a stream and never reads from it
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", hub.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stuck = flagmesh_proto::v1::sync_client::SyncClient::new(channel);
    let _never_read = stuck
        .subscribe(SubscribeRequest {
            node_id: "stuck".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // more than the HTTP/2 windows (2 MiB per stream) can absorb
    let big = "y".repeat(48 << 10);
    let mut last = 0;
    for i in 0..150 {
        last = write(
            &mut a,
            "big",
            &format!("f{}", i % 10),
            &format!("{big}-{i}"),
        )
        .await;
    }
    eventually("the reading PoP receives every change", 20, || {
        state.load().revision == last
    })
    .await;
    let fanout = hub.relay.fanout.clone();
    eventually("the stuck subscriber is cut off", 10, || {
        fanout.stats().cut_off.load(Ordering::Relaxed) >= 1
    })
    .await;
    let (entries, bytes) = fanout.ring_usage();
    assert!(entries <= 16, "ring holds {entries} deltas");
    // the ring counts each delta twice (encoded and decoded)
    assert!(
        bytes <= 2 * 16 * (big.len() + 4096),
        "ring holds {bytes} bytes"
    );
    eventually("only the PoP is still subscribed", 10, || {
        fanout.stats().subscribers.load(Ordering::Relaxed) == 1
    })
    .await;
    let digest = a
        .get_revision(GetRevisionRequest {})
        .await
        .unwrap()
        .into_inner()
        .digest;
    assert_eq!(p.relay.replica.position().digest, digest);
    p.stop().await;
    hub.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_errors_are_answered_in_band() {
    let dir = tempfile::tempdir().unwrap();
    // a PoP that never synced answers at once with a clear reason
    let lonely = pop(
        relay(
            dir.path(),
            "pop-0",
            NodeRole::Pop,
            vec!["127.0.0.1:1".into()],
            None,
        ),
        "web",
        dev(),
    )
    .await;
    let mut e = eval(lonely.grpc_addr, None).await;
    let r = tokio::time::timeout(Duration::from_secs(2), evaluate(&mut e, "web", "f"))
        .await
        .expect("no hang");
    assert_eq!(
        (r.reason, r.error_code, r.stale),
        (Reason::Error as i32, ErrorCode::General as i32, true)
    );
    assert!(
        r.error_message.contains("never synced"),
        "{}",
        r.error_message
    );
    lonely.stop().await;

    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    write(&mut a, "web", "greeting", "hello").await;
    a.update_flag(UpdateFlagRequest {
        flag_set: "web".into(),
        key: "targeted".into(),
        definition_json: r#"{"state":"ENABLED","variants":{"a":"A","b":"B"},"defaultVariant":"a","targeting":{"fractional":[["a",50],["b",50]]}}"#.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let p = pop(
        relay(
            dir.path(),
            "pop-1",
            NodeRole::Pop,
            vec![control.grpc_addr.to_string()],
            None,
        ),
        "web",
        dev(),
    )
    .await;
    let state = p.state.clone();
    eventually("the PoP syncs", 10, || state.load().revision == 2).await;
    let mut e = eval(p.grpc_addr, None).await;
    let cases: [(&str, &str, ValueType, Option<serde_json::Value>, ErrorCode); 4] = [
        (
            "web",
            "missing",
            ValueType::Any,
            None,
            ErrorCode::FlagNotFound,
        ),
        (
            "nope",
            "greeting",
            ValueType::Any,
            None,
            ErrorCode::FlagNotFound,
        ),
        (
            "web",
            "greeting",
            ValueType::Bool,
            None,
            ErrorCode::TypeMismatch,
        ),
        (
            "web",
            "greeting",
            ValueType::Int,
            None,
            ErrorCode::TypeMismatch,
        ),
    ];
    // a numeric targeting key (JavaScript callers with numeric user ids)
    // is a targeting key like any other, as in flagd's evaluators
    let numeric = e
        .evaluate(EvaluateRequest {
            flag_set: "web".into(),
            flag_key: "targeted".into(),
            expected_type: ValueType::String as i32,
            context: serde_json::json!({"targetingKey": 42})
                .as_object()
                .map(map_to_struct),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(numeric.reason, Reason::Error as i32, "{numeric:?}");
    for (set, key, ty, ctx, want) in cases {
        let req = EvaluateRequest {
            flag_set: set.into(),
            flag_key: key.into(),
            expected_type: ty as i32,
            context: ctx.as_ref().and_then(|c| c.as_object()).map(map_to_struct),
        };
        let r = tokio::time::timeout(Duration::from_secs(2), e.evaluate(req))
            .await
            .expect("no hang")
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.reason, r.error_code),
            (Reason::Error as i32, want as i32),
            "{set}/{key} as {ty:?}: {r:?}"
        );
        assert!(r.value.is_none() && !r.error_message.is_empty());
    }
    // a deeply nested context is refused, not evaluated
    let nested = |levels: usize| {
        let mut deep = serde_json::json!("leaf");
        for _ in 0..levels {
            deep = serde_json::json!({ "n": deep });
        }
        let mut context = prost_types::Struct::default();
        context.fields.insert("deep".into(), json_to_value(&deep));
        EvaluateRequest {
            flag_key: "targeted".into(),
            context: Some(context),
            ..Default::default()
        }
    };
    let r = e.evaluate(nested(20)).await.unwrap().into_inner();
    assert_eq!(r.error_code, ErrorCode::InvalidContext as i32);
    // nested beyond protobuf's decoding limit: refused by the decoder, quickly
    let refused = tokio::time::timeout(Duration::from_secs(2), e.evaluate(nested(60)))
        .await
        .expect("no hang");
    assert!(refused.is_err());
    // a good one still works
    let r = e
        .evaluate(EvaluateRequest {
            flag_key: "greeting".into(),
            expected_type: ValueType::String as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (string_of(&r), r.reason, r.mod_revision, r.revision),
        (Some("hello"), Reason::Static as i32, 1, 2)
    );
    assert_eq!(r.pop_id, "pop-1");
    p.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_keys_are_scoped_to_flag_sets() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    write(&mut a, "a", "f", "in-a").await;
    write(&mut a, "b", "f", "in-b").await;
    let tokens = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        tokens.path(),
        format!(
            "[[token]]\nname = \"edge\"\nrole = \"mesh\"\nsha256 = \"{}\"\n\n[[token]]\nname = \"app-a\"\nrole = \"evaluate\"\nsha256 = \"{}\"\nflag_sets = [\"a\"]\n",
            hash_token("mesh-secret"),
            hash_token("key-a")
        ),
    )
    .unwrap();
    let auth = Arc::new(Authenticator::configure(Some(tokens.path()), None, false).unwrap());
    // the PoP presents its mesh credential to a dev-mode control
    let p = pop(
        relay(
            dir.path(),
            "pop-1",
            NodeRole::Pop,
            vec![control.grpc_addr.to_string()],
            Some("mesh-secret"),
        ),
        "a",
        auth,
    )
    .await;
    let state = p.state.clone();
    eventually("the PoP syncs", 10, || state.load().revision == 2).await;

    let mut e = eval(p.grpc_addr, Some("key-a")).await;
    assert_eq!(string_of(&evaluate(&mut e, "a", "f").await), Some("in-a"));
    let err = e
        .evaluate(EvaluateRequest {
            flag_set: "b".into(),
            flag_key: "f".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = e
        .evaluate_all(EvaluateAllRequest {
            flag_set: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut anonymous = eval(p.grpc_addr, None).await;
    let err = anonymous
        .evaluate(EvaluateRequest {
            flag_set: "a".into(),
            flag_key: "f".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut mesh = eval(p.grpc_addr, Some("mesh-secret")).await;
    assert_eq!(
        string_of(&evaluate(&mut mesh, "b", "f").await),
        Some("in-b")
    );
    p.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluate_all_and_watch_follow_changes() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    write(&mut a, "web", "b-flag", "1").await;
    write(&mut a, "web", "a-flag", "1").await;
    let p = pop(
        relay(
            dir.path(),
            "pop-1",
            NodeRole::Pop,
            vec![control.grpc_addr.to_string()],
            None,
        ),
        "web",
        dev(),
    )
    .await;
    let state = p.state.clone();
    eventually("the PoP syncs", 10, || state.load().revision == 2).await;
    let mut e = eval(p.grpc_addr, None).await;
    let all = e
        .evaluate_all(EvaluateAllRequest::default())
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = all.flags.iter().map(|f| f.flag_key.as_str()).collect();
    assert_eq!(keys, ["a-flag", "b-flag"]);
    assert_eq!((all.revision, all.stale), (2, false));
    assert_eq!(all.pop_id, "pop-1");
    // the answer is written by hand, flag by flag: each flag's part is
    // what Evaluate answers for it
    for f in &all.flags {
        let one = e
            .evaluate(EvaluateRequest {
                flag_key: f.flag_key.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&one, f);
    }

    let mut watch = e.watch(WatchRequest::default()).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.full);
    assert_eq!((first.revision, first.upserts.len()), (2, 2));
    write(&mut a, "web", "a-flag", "2").await;
    a.delete_flag(DeleteFlagRequest {
        flag_set: "web".into(),
        key: "b-flag".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut seen_upsert = false;
    let mut seen_delete = false;
    while !(seen_upsert && seen_delete) {
        let ev = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!ev.full);
        seen_upsert |= ev.upserts.iter().any(|f| {
            f.key == "a-flag" && String::from_utf8_lossy(&f.definition_json).contains("\"2\"")
        });
        seen_delete |= ev.deletes.iter().any(|k| k == "b-flag");
    }
    p.stop().await;
    control.stop().await;
}
