//! agentreg: a clustered registry of agent identities.
//!
//! See ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod identity;
pub mod raft;
pub mod registry;
pub mod transport;
