//! The flagmesh control plane: the source of truth of the mesh.
//!
//! - [`store`]: flag sets and flags, the global revision and history id,
//!   the change log and the audit trail, behind [`store::FlagStore`]; sled
//!   by default ([`store::SledStore`]).
//! - [`change`]: turning a change request into a commit, for every store.
//! - [`admin`]: the `flagmesh.v1.Admin` gRPC API (validation, optimistic
//!   concurrency, dry-run diffs).
//! - [`validate`]: what the Admin API checks before writing.
//! - [`postgres`]: the store on PostgreSQL, for several active instances.
//! - [`propagation`]: which node has applied which revision.
//! - [`console`]: the web console's page, script and styles.
//! - [`node`]: assembling and running a control node.

pub mod admin;
pub mod change;
pub mod console;
pub mod error;
pub mod node;
pub mod postgres;
pub mod propagation;
pub mod store;
pub mod validate;

pub use error::ControlError;
