//! `AgentClient`: the agent side of the protocol, with failover.
//!
//! Built with the nodes' addresses and the cluster CA. It claims, validates, registers; it
//! answers the node's pings by itself; when its node goes away it reconnects to another node
//! and registers again with its certificate (backoff with jitter), without the caller doing
//! anything; and it renews its certificate at half its lifetime (a renewal refused
//! `rate_limited` goes again after the node's `retry_after_ms`). A request a node refuses
//! only because the connection is about to close (the node is stopping, or the connection's
//! session ended), which the node did not carry out, goes once more on the next connection.
//! Every claim (and renewal) carries a claim token of its own and goes again with it, on the
//! next connection if need be, while its outcome is unknown: one that was applied is then
//! answered with the certificate it issued (docs/protocol.md, "Sending a claim again").
//! Revocations and releases go again likewise.
//! Refusals carry the node's [`ErrorCode`]: match on it, not on the text.

mod conn;
mod supervisor;

pub use conn::spawn_ping_answerer;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::identity::{Certificate, Invalid};
use crate::proto::agent;
pub use crate::proto::agent::{ErrorCode, Refusal};
use crate::transport::tls;

/// How an [`AgentClient`] behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Node addresses (host:port), tried in turn.
    pub nodes: Vec<String>,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// Name verified in node certificates.
    pub server_name: String,
    /// Longest wait for one answer.
    pub request_timeout: Duration,
    /// First and longest pause between reconnection rounds (jittered, doubling).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Renew the certificate once this fraction of its lifetime has passed.
    pub renew_fraction: f64,
    /// A node that sends nothing for this long is taken for dead and the client moves to
    /// another (the QUIC idle timeout; keep-alives go out every third of it). Shorter moves
    /// sooner after a crash; longer sends fewer keep-alives.
    pub dead_after: Duration,
}

impl ClientConfig {
    pub fn new(nodes: Vec<String>, ca_pem: String) -> Self {
        ClientConfig {
            nodes,
            ca_pem,
            server_name: tls::DEFAULT_SERVER_NAME.to_owned(),
            request_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            renew_fraction: 0.5,
            dead_after: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The node answered `success: false`: its `code` (what a program matches on) and its
    /// `error` text (shown).
    #[error("{0}")]
    Refused(Refusal),
    #[error("no node reachable: {0}")]
    Unreachable(String),
    #[error("request failed: {0}")]
    Failed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no certificate: claim an id or load a certificate first")]
    NoCertificate,
    #[error("certificate file {path}: {reason}")]
    CertificateFile { path: String, reason: String },
    #[error("tls: {0}")]
    Tls(String),
    #[error("client is closed")]
    Closed,
}

/// What the client did on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Registered again after losing its node.
    Reconnected { node: String, session_id: u64 },
    /// Its certificate was renewed.
    Renewed { serial: u64, expires_at: u64 },
    /// The node ended the session for good (taken over elsewhere, or revoked); the client
    /// stops reconnecting.
    SessionLost { reason: String },
    /// Renewal or re-registration failed; the client keeps trying where it makes sense.
    Trouble { error: String },
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub agent_id: String,
    pub session_id: u64,
    pub node_id: u64,
    pub took_over: bool,
}

/// The answer to a validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    pub valid: bool,
    pub agent_id: String,
    /// Why it is not valid, for people ("expired").
    pub reason: Option<String>,
    /// Why it is not valid, for programs (`certificate_expired`); None when it is valid, or
    /// from a node of a build before codes.
    pub code: Option<ErrorCode>,
}

/// What the client keeps registered, to restore it after a failover.
#[derive(Debug, Clone)]
struct Wanted {
    agent_id: String,
    metadata: Map<String, Value>,
}

pub(crate) struct Shared {
    config: ClientConfig,
    conns: conn::Connector,
    certificate: Mutex<Option<Certificate>>,
    wanted: Mutex<Option<Wanted>>,
    session: Mutex<Option<Registration>>,
    events: broadcast::Sender<ClientEvent>,
    shutdown: CancellationToken,
    /// Wakes the renewal task when the certificate changes.
    cert_changed: tokio::sync::Notify,
}

