//! The sled key layout of every flagmesh flag store (the control plane's
//! store and the replicas of hubs, PoPs and SDKs), defined once:
//! `f:SET\0KEY` holds a flag, `s:SET` a flag set's record. A flag set's
//! flags are contiguous, and `f:SET\0` is their common prefix. Every store
//! is opened through [`open_db`].

use std::time::{Duration, Instant};

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

/// The (set, key) of a flag's store key; `None` for any other key.
pub fn parse_flag(k: &[u8]) -> Option<(&str, &str)> {
    let rest = k.strip_prefix(FLAGS)?;
    let at = rest.iter().position(|b| *b == 0)?;
    let set = std::str::from_utf8(&rest[..at]).ok()?;
    let key = std::str::from_utf8(&rest[at + 1..]).ok()?;
    Some((set, key))
}

/// The prefix of every flag of `set`.
pub fn flags_of(set: &str) -> Vec<u8> {
    flag(set, "")
}

/// The key of flag set `set`'s record.
pub fn flag_set(set: &str) -> Vec<u8> {
    [FLAG_SETS, set.as_bytes()].concat()
}

/// How long [`open_db`] waits for a store another holder is letting go of.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens a sled store, waiting up to `wait` while another holder still has
/// it locked. sled lets go of its lock file only once its background
/// writes end, a moment after the last handle is dropped, so a node
/// restarted at once (in the same process, or a process started while the
/// previous one still exits) would otherwise fail to open its own store.
/// A store still locked after `wait` is an error: two nodes never share a
/// directory.
pub fn open_db(config: &sled::Config, wait: Duration) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + wait;
    loop {
        match config.open() {
            // sled reports a held lock only in its message
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_let_go_of_is_opened_and_one_held_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = sled::Config::new().path(dir.path());
        let held = open_db(&config, Duration::ZERO).expect("open");
        // held: refused after the wait, with sled's lock error
        let err = open_db(&config, Duration::from_millis(100)).expect_err("locked");
        assert!(err.to_string().contains("lock"), "{err}");
        // let go of a little later: the wait covers it
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let db = open_db(&config, Duration::from_secs(5)).expect("opened once let go of");
        drop(db);
        release.join().expect("join");
    }

    #[test]
    fn a_sets_flags_share_its_prefix_and_no_other_sets() {
        assert!(flag("web", "banner").starts_with(&flags_of("web")));
        // "web" must not be a prefix of "webapp"'s flags
        assert!(!flag("webapp", "banner").starts_with(&flags_of("web")));
        assert!(flag_set("web").starts_with(FLAG_SETS));
    }

    #[test]
    fn a_flags_key_reads_back_as_its_set_and_key() {
        assert_eq!(parse_flag(&flag("web", "a/b.c")), Some(("web", "a/b.c")));
        assert_eq!(parse_flag(&flag("", "k")), Some(("", "k")));
        assert_eq!(parse_flag(&flag_set("web")), None);
        assert_eq!(parse_flag(b"m:scope"), None);
    }
}
