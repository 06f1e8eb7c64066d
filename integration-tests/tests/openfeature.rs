//! Existing OpenFeature clients against a PoP of a running mesh: the Python
//! flagd provider (`openfeature-provider-flagd`, installed by `make
//! test-tools` from PyPI) in RPC mode (flagd.evaluation.v2 plus
//! EventStream) and in in-process mode (flagd.sync.v1), resolving boolean,
//! string, integer, float and object flags with the right reasons and
//! following a change made at control; and OFREP over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use flagmesh_integration_tests::flagd_kit::workspace_root;
use flagmesh_integration_tests::tools::{python_path, rust_flagd_client};
use flagmesh_integration_tests::topology::{Mesh, TopologySpec, http_post};
use flagmesh_proto::v1::*;
use serde_json::{Value, json};

/// JSON equality where numbers compare as doubles (protobuf `Struct`
/// carries every number as a double, so 3 arrives as 3.0).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DOC: &str = r#"{
  "metadata": {"flagSetId": "compat", "team": "qa"},
  "flags": {
    "bool-flag": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"},
    "string-flag": {"state": "ENABLED", "variants": {"vip": "welcome back", "plain": "hello"}, "defaultVariant": "plain",
      "targeting": {"if": [{"ends_with": [{"var": "email"}, "@example.com"]}, "vip"]}},
    "int-flag": {"state": "ENABLED", "variants": {"small": 3, "large": 42}, "defaultVariant": "large"},
    "float-flag": {"state": "ENABLED", "variants": {"half": 0.5, "tenth": 0.1}, "defaultVariant": "half"},
    "object-flag": {"state": "ENABLED", "variants": {"a": {"color": "blue", "size": 3}}, "defaultVariant": "a"},
    "static-string": {"state": "ENABLED", "variants": {"v": "before"}, "defaultVariant": "v"}
  }
}"#;

async fn mesh(root: &std::path::Path) -> Mesh {
    mesh_with(root, true, &[]).await
}

