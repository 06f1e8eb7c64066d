//! The flagmesh protobuf contract, generated at build time without a system
//! `protoc`: `flagmesh.v1` (Admin, Sync, Evaluation) and the OpenFeature flagd
//! compatibility packages (`flagd.evaluation.v1`, `flagd.evaluation.v2`,
//! `flagd.sync.v1`). [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set of
//! every file, for gRPC server reflection.

#![allow(missing_docs)] // generated code carries the .proto comments instead
#![allow(clippy::all, clippy::pedantic)]

pub mod convert;
pub mod view;

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

/// `prost::Message` for a type holding a message already encoded (its
/// field `encoded: Bytes`): encoding writes those bytes; it is only ever
/// sent by servers, and clients decode the message it was made from, so
/// decoding skips every field.
macro_rules! pre_encoded_message {
    ($type:ty) => {
        impl prost::Message for $type {
            fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
                buf.put_slice(&self.encoded);
            }

            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: prost::encoding::WireType,
                buf: &mut impl prost::bytes::Buf,
                ctx: prost::encoding::DecodeContext,
            ) -> Result<(), prost::DecodeError> {
                prost::encoding::skip_field(wire_type, tag, buf, ctx)
            }

            fn encoded_len(&self) -> usize {
                self.encoded.len()
            }

            fn clear(&mut self) {
                self.encoded = prost::bytes::Bytes::new();
            }
        }
    };
}

/// The `flagmesh.v1.Sync` server whose `Subscribe` stream carries
/// [`SharedSyncEvent`](shared::SharedSyncEvent)s: each event is encoded once
/// and its bytes are shared by every subscriber it is sent to.
pub mod shared {
    use prost::bytes::Bytes;

    /// A `flagmesh.v1.SyncEvent` already encoded; sending it copies no
    /// message and encodes nothing. The wire bytes are exactly those of the
    /// `SyncEvent` it was made from.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct SharedSyncEvent {
        encoded: Bytes,
    }

    impl SharedSyncEvent {
        /// Encodes an event once.
        pub fn new(event: &super::v1::SyncEvent) -> Self {
            Self {
                encoded: Bytes::from(prost::Message::encode_to_vec(event)),
            }
        }

        /// Encodes `SyncEvent { delta }` without copying the delta.
        pub fn from_delta(delta: &super::v1::Delta) -> Self {
            let mut buf = Vec::with_capacity(prost::Message::encoded_len(delta) + 8);
            // field 2 of SyncEvent is the delta
            prost::encoding::message::encode(2, delta, &mut buf);
            Self {
                encoded: Bytes::from(buf),
            }
        }

        /// The encoded size in bytes.
        pub fn len(&self) -> usize {
            self.encoded.len()
        }

        /// Whether the event is empty (a default value).
        pub fn is_empty(&self) -> bool {
            self.encoded.is_empty()
        }

        /// The shared bytes.
        pub fn bytes(&self) -> &Bytes {
            &self.encoded
        }
    }

    impl From<&super::v1::SyncEvent> for SharedSyncEvent {
        fn from(event: &super::v1::SyncEvent) -> Self {
            Self::new(event)
        }
    }

    pre_encoded_message!(SharedSyncEvent);

    include!(concat!(env!("OUT_DIR"), "/shared/flagmesh.v1.rs"));
}

/// The `flagmesh.v1.Evaluation` server whose `EvaluateAll` answers with an
/// [`EncodedEvaluateAllResponse`](encoded::EncodedEvaluateAllResponse): the
/// PoP writes every flag's answer straight into one buffer instead of
/// building a message per flag. Clients decode it as `EvaluateAllResponse`.
pub mod encoded {
    use prost::bytes::Bytes;

    /// A `flagmesh.v1.EvaluateAllResponse` already encoded; sending it
    /// encodes nothing more. Made with [`crate::wire`].
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct EncodedEvaluateAllResponse {
        encoded: Bytes,
    }

    impl EncodedEvaluateAllResponse {
        /// The answer whose encoding is `encoded` (the caller wrote valid
        /// `EvaluateAllResponse` fields).
        pub fn from_encoded(encoded: Vec<u8>) -> Self {
            Self {
                encoded: Bytes::from(encoded),
            }
        }

        /// The encoded bytes.
        pub fn bytes(&self) -> &Bytes {
            &self.encoded
        }
    }

    pre_encoded_message!(EncodedEvaluateAllResponse);

    include!(concat!(env!("OUT_DIR"), "/encoded/flagmesh.v1.rs"));
}

/// Writing protobuf fields by hand, for answers assembled from parts
/// encoded ahead ([`encoded`]): each writes what prost writes for a proto3
/// field of that kind, and nothing for a default value.
pub mod wire {
    use prost::encoding::{WireType, encode_key, encode_varint};

