//! How a replica stores a flag's record: the protobuf `Flag`, compressed
//! with LZ4 against a dictionary of the flagd definition format's own
//! words, so that the values sled writes, journals and caches are about
//! 2.5 times smaller (a flag of about 400 bytes takes about 165).
//!
//! A stored value is either
//! - `0x01`, the uncompressed length (u32, little endian), then the LZ4
//!   block compressed against [`DICTIONARY_1`]; or
//! - the plain protobuf `Flag`, as replicas wrote it before compression,
//!   and still write where compression would not make it smaller.
//!
//! The two never collide: a protobuf message starts with a field key,
//! `field number << 3 | wire type`, and field numbers start at 1, so no
//! encoded `Flag` starts with a byte below `0x08`. A new dictionary would
//! take a new tag; [`DICTIONARY_1`] never changes.

use flagmesh_proto::v1::Flag;
use prost::Message;

/// The tag of a value compressed against [`DICTIONARY_1`].
const TAG_DICTIONARY_1: u8 = 0x01;

/// A compressed value never claims more than this once decompressed (the
/// largest message the mesh carries): a damaged length cannot make a
/// reader allocate more.
const MAX_DECOMPRESSED: usize = 64 << 20;

/// The words of the flagd flag-definition format, in its canonical form
/// (keys sorted, no whitespace): what LZ4 finds back-references into. Only
/// the format's own vocabulary (its properties, states, JSONLogic and flagd
/// operators, the context's well-known keys), no particular fleet's
/// attribute values. Fixed forever under [`TAG_DICTIONARY_1`].
pub const DICTIONARY_1: &[u8] = br#"{"defaultVariant":"on","state":"DISABLED","variants":{"off":false,"on":true}}{"defaultVariant":"off","metadata":{},"state":"ENABLED","targeting":{"if":[{"and":[{"in":[{"var":"targetingKey"},[]]},{"or":[{"==":[{"var":""},""]},{"!=":[{"var":""},""]}]},{"!":{"var":""}},{"<=":[{"var":""},0]},{">=":[{"var":""},0]},{"<":[{"var":""},0]},{">":[{"var":""},0]},{"starts_with":[{"var":""},""]},{"ends_with":[{"var":"email"},"@"]},{"sem_ver":[{"var":"version"},">=","1.0.0"]}]},"on",{"fractional":[{"cat":[{"var":"$flagd.flagKey"},{"var":"targetingKey"}]},["on",50],["off",50]]}]},"variants":{"off":false,"on":true}}{"var":"$flagd.timestamp"}"#;

/// A stored value that could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    /// The value's compressed form is damaged.
    #[error("a stored flag's compressed value is damaged: {0}")]
    Damaged(String),
    /// The value is not a protobuf `Flag`.
    #[error("a stored flag does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// The stored form of `flag`: compressed when that makes it smaller.
pub fn encode_flag(flag: &Flag) -> Vec<u8> {
    let plain = flag.encode_to_vec();
    let Ok(len) = u32::try_from(plain.len()) else {
        return plain;
    };
    let packed = lz4_flex::block::compress_with_dict(&plain, DICTIONARY_1);
    if packed.len() + 5 >= plain.len() {
        return plain;
    }
    let mut out = Vec::with_capacity(packed.len() + 5);
    out.push(TAG_DICTIONARY_1);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&packed);
    out
}

/// The flag a stored value holds, in either form.
pub fn decode_flag(value: &[u8]) -> Result<Flag, StoredError> {
    match value.first() {
        Some(&TAG_DICTIONARY_1) => {
            let plain = unpack(&value[1..])?;
            Ok(Flag::decode(plain.as_slice())?)
        }
        _ => Ok(Flag::decode(value)?),
    }
}

fn unpack(rest: &[u8]) -> Result<Vec<u8>, StoredError> {
    let (len, packed) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| StoredError::Damaged("no length".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_DECOMPRESSED {
        return Err(StoredError::Damaged(format!("claims {len} bytes")));
    }
    let plain = lz4_flex::block::decompress_with_dict(packed, len, DICTIONARY_1)
        .map_err(|e| StoredError::Damaged(e.to_string()))?;
    if plain.len() != len {
        return Err(StoredError::Damaged(format!(
            "{} bytes where {len} were stored",
            plain.len()
        )));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(definition: &str) -> Flag {
        Flag {
            flag_set: "shop".into(),
            key: "new-checkout".into(),
            definition_json: definition.as_bytes().to_vec(),
            mod_revision: 1234,
            create_revision: 17,
        }
    }

    const TARGETED: &str = r#"{"defaultVariant":"off","metadata":{"owner":"payments"},"state":"ENABLED","targeting":{"if":[{"and":[{"in":[{"var":"plan"},["pro","team"]]},{"ends_with":[{"var":"email"},"@acme.test"]}]},"on",{"fractional":[{"cat":[{"var":"$flagd.flagKey"},{"var":"targetingKey"}]},["on",10],["off",90]]}]},"variants":{"off":false,"on":true}}"#;

    #[test]
    fn a_targeted_flag_is_stored_compressed_and_read_back_whole() {
        let f = flag(TARGETED);
        let stored = encode_flag(&f);
        assert_eq!(stored[0], TAG_DICTIONARY_1);
        assert!(
            stored.len() * 2 < f.encoded_len(),
            "{} bytes stored for {}",
            stored.len(),
            f.encoded_len()
        );
        assert_eq!(decode_flag(&stored).expect("decodes"), f);
    }

    #[test]
    fn values_written_before_compression_still_read() {
        let f = flag(TARGETED);
        assert_eq!(decode_flag(&f.encode_to_vec()).expect("decodes"), f);
    }

    #[test]
    fn a_flag_that_would_not_shrink_is_stored_plain() {
        let f = Flag {
            key: "x".into(),
            ..Flag::default()
        };
        let stored = encode_flag(&f);
        assert_eq!(stored, f.encode_to_vec());
        assert_eq!(decode_flag(&stored).expect("decodes"), f);
    }

    #[test]
    fn no_encoded_flag_starts_with_the_tag() {
        // the first byte of any non-empty encoding is a field key (>= 0x08)
        for f in [
            flag(TARGETED),
            Flag {
                mod_revision: 1,
                ..Flag::default()
            },
            Flag {
                create_revision: 1,
                ..Flag::default()
            },
        ] {
            assert!(f.encode_to_vec()[0] >= 0x08);
        }
    }

    #[test]
    fn a_damaged_value_is_an_error_not_a_panic_or_a_huge_allocation() {
        let stored = encode_flag(&flag(TARGETED));
        let mut huge = stored.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_flag(&huge), Err(StoredError::Damaged(_))));
        assert!(matches!(
            decode_flag(&stored[..3]),
            Err(StoredError::Damaged(_))
        ));
        let truncated = &stored[..stored.len() - 4];
        assert!(decode_flag(truncated).is_err());
        let mut longer = stored.clone();
        let claimed = u32::from_le_bytes([stored[1], stored[2], stored[3], stored[4]]) + 7;
        longer[1..5].copy_from_slice(&claimed.to_le_bytes());
        assert!(decode_flag(&longer).is_err());
    }
}
