//! How a replica stores a flag's record: the protobuf `Flag`, compressed
//! with LZ4 against a dictionary, so that the values sled writes, journals
//! and caches are several times smaller.
//!
//! Two dictionaries:
//! - [`DICTIONARY_1`], the flagd definition format's own words (a flag of
//!   about 400 bytes takes about 165);
//! - a store's own [`Dictionary`]: [`DICTIONARY_1`] followed by a sample
//!   of the first flags the store was given (kept under
//!   [`DICTIONARY_KEY`], made once and never changed). A fleet's flags
//!   repeat one another's rules and names, so the same flag then takes
//!   about 60 bytes.
//!
//! A stored value is one of
//! - `0x01`, the uncompressed length (u32, little endian), then the LZ4
//!   block compressed against [`DICTIONARY_1`];
//! - `0x02`, the store dictionary's id (u32, little endian), the
//!   uncompressed length, then the LZ4 block compressed against it;
//! - the plain protobuf `Flag`, as replicas wrote it before compression,
//!   and still write where compression would not make it smaller.
//!
//! They never collide: a protobuf message starts with a field key,
//! `field number << 3 | wire type`, and field numbers start at 1, so no
//! encoded `Flag` starts with a byte below `0x08`. [`DICTIONARY_1`] never
//! changes; the id ties a value to the sample it was compressed with, so
//! a value is never decoded against another.

use std::sync::{Arc, OnceLock};

use flagmesh_proto::v1::Flag;
use prost::Message;

/// The tag of a value compressed against [`DICTIONARY_1`].
const TAG_DICTIONARY_1: u8 = 0x01;

/// The tag of a value compressed against the store's [`Dictionary`].
const TAG_STORE_DICTIONARY: u8 = 0x02;

/// Where a store keeps its [`Dictionary`]'s sample: a version byte (1),
/// then the sample.
pub const DICTIONARY_KEY: &[u8] = b"m:dictionary";

/// The version byte of a kept sample.
const DICTIONARY_VERSION: u8 = 1;

/// The most a sample takes (LZ4 finds matches anywhere in the dictionary;
/// a longer one costs each compression more setup).
const SAMPLE_BYTES: usize = 4 << 10;

/// The most flags a sample takes, spread over the flags it is made from.
const SAMPLE_FLAGS: usize = 16;

/// A dictionary is made once a write's flags give a sample this large
/// (less says little about the fleet; [`DICTIONARY_1`] serves until then).
const SAMPLE_FROM_BYTES: usize = 1 << 10;

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

/// A store's own dictionary: [`DICTIONARY_1`] and a sample of its flags.
#[derive(Debug, PartialEq, Eq)]
pub struct Dictionary {
    /// Ties each value to this sample (the low half of its xxh3).
    id: u32,
    /// [`DICTIONARY_1`], then the sample.
    bytes: Box<[u8]>,
}

impl Dictionary {
    fn of_sample(sample: &[u8]) -> Self {
        let id = xxhash_rust::xxh3::xxh3_64(sample) as u32;
        Self {
            id,
            bytes: [DICTIONARY_1, sample].concat().into_boxed_slice(),
        }
    }

    /// A sample of `flags`: up to [`SAMPLE_FLAGS`] of them spread over the
    /// list, at most [`SAMPLE_BYTES`] in all; `None` when that comes to
    /// less than [`SAMPLE_FROM_BYTES`].
    pub fn sample<'a>(flags: impl ExactSizeIterator<Item = &'a Flag>) -> Option<Self> {
        let step = flags.len().div_ceil(SAMPLE_FLAGS).max(1);
        let mut sample = Vec::new();
        for f in flags.step_by(step) {
            let plain = f.encode_to_vec();
            if sample.len() + plain.len() <= SAMPLE_BYTES {
                sample.extend_from_slice(&plain);
            }
        }
        (sample.len() >= SAMPLE_FROM_BYTES).then(|| Self::of_sample(&sample))
    }

    /// What a store keeps under [`DICTIONARY_KEY`].
    pub fn record(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + self.bytes.len() - DICTIONARY_1.len());
        v.push(DICTIONARY_VERSION);
        v.extend_from_slice(&self.bytes[DICTIONARY_1.len()..]);
        v
    }

    /// The dictionary a kept record holds.
    pub fn from_record(record: &[u8]) -> Result<Self, StoredError> {
        match record.split_first() {
            Some((&DICTIONARY_VERSION, sample)) => Ok(Self::of_sample(sample)),
            _ => Err(StoredError::Damaged(
                "the store's dictionary is of an unknown version".into(),
            )),
        }
    }
}