/// A mesh holding `DOC`; `open`: without credentials (flagd providers send
/// no bearer tokens); `envs` for every node.
async fn mesh_with(root: &std::path::Path, open: bool, envs: &[(&str, &str)]) -> Mesh {
    let mut spec = TopologySpec::test(root, 1, 1);
    spec.secure = !open;
    spec.relays = false;
    spec.default_flag_set = "compat".into();
    spec.envs
        .extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mesh = Mesh::start(spec).await.unwrap();
    let mut a = mesh.admin().await.unwrap();
    a.apply_flag_set(ApplyFlagSetRequest {
        document: DOC.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    mesh.converged(Duration::from_secs(30)).await.unwrap();
    mesh
}

async fn change_static(mesh: &Mesh) {
    let mut a = mesh.admin().await.unwrap();
    a.update_flag(UpdateFlagRequest {
        flag_set: "compat".into(),
        key: "static-string".into(),
        definition_json: r#"{"state":"ENABLED","variants":{"v":"after"},"defaultVariant":"v"}"#
            .into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Runs the Python provider in `mode`, checks every resolution, changes a
/// flag at control and checks the provider follows.
async fn python_provider(mode: &str) {
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mesh = mesh(root.path()).await;
    let pop = mesh.pops[0].grpc;
    let script = workspace_root().join("integration-tests/tests/python/flagd_provider.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(["127.0.0.1", &pop.port().to_string(), mode, "compat"])
        .env("PYTHONPATH", python_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::task::spawn_blocking(move || {
        let l = lines.next();
        (l, lines)
    });
    let (first, mut lines) = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the provider answers")
        .unwrap();
    let first: Value = serde_json::from_str(&first.expect("a line").unwrap()).unwrap();
    let check = |flag: &str, value: Value, reason: &str| {
        let d = &first[flag];
        assert!(
            same(&d["value"], &value),
            "{mode} {flag}: {d}, expected {value}"
        );
        assert_eq!(d["reason"], reason, "{mode} {flag}: {d}");
        assert!(d["error_code"].is_null(), "{mode} {flag}: {d}");
    };
    check("bool-flag", json!(true), "STATIC");
    check("string-flag", json!("welcome back"), "TARGETING_MATCH");
    check("string-flag-other", json!("hello"), "DEFAULT");
    check("int-flag", json!(42), "STATIC");
    check("float-flag", json!(0.5), "STATIC");
    check("object-flag", json!({"color": "blue", "size": 3}), "STATIC");
    check("static-string", json!("before"), "STATIC");
    assert_eq!(first["missing"]["value"], "fallback");
    assert_eq!(
        first["missing"]["error_code"], "FLAG_NOT_FOUND",
        "{}",
        first["missing"]
    );

    change_static(&mesh).await;
    stdin.write_all(b"changed\n").unwrap();
    stdin.flush().unwrap();
    let second = tokio::task::spawn_blocking(move || lines.next());
    let second = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the provider answers")
        .unwrap();
    let second: Value = serde_json::from_str(&second.expect("a line").unwrap()).unwrap();
    assert_eq!(
        second["static-string"], "after",
        "{mode}: the provider did not follow the change"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{mode}: the provider script failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_flagd_provider_rpc_mode() {
    python_provider("rpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_flagd_provider_in_process_mode() {
    python_provider("in-process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_open_feature_flagd_rpc_resolver() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mesh = mesh(root.path()).await;
    let port = mesh.pops[0].grpc.port().to_string();
    let mut cmd = tokio::process::Command::new(rust_flagd_client());
    cmd.args(["127.0.0.1", &port]);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the client finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bool-flag"]["value"], true, "{v}");
    assert_eq!(v["bool-flag"]["reason"], "STATIC", "{v}");
    assert_eq!(v["string-flag"]["value"], "welcome back", "{v}");
    assert_eq!(v["string-flag"]["reason"], "TARGETING_MATCH", "{v}");
    assert_eq!(v["int-flag"]["value"], 42, "{v}");
    assert_eq!(v["float-flag"]["value"], 0.5, "{v}");
    assert!(
        v["object-flag"]["value"]["color"]
            .as_str()
            .is_some_and(|c| c.contains("blue")),
        "{v}"
    );
    assert!(
        v["missing"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("FlagNotFound")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ofrep_single_bulk_etag_and_errors() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mesh = mesh(root.path()).await;
    let http = mesh.pops[0].http.unwrap();
    let ctx =
        json!({"context": {"targetingKey": "user-1", "email": "ana@example.com"}}).to_string();

    let (code, _, body) = http_post(http, "/ofrep/v1/evaluate/flags/string-flag", &ctx, &[])
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (
            v["key"].as_str(),
            v["value"].as_str(),
            v["reason"].as_str(),
            v["variant"].as_str()
        ),
        (
            Some("string-flag"),
            Some("welcome back"),
            Some("TARGETING_MATCH"),
            Some("vip")
        )
    );
    assert_eq!(v["metadata"]["team"], "qa");

    let (code, _, body) = http_post(http, "/ofrep/v1/evaluate/flags/nope", &ctx, &[])
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (code, v["errorCode"].as_str()),
        (404, Some("FLAG_NOT_FOUND")),
        "{body}"
    );
    assert!(
        v["errorDetails"]
            .as_str()
            .is_some_and(|d| d.contains("nope"))
    );

    let (code, _, body) = http_post(
        http,
        "/ofrep/v1/evaluate/flags/string-flag",
        "{not json",
        &[],
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (code, v["errorCode"].as_str()),
        (400, Some("INVALID_CONTEXT")),
        "{body}"
    );
    // a numeric targeting key resolves like a string one (as flagd does)
    let numeric = json!({"context": {"targetingKey": 7}}).to_string();
    let (code, _, body) = http_post(http, "/ofrep/v1/evaluate/flags/string-flag", &numeric, &[])
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["value"].is_string() && v.get("errorCode").is_none(),
        "{body}"
    );

    let (code, headers, body) = http_post(http, "/ofrep/v1/evaluate/flags", &ctx, &[])
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let keys: Vec<&str> = v["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["key"].as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "bool-flag",
            "float-flag",
            "int-flag",
            "object-flag",
            "static-string",
            "string-flag"
        ]
    );
    let etag = headers.get("etag").cloned().expect("an ETag");
    let (code, _, body) = http_post(
        http,
        "/ofrep/v1/evaluate/flags",
        &ctx,
        &[("If-None-Match", &etag)],
    )
    .await
    .unwrap();
    assert_eq!((code, body.as_str()), (304, ""));
    change_static(&mesh).await;
    mesh.converged(Duration::from_secs(30)).await.unwrap();
    let (code, headers, _) = http_post(
        http,
        "/ofrep/v1/evaluate/flags",
        &ctx,
        &[("If-None-Match", &etag)],
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "a change must invalidate the ETag");
    assert_ne!(headers.get("etag"), Some(&etag));

    let (code, _, body) = http_post(http, "/readyz", "", &[]).await.unwrap();
    assert!(code == 405 || code == 200, "{code} {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ofrep_for_browsers_cors_and_version_headers() {
    use flagmesh_integration_tests::topology::{EVAL_TOKEN, http_request};
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mesh = mesh_with(
        root.path(),
        false,
        &[(
            "FLAGMESH_CORS_ALLOWED_ORIGINS",
            "https://app.example,https://admin.example",
        )],
    )
    .await;
    let (revision, _) = mesh.converged(Duration::from_secs(30)).await.unwrap();
    let http = mesh.pops[0].http.unwrap();
    let path = "/ofrep/v1/evaluate/flags/string-flag";

    // the preflight a browser sends before a POST with a bearer token
    let (code, h, _) = http_request(
        http,
        "OPTIONS",
        path,
        "",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization,content-type",
            ),
        ],
    )
    .await
    .unwrap();
    assert!(
        (200..300).contains(&code),
        "preflight answered: {code} {h:?}"
    );
    assert_eq!(
        h.get("access-control-allow-origin").map(String::as_str),
        Some("https://app.example")
    );
    let allowed = h
        .get("access-control-allow-headers")
        .cloned()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    assert!(
        h.get("vary")
            .is_some_and(|v| v.to_lowercase().contains("origin")),
        "{h:?}"
    );

    // the request itself: CORS headers, and which PoP answered at which revision
    let bearer = format!("Bearer {EVAL_TOKEN}");
    let ctx = json!({"context": {"targetingKey": "user-1"}}).to_string();
    let (code, h, body) = http_post(
        http,
        path,
        &ctx,
        &[
            ("Origin", "https://app.example"),
            ("Authorization", &bearer),
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        h.get("access-control-allow-origin").map(String::as_str),
        Some("https://app.example")
    );
    let exposed = h
        .get("access-control-expose-headers")
        .cloned()
        .unwrap_or_default()
        .to_lowercase();
    for header in [
        "etag",
        "x-flagmesh-pop",
        "x-flagmesh-revision",
        "x-flagmesh-mod-revision",
    ] {
        assert!(exposed.contains(header), "{header} not exposed: {exposed}");
    }
    assert_eq!(
        h.get("x-flagmesh-pop").map(String::as_str),
        Some(mesh.pops[0].name.as_str())
    );
    assert_eq!(h.get("x-flagmesh-revision"), Some(&revision.to_string()));
    assert!(
        h.get("x-flagmesh-mod-revision")
            .is_some_and(|r| r.parse::<u64>().is_ok_and(|r| r >= 1))
    );
    let (_, h, _) = http_post(
        http,
        "/ofrep/v1/evaluate/flags",
        &ctx,
        &[("Authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(h.get("x-flagmesh-revision"), Some(&revision.to_string()));

    // another origin is not allowed
    let (_, h, _) = http_post(
        http,
        path,
        &ctx,
        &[
            ("Origin", "https://evil.example"),
            ("Authorization", &bearer),
        ],
    )
    .await
    .unwrap();
    assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
}

/// The testbed's flag files, applied as flagd loads them (malformed rules
/// are warnings), evaluate at a PoP as flagd evaluates them: a misused
/// custom operator yields null (the default variant, reason DEFAULT), an
/// unknown operator or a `$ref` to a missing evaluator is PARSE_ERROR, a
/// rule naming a missing variant is GENERAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testbed_flags_with_malformed_rules_evaluate_as_flagd_at_a_pop() {
    let _guard = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mesh = mesh(root.path()).await;
    let mut a = mesh.admin().await.unwrap();
    let flags = flagmesh_integration_tests::flagd_kit::package_dir().join("flagd-testbed/flags");
    for file in [
        "edge-case-flags.json",
        "evaluator-refs.json",
        "disabled-flags.json",
        "testing-flags.json",
    ] {
        let r = a
            .apply_flag_set(ApplyFlagSetRequest {
                flag_set: "testbed".into(),
                document: std::fs::read_to_string(flags.join(file)).unwrap(),
                mode: ApplyMode::Merge as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.warnings.is_empty(),
            file.starts_with("disabled") || file.starts_with("testing"),
            "{file}: {:?}",
            r.warnings
        );
    }
    mesh.converged(Duration::from_secs(30)).await.unwrap();
    let http = mesh.pops[0].http.unwrap();
    let eval = |key: &str, ctx: Value| {
        let path = format!("/ofrep/v1/evaluate/flags/{key}?flagSet=testbed");
        async move {
            let (code, _, body) = http_post(http, &path, &json!({"context": ctx}).to_string(), &[])
                .await
                .unwrap();
            (code, serde_json::from_str::<Value>(&body).unwrap())
        }
    };
    let ctx = json!({"targetingKey": "u1", "version": "1.0.0", "num": 7});
    for (key, status, error) in [
        ("error-targeting-flag", 400, "PARSE_ERROR"),
        ("ref-to-nonexistent-evaluator-flag", 400, "PARSE_ERROR"),
        ("missing-variant-targeting-flag", 500, "GENERAL"),
    ] {
        let (code, v) = eval(key, ctx.clone()).await;
        assert_eq!(
            (code, v["errorCode"].as_str()),
            (status, Some(error)),
            "{key}: {v}"
        );
    }
    for (key, ctx) in [
        (
            "semver-invalid-version-flag",
            json!({"version": "not-a-version"}),
        ),
        ("semver-wrong-args-flag", ctx.clone()),
        ("starts-with-wrong-args-flag", ctx.clone()),
        ("ends-with-non-string-flag", ctx.clone()),
        ("fractional-zero-weights-flag", ctx.clone()),
    ] {
        let (code, v) = eval(key, ctx).await;
        assert_eq!(code, 200, "{key}: {v}");
        assert_eq!(
            (v["value"].as_str(), v["reason"].as_str()),
            (Some("fallback"), Some("DEFAULT")),
            "{key}: {v}"
        );
    }
    // a disabled flag and a flag without a default variant: 200, value
    // and variant left out (the caller's default applies), as the OFREP
    // schema has it
    for (key, reason) in [
        ("disabled-string-flag", "DISABLED"),
        ("null-default-flag", "DEFAULT"),
    ] {
        let (code, v) = eval(key, ctx.clone()).await;
        assert_eq!(code, 200, "{key}: {v}");
        assert_eq!(v["reason"], reason, "{key}: {v}");
        assert!(
            v.get("value").is_none() && v.get("variant").is_none(),
            "{key}: {v}"
        );
        assert!(v.get("errorCode").is_none(), "{key}: {v}");
    }
    // in the bulk answer too, those two leave value and variant out; and
    // every entry of it (written flag by flag, with metadata rendered once
    // per compiled flag) is the flag's single-flag answer, errors and
    // metadata included; twice, so that the second bulk answer reuses what
    // the first rendered
    for round in 0..2 {
        let (code, _, body) = http_post(
            http,
            "/ofrep/v1/evaluate/flags?flagSet=testbed",
            &json!({"context": ctx}).to_string(),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(code, 200, "{body}");
        let bulk: Value = serde_json::from_str(&body).unwrap();
        let entries = bulk["flags"].as_array().unwrap();
        assert!(entries.len() > 20, "{body}");
        for key in ["disabled-string-flag", "null-default-flag"] {
            let f = entries
                .iter()
                .find(|f| f["key"] == key)
                .unwrap_or_else(|| panic!("{key} not in the bulk answer"));
            assert!(
                f.get("value").is_none() && f.get("variant").is_none(),
                "{f}"
            );
        }
        for f in entries {
            let key = f["key"].as_str().unwrap();
            let (_, single) = eval(key, ctx.clone()).await;
            assert_eq!(f, &single, "round {round}, {key}");
        }
    }

    // the well-formed flags beside them are unaffected
    let (code, v) = eval(
        "some-email-targeted-flag",
        json!({"targetingKey": "u1", "email": "ballmer@macrosoft.com"}),
    )
    .await;
    assert_eq!((code, v["value"].as_str()), (200, Some("hi")), "{v}");
}
