//! The access table: for each API of a running mesh (Admin, Sync on every
//! tier, Evaluation, the flagd services, OFREP, metrics, the propagation
//! API, the Admin API as JSON, the console's page, health) and each credential (none, wrong, read, write, admin, mesh,
//! an evaluation key for flag set `a` used on set `a` and on set `b`), the
//! outcome is the intended one: allowed, unauthenticated (401), or denied
//! (403).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use flagmesh_integration_tests::topology::{
    ADMIN_TOKEN, EVAL_A_TOKEN, MESH_TOKEN, Mesh, READ_TOKEN, TopologySpec, WRITE_TOKEN,
    http_request,
};
use flagmesh_proto::flagd::evaluation::{v1 as flagd_v1, v2 as flagd_v2};
use flagmesh_proto::flagd::sync::v1 as flagd_sync;
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_proto::v1::sync_event::Event;
use flagmesh_proto::v1::{
    ApplyFlagSetRequest, CreateFlagRequest, DeleteFlagSetRequest, EvaluateRequest,
    GetRevisionRequest, SubscribeRequest,
};
use tonic::transport::Channel;

/// What a call came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Past the access checks (the call itself may still fail, e.g. NOT_FOUND).
    Allowed,
    /// No or an unknown credential: UNAUTHENTICATED / 401.
    Unauthenticated,
    /// A known credential that may not: PERMISSION_DENIED / 403.
    Denied,
}
use Outcome::{Allowed as A, Denied as D, Unauthenticated as U};

/// The credentials, in table order.
const CREDENTIALS: [(&str, Option<&str>); 7] = [
    ("none", None),
    ("wrong", Some("not-a-configured-token")),
    ("read", Some(READ_TOKEN)),
    ("write", Some(WRITE_TOKEN)),
    ("admin", Some(ADMIN_TOKEN)),
    ("mesh", Some(MESH_TOKEN)),
    ("eval-a", Some(EVAL_A_TOKEN)),
];

fn grpc_outcome<T>(r: Result<T, tonic::Status>) -> Outcome {
    match r {
        Ok(_) => A,
        Err(s) => match s.code() {
            tonic::Code::Unauthenticated => U,
            tonic::Code::PermissionDenied => D,
            // refused for another reason after the access checks
            _ => A,
        },
    }
}

fn http_outcome(status: u16) -> Outcome {
    match status {
        401 => U,
        403 => D,
        _ => A,
    }
}

fn request<T>(msg: T, token: Option<&str>, selector: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(s) = selector {
        r.metadata_mut()
            .insert("flagd-selector", s.parse().unwrap());
    }
    r
}

fn headers(token: Option<&str>, selector: Option<&str>) -> Vec<(String, String)> {
    let mut h = Vec::new();
    if let Some(t) = token {
        h.push(("Authorization".to_owned(), format!("Bearer {t}")));
    }
    if let Some(s) = selector {
        h.push(("flagd-selector".to_owned(), s.to_owned()));
    }
    h
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    selector: Option<&str>,
) -> Outcome {
    let h = headers(token, selector);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let body = if method == "POST" {
        r#"{"context":{"targetingKey":"u"}}"#
    } else {
        ""
    };
    let (status, _, body) = http_request(addr, method, path, body, &h).await.unwrap();
    assert_ne!(status, 0, "{method} {path}: no HTTP answer: {body}");
    http_outcome(status)
}

/// An Admin method through control's JSON gateway.
async fn gateway(addr: SocketAddr, method: &str, body: &str, token: Option<&str>) -> Outcome {
    let h = headers(token, None);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let path = format!("/api/flagmesh.v1.Admin/{method}");
    let (status, _, answer) = http_request(addr, "POST", &path, body, &h).await.unwrap();
    assert!(
        [200, 401, 403].contains(&status),
        "{path}: {status} {answer}"
    );
    http_outcome(status)
}

struct Nodes {
    control: Channel,
    hub: Channel,
    pop: Channel,
    control_http: SocketAddr,
    hub_http: SocketAddr,
    pop_http: SocketAddr,
}

async fn subscribe(ch: &Channel, token: Option<&str>, sets: &[&str]) -> Outcome {
    let mut c = SyncClient::new(ch.clone());
    grpc_outcome(
        c.subscribe(request(
            SubscribeRequest {
                node_id: "access-check".into(),
                flag_sets: sets.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            },
            token,
            None,
        ))
        .await,
    )
}

async fn evaluate(ch: &Channel, token: Option<&str>, set: &str) -> Outcome {
    let mut c = EvaluationClient::new(ch.clone());
    grpc_outcome(
        c.evaluate(request(
            EvaluateRequest {
                flag_set: set.into(),
                flag_key: "x".into(),
                ..Default::default()
            },
            token,
            None,
        ))
        .await,
    )
}

