//! The registry state machine: four tables and the deterministic `apply` over them.
//!
//! Apply reads nothing but its arguments and the tables: no clock (time is the command's
//! `at`), no randomness (secrets arrive in the command), no IO. Every node that applies the
//! same log therefore holds the same tables.

use imbl::{OrdMap, OrdSet};

use serde::{Deserialize, Serialize};

use super::command::{
    ClaimArgs, Command, ConnRef, Op, Outcome, RegistryError, Response, SessionRef, TokenHash,
};
use crate::identity::{check_agent_id, Certificate, Invalid, Keyring, Secret};

/// Longest certificate lifetime a claim may ask for: ten years.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
/// Largest session metadata accepted, in bytes of JSON text.
pub const MAX_METADATA_LEN: usize = 16 * 1024;
/// Revocations are dropped this long after the certificate expired, so that a node whose
/// clock runs behind the proposer's still finds the revocation; expired claims are forgotten
/// after as long ([`Op::ForgetExpiredClaims`]), so that `claims list` still shows them for a
/// while.
pub const EXPIRY_GRACE_SECS: u64 = 3600;
/// Most claims one [`Op::ForgetExpiredClaims`] forgets, so that applying it holds up the
/// writes behind it for about a millisecond however many claims have expired.
pub const MAX_FORGOTTEN_PER_COMMAND: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Id the claim was given when applied (see [`Tables::next_id`]); the serial of the
    /// certificate it issued.
    pub serial: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    pub key_id: String,
    pub certificate_hash: String,
}

/// The claim token a live claim was made with (see [`Op::ClaimWithToken`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimToken {
    /// Serial of the claim it was sent with: the token counts only while that claim is the
    /// id's current one.
    pub serial: u64,
    pub hash: TokenHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Id the registration was given when applied: the fencing token of this session.
    pub session_id: u64,
    pub conn: ConnRef,
    /// JSON text, as the agent sent it.
    pub metadata: String,
    pub registered_at: u64,
    /// Serial of the certificate the session registered with, if any.
    pub cert_serial: Option<u64>,
}

impl Session {
    pub fn as_ref(&self) -> SessionRef {
        SessionRef {
            session_id: self.session_id,
            conn: self.conn,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub agent_id: String,
    pub revoked_at: u64,
    /// When the revoked certificate would have expired; the entry is kept until then.
    pub expires_at: u64,
}

/// The replicated tables, exactly as a snapshot carries them.
///
/// The maps are persistent B-trees (`imbl::OrdMap`): a clone shares them and costs next to
/// nothing, and a write after it copies only the nodes on its path. A snapshot clones the
/// tables while apply waits; with `std`'s maps that clone copied every claim, and at a few
/// hundred thousand claims it held up every write for about 100 ms (the tail of the claims
/// benchmark). They encode exactly as `std`'s `BTreeMap`s did (a length, then the entries in
/// key order), so snapshots, backups and digests are unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    pub claims: OrdMap<String, Claim>,
    pub sessions: OrdMap<String, Session>,
    pub revocations: OrdMap<u64, Revocation>,
    pub keyring: Keyring,
    /// The id the next applied command gets, unless its log index is higher: certificate
    /// serials, session ids and key ids. A command's id is `max(next_id, log index)`, so a
    /// log entry holding one command gives it its log index, and one holding a batch gives
    /// its commands consecutive ids; ids strictly increase along the log either way.
    pub next_id: u64,
    /// The claim token of each claim made with one, by agent id; an entry leaves with its
    /// claim. Last, so that the fields before it encode as they did before it existed.
    pub claim_tokens: OrdMap<String, ClaimToken>,
}

impl Tables {
    /// Hex SHA-256 of the tables' canonical (bincode) encoding. Two nodes that applied the
    /// same log prefix report the same digest, so `agentreg status` can show that the
    /// replicas agree (like etcd's `hashkv`). Signing keys are 256-bit random values, so the
    /// digest reveals nothing about them.
    ///
    /// Tables with no claim token digest as they did before claim tokens existed, so that
    /// nodes of both builds holding the same tables show the same digest mid-upgrade.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let config = bincode::config::standard();
        let before_tokens = (
            &self.claims,
            &self.sessions,
            &self.revocations,
            &self.keyring,
            self.next_id,
        );
        let mut bytes =
            bincode::serde::encode_to_vec(before_tokens, config).expect("the tables always encode");
        if !self.claim_tokens.is_empty() {
            bytes.extend(
                bincode::serde::encode_to_vec(&self.claim_tokens, config)
                    .expect("the tables always encode"),
            );
        }
        hex::encode(Sha256::digest(bytes))
    }
}

