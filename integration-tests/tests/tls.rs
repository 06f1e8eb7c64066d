//! TLS and mTLS with real processes and certificates made by the test
//! (rcgen): control → hub → PoP over mTLS, clients over TLS; nodes without
//! a client certificate cannot subscribe; clients that do not trust the CA
//! cannot connect; a rotated certificate is picked up without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flagmesh_client::ClientTls;
use flagmesh_client::{BearerToken, hash_token};
use flagmesh_integration_tests::certs::{Ca, CertFiles, install};
use flagmesh_integration_tests::process::NodeProcess;
use flagmesh_integration_tests::topology::{bin_dir, eventually, parse_response};
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_proto::v1::{ApplyFlagSetRequest, EvaluateRequest, SubscribeRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

const ADMIN: &str = "tls-admin-secret";
const MESH: &str = "tls-mesh-secret";
const APP: &str = "tls-app-secret";

fn tokens_file(dir: &Path) -> String {
    let path = dir.join("tokens.toml");
    let mut t = String::new();
    for (name, role, secret) in [
        ("admin", "admin", ADMIN),
        ("mesh", "mesh", MESH),
        ("app", "evaluate", APP),
    ] {
        t.push_str(&format!(
            "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n\n",
            hash_token(secret)
        ));
    }
    std::fs::write(&path, t).unwrap();
    path.display().to_string()
}

fn start(dir: &Path, binary: &str, name: &str, args: Vec<String>) -> NodeProcess {
    let mut all = vec![
        "--data-dir".to_owned(),
        dir.join(name).display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--tokens-file".into(),
        tokens_file(dir),
        "--tls-reload-ms".into(),
        "100".into(),
    ];
    if binary == "flagmesh-control" {
        all.push("--init".into());
    }
    all.extend(args);
    let envs = [
        ("FLAGMESH_HEARTBEAT_MS", "200"),
        ("FLAGMESH_STALL_MS", "1000"),
        ("FLAGMESH_BACKOFF_MAX_MS", "500"),
    ];
    NodeProcess::start(
        &bin_dir().join(binary),
        &all,
        &envs,
        &dir.join(format!("{name}.log")),
    )
    .unwrap()
}

fn server_args(server: &CertFiles, client_ca: Option<&Path>) -> Vec<String> {
    let mut a = vec![
        "--tls-cert".to_owned(),
        server.cert.display().to_string(),
        "--tls-key".into(),
        server.key.display().to_string(),
    ];
    if let Some(ca) = client_ca {
        a.extend(["--tls-client-ca".into(), ca.display().to_string()]);
    }
    a
}

fn upstream_args(upstream: SocketAddr, ca: &Path, client: Option<&CertFiles>) -> Vec<String> {
    let mut a = vec![
        "--upstream".to_owned(),
        upstream.to_string(),
        "--upstream-ca".into(),
        ca.display().to_string(),
        "--mesh-token".into(),
        MESH.into(),
    ];
    if let Some(c) = client {
        a.extend([
            "--client-cert".into(),
            c.cert.display().to_string(),
            "--client-key".into(),
            c.key.display().to_string(),
        ]);
    }
    a
}

async fn channel(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&CertFiles>,
) -> Result<Channel, String> {
    let tls = ClientTls {
        ca: Some(ca.to_path_buf()),
        cert: client.map(|c| c.cert.clone()),
        key: client.map(|c| c.key.clone()),
        domain: None,
    };
    flagmesh_client::endpoint(&addr.to_string(), Some(&tls))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn evaluate(addr: SocketAddr, ca: &Path, key: &str) -> Option<String> {
    let ch = channel(addr, ca, None).await.ok()?;
    let mut c = EvaluationClient::with_interceptor(ch, BearerToken::new(Some(APP)).unwrap());
    let r = c
        .evaluate(EvaluateRequest {
            flag_set: "web".into(),
            flag_key: key.into(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    r.value.and_then(|v| match v.kind {
        Some(prost_types::value::Kind::StringValue(s)) => Some(s),
        _ => None,
    })
}

async fn apply(control: SocketAddr, ca: &Path, value: &str) {
    let ch = channel(control, ca, None).await.unwrap();
    let mut admin = AdminClient::with_interceptor(ch, BearerToken::new(Some(ADMIN)).unwrap());
    admin
        .apply_flag_set(ApplyFlagSetRequest {
            flag_set: "web".into(),
            document: format!(
                r#"{{"flags":{{"banner":{{"state":"ENABLED","variants":{{"v":"{value}"}},"defaultVariant":"v"}}}}}}"#
            ),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// An HTTP/1.1 GET over TLS, trusting `ca`; status and body.
async fn https_get(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
    token: &str,
) -> std::io::Result<(u16, String)> {
    https_request(addr, ca, "GET", path, "", token).await
}

/// An HTTP/1.1 request over TLS (a JSON body when not empty), trusting
/// `ca`; status and body.
async fn https_request(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    body: &str,
    token: &str,
) -> std::io::Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in flagmesh_client::tls::load_certs("CA", ca).map_err(std::io::Error::other)? {
        roots.add(c).map_err(std::io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut s = connector.connect(name, tcp).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    // a peer closing without close_notify still delivered the whole response
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let (status, _, body) = parse_response(&buf);
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_mesh_serves_and_refuses_nodes_and_clients_without_trust() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        let ca = Ca::new(dir, "mesh-ca").unwrap();
        let control_cert = ca.server(dir, "control").unwrap();
        let hub_server = ca.server(dir, "hub-server").unwrap();
        let pop_server = ca.server(dir, "pop-server").unwrap();
        let hub_client = ca.client(dir, "hub-0").unwrap();
        let pop_client = ca.client(dir, "pop-0").unwrap();

        let control = start(
            dir,
            "flagmesh-control",
            "control",
            server_args(&control_cert, Some(&ca.cert)),
        );
        let mut hub_args = server_args(&hub_server, Some(&ca.cert));
        hub_args.extend(upstream_args(control.grpc, &ca.cert, Some(&hub_client)));
        let hub = start(dir, "flagmesh-hub", "hub", hub_args);
        let mut pop_args = server_args(&pop_server, None);
        pop_args.extend(upstream_args(hub.grpc, &ca.cert, Some(&pop_client)));
        let pop = start(dir, "flagmesh-pop", "pop", pop_args);
        // the same PoP without a client certificate
        let mut rogue_args = server_args(&pop_server, None);
        rogue_args.extend(upstream_args(hub.grpc, &ca.cert, None));
        let rogue = start(dir, "flagmesh-pop", "rogue", rogue_args);

        // the mesh replicates over mTLS, clients evaluate over TLS
        apply(control.grpc, &ca.cert, "one").await;
        eventually("the PoP serves the flag over TLS", 20, || async {
            evaluate(pop.grpc, &ca.cert, "banner").await.as_deref() == Some("one")
        })
        .await;

        // the SDK over TLS, remote and local mode
        let trust = ClientTls {
            ca: Some(ca.cert.clone()),
            ..ClientTls::default()
        };
        let mut config = flagmesh_sdk::RemoteConfig::new(vec![pop.grpc.to_string()]);
        config.token = Some(APP.into());
        config.flag_set = "web".into();
        config.deadline = Duration::from_secs(2);
        config.tls = Some(trust.clone());
        let remote = flagmesh_sdk::RemoteClient::new(config).unwrap();
        let d = remote
            .string_value("banner", &serde_json::json!({}), "default")
            .await;
        assert_eq!(d.value, "one", "{d:?}");
        let mut config = flagmesh_sdk::LocalConfig::new(vec![pop.grpc.to_string()], "web");
        config.token = Some(APP.into());
        config.tls = Some(trust);
        let local = flagmesh_sdk::LocalClient::start(config).unwrap();
        assert!(
            local.wait_ready(Duration::from_secs(20)).await,
            "local mode over TLS"
        );
        assert_eq!(
            local
                .string_value("banner", &serde_json::json!({}), "default")
                .value,
            "one"
        );

        // flagctl over TLS; without the CA it fails with one line
        let flagctl = |extra: &[&str]| {
            let mut args = vec![
                "--server".to_owned(),
                control.grpc.to_string(),
                "--token".into(),
                ADMIN.into(),
            ];
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            args.extend([
                "-o".into(),
                "json".into(),
                "get".into(),
                "web".into(),
                "banner".into(),
            ]);
            std::process::Command::new(bin_dir().join("flagctl"))
                .args(args)
                .output()
                .unwrap()
        };
        let out = flagctl(&["--ca-cert", &ca.cert.display().to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("one"));
        let out = flagctl(&[]);
        assert!(!out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim().lines().count(),
            1
        );

        // the console and the Admin API as JSON over TLS on control's
        // HTTP listener, with the same tokens
        let console = control.http.unwrap();
        let (status, page) = https_get(console, &ca.cert, "/sets/web", ADMIN)
            .await
            .unwrap();
        assert_eq!(status, 200, "{page}");
        assert!(page.contains("/console/app.js"), "{page}");
        let get = r#"{"flagSet":"web","key":"banner"}"#;
        let path = "/api/flagmesh.v1.Admin/GetFlag";
        let (status, body) = https_request(console, &ca.cert, "POST", path, get, ADMIN)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"modRevision\""), "{body}");
        let (status, body) = https_request(console, &ca.cert, "POST", path, get, APP)
            .await
            .unwrap();
        assert_eq!(status, 403, "an evaluation key reads no Admin data: {body}");

        // OFREP and metrics over TLS on the PoP's HTTP listener
        let http = pop.http.unwrap();
        let (status, body) = https_get(http, &ca.cert, "/metrics", ADMIN).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("flagmesh_applied_revision"), "{body}");
        let (status, _) = https_get(http, &ca.cert, "/metrics", APP).await.unwrap();
        assert_eq!(status, 403, "an evaluation key may not read metrics");

        // a node without a client certificate never gets state
        assert_eq!(evaluate(rogue.grpc, &ca.cert, "banner").await, None);
        // and a direct Subscribe with the right token but no certificate is refused
        let ch = channel(hub.grpc, &ca.cert, None).await.unwrap();
        let mut sync = SyncClient::with_interceptor(ch, BearerToken::new(Some(MESH)).unwrap());
        let Err(refused) = sync
            .subscribe(SubscribeRequest {
                node_id: "intruder".into(),
                ..Default::default()
            })
            .await
        else {
            panic!("a Subscribe without a client certificate was served");
        };
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(
            refused.message().contains("client certificate"),
            "{refused:?}"
        );
        // with the certificate it is served
        let ch = channel(hub.grpc, &ca.cert, Some(&pop_client))
            .await
            .unwrap();
        let mut sync = SyncClient::with_interceptor(ch, BearerToken::new(Some(MESH)).unwrap());
        assert!(
            sync.subscribe(SubscribeRequest {
                node_id: "pop-x".into(),
                ..Default::default()
            })
            .await
            .is_ok()
        );

        // by now the rogue PoP has tried for a while: still not connected
        let (status, body) = https_get(rogue.http.unwrap(), &ca.cert, "/metrics", ADMIN)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\nflagmesh_upstream_connected 0"), "{body}");
        assert!(body.contains("\nflagmesh_applied_revision 0"), "{body}");
        assert_eq!(evaluate(rogue.grpc, &ca.cert, "banner").await, None);

        // a client that does not trust the CA cannot connect; nor can plaintext
        let stranger = Ca::new(dir, "stranger-ca").unwrap();
        let e = channel(control.grpc, &stranger.cert, None).await.err();
        assert!(e.is_some(), "a client trusting another CA connected");
        assert_eq!(evaluate(pop.grpc, &stranger.cert, "banner").await, None);
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", pop.grpc))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await;
        if let Ok(ch) = plain {
            let mut c =
                EvaluationClient::with_interceptor(ch, BearerToken::new(Some(APP)).unwrap());
            let r = c
                .evaluate(EvaluateRequest {
                    flag_set: "web".into(),
                    flag_key: "banner".into(),
                    ..Default::default()
                })
                .await;
            assert!(
                r.is_err(),
                "plaintext call to a TLS listener answered: {r:?}"
            );
        }
        assert!(
            https_get(http, &stranger.cert, "/healthz", ADMIN)
                .await
                .is_err()
        );

        // rotation: control's certificate is replaced by one from another
        // CA; new connections see it at once, no restart
        let next = stranger.server(dir, "control-next").unwrap();
        install(&next, &control_cert).unwrap();
        eventually("control serves the rotated certificate", 10, || async {
            channel(control.grpc, &stranger.cert, None).await.is_ok()
        })
        .await;
        assert!(
            channel(control.grpc, &ca.cert, None).await.is_err(),
            "old chain still served"
        );
        // the reload and the refused handshakes show in control's metrics
        // (its HTTP listener uses the same files, so it was rotated too)
        // (each listener has its own watcher: wait for the HTTP one too)
        let mut body = String::new();
        for _ in 0..100 {
            if let Ok((200, b)) =
                https_get(control.http.unwrap(), &stranger.cert, "/metrics", ADMIN).await
            {
                body = b;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !body.is_empty(),
            "control's HTTPS listener never served the rotated certificate"
        );
        let value = |series: &str| -> f64 {
            body.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or(-1.0)
        };
        // key and certificate are replaced one after the other: a reload
        // may have seen the new key with the old certificate and failed first
        assert!(
            value("flagmesh_tls_reloads_total{listener=\"grpc\"}") >= 1.0,
            "{body}"
        );
        assert!(
            value("flagmesh_tls_reloads_total{listener=\"http\"}") >= 1.0,
            "{body}"
        );
        assert!(
            value("flagmesh_tls_reload_failures_total{listener=\"grpc\"}") >= 0.0,
            "{body}"
        );
        assert!(
            value("flagmesh_tls_handshake_failures_total{listener=\"grpc\"}") >= 1.0,
            "{body}"
        );
        let now = flagmesh_mesh::now_ms() as f64 / 1000.0;
        assert!(
            value("flagmesh_tls_certificate_expiry_timestamp_seconds{listener=\"grpc\"}") > now,
            "{body}"
        );
        // the hub's open mTLS stream (handshaken before) keeps replicating
        apply(control.grpc, &stranger.cert, "two").await;
        eventually("a change after rotation reaches the PoP", 20, || async {
            evaluate(pop.grpc, &ca.cert, "banner").await.as_deref() == Some("two")
        })
        .await;
        drop((control, hub, pop, rogue));
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_refuse_to_start_without_tls_or_explicit_plaintext() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let out = std::process::Command::new(bin_dir().join("flagmesh-control"))
        .args([
            "--data-dir",
            &dir.join("c").display().to_string(),
            "--tokens-file",
            &tokens_file(dir),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--plaintext") && err.contains("--tls-cert"),
        "{err}"
    );

    // a key that does not exist: one line naming the file
    let ca = Ca::new(dir, "ca").unwrap();
    let cert = ca.server(dir, "srv").unwrap();
    let out = std::process::Command::new(bin_dir().join("flagmesh-pop"))
        .args([
            "--data-dir",
            &dir.join("p").display().to_string(),
            "--tokens-file",
            &tokens_file(dir),
            "--upstream",
            "127.0.0.1:1",
            "--tls-cert",
            &cert.cert.display().to_string(),
            "--tls-key",
            &dir.join("missing.key").display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.key"), "{err}");
}
