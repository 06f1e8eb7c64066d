//! A compiled flag: its definition, its targeting compiled once, and its
//! metadata merged with the flag set's, ready to resolve for any context.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::definition::{FlagDefinition, FlagState, FlagType};
use crate::error::{CompileError, ErrorCode};
use crate::intern::Interner;
use crate::metadata::{Metadata, OwnMetadata, SetMetadata};
use crate::resolution::{Reason, Resolution, ValueType};
use crate::rule::{self, Rule, Strictness};

/// Compiled targeting, shared between flags with the same rule.
static RULES: std::sync::LazyLock<Interner<Rule>> = std::sync::LazyLock::new(Interner::new);
/// Variants, shared between flags with the same ones.
static VARIANTS: std::sync::LazyLock<Interner<Variants>> = std::sync::LazyLock::new(Interner::new);

/// A flag's variants, in a small slice.
type Variants = Box<[(Box<str>, Value)]>;

/// A flag ready to evaluate. It keeps only what resolving needs: the
/// compiled rule (not the rule's JSON), the variants in a small slice, and
/// the metadata (the flag set's, shared, under the flag's own few entries).
#[derive(Debug, Clone)]
pub struct CompiledFlag {
    /// The key (shared with whoever holds the flag by it).
    key: Arc<str>,
    state: FlagState,
    flag_type: FlagType,
    /// Shared by every flag with the same variants.
    variants: Arc<Variants>,
    /// Index of the default variant in `variants`.
    default_variant: Option<u32>,
    /// `Ok(None)`: no targeting; `Err`: the targeting does not compile and
    /// every resolution fails with `PARSE_ERROR`.
    /// Shared by every flag with the same targeting.
    rule: Result<Option<Arc<Rule>>, Box<CompileError>>,
    /// The flag set's metadata (shared by its flags).
    set_metadata: Arc<SetMetadata>,
    /// The flag's own metadata (over the set's), packed.
    own_metadata: OwnMetadata,
}

impl CompiledFlag {
    /// Compiles a definition. `set_metadata` is merged under the flag's own
    /// metadata. Targeting that does not compile does not fail here: the
    /// flag then resolves with `PARSE_ERROR` (definitions are validated
    /// strictly before they are stored, so this happens only to documents
    /// loaded leniently).
    pub fn new(key: &str, definition: FlagDefinition, set_metadata: &Map<String, Value>) -> Self {
        let set_metadata = Arc::new(SetMetadata::new(set_metadata.clone()));
        Self::with_shared_metadata(key.into(), definition, &set_metadata)
    }

    /// Like [`CompiledFlag::new`], keeping `key` and the flag set's
    /// metadata shared with their other holders.
    pub fn with_shared_metadata(
        key: Arc<str>,
        definition: FlagDefinition,
        set_metadata: &Arc<SetMetadata>,
    ) -> Self {
        let flag_type = definition.flag_type();
        let FlagDefinition {
            state,
            variants,
            default_variant,
            targeting,
            metadata: own,
            ..
        } = definition;
        let rule = match &targeting {
            None => Ok(None),
            Some(t) => rule::compile(t, Strictness::Lenient)
                .map(|r| Some(RULES.share(t, r)))
                .map_err(Box::new),
        };
        let shared: Variants = variants
            .iter()
            .map(|(k, v)| (k.as_str().into(), v.clone()))
            .collect();
        let variants = VARIANTS.share(&variants, shared);
        let default_variant = default_variant
            .and_then(|d| variants.iter().position(|(k, _)| **k == *d))
            .and_then(|i| u32::try_from(i).ok());
        Self {
            key,
            state,
            flag_type,
            variants,
            default_variant,
            rule,
            set_metadata: set_metadata.clone(),
            own_metadata: OwnMetadata::new(&own),
        }
    }

    /// The flag key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The type of the flag's values.
    pub fn flag_type(&self) -> FlagType {
        self.flag_type
    }

    /// Whether this flag holds `set`'s very copy of the set's metadata.
    #[cfg(test)]
    pub(crate) fn holds_set_metadata(&self, set: &Arc<SetMetadata>) -> bool {
        Arc::ptr_eq(&self.set_metadata, set)
    }

