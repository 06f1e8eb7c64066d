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

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
