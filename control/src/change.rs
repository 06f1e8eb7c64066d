//! Turning a change request into a commit, the same for every store: the
//! next revision, what changes per flag and per set (for the audit trail
//! and the dry-run diff), the delta to publish with the digest after it,
//! and the writes the store must apply atomically with its head.

use flagmesh_engine::{StateDigest, flag_hash, flag_set_hash};
use flagmesh_proto::convert::{map_to_struct, struct_to_map};
use flagmesh_proto::v1::{ChangeKind, ChangeSet, Delta, Flag, FlagChange, FlagRef, FlagSet};

use crate::error::ControlError;
use crate::store::{ChangeRequest, StateView, StoreHead, metadata_bytes, normalize_metadata};

/// One write a commit makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Store a flag.
    Flag(Flag),
    /// Remove a flag.
    DeleteFlag {
        /// Its set.
        flag_set: String,
        /// Its key.
        key: String,
    },
    /// Store a flag set's record.
    FlagSet(FlagSet),
    /// Remove a flag set's record.
    DeleteFlagSet(String),
}

/// A computed commit; nothing to write when `changes` is empty.
#[derive(Debug, Clone)]
pub struct Computed {
    /// The revision it commits as.
    pub revision: u64,
    /// What changes (the audit entry's and the dry run's diff).
    pub changes: Vec<FlagChange>,
    /// The delta to publish (with the digest after it).
    pub delta: Delta,
    /// The state digest after it.
    pub digest: u64,
    /// The audit trail's entry.
    pub audit: ChangeSet,
    /// What to write, with the head, in one atomic step.
    pub writes: Vec<Write>,
}

/// Flag-set records a commit touches: id -> (record, metadata new or changed).
type SetRecords = std::collections::BTreeMap<String, (Option<FlagSet>, bool)>;

fn set_entry<'a>(
    sets: &'a mut SetRecords,
    id: &str,
    store: &dyn StateView,
) -> Result<&'a mut (Option<FlagSet>, bool), ControlError> {
    if !sets.contains_key(id) {
        sets.insert(id.to_owned(), (store.flag_set(id)?, false));
    }
    sets.get_mut(id)
        .ok_or_else(|| ControlError::Storage("set record".into()))
}