    /// The metadata: the flag set's under the flag's own.
    pub fn metadata(&self) -> Metadata<'_> {
        Metadata::new(&self.set_metadata, &self.own_metadata)
    }

    /// Resolves the flag for `context` (a JSON object; `targetingKey` is
    /// read from it).
    pub fn resolve<'a>(&'a self, context: &'a Value) -> Resolution<'a> {
        if self.state == FlagState::Disabled {
            return Resolution {
                value: None,
                variant: None,
                reason: Reason::Disabled,
                error: None,
                metadata: self.metadata(),
            };
        }
        let rule = match &self.rule {
            // without a default variant the caller's default applies: DEFAULT
            Ok(None) if self.default_variant.is_none() => {
                return self.default_variant(Reason::Default);
            }
            Ok(None) => return self.default_variant(Reason::Static),
            Ok(Some(rule)) => rule,
            Err(e) => {
                return Resolution::error(
                    ErrorCode::ParseError,
                    format!("targeting does not compile: {e}"),
                    self.metadata(),
                );
            }
        };
        if !matches!(context, Value::Object(_) | Value::Null) {
            return Resolution::error(
                ErrorCode::InvalidContext,
                "the evaluation context must be a JSON object",
                self.metadata(),
            );
        }
        let outcome = rule.evaluate(context, &self.key);
        let name: &str = match outcome.as_ref() {
            Value::Null => return self.default_variant(Reason::Default),
            Value::Bool(true) => "true",
            Value::Bool(false) => "false",
            Value::String(s) if s.is_empty() => return self.default_variant(Reason::Default),
            Value::String(s) => s,
            other => {
                return Resolution::error(
                    ErrorCode::General,
                    format!("targeting returned {other}, which is not a variant name"),
                    self.metadata(),
                );
            }
        };
        match self.variants.iter().find(|(k, _)| **k == *name) {
            Some((variant, value)) => Resolution {
                value: Some(value),
                variant: Some(variant),
                reason: Reason::TargetingMatch,
                error: None,
                metadata: self.metadata(),
            },
            None => Resolution::error(
                ErrorCode::General,
                format!("targeting selected variant \"{name}\", which the flag does not have"),
                self.metadata(),
            ),
        }
    }

    /// Resolves the flag expecting a value of type `expected`; a flag of
    /// another type resolves with `TYPE_MISMATCH`.
    pub fn resolve_typed<'a>(&'a self, context: &'a Value, expected: ValueType) -> Resolution<'a> {
        let flag_type = self.flag_type;
        let compatible = match expected {
            ValueType::Any => true,
            ValueType::Bool => flag_type == FlagType::Bool,
            ValueType::String => flag_type == FlagType::String,
            ValueType::Int | ValueType::Float => flag_type == FlagType::Number,
            ValueType::Object => flag_type == FlagType::Object,
        };
        if !compatible {
            return Resolution::error(
                ErrorCode::TypeMismatch,
                format!(
                    "flag \"{}\" is a {} flag, not {expected:?}",
                    self.key,
                    flag_type.name()
                ),
                self.metadata(),
            );
        }
        self.resolve(context).expect_type(expected)
    }

    fn default_variant(&self, reason: Reason) -> Resolution<'_> {
        let found = self
            .default_variant
            .and_then(|i| self.variants.get(usize::try_from(i).ok()?));
        Resolution {
            value: found.map(|(_, v)| v),
            variant: found.map(|(k, _)| &**k),
            reason,
            error: None,
            metadata: self.metadata(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flag(raw: Value) -> CompiledFlag {
        let def = FlagDefinition::from_json("f", &raw, &Map::new(), Strictness::Lenient)
            .expect("valid flag");
        CompiledFlag::new("f", def, &Map::new())
    }

    fn keyed(key: &str, raw: &Value) -> CompiledFlag {
        let def = FlagDefinition::from_json(key, raw, &Map::new(), Strictness::Lenient)
            .expect("valid flag");
        CompiledFlag::new(key, def, &Map::new())
    }

    fn variants_for(flag: &CompiledFlag) -> Vec<String> {
        (0..300)
            .map(|i| {
                let ctx = json!({"targetingKey": format!("user-{i}"), "country": "NL"});
                flag.resolve(&ctx).variant.unwrap_or("-").to_owned()
            })
            .collect()
    }

    #[test]
    fn flags_with_the_same_targeting_share_it_and_still_answer_as_themselves() {
        let rollout = json!({"state": "ENABLED", "variants": {"on": true, "off": false},
            "defaultVariant": "off", "targeting": {"if": [{"==": [{"var": "country"}, "NL"]},
            {"fractional": [["on", 30], ["off", 70]]}, "off"]}});
        // each flag alone (nothing else holds the rule meanwhile)
        let alone_a = variants_for(&keyed("rollout-a", &rollout));
        let alone_b = variants_for(&keyed("rollout-b", &rollout));
        // both at once: one compiled rule, bucketed by each flag's own key
        let (a, b) = (keyed("rollout-a", &rollout), keyed("rollout-b", &rollout));
        let (Ok(Some(ra)), Ok(Some(rb))) = (&a.rule, &b.rule) else {
            panic!("both compile")
        };
        assert!(Arc::ptr_eq(ra, rb), "the same targeting is held once");
        assert!(Arc::ptr_eq(&a.variants, &b.variants));
        assert_eq!(variants_for(&a), alone_a);
        assert_eq!(variants_for(&b), alone_b);
        assert_ne!(alone_a, alone_b, "the flag key takes part in bucketing");
        // a different rule is not confused with it
        let mut other = rollout.clone();
        other["targeting"]["if"][0]["=="][1] = json!("DE");
        let c = keyed("rollout-a", &other);
        let Ok(Some(rc)) = &c.rule else {
            panic!("compiles")
        };
        assert!(!Arc::ptr_eq(ra, rc));
        assert!(variants_for(&c).iter().all(|v| v == "off"));
    }

    #[test]
    fn unknown_variant_from_targeting_is_a_general_error() {
        let f = flag(
            json!({"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {"var": "v"}}),
        );
        let ctx = json!({"v": "zzz"});
        assert_eq!(f.resolve(&ctx).error_code(), Some(ErrorCode::General));
        let ctx = json!({"v": "a"});
        assert_eq!(f.resolve(&ctx).reason, Reason::TargetingMatch);
    }

    #[test]
    fn malformed_context_is_invalid_context() {
        let f = flag(
            json!({"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {"var": "v"}}),
        );
        let ctx = json!([1]);
        assert_eq!(
            f.resolve(&ctx).error_code(),
            Some(ErrorCode::InvalidContext)
        );
    }

    #[test]
    fn int_request_on_fractional_number_is_a_type_mismatch() {
        let f = flag(json!({"state": "ENABLED", "variants": {"a": 0.5}, "defaultVariant": "a"}));
        let ctx = json!({});
        assert_eq!(
            f.resolve_typed(&ctx, ValueType::Int).error_code(),
            Some(ErrorCode::TypeMismatch)
        );
        assert_eq!(
            f.resolve_typed(&ctx, ValueType::Float).float_value(),
            Some(0.5)
        );
        assert_eq!(
            f.resolve_typed(&ctx, ValueType::String).error_code(),
            Some(ErrorCode::TypeMismatch)
        );
    }
}
