//! What every flagmesh server shares, and nothing of what any one of them
//! serves: credentials and the access layer, TLS on listeners, limits,
//! configuration, telemetry, metrics exposition, and the [`NodeBuilder`]
//! that assembles control planes, hubs and PoPs alike.
//!
//! - [`credentials`]: tokens and who may present them.
//! - [`policy`]: what each method asks of its caller (declared by the node).
//! - [`access`], [`http_access`]: enforcing that on gRPC and HTTP.
//! - [`json_gateway`]: unary gRPC methods over HTTP with JSON, through the
//!   same access layer.
//! - [`tls`], [`limits`], [`security`]: listeners' TLS and per-client limits.
//! - [`config`]: one rule for every option (command line over environment
//!   over `--config` file).
//! - [`node`]: the builder; [`process`]: runtime, ready line, signals.
//! - [`metrics`], [`telemetry`]: `/metrics`, logs and traces.

pub mod access;
pub mod config;
pub mod credentials;
pub mod http_access;
pub mod json_gateway;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod process;
pub mod security;
pub mod telemetry;
pub mod tls;

pub use node::{NodeBuilder, NodeError, Readiness, RunningNode};
pub use policy::{AccessPolicy, MethodPolicy, Requirement, ServicePolicy};
pub use security::Security;
