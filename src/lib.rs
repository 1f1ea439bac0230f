//! agentreg: a clustered registry of agent identities.
//!
//! See ARCHITECTURE.md for the bird's-eye view and the code map.

// openraft's `StorageError` is large, and its storage traits fix it as our error type.
#![allow(clippy::result_large_err)]

pub mod cli;
pub mod client;
pub mod config;
pub mod identity;
pub mod node;
pub mod proto;
pub mod raft;
pub mod registry;
pub mod transport;
