//! The Admin API against a real control node: optimistic concurrency,
//! validation of every negative schema document (nothing written; rules
//! flagd still loads are warnings unless strict), every flag file of the
//! flagd testbed applied with its warnings recorded, dry runs and modes of
//! ApplyFlagSet, history paging, and error codes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use flagmesh_integration_tests::flagd_kit::{WARNED_TESTBED_FLAGS, json_files, package_dir};
use flagmesh_integration_tests::inproc::admin::*;
use flagmesh_proto::v1::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_exactly_one_wins_each_round() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    a.update_flag(UpdateFlagRequest {
        flag_set: "s".into(),
        key: "contended".into(),
        definition_json: string_flag("start"),
        ..Default::default()
    })
    .await
    .unwrap();
    for round in 0..8 {
        let current = a
            .get_flag(GetFlagRequest {
                flag_set: "s".into(),
                key: "contended".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .flag
            .unwrap()
            .mod_revision;
        let mut tasks = Vec::new();
        for writer in 0..4 {
            let mut client = admin(c.addr, None).await;
            tasks.push(tokio::spawn(async move {
                client
                    .update_flag(UpdateFlagRequest {
                        flag_set: "s".into(),
                        key: "contended".into(),
                        definition_json: string_flag(&format!("round-{round}-writer-{writer}")),
                        expected_mod_revision: current,
                        ..Default::default()
                    })
                    .await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => wins += 1,
                Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "round {round}: {s:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one writer must win");
    }
    assert_eq!(revision(&mut a).await, 9);
    c.node.stop().await;
}

/// Every negative document of the flagd schema tests, and a flag whose
/// targeting is each negative targeting rule, is refused by a strict
/// ApplyFlagSet with a message naming the problem; the revision does not
/// move. Without strict, the malformed rules (which flagd loads) apply
/// with a warning each, naming the pointer; every other problem is still
/// refused.
#[tokio::test]
async fn negative_documents_are_rejected_and_change_nothing() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    a.update_flag(UpdateFlagRequest {
        flag_set: "t".into(),
        key: "existing".into(),
        definition_json: bool_flag(true),
        ..Default::default()
    })
    .await
    .unwrap();
    let before = revision(&mut a).await;
    let tests = package_dir().join("schemas/json/test");
    let mut documents: Vec<(String, String)> = json_files(&tests.join("flags/negative"))
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    for p in json_files(&tests.join("targeting/negative")) {
        let rule = std::fs::read_to_string(&p).unwrap();
        let doc = format!(
            r#"{{"flags":{{"targeted":{{"state":"ENABLED","variants":{{"on":true,"off":false}},"defaultVariant":"on","targeting":{rule}}}}}}}"#
        );
        documents.push((p.display().to_string(), doc));
    }
    assert!(documents.len() >= 16, "schema test documents missing");
    for (name, document) in &documents {
        let err = a
            .apply_flag_set(ApplyFlagSetRequest {
                flag_set: "t".into(),
                document: document.clone(),
                strict: true,
                ..Default::default()
            })
            .await
            .expect_err(&format!("{name} was accepted"));
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        let msg = err.message();
        assert!(
            msg.contains('/') && msg.len() > 20,
            "{name}: message does not name the field: {msg}"
        );
        assert_eq!(
            revision(&mut a).await,
            before,
            "{name} changed the revision"
        );
    }
    // the flag written before is untouched
    let f = a
        .get_flag(GetFlagRequest {
            flag_set: "t".into(),
            key: "existing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.flag.unwrap().mod_revision, before);

    // without strict: what flagd loads applies, with its warnings
    let mut warned = 0;
    for (name, document) in documents {
        let rule_problem = name.contains("targeting");
        let r = a
            .apply_flag_set(ApplyFlagSetRequest {
                flag_set: "loose".into(),
                document,
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) if rule_problem => {
                let r = r.into_inner();
                assert!(!r.warnings.is_empty(), "{name}: no warning");
                for w in &r.warnings {
                    assert_eq!(w.flag_set, "loose");
                    assert!(
                        w.pointer
                            .starts_with(&format!("/flags/{}/targeting", w.key)),
                        "{name}: {w:?}"
                    );
                    assert!(!w.message.is_empty(), "{name}: {w:?}");
                }
                warned += 1;
            }
            Ok(_) => panic!("{name}: a document flagd does not load was applied"),
            Err(e) => {
                assert!(!rule_problem, "{name}: refused: {e:?}");
                assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
            }
        }
    }
    assert!(
        warned >= 8,
        "only {warned} rule problems applied with warnings"
    );
    c.node.stop().await;
}

/// Every flag file the flagd testbed serves applies (flagd loads them
/// all); the malformed rules among them come back as warnings with their
/// pointers and are kept in the audit trail; a strict apply refuses them.
#[tokio::test]
async fn every_testbed_flag_file_applies_with_its_warnings_recorded() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    let files = json_files(&package_dir().join("flagd-testbed/flags"));
    assert!(files.len() >= 10, "{files:?}");
    let mut warned = std::collections::BTreeSet::new();
    for file in &files {
        let document = std::fs::read_to_string(file).unwrap();
        // a document naming its flag set goes there
        let doc: serde_json::Value = serde_json::from_str(&document).unwrap();
        let set = doc["metadata"]["flagSetId"]
            .as_str()
            .unwrap_or_else(|| file.file_stem().unwrap().to_str().unwrap())
            .to_owned();
        let r = a
            .apply_flag_set(ApplyFlagSetRequest {
                flag_set: set.clone(),
                document: document.clone(),
                comment: "testbed".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{set}: refused: {e:?}"))
            .into_inner();
        assert!(!r.changes.is_empty(), "{set}: nothing applied");
        let strict = a
            .apply_flag_set(ApplyFlagSetRequest {
                flag_set: set.clone(),
                document,
                strict: true,
                ..Default::default()
            })
            .await;
        assert_eq!(strict.is_err(), !r.warnings.is_empty(), "{set}: {strict:?}");
        // the audit entry of this apply keeps its warnings
        let history = a
            .list_history(ListHistoryRequest {
                flag_set: set.clone(),
                page_size: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(history.change_sets[0].revision, r.revision);
        assert_eq!(history.change_sets[0].warnings, r.warnings, "{set}");
        warned.extend(r.warnings.iter().map(|w| w.key.clone()));
    }
    for flag in WARNED_TESTBED_FLAGS {
        assert!(warned.contains(flag), "{flag}: no warning in {warned:?}");
    }
    // one flag written alone: the pointer is into its definition
    let r = a
        .update_flag(UpdateFlagRequest {
            flag_set: "single".into(),
            key: "wrong-args".into(),
            definition_json: r#"{"state":"ENABLED","variants":{"a":"a","b":"b"},"defaultVariant":"a","targeting":{"if":[{"starts_with":["abc"]},"b"]}}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(
        r.warnings[0].pointer.starts_with("/targeting/if/0"),
        "{r:?}"
    );
    let err = a
        .update_flag(UpdateFlagRequest {
            flag_set: "single".into(),
            key: "wrong-args-strict".into(),
            definition_json: r#"{"state":"ENABLED","variants":{"a":"a","b":"b"},"defaultVariant":"a","targeting":{"if":[{"starts_with":["abc"]},"b"]}}"#.into(),
            strict: true,
            ..Default::default()
        })
        .await
        .expect_err("strict refuses it");
    assert_eq!(err.code(), Code::InvalidArgument);
    c.node.stop().await;
}

#[tokio::test]
async fn apply_modes_dry_run_and_errors() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    let doc = |flags: &[(&str, bool)]| {
        let body: Vec<String> = flags
            .iter()
            .map(|(k, on)| format!("\"{k}\": {}", bool_flag(*on)))
            .collect();
        format!(
            r#"{{"metadata": {{"flagSetId": "app", "team": "web"}}, "flags": {{{}}}}}"#,
            body.join(",")
        )
    };
    let r = a
        .apply_flag_set(ApplyFlagSetRequest {
            document: doc(&[("a", true), ("b", true)]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revision, 1);
    // dry run: the diff, nothing written
    let r = a
        .apply_flag_set(ApplyFlagSetRequest {
            document: doc(&[("a", false), ("c", true)]),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<(String, i32)> = r.changes.iter().map(|c| (c.key.clone(), c.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            ("a".into(), ChangeKind::Update as i32),
            ("b".into(), ChangeKind::Delete as i32),
            ("c".into(), ChangeKind::Create as i32)
        ]
    );
    assert!(
        r.changes[0].before_json.contains("\"on\"") && r.changes[0].after_json.contains("\"off\"")
    );
    assert_eq!((r.revision, r.dry_run), (1, true));
    assert_eq!(revision(&mut a).await, 1);
    // merge keeps b
    a.apply_flag_set(ApplyFlagSetRequest {
        document: doc(&[("c", true)]),
        mode: ApplyMode::Merge as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let list = a
        .list_flags(ListFlagsRequest {
            flag_set: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = list.flags.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
    // re-applying the same document changes nothing
    let r = a
        .apply_flag_set(ApplyFlagSetRequest {
            document: doc(&[("c", true)]),
            mode: ApplyMode::Merge as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.changes.is_empty());
    assert_eq!(revision(&mut a).await, 2);
    // YAML works too; a document naming another set than the request is refused
    let err = a
        .apply_flag_set(ApplyFlagSetRequest {
            flag_set: "other".into(),
            document: doc(&[("a", true)]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let yaml =
        "flags:\n  y:\n    state: ENABLED\n    variants: {x: 1, z: 2}\n    defaultVariant: x\n";
    a.apply_flag_set(ApplyFlagSetRequest {
        flag_set: "yaml".into(),
        document: yaml.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // error codes of single-flag writes
    let err = a
        .create_flag(CreateFlagRequest {
            flag_set: "app".into(),
            key: "a".into(),
            definition_json: bool_flag(true),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = a
        .delete_flag(DeleteFlagRequest {
            flag_set: "app".into(),
            key: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = a
        .delete_flag(DeleteFlagRequest {
            flag_set: "app".into(),
            key: "a".into(),
            expected_mod_revision: 999,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = a
        .update_flag(UpdateFlagRequest {
            flag_set: "bad set!".into(),
            key: "k".into(),
            definition_json: bool_flag(true),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = a
        .update_flag(UpdateFlagRequest {
            flag_set: "app".into(),
            key: "k".into(),
            definition_json: "{not json".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("flag \"k\"") && err.message().contains("definition_json"),
        "{err:?}"
    );
    c.node.stop().await;
}

#[tokio::test]
async fn history_records_actor_changes_and_pages() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    for i in 0..7 {
        a.update_flag(UpdateFlagRequest {
            flag_set: "h".into(),
            key: format!("f{}", i % 3),
            definition_json: string_flag(&format!("v{i}")),
            force: true,
            comment: format!("change {i}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = a
            .list_history(ListHistoryRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.change_sets.iter().map(|c| c.revision));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, vec![7, 6, 5, 4, 3, 2, 1]);
    let f1 = a
        .list_history(ListHistoryRequest {
            flag_set: "h".into(),
            key: "f1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let revs: Vec<u64> = f1.change_sets.iter().map(|c| c.revision).collect();
    assert_eq!(revs, vec![5, 2]);
    let latest = &f1.change_sets[0];
    assert_eq!(
        (latest.actor.as_str(), latest.comment.as_str()),
        ("dev", "change 4")
    );
    let change = latest.changes.iter().find(|c| c.key == "f1").unwrap();
    assert!(change.before_json.contains("v1") && change.after_json.contains("v4"));
    c.node.stop().await;
}
