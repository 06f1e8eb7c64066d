//! A resolution's metadata: the flag set's entries, with the flag's own
//! over them. A flag's own entries are packed into one small buffer
//! ([`OwnMetadata`]): a fleet's flags each carry a few short entries of
//! their own (an owner, a ticket), and as a slice of JSON values, with a
//! string allocated for each, they cost about three times their text.

use std::sync::{Arc, LazyLock};

use serde_json::{Map, Number, Value};

static EMPTY_METADATA: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);

/// A flag set's metadata, shared by its flags, with its entries written
/// as JSON once (the body of the object, without braces): every answer
/// written as JSON copies them, unless a flag's own entry overrides one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SetMetadata {
    map: Arc<Map<String, Value>>,
    json: Box<str>,
}

impl SetMetadata {
    /// The set metadata `map` (shared, where the set holds it too).
    pub fn new(map: impl Into<Arc<Map<String, Value>>>) -> Self {
        let map = map.into();
        let object = serde_json::to_string(&*map).unwrap_or_default();
        let json = object
            .strip_prefix('{')
            .and_then(|o| o.strip_suffix('}'))
            .unwrap_or_default()
            .into();
        Self { map, json }
    }

    /// The set's entries.
    pub fn map(&self) -> &Arc<Map<String, Value>> {
        &self.map
    }
}

/// One metadata value, borrowed where it can be: the set's values as they
/// are, a flag's own unpacked from its buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue<'a> {
    /// A value of the set's metadata (or any JSON value).
    Json(&'a Value),
    /// A string.
    Str(&'a str),
    /// A number, as the JSON it came from had it (integer or not).
    Number(Number),
    /// A boolean.
    Bool(bool),
    /// Anything else (metadata is validated to strings, numbers and
    /// booleans, so only a definition built by hand holds one).
    Other(Value),
}

impl MetaValue<'_> {
    /// As a JSON value.
    pub fn to_value(&self) -> Value {
        match self {
            Self::Json(v) => (*v).clone(),
            Self::Str(s) => Value::String((*s).to_owned()),
            Self::Number(n) => Value::Number(n.clone()),
            Self::Bool(b) => Value::Bool(*b),
            Self::Other(v) => v.clone(),
        }
    }
}

impl serde::Serialize for MetaValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Json(v) => v.serialize(s),
            Self::Str(v) => s.serialize_str(v),
            Self::Number(n) => n.serialize(s),
            Self::Bool(b) => s.serialize_bool(*b),
            Self::Other(v) => v.serialize(s),
        }
    }
}

/// Tags of a packed entry's value.
const STR: u8 = b's';
const UINT: u8 = b'u';
const INT: u8 = b'i';
const FLOAT: u8 = b'f';
const TRUE: u8 = b't';
const FALSE: u8 = b'b';
const JSON: u8 = b'j';

/// Header: every key and string can be written into JSON as it is.
const PLAIN: u8 = 1;

