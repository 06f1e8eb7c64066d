//! The flagmesh Rust SDK: what services link against to get flag values.
//!
//! - [`RemoteClient`]: evaluates through PoPs (nearest first) with a
//!   deadline per call, failover to the next PoP on `UNAVAILABLE` or a missed
//!   deadline, and a circuit breaker per PoP. Typed calls always return the
//!   caller's default, with a reason, when nothing can answer.
//! - [`LocalClient`]: follows a PoP's (or hub's) replication stream and
//!   evaluates in-process with the flagmesh engine (optionally persisting
//!   the state so a restarted service evaluates before it reconnects).
//! - [`FlagmeshProvider`]: both modes as an OpenFeature `FeatureProvider`.
//! - [`bootstrap`]: every flag for one context as JSON for a web page.
//!
//! ```no_run
//! use flagmesh_sdk::{RemoteClient, RemoteConfig};
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), flagmesh_sdk::RemoteError> {
//! let mut config = RemoteConfig::new(vec!["10.0.0.7:7443".into(), "10.0.1.7:7443".into()]);
//! config.flag_set = "storefront".into();
//! let flags = RemoteClient::new(config)?;
//! let ctx = json!({"targetingKey": "user-42", "email": "ana@example.com"});
//! let checkout = flags.bool_value("new-checkout", &ctx, false).await;
//! if checkout.value {
//!     // new checkout
//! }
//! println!("{} because {}", checkout.value, checkout.reason);
//! # Ok(())
//! # }
//! ```

pub mod bootstrap;
pub mod details;
pub mod local;
pub mod provider;
pub mod remote;

pub use bootstrap::{bootstrap, script_tag};
pub use details::{Details, FromJson};
pub use local::{LocalClient, LocalConfig, LocalError};
pub use provider::{FlagmeshProvider, ProviderEvent, ProviderEvents};
pub use remote::{BreakerState, RemoteClient, RemoteConfig, RemoteError};
