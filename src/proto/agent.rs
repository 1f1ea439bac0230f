//! The JSON messages of the agent protocol (ALPN `agentreg/1`), as specified in
//! docs/protocol.md. Requests are parsed field by field so that every error names the field
//! and what was expected; unknown fields are ignored (forward compatibility).
//!
//! ```text
//! {"type":"system_request","command":"claim_agent_id","agent_id":"a","force":false,"request_id":7}
//! {"type":"system_response","command":"claim_agent_id","success":true,"request_id":7,"agent_id":"a","certificate":{...}}
//! {"type":"system_response","command":"claim_agent_id","success":false,"request_id":7,"error":"Agent ID a is already claimed"}
//! ```

use serde_json::{Map, Value};

use crate::identity::{check_agent_id, Certificate, Invalid};

pub const CLAIM_AGENT_ID: &str = "claim_agent_id";
pub const VALIDATE_CERTIFICATE: &str = "validate_certificate";
pub const PING_AGENT: &str = "ping_agent";
pub const REGISTER_AGENT: &str = "register_agent";
pub const UNREGISTER_AGENT: &str = "unregister_agent";
pub const RELEASE_AGENT_ID: &str = "release_agent_id";
pub const REVOKE_CERTIFICATE: &str = "revoke_certificate";

/// The answer to a request that arrives while the node stops; nothing was changed.
pub const SHUTTING_DOWN_ERROR: &str = "node is shutting down; reconnect to another node";

/// The answer to a request that arrives on a connection whose session has ended (taken
/// over, revoked, evicted) while the requests begun before are being answered, just before
/// the connection closes; nothing was changed.
pub const CONNECTION_CLOSING_ERROR: &str =
    "connection closing: its session ended; send the request on a new connection";

/// The close reason of an agent connection a stopping node closed (code 0x103) before
/// reading anything on it: it arrived while the node drained. A request sent on it was not
/// carried out and can go as it is to another node. (Connections the node served close with
/// 0x103 too, but with another reason.)
pub const NOT_SERVED_REASON: &str =
    "node shutting down; nothing on this connection was read; reconnect to another node";

/// Close reason (code 0x103) of the agent connections of a node that stopped because it can
/// no longer write to its disk: a request sent on them and not answered may have been
/// carried out (forwarded to the leader before the fault), so it is an unknown outcome.
pub const FAULT_REASON: &str = "node stopped on a fault; reconnect to another node";

/// How an answer begins when the node lost track of a write: it may or may not have been
/// applied (a failover took the answer).
pub const OUTCOME_UNKNOWN_PREFIX: &str = "write outcome unknown";
/// How an answer begins when the node could not reach a quorum: nothing was applied.
pub const UNAVAILABLE_PREFIX: &str = "cluster unavailable";

/// What kind of refusal a failure answer is: its `code` field, for programs (the `error`
/// text is for people and may be reworded). docs/protocol.md lists every code with what to
/// do about it; new codes may be added, so a client treats one it does not know as final
/// (and a `match` on this enum needs a wildcard arm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is malformed (frame, JSON, a field, an invalid agent id): fix the client.
    BadRequest,
    /// The node does not serve this command (perhaps one of a newer build).
    UnknownCommand,
    AlreadyClaimed,
    /// `force` without a certificate for the id.
    ForceNeedsCertificate,
    /// The id is claimed: register with its certificate.
    CertificateRequired,
    /// Another connection holds the id.
    AlreadyConnected,
    NotClaimed,
    /// Unregister of an id this connection is not (or no longer) registered as.
    NotRegistered,
    /// This connection is registered as another agent.
    ConnectionInUse,
    MetadataTooLarge,
    CertificateExpired,
    CertificateBadSignature,
    CertificateOtherAgent,
    CertificateRevoked,
    CertificateUnknownKey,
    CertificateKeyRetired,
    CertificateSuperseded,
    CertificateNotClaimed,
    /// A brand-new cluster has no signing key yet: retry shortly.
    NoSigningKey,
    /// No quorum: nothing was applied; retry, or try another node.
    Unavailable,
    /// The answer was lost in a failover: the write may or may not have been applied.
    OutcomeUnknown,
    /// The leader could not read the write (a rolling upgrade): nothing was applied.
    NotApplied,
    /// The node is stopping: nothing was done; send the request to another node.
    ShuttingDown,
    /// The connection's session ended: nothing was done; send it on a new connection.
    ConnectionClosing,
    /// The node's clock is too far from its peers' for it to stamp a write or judge a
    /// certificate: nothing was done; send the request to another node.
    ClockSkew,
    /// Too many claims from this address (`[limits]`): nothing was done; wait
    /// `retry_after_ms`.
    RateLimited,
    Internal,
    /// Not sent by nodes: a code this build does not know (from a newer node), or an answer
    /// without one whose text says nothing this build acts on (a node before codes).
    Unrecognized,
}