/// Whether `text` can stand between JSON quotes as it is.
fn is_plain(text: &str) -> bool {
    text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// A flag's own metadata, packed: a header byte ([`PLAIN`] when no key or
/// string needs escaping in JSON), then each entry, in key order: its
/// key's length (a varint) and bytes, a tag, and the value (a string's
/// length and bytes, eight bytes of a number, nothing for a boolean;
/// anything else as JSON text). No entries: no bytes. Made once when the
/// flag is compiled, read by every answer that carries metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnMetadata(Box<[u8]>);

impl OwnMetadata {
    /// Packs `entries`.
    pub fn new(entries: &Map<String, Value>) -> Self {
        let mut sorted: Vec<(&String, &Value)> = entries.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        if sorted.is_empty() {
            return Self::default();
        }
        let plain = sorted
            .iter()
            .all(|(k, v)| is_plain(k) && v.as_str().is_none_or(is_plain));
        let mut out = vec![if plain { PLAIN } else { 0 }];
        for (key, value) in sorted {
            put_bytes(&mut out, key.as_bytes());
            match value {
                Value::String(s) => {
                    out.push(STR);
                    put_bytes(&mut out, s.as_bytes());
                }
                Value::Bool(true) => out.push(TRUE),
                Value::Bool(false) => out.push(FALSE),
                Value::Number(n) => {
                    if let Some(u) = n.as_u64() {
                        out.push(UINT);
                        out.extend_from_slice(&u.to_le_bytes());
                    } else if let Some(i) = n.as_i64() {
                        out.push(INT);
                        out.extend_from_slice(&i.to_le_bytes());
                    } else {
                        out.push(FLOAT);
                        out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
                    }
                }
                other => {
                    out.push(JSON);
                    put_bytes(&mut out, other.to_string().as_bytes());
                }
            }
        }
        Self(out.into_boxed_slice())
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, in key order.
    pub fn iter(&self) -> OwnEntries<'_> {
        OwnEntries {
            rest: self.0.get(1..).unwrap_or_default(),
        }
    }

    /// Whether an entry has `key`.
    fn has(&self, key: &str) -> bool {
        let mut entries = self.iter();
        while let Some((k, _)) = entries.raw_entry() {
            if k == key.as_bytes() {
                return true;
            }
        }
        false
    }

    /// Writes the entries into a JSON object being written (`first`: no
    /// entry written before them). Plain entries are copied as they are.
    fn write_json(&self, out: &mut Vec<u8>, first: &mut bool) -> serde_json::Result<()> {
        if self.0.first() != Some(&PLAIN) {
            for (k, v) in self.iter() {
                write_entry(out, first, k, &v)?;
            }
            return Ok(());
        }
        let mut entries = self.iter();
        while let Some((key, value)) = entries.raw_entry() {
            separate(out, first);
            out.push(b'"');
            out.extend_from_slice(key);
            out.extend_from_slice(b"\":");
            match value {
                Raw::Str(s) => {
                    out.push(b'"');
                    out.extend_from_slice(s);
                    out.push(b'"');
                }
                Raw::Value(v) => serde_json::to_writer(&mut *out, &v)?,
            }
        }
        Ok(())
    }

    /// The bytes held (for sizing).
    pub fn packed_len(&self) -> usize {
        self.0.len()
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut n = bytes.len();
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(bytes);
}

/// The entries of an [`OwnMetadata`], in key order.
#[derive(Debug, Clone)]
pub struct OwnEntries<'a> {
    rest: &'a [u8],
}

/// A packed value as read for writing: a string's bytes, or the value.
enum Raw<'a> {
    Str(&'a [u8]),
    Value(MetaValue<'a>),
}

fn separate(out: &mut Vec<u8>, first: &mut bool) {
    if !std::mem::take(first) {
        out.push(b',');
    }
}

/// Writes `"key":value` into a JSON object being written, escaped by serde.
fn write_entry(
    out: &mut Vec<u8>,
    first: &mut bool,
    key: &str,
    value: &impl serde::Serialize,
) -> serde_json::Result<()> {
    separate(out, first);
    serde_json::to_writer(&mut *out, key)?;
    out.push(b':');
    serde_json::to_writer(&mut *out, value)
}

impl<'a> OwnEntries<'a> {
    /// The next entry's key and value bytes, not checked as text.
    fn raw_entry(&mut self) -> Option<(&'a [u8], Raw<'a>)> {
        let key = self.bytes()?;
        let value = match self.byte()? {
            STR => Raw::Str(self.bytes()?),
            tag => Raw::Value(self.value(tag)?),
        };
        Some((key, value))
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(head)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let mut n = 0usize;
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            n |= usize::from(b & 0x7f).checked_shl(shift)?;
            if b < 0x80 {
                break;
            }
            shift += 7;
        }
        self.take(n)
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn eight(&mut self) -> Option<[u8; 8]> {
        self.take(8)?.try_into().ok()
    }

    fn entry(&mut self) -> Option<(&'a str, MetaValue<'a>)> {
        let key = self.text()?;
        let tag = self.byte()?;
        Some((key, self.value(tag)?))
    }

    /// The value that follows its `tag`.
    fn value(&mut self, tag: u8) -> Option<MetaValue<'a>> {
        Some(match tag {
            STR => MetaValue::Str(self.text()?),
            TRUE => MetaValue::Bool(true),
            FALSE => MetaValue::Bool(false),
            UINT => MetaValue::Number(u64::from_le_bytes(self.eight()?).into()),
            INT => MetaValue::Number(i64::from_le_bytes(self.eight()?).into()),
            FLOAT => MetaValue::Number(Number::from_f64(f64::from_le_bytes(self.eight()?))?),
            JSON => MetaValue::Other(serde_json::from_str(self.text()?).ok()?),
            _ => return None,
        })
    }
}

impl<'a> Iterator for OwnEntries<'a> {
    type Item = (&'a str, MetaValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let entry = self.entry();
        if entry.is_none() {
            // only this module writes the buffer; a bad one reads as empty
            self.rest = &[];
        }
        entry
    }
}

/// A resolution's metadata: the flag set's, with the flag's own entries
/// over it, merged as they are read (a map merged per flag would cost
/// about 600 bytes however few entries it holds).
#[derive(Debug, Clone, Copy)]
pub struct Metadata<'a> {
    set: &'a Map<String, Value>,
    /// The set's entries as JSON, when written ahead.
    set_json: Option<&'a str>,
    own: Option<&'a OwnMetadata>,
}

