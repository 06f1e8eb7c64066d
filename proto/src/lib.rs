//! The flagmesh protobuf contract, generated at build time without a system
//! `protoc`: `flagmesh.v1` (Admin, Sync, Evaluation) and the OpenFeature flagd
//! compatibility packages (`flagd.evaluation.v1`, `flagd.evaluation.v2`,
//! `flagd.sync.v1`). [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set of
//! every file, for gRPC server reflection.

#![allow(missing_docs)] // generated code carries the .proto comments instead
#![allow(clippy::all, clippy::pedantic)]

/// The encoded `FileDescriptorSet` of every flagmesh and flagd proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flagmesh_descriptor.bin"));

/// flagmesh's own API.
pub mod flagmesh {
    /// Version 1 of the flagmesh API.
    pub mod v1 {
        tonic::include_proto!("flagmesh.v1");
    }
}

/// The OpenFeature flagd protocols, wire-compatible.
pub mod flagd {
    /// flagd evaluation protocols.
    pub mod evaluation {
        /// `flagd.evaluation.v1`.
        pub mod v1 {
            tonic::include_proto!("flagd.evaluation.v1");
        }
        /// `flagd.evaluation.v2`.
        pub mod v2 {
            tonic::include_proto!("flagd.evaluation.v2");
        }
    }
    /// flagd sync protocol.
    pub mod sync {
        /// `flagd.sync.v1`.
        pub mod v1 {
            tonic::include_proto!("flagd.sync.v1");
        }
    }
}

pub use flagmesh::v1;

#[cfg(test)]
mod tests {
    use prost::Message;

    /// The descriptor set decodes and names every package servers register
    /// with reflection.
    #[test]
    fn descriptor_set_holds_every_package() -> Result<(), prost::DecodeError> {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)?;
        let packages: Vec<&str> = fds.file.iter().map(|f| f.package()).collect();
        for want in [
            "flagmesh.v1",
            "flagd.evaluation.v1",
            "flagd.evaluation.v2",
            "flagd.sync.v1",
            "google.protobuf",
        ] {
            assert!(
                packages.contains(&want),
                "missing package {want}: {packages:?}"
            );
        }
        Ok(())
    }

    /// Field numbers of the flagd contract match the reference tables.
    #[test]
    fn flagd_field_numbers_match_reference() -> Result<(), prost::DecodeError> {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)?;
        let field = |pkg: &str, msg: &str, name: &str| -> Option<i32> {
            fds.file
                .iter()
                .filter(|f| f.package() == pkg)
                .flat_map(|f| f.message_type.iter())
                .find(|m| m.name() == msg)?
                .field
                .iter()
                .find(|f| f.name() == name)
                .map(|f| f.number())
        };
        assert_eq!(
            field("flagd.evaluation.v1", "AnyFlag", "object_value"),
            Some(6)
        );
        assert_eq!(
            field("flagd.evaluation.v2", "ResolveIntResponse", "metadata"),
            Some(4)
        );
        assert_eq!(
            field("flagd.sync.v1", "GetMetadataResponse", "metadata"),
            Some(2)
        );
        assert_eq!(
            field("flagd.sync.v1", "SyncFlagsResponse", "sync_context"),
            Some(2)
        );
        Ok(())
    }
}