impl Shared {
    fn cert(&self) -> Option<Certificate> {
        self.certificate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_cert(&self, cert: Option<Certificate>) {
        *self.certificate.lock().unwrap_or_else(|e| e.into_inner()) = cert;
        self.cert_changed.notify_one();
    }

    fn emit(&self, e: ClientEvent) {
        let _ = self.events.send(e);
    }

    async fn call(&self, command: &str, fields: Value) -> Result<Map<String, Value>, ClientError> {
        self.conns.call(command, fields).await
    }

    /// Sends a registration on the current connection.
    async fn register_now(
        &self,
        wanted: &Wanted,
        force: bool,
    ) -> Result<Registration, ClientError> {
        let mut f = json!({
            "agent_id": wanted.agent_id,
            "metadata": Value::Object(wanted.metadata.clone()),
            "force_reconnect": force,
        });
        // The held certificate goes along as it is; a certificate for another id is refused
        // by the node with a reason, rather than silently left out here.
        if let Some(c) = self.cert() {
            f["certificate"] =
                serde_json::to_value(c).map_err(|e| ClientError::Protocol(e.to_string()))?;
        }
        let r = self.call(agent::REGISTER_AGENT, f).await?;
        let reg = Registration {
            agent_id: wanted.agent_id.clone(),
            session_id: field_u64(&r, "session_id")?,
            node_id: field_u64(&r, "node_id")?,
            took_over: r.get("took_over").and_then(Value::as_bool).unwrap_or(false),
        };
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(reg.clone());
        Ok(reg)
    }

    /// Sends a claim with a claim token of its own, and sends it again, token and all, while
    /// its outcome is unknown (the connection or the node was lost, or a failover took the
    /// answer): a claim that was applied is then answered with the certificate it issued,
    /// where sending it afresh would find the id "already claimed", by itself.
    async fn claim(&self, mut fields: Value) -> Result<Map<String, Value>, ClientError> {
        fields["claim_token"] = new_claim_token().into();
        self.write_repeatable(agent::CLAIM_AGENT_ID, fields).await.0
    }

    /// Sends a write that is safe to send again as it is (a claim with its token, a
    /// revocation, a release), and sends it again while its outcome is unknown, up to
    /// [`WRITE_ATTEMPTS`] times in all, with backoff. Also says whether an attempt before the
    /// last may have been applied.
    async fn write_repeatable(
        &self,
        command: &str,
        fields: Value,
    ) -> (Result<Map<String, Value>, ClientError>, bool) {
        let mut pause = self.config.reconnect_min;
        let mut attempt = 1;
        loop {
            match self.call(command, fields.clone()).await {
                Err(e) if attempt < WRITE_ATTEMPTS && worth_repeating(&e, attempt > 1) => {
                    tracing::debug!(error = %e, attempt, command, "outcome unknown; sending it again");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return (Err(ClientError::Closed), true),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(self.config.reconnect_max);
                    attempt += 1;
                }
                answer => return (answer, attempt > 1),
            }
        }
    }

    /// Re-claims with the current certificate as proof: a fresh certificate, same id. An
    /// expired certificate proves nothing and is not renewed (claim the id again instead).
    async fn renew(&self) -> Result<Certificate, ClientError> {
        let cert = self.cert().ok_or(ClientError::NoCertificate)?;
        if cert.expires_at <= crate::node::unix_now_f64() as u64 {
            return Err(ClientError::Refused(Refusal::new(
                ErrorCode::CertificateExpired,
                format!("certificate validation failed: {}", Invalid::Expired),
            )));
        }
        let r = self
            .claim(json!({"agent_id": cert.agent_id, "force": true, "certificate": cert}))
            .await?;
        let new = certificate_of(&r)?;
        self.set_cert(Some(new.clone()));
        Ok(new)
    }
}

/// How many times a claim, revocation or release goes out at most while its outcome stays
/// unknown.
const WRITE_ATTEMPTS: u32 = 4;

/// A claim token: 128 random bits as 32 hex digits.
fn new_claim_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Whether a write that failed with `e` may have been applied or may go through if sent
/// again (see [`ErrorCode::worth_repeating`]); a refusal on its merits ("already claimed", a bad
/// certificate) is final. No node reachable means this attempt never went out: worth
/// waiting for a node only if an earlier one (`sent_before`) may have been applied.
fn worth_repeating(e: &ClientError, sent_before: bool) -> bool {
    match e {
        ClientError::Failed(_) => true,
        ClientError::Unreachable(_) => sent_before,
        ClientError::Refused(r) => r.code.worth_repeating(),
        _ => false,
    }
}

fn field_u64(m: &Map<String, Value>, name: &str) -> Result<u64, ClientError> {
    m.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| ClientError::Protocol(format!("answer lacks {name}")))
}

