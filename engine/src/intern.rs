//! Sharing of identical compiled parts between flags. Flags of one fleet
//! often repeat the same targeting (the same segment, the same rollout)
//! and the same variants; each distinct one is kept once, shared by every
//! flag that has it, and dropped with the last of them.
//!
//! An entry is found by a 128-bit hash of the part's canonical JSON and
//! shared only when the newly compiled part equals it, so a hash collision
//! costs sharing, never correctness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Parts of one kind, by the hash of their source JSON.
pub(crate) struct Interner<T> {
    entries: Mutex<Entries<T>>,
}

struct Entries<T> {
    by_hash: HashMap<u128, Weak<T>>,
    /// Insertions since dead entries were last swept.
    since_sweep: usize,
}

impl<T: PartialEq> Interner<T> {
    pub(crate) fn new() -> Self {
        Self {
            entries: Mutex::new(Entries {
                by_hash: HashMap::new(),
                since_sweep: 0,
            }),
        }
    }

    /// The shared copy of `part` (compiled from `source`): the one already
    /// held if it is equal, else `part`, now held for the next flag.
    pub(crate) fn share<S: serde::Serialize + ?Sized>(&self, source: &S, part: T) -> Arc<T> {
        let hash = hash_json(source);
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = e.by_hash.get(&hash).and_then(Weak::upgrade)
            && *held == part
        {
            return held;
        }
        let part = Arc::new(part);
        e.by_hash.insert(hash, Arc::downgrade(&part));
        e.since_sweep += 1;
        // sweep parts no flag holds any more, at most as often as the map
        // doubles, so the cost per insertion stays constant
        if e.since_sweep > 1024 && e.since_sweep > e.by_hash.len() / 2 {
            e.by_hash.retain(|_, w| w.strong_count() > 0);
            e.since_sweep = 0;
        }
        part
    }

    /// How many entries are held (live or not yet swept), for tests.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_hash
            .len()
    }
}

/// xxh3-128 of a JSON serialization.
fn hash_json<S: serde::Serialize + ?Sized>(v: &S) -> u128 {
    struct Sink(xxhash_rust::xxh3::Xxh3);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut sink = Sink(xxhash_rust::xxh3::Xxh3::new());
    // writing into a hasher cannot fail
    let _ = serde_json::to_writer(&mut sink, v);
    sink.0.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equal_parts_are_shared_and_dropped_with_their_last_holder() {
        let i: Interner<String> = Interner::new();
        let a = i.share(&json!({"x": 1}), "one".to_owned());
        let b = i.share(&json!({"x": 1}), "one".to_owned());
        assert!(Arc::ptr_eq(&a, &b));
        let c = i.share(&json!({"x": 2}), "two".to_owned());
        assert!(!Arc::ptr_eq(&a, &c));
        drop((a, b));
        // dropped with its holders: a new copy is made, not the old one
        let d = i.share(&json!({"x": 1}), "one".to_owned());
        assert_eq!(*d, "one");
        assert_eq!(Arc::strong_count(&d), 1);
    }

    #[test]
    fn a_collision_costs_sharing_not_correctness() {
        let i: Interner<String> = Interner::new();
        // the same source hash but a different part (as a collision would
        // be): never handed out for it
        let a = i.share(&json!("same"), "first".to_owned());
        let b = i.share(&json!("same"), "second".to_owned());
        assert_eq!((a.as_str(), b.as_str()), ("first", "second"));
    }

    #[test]
    fn dead_entries_are_swept() {
        let i: Interner<u32> = Interner::new();
        for n in 0..5000u32 {
            drop(i.share(&json!(n), n));
        }
        assert!(i.len() < 2100, "{} entries kept", i.len());
    }
}