impl ErrorCode {
    /// Every code nodes send, with its name on the wire.
    pub const ALL: &'static [(ErrorCode, &'static str)] = &[
        (ErrorCode::BadRequest, "bad_request"),
        (ErrorCode::UnknownCommand, "unknown_command"),
        (ErrorCode::AlreadyClaimed, "already_claimed"),
        (ErrorCode::ForceNeedsCertificate, "force_needs_certificate"),
        (ErrorCode::CertificateRequired, "certificate_required"),
        (ErrorCode::AlreadyConnected, "already_connected"),
        (ErrorCode::NotClaimed, "not_claimed"),
        (ErrorCode::NotRegistered, "not_registered"),
        (ErrorCode::ConnectionInUse, "connection_in_use"),
        (ErrorCode::MetadataTooLarge, "metadata_too_large"),
        (ErrorCode::CertificateExpired, "certificate_expired"),
        (
            ErrorCode::CertificateBadSignature,
            "certificate_bad_signature",
        ),
        (ErrorCode::CertificateOtherAgent, "certificate_other_agent"),
        (ErrorCode::CertificateRevoked, "certificate_revoked"),
        (ErrorCode::CertificateUnknownKey, "certificate_unknown_key"),
        (ErrorCode::CertificateKeyRetired, "certificate_key_retired"),
        (ErrorCode::CertificateSuperseded, "certificate_superseded"),
        (ErrorCode::CertificateNotClaimed, "certificate_not_claimed"),
        (ErrorCode::NoSigningKey, "no_signing_key"),
        (ErrorCode::Unavailable, "unavailable"),
        (ErrorCode::OutcomeUnknown, "outcome_unknown"),
        (ErrorCode::NotApplied, "not_applied"),
        (ErrorCode::ShuttingDown, "shutting_down"),
        (ErrorCode::ConnectionClosing, "connection_closing"),
        (ErrorCode::ClockSkew, "clock_skew"),
        (ErrorCode::RateLimited, "rate_limited"),
        (ErrorCode::Internal, "internal"),
    ];

    /// The code's name on the wire (`Unrecognized` has none; it reads "unrecognized").
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("unrecognized", |(_, name)| name)
    }

    /// The code of a failure answer: its `code` field, or for an answer without one (a node
    /// of a build before codes) what its `error` text says, as far as a client acts on it.
    pub fn of_answer(code: Option<&str>, error: &str) -> ErrorCode {
        match code {
            Some(name) => Self::ALL
                .iter()
                .find(|(_, n)| *n == name)
                .map_or(ErrorCode::Unrecognized, |(c, _)| *c),
            None if error.starts_with(OUTCOME_UNKNOWN_PREFIX) => ErrorCode::OutcomeUnknown,
            None if error.starts_with(UNAVAILABLE_PREFIX) => ErrorCode::Unavailable,
            None if error == SHUTTING_DOWN_ERROR => ErrorCode::ShuttingDown,
            None if error == CONNECTION_CLOSING_ERROR => ErrorCode::ConnectionClosing,
            None => ErrorCode::Unrecognized,
        }
    }

    /// The code for a certificate that does not validate.
    pub fn of_invalid(why: Invalid) -> ErrorCode {
        match why {
            Invalid::Expired => ErrorCode::CertificateExpired,
            Invalid::BadSignature => ErrorCode::CertificateBadSignature,
            Invalid::OtherAgent => ErrorCode::CertificateOtherAgent,
            Invalid::Revoked => ErrorCode::CertificateRevoked,
            Invalid::UnknownKey => ErrorCode::CertificateUnknownKey,
            Invalid::RetiredKey => ErrorCode::CertificateKeyRetired,
            Invalid::Superseded => ErrorCode::CertificateSuperseded,
            Invalid::NotClaimed => ErrorCode::CertificateNotClaimed,
        }
    }

    /// Whether the refusal is about the certificate the request carried (it does not
    /// validate): a client holding it should claim afresh or use a newer one.
    pub fn is_certificate(self) -> bool {
        matches!(
            self,
            ErrorCode::CertificateExpired
                | ErrorCode::CertificateBadSignature
                | ErrorCode::CertificateOtherAgent
                | ErrorCode::CertificateRevoked
                | ErrorCode::CertificateUnknownKey
                | ErrorCode::CertificateKeyRetired
                | ErrorCode::CertificateSuperseded
                | ErrorCode::CertificateNotClaimed
        )
    }

    /// Whether the request was not carried out only because its connection is about to
    /// close: it can be sent again as it is on another connection.
    pub fn refused_for_closing(self) -> bool {
        matches!(self, ErrorCode::ShuttingDown | ErrorCode::ConnectionClosing)
    }

    /// Whether a refused write that is safe to send again as it is (a claim with its claim
    /// token, a revocation, a release) is worth sending again: its outcome is unknown, or the
    /// cluster had no quorum for it yet. A claim sent again is answered with the certificate
    /// it issued if it was applied.
    pub fn worth_repeating(self) -> bool {
        matches!(self, ErrorCode::OutcomeUnknown | ErrorCode::Unavailable)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure answer: its code, and the text people read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub error: String,
    /// How long to wait before sending the request again (`rate_limited`), milliseconds.
    pub retry_after_ms: Option<u64>,
}