fn certificate_of(m: &Map<String, Value>) -> Result<Certificate, ClientError> {
    let v = m
        .get("certificate")
        .ok_or_else(|| ClientError::Protocol("answer lacks certificate".into()))?;
    agent::parse_certificate(v).map_err(ClientError::Protocol)
}

/// An agent's connection to the cluster. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct AgentClient {
    shared: Arc<Shared>,
}

impl AgentClient {
    /// Connects to the first node of `config.nodes` that answers.
    ///
    /// # Errors
    /// The CA is unusable, or no node could be reached.
    pub async fn connect(config: ClientConfig) -> Result<AgentClient, ClientError> {
        let mut tls = tls::agent_client_config(&config.ca_pem)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        tls.transport_config(tls::agent_transport(
            config.dead_after / 3,
            config.dead_after,
        ));
        let (events, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            conns: conn::Connector::new(&config, tls)?,
            config,
            certificate: Mutex::new(None),
            wanted: Mutex::new(None),
            session: Mutex::new(None),
            events,
            shutdown: CancellationToken::new(),
            cert_changed: tokio::sync::Notify::new(),
        });
        shared.conns.ensure().await?;
        supervisor::spawn(shared.clone());
        Ok(AgentClient { shared })
    }

    /// Events the client handles on its own (reconnections, renewals, lost sessions).
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.shared.events.subscribe()
    }

    /// The address of the node the client is connected to.
    pub fn current_node(&self) -> Option<String> {
        self.shared.conns.current_addr()
    }

    /// The certificate the client holds.
    pub fn certificate(&self) -> Option<Certificate> {
        self.shared.cert()
    }

    /// Uses `cert` for registration, renewal and reconnection from now on.
    pub fn set_certificate(&self, cert: Certificate) {
        self.shared.set_cert(Some(cert));
    }

    /// The current registration, if any.
    pub fn registration(&self) -> Option<Registration> {
        self.shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Claims `agent_id`. With `force`, re-issues the certificate of an id the client holds a
    /// valid certificate for. The new certificate is kept by the client.
    ///
    /// A claim whose outcome is unknown (its connection or node was lost, or the node
    /// answered `outcome_unknown` or `unavailable`) is sent again with the
    /// same claim token, up to four times in all, so this can take up to four
    /// `request_timeout`s; a claim that was applied is answered with its certificate.
    ///
    /// # Errors
    /// [`ClientError::Refused`] with the node's code and reason (e.g.
    /// [`ErrorCode::AlreadyClaimed`], "Agent ID X is already claimed").
    pub async fn claim_agent_id(
        &self,
        agent_id: &str,
        force: bool,
    ) -> Result<Certificate, ClientError> {
        let mut f = json!({"agent_id": agent_id, "force": force});
        // Proof only matters to re-issue a live claim.
        if let Some(c) = self
            .shared
            .cert()
            .filter(|c| force && c.agent_id == agent_id)
        {
            f["certificate"] =
                serde_json::to_value(c).map_err(|e| ClientError::Protocol(e.to_string()))?;
        }
        let r = self.shared.claim(f).await?;
        let cert = certificate_of(&r)?;
        self.shared.set_cert(Some(cert.clone()));
        Ok(cert)
    }

    /// Asks the cluster whether `cert` is valid (a linearizable check).
    ///
    /// # Errors
    /// The cluster could not answer.
    pub async fn validate_certificate(
        &self,
        cert: &Certificate,
    ) -> Result<Validation, ClientError> {
        self.validate_certificate_with(cert, agent::Consistency::Linearizable)
            .await
    }

    /// Like [`AgentClient::validate_certificate`]; `Consistency::Local` asks the connected
    /// node's own tables, without a round trip to the leader (faster, possibly stale).
    ///
    /// # Errors
    /// The cluster could not answer.
    pub async fn validate_certificate_with(
        &self,
        cert: &Certificate,
        consistency: agent::Consistency,
    ) -> Result<Validation, ClientError> {
        let consistency = match consistency {
            agent::Consistency::Linearizable => "linearizable",
            agent::Consistency::Local => "local",
        };
        let r = self
            .shared
            .call(
                agent::VALIDATE_CERTIFICATE,
                json!({"certificate": cert, "consistency": consistency}),
            )
            .await?;
        Ok(Validation {
            valid: r.get("valid").and_then(Value::as_bool).unwrap_or(false),
            agent_id: r
                .get("agent_id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            reason: r.get("reason").and_then(Value::as_str).map(str::to_owned),
            code: r
                .get("code")
                .and_then(Value::as_str)
                .map(|c| ErrorCode::of_answer(Some(c), "")),
        })
    }

    /// Registers `agent_id` on the current node, with `certificate` (or the one the client
    /// holds for that id). From then on the client keeps the registration alive across node
    /// failures.
    ///
    /// # Errors
    /// [`ClientError::Refused`] with the node's reason.
    pub async fn register(
        &self,
        agent_id: &str,
        metadata: Map<String, Value>,
        certificate: Option<Certificate>,
        force_reconnect: bool,
    ) -> Result<Registration, ClientError> {
        if let Some(c) = certificate {
            self.shared.set_cert(Some(c));
        }
        let wanted = Wanted {
            agent_id: agent_id.to_owned(),
            metadata,
        };
        let reg = self.shared.register_now(&wanted, force_reconnect).await?;
        *self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner()) = Some(wanted);
        Ok(reg)
    }

    /// Ends the registration; the client stops keeping it alive.
    ///
    /// # Errors
    /// The node refused or could not be reached.
    pub async fn unregister(&self) -> Result<(), ClientError> {
        let wanted = self
            .shared
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(w) = wanted else { return Ok(()) };
        *self
            .shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.shared
            .call(agent::UNREGISTER_AGENT, json!({"agent_id": w.agent_id}))
            .await
            .map(|_| ())
    }

    /// Renews the certificate now (the client also does this by itself at half its lifetime).
    ///
    /// # Errors
    /// No certificate, or the cluster refused.
    pub async fn renew_certificate(&self) -> Result<Certificate, ClientError> {
        self.shared.renew().await
    }

    /// Revokes `cert`: no node will validate it again. Sent again while its outcome is
    /// unknown, as a claim is (revoking twice succeeds).
    ///
    /// # Errors
    /// The node refused or could not be reached.
    pub async fn revoke_certificate(&self, cert: &Certificate) -> Result<(), ClientError> {
        let fields = json!({"certificate": cert});
        self.shared
            .write_repeatable(agent::REVOKE_CERTIFICATE, fields)
            .await
            .0?;
        self.forget_if_held(cert);
        Ok(())
    }

    /// Gives up the id of `cert`; the certificate is revoked. Sent again while its outcome
    /// is unknown, as a claim is: if the release sent again finds the certificate revoked,
    /// the first one went through (or the certificate was revoked meanwhile): either way it
    /// holds the id no more, and the release succeeds.
    ///
    /// # Errors
    /// The node refused or could not be reached.
    pub async fn release_agent_id(&self, cert: &Certificate) -> Result<(), ClientError> {
        let fields = json!({"agent_id": cert.agent_id, "certificate": cert});
        match self
            .shared
            .write_repeatable(agent::RELEASE_AGENT_ID, fields)
            .await
        {
            (Ok(_), _) => {}
            (Err(ClientError::Refused(r)), true) if r.code == ErrorCode::CertificateRevoked => {
                tracing::debug!("the release sent again found the certificate revoked: done");
            }
            (Err(e), _) => return Err(e),
        }
        self.forget_if_held(cert);
        Ok(())
    }

    /// After the held certificate was revoked or released, the session registered with it
    /// has ended: stop keeping it alive.
    fn forget_if_held(&self, cert: &Certificate) {
        if self.shared.cert().is_some_and(|c| c.serial == cert.serial) {
            self.shared.set_cert(None);
            *self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner()) = None;
            *self
                .shared
                .session
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Pings the current node; returns the round trip.
    ///
    /// # Errors
    /// The node could not be reached.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = std::time::Instant::now();
        self.shared
            .call(
                agent::PING_AGENT,
                json!({"timestamp": crate::node::unix_now_f64()}),
            )
            .await?;
        Ok(start.elapsed())
    }

    /// Writes the held certificate to `path` as JSON (mode 0600 on unix).
    ///
    /// # Errors
    /// No certificate, or the file cannot be written.
    pub fn save_certificate(&self, path: &Path) -> Result<(), ClientError> {
        let cert = self.shared.cert().ok_or(ClientError::NoCertificate)?;
        save_certificate(&cert, path)
    }

    /// Drops the connection without unregistering, as a crash would (tests and demos).
    pub fn abandon(&self) {
        self.shared.shutdown.cancel();
        self.shared.conns.close(0, b"abandoned");
    }

    /// Unregisters (if registered) and closes the connection.
    pub async fn close(self) {
        let _ = tokio::time::timeout(self.shared.config.request_timeout, self.unregister()).await;
        self.shared.shutdown.cancel();
        self.shared.conns.close(0, b"client closed");
        self.shared.conns.wait_idle().await;
    }
}

