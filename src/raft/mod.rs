//! Raft plumbing: openraft types, sled storage for the log and state machine, and (in
//! `network`) the peer transport.

pub mod backup;
mod log_store;
mod state_machine;
mod store;
pub mod types;
mod wal;

pub use log_store::LogStore;
pub use state_machine::{Applied, StateMachineStore, StateReader};
pub use store::{DataDir, DataDirError};
pub mod network;
