//! Nodes started inside the test process, on `127.0.0.1:0` over temporary
//! folders: a control plane with authenticated Admin and Sync clients
//! ([`admin`]), and whole meshes of control, hubs and PoPs with fast
//! heartbeats ([`mesh`]). Cross-process behaviour uses [`crate::topology`].

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod admin;
pub mod mesh;
