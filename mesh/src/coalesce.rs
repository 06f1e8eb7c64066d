//! Merging consecutive deltas into one, and cutting a delta or snapshot
//! down to the flag sets a subscriber follows.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};

use flagmesh_proto::v1::{Delta, Flag, FlagRef, FlagSet};

/// Merges consecutive deltas (each `from` equal to the previous `to`) into
/// one from the first `from` to the last `to`; `None` when `deltas` is empty
/// or does not chain.
pub fn coalesce<D: Borrow<Delta>>(deltas: &[D]) -> Option<Delta> {
    let first = deltas.first()?.borrow();
    if deltas.len() == 1 {
        return Some(first.clone());
    }
    let mut flags: BTreeMap<(String, String), Option<Flag>> = BTreeMap::new();
    let mut sets: BTreeMap<String, Option<FlagSet>> = BTreeMap::new();
    let mut expected_from = first.from_revision;
    for d in deltas.iter().map(Borrow::borrow) {
        if d.from_revision != expected_from {
            return None;
        }
        expected_from = d.to_revision;
        for f in &d.deletes {
            flags.insert((f.flag_set.clone(), f.key.clone()), None);
        }
        for f in &d.upserts {
            flags.insert((f.flag_set.clone(), f.key.clone()), Some(f.clone()));
        }
        for s in &d.flag_set_deletes {
            sets.insert(s.clone(), None);
        }
        for s in &d.flag_set_upserts {
            sets.insert(s.id.clone(), Some(s.clone()));
        }
    }
    let last = deltas.last()?.borrow();
    let mut out = Delta {
        history_id: first.history_id.clone(),
        from_revision: first.from_revision,
        to_revision: last.to_revision,
        digest: last.digest,
        committed_at_unix_ms: last.committed_at_unix_ms,
        ..Default::default()
    };
    for ((flag_set, key), f) in flags {
        match f {
            Some(f) => out.upserts.push(f),
            None => out.deletes.push(FlagRef { flag_set, key }),
        }
    }
    for (id, s) in sets {
        match s {
            Some(s) => out.flag_set_upserts.push(s),
            None => out.flag_set_deletes.push(id),
        }
    }
    Some(out)
}

/// Keeps only the flags and flag sets of `sets`; the digest goes (a partial
/// state is not checked against the whole state's digest).
pub fn filter_delta(mut d: Delta, sets: &HashSet<String>) -> Delta {
    d.upserts.retain(|f| sets.contains(&f.flag_set));
    d.deletes.retain(|f| sets.contains(&f.flag_set));
    d.flag_set_upserts.retain(|s| sets.contains(&s.id));
    d.flag_set_deletes.retain(|s| sets.contains(s));
    d.digest = None;
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(set: &str, key: &str, rev: u64) -> Flag {
        Flag {
            flag_set: set.into(),
            key: key.into(),
            definition_json: format!("{{\"r\":{rev}}}").into_bytes(),
            mod_revision: rev,
            create_revision: rev,
        }
    }

    fn delta(from: u64, upserts: Vec<Flag>, deletes: Vec<(&str, &str)>) -> Delta {
        Delta {
            history_id: "h".into(),
            from_revision: from,
            to_revision: from + 1,
            digest: Some(from + 100),
            upserts,
            deletes: deletes
                .into_iter()
                .map(|(s, k)| FlagRef {
                    flag_set: s.into(),
                    key: k.into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn later_changes_win() {
        let ds = vec![
            delta(1, vec![flag("s", "a", 2), flag("s", "b", 2)], vec![]),
            delta(2, vec![], vec![("s", "a")]),
            delta(3, vec![flag("s", "b", 4)], vec![]),
        ];
        let c = coalesce(&ds).expect("chains");
        assert_eq!(
            (c.from_revision, c.to_revision, c.digest),
            (1, 4, Some(103))
        );
        assert_eq!(c.upserts, vec![flag("s", "b", 4)]);
        assert_eq!(c.deletes.len(), 1);
        assert_eq!(c.deletes[0].key, "a");
    }

    #[test]
    fn refuses_gaps() {
        let ds = vec![delta(1, vec![], vec![]), delta(3, vec![], vec![])];
        assert!(coalesce(&ds).is_none());
    }
}