impl Refusal {
    pub fn new(code: ErrorCode, error: impl Into<String>) -> Refusal {
        Refusal {
            code,
            error: error.into(),
            retry_after_ms: None,
        }
    }

    /// The refusal, saying when the request may be sent again.
    #[must_use]
    pub fn retry_after(mut self, wait: std::time::Duration) -> Refusal {
        // Rounded up: an agent that waits as long as it is told is not refused again.
        self.retry_after_ms = Some(wait.as_micros().div_ceil(1000) as u64);
        self
    }
}

/// A request that cannot be read is a bad request.
impl From<String> for Refusal {
    fn from(error: String) -> Refusal {
        Refusal::new(ErrorCode::BadRequest, error)
    }
}

/// Every command a node serves.
pub const COMMANDS: &[&str] = &[
    CLAIM_AGENT_ID,
    VALIDATE_CERTIFICATE,
    PING_AGENT,
    REGISTER_AGENT,
    UNREGISTER_AGENT,
    RELEASE_AGENT_ID,
    REVOKE_CERTIFICATE,
];

/// Shortest and longest claim token: at least 16 characters, so that a random one cannot be
/// guessed (the client library sends 32 hex digits, 128 random bits).
pub const CLAIM_TOKEN_MIN: usize = 16;
pub const CLAIM_TOKEN_MAX: usize = 128;

/// Whether `t` has the shape of a claim token: 16 to 128 visible ASCII characters.
pub fn is_claim_token(t: &str) -> bool {
    (CLAIM_TOKEN_MIN..=CLAIM_TOKEN_MAX).contains(&t.len())
        && t.bytes().all(|b| b.is_ascii_graphic())
}

/// A parsed request of the agent protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentRequest {
    ClaimAgentId {
        agent_id: String,
        force: bool,
        certificate: Option<Certificate>,
        /// The claimant's secret for this claim: the same claim sent again with it gets the
        /// same certificate (see `Op::ClaimWithToken`).
        claim_token: Option<String>,
    },
    ValidateCertificate {
        certificate: Certificate,
        consistency: Consistency,
    },
    PingAgent {
        /// Echoed back verbatim.
        timestamp: Value,
    },
    RegisterAgent {
        agent_id: String,
        metadata: Map<String, Value>,
        certificate: Option<Certificate>,
        force_reconnect: bool,
    },
    UnregisterAgent {
        agent_id: String,
    },
    ReleaseAgentId {
        certificate: Certificate,
    },
    RevokeCertificate {
        certificate: Certificate,
    },
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// After a read-index barrier: reflects every write acknowledged before the request
    /// (the default; what makes a revocation effective everywhere at once).
    #[default]
    Linearizable,
    /// From this node's applied tables, with no round trip: may miss writes acknowledged
    /// elsewhere moments ago (like etcd's serializable reads).
    Local,
}

