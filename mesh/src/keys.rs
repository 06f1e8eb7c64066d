//! The sled key layout of every flagmesh flag store (the control plane's
//! store and the replicas of hubs, PoPs and SDKs), defined once:
//! `f:SET\0KEY` holds a flag, `s:SET` a flag set's record. A flag set's
//! flags are contiguous, and `f:SET\0` is their common prefix.

/// The prefix of every flag.
pub const FLAGS: &[u8] = b"f:";

/// The prefix of every flag set record.
pub const FLAG_SETS: &[u8] = b"s:";

/// The key of flag `key` in flag set `set`.
pub fn flag(set: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(FLAGS.len() + set.len() + 1 + key.len());
    k.extend_from_slice(FLAGS);
    k.extend_from_slice(set.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The prefix of every flag of `set`.
pub fn flags_of(set: &str) -> Vec<u8> {
    flag(set, "")
}

/// The key of flag set `set`'s record.
pub fn flag_set(set: &str) -> Vec<u8> {
    [FLAG_SETS, set.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sets_flags_share_its_prefix_and_no_other_sets() {
        assert!(flag("web", "banner").starts_with(&flags_of("web")));
        // "web" must not be a prefix of "webapp"'s flags
        assert!(!flag("webapp", "banner").starts_with(&flags_of("web")));
        assert!(flag_set("web").starts_with(FLAG_SETS));
    }
}
