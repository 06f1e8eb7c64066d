//! What the web console stands on, against a real control node: dry runs
//! of single-flag writes (the editor's validation as you type and its
//! conflict check), reverting a flag or a set to a revision from the audit
//! trail, evaluation previews with the PoPs' engine, WhoAmI, and the
//! HTTP/JSON gateway in front of the Admin service (the same credentials,
//! policies and error codes as gRPC).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use flagmesh_integration_tests::inproc::admin::*;
use flagmesh_integration_tests::topology::http_post;
use flagmesh_proto::v1::*;
use serde_json::{Value, json};
use tonic::Code;

async fn write(a: &mut Admin, key: &str, definition: String) -> u64 {
    a.update_flag(UpdateFlagRequest {
        flag_set: "s".into(),
        key: key.into(),
        definition_json: definition,
        force: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .revision
}

async fn definition(a: &mut Admin, key: &str) -> Option<Value> {
    match a
        .get_flag(GetFlagRequest {
            flag_set: "s".into(),
            key: key.into(),
        })
        .await
    {
        Ok(r) => {
            Some(serde_json::from_slice(&r.into_inner().flag.unwrap().definition_json).unwrap())
        }
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => panic!("{s}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_answers_what_the_write_would_and_writes_nothing() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    let at = write(&mut a, "f", bool_flag(true)).await;
    let dry = |definition: String, expected: u64| UpdateFlagRequest {
        flag_set: "s".into(),
        key: "f".into(),
        definition_json: definition,
        expected_mod_revision: expected,
        dry_run: true,
        ..Default::default()
    };
    // a change: accepted, nothing written
    let r = a
        .update_flag(dry(bool_flag(false), at))
        .await
        .unwrap()
        .into_inner();
    assert!(r.dry_run && r.changed, "{r:?}");
    assert_eq!(r.revision, at);
    assert_eq!(
        definition(&mut a, "f").await.unwrap()["defaultVariant"],
        "on"
    );
    // the same definition: nothing would change
    let r = a
        .update_flag(dry(bool_flag(true), at))
        .await
        .unwrap()
        .into_inner();
    assert!(r.dry_run && !r.changed, "{r:?}");
    // warnings come back as they would on the write
    let warned = r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"on",
        "targeting":{"if":[{"starts_with":[{"var":"email"}]},"off"]}}"#;
    let r = a
        .update_flag(dry(warned.into(), at))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(r.warnings[0].pointer.starts_with("/targeting"), "{r:?}");
    // a stale expected revision is the conflict the write would meet
    let stale = a
        .update_flag(dry(bool_flag(false), at - 1))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale}");
    // invalid input is refused with the field named
    let bad = a
        .update_flag(dry(r#"{"state":"ON","variants":{}}"#.into(), at))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("/state"), "{bad}");
    // a dry-run delete and create change nothing either
    let r = a
        .delete_flag(DeleteFlagRequest {
            flag_set: "s".into(),
            key: "f".into(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.dry_run && r.changed);
    let r = a
        .create_flag(CreateFlagRequest {
            flag_set: "s".into(),
            key: "g".into(),
            definition_json: bool_flag(true),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.dry_run && r.changed);
    assert!(definition(&mut a, "f").await.is_some());
    assert!(definition(&mut a, "g").await.is_none());
    assert_eq!(revision(&mut a).await, at, "no dry run committed anything");
    c.node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_restores_a_flag_or_a_whole_set_as_a_new_change() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    write(&mut a, "kept", string_flag("k1")).await;
    write(&mut a, "f", string_flag("one")).await;
    let gone = write(&mut a, "gone", string_flag("g1")).await;
    let at = write(&mut a, "f", string_flag("two")).await;
    write(&mut a, "f", string_flag("three")).await;
    write(&mut a, "added", string_flag("new")).await;
    a.delete_flag(DeleteFlagRequest {
        flag_set: "s".into(),
        key: "gone".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // one flag: back to what it was at `at`, the others untouched
    let r = a
        .revert(RevertRequest {
            flag_set: "s".into(),
            key: "f".into(),
            to_revision: at,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.changes.len(), 1, "{r:?}");
    assert_eq!(
        definition(&mut a, "f").await.unwrap()["variants"]["v"],
        "two"
    );
    assert!(definition(&mut a, "added").await.is_some());
    let h = a
        .list_history(ListHistoryRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = &h.change_sets[0];
    assert_eq!(last.operation, "revert");
    assert_eq!(last.revision, r.revision);
    assert_eq!(last.comment, format!("revert to revision {at}"));
    assert!(last.changes[0].before_json.contains("three"));

    // a dry run of the whole set at `gone`: says what, writes nothing
    let head = revision(&mut a).await;
    let set = RevertRequest {
        flag_set: "s".into(),
        to_revision: gone,
        comment: "back to before the launch".into(),
        ..Default::default()
    };
    let dry = a
        .revert(RevertRequest {
            dry_run: true,
            ..set.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = dry.changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["added", "f", "gone"], "{dry:?}");
    assert_eq!(revision(&mut a).await, head);
    // the set: a flag created since is deleted, one deleted since is back
    a.revert(set).await.unwrap();
    assert_eq!(
        definition(&mut a, "f").await.unwrap()["variants"]["v"],
        "one"
    );
    assert_eq!(
        definition(&mut a, "gone").await.unwrap()["variants"]["v"],
        "g1"
    );
    assert!(definition(&mut a, "added").await.is_none());
    assert_eq!(
        definition(&mut a, "kept").await.unwrap()["variants"]["v"],
        "k1"
    );

    // reverting to where it is changes nothing; to the future is refused
    let head = revision(&mut a).await;
    let same = a
        .revert(RevertRequest {
            flag_set: "s".into(),
            to_revision: head,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(same.changes.is_empty());
    let future = a
        .revert(RevertRequest {
            flag_set: "s".into(),
            to_revision: head + 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(future.code(), Code::InvalidArgument, "{future}");
    c.node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_evaluates_the_stored_flag_or_an_edit_like_a_pop() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    a.apply_flag_set(ApplyFlagSetRequest {
        flag_set: "s".into(),
        document: r#"{"metadata": {"team": "web"}, "flags": {"f": {"state": "ENABLED",
            "variants": {"on": true, "off": false}, "defaultVariant": "off",
            "targeting": {"if": [{"ends_with": [{"var": "email"}, "@example.com"]}, "on"]}}}}"#
            .into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let context = |email: &str| {
        Some(flagmesh_proto::convert::map_to_struct(
            json!({"targetingKey": "u", "email": email})
                .as_object()
                .unwrap(),
        ))
    };
    let preview = |definition: &str, email: &str| PreviewEvaluationRequest {
        flag_set: "s".into(),
        key: "f".into(),
        definition_json: definition.into(),
        context: context(email),
    };
    let r = a
        .preview_evaluation(preview("", "a@example.com"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.variant, "on");
    assert_eq!(r.reason, Reason::TargetingMatch as i32);
    assert_eq!(
        r.metadata.unwrap().fields["team"].kind,
        Some(prost_types::value::Kind::StringValue("web".into()))
    );
    let r = a
        .preview_evaluation(preview("", "a@other.org"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.variant.as_str(), r.reason),
        ("off", Reason::Default as i32)
    );
    // an edit not saved: disabled
    let r = a
        .preview_evaluation(preview(
            r#"{"state":"DISABLED","variants":{"on":true},"defaultVariant":"on"}"#,
            "a@example.com",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, Reason::Disabled as i32);
    assert!(r.value.is_none());
    let missing = a
        .preview_evaluation(PreviewEvaluationRequest {
            flag_set: "s".into(),
            key: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    c.node.stop().await;
}

async fn gateway(c: &Control, method: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    // an Admin method, or another service's as `package.Service/Method`
    let path = match method.contains('/') {
        true => format!("/api/{method}"),
        false => format!("/api/flagmesh.v1.Admin/{method}"),
    };
    let (status, h, body) = http_post(c.http, &path, body, &headers).await.unwrap();
    assert_eq!(h["content-type"], "application/json", "{body}");
    assert_eq!(h["cache-control"], "no-store");
    (status, serde_json::from_str(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_gateway_is_the_admin_api_with_its_credentials() {
    let c = control(100, true).await;
    let update = r#"{"flagSet": "s", "key": "f", "definitionJson": "{\"state\":\"ENABLED\",\"variants\":{\"on\":true},\"defaultVariant\":\"on\"}"}"#;
    // who: each role as its token says
    for role in ["read", "write", "admin"] {
        let (status, who) = gateway(&c, "WhoAmI", Some(&format!("{role}-secret")), "").await;
        assert_eq!(status, 200);
        assert_eq!(
            who,
            json!({"name": format!("{role}-user"), "role": role, "flagSets": []})
        );
    }
    // refused as gRPC refuses: no token 401, read token writing 403
    let (status, e) = gateway(&c, "UpdateFlag", None, update).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (401, Some("UNAUTHENTICATED")),
        "{e}"
    );
    let (status, e) = gateway(&c, "UpdateFlag", Some("read-secret"), update).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("PERMISSION_DENIED")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("read-user"), "{e}");
    // a write token writes, and the audit trail names it
    let (status, w) = gateway(&c, "UpdateFlag", Some("write-secret"), update).await;
    assert_eq!(status, 200, "{w}");
    let written = w["revision"].as_u64().unwrap();
    assert!(written > 0 && w["changed"] == json!(true), "{w}");
    let (_, h) = gateway(&c, "ListHistory", Some("read-secret"), "{}").await;
    assert_eq!(h["changeSets"][0]["actor"], "write-user", "{h}");
    // numbers are JSON numbers; bytes are base64
    let (_, f) = gateway(
        &c,
        "GetFlag",
        Some("read-secret"),
        r#"{"flagSet":"s","key":"f"}"#,
    )
    .await;
    assert_eq!(f["flag"]["modRevision"], json!(written), "{f}");
    assert!(
        f["flag"]["definitionJson"]
            .as_str()
            .unwrap()
            .starts_with("ey"),
        "{f}"
    );
    // a stale write: 409 with the store's words
    let stale = r#"{"flagSet": "s", "key": "f", "expectedModRevision": 1000, "definitionJson": "{\"state\":\"DISABLED\",\"variants\":{\"on\":true},\"defaultVariant\":\"on\"}"}"#;
    let (status, e) = gateway(&c, "UpdateFlag", Some("write-secret"), stale).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (409, Some("FAILED_PRECONDITION")),
        "{e}"
    );
    // bad JSON, unknown fields, unknown or streaming methods
    let (status, e) = gateway(&c, "GetFlag", Some("read-secret"), "{\"flagSet\":").await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{e}"
    );
    let (status, e) = gateway(&c, "GetFlag", Some("read-secret"), r#"{"flag_sett":"s"}"#).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("flag_sett"), "{e}");
    for method in [
        "Nope",
        "flagmesh.v1.Sync/Subscribe",
        "grpc.health.v1.Health/Check",
    ] {
        let (status, e) = gateway(&c, method, Some("admin-secret"), "{}").await;
        assert_eq!(
            (status, e["code"].as_str()),
            (501, Some("UNIMPLEMENTED")),
            "{method}: {e}"
        );
    }
    // the state is exactly what the one write made
    let mut a = admin(c.addr, Some("read-secret")).await;
    assert_eq!(revision(&mut a).await, written);
    c.node.stop().await;
}