/// Table sizes, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSizes {
    pub claims: usize,
    pub sessions: usize,
    pub revocations: usize,
    pub keys: usize,
}

/// The tables plus indexes derived from them (rebuilt on load, never serialised). Each index
/// is a function of the tables alone, so a node that loaded a snapshot and one that applied
/// the log up to it hold the same indexes, and forget the same claims.
#[derive(Debug, Clone, Default)]
pub struct RegistryState {
    tables: Tables,
    /// (expires_at, serial) of every revocation, to drop them in order.
    revocation_expiry: OrdSet<(u64, u64)>,
    /// (expires_at, agent_id) of every claim that no session holds ([`Tables::holds`]): the
    /// claims [`Op::ForgetExpiredClaims`] may forget, in the order they expire.
    claim_expiry: OrdSet<(u64, String)>,
}

impl Tables {
    /// Whether `claim`, the claim of `agent_id`, is held: the id's session registered with its
    /// certificate. A held claim is never forgotten, expired or not, so that revoking the id
    /// still ends that session.
    fn holds(&self, agent_id: &str, claim: &Claim) -> bool {
        self.sessions
            .get(agent_id)
            .is_some_and(|s| s.cert_serial == Some(claim.serial))
    }
}

impl RegistryState {
    pub fn from_tables(tables: Tables) -> Self {
        let revocation_expiry = tables
            .revocations
            .iter()
            .map(|(serial, r)| (r.expires_at, *serial))
            .collect();
        let claim_expiry = tables
            .claims
            .iter()
            .filter(|(id, c)| !tables.holds(id, c))
            .map(|(id, c)| (c.expires_at, id.clone()))
            .collect();
        RegistryState {
            tables,
            revocation_expiry,
            claim_expiry,
        }
    }