impl<'a> Metadata<'a> {
    /// The set's entries under the flag's `own`.
    pub fn new(set: &'a SetMetadata, own: &'a OwnMetadata) -> Self {
        Self {
            set: &set.map,
            set_json: Some(&set.json),
            own: Some(own),
        }
    }

    /// No metadata.
    pub fn empty() -> Metadata<'static> {
        Metadata {
            set: &EMPTY_METADATA,
            set_json: None,
            own: None,
        }
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.own.is_none_or(OwnMetadata::is_empty) && self.set.is_empty()
    }

    /// The flag's own entry for `key`, else the set's.
    pub fn get(&self, key: &str) -> Option<MetaValue<'a>> {
        match self.own_entries().find(|(k, _)| *k == key) {
            Some((_, v)) => Some(v),
            None => self.set.get(key).map(MetaValue::Json),
        }
    }

    fn own_entries(&self) -> OwnEntries<'a> {
        match self.own {
            Some(own) => own.iter(),
            None => OwnEntries { rest: &[] },
        }
    }

    /// Every entry once, in key order (the order of a JSON object and of a
    /// protobuf `Struct`'s map): the flag's own entry where both have a
    /// key. Merges the two sorted sequences; nothing is allocated.
    pub fn iter(&self) -> Entries<'a> {
        Entries {
            set: self.set.iter().peekable(),
            own: self.own_entries().peekable(),
        }
    }

    /// Writes the entries as a JSON object (the set's, then the flag's
    /// own: an object's order means nothing): what answers written as
    /// JSON use, copying a flag's own plain entries as they are.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.push(b'{');
        let mut first = true;
        let overridden = |k: &str| self.own.is_some_and(|own| own.has(k));
        match self.set_json {
            Some(json) if !self.set.keys().any(|k| overridden(k)) => {
                out.extend_from_slice(json.as_bytes());
                first = json.is_empty();
            }
            _ => self.write_set_entries(out, &mut first, overridden)?,
        }
        if let Some(own) = self.own {
            own.write_json(out, &mut first)?;
        }
        out.push(b'}');
        Ok(())
    }

    /// Writes the set's entries that `overridden` does not name.
    fn write_set_entries(
        &self,
        out: &mut Vec<u8>,
        first: &mut bool,
        overridden: impl Fn(&str) -> bool,
    ) -> serde_json::Result<()> {
        for (k, v) in self.set {
            if overridden(k) {
                continue;
            }
            write_entry(out, first, k, v)?;
        }
        Ok(())
    }

    /// As a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_value()))
            .collect()
    }
}

/// The entries of a [`Metadata`], in key order.
#[derive(Clone)]
pub struct Entries<'a> {
    set: std::iter::Peekable<serde_json::map::Iter<'a>>,
    own: std::iter::Peekable<OwnEntries<'a>>,
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a str, MetaValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let from_set = match (self.set.peek(), self.own.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((s, _)), Some((o, _))) => match s.as_str().cmp(o) {
                std::cmp::Ordering::Less => true,
                std::cmp::Ordering::Equal => {
                    // the flag's own entry overrides the set's
                    self.set.next();
                    false
                }
                std::cmp::Ordering::Greater => false,
            },
        };
        if from_set {
            self.set
                .next()
                .map(|(k, v)| (k.as_str(), MetaValue::Json(v)))
        } else {
            self.own.next()
        }
    }
}

impl<'a> From<&'a Map<String, Value>> for Metadata<'a> {
    fn from(set: &'a Map<String, Value>) -> Self {
        Self {
            set,
            set_json: None,
            own: None,
        }
    }
}

impl PartialEq for Metadata<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.to_map() == other.to_map()
    }
}