/// Writes `cert` to `path` as JSON (mode 0600 on unix).
///
/// # Errors
/// The file cannot be written.
pub fn save_certificate(cert: &Certificate, path: &Path) -> Result<(), ClientError> {
    let err = |reason: String| ClientError::CertificateFile {
        path: path.display().to_string(),
        reason,
    };
    let text = serde_json::to_string_pretty(cert).map_err(|e| err(e.to_string()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| err(e.to_string()))
}

/// Reads a certificate saved by [`save_certificate`] (or any JSON certificate object).
///
/// # Errors
/// The file cannot be read or is not a certificate.
pub fn load_certificate(path: &Path) -> Result<Certificate, ClientError> {
    let err = |reason: String| ClientError::CertificateFile {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    agent::parse_certificate(&v).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim goes again while it may have been applied or may yet go through; a refusal
    /// on its merits is final, and so is finding no node before anything went out.
    #[test]
    fn a_claim_goes_again_only_while_its_outcome_is_open() {
        let refused = |code| ClientError::Refused(Refusal::new(code, "text"));
        let failed = ClientError::Failed("connection lost".into());
        let unreachable = ClientError::Unreachable("127.0.0.1:1: timed out".into());
        assert!(worth_repeating(&failed, false));
        assert!(worth_repeating(&refused(ErrorCode::OutcomeUnknown), false));
        assert!(worth_repeating(&refused(ErrorCode::Unavailable), false));
        assert!(!worth_repeating(&unreachable, false), "nothing went out");
        assert!(
            worth_repeating(&unreachable, true),
            "an earlier attempt did"
        );
        for &(code, name) in ErrorCode::ALL {
            if !matches!(code, ErrorCode::OutcomeUnknown | ErrorCode::Unavailable) {
                assert!(!worth_repeating(&refused(code), true), "{name}");
            }
        }
        assert!(!worth_repeating(&refused(ErrorCode::Unrecognized), true));
        assert!(!worth_repeating(&ClientError::Closed, true));
        let token = new_claim_token();
        assert!(agent::is_claim_token(&token), "{token}");
        assert_ne!(token, new_claim_token());
    }
}