    /// When the claim that expires first among those no session holds expires: none is
    /// forgotten before this plus [`EXPIRY_GRACE_SECS`].
    pub fn first_unheld_expiry(&self) -> Option<u64> {
        self.claim_expiry.get_min().map(|(at, _)| *at)
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    pub fn sizes(&self) -> TableSizes {
        TableSizes {
            claims: self.tables.claims.len(),
            sessions: self.tables.sessions.len(),
            revocations: self.tables.revocations.len(),
            keys: self.tables.keyring.len(),
        }
    }

    pub fn claim(&self, agent_id: &str) -> Option<&Claim> {
        self.tables.claims.get(agent_id)
    }

    pub fn session(&self, agent_id: &str) -> Option<&Session> {
        self.tables.sessions.get(agent_id)
    }

    pub fn keyring(&self) -> &Keyring {
        &self.tables.keyring
    }

    /// Validates `cert` at time `now`: known key, intact signature, not expired, not revoked,
    /// and still the current certificate of its id's claim.
    ///
    /// # Errors
    /// The first reason it is not valid.
    pub fn validate(&self, cert: &Certificate, now: u64) -> Result<(), Invalid> {
        self.check_signature(cert)?;
        if now >= cert.expires_at {
            return Err(Invalid::Expired);
        }
        if self.tables.revocations.contains_key(&cert.serial) {
            return Err(Invalid::Revoked);
        }
        match self.tables.claims.get(&cert.agent_id) {
            None => Err(Invalid::NotClaimed),
            Some(c) if c.serial != cert.serial => Err(Invalid::Superseded),
            Some(_) => Ok(()),
        }
    }

    /// [`validate`](Self::validate), and the certificate must be for `agent_id`.
    ///
    /// # Errors
    /// [`Invalid::OtherAgent`] first, then whatever `validate` finds.
    pub fn validate_for(
        &self,
        cert: &Certificate,
        agent_id: &str,
        now: u64,
    ) -> Result<(), Invalid> {
        if cert.agent_id != agent_id {
            return Err(Invalid::OtherAgent);
        }
        self.validate(cert, now)
    }

    fn check_signature(&self, cert: &Certificate) -> Result<(), Invalid> {
        let key = self
            .tables
            .keyring
            .get(&cert.key_id)
            .ok_or(Invalid::UnknownKey)?;
        let secret = key.secret.as_ref().ok_or(Invalid::RetiredKey)?;
        cert.verify_signature(secret)
    }

    /// Every id issued so far is at most this, every later one is above it (`applied_index`
    /// is the index of the last applied log entry).
    pub fn last_issued_id(&self, applied_index: u64) -> u64 {
        applied_index.max(self.tables.next_id.saturating_sub(1))
    }

    /// Applies the command of log entry `index`; a batch applies its commands in order and
    /// answers each. A refusal leaves every table unchanged.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        if let Op::Batch(cmds) = &cmd.op {
            let answers = cmds
                .iter()
                .map(|c| match c.op {
                    Op::Batch(_) => Err(RegistryError::NestedBatch),
                    _ => self.apply(index, c),
                })
                .collect();
            return Ok(Outcome::Batch(answers));
        }
        let at = cmd.at;
        let id = self.tables.next_id.max(index);
        let result = match &cmd.op {
            Op::Claim(claim) => self.claim_id(id, at, claim, None),
            Op::ClaimWithToken { claim, token } => self.claim_id(id, at, claim, Some(token)),
            Op::Release { certificate, .. } => self.release(at, certificate),
            Op::Register {
                agent_id,
                conn,
                metadata,
                certificate,
                force_reconnect,
                allow_uncertified_takeover,
            } => self.register(
                id,
                at,
                agent_id,
                *conn,
                metadata,
                certificate.as_ref(),
                *force_reconnect && *allow_uncertified_takeover,
            ),
            Op::Unregister {
                agent_id,
                session_id,
            }
            | Op::Evict {
                agent_id,
                session_id,
            } => Ok(Outcome::SessionEnded {
                ended: self.end_session(agent_id, *session_id).map(|s| s.as_ref()),
            }),
            Op::EvictNode {
                node_id,
                max_session_id,
            } => Ok(self.evict_node(*node_id, *max_session_id)),
            Op::RevokeCertificate { certificate, .. } => self.revoke_certificate(at, certificate),
            Op::RevokeAgent { agent_id } => self.revoke_agent(at, agent_id),
            Op::InitKeyring { secret } => self.init_keyring(id, at, secret),
            Op::RotateKey { secret } => {
                let key_id = format!("k{id}");
                self.tables
                    .keyring
                    .rotate(key_id.clone(), secret.clone(), at)
                    .map(|()| Outcome::KeyRotated { key_id })
                    .map_err(RegistryError::Keyring)
            }
            Op::Batch(_) => unreachable!("batches are applied above"),
            Op::ForgetExpiredClaims => Ok(self.forget_expired_claims(at)),
            Op::RetireKey { key_id } => self
                .tables
                .keyring
                .retire(key_id)
                .map(|()| Outcome::KeyRetired {
                    key_id: key_id.clone(),
                })
                .map_err(RegistryError::Keyring),
        };
        // Only a command that issued the id uses it up: anything else leaves the tables as
        // they were.
        if matches!(
            result,
            Ok(Outcome::Claimed { .. }
                | Outcome::Registered { .. }
                | Outcome::KeyringInitialized { created: true, .. }
                | Outcome::KeyRotated { .. })
        ) {
            self.tables.next_id = id + 1;
        }
        self.drop_expired_revocations(at);
        result
    }

    fn claim_id(
        &mut self,
        id: u64,
        at: u64,
        claim: &ClaimArgs,
        token: Option<&TokenHash>,
    ) -> Response {
        let ClaimArgs {
            agent_id,
            ttl_secs,
            force,
            proof,
            conn,
        } = claim;
        let (ttl_secs, force, conn, proof) = (*ttl_secs, *force, *conn, proof.as_ref());
        check_agent_id(agent_id).map_err(RegistryError::InvalidAgentId)?;
        if ttl_secs == 0 || ttl_secs > MAX_TTL_SECS {
            return Err(RegistryError::BadTtl);
        }
        let live = self
            .tables
            .claims
            .get(agent_id)
            .filter(|c| c.expires_at > at);
        // The same claim again (its answer was lost): the certificate it issued, before
        // anything else is looked at (a re-issue's proof is superseded by then).
        if let (Some(c), Some(token)) = (live, token) {
            let made_with = self.tables.claim_tokens.get(agent_id);
            if made_with.is_some_and(|t| t.serial == c.serial && t.hash == *token) {
                return self.repeat_claim(agent_id, c);
            }
        }
        // A certificate sent along is always checked, even for a free id: a bad one is
        // refused, not silently ignored.
        if let Some(proof) = proof {
            self.validate_for(proof, agent_id, at)
                .map_err(RegistryError::Certificate)?;
        }
        if live.is_some() {
            if !force {
                return Err(RegistryError::AlreadyClaimed {
                    agent_id: agent_id.to_owned(),
                });
            }
            if proof.is_none() {
                return Err(RegistryError::ForceWithoutProof {
                    agent_id: agent_id.to_owned(),
                });
            }
        } else if let Some(s) = self.tables.sessions.get(agent_id) {
            // Free (or expired) id, but someone is connected under it: only that connection
            // may claim it.
            if conn != Some(s.conn) {
                return Err(RegistryError::AlreadyConnected {
                    agent_id: agent_id.to_owned(),
                    node_id: s.conn.node_id,
                });
            }
        }
        let (key_id, secret) = self
            .tables
            .keyring
            .active()
            .ok_or(RegistryError::NoSigningKey)?;
        let certificate = Certificate::issue(agent_id, id, at, at + ttl_secs, key_id, secret);
        let was = self.claim_expiry_of(agent_id);
        self.tables.claims.insert(
            agent_id.to_owned(),
            Claim {
                serial: id,
                issued_at: at,
                expires_at: certificate.expires_at,
                key_id: key_id.to_owned(),
                certificate_hash: certificate.certificate_hash.clone(),
            },
        );
        match token {
            Some(&hash) => {
                let token = ClaimToken { serial: id, hash };
                self.tables.claim_tokens.insert(agent_id.to_owned(), token);
            }
            None => {
                self.tables.claim_tokens.remove(agent_id);
            }
        }
        self.reindex(agent_id, was);
        Ok(Outcome::Claimed { certificate })
    }

    /// The certificate `claim` issued, signed again (the same bytes: signing is
    /// deterministic). Refused if its key has been retired since: it would not validate.
    fn repeat_claim(&self, agent_id: &str, claim: &Claim) -> Response {
        let secret = self
            .tables
            .keyring
            .get(&claim.key_id)
            .and_then(|k| k.secret.as_ref())
            .ok_or(RegistryError::Certificate(Invalid::RetiredKey))?;
        let certificate = Certificate::issue(
            agent_id,
            claim.serial,
            claim.issued_at,
            claim.expires_at,
            &claim.key_id,
            secret,
        );
        debug_assert_eq!(certificate.certificate_hash, claim.certificate_hash);
        Ok(Outcome::ClaimRepeated { certificate })
    }

    fn release(&mut self, at: u64, cert: &Certificate) -> Response {
        self.validate(cert, at)
            .map_err(RegistryError::Certificate)?;
        let ended = self.revoke_serial(at, &cert.agent_id, cert.serial, cert.expires_at);
        Ok(Outcome::Released {
            serial: cert.serial,
            ended,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        id: u64,
        at: u64,
        agent_id: &str,
        conn: ConnRef,
        metadata: &str,
        certificate: Option<&Certificate>,
        uncertified_takeover: bool,
    ) -> Response {
        check_agent_id(agent_id).map_err(RegistryError::InvalidAgentId)?;
        if metadata.len() > MAX_METADATA_LEN {
            return Err(RegistryError::MetadataTooLarge(metadata.len()));
        }
        let claimed = self
            .tables
            .claims
            .get(agent_id)
            .is_some_and(|c| c.expires_at > at);
        let existing = self.tables.sessions.get(agent_id).map(Session::as_ref);
        let cert_serial = match certificate {
            // A certificate is always checked, even for an unclaimed id: a bad one is refused
            // rather than silently ignored.
            Some(cert) => {
                self.validate_for(cert, agent_id, at)
                    .map_err(RegistryError::Certificate)?;
                Some(cert.serial)
            }
            None if claimed => {
                return Err(RegistryError::CertificateRequired {
                    agent_id: agent_id.to_owned(),
                })
            }
            None => {
                if let Some(s) = existing {
                    if s.conn != conn && !uncertified_takeover {
                        return Err(RegistryError::AlreadyConnected {
                            agent_id: agent_id.to_owned(),
                            node_id: s.conn.node_id,
                        });
                    }
                }
                None
            }
        };
        self.tables.sessions.insert(
            agent_id.to_owned(),
            Session {
                session_id: id,
                conn,
                metadata: metadata.to_owned(),
                registered_at: at,
                cert_serial,
            },
        );
        self.reindex(agent_id, self.claim_expiry_of(agent_id));
        Ok(Outcome::Registered {
            session_id: id,
            replaced: existing.filter(|s| s.conn != conn),
        })
    }

    /// Removes the session of `agent_id` if its id is still `session_id` (the fence).
    fn end_session(&mut self, agent_id: &str, session_id: u64) -> Option<Session> {
        match self.tables.sessions.get(agent_id) {
            Some(s) if s.session_id == session_id => {
                let ended = self.tables.sessions.remove(agent_id);
                self.reindex(agent_id, self.claim_expiry_of(agent_id));
                ended
            }
            _ => None,
        }
    }

    fn evict_node(&mut self, node_id: u64, max_session_id: u64) -> Outcome {
        let doomed: Vec<(String, SessionRef)> = self
            .tables
            .sessions
            .iter()
            .filter(|(_, s)| s.conn.node_id == node_id && s.session_id <= max_session_id)
            .map(|(id, s)| (id.clone(), s.as_ref()))
            .collect();
        for (id, _) in &doomed {
            self.tables.sessions.remove(id);
            self.reindex(id, self.claim_expiry_of(id));
        }
        Outcome::NodeEvicted { removed: doomed }
    }

    fn revoke_certificate(&mut self, at: u64, cert: &Certificate) -> Response {
        // Holding an intact certificate is the authority to revoke it, even once expired or
        // superseded.
        self.check_signature(cert)
            .map_err(RegistryError::Certificate)?;
        if self.tables.revocations.contains_key(&cert.serial) {
            return Ok(Outcome::Revoked {
                serial: cert.serial,
                newly: false,
                ended: None,
            });
        }
        let ended = self.revoke_serial(at, &cert.agent_id, cert.serial, cert.expires_at);
        Ok(Outcome::Revoked {
            serial: cert.serial,
            newly: true,
            ended,
        })
    }

    fn revoke_agent(&mut self, at: u64, agent_id: &str) -> Response {
        let claim = self
            .tables
            .claims
            .get(agent_id)
            .ok_or_else(|| RegistryError::NotClaimed {
                agent_id: agent_id.to_owned(),
            })?;
        let (serial, expires_at) = (claim.serial, claim.expires_at);
        let ended = self.revoke_serial(at, agent_id, serial, expires_at);
        Ok(Outcome::Revoked {
            serial,
            newly: true,
            ended,
        })
    }

    /// Records the revocation of `serial`; frees the id if it was its current certificate and
    /// ends the session that registered with it. Returns that session.
    fn revoke_serial(
        &mut self,
        at: u64,
        agent_id: &str,
        serial: u64,
        expires_at: u64,
    ) -> Option<(String, SessionRef)> {
        self.tables.revocations.insert(
            serial,
            Revocation {
                agent_id: agent_id.to_owned(),
                revoked_at: at,
                expires_at,
            },
        );
        self.revocation_expiry.insert((expires_at, serial));
        let was = self.claim_expiry_of(agent_id);
        if self
            .tables
            .claims
            .get(agent_id)
            .is_some_and(|c| c.serial == serial)
        {
            self.tables.claims.remove(agent_id);
            self.tables.claim_tokens.remove(agent_id);
        }
        let session = self
            .tables
            .sessions
            .get(agent_id)
            .filter(|s| s.cert_serial == Some(serial))
            .map(Session::as_ref);
        if session.is_some() {
            self.tables.sessions.remove(agent_id);
        }
        self.reindex(agent_id, was);
        Some((agent_id.to_owned(), session?))
    }

    fn init_keyring(&mut self, id: u64, at: u64, secret: &Secret) -> Response {
        if let Some((key_id, _)) = self.tables.keyring.active() {
            return Ok(Outcome::KeyringInitialized {
                key_id: key_id.to_owned(),
                created: false,
            });
        }
        let key_id = format!("k{id}");
        self.tables
            .keyring
            .rotate(key_id.clone(), secret.clone(), at)
            .map_err(RegistryError::Keyring)?;
        Ok(Outcome::KeyringInitialized {
            key_id,
            created: true,
        })
    }

    /// Forgets claims whose certificates expired more than [`EXPIRY_GRACE_SECS`] before
    /// `at` and that no session holds, the earliest first, at most
    /// [`MAX_FORGOTTEN_PER_COMMAND`]. A forgotten claim was already free to claim: what goes
    /// is its row (and its claim token), which every id ever claimed would otherwise keep.
    fn forget_expired_claims(&mut self, at: u64) -> Outcome {
        let due = |e: &(u64, String)| e.0.saturating_add(EXPIRY_GRACE_SECS) < at;
        let mut forgotten = 0;
        while forgotten < MAX_FORGOTTEN_PER_COMMAND && self.claim_expiry.get_min().is_some_and(due)
        {
            let Some((_, agent_id)) = self.claim_expiry.remove_min() else {
                break;
            };
            self.tables.claims.remove(&agent_id);
            self.tables.claim_tokens.remove(&agent_id);
            forgotten += 1;
        }
        Outcome::ClaimsForgotten {
            forgotten: forgotten as u64,
            more: self.claim_expiry.get_min().is_some_and(due),
        }
    }

    fn claim_expiry_of(&self, agent_id: &str) -> Option<u64> {
        self.tables.claims.get(agent_id).map(|c| c.expires_at)
    }

    /// Brings [`Self::claim_expiry`] up to date for `agent_id` after its claim or session
    /// changed; `was` is when its claim expired before the change.
    fn reindex(&mut self, agent_id: &str, was: Option<u64>) {
        if let Some(expires_at) = was {
            self.claim_expiry.remove(&(expires_at, agent_id.to_owned()));
        }
        if let Some(c) = self.tables.claims.get(agent_id) {
            if !self.tables.holds(agent_id, c) {
                self.claim_expiry
                    .insert((c.expires_at, agent_id.to_owned()));
            }
        }
    }

    fn drop_expired_revocations(&mut self, at: u64) {
        while let Some(&(expires_at, serial)) = self.revocation_expiry.get_min() {
            if expires_at.saturating_add(EXPIRY_GRACE_SECS) >= at {
                break;
            }
            self.revocation_expiry.remove_min();
            self.tables.revocations.remove(&serial);
        }
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