/// Encodes and decodes a store's values: holds the store's dictionary once
/// it is made or read (a value compressed against it is read back through
/// the tree that holds it).
#[derive(Debug, Default)]
pub struct Codec {
    dictionary: OnceLock<Arc<Dictionary>>,
}

impl Codec {
    /// The codec of `tree`, with its dictionary if it has one.
    pub fn open(tree: &sled::Tree) -> Result<Self, StoredError> {
        let codec = Self::default();
        if let Some(d) = Self::kept(tree)? {
            codec.install(d);
        }
        Ok(codec)
    }

    fn kept(tree: &sled::Tree) -> Result<Option<Arc<Dictionary>>, StoredError> {
        tree.get(DICTIONARY_KEY)
            .map_err(|e| StoredError::Damaged(format!("the store's dictionary: {e}")))?
            .map(|r| Dictionary::from_record(&r).map(Arc::new))
            .transpose()
    }

    /// The dictionary values are compressed against now, if the store has
    /// one.
    pub fn dictionary(&self) -> Option<&Arc<Dictionary>> {
        self.dictionary.get()
    }

    /// A dictionary to make for a write of `flags`, when the store has
    /// none yet: its record must be written before the values compressed
    /// against it, and [`Codec::install`]ed once they are. One a failed
    /// write left in `tree` is taken up again rather than replaced.
    pub fn propose<'a>(
        &self,
        tree: &sled::Tree,
        flags: impl ExactSizeIterator<Item = &'a Flag>,
    ) -> Result<Option<Arc<Dictionary>>, StoredError> {
        if self.dictionary.get().is_some() || flags.len() == 0 {
            return Ok(None);
        }
        if let Some(d) = Self::kept(tree)? {
            return Ok(Some(d));
        }
        Ok(Dictionary::sample(flags).map(Arc::new))
    }

    /// Takes `d` as the store's dictionary (kept now); the one it has
    /// stays once it has one.
    pub fn install(&self, d: Arc<Dictionary>) {
        let _ = self.dictionary.set(d);
    }

    /// The flag a stored value holds, in any form (a dictionary this codec
    /// has not seen yet is read from `tree`).
    pub fn decode(&self, value: &[u8], tree: &sled::Tree) -> Result<Flag, StoredError> {
        let Some((&TAG_STORE_DICTIONARY, rest)) = value.split_first() else {
            return decode_flag(value);
        };
        let (id, rest) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| StoredError::Damaged("no dictionary id".into()))?;
        let id = u32::from_le_bytes(*id);
        let d = match self.dictionary.get() {
            Some(d) => d,
            None => {
                let kept = Self::kept(tree)?.ok_or_else(|| unknown_dictionary(id))?;
                self.dictionary.get_or_init(|| kept)
            }
        };
        if d.id != id {
            return Err(unknown_dictionary(id));
        }
        let plain = unpack(rest, &d.bytes)?;
        Ok(Flag::decode(plain.as_slice())?)
    }
}

fn unknown_dictionary(id: u32) -> StoredError {
    StoredError::Damaged(format!(
        "compressed against dictionary {id:08x}, which the store does not hold"
    ))
}

/// The stored form of `flag`, compressed against `dictionary` (else
/// [`DICTIONARY_1`]) when that makes it smaller.
pub fn encode_flag_with(flag: &Flag, dictionary: Option<&Dictionary>) -> Vec<u8> {
    match dictionary {
        None => encode_flag(flag),
        Some(d) => {
            let [a, b, c, e] = d.id.to_le_bytes();
            pack(flag, &[TAG_STORE_DICTIONARY, a, b, c, e], &d.bytes)
        }
    }
}

/// `flag` as `header`, its length (u32, little endian) and its encoding
/// compressed against `dictionary`; the plain encoding when that would not
/// be smaller.
fn pack(flag: &Flag, header: &[u8], dictionary: &[u8]) -> Vec<u8> {
    let plain = flag.encode_to_vec();
    let Ok(len) = u32::try_from(plain.len()) else {
        return plain;
    };
    let packed = lz4_flex::block::compress_with_dict(&plain, dictionary);
    let size = header.len() + 4 + packed.len();
    if size >= plain.len() {
        return plain;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(header);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&packed);
    out
}

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
    pack(flag, &[TAG_DICTIONARY_1], DICTIONARY_1)
}

/// The flag a stored value holds, in a form that needs no store
/// dictionary.
pub fn decode_flag(value: &[u8]) -> Result<Flag, StoredError> {
    match value.first() {
        Some(&TAG_DICTIONARY_1) => {
            let plain = unpack(&value[1..], DICTIONARY_1)?;
            Ok(Flag::decode(plain.as_slice())?)
        }
        Some(&TAG_STORE_DICTIONARY) => Err(StoredError::Damaged(
            "compressed against a store's dictionary, read without it".into(),
        )),
        _ => Ok(Flag::decode(value)?),
    }
}

