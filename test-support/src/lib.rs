//! Test support that needs no node: locating the flagd test kit shipped in
//! the crates.io package `open-feature-flagd` 0.3.0 ([`flagd_kit`]) and an
//! allocation-counting global allocator ([`counting`]). The engine's tests
//! use it without building any server code.

pub mod counting;
pub mod flagd_kit;
