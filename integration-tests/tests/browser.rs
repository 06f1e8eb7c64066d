//! A real browser on a PoP: headless Chromium loads the bootstrap example
//! (`examples/bootstrap-web`) from its own origin. The page's first HTML
//! carries every flag value (the example server's `EvaluateAll` on the
//! PoP); then `@openfeature/web-sdk` with `@openfeature/ofrep-web-provider`
//! (npm, from the lockfile, bundled by `make test-tools`) resolves boolean,
//! string, number and object flags over OFREP across origins (the PoP
//! allows the page's origin with `--cors-allowed-origins`), reads which
//! PoP answered at which revision from the exposed headers, and follows a
//! change made at control through polling, with `304 Not Modified`
//! answers in between.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Stdio;
use std::time::Duration;

use flagmesh_integration_tests::flagd_kit::workspace_root;
use flagmesh_integration_tests::tools::HeadlessChromium;
use flagmesh_integration_tests::topology::{Mesh, NodeRef, TopologySpec, bin_dir, http_get};
use flagmesh_proto::v1::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const DOC: &str = r#"{
  "flags": {
    "dark-mode": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
      "targeting": {"if": [{"==": [{"var": "targetingKey"}, "u1"]}, "on"]}},
    "banner": {"state": "ENABLED", "variants": {"a": "hello", "b": "bye"}, "defaultVariant": "a"},
    "max-items": {"state": "ENABLED", "variants": {"few": 3, "many": 42}, "defaultVariant": "many"},
    "theme": {"state": "ENABLED", "variants": {"x": {"color": "teal", "radius": 4}}, "defaultVariant": "x"}
  }
}"#;

/// Lines the example server prints, as they come.
fn lines(stdout: tokio::process::ChildStdout) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next page report matching `want`, within 30 s.
async fn report(
    rx: &mut mpsc::UnboundedReceiver<String>,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: not within 30 s; the page reported {seen:#?}"))
            .unwrap_or_else(|| panic!("{what}: the example server ended; it printed {seen:#?}"));
        if let Some(json) = line.strip_prefix("page ") {
            let v: Value = serde_json::from_str(json).unwrap();
            assert_ne!(v["cause"], "error", "the page failed: {v}");
            eprintln!("page report: {v}");
            if want(&v) {
                return v;
            }
            seen.push(v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_starts_from_its_html_then_follows_the_pop_over_ofrep() {
    let bundle = workspace_root().join("examples/bootstrap-web/web/dist/app.js");
    assert!(
        bundle.exists(),
        "{} is missing: run `make test-tools` (make test does: npm ci and the esbuild bundle)",
        bundle.display()
    );
    tokio::time::timeout(Duration::from_secs(180), async {
        // the page's origin, allowed by the PoP
        let page_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let origin = format!("http://{page_addr}");
        let root = tempfile::tempdir().unwrap();
        let mut spec = TopologySpec::test(root.path(), 1, 1);
        spec.secure = false;
        spec.relays = false;
        spec.default_flag_set = "web".into();
        spec.envs
            .push(("FLAGMESH_CORS_ALLOWED_ORIGINS".into(), origin.clone()));
        let mesh = Mesh::start(spec).await.unwrap();
        let mut admin = mesh.admin().await.unwrap();
        admin
            .apply_flag_set(ApplyFlagSetRequest {
                flag_set: "web".into(),
                document: DOC.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        mesh.converged(Duration::from_secs(30)).await.unwrap();
        let pop = &mesh.pops[0];
        let mut server = tokio::process::Command::new(bin_dir().join("flagmesh-bootstrap-example"))
            .args(["--listen", &page_addr.to_string()])
            .args(["--pop", &pop.grpc.to_string()])
            .args(["--ofrep-url", &format!("http://{}", pop.http.unwrap())])
            .args(["--flag-set", "web", "--poll-ms", "250"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut rx = lines(server.stdout.take().unwrap());
        let first = rx.recv().await.unwrap();
        assert!(first.starts_with("bootstrap example on"), "{first}");

        // first paint: the HTML itself carries every value, with no OFREP
        // request made yet
        let html = http_get(page_addr, "/?user=u1").await.unwrap();
        for (key, value) in [
            ("dark-mode", "true"),
            ("banner", "&quot;hello&quot;"),
            ("max-items", "42"),
        ] {
            assert!(
                html.contains(&format!(r#"<code id="flag-{key}">{value}</code>"#)),
                "{key} not in the first HTML:\n{html}"
            );
        }
        assert!(html.contains("window.__FLAGS__ = {"), "{html}");
        assert!(html.contains(r#"\"color\":\"teal\""#) || html.contains(r#""color":"teal""#));
        let bulk = |answer: &'static str| {
            let mesh = &mesh;
            async move {
                mesh.metric(
                    NodeRef::Pop(0),
                    &format!("flagmesh_ofrep_bulk_answers_total{{answer=\"{answer}\"}}"),
                )
                .await
            }
        };
        assert_eq!(
            bulk("full").await,
            0.0,
            "no flag request before first paint"
        );

        let chromium = HeadlessChromium::open(&format!("{origin}/?user=u1")).unwrap();

        // the provider resolved every type over OFREP, across origins
        let ready = report(&mut rx, "the provider ready", |v| v["cause"] == "ready").await;
        let flags = &ready["flags"];
        assert_eq!(flags["dark-mode"]["value"], json!(true), "{ready}");
        assert_eq!(flags["dark-mode"]["reason"], "TARGETING_MATCH", "{ready}");
        assert_eq!(flags["banner"]["value"], "hello", "{ready}");
        assert_eq!(flags["max-items"]["value"], json!(42), "{ready}");
        assert_eq!(
            flags["theme"]["value"],
            json!({"color": "teal", "radius": 4}),
            "{ready}"
        );
        for f in flags.as_object().unwrap().values() {
            assert!(f["errorCode"].is_null(), "{ready}");
        }
        // the headers CORS exposes: which PoP, which revision
        let head = mesh
            .admin()
            .await
            .unwrap()
            .get_revision(GetRevisionRequest::default())
            .await
            .unwrap()
            .into_inner()
            .revision;
        assert_eq!(ready["pop"], json!(pop.name), "{ready}");
        assert_eq!(ready["revision"], json!(head.to_string()), "{ready}");
        assert!(ready["etag"].is_string(), "ETag exposed: {ready}");

        // polling meets 304s until something changes
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while bulk("not_modified").await < 2.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no 304 while polling"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let revision = admin
            .update_flag(UpdateFlagRequest {
                flag_set: "web".into(),
                key: "banner".into(),
                definition_json:
                    r#"{"state":"ENABLED","variants":{"a":"hello","b":"bye"},"defaultVariant":"b"}"#
                        .into(),
                force: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .revision;
        let changed = report(&mut rx, "the change reached the page", |v| {
            v["cause"] == "changed" && v["flags"]["banner"]["value"] == "bye"
        })
        .await;
        assert_eq!(
            changed["revision"],
            json!(revision.to_string()),
            "{changed}"
        );
        assert_eq!(changed["flags"]["dark-mode"]["value"], json!(true));

        // closing the browser leaves nothing behind
        let home = chromium.home().to_path_buf();
        assert!(home.join("profile/Default").exists(), "the profile is used");
        drop(chromium);
        assert!(!home.exists(), "{} left behind", home.display());
        server.kill().await.unwrap();
    })
    .await
    .expect("bounded");
}