impl serde::Serialize for Metadata<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_flags_own_entries_override_its_sets_and_each_key_appears_once() {
        let set = object(json!({"team": "web", "tier": 1, "region": "eu"}));
        let own = OwnMetadata::new(&object(json!({"tier": 2, "owner": "ana"})));
        let set_meta = SetMetadata::new(set.clone());
        let m = Metadata::new(&set_meta, &own);
        assert_eq!(m.get("tier"), Some(MetaValue::Number(2.into())));
        assert_eq!(m.get("team"), Some(MetaValue::Json(&json!("web"))));
        assert_eq!(m.get("nope"), None);
        let map = m.to_map();
        assert_eq!(
            Value::Object(map.clone()),
            json!({"team": "web", "tier": 2, "region": "eu", "owner": "ana"})
        );
        // in key order, the override once
        let keys: Vec<&str> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["owner", "region", "team", "tier"]);
        let no_set = SetMetadata::default();
        let own_only = Metadata::new(&no_set, &own);
        assert_eq!(
            own_only.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["owner", "tier"]
        );
        // the set's last key sorts after every own one
        let late = object(json!({"zone": "b"}));
        let late = SetMetadata::new(late);
        let keys: Vec<&str> = Metadata::new(&late, &own).iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["owner", "tier", "zone"]);
        // serialised as that same object
        let text = serde_json::to_string(&m).unwrap_or_default();
        assert_eq!(
            serde_json::from_str::<Value>(&text).ok(),
            Some(Value::Object(map))
        );
        assert!(Metadata::empty().is_empty());
        assert!(Metadata::new(&SetMetadata::default(), &OwnMetadata::default()).is_empty());
        assert!(!Metadata::from(&set).is_empty());
        assert_eq!(Metadata::from(&set).to_map(), set);
    }

    /// Every kind of value reads back as it was written, numbers keeping
    /// whether they were integers, and a long key or string (a length of
    /// more than one varint byte) included.
    #[test]
    fn packed_entries_read_back_as_written() {
        let long = "é".repeat(200);
        let entries = object(json!({
            "s": "text", "empty": "", "t": true, "f": false,
            "u": u64::MAX, "i": -7, "x": 2.5, "zero": 0,
            "n": null, "a": [1, "two"], "o": {"k": 1},
            long.clone(): long.clone(),
        }));
        let own = OwnMetadata::new(&entries);
        let back: Map<String, Value> = own
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_value()))
            .collect();
        assert_eq!(back, entries);
        assert_eq!(
            serde_json::to_string(&Metadata::new(&SetMetadata::default(), &own)).ok(),
            serde_json::to_string(&entries).ok()
        );
        let keys: Vec<&str> = own.iter().map(|(k, _)| k).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        // two short entries pack into a few dozen bytes
        let small = OwnMetadata::new(&object(json!({"owner": "team-3", "ticket": "FLAG-1234"})));
        assert_eq!(
            small.packed_len(),
            1 + (1 + 5 + 1 + 1 + 6) + (1 + 6 + 1 + 1 + 9)
        );
        assert_eq!(OwnMetadata::new(&Map::new()).packed_len(), 0);
    }

    /// Metadata written as JSON is the object of its entries, whether
    /// its text is copied as it is or needs escaping, with the flag's own
    /// entries over the set's.
    #[test]
    fn metadata_written_as_json_is_its_object() {
        let sets = [
            json!({}),
            json!({"flagSetId": "s", "owner": "set", "n": 1.5, "deep": {"a": [1]}}),
            json!({"quote\"d": "line\nbreak"}),
        ];
        let owns = [
            json!({}),
            json!({"owner": "team-3", "ticket": "FLAG-1", "on": true, "n": -2}),
            json!({"owner": "tab\there", "é": "ü"}),
            json!({"back\\slash": "x", "deep": "flat"}),
        ];
        for set in &sets {
            let set = object(set.clone());
            for own in &owns {
                let own = OwnMetadata::new(&object(own.clone()));
                let shared = SetMetadata::new(set.clone());
                // the set's entries written ahead (copied unless one is
                // overridden), and not
                for m in [Metadata::new(&shared, &own), Metadata::from(&set)] {
                    let mut out = Vec::new();
                    m.write_json(&mut out).expect("writes");
                    let written: Value = serde_json::from_slice(&out).expect("JSON");
                    assert_eq!(
                        written,
                        Value::Object(m.to_map()),
                        "{}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }
        }
        let mut out = Vec::new();
        Metadata::empty().write_json(&mut out).expect("writes");
        assert_eq!(out, b"{}");
    }

    /// A damaged buffer reads as the entries before the damage, never
    /// panics.
    #[test]
    fn a_truncated_buffer_ends_the_entries() {
        let own = OwnMetadata::new(&object(json!({"a": "x", "b": 1})));
        for cut in 0..own.0.len() {
            let damaged = OwnMetadata(own.0[..cut].into());
            assert!(damaged.iter().count() <= 2);
        }
        let bad_tag = OwnMetadata(vec![PLAIN, 1, b'k', b'?'].into_boxed_slice());
        assert_eq!(bad_tag.iter().count(), 0);
    }
}
