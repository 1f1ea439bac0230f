//! The replicated registry: commands, their results, and the state machine that applies them.

mod command;
mod state;

pub use command::{
    ClaimArgs, Command, ConnRef, EndCause, Op, Outcome, RegistryError, Response, SessionEnd,
    SessionRef, TokenHash, LOG_FORMAT,
};
pub use state::{
    Claim, ClaimToken, RegistryState, Revocation, Session, TableSizes, Tables, EXPIRY_GRACE_SECS,
    MAX_METADATA_LEN, MAX_TTL_SECS,
};
