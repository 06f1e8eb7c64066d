//! Bad input against a running mesh (control, hub, PoP as processes):
//! oversized and deeply nested documents, non-UTF-8, wrong types, huge
//! contexts, a flood of streams, too many flags in a set, an Admin call
//! flood, and raw garbage on every port. Each gets a clear error; no
//! process dies; the flag state afterwards is the state before.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use flagmesh_integration_tests::topology::{
    ADMIN_TOKEN, EVAL_TOKEN, Mesh, NodeRef, READ_TOKEN, TopologySpec, http_exchange, http_request,
};
use flagmesh_proto::flagd::evaluation::v2 as flagd_v2;
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use flagmesh_proto::v1::{
    ApplyFlagSetRequest, CreateFlagRequest, EvaluateRequest, GetRevisionRequest, Reason, ValueType,
    WatchRequest,
};
use prost_types::{Struct, Value, value::Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

const MAX_FLAGS: usize = 100;
const MAX_STREAMS: usize = 16;

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Asserts an error with `code` whose message contains `words`.
fn refused<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    codes: &[Code],
    words: &str,
) {
    match r {
        Ok(v) => {
            let shown: String = format!("{v:?}").chars().take(300).collect();
            panic!("{what}: accepted: {shown}")
        }
        Err(s) => {
            assert!(
                codes.contains(&s.code()),
                "{what}: {:?} {}",
                s.code(),
                s.message()
            );
            assert!(
                s.message().to_lowercase().contains(&words.to_lowercase()),
                "{what}: message does not say \"{words}\": {}",
                s.message()
            );
        }
    }
}

fn document(flags: usize, extra: &str) -> String {
    let mut d = String::from(r#"{"flags":{"#);
    for i in 0..flags {
        if i > 0 {
            d.push(',');
        }
        d.push_str(&format!(
            r#""f{i}":{{"state":"ENABLED","variants":{{"on":true,"off":false}},"defaultVariant":"on"{extra}}}"#
        ));
    }
    d.push_str("}}");
    d
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// A protobuf message with the field numbers of `CreateFlagRequest` but
/// raw bytes where it has strings: lets the test send what no generated
/// client would.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCreateFlag {
    #[prost(bytes = "vec", tag = "1")]
    flag_set: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    definition_json: Vec<u8>,
}

/// `CreateFlagRequest` with a number where the key (a string) belongs.
#[derive(Clone, PartialEq, prost::Message)]
struct WrongTypeCreateFlag {
    #[prost(string, tag = "1")]
    flag_set: String,
    #[prost(uint64, tag = "2")]
    key: u64,
}

async fn raw_create<M: prost::Message + Default + Send + Sync + 'static>(
    ch: &Channel,
    msg: M,
) -> Result<tonic::Response<flagmesh_proto::v1::WriteResponse>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<M, flagmesh_proto::v1::WriteResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/flagmesh.v1.Admin/CreateFlag");
    grpc.unary(authed(msg, ADMIN_TOKEN), path, codec).await
}

