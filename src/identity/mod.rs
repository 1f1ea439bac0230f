//! Certificates and the keyring that signs them. No IO, no clock: callers pass `now`.

mod certificate;
mod keyring;

pub use certificate::{check_agent_id, Certificate, Invalid, CANONICAL_PREFIX, MAX_AGENT_ID_LEN};
pub use keyring::{Key, KeyState, Keyring, KeyringError, Secret, SECRET_LEN};
