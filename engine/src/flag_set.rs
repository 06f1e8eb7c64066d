//! A compiled flag set: every flag of a document compiled and indexed by key.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};
use xxhash_rust::xxh3::Xxh3Builder;

use crate::document::FlagDocument;
use crate::error::ErrorCode;
use crate::flag::CompiledFlag;
use crate::metadata::SetMetadata;
use crate::resolution::{Metadata, Resolution, ValueType};

/// The flags of one flag set, compiled.
#[derive(Debug, Clone, Default)]
pub struct CompiledFlagSet {
    /// The set's metadata, one copy shared by its flags.
    metadata: Arc<SetMetadata>,
    flags: HashMap<Box<str>, CompiledFlag, Xxh3Builder>,
}

impl CompiledFlagSet {
    /// Compiles every flag of a checked document.
    pub fn from_document(doc: &FlagDocument) -> Self {
        // one copy of the set's metadata (and its JSON), shared by its flags
        let mut set = Self {
            metadata: Arc::new(SetMetadata::new(doc.metadata.clone())),
            flags: HashMap::with_capacity_and_hasher(doc.flags.len(), Xxh3Builder::new()),
        };
        for (key, def) in &doc.flags {
            set.flags.insert(
                key.as_str().into(),
                CompiledFlag::with_shared_metadata(key.as_str().into(), def.clone(), &set.metadata),
            );
        }
        set
    }

    /// The flag-set metadata.
    pub fn metadata(&self) -> &Map<String, Value> {
        self.metadata.map()
    }

    /// One flag.
    pub fn get(&self, key: &str) -> Option<&CompiledFlag> {
        self.flags.get(key)
    }

    /// Adds or replaces a flag.
    pub fn insert(&mut self, flag: CompiledFlag) {
        self.flags.insert(flag.key().into(), flag);
    }

    /// Removes a flag.
    pub fn remove(&mut self, key: &str) -> Option<CompiledFlag> {
        self.flags.remove(key)
    }

    /// How many flags the set holds.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// Whether the set holds no flag.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// Every flag, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &CompiledFlag> {
        self.flags.values()
    }

    /// Resolves a flag; an unknown key resolves with `FLAG_NOT_FOUND`.
    pub fn resolve<'a>(&'a self, key: &str, context: &'a Value) -> Resolution<'a> {
        self.resolve_typed(key, context, ValueType::Any)
    }

    /// Resolves a flag expecting a type (see [`CompiledFlag::resolve_typed`]).
    pub fn resolve_typed<'a>(
        &'a self,
        key: &str,
        context: &'a Value,
        expected: ValueType,
    ) -> Resolution<'a> {
        match self.flags.get(key) {
            Some(flag) => flag.resolve_typed(context, expected),
            None => Resolution::error(
                ErrorCode::FlagNotFound,
                format!("flag \"{key}\" not found"),
                Metadata::empty(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sets_flags_share_one_copy_of_its_metadata() {
        let doc = FlagDocument::parse(
            r#"{"metadata":{"flagSetId":"s","team":"web"},"flags":{
                "a":{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on"},
                "b":{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","metadata":{"team":"app"}}}}"#,
            crate::Strictness::Strict,
        )
        .unwrap();
        let set = CompiledFlagSet::from_document(&doc);
        let (a, b) = (set.get("a").unwrap(), set.get("b").unwrap());
        // both hold the set's own copy
        assert!(a.holds_set_metadata(&set.metadata));
        assert!(b.holds_set_metadata(&set.metadata));
        assert_eq!(set.metadata()["team"], "web");
        // and each still reads it under its own
        let team = |f: &CompiledFlag| serde_json::to_value(f.metadata()).unwrap()["team"].clone();
        assert_eq!(team(a), "web");
        assert_eq!(team(b), "app");
    }
}
