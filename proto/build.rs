//! Compiles every `.proto` under `proto/` with protox (pure Rust, no system
//! `protoc`) and generates prost messages and tonic clients and servers. The
//! encoded descriptor set is written next to the generated code so servers
//! can register it with gRPC reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "flagmesh/v1/types.proto",
    "flagmesh/v1/sync.proto",
    "flagmesh/v1/admin.proto",
    "flagmesh/v1/evaluation.proto",
    "flagd/evaluation/v1/evaluation.proto",
    "flagd/evaluation/v2/evaluation.proto",
    "flagd/sync/v1/sync.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(out_dir.join("flagmesh_descriptor.bin"), fds.encode_to_vec())?;

    // A second server for flagmesh.v1.Sync whose stream items are
    // `crate::shared::SharedSyncEvent`: wire-identical to `SyncEvent`, but it
    // can carry bytes encoded once and shared by every subscriber. Every
    // other type maps to the messages generated above.
    let shared_dir = out_dir.join("shared");
    std::fs::create_dir_all(&shared_dir)?;
    let mut sync_only = fds.clone();
    sync_only.file.retain(|f| {
        matches!(
            f.name(),
            "flagmesh/v1/sync.proto" | "flagmesh/v1/types.proto"
        )
    });
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(".flagmesh.v1.SyncEvent", "crate::shared::SharedSyncEvent")
        .extern_path(".flagmesh.v1", "crate::v1")
        .out_dir(&shared_dir)
        .compile_fds(sync_only)?;

    // A second server for flagmesh.v1.Evaluation whose EvaluateAll answer
    // is `crate::encoded::EncodedEvaluateAllResponse`: wire-identical to
    // `EvaluateAllResponse`, written flag by flag into one buffer by the
    // PoP. Clients keep decoding the generated message.
    let encoded_dir = out_dir.join("encoded");
    std::fs::create_dir_all(&encoded_dir)?;
    let mut evaluation_only = fds.clone();
    evaluation_only
        .file
        .retain(|f| f.name() == "flagmesh/v1/evaluation.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(
            ".flagmesh.v1.EvaluateAllResponse",
            "crate::encoded::EncodedEvaluateAllResponse",
        )
        .extern_path(".flagmesh.v1", "crate::v1")
        .out_dir(&encoded_dir)
        .compile_fds(evaluation_only)?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
