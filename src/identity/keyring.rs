//! The replicated signing keyring: HMAC secrets and their lifecycle.
//!
//! ```text
//!   RotateKey          RotateKey              RetireKey
//!  ----------> Active ----------> Validating ----------> Retired (secret erased)
//! ```
//!
//! Exactly one key is active once the keyring is initialised; it signs new certificates.
//! A rotated-out key keeps validating the certificates it signed until it is retired.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Length of generated HMAC secrets, in bytes.
pub const SECRET_LEN: usize = 32;

/// Key material. Never printed: `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// A fresh secret from the operating system's random source.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = vec![0u8; SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Secret(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    /// Signs new certificates and validates old ones.
    Active,
    /// Validates the certificates it signed; signs nothing new.
    Validating,
    /// Validates nothing; its secret has been erased.
    Retired,
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyState::Active => "active",
            KeyState::Validating => "validating",
            KeyState::Retired => "retired",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub state: KeyState,
    /// Unix seconds, as stamped by the proposer of the rotation.
    pub created_at: u64,
    /// `None` once retired.
    pub secret: Option<Secret>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyring {
    keys: BTreeMap<String, Key>,
    active: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KeyringError {
    #[error("no signing key named {0}")]
    NoSuchKey(String),
    #[error("key {0} is the active signing key; rotate before retiring it")]
    RetireActive(String),
    #[error("a signing key must be at least 16 bytes long")]
    SecretTooShort,
    #[error("key id {0} is already in use")]
    DuplicateKeyId(String),
}

impl Keyring {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key that signs new certificates, with its id.
    pub fn active(&self) -> Option<(&str, &Secret)> {
        let id = self.active.as_deref()?;
        let secret = self.keys.get(id)?.secret.as_ref()?;
        Some((id, secret))
    }

    pub fn get(&self, key_id: &str) -> Option<&Key> {
        self.keys.get(key_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Key)> {
        self.keys.iter()
    }

    /// Makes a new key active; the previously active key keeps validating.
    ///
    /// # Errors
    /// The secret is shorter than 16 bytes, or the key id is taken.
    pub fn rotate(&mut self, key_id: String, secret: Secret, now: u64) -> Result<(), KeyringError> {
        if secret.len() < 16 {
            return Err(KeyringError::SecretTooShort);
        }
        if self.keys.contains_key(&key_id) {
            return Err(KeyringError::DuplicateKeyId(key_id));
        }
        if let Some(prev) = self.active.take() {
            if let Some(k) = self.keys.get_mut(&prev) {
                k.state = KeyState::Validating;
            }
        }
        self.keys.insert(
            key_id.clone(),
            Key {
                state: KeyState::Active,
                created_at: now,
                secret: Some(secret),
            },
        );
        self.active = Some(key_id);
        Ok(())
    }

    /// Retires a validating key: its certificates stop validating and its secret is erased.
    /// Retiring a key that is already retired succeeds and changes nothing.
    ///
    /// # Errors
    /// The key does not exist or is the active key.
    pub fn retire(&mut self, key_id: &str) -> Result<(), KeyringError> {
        let key = self
            .keys
            .get_mut(key_id)
            .ok_or_else(|| KeyringError::NoSuchKey(key_id.to_owned()))?;
        if key.state == KeyState::Active {
            return Err(KeyringError::RetireActive(key_id.to_owned()));
        }
        key.state = KeyState::Retired;
        key.secret = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: u8) -> Secret {
        Secret::new(vec![b; 32])
    }

    #[test]
    fn rotation_keeps_old_key_validating_until_retired() {
        let mut k = Keyring::default();
        assert!(k.active().is_none());
        k.rotate("k1".into(), s(1), 10).unwrap();
        assert_eq!(k.active().unwrap().0, "k1");
        k.rotate("k2".into(), s(2), 20).unwrap();
        assert_eq!(k.active().unwrap().0, "k2");
        assert_eq!(k.get("k1").unwrap().state, KeyState::Validating);
        assert_eq!(k.get("k1").unwrap().secret, Some(s(1)));
        assert_eq!(k.retire("k2"), Err(KeyringError::RetireActive("k2".into())));
        k.retire("k1").unwrap();
        assert_eq!(k.get("k1").unwrap().state, KeyState::Retired);
        assert!(k.get("k1").unwrap().secret.is_none());
        k.retire("k1").unwrap();
        assert_eq!(
            k.retire("nope"),
            Err(KeyringError::NoSuchKey("nope".into()))
        );
    }

    #[test]
    fn bad_rotations_change_nothing() {
        let mut k = Keyring::default();
        k.rotate("k1".into(), s(1), 10).unwrap();
        let before = k.clone();
        assert_eq!(
            k.rotate("k2".into(), Secret::new(vec![1; 8]), 11),
            Err(KeyringError::SecretTooShort)
        );
        assert_eq!(
            k.rotate("k1".into(), s(3), 11),
            Err(KeyringError::DuplicateKeyId("k1".into()))
        );
        assert_eq!(k, before);
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut k = Keyring::default();
        k.rotate(
            "k1".into(),
            Secret::new(b"super-secret-value-123".to_vec()),
            1,
        )
        .unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(!shown.contains("115, 117"), "{shown}");
    }
}