async fn flagd_v1_resolve(ch: &Channel, token: Option<&str>, set: &str) -> Outcome {
    let mut c = flagd_v1::service_client::ServiceClient::new(ch.clone());
    grpc_outcome(
        c.resolve_boolean(request(
            flagd_v1::ResolveBooleanRequest {
                flag_key: "x".into(),
                context: None,
            },
            token,
            Some(set),
        ))
        .await,
    )
}

async fn flagd_v2_resolve(ch: &Channel, token: Option<&str>, set: &str) -> Outcome {
    let mut c = flagd_v2::service_client::ServiceClient::new(ch.clone());
    grpc_outcome(
        c.resolve_boolean(request(
            flagd_v2::ResolveBooleanRequest {
                flag_key: "x".into(),
                context: None,
            },
            token,
            Some(set),
        ))
        .await,
    )
}

async fn flagd_fetch_all(ch: &Channel, token: Option<&str>, set: &str) -> Outcome {
    let mut c = flagd_sync::flag_sync_service_client::FlagSyncServiceClient::new(ch.clone());
    grpc_outcome(
        c.fetch_all_flags(request(
            flagd_sync::FetchAllFlagsRequest::default(),
            token,
            Some(set),
        ))
        .await,
    )
}

async fn health(ch: &Channel, token: Option<&str>) -> Outcome {
    let mut c = tonic_health_client(ch);
    grpc_outcome(
        c.check(request(
            tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            },
            token,
            None,
        ))
        .await,
    )
}

fn tonic_health_client(ch: &Channel) -> tonic_health::pb::health_client::HealthClient<Channel> {
    tonic_health::pb::health_client::HealthClient::new(ch.clone())
}

