//! flagd's operators beyond standard JsonLogic.

pub mod fractional;
pub mod semver;
