//! Agent certificates: what they contain, their canonical bytes, signing and verification.
//!
//! A certificate proves that the cluster issued `agent_id` to its holder until `expires_at`.
//! Its hash and signature cover a fixed binary encoding (below), not a JSON rendering, so a
//! client in any language reproduces the bytes exactly:
//!
//! ```text
//! "agentreg-cert-v1"                 16 bytes, ASCII, no terminator
//! u32 big-endian  len(agent_id)      then agent_id as UTF-8
//! u64 big-endian  serial
//! u64 big-endian  issued_at          Unix seconds
//! u64 big-endian  expires_at         Unix seconds
//! u32 big-endian  len(key_id)        then key_id as UTF-8
//! ```
//!
//! `certificate_hash` is the lowercase hex SHA-256 of those bytes; `signature` is the
//! lowercase hex HMAC-SHA256 of the same bytes under the cluster key named by `key_id`.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::keyring::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Domain separator at the start of the canonical bytes; bump the version if the layout changes.
pub const CANONICAL_PREFIX: &[u8; 16] = b"agentreg-cert-v1";

/// Longest agent id accepted, in bytes.
pub const MAX_AGENT_ID_LEN: usize = 256;

/// A signed statement that `agent_id` belongs to the holder until `expires_at`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub agent_id: String,
    /// Log index of the claim that issued this certificate; it identifies the certificate.
    pub serial: u64,
    #[serde(deserialize_with = "unix_seconds")]
    pub issued_at: u64,
    #[serde(deserialize_with = "unix_seconds")]
    pub expires_at: u64,
    /// Which keyring key signed it.
    pub key_id: String,
    pub certificate_hash: String,
    pub signature: String,
}

impl std::fmt::Debug for Certificate {
    // The signature is a bearer credential: anyone holding it can use the ID, so it never
    // reaches a log line through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("agent_id", &self.agent_id)
            .field("serial", &self.serial)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Why a certificate does not validate. The `Display` text is what agents see after
/// "certificate validation failed: ".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Invalid {
    #[error("expired")]
    Expired,
    #[error("bad signature")]
    BadSignature,
    #[error("issued for another agent")]
    OtherAgent,
    #[error("revoked")]
    Revoked,
    #[error("unknown key")]
    UnknownKey,
    #[error("signing key retired")]
    RetiredKey,
    #[error("superseded by a newer certificate")]
    Superseded,
    #[error("agent id is not claimed")]
    NotClaimed,
}

impl Certificate {
    /// Issues a certificate signed with `secret`.
    pub fn issue(
        agent_id: &str,
        serial: u64,
        issued_at: u64,
        expires_at: u64,
        key_id: &str,
        secret: &Secret,
    ) -> Certificate {
        let bytes = canonical_bytes(agent_id, serial, issued_at, expires_at, key_id);
        Certificate {
            agent_id: agent_id.to_owned(),
            serial,
            issued_at,
            expires_at,
            key_id: key_id.to_owned(),
            certificate_hash: hex::encode(Sha256::digest(&bytes)),
            signature: hex::encode(mac(secret, &bytes).finalize().into_bytes()),
        }
    }

    /// The canonical bytes this certificate's hash and signature cover.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        canonical_bytes(
            &self.agent_id,
            self.serial,
            self.issued_at,
            self.expires_at,
            &self.key_id,
        )
    }

    /// Checks hash and signature against `secret`, in constant time.
    ///
    /// # Errors
    /// [`Invalid::BadSignature`] when any signed field, the hash or the signature was altered.
    pub fn verify_signature(&self, secret: &Secret) -> Result<(), Invalid> {
        let bytes = self.canonical_bytes();
        let hash = Sha256::digest(&bytes);
        let claimed_hash =
            hex::decode(&self.certificate_hash).map_err(|_| Invalid::BadSignature)?;
        if !bool::from(claimed_hash.as_slice().ct_eq(hash.as_slice())) {
            return Err(Invalid::BadSignature);
        }
        let signature = hex::decode(&self.signature).map_err(|_| Invalid::BadSignature)?;
        // `verify_slice` compares in constant time.
        mac(secret, &bytes)
            .verify_slice(&signature)
            .map_err(|_| Invalid::BadSignature)
    }
}

fn mac(secret: &Secret, bytes: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret.expose()).expect("hmac takes any key length");
    mac.update(bytes);
    mac
}

fn canonical_bytes(
    agent_id: &str,
    serial: u64,
    issued_at: u64,
    expires_at: u64,
    key_id: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 4 + agent_id.len() + 24 + 4 + key_id.len());
    out.extend_from_slice(CANONICAL_PREFIX);
    out.extend_from_slice(&(agent_id.len() as u32).to_be_bytes());
    out.extend_from_slice(agent_id.as_bytes());
    out.extend_from_slice(&serial.to_be_bytes());
    out.extend_from_slice(&issued_at.to_be_bytes());
    out.extend_from_slice(&expires_at.to_be_bytes());
    out.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
    out.extend_from_slice(key_id.as_bytes());
    out
}