fn unpack(rest: &[u8], dictionary: &[u8]) -> Result<Vec<u8>, StoredError> {
    let (len, packed) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| StoredError::Damaged("no length".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_DECOMPRESSED {
        return Err(StoredError::Damaged(format!("claims {len} bytes")));
    }
    let plain = lz4_flex::block::decompress_with_dict(packed, len, dictionary)
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

    /// `n` flags of one fleet: the same rule shape, their own names,
    /// owners and rollouts.
    fn fleet(n: usize) -> Vec<Flag> {
        (0..n)
            .map(|i| Flag {
                key: format!("flag-{i}"),
                definition_json: TARGETED
                    .replace("payments", &format!("team-{}", i % 7))
                    .replace("[\"on\",10]", &format!("[\"on\",{}]", i % 50))
                    .into_bytes(),
                mod_revision: 100 + i as u64,
                ..flag(TARGETED)
            })
            .collect()
    }

    fn temporary_tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        db.open_tree("t").expect("tree")
    }

    #[test]
    fn a_store_dictionary_sampled_from_its_fleet_compresses_far_better() {
        let flags = fleet(200);
        let d = Dictionary::sample(flags.iter()).expect("enough to sample");
        let codec = Codec::default();
        codec.install(Arc::new(d));
        let tree = temporary_tree();
        let (mut fixed, mut own) = (0, 0);
        for f in &flags {
            let stored = encode_flag_with(f, codec.dictionary().map(|d| &**d));
            assert_eq!(stored[0], TAG_STORE_DICTIONARY);
            assert_eq!(&codec.decode(&stored, &tree).expect("decodes"), f);
            fixed += encode_flag(f).len();
            own += stored.len();
        }
        assert!(own * 2 < fixed, "{own} bytes against {fixed}");
        // values in the older forms read through the same codec
        let f = &flags[3];
        assert_eq!(&codec.decode(&encode_flag(f), &tree).expect("1"), f);
        assert_eq!(&codec.decode(&f.encode_to_vec(), &tree).expect("plain"), f);
    }

    #[test]
    fn a_value_is_never_decoded_against_another_dictionary() {
        let flags = fleet(64);
        let ours = Dictionary::sample(flags.iter()).expect("sample");
        let theirs = Dictionary::sample(flags[1..].iter()).expect("sample");
        assert_ne!(ours.id, theirs.id);
        let stored = encode_flag_with(&flags[0], Some(&ours));
        let codec = Codec::default();
        codec.install(Arc::new(theirs));
        let tree = temporary_tree();
        assert!(matches!(
            codec.decode(&stored, &tree),
            Err(StoredError::Damaged(_))
        ));
        // nor read as if it needed none
        assert!(matches!(decode_flag(&stored), Err(StoredError::Damaged(_))));
        // a codec without one reads the store's, and refuses if it has none
        assert!(Codec::default().decode(&stored, &tree).is_err());
        tree.insert(DICTIONARY_KEY, ours.record()).expect("insert");
        assert_eq!(
            Codec::default().decode(&stored, &tree).expect("decodes"),
            flags[0]
        );
    }

    #[test]
    fn a_dictionary_is_made_once_and_a_kept_one_taken_up_again() {
        let tree = temporary_tree();
        let codec = Codec::open(&tree).expect("open");
        assert!(codec.dictionary().is_none());
        // a write too small to say much about the fleet makes none
        let few = fleet(2);
        assert!(codec.propose(&tree, few.iter()).expect("propose").is_none());
        let flags = fleet(100);
        let made = codec
            .propose(&tree, flags.iter())
            .expect("propose")
            .expect("made");
        // the write that was to keep it failed after keeping it: the next
        // proposal takes it up rather than sampling other flags
        tree.insert(DICTIONARY_KEY, made.record()).expect("insert");
        let again = codec
            .propose(&tree, flags[50..].iter())
            .expect("propose")
            .expect("kept");
        assert_eq!(again, made);
        codec.install(again);
        assert!(
            codec
                .propose(&tree, flags.iter())
                .expect("propose")
                .is_none()
        );
        let reopened = Codec::open(&tree).expect("open");
        assert_eq!(reopened.dictionary().map(|d| d.id), Some(made.id));
        assert!(Dictionary::from_record(&[9, 1, 2]).is_err());
        assert!(Dictionary::from_record(&[]).is_err());
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