/// A request as far as it could be read: `command` and `request_id` are kept whenever the
/// bytes were a JSON object, so an error answer can still echo them.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub command: Option<String>,
    pub request_id: Option<Value>,
    pub request: Result<AgentRequest, Refusal>,
}

/// Parses one request frame. Never panics, whatever the bytes.
pub fn parse_request(bytes: &[u8]) -> Envelope {
    let mut env = Envelope {
        command: None,
        request_id: None,
        request: Err(Refusal::from(String::new())),
    };
    let obj = match parse_object(bytes) {
        Ok(o) => o,
        Err(e) => {
            env.request = Err(e.into());
            return env;
        }
    };
    env.command = obj
        .get("command")
        .and_then(Value::as_str)
        .map(str::to_owned);
    env.request = match obj.get("request_id") {
        None | Some(Value::Null) => Ok(()),
        Some(v @ (Value::String(_) | Value::Number(_))) => {
            env.request_id = Some(v.clone());
            Ok(())
        }
        Some(_) => Err("field request_id must be a string or a number"
            .to_owned()
            .into()),
    }
    .and_then(|()| parse_fields(&obj));
    env
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "request is not valid UTF-8".to_owned())?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(other) => Err(format!(
            "request must be a JSON object, not {}",
            kind(&other)
        )),
        Err(e) => Err(format!("request is not valid JSON: {e}")),
    }
}

fn parse_fields(obj: &Map<String, Value>) -> Result<AgentRequest, Refusal> {
    match obj.get("type") {
        Some(Value::String(t)) if t == "system_request" => {}
        Some(Value::String(t)) => {
            return Err(format!("field type must be \"system_request\", not {t:?}").into())
        }
        Some(other) => {
            return Err(format!("field type must be a string, not {}", kind(other)).into())
        }
        None => {
            return Err("missing field type (expected \"system_request\")"
                .to_owned()
                .into())
        }
    }
    let command = match obj.get("command") {
        Some(Value::String(c)) => c.as_str(),
        Some(other) => {
            return Err(format!("field command must be a string, not {}", kind(other)).into())
        }
        None => return Err("missing field command".to_owned().into()),
    };
    let f = Fields(obj);
    Ok(match command {
        CLAIM_AGENT_ID => AgentRequest::ClaimAgentId {
            agent_id: f.agent_id()?,
            force: f.bool_or("force", false)?,
            certificate: f.certificate_opt()?,
            claim_token: f.claim_token_opt()?,
        },
        VALIDATE_CERTIFICATE => AgentRequest::ValidateCertificate {
            certificate: f.certificate()?,
            consistency: match obj.get("consistency") {
                None | Some(Value::Null) => Consistency::Linearizable,
                Some(Value::String(c)) if c == "linearizable" => Consistency::Linearizable,
                Some(Value::String(c)) if c == "local" => Consistency::Local,
                Some(Value::String(c)) => {
                    return Err(format!(
                        "field consistency must be \"linearizable\" or \"local\", not {c:?}"
                    )
                    .into())
                }
                Some(other) => {
                    return Err(
                        format!("field consistency must be a string, not {}", kind(other)).into(),
                    )
                }
            },
        },
        PING_AGENT => {
            let timestamp = match obj.get("timestamp") {
                Some(v @ Value::Number(_)) => v.clone(),
                Some(other) => {
                    return Err(
                        format!("field timestamp must be a number, not {}", kind(other)).into(),
                    )
                }
                None => return Err("missing field timestamp".to_owned().into()),
            };
            AgentRequest::PingAgent { timestamp }
        }
        REGISTER_AGENT => AgentRequest::RegisterAgent {
            agent_id: f.agent_id()?,
            metadata: match obj.get("metadata") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(other) => {
                    return Err(
                        format!("field metadata must be an object, not {}", kind(other)).into(),
                    )
                }
            },
            certificate: f.certificate_opt()?,
            force_reconnect: f.bool_or("force_reconnect", false)?,
        },
        UNREGISTER_AGENT => AgentRequest::UnregisterAgent {
            agent_id: f.agent_id()?,
        },
        RELEASE_AGENT_ID => {
            let certificate = f.certificate()?;
            if let Some(id) = obj.get("agent_id") {
                if id.as_str() != Some(certificate.agent_id.as_str()) {
                    return Err(Refusal::new(
                        ErrorCode::CertificateOtherAgent,
                        format!("certificate validation failed: {}", Invalid::OtherAgent),
                    ));
                }
            }
            AgentRequest::ReleaseAgentId { certificate }
        }
        REVOKE_CERTIFICATE => AgentRequest::RevokeCertificate {
            certificate: f.certificate()?,
        },
        other => {
            return Err(Refusal::new(
                ErrorCode::UnknownCommand,
                format!("unknown command {other:?} (known: {})", COMMANDS.join(", ")),
            ))
        }
    })
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn agent_id(&self) -> Result<String, String> {
        let id = match self.0.get("agent_id") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(format!(
                    "field agent_id must be a string, not {}",
                    kind(other)
                ))
            }
            None => return Err("missing field agent_id".to_owned()),
        };
        check_agent_id(&id)?;
        Ok(id)
    }

    fn bool_or(&self, name: &str, default: bool) -> Result<bool, String> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!(
                "field {name} must be true or false, not {}",
                kind(other)
            )),
        }
    }

    fn claim_token_opt(&self) -> Result<Option<String>, String> {
        match self.0.get("claim_token") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) if is_claim_token(t) => Ok(Some(t.clone())),
            Some(Value::String(_)) => Err(format!(
                "field claim_token must be {CLAIM_TOKEN_MIN} to {CLAIM_TOKEN_MAX} visible ASCII characters"
            )),
            Some(other) => Err(format!(
                "field claim_token must be a string, not {}",
                kind(other)
            )),
        }
    }

    fn certificate_opt(&self) -> Result<Option<Certificate>, String> {
        match self.0.get("certificate") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => parse_certificate(v).map(Some),
        }
    }

    fn certificate(&self) -> Result<Certificate, String> {
        self.certificate_opt()?
            .ok_or_else(|| "missing field certificate".to_owned())
    }
}

