//! The SDK against in-process meshes: failover to the second PoP with the
//! dead one's breaker open (it costs no calls), the caller's default with
//! an error reason when every PoP is down, local mode agreeing with remote
//! evaluation on every flag and context of the flagd test kit and following
//! a change made at control, the OpenFeature provider's mapping and events,
//! and bootstrap payloads.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use flagmesh_engine::{FlagDocument, Strictness};
use flagmesh_integration_tests::flagd_kit::package_dir;
use flagmesh_integration_tests::inproc::mesh::*;
use flagmesh_proto::v1::{NodeRole, UpdateFlagRequest};
use flagmesh_sdk::{
    BreakerState, FlagmeshProvider, LocalClient, LocalConfig, ProviderEvent, RemoteClient,
    RemoteConfig, bootstrap, script_tag,
};
use open_feature::provider::FeatureProvider;
use serde_json::{Value, json};

async fn put(a: &mut Admin, set: &str, key: &str, def: &str) -> Result<u64, tonic::Status> {
    a.update_flag(UpdateFlagRequest {
        flag_set: set.into(),
        key: key.into(),
        definition_json: def.into(),
        force: true,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_and_the_breaker_spares_the_dead_pop() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    put(&mut a, "web", "flag", &string_flag("right"))
        .await
        .unwrap();
    let up = vec![control.grpc_addr.to_string()];
    let first = pop(
        relay(dir.path(), "pop-a", NodeRole::Pop, up.clone(), None),
        "web",
        dev(),
    )
    .await;
    let second = pop(
        relay(dir.path(), "pop-b", NodeRole::Pop, up, None),
        "web",
        dev(),
    )
    .await;
    let (s1, s2) = (first.state.clone(), second.state.clone());
    eventually("both PoPs sync", 10, || {
        s1.load().revision == 1 && s2.load().revision == 1
    })
    .await;

    let mut config = RemoteConfig::new(vec![
        first.grpc_addr.to_string(),
        second.grpc_addr.to_string(),
    ]);
    config.deadline = Duration::from_millis(300);
    config.failures_to_open = 2;
    config.open_for = Duration::from_secs(60);
    let client = RemoteClient::new(config).unwrap();
    let ctx = json!({"targetingKey": "u1"});
    let d = client.string_value("flag", &ctx, "default").await;
    assert_eq!((d.value.as_str(), d.pop_id.as_str()), ("right", "pop-a"));

    first.stop().await;
    for _ in 0..10 {
        let d = client.string_value("flag", &ctx, "default").await;
        assert_eq!(
            (d.value.as_str(), d.pop_id.as_str(), d.reason.as_str()),
            ("right", "pop-b", "STATIC")
        );
    }
    assert_eq!(client.breaker(0), Some(BreakerState::Open));
    assert_eq!(
        client.attempts(0),
        1 + 2,
        "the dead PoP was tried after its breaker opened"
    );
    assert_eq!(client.attempts(1), 10);
    second.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_pop_down_typed_calls_return_the_default() {
    // two addresses nothing listens on
    let dead: Vec<String> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut config = RemoteConfig::new(dead);
    config.deadline = Duration::from_millis(200);
    let client = RemoteClient::new(config).unwrap();
    let ctx = json!({});
    let bound = Duration::from_secs(3);
    let b = tokio::time::timeout(bound, client.bool_value("f", &ctx, true))
        .await
        .expect("within its deadline");
    let s = tokio::time::timeout(bound, client.string_value("f", &ctx, "dflt"))
        .await
        .expect("within its deadline");
    let i = tokio::time::timeout(bound, client.int_value("f", &ctx, 7))
        .await
        .expect("within its deadline");
    let f = tokio::time::timeout(bound, client.float_value("f", &ctx, 1.5))
        .await
        .expect("within its deadline");
    let o = tokio::time::timeout(bound, client.json_value("f", &ctx, serde_json::Map::new()))
        .await
        .expect("within its deadline");
    assert_eq!(
        (b.value, s.value.as_str(), i.value, f.value, o.value.len()),
        (true, "dflt", 7, 1.5, 0)
    );
    for (reason, code, msg) in [
        (&b.reason, &b.error_code, &b.error_message),
        (&s.reason, &s.error_code, &s.error_message),
        (&o.reason, &o.error_code, &o.error_message),
    ] {
        assert_eq!(
            (reason.as_str(), code.as_deref()),
            ("ERROR", Some("GENERAL"))
        );
        assert!(
            msg.as_deref()
                .is_some_and(|m| m.contains("no PoP answered"))
        );
    }
}

/// Contexts drawn from the test kit's scenarios.
fn kit_contexts() -> Vec<Value> {
    vec![
        json!({}),
        json!({"targetingKey": "5c3d8535-f81a-4478-a6d3-afaa4d51199e"}),
        json!({"email": "ballmer@macrosoft.com"}),
        json!({"email": "jobs@orange.com"}),
        json!({"email": "wozniak@orange.com"}),
        json!({"targetingKey": "jon@company.com", "tier": "premium", "color": "red"}),
        json!({"targetingKey": "user1", "tier": "basic", "color": "green"}),
        json!({"user": {"name": "jack"}, "targetingKey": "jane@company.com"}),
        json!({"user": {"name": "queen"}}),
        json!({"version": "2.0.0"}),
        json!({"version": "2.1.0"}),
        json!({"version": "v1.0.0"}),
        json!({"version": "1.0.0+other"}),
        json!({"version": 1.2}),
        json!({"id": "abcdef"}),
        json!({"id": "uvwxyz"}),
        json!({"num": 123}),
        json!({"targetingKey": "ejOoVL"}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_agrees_with_remote_on_the_test_kit_and_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    let text = std::fs::read_to_string(
        package_dir().join("flagd-testbed/evaluator/flags/testkit-flags.json"),
    )
    .unwrap();
    let doc = FlagDocument::parse(&text, Strictness::Lenient).unwrap();
    let mut accepted = 0;
    for (key, def) in &doc.flags {
        // flags the control plane's strict validation refuses stay out
        if put(&mut a, "kit", key, &def.to_json().to_string())
            .await
            .is_ok()
        {
            accepted += 1;
        }
    }
    assert!(accepted >= 45, "only {accepted} test-kit flags accepted");
    let p = pop_1(dir.path(), control.grpc_addr, "kit").await;
    let state = p.state.clone();
    eventually("the PoP syncs", 10, || state.load().revision == accepted).await;

    let local = LocalClient::start(LocalConfig::new(vec![p.grpc_addr.to_string()], "kit")).unwrap();
    assert!(
        local.wait_ready(Duration::from_secs(10)).await,
        "the local client never synced"
    );
    let mut rc = RemoteConfig::new(vec![p.grpc_addr.to_string()]);
    rc.flag_set = "kit".into();
    let remote = RemoteClient::new(rc).unwrap();
    let keys = local.keys();
    assert_eq!(keys.len() as u64, accepted);
    let mut compared = 0;
    for key in &keys {
        for ctx in kit_contexts() {
            let l = local.value(key, &ctx, Value::Null);
            let r = remote.value(key, &ctx, Value::Null).await;
            // numbers cross the wire as doubles: 0 and 0.0 are the same value
            let norm = |v: &Value| {
                if v.is_number() {
                    json!(v.as_f64())
                } else {
                    v.clone()
                }
            };
            assert_eq!(
                (norm(&l.value), &l.variant, &l.reason, &l.error_code),
                (norm(&r.value), &r.variant, &r.reason, &r.error_code),
                "{key} with {ctx}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 45 * 18);

    // a change at control reaches the local client
    let mut changes = local.changes();
    let revision = put(
        &mut a,
        "kit",
        "string-flag",
        r#"{"state":"ENABLED","variants":{"x":"changed"},"defaultVariant":"x"}"#,
    )
    .await
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        changes.wait_for(|r| *r >= revision),
    )
    .await
    .unwrap()
    .unwrap();
    let d = local.string_value("string-flag", &json!({}), "default");
    assert_eq!((d.value.as_str(), d.revision), ("changed", revision));
    p.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openfeature_provider_maps_results_and_emits_events() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    put(&mut a, "web", "flag", r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"on","metadata":{"owner":"team-a"}}"#)
        .await
        .unwrap();
    let p = pop_1(dir.path(), control.grpc_addr, "web").await;
    let state = p.state.clone();
    eventually("the PoP syncs", 10, || state.load().revision == 1).await;

    let ctx = open_feature::EvaluationContext::default().with_targeting_key("u1");
    let mut rc = RemoteConfig::new(vec![p.grpc_addr.to_string()]);
    rc.flag_set = "web".into();
    let remote = FlagmeshProvider::remote(RemoteClient::new(rc).unwrap());
    let local_client =
        LocalClient::start(LocalConfig::new(vec![p.grpc_addr.to_string()], "web")).unwrap();
    let local = FlagmeshProvider::local(local_client);
    let mut events = local.events();
    let first = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, ProviderEvent::Ready);
    for provider in [&remote, &local] {
        let r = provider.resolve_bool_value("flag", &ctx).await.unwrap();
        assert!(r.value);
        assert_eq!(r.variant.as_deref(), Some("on"));
        assert_eq!(r.reason, Some(open_feature::EvaluationReason::Static));
        let md = r.flag_metadata.unwrap();
        assert_eq!(
            md.values.get("owner"),
            Some(&open_feature::FlagMetadataValue::String("team-a".into()))
        );
        let e = provider
            .resolve_bool_value("missing", &ctx)
            .await
            .unwrap_err();
        assert_eq!(e.code, open_feature::EvaluationErrorCode::FlagNotFound);
        let e = provider
            .resolve_string_value("flag", &ctx)
            .await
            .unwrap_err();
        assert_eq!(e.code, open_feature::EvaluationErrorCode::TypeMismatch);
    }
    assert_eq!(
        local.status(),
        open_feature::provider::ProviderStatus::Ready
    );
    put(
        &mut a,
        "web",
        "flag",
        r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off"}"#,
    )
    .await
    .unwrap();
    let changed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(ProviderEvent::ConfigurationChanged { revision }) = events.recv().await {
                return revision;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(changed, 2);
    assert!(!local.resolve_bool_value("flag", &ctx).await.unwrap().value);

    // bootstrap for a page
    let mut rc = RemoteConfig::new(vec![p.grpc_addr.to_string()]);
    rc.flag_set = "web".into();
    let payload = bootstrap(
        &RemoteClient::new(rc).unwrap(),
        &json!({"targetingKey": "u1"}),
    )
    .await
    .unwrap();
    assert_eq!(payload["flags"]["flag"]["value"], false);
    assert_eq!(payload["revision"], 2);
    assert!(script_tag(&payload).starts_with("<script>window.__FLAGS__ = {"));
    p.stop().await;
    control.stop().await;
}

/// PoP `pop-1` following control at `upstream`, serving `set` by default.
async fn pop_1(
    dir: &std::path::Path,
    upstream: std::net::SocketAddr,
    set: &str,
) -> flagmesh_pop::node::RunningPop {
    pop(
        relay(
            dir,
            "pop-1",
            NodeRole::Pop,
            vec![upstream.to_string()],
            None,
        ),
        set,
        dev(),
    )
    .await
}

/// The next provider event within `within_ms`, if any.
async fn next_event(
    events: &mut flagmesh_sdk::ProviderEvents,
    within_ms: u64,
) -> Option<ProviderEvent> {
    tokio::time::timeout(Duration::from_millis(within_ms), events.recv())
        .await
        .ok()
        .map(|r| r.unwrap())
}

/// A provider followed after it became ready still reports `Ready` first
/// (an OpenFeature handler added late runs for the state it missed), and a
/// revision is reported changed once, not again at every staleness check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_followed_late_reports_ready_and_each_change_once() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(dir.path(), dev()).await;
    let mut a = admin(control.grpc_addr).await;
    let flag = |default: &str| {
        format!(
            r#"{{"state":"ENABLED","variants":{{"on":true,"off":false}},"defaultVariant":"{default}"}}"#
        )
    };
    put(&mut a, "web", "flag", &flag("on")).await.unwrap();
    let p = pop_1(dir.path(), control.grpc_addr, "web").await;
    let local_client =
        LocalClient::start(LocalConfig::new(vec![p.grpc_addr.to_string()], "web")).unwrap();
    let local = FlagmeshProvider::local(local_client);
    eventually("the provider is ready", 10, || {
        local.status() == open_feature::provider::ProviderStatus::Ready
    })
    .await;
    // past the provider's one-second staleness check, which re-sent the
    // last change
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut events = local.events();
    assert_eq!(
        next_event(&mut events, 5000).await,
        Some(ProviderEvent::Ready)
    );
    assert_eq!(
        next_event(&mut events, 2500).await,
        None,
        "no change, no event"
    );
    put(&mut a, "web", "flag", &flag("off")).await.unwrap();
    assert_eq!(
        next_event(&mut events, 10_000).await,
        Some(ProviderEvent::ConfigurationChanged { revision: 2 })
    );
    assert_eq!(next_event(&mut events, 2500).await, None, "reported once");
    p.stop().await;
    control.stop().await;
}