/// Computes the commit of `request` on the state `view` shows at `head`.
/// One write per flag and per set: the last one asked for wins.
pub fn compute(
    view: &dyn StateView,
    head: &StoreHead,
    mut request: ChangeRequest,
    committed_at: i64,
) -> Result<Computed, ControlError> {
    let mut seen = std::collections::HashSet::new();
    request.flags.reverse();
    request
        .flags
        .retain(|w| seen.insert((w.flag_set.clone(), w.key.clone())));
    request.flags.reverse();
    let mut seen_sets = std::collections::HashSet::new();
    request.sets.reverse();
    request
        .sets
        .retain(|w| seen_sets.insert(w.flag_set.clone()));
    request.sets.reverse();
    let revision = head.revision + 1;

    let mut writes = Vec::new();
    let mut digest = StateDigest(head.digest);
    let mut delta = Delta {
        history_id: head.history_id.clone(),
        from_revision: head.revision,
        to_revision: revision,
        committed_at_unix_ms: committed_at,
        ..Default::default()
    };
    let mut changes = Vec::new();
    // flag-set records touched by this change: id -> (record, metadata changed)
    let mut sets: SetRecords = Default::default();

    for w in &request.sets {
        let entry = set_entry(&mut sets, &w.flag_set, view)?;
        if w.delete {
            if let Some(old) = entry.0.take() {
                let old_md = old.metadata.as_ref().map(struct_to_map).unwrap_or_default();
                digest.remove(flag_set_hash(&old.id, &metadata_bytes(&old_md)));
                changes.push(FlagChange {
                    flag_set: old.id.clone(),
                    key: String::new(),
                    kind: ChangeKind::Delete as i32,
                    before_json: String::from_utf8_lossy(&metadata_bytes(&old_md)).into_owned(),
                    after_json: String::new(),
                });
                writes.push(Write::DeleteFlagSet(old.id.clone()));
                delta.flag_set_deletes.push(old.id);
            }
            entry.1 = false;
            continue;
        }
        let new_md = normalize_metadata(&w.metadata);
        let record = entry.0.get_or_insert_with(|| FlagSet {
            id: w.flag_set.clone(),
            ..Default::default()
        });
        let old_md = record.metadata.as_ref().map(struct_to_map);
        if record.mod_revision != 0 && old_md.as_ref() == Some(&new_md) {
            continue;
        }
        changes.push(FlagChange {
            flag_set: w.flag_set.clone(),
            key: String::new(),
            kind: if record.mod_revision == 0 {
                ChangeKind::Create
            } else {
                ChangeKind::Update
            } as i32,
            before_json: old_md
                .map(|m| String::from_utf8_lossy(&metadata_bytes(&m)).into_owned())
                .unwrap_or_default(),
            after_json: String::from_utf8_lossy(&metadata_bytes(&new_md)).into_owned(),
        });
        record.metadata = Some(map_to_struct(&new_md));
        record.mod_revision = revision;
        entry.1 = true;
    }

    for w in &request.flags {
        let old = view.flag(&w.flag_set, &w.key)?;
        let entry = set_entry(&mut sets, &w.flag_set, view)?;
        match &w.definition {
            Some(def) => {
                if old.as_ref().is_some_and(|o| &o.definition_json == def) {
                    continue;
                }
                let flag = Flag {
                    flag_set: w.flag_set.clone(),
                    key: w.key.clone(),
                    definition_json: def.clone(),
                    mod_revision: revision,
                    create_revision: old.as_ref().map(|o| o.create_revision).unwrap_or(revision),
                };
                digest.replace(
                    old.as_ref()
                        .map(|o| flag_hash(&o.flag_set, &o.key, &o.definition_json)),
                    Some(flag_hash(&flag.flag_set, &flag.key, def)),
                );
                let record = entry.0.get_or_insert_with(|| FlagSet {
                    id: w.flag_set.clone(),
                    ..Default::default()
                });
                if record.mod_revision == 0 {
                    entry.1 = true; // a new set
                }
                if old.is_none() {
                    record.flag_count += 1;
                }
                record.mod_revision = revision;
                changes.push(FlagChange {
                    flag_set: w.flag_set.clone(),
                    key: w.key.clone(),
                    kind: if old.is_some() {
                        ChangeKind::Update
                    } else {
                        ChangeKind::Create
                    } as i32,
                    before_json: old
                        .map(|o| String::from_utf8_lossy(&o.definition_json).into_owned())
                        .unwrap_or_default(),
                    after_json: String::from_utf8_lossy(def).into_owned(),
                });
                writes.push(Write::Flag(flag.clone()));
                delta.upserts.push(flag);
            }
            None => {
                let Some(old) = old else { continue };
                digest.remove(flag_hash(&old.flag_set, &old.key, &old.definition_json));
                if let Some(record) = entry.0.as_mut() {
                    record.flag_count = record.flag_count.saturating_sub(1);
                    record.mod_revision = revision;
                }
                changes.push(FlagChange {
                    flag_set: old.flag_set.clone(),
                    key: old.key.clone(),
                    kind: ChangeKind::Delete as i32,
                    before_json: String::from_utf8_lossy(&old.definition_json).into_owned(),
                    after_json: String::new(),
                });
                writes.push(Write::DeleteFlag {
                    flag_set: old.flag_set.clone(),
                    key: old.key.clone(),
                });
                delta.deletes.push(FlagRef {
                    flag_set: old.flag_set,
                    key: old.key,
                });
            }
        }
    }

    // write every touched set record; hash metadata of new or changed sets
    for (id, (record, metadata_changed)) in &sets {
        let Some(record) = record else { continue };
        if record.mod_revision != revision {
            continue;
        }
        let old = view.flag_set(id)?;
        if *metadata_changed {
            let old_hash = old.as_ref().map(|o| {
                flag_set_hash(
                    id,
                    &metadata_bytes(&o.metadata.as_ref().map(struct_to_map).unwrap_or_default()),
                )
            });
            let new_md = record
                .metadata
                .as_ref()
                .map(struct_to_map)
                .unwrap_or_default();
            digest.replace(old_hash, Some(flag_set_hash(id, &metadata_bytes(&new_md))));
            let mut sent = record.clone();
            sent.flag_count = 0;
            delta.flag_set_upserts.push(sent);
            if old.is_none()
                && !changes
                    .iter()
                    .any(|c| c.flag_set == *id && c.key.is_empty())
            {
                changes.push(FlagChange {
                    flag_set: id.clone(),
                    key: String::new(),
                    kind: ChangeKind::Create as i32,
                    before_json: String::new(),
                    after_json: String::from_utf8_lossy(&metadata_bytes(&new_md)).into_owned(),
                });
            }
        }
        writes.push(Write::FlagSet(record.clone()));
    }
    delta.digest = Some(digest.0);
    let audit = ChangeSet {
        revision,
        committed_at_unix_ms: committed_at,
        actor: request.actor.clone(),
        operation: request.operation.clone(),
        comment: request.comment.clone(),
        changes: changes.clone(),
        warnings: request.warnings.clone(),
    };
    Ok(Computed {
        revision,
        changes,
        delta,
        digest: digest.0,
        audit,
        writes,
    })
}