/// Reads a certificate object.
///
/// # Errors
/// Which field is missing or malformed.
pub fn parse_certificate(v: &Value) -> Result<Certificate, String> {
    if !v.is_object() {
        return Err(format!(
            "field certificate must be an object, not {}",
            kind(v)
        ));
    }
    serde_json::from_value(v.clone()).map_err(|e| format!("certificate is malformed: {e}"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn response(
    command: Option<&str>,
    request_id: Option<&Value>,
    success: bool,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("type".into(), "system_response".into());
    if let Some(c) = command {
        m.insert("command".into(), c.into());
    }
    m.insert("success".into(), success.into());
    if let Some(id) = request_id {
        m.insert("request_id".into(), id.clone());
    }
    m
}

/// A successful response carrying `fields`.
pub fn ok_response(
    command: &str,
    request_id: Option<&Value>,
    fields: Map<String, Value>,
) -> Vec<u8> {
    let mut m = response(Some(command), request_id, true);
    m.extend(fields);
    Value::Object(m).to_string().into_bytes()
}

/// A failed response with its `code` and `error` text.
pub fn error_response(
    command: Option<&str>,
    request_id: Option<&Value>,
    refusal: &Refusal,
) -> Vec<u8> {
    let mut m = response(command, request_id, false);
    m.insert("code".into(), refusal.code.as_str().into());
    m.insert("error".into(), refusal.error.as_str().into());
    if let Some(ms) = refusal.retry_after_ms {
        m.insert("retry_after_ms".into(), ms.into());
    }
    Value::Object(m).to_string().into_bytes()
}

/// Builds a request (used by clients and by nodes pinging agents).
pub fn request(command: &str, request_id: Option<Value>, fields: Map<String, Value>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("type".into(), "system_request".into());
    m.insert("command".into(), command.into());
    if let Some(id) = request_id {
        m.insert("request_id".into(), id);
    }
    m.extend(fields);
    Value::Object(m).to_string().into_bytes()
}

/// Reads a response: it must be a `system_response` object. Returns the object, whether it
/// succeeded or not (look at `success` and `error`).
///
/// # Errors
/// The bytes are not a response object.
pub fn parse_response(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    let obj = parse_object(bytes)?;
    if obj.get("type").and_then(Value::as_str) != Some("system_response") {
        return Err("answer is not a system_response".to_owned());
    }
    if !obj.get("success").is_some_and(Value::is_boolean) {
        return Err("answer lacks a boolean success field".to_owned());
    }
    Ok(obj)
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
