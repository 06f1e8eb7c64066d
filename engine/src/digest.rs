//! The state digest: every flag's stored form is hashed with xxh3-64, and the
//! digest of a state is the wrapping sum of those hashes, so it changes in
//! O(1) per upserted or deleted flag and does not depend on order.

use xxhash_rust::xxh3::Xxh3;

/// The xxh3-64 hash of one stored flag: its flag set, its key and its
/// canonical definition bytes, each separated by a zero byte (so moving a
/// definition to another key changes the hash).
pub fn flag_hash(flag_set: &str, key: &str, definition: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(flag_set.as_bytes());
    h.update(&[0]);
    h.update(key.as_bytes());
    h.update(&[0]);
    h.update(definition);
    h.digest()
}

/// The hash a flag set's metadata contributes to a state's digest: the flag
/// hash with an empty key (flag keys are never empty) over the metadata's
/// canonical JSON.
pub fn flag_set_hash(flag_set: &str, metadata_json: &[u8]) -> u64 {
    flag_hash(flag_set, "", metadata_json)
}

/// The additive digest of a whole state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StateDigest(pub u64);

impl StateDigest {
    /// The digest of a state holding exactly these flag hashes.
    pub fn of(hashes: impl IntoIterator<Item = u64>) -> Self {
        let mut d = Self::default();
        for h in hashes {
            d.add(h);
        }
        d
    }

    /// A flag was added.
    pub fn add(&mut self, flag_hash: u64) {
        self.0 = self.0.wrapping_add(flag_hash);
    }

    /// A flag was removed.
    pub fn remove(&mut self, flag_hash: u64) {
        self.0 = self.0.wrapping_sub(flag_hash);
    }

    /// A flag changed from `old` to `new` (`None`: absent before or after).
    pub fn replace(&mut self, old: Option<u64>, new: Option<u64>) {
        if let Some(o) = old {
            self.remove(o);
        }
        if let Some(n) = new {
            self.add(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_part_of_the_hash() {
        assert_ne!(flag_hash("s", "a", b"{}"), flag_hash("s", "b", b"{}"));
        assert_ne!(flag_hash("s", "ab", b""), flag_hash("sa", "b", b""));
    }

    #[test]
    fn add_then_remove_is_identity() {
        let mut d = StateDigest::of([1, 2, u64::MAX]);
        d.replace(Some(2), Some(7));
        d.remove(7);
        d.add(2);
        assert_eq!(d, StateDigest::of([u64::MAX, 2, 1]));
    }
}