/// Runs the row `api` for one credential.
async fn call(n: &Nodes, api: &str, cred: &str, token: Option<&str>) -> Outcome {
    match api {
        "Admin.GetRevision" => grpc_outcome(
            AdminClient::new(n.control.clone())
                .get_revision(request(GetRevisionRequest {}, token, None))
                .await,
        ),
        "Admin.CreateFlag" => grpc_outcome(
            AdminClient::new(n.control.clone())
                .create_flag(request(
                    CreateFlagRequest {
                        flag_set: "a".into(),
                        key: format!("by-{cred}"),
                        definition_json:
                            r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on"}"#
                                .into(),
                        ..Default::default()
                    },
                    token,
                    None,
                ))
                .await,
        ),
        "Admin.DeleteFlagSet" => grpc_outcome(
            AdminClient::new(n.control.clone())
                .delete_flag_set(request(
                    DeleteFlagSetRequest {
                        flag_set: "no-such-set".into(),
                        ..Default::default()
                    },
                    token,
                    None,
                ))
                .await,
        ),
        "Sync.Subscribe control" => subscribe(&n.control, token, &[]).await,
        "Sync.Subscribe hub" => subscribe(&n.hub, token, &[]).await,
        "Sync.Subscribe PoP set a" => subscribe(&n.pop, token, &["a"]).await,
        "Sync.Subscribe PoP set b" => subscribe(&n.pop, token, &["b"]).await,
        "Evaluation.Evaluate set a" => evaluate(&n.pop, token, "a").await,
        "Evaluation.Evaluate set b" => evaluate(&n.pop, token, "b").await,
        "flagd.evaluation.v1 set a" => flagd_v1_resolve(&n.pop, token, "a").await,
        "flagd.evaluation.v1 set b" => flagd_v1_resolve(&n.pop, token, "b").await,
        "flagd.evaluation.v2 set b" => flagd_v2_resolve(&n.pop, token, "b").await,
        "flagd.sync.v1 set b" => flagd_fetch_all(&n.pop, token, "b").await,
        "OFREP set a" => {
            http(
                n.pop_http,
                "POST",
                "/ofrep/v1/evaluate/flags/x",
                token,
                Some("a"),
            )
            .await
        }
        "OFREP set b" => {
            http(
                n.pop_http,
                "POST",
                "/ofrep/v1/evaluate/flags/x",
                token,
                Some("b"),
            )
            .await
        }
        "OFREP bulk set b" => {
            http(
                n.pop_http,
                "POST",
                "/ofrep/v1/evaluate/flags",
                token,
                Some("b"),
            )
            .await
        }
        "metrics control" => http(n.control_http, "GET", "/metrics", token, None).await,
        "metrics hub" => http(n.hub_http, "GET", "/metrics", token, None).await,
        "metrics PoP" => http(n.pop_http, "GET", "/metrics", token, None).await,
        "propagation API" => http(n.control_http, "GET", "/api/propagation", token, None).await,
        "Admin JSON GetRevision" => gateway(n.control_http, "GetRevision", "{}", token).await,
        "Admin JSON UpdateFlag" => {
            let unchanged = r#"{"flagSet":"a","key":"x","force":true,"definitionJson":"{\"state\":\"ENABLED\",\"variants\":{\"on\":true,\"off\":false},\"defaultVariant\":\"on\"}"}"#;
            gateway(n.control_http, "UpdateFlag", unchanged, token).await
        }
        "console page" => http(n.control_http, "GET", "/sets/a", token, None).await,
        "gRPC health PoP" => health(&n.pop, token).await,
        "/healthz PoP" => http(n.pop_http, "GET", "/healthz", token, None).await,
        other => panic!("unknown row {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_admits_exactly_the_intended_credentials() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let root = tempfile::tempdir().unwrap();
        let mut spec = TopologySpec::test(root.path(), 1, 1);
        spec.relays = false;
        let mesh = Mesh::start(spec).await.unwrap();
        let mut admin = mesh.admin().await.unwrap();
        for set in ["a", "b"] {
            admin
                .apply_flag_set(ApplyFlagSetRequest {
                    flag_set: set.into(),
                    document: r#"{"flags":{"x":{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"on"}}}"#.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        mesh.converged(Duration::from_secs(30)).await.unwrap();
        let n = Nodes {
            control: Mesh::channel(mesh.control.grpc).await.unwrap(),
            hub: Mesh::channel(mesh.hubs[0].grpc).await.unwrap(),
            pop: Mesh::channel(mesh.pops[0].grpc).await.unwrap(),
            control_http: mesh.control.http.unwrap(),
            hub_http: mesh.hubs[0].http.unwrap(),
            pop_http: mesh.pops[0].http.unwrap(),
        };

        //            none wrong read write admin mesh eval-a
        let table: &[(&str, [Outcome; 7])] = &[
            ("Admin.GetRevision", [U, U, A, A, A, D, D]),
            ("Admin.CreateFlag", [U, U, D, A, A, D, D]),
            ("Admin.DeleteFlagSet", [U, U, D, D, A, D, D]),
            ("Sync.Subscribe control", [U, U, D, D, A, A, D]),
            ("Sync.Subscribe hub", [U, U, D, D, A, A, D]),
            ("Sync.Subscribe PoP set a", [U, U, D, D, A, A, A]),
            ("Sync.Subscribe PoP set b", [U, U, D, D, A, A, D]),
            ("Evaluation.Evaluate set a", [U, U, D, D, A, A, A]),
            ("Evaluation.Evaluate set b", [U, U, D, D, A, A, D]),
            ("flagd.evaluation.v1 set a", [U, U, D, D, A, A, A]),
            ("flagd.evaluation.v1 set b", [U, U, D, D, A, A, D]),
            ("flagd.evaluation.v2 set b", [U, U, D, D, A, A, D]),
            ("flagd.sync.v1 set b", [U, U, D, D, A, A, D]),
            ("OFREP set a", [U, U, D, D, A, A, A]),
            ("OFREP set b", [U, U, D, D, A, A, D]),
            ("OFREP bulk set b", [U, U, D, D, A, A, D]),
            ("metrics control", [U, U, A, A, A, D, D]),
            ("metrics hub", [U, U, A, A, A, D, D]),
            ("metrics PoP", [U, U, A, A, A, D, D]),
            ("propagation API", [U, U, A, A, A, D, D]),
            ("Admin JSON GetRevision", [U, U, A, A, A, D, D]),
            ("Admin JSON UpdateFlag", [U, U, D, A, A, D, D]),
            ("console page", [A, A, A, A, A, A, A]),
            ("gRPC health PoP", [A, A, A, A, A, A, A]),
            ("/healthz PoP", [A, A, A, A, A, A, A]),
        ];
        let mut wrong = Vec::new();
        let mut cases = 0;
        for (api, expected) in table {
            for ((cred, token), want) in CREDENTIALS.iter().zip(expected) {
                let got = call(&n, api, cred, *token).await;
                cases += 1;
                if got != *want {
                    wrong.push(format!("{api} with {cred}: {got:?}, intended {want:?}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{} of {cases} cases wrong:\n{}", wrong.len(), wrong.join("\n"));
        eprintln!("access table: {cases} cases as intended");

        // a scoped key that names no flag set follows only its own
        let mut sync = SyncClient::new(n.pop.clone());
        let mut stream = sync
            .subscribe(request(
                SubscribeRequest {
                    node_id: "scoped".into(),
                    ..Default::default()
                },
                Some(EVAL_A_TOKEN),
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        let mut sets = std::collections::BTreeSet::new();
        while let Some(ev) = stream.message().await.unwrap() {
            if let Some(Event::Snapshot(s)) = ev.event {
                sets.extend(s.flags.iter().map(|f| f.flag_set.clone()));
                if s.last {
                    break;
                }
            }
        }
        assert_eq!(sets.into_iter().collect::<Vec<_>>(), vec!["a".to_owned()]);
    })
    .await
    .expect("bounded in time");
}