/// Sends junk to a port and reads until the server closes (or 3 s pass).
async fn junk(addr: std::net::SocketAddr, bytes: &[u8]) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_kills_nothing_and_changes_nothing() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let root = tempfile::tempdir().unwrap();
        let mut spec = TopologySpec::test(root.path(), 1, 1);
        spec.relays = false;
        spec.envs = vec![
            ("FLAGMESH_MAX_FLAGS_PER_SET".into(), MAX_FLAGS.to_string()),
            ("FLAGMESH_MAX_STREAMS_PER_CLIENT".into(), MAX_STREAMS.to_string()),
            ("FLAGMESH_ADMIN_RATE".into(), "20".into()),
            ("FLAGMESH_ADMIN_BURST".into(), "40".into()),
        ];
        let mut mesh = Mesh::start(spec).await.unwrap();
        let control = Mesh::channel(mesh.control.grpc).await.unwrap();
        let pop = Mesh::channel(mesh.pops[0].grpc).await.unwrap();
        let mut admin = AdminClient::new(control.clone())
            .max_encoding_message_size(64 << 20);
        let apply = |flag_set: &str, document: String| {
            authed(
                ApplyFlagSetRequest {
                    flag_set: flag_set.into(),
                    document,
                    ..Default::default()
                },
                ADMIN_TOKEN,
            )
        };
        admin.apply_flag_set(apply("demo", document(3, ""))).await.unwrap();
        // a set at its limit
        admin.apply_flag_set(apply("full", document(MAX_FLAGS, ""))).await.unwrap();
        let before = mesh.converged(Duration::from_secs(30)).await.unwrap();

        // --- documents ---------------------------------------------------
        let huge = "x".repeat(17 << 20);
        refused(
            "a 17 MiB request",
            admin.apply_flag_set(apply("demo", huge)).await,
            &[Code::OutOfRange, Code::ResourceExhausted],
            "too large",
        );
        let big_flag = document(1, &format!(r#","metadata":{{"note":"{}"}}"#, "y".repeat(300 << 10)));
        refused(
            "a 300 KiB flag definition",
            admin.apply_flag_set(apply("demo", big_flag)).await,
            &[Code::InvalidArgument],
            "larger than",
        );
        let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        refused(
            "JSON nested 100,000 deep",
            admin.apply_flag_set(apply("demo", deep_json)).await,
            &[Code::InvalidArgument],
            "document",
        );
        let mut rule = r#"{"var":"x"}"#.to_owned();
        for _ in 0..100 {
            rule = format!(r#"{{"!":{rule}}}"#);
        }
        refused(
            "targeting nested 100 deep",
            admin
                .apply_flag_set(apply("demo", document(1, &format!(r#","targeting":{rule}"#))))
                .await,
            &[Code::InvalidArgument],
            "deep",
        );
        refused(
            "too many flags in a new set",
            admin.apply_flag_set(apply("other", document(MAX_FLAGS + 1, ""))).await,
            &[Code::ResourceExhausted],
            "limit",
        );
        refused(
            "one flag more in a full set",
            admin
                .create_flag(authed(
                    CreateFlagRequest {
                        flag_set: "full".into(),
                        key: "one-more".into(),
                        definition_json: r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on"}"#.into(),
                        ..Default::default()
                    },
                    ADMIN_TOKEN,
                ))
                .await,
            &[Code::ResourceExhausted],
            "limit",
        );

        // --- non-UTF-8 and wrong types -------------------------------------
        refused(
            "a key that is not UTF-8",
            raw_create(
                &control,
                RawCreateFlag {
                    flag_set: b"demo".to_vec(),
                    key: vec![0xff, 0xfe, b'k'],
                    definition_json: b"{}".to_vec(),
                },
            )
            .await,
            &[Code::Internal, Code::InvalidArgument],
            "UTF-8",
        );
        refused(
            "a number where the key belongs",
            raw_create(
                &control,
                WrongTypeCreateFlag {
                    flag_set: "demo".into(),
                    key: 7,
                },
            )
            .await,
            &[Code::Internal, Code::InvalidArgument],
            "wire type",
        );
        refused(
            "a definition with wrong types",
            admin
                .create_flag(authed(
                    CreateFlagRequest {
                        flag_set: "demo".into(),
                        key: "typed".into(),
                        definition_json: r#"{"state":5,"variants":"many","defaultVariant":[]}"#.into(),
                        ..Default::default()
                    },
                    ADMIN_TOKEN,
                ))
                .await,
            &[Code::InvalidArgument],
            "typed",
        );
        let pop_http = mesh.pops[0].http.unwrap();
        let auth = format!("Bearer {EVAL_TOKEN}");
        let body = [b"{\"context\":{\"targetingKey\":\"".as_slice(), &[0xff, 0xfe], b"\"}}"].concat();
        let req = [
            format!(
                "POST /ofrep/v1/evaluate/flags/f0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes(),
            body,
        ]
        .concat();
        let (status, _, text) = http_exchange(pop_http, &req).await.unwrap();
        assert_eq!(status, 400, "OFREP non-UTF-8 body: {text}");
        assert!(text.contains("INVALID_CONTEXT"), "{text}");
        for bad in [r#"{"context":5}"#, r#"{"context":{"a":"#, "[1,2]", r#"{"context":"text"}"#] {
            let (status, _, text) = http_request(
                pop_http,
                "POST",
                "/ofrep/v1/evaluate/flags/f0",
                bad,
                &[("Authorization", auth.as_str())],
            )
            .await
            .unwrap();
            assert_eq!(status, 400, "OFREP body {bad}: {text}");
            assert!(text.contains("INVALID_CONTEXT"), "{bad}: {text}");
        }
        let mut eval = EvaluationClient::new(pop.clone()).max_decoding_message_size(8 << 20);
        let typed = eval
            .evaluate(authed(
                EvaluateRequest {
                    flag_set: "demo".into(),
                    flag_key: "f0".into(),
                    expected_type: ValueType::String as i32,
                    ..Default::default()
                },
                EVAL_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(typed.reason(), Reason::Error);
        assert!(typed.error_message.contains("bool") || typed.error_message.to_lowercase().contains("type"), "{typed:?}");

        // --- huge contexts -------------------------------------------------
        let wide = Struct {
            fields: (0..10_000).map(|i| (format!("k{i}"), string_value("v"))).collect(),
        };
        let r = eval
            .evaluate(authed(
                EvaluateRequest {
                    flag_set: "demo".into(),
                    flag_key: "f0".into(),
                    context: Some(wide),
                    ..Default::default()
                },
                EVAL_TOKEN,
            ))
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.reason(), Reason::Error, "{r:?}");
                assert!(r.error_message.contains("context"), "{r:?}");
            }
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{s:?}"),
        }
        let mut deep = string_value("leaf");
        for _ in 0..50 {
            deep = Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: [("n".to_owned(), deep)].into_iter().collect(),
                })),
            };
        }
        let r = eval
            .evaluate(authed(
                EvaluateRequest {
                    flag_set: "demo".into(),
                    flag_key: "f0".into(),
                    context: Some(Struct {
                        fields: [("deep".to_owned(), deep)].into_iter().collect(),
                    }),
                    ..Default::default()
                },
                EVAL_TOKEN,
            ))
            .await;
        match r {
            Ok(r) => assert_eq!(r.into_inner().reason(), Reason::Error),
            Err(s) => assert!(matches!(s.code(), Code::InvalidArgument | Code::Internal), "{s:?}"),
        }
        let enormous = Struct {
            fields: [("blob".to_owned(), string_value(&"z".repeat(5 << 20)))].into_iter().collect(),
        };
        refused(
            "a 5 MiB context",
            eval.evaluate(authed(
                EvaluateRequest {
                    flag_set: "demo".into(),
                    flag_key: "f0".into(),
                    context: Some(enormous),
                    ..Default::default()
                },
                EVAL_TOKEN,
            ))
            .await,
            &[Code::OutOfRange, Code::ResourceExhausted],
            "too large",
        );
        let big_body = format!(r#"{{"context":{{"blob":"{}"}}}}"#, "z".repeat(3 << 20));
        let (status, _, _) = http_request(
            pop_http,
            "POST",
            "/ofrep/v1/evaluate/flags/f0",
            &big_body,
            &[("Authorization", auth.as_str())],
        )
        .await
        .unwrap();
        assert_eq!(status, 413, "a 3 MiB OFREP body");

        // --- a flood of streams ------------------------------------------
        let mut held = Vec::new();
        let mut refused_streams = 0;
        for i in 0..(MAX_STREAMS + 8) {
            let r = if i % 2 == 0 {
                eval.watch(authed(
                    WatchRequest {
                        flag_set: "demo".into(),
                        since_revision: 0,
                    },
                    EVAL_TOKEN,
                ))
                .await
                .map(|s| Box::new(s) as Box<dyn std::any::Any + Send>)
            } else {
                flagd_v2::service_client::ServiceClient::new(pop.clone())
                    .event_stream(authed(flagd_v2::EventStreamRequest::default(), EVAL_TOKEN))
                    .await
                    .map(|s| Box::new(s) as Box<dyn std::any::Any + Send>)
            };
            match r {
                Ok(s) => held.push(s),
                Err(s) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    assert!(s.message().contains("too many open streams"), "{s:?}");
                    refused_streams += 1;
                }
            }
        }
        assert_eq!(held.len(), MAX_STREAMS, "streams held at once");
        assert_eq!(refused_streams, 8);
        // another credential is not affected by this one's flood
        let mut admin_eval = EvaluationClient::new(pop.clone());
        assert!(admin_eval
            .watch(authed(WatchRequest { flag_set: "demo".into(), since_revision: 0 }, ADMIN_TOKEN))
            .await
            .is_ok());
        drop(held);
        let mut freed = false;
        for _ in 0..50 {
            if eval
                .watch(authed(WatchRequest { flag_set: "demo".into(), since_revision: 0 }, EVAL_TOKEN))
                .await
                .is_ok()
            {
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(freed, "closed streams did not free their places");

        // --- an Admin call flood -----------------------------------------
        let mut limited = None;
        for _ in 0..200 {
            if let Err(s) = admin.get_revision(authed(GetRevisionRequest {}, READ_TOKEN)).await {
                limited = Some(s);
                break;
            }
        }
        let limited = limited.expect("200 Admin calls in a row were never rate limited");
        assert_eq!(limited.code(), Code::ResourceExhausted);
        assert!(limited.message().contains("reader") && limited.message().contains("retry in"), "{limited:?}");
        // other credentials have their own budget
        assert!(admin.get_revision(authed(GetRevisionRequest {}, ADMIN_TOKEN)).await.is_ok());

        // --- raw garbage on every port ------------------------------------
        for n in [NodeRef::Control, NodeRef::Hub(0), NodeRef::Pop(0)] {
            let node = mesh.node(n);
            let (grpc, http) = (node.grpc, node.http.unwrap());
            junk(grpc, b"\x00\x01\x02 definitely not HTTP/2\r\n\r\n").await;
            junk(grpc, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff").await;
            junk(http, b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\nContent-Length: -5\r\n\r\n").await;
            junk(http, &[0xffu8; 64 << 10]).await;
        }

        // nothing died, nothing changed
        for n in [NodeRef::Control, NodeRef::Hub(0), NodeRef::Pop(0)] {
            let p = mesh.node(n).process.as_mut().unwrap();
            assert!(p.is_alive(), "{n:?} died");
        }
        tokio::time::sleep(Duration::from_millis(1100)).await; // refill the rate budget
        let after = mesh.converged(Duration::from_secs(30)).await.unwrap();
        assert_eq!(after, before, "the flag state changed");
        let mut admin = mesh.admin().await.unwrap();
        let sets = admin
            .list_flag_sets(flagmesh_proto::v1::ListFlagSetsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let counts: Vec<(String, u32)> = sets.flag_sets.iter().map(|s| (s.id.clone(), s.flag_count)).collect();
        assert_eq!(counts, vec![("demo".to_owned(), 3), ("full".to_owned(), MAX_FLAGS as u32)]);
    })
    .await
    .expect("bounded in time");
}
