//! Access control of the control plane, table-driven: for each credential
//! (none, wrong, read, write, admin, mesh) and each kind of call (read,
//! write, admin-only, mesh, public), the intended outcome.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use flagmesh_integration_tests::inproc::admin::*;
use flagmesh_proto::v1::*;
use tonic::Code;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Write,
    AdminOnly,
    Mesh,
    Public,
}

/// The outcome a call must have: `None` for allowed.
fn expected(token: Option<&str>, call: Call) -> Option<Code> {
    let role = match token {
        None => return (call != Call::Public).then_some(Code::Unauthenticated),
        Some("wrong-secret") => return (call != Call::Public).then_some(Code::Unauthenticated),
        Some(t) => t.trim_end_matches("-secret"),
    };
    let allowed = match call {
        Call::Public => true,
        Call::Read => matches!(role, "read" | "write" | "admin"),
        Call::Write => matches!(role, "write" | "admin"),
        Call::AdminOnly => role == "admin",
        Call::Mesh => matches!(role, "mesh" | "admin"),
    };
    (!allowed).then_some(Code::PermissionDenied)
}

async fn attempt(addr: std::net::SocketAddr, token: Option<&str>, call: Call) -> Option<Code> {
    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code());
    match call {
        Call::Read => {
            let mut a = admin(addr, token).await;
            code(a.get_revision(GetRevisionRequest {}).await.map(|_| ()))
        }
        Call::Write => {
            let mut a = admin(addr, token).await;
            code(
                a.update_flag(UpdateFlagRequest {
                    flag_set: "auth".into(),
                    key: "k".into(),
                    definition_json: bool_flag(true),
                    force: true,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            )
        }
        Call::AdminOnly => {
            let mut a = admin(addr, token).await;
            match a
                .delete_flag_set(DeleteFlagSetRequest {
                    flag_set: "absent".into(),
                    ..Default::default()
                })
                .await
            {
                // allowed through: the set does not exist
                Err(s) if s.code() == Code::NotFound => None,
                other => code(other.map(|_| ())),
            }
        }
        Call::Mesh => {
            let mut s = sync(addr, token).await;
            code(
                s.subscribe(SubscribeRequest {
                    node_id: "n".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            )
        }
        Call::Public => {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut h = tonic_health_client(channel);
            code(
                h.check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| ()),
            )
        }
    }
}

fn tonic_health_client(
    channel: tonic::transport::Channel,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    tonic_health::pb::health_client::HealthClient::new(channel)
}

#[tokio::test]
async fn each_credential_can_do_exactly_what_its_role_allows() {
    let c = control(100, true).await;
    let credentials = [
        None,
        Some("wrong-secret"),
        Some("read-secret"),
        Some("write-secret"),
        Some("admin-secret"),
        Some("mesh-secret"),
    ];
    let calls = [
        Call::Read,
        Call::Write,
        Call::AdminOnly,
        Call::Mesh,
        Call::Public,
    ];
    let mut checked = 0;
    for token in credentials {
        for call in calls {
            let got = attempt(c.addr, token, call).await;
            assert_eq!(
                got,
                expected(token, call),
                "credential {token:?}, call {call:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 30);
    // the audit trail names the writer
    let mut a = admin(c.addr, Some("admin-secret")).await;
    let h = a
        .list_history(ListHistoryRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        h.change_sets
            .iter()
            .all(|c| c.actor == "write-user" || c.actor == "admin-user")
    );
    assert!(!h.change_sets.is_empty());
    c.node.stop().await;
}