    /// A `uint64`, `int32` (non-negative) or enum field.
    pub fn varint(tag: u32, value: u64, buf: &mut Vec<u8>) {
        if value != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(value, buf);
        }
    }

    /// A `bool` field.
    pub fn boolean(tag: u32, value: bool, buf: &mut Vec<u8>) {
        varint(tag, u64::from(value), buf);
    }

    /// A `string` or `bytes` field.
    pub fn bytes(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
        if !value.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(value.len() as u64, buf);
            buf.extend_from_slice(value);
        }
    }

    /// A message field whose body (the message's own encoding) is
    /// `body`; an empty body is still written, as prost writes a present
    /// message.
    pub fn message_body(tag: u32, body: &[u8], buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(body.len() as u64, buf);
        buf.extend_from_slice(body);
    }

    /// A message field.
    pub fn message(tag: u32, message: &impl prost::Message, buf: &mut Vec<u8>) {
        prost::encoding::message::encode(tag, message, buf);
    }

    /// A value of a `google.protobuf.Struct` written by [`json_struct`]:
    /// any JSON value, or a string, number or boolean held apart from one.
    #[derive(Debug, Clone)]
    pub enum StructValue<'a> {
        /// A JSON value (as [`crate::convert::json_to_value`] converts it).
        Json(&'a serde_json::Value),
        /// A JSON value made for the answer.
        Owned(serde_json::Value),
        /// A string.
        Str(&'a str),
        /// A number.
        Number(f64),
        /// A boolean.
        Bool(bool),
    }

    impl StructValue<'_> {
        /// As the protobuf `Value` prost would write the same bytes for.
        pub fn to_value(&self) -> prost_types::Value {
            use prost_types::value::Kind;
            let kind = match self {
                Self::Json(v) => return crate::convert::json_to_value(v),
                Self::Owned(v) => return crate::convert::json_to_value(v),
                Self::Str(s) => Kind::StringValue((*s).to_owned()),
                Self::Number(n) => Kind::NumberValue(*n),
                Self::Bool(b) => Kind::BoolValue(*b),
            };
            prost_types::Value { kind: Some(kind) }
        }
    }

    /// A `google.protobuf.Struct` field holding `entries` (each key once,
    /// in key order): the bytes prost writes for the `Struct` of the same
    /// entries, written without building it and in one pass over the
    /// entries (the body's length is patched in after it). Strings,
    /// numbers, booleans and null are written directly; a nested array or
    /// object goes through prost.
    pub fn json_struct<'a, I>(tag: u32, entries: I, buf: &mut Vec<u8>)
    where
        I: Iterator<Item = (&'a str, StructValue<'a>)>,
    {
        encode_key(tag, WireType::LengthDelimited, buf);
        let length_at = buf.len();
        // one byte for the body's length, widened below when it is longer
        buf.push(0);
        for (k, v) in entries {
            encode_key(1, WireType::LengthDelimited, buf);
            encode_varint(entry_len(k, &v) as u64, buf);
            // a map entry leaves out a default key, as prost does
            bytes(1, k.as_bytes(), buf);
            encode_key(2, WireType::LengthDelimited, buf);
            encode_varint(value_len(&v) as u64, buf);
            value_body(&v, buf);
        }
        let body = (buf.len() - length_at - 1) as u64;
        if body < 0x80 {
            buf[length_at] = body as u8;
        } else {
            let mut length = Vec::with_capacity(10);
            encode_varint(body, &mut length);
            buf.splice(length_at..=length_at, length);
        }
    }

    /// The bytes of field `tag` holding `len` bytes.
    fn length_delimited_len(tag: u32, len: usize) -> usize {
        prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
    }

    /// The length of one `Struct.fields` map entry's body.
    fn entry_len(key: &str, value: &StructValue<'_>) -> usize {
        let key = if key.is_empty() {
            0
        } else {
            length_delimited_len(1, key.len())
        };
        key + length_delimited_len(2, value_len(value))
    }

    /// A value as it is written: a kind of its own, or nested JSON.
    enum Simple<'v> {
        Null,
        Str(&'v str),
        Number(f64),
        Bool(bool),
        Nested(&'v serde_json::Value),
    }

    fn simplest<'v>(value: &'v StructValue<'_>) -> Simple<'v> {
        use serde_json::Value;
        let json = match value {
            StructValue::Json(v) => *v,
            StructValue::Owned(v) => v,
            StructValue::Str(s) => return Simple::Str(s),
            StructValue::Number(n) => return Simple::Number(*n),
            StructValue::Bool(b) => return Simple::Bool(*b),
        };
        match json {
            Value::Null => Simple::Null,
            Value::String(s) => Simple::Str(s),
            Value::Number(n) => Simple::Number(n.as_f64().unwrap_or(0.0)),
            Value::Bool(b) => Simple::Bool(*b),
            nested => Simple::Nested(nested),
        }
    }

    /// The length of a `google.protobuf.Value`'s body.
    fn value_len(value: &StructValue<'_>) -> usize {
        match simplest(value) {
            // a oneof member is written even when it holds its default
            Simple::Null | Simple::Bool(_) => 2,
            Simple::Number(_) => 9,
            Simple::Str(s) => length_delimited_len(3, s.len()),
            Simple::Nested(v) => prost::Message::encoded_len(&crate::convert::json_to_value(v)),
        }
    }

    /// A `google.protobuf.Value`'s body.
    fn value_body(value: &StructValue<'_>, buf: &mut Vec<u8>) {
        match simplest(value) {
            Simple::Null => {
                encode_key(1, WireType::Varint, buf);
                encode_varint(0, buf);
            }
            Simple::Number(n) => {
                encode_key(2, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&n.to_le_bytes());
            }
            Simple::Str(s) => {
                encode_key(3, WireType::LengthDelimited, buf);
                encode_varint(s.len() as u64, buf);
                buf.extend_from_slice(s.as_bytes());
            }
            Simple::Bool(b) => {
                encode_key(4, WireType::Varint, buf);
                encode_varint(u64::from(b), buf);
            }
            Simple::Nested(v) => {
                prost::Message::encode_raw(&crate::convert::json_to_value(v), buf);
            }
        }
    }
}

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

    /// A `Struct` written from JSON entries is byte for byte the one prost
    /// writes, for every kind of value and an empty key.
    #[test]
    fn json_struct_is_wire_identical() {
        let object = serde_json::json!({
            "": "empty key", "b": true, "f": false, "l": [1, "x", null],
            "n": null, "num": 2.5, "o": {"k": 0}, "s": "text", "z": 0,
            "long": "x".repeat(300)
        });
        let map = object.as_object().cloned().unwrap_or_default();
        let short = serde_json::json!({"owner": "team-3", "n": 1});
        let short = short.as_object().cloned().unwrap_or_default();
        // a body over 127 bytes (two bytes of length), under, and empty
        for entries in [map.clone(), short, serde_json::Map::new()] {
            // after other fields: the length is patched where it belongs
            let mut ours = vec![0x08, 0x01];
            let json = entries
                .iter()
                .map(|(k, v)| (k.as_str(), super::wire::StructValue::Json(v)));
            super::wire::json_struct(7, json, &mut ours);
            assert_eq!(ours[..2], [0x08, 0x01]);
            let ours = ours.split_off(2);
            assert_eq!(ours, prosts_of(&entries), "{entries:?}");
            // the same values held apart from JSON write the same bytes
            let mut apart = Vec::new();
            let held = entries.iter().map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => super::wire::StructValue::Str(s),
                    serde_json::Value::Number(n) => {
                        super::wire::StructValue::Number(n.as_f64().unwrap_or(0.0))
                    }
                    serde_json::Value::Bool(b) => super::wire::StructValue::Bool(*b),
                    other => super::wire::StructValue::Json(other),
                };
                (k.as_str(), v)
            });
            super::wire::json_struct(7, held.clone(), &mut apart);
            assert_eq!(apart, ours, "{entries:?}");
            // and convert to the values prost's Struct holds
            let built = prost_types::Struct {
                fields: held.map(|(k, v)| (k.to_owned(), v.to_value())).collect(),
            };
            assert_eq!(built, crate::convert::map_to_struct(&entries));
        }
    }

    fn prosts_of(entries: &serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
        let mut prosts = Vec::new();
        super::wire::message(7, &crate::convert::map_to_struct(entries), &mut prosts);
        prosts
    }

    /// A shared event's bytes decode as the event it was made from.
    #[test]
    fn shared_event_is_wire_identical() -> Result<(), Box<dyn std::error::Error>> {
        use crate::v1::{Progress, SyncEvent, sync_event::Event};
        let event = SyncEvent {
            event: Some(Event::Progress(Progress {
                revision: 7,
                head_revision: 9,
                history_id: "h".into(),
                upstream_connected: true,
                head_digest: Some(0),
            })),
        };
        let shared = crate::shared::SharedSyncEvent::new(&event);
        let mut buf = Vec::new();
        prost::Message::encode(&shared, &mut buf)?;
        assert_eq!(SyncEvent::decode(buf.as_slice())?, event);
        let delta = crate::v1::Delta {
            history_id: "h".into(),
            from_revision: 1,
            to_revision: 2,
            ..Default::default()
        };
        let shared = crate::shared::SharedSyncEvent::from_delta(&delta);
        let decoded = SyncEvent::decode(shared.bytes().as_ref())?;
        assert_eq!(decoded.event, Some(Event::Delta(delta)));
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
