//! The web console in a real browser against a running mesh (1 control ×
//! 2 hubs × 2 PoPs each, with tokens): Debian's headless Chromium, driven
//! by playwright-core from npm (`integration-tests/console`, installed from
//! its lockfile by `make test-tools`), runs each journey of
//! `integration-tests/console/journeys.mjs`; this test then checks at the
//! PoPs what the journey changed.
//!
//! 1. A write token changes a flag's default variant; every PoP's
//!    `Evaluate` returns the new value.
//! 2. A read token sees everything and cannot save, and the page says why.
//! 3. Two editors change the same flag: the second sees the conflict.
//! 4. The kill switch turns a flag off at the PoPs.
//! 5. A revert from history restores the earlier definition.
//! 6. The propagation page shows every node at the head revision, and a
//!    PoP stopped by the test as lagging.
//!
//! Screenshots of the pages land in `target/console-shots` (the ones in
//! docs/images come from there).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use flagmesh_integration_tests::flagd_kit::workspace_root;
use flagmesh_integration_tests::tools::chromium;
use flagmesh_integration_tests::topology::{
    Mesh, NodeRef, READ_TOKEN, TopologySpec, WRITE_TOKEN, eventually,
};
use flagmesh_proto::v1::*;
use serde_json::Value;

const DOC: &str = r#"{
  "flags": {
    "checkout": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
      "targeting": {"if": [{"ends_with": [{"var": "email"}, "@example.com"]}, "on"]}},
    "banner": {"state": "ENABLED", "variants": {"spring": "Spring sale", "none": ""}, "defaultVariant": "none"},
    "max-items": {"state": "DISABLED", "variants": {"few": 3, "many": 40}, "defaultVariant": "few"}
  }
}"#;

const SET: &str = "shop";
const KEY: &str = "checkout";

struct Journeys {
    dir: PathBuf,
    console: String,
    chromium: PathBuf,
    shots: PathBuf,
    failures: PathBuf,
}

impl Journeys {
    /// Runs one journey with `vars`; its result, or the test fails with
    /// what the journey printed.
    async fn run(&self, journey: &str, vars: &[(&str, String)]) -> Value {
        let mut cmd = tokio::process::Command::new("node");
        cmd.current_dir(&self.dir)
            .arg("journeys.mjs")
            .arg(journey)
            .env("CONSOLE", &self.console)
            .env("CHROMIUM", &self.chromium)
            .env("READ_TOKEN", READ_TOKEN)
            .env("WRITE_TOKEN", WRITE_TOKEN)
            .env("SET", SET)
            .env("KEY", KEY)
            .env("SHOTS", &self.shots)
            .env("FAILURE_DIR", &self.failures)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("journey {journey}: not done within 90 s"))
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "journey {journey} failed (screenshots in {}):\n{stdout}\n{stderr}",
            self.failures.display()
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("result "))
            .unwrap_or_else(|| panic!("journey {journey} printed no result:\n{stdout}\n{stderr}"));
        let result: Value = serde_json::from_str(line).unwrap();
        eprintln!("journey {journey}: {result}");
        result
    }
}

