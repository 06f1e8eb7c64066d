//! The flagmesh engine: the flag model in the OpenFeature flagd
//! flag-definition format, its validation, the compilation of targeting
//! rules (JsonLogic plus flagd's `fractional`, `sem_ver`, `starts_with`,
//! `ends_with` and `$ref` to shared `$evaluators`) into an evaluator, flag
//! resolution with flagd's reasons and error codes, and the additive state
//! digest used by replication.
//!
//! Pure and synchronous: no I/O, no async runtime.
//!
//! ```
//! use flagmesh_engine::{FlagDocument, CompiledFlagSet, Reason, Strictness};
//!
//! let doc = FlagDocument::parse(r#"{
//!   "flags": {
//!     "new-checkout": {
//!       "state": "ENABLED",
//!       "variants": {"on": true, "off": false},
//!       "defaultVariant": "off",
//!       "targeting": {"if": [{"ends_with": [{"var": "email"}, "@example.com"]}, "on"]}
//!     }
//!   }
//! }"#, Strictness::Strict)?;
//! let set = CompiledFlagSet::from_document(&doc);
//! let ctx = serde_json::json!({"targetingKey": "u1", "email": "ana@example.com"});
//! let r = set.resolve("new-checkout", &ctx);
//! assert_eq!(r.bool_value(), Some(true));
//! assert_eq!(r.reason, Reason::TargetingMatch);
//! # Ok::<(), flagmesh_engine::DocumentError>(())
//! ```

pub mod context;
pub mod definition;
pub mod digest;
pub mod document;
pub mod error;
mod eval;
pub mod flag;
pub mod flag_set;
mod intern;
pub mod metadata;
pub mod ops;
pub mod resolution;
pub mod rule;

pub use context::{targeting_key_text, validate_context};
pub use definition::{FlagDefinition, FlagState, FlagType, escape_pointer};
pub use digest::{StateDigest, flag_hash, flag_set_hash};
pub use document::FlagDocument;
pub use error::{CompileError, DocumentError, ErrorCode, ValidationError, ValidationErrors};
pub use flag::CompiledFlag;
pub use flag_set::CompiledFlagSet;
pub use metadata::{MetaValue, Metadata, OwnMetadata, SetMetadata};
pub use resolution::{Reason, Resolution, ResolutionError, ValueType};
pub use rule::{MAX_RULE_DEPTH, Rule, Strictness, compile};
