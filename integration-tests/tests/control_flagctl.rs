//! The `flagctl` binary against a running control node: apply with dry-run
//! and for real, JSON output, and one clear line with a non-zero exit for
//! every failure (negative schema documents, unreachable server), with the
//! revision unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Output;

use flagmesh_integration_tests::flagd_kit::{json_files, package_dir};
use flagmesh_integration_tests::inproc::admin::*;

async fn flagctl(server: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(
        flagmesh_integration_tests::topology::bin_dir().join("flagctl"),
    );
    cmd.arg("--server").arg(server).args(args);
    bounded("flagctl", 30, cmd.output()).await.unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagctl_applies_reports_and_fails_clearly() {
    let c = control(100, false).await;
    let server = c.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("flags.yaml");
    std::fs::write(
        &doc,
        "metadata:\n  flagSetId: shop\nflags:\n  checkout:\n    state: ENABLED\n    variants: {on: true, off: false}\n    defaultVariant: 'off'\n",
    )
    .unwrap();

    let out = flagctl(
        &server,
        &["apply", "-f", doc.to_str().unwrap(), "--dry-run"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("+ create shop/checkout")
            && text(&out.stdout).contains("dry run"),
        "{}",
        text(&out.stdout)
    );
    let out = flagctl(&server, &["apply", "-f", doc.to_str().unwrap()]).await;
    assert!(
        out.status.success() && text(&out.stdout).contains("applied as revision 1"),
        "{}",
        text(&out.stdout)
    );

    let out = flagctl(&server, &["-o", "json", "get", "shop", "checkout"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(v["definition"]["defaultVariant"], "off");
    assert_eq!(v["mod_revision"], 1);
    let out = flagctl(&server, &["list"]).await;
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("shop") && l.contains("checkout"))
    );

    let out = flagctl(
        &server,
        &["set", "shop", "checkout", "--json", &bool_flag(true)],
    )
    .await;
    assert!(
        out.status.success() && text(&out.stdout).contains("revision 2"),
        "{}",
        text(&out.stderr)
    );
    let out = flagctl(&server, &["history", "--key", "checkout"]).await;
    assert!(text(&out.stdout).contains("update shop/checkout"));

    let mut a = admin(c.addr, None).await;
    let before = revision(&mut a).await;
    let negatives = json_files(&package_dir().join("schemas/json/test/flags/negative"));
    assert!(!negatives.is_empty());
    for path in negatives {
        let out = flagctl(
            &server,
            &[
                "apply",
                "-f",
                path.to_str().unwrap(),
                "--flag-set",
                "shop",
                "--strict",
            ],
        )
        .await;
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", path.display());
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{}: not one line: {err}",
            path.display()
        );
        assert!(
            err.starts_with("flagctl: InvalidArgument: document:"),
            "{}: {err}",
            path.display()
        );
    }
    assert_eq!(revision(&mut a).await, before);

    // without --strict a rule flagd still loads is a warning on stderr,
    // in the dry run and in the apply alike
    let loose = package_dir().join("schemas/json/test/flags/negative/with-invalid-targeting.json");
    for dry_run in [true, false] {
        let mut args = vec![
            "apply",
            "-f",
            loose.to_str().unwrap(),
            "--flag-set",
            "loose",
        ];
        if dry_run {
            args.push("--dry-run");
        }
        let out = flagctl(&server, &args).await;
        let err = text(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            err.starts_with(
                "warning: loose/targetedFlag /flags/targetedFlag/targeting/not-a-real-rule: "
            ),
            "{err}"
        );
    }
    let out = flagctl(&server, &["history", "--flag-set", "loose"]).await;
    assert!(
        text(&out.stdout).contains("(1 warnings)"),
        "{}",
        text(&out.stdout)
    );

    let out = flagctl("127.0.0.1:1", &["revision"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).starts_with("flagctl: cannot reach 127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );
    c.node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagctl_reverts_a_flag_to_a_revision() {
    let c = control(100, false).await;
    let server = c.addr.to_string();
    for variant in ["on", "off"] {
        let def = format!(
            r#"{{"state":"ENABLED","variants":{{"on":true,"off":false}},"defaultVariant":"{variant}"}}"#
        );
        let out = flagctl(&server, &["set", "shop", "checkout", "--json", &def]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let dry = flagctl(
        &server,
        &[
            "revert",
            "shop",
            "checkout",
            "--to-revision",
            "1",
            "--dry-run",
        ],
    )
    .await;
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(
        text(&dry.stdout).contains("dry run: 0 to create, 1 to update, 0 to delete"),
        "{}",
        text(&dry.stdout)
    );
    let out = flagctl(
        &server,
        &["revert", "shop", "checkout", "--to-revision", "1"],
    )
    .await;
    assert!(
        out.status.success() && text(&out.stdout).contains("reverted as revision 3"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = flagctl(&server, &["-o", "json", "get", "shop", "checkout"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(v["definition"]["defaultVariant"], "on");
    // the future cannot be restored: one clear line, nothing changed
    let out = flagctl(&server, &["revert", "shop", "--to-revision", "99"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("after the newest revision"),
        "{}",
        text(&out.stderr)
    );
    let mut a = admin(c.addr, None).await;
    assert_eq!(revision(&mut a).await, 3);
    c.node.stop().await;
}