/// Waits until every running PoP answers `checkout` for `email` as `want`
/// says.
async fn at_every_pop(
    mesh: &Mesh,
    pops: &[usize],
    what: &str,
    email: &str,
    want: impl Fn(&EvaluateResponse) -> bool,
) {
    for &i in pops {
        let mut eval = mesh.eval(i).await.unwrap();
        let request = EvaluateRequest {
            flag_set: SET.into(),
            flag_key: KEY.into(),
            context: Some(flagmesh_proto::convert::map_to_struct(
                serde_json::json!({"targetingKey": "u-1", "email": email})
                    .as_object()
                    .unwrap(),
            )),
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let r = eval.evaluate(request.clone()).await.unwrap().into_inner();
            if want(&r) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "PoP {i}: {what} not within 15 s; it answers {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn head(mesh: &Mesh) -> u64 {
    mesh.control_head().await.unwrap().0
}

async fn stored(mesh: &Mesh) -> (Value, u64) {
    let f = mesh
        .admin()
        .await
        .unwrap()
        .get_flag(GetFlagRequest {
            flag_set: SET.into(),
            key: KEY.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .flag
        .unwrap();
    (
        serde_json::from_slice(&f.definition_json).unwrap(),
        f.mod_revision,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_journeys_in_headless_chromium() {
    let dir = workspace_root().join("integration-tests/console");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "{} has no playwright-core: run `make test-tools` (make test does: npm ci from the lockfile)",
        dir.display()
    );
    let target = workspace_root().join("target");
    let journeys_out = tempfile::tempdir().unwrap();
    let shots = target.join("console-shots");
    std::fs::create_dir_all(&shots).unwrap();
    tokio::time::timeout(Duration::from_secs(600), async {
        let root = tempfile::tempdir().unwrap();
        let mut mesh = Mesh::start(TopologySpec::test(root.path(), 2, 2))
            .await
            .unwrap();
        let mut admin = mesh.admin().await.unwrap();
        admin
            .apply_flag_set(ApplyFlagSetRequest {
                flag_set: SET.into(),
                document: DOC.into(),
                comment: "first version".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        mesh.converged(Duration::from_secs(30)).await.unwrap();
        let journeys = Journeys {
            dir,
            console: format!("http://{}", mesh.control.http.unwrap()),
            chromium: chromium(),
            shots: shots.clone(),
            failures: journeys_out.path().to_path_buf(),
        };
        let all_pops = [0, 1, 2, 3];
        let nodes = "hub-0,hub-1,pop-0,pop-1,pop-2,pop-3".to_owned();

        journeys.run("sign-in-page", &[]).await;

        // 6, first half: every node at the head
        let r = journeys
            .run(
                "propagation",
                &[
                    ("HEAD", head(&mesh).await.to_string()),
                    ("NODES", nodes.clone()),
                ],
            )
            .await;
        assert!(r["summary"].as_str().unwrap().contains("6/6 nodes current"), "{r}");

        // 1: a new default variant, served by every PoP
        at_every_pop(&mesh, &all_pops, "default off", "a@other.org", |r| {
            r.variant == "off"
        })
        .await;
        let changed = journeys
            .run("change-default", &[("VARIANT", "on".into())])
            .await["revision"]
            .as_u64()
            .unwrap();
        let (d, at) = stored(&mesh).await;
        assert_eq!((d["defaultVariant"].as_str(), at), (Some("on"), changed));
        at_every_pop(&mesh, &all_pops, "the new default variant", "a@other.org", |r| {
            r.variant == "on"
                && r.value
                    == Some(prost_types::Value {
                        kind: Some(prost_types::value::Kind::BoolValue(true)),
                    })
        })
        .await;

        // 2: a read token changes nothing
        let before = head(&mesh).await;
        let r = journeys.run("read-only", &[]).await;
        assert!(r["refused"].as_str().unwrap().contains("reader"), "{r}");
        assert_eq!(head(&mesh).await, before, "the read token's session wrote");

        // 5: revert the change of journey 1 from the history
        let r = journeys
            .run("revert", &[("REVISION", changed.to_string())])
            .await;
        let reverted = r["revision"].as_u64().unwrap();
        let (d, at) = stored(&mesh).await;
        assert_eq!((d["defaultVariant"].as_str(), at), (Some("off"), reverted));
        assert!(d["targeting"].is_object(), "the revert lost the targeting: {d}");
        at_every_pop(&mesh, &all_pops, "the reverted default", "a@other.org", |r| {
            r.variant == "off"
        })
        .await;
        let h = admin
            .list_history(ListHistoryRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.change_sets[0].operation, "revert");
        assert_eq!(h.change_sets[0].actor, "writer");

        // 3: two editors; the second one's edit is refused as a conflict
        let r = journeys
            .run("conflict", &[("VARIANT", "on".into())])
            .await;
        let saved = r["saved"].as_u64().unwrap();
        let (d, at) = stored(&mesh).await;
        assert_eq!(at, saved, "the second editor overwrote the first");
        assert_eq!((d["state"].as_str(), d["defaultVariant"].as_str()), (Some("ENABLED"), Some("on")));

        // 4: the kill switch
        at_every_pop(&mesh, &all_pops, "enabled", "a@example.com", |r| {
            r.reason == Reason::TargetingMatch as i32
        })
        .await;
        journeys.run("kill-switch", &[]).await;
        at_every_pop(&mesh, &all_pops, "disabled", "a@example.com", |r| {
            r.reason == Reason::Disabled as i32 && r.value.is_none()
        })
        .await;

        // 6, second half: a PoP stopped, a change committed: it lags
        assert!(mesh.stop(NodeRef::Pop(3)), "pop-3 did not stop cleanly");
        admin
            .update_flag(UpdateFlagRequest {
                flag_set: SET.into(),
                key: "banner".into(),
                definition_json: r#"{"state":"ENABLED","variants":{"spring":"Spring sale","none":""},"defaultVariant":"spring"}"#.into(),
                force: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let now = head(&mesh).await;
        eventually("the running PoPs at the head", 20, || async {
            let mut ok = true;
            for i in 0..3 {
                ok &= mesh.served_state(NodeRef::Pop(i)).await.map(|s| s.0).ok() == Some(now);
            }
            ok
        })
        .await;
        let r = journeys
            .run(
                "propagation",
                &[
                    ("HEAD", now.to_string()),
                    ("NODES", nodes.clone()),
                    ("NODE", "pop-3".into()),
                ],
            )
            .await;
        assert_eq!(r["states"]["pop-3"], "lagging", "{r}");
        assert_eq!(r["states"]["pop-0"], "current", "{r}");

        // the propagation page's cost at 300 nodes (measured, not asserted)
        let r = journeys.run("render-300", &[]).await;
        assert_eq!(r["tiles"], 300, "{r}");
        eprintln!("the propagation page renders 300 nodes in {} ms (median of 30)", r["median_ms"]);
        mesh.stop_all();
    })
    .await
    .expect("the console journeys did not finish within 10 minutes");
}