/// Checks that `agent_id` is usable as an identity: 1 to 256 bytes, no control characters,
/// no leading or trailing whitespace.
///
/// # Errors
/// A human-readable reason.
pub fn check_agent_id(agent_id: &str) -> Result<(), String> {
    if agent_id.is_empty() {
        return Err("agent_id must not be empty".into());
    }
    if agent_id.len() > MAX_AGENT_ID_LEN {
        return Err(format!(
            "agent_id is {} bytes long; at most {MAX_AGENT_ID_LEN} are allowed",
            agent_id.len()
        ));
    }
    if agent_id.chars().any(char::is_control) {
        return Err("agent_id must not contain control characters".into());
    }
    if agent_id.trim() != agent_id {
        return Err("agent_id must not start or end with whitespace".into());
    }
    Ok(())
}

/// Accepts Unix seconds as a JSON integer, or as a float without a fractional part (what
/// clients ported from OpenAgents send), and rejects anything else.
fn unix_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        Int(u64),
        Float(f64),
    }
    // bincode (snapshots, the Raft log) is not self-describing; there the value is a plain u64.
    if !d.is_human_readable() {
        return u64::deserialize(d);
    }
    match Num::deserialize(d)? {
        Num::Int(v) => Ok(v),
        Num::Float(f) if f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64 => Ok(f as u64),
        Num::Float(_) => Err(serde::de::Error::custom(
            "expected whole Unix seconds (a non-negative integer)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(vec![7u8; 32])
    }

    #[test]
    fn canonical_bytes_layout_is_fixed() {
        let c = Certificate::issue("ab", 5, 10, 20, "k1", &secret());
        let mut want = b"agentreg-cert-v1".to_vec();
        want.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        want.extend_from_slice(&5u64.to_be_bytes());
        want.extend_from_slice(&10u64.to_be_bytes());
        want.extend_from_slice(&20u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 2, b'k', b'1']);
        assert_eq!(c.canonical_bytes(), want);
    }

    #[test]
    fn known_answer_vector() {
        // docs/protocol.md quotes these exact values; a change of encoding breaks this test.
        let secret = Secret::new(b"example-secret".to_vec());
        let c = Certificate::issue("my-agent", 42, 1_700_000_000, 1_700_086_400, "k1", &secret);
        assert_eq!(
            hex::encode(c.canonical_bytes()),
            "6167656e747265672d636572742d7631000000086d792d6167656e74000000000000002a\
             000000006553f1000000000065554280000000026b31"
        );
        assert_eq!(
            c.certificate_hash,
            "8de236ebb832b6200627ec854633cd685fbe3ed7b33c2cb8612dc85457579c30"
        );
        assert_eq!(
            c.signature,
            "07398aff83566ddd78a7dac442e25226039d111d2fbeb68c183afeae26acbbd5"
        );
        c.verify_signature(&secret).unwrap();
    }

    #[test]
    fn any_altered_field_breaks_the_signature() {
        let s = secret();
        let good = Certificate::issue("agent-1", 3, 100, 200, "k1", &s);
        good.verify_signature(&s).unwrap();
        let mut variants = Vec::new();
        let mut c = good.clone();
        c.agent_id = "agent-2".into();
        variants.push(c);
        let mut c = good.clone();
        c.serial = 4;
        variants.push(c);
        let mut c = good.clone();
        c.issued_at = 99;
        variants.push(c);
        let mut c = good.clone();
        c.expires_at = 10_000;
        variants.push(c);
        let mut c = good.clone();
        c.key_id = "k2".into();
        variants.push(c);
        let mut c = good.clone();
        c.certificate_hash = "00".repeat(32);
        variants.push(c);
        let mut c = good.clone();
        c.signature = "00".repeat(32);
        variants.push(c);
        let mut c = good.clone();
        c.signature = "not hex".into();
        variants.push(c);
        for v in variants {
            assert_eq!(v.verify_signature(&s), Err(Invalid::BadSignature), "{v:?}");
        }
        assert_eq!(
            good.verify_signature(&Secret::new(vec![8u8; 32])),
            Err(Invalid::BadSignature)
        );
    }

    #[test]
    fn json_accepts_whole_float_seconds_and_rejects_fractions() {
        let c = Certificate::issue("a", 1, 100, 200, "k1", &secret());
        let mut v = serde_json::to_value(&c).unwrap();
        v["issued_at"] = serde_json::json!(100.0);
        let back: Certificate = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, c);
        v["issued_at"] = serde_json::json!(100.5);
        assert!(serde_json::from_value::<Certificate>(v.clone()).is_err());
        v["issued_at"] = serde_json::json!("100");
        assert!(serde_json::from_value::<Certificate>(v).is_err());
    }

    #[test]
    fn debug_never_shows_the_signature() {
        let c = Certificate::issue("a", 1, 100, 200, "k1", &secret());
        let shown = format!("{c:?}");
        assert!(!shown.contains(&c.signature));
        assert!(!shown.contains(&c.certificate_hash));
    }

    #[test]
    fn agent_id_rules() {
        assert!(check_agent_id("my-agent").is_ok());
        assert!(check_agent_id("").is_err());
        assert!(check_agent_id(&"x".repeat(257)).is_err());
        assert!(check_agent_id("a\nb").is_err());
        assert!(check_agent_id(" a").is_err());
    }
}
