//! What every flagmesh client needs to reach a server, and nothing of the
//! server: TLS endpoints ([`tls`]), bearer tokens ([`token`]) and the
//! identity model servers share with their callers ([`identity`]). The SDK,
//! `flagctl`, and the subscribers of hubs and PoPs link this crate; it pulls
//! in no HTTP framework, CLI parser or exporter.

pub mod identity;
pub mod tls;
pub mod token;

pub use identity::{Principal, Role};
pub use tls::{ClientTls, TlsError, endpoint};
pub use token::{BearerToken, hash_token};
