//! The client's connection to one node at a time, the requests on it, and the ping answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{ClientConfig, ClientError};
use crate::proto::agent::{self, AgentRequest, ErrorCode, Refusal};
use crate::transport::frame::{read_stream_frame, write_frame, MAX_AGENT_FRAME};

/// Longest wait for one node's handshake before trying the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Connector {
    endpoint: quinn::Endpoint,
    tls: quinn::ClientConfig,
    nodes: Vec<String>,
    server_name: String,
    timeout: Duration,
    /// Index into `nodes` of the current connection, and the connection.
    current: tokio::sync::Mutex<Option<(usize, quinn::Connection)>>,
    /// Mirror of the current connection for synchronous readers.
    latest: std::sync::Mutex<Option<(usize, quinn::Connection)>>,
    next_request: AtomicU64,
}

impl Connector {
    pub(crate) fn new(
        config: &ClientConfig,
        tls: quinn::ClientConfig,
    ) -> Result<Self, ClientError> {
        if config.nodes.is_empty() {
            return Err(ClientError::Unreachable("no node addresses given".into()));
        }
        let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address"))
            .map_err(|e| ClientError::Unreachable(format!("cannot open a UDP socket: {e}")))?;
        Ok(Connector {
            endpoint,
            tls,
            nodes: config.nodes.clone(),
            server_name: config.server_name.clone(),
            timeout: config.request_timeout,
            current: tokio::sync::Mutex::new(None),
            latest: std::sync::Mutex::new(None),
            next_request: AtomicU64::new(1),
        })
    }

    pub(crate) fn current_addr(&self) -> Option<String> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest
            .as_ref()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(i, _)| self.nodes[*i].clone())
    }

    /// The current connection, if it is open.
    pub(crate) fn current(&self) -> Option<quinn::Connection> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest.as_ref().map(|(_, c)| c.clone())
    }

    /// The open connection, or a new one to the next node that answers (starting after the
    /// one that was lost).
    pub(crate) async fn ensure(&self) -> Result<quinn::Connection, ClientError> {
        let mut current = self.current.lock().await;
        if let Some((_, c)) = current.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let start = current.as_ref().map_or(0, |(i, _)| i + 1);
        let mut failures = Vec::new();
        for k in 0..self.nodes.len() {
            let i = (start + k) % self.nodes.len();
            let addr = &self.nodes[i];
            match self.dial(addr).await {
                Ok(conn) => {
                    tracing::debug!(node = %addr, "connected");
                    spawn_ping_answerer(conn.clone());
                    *current = Some((i, conn.clone()));
                    *self.latest.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((i, conn.clone()));
                    return Ok(conn);
                }
                Err(e) => {
                    tracing::debug!(node = %addr, error = %e, "cannot connect");
                    failures.push(format!("{addr}: {e}"));
                }
            }
        }
        Err(ClientError::Unreachable(failures.join("; ")))
    }

    async fn dial(&self, addr: &str) -> Result<quinn::Connection, String> {
        let sock = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("resolves to no address")?;
        let connecting = self
            .endpoint
            .connect_with(self.tls.clone(), sock, &self.server_name)
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no handshake within {CONNECT_TIMEOUT:?}")),
        }
    }

    /// Sends one request; returns the response object of a successful answer. A request the
    /// node did not carry out because the connection is about to close (the node is
    /// stopping, or the connection's session ended) or because the node's clock is off goes
    /// again, once, on the next connection, all within the request timeout.
    pub(crate) async fn call(
        &self,
        command: &str,
        fields: Value,
    ) -> Result<Map<String, Value>, ClientError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let conn = self.ensure().await?;
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let fields = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let bytes = agent::request(command, Some(json!(id)), fields);
        match self.exchange(&conn, &bytes, id, deadline).await {
            // The node was draining or full when this connection arrived and closed it unread.
            Err(ClientError::Failed(_)) if closed_unread(&conn) => {
                tracing::debug!("the node closed the connection unread (stopping or full); sending the request on the next connection");
                let conn = self.ensure().await?;
                self.exchange(&conn, &bytes, id, deadline).await
            }
            Err(ClientError::Refused(e)) if e.code.refused_for_closing() => {
                tracing::debug!(error = %e, "request not carried out; sending it on the next connection");
                if tokio::time::timeout_at(deadline, conn.closed())
                    .await
                    .is_err()
                {
                    return Err(ClientError::Refused(e));
                }
                let conn = self.ensure().await?;
                self.exchange(&conn, &bytes, id, deadline).await
            }
            // The node's clock is off: it does nothing until it is put right, and another
            // node may serve. The connection is given up (its session too: the client
            // registers again where it reconnects), and the request goes once more.
            Err(ClientError::Refused(e)) if e.code == ErrorCode::ClockSkew => {
                tracing::warn!(error = %e, "the node refused for its clock; moving to the next node");
                conn.close(quinn::VarInt::from_u32(0), b"the node's clock is off");
                let conn = self.ensure().await?;
                self.exchange(&conn, &bytes, id, deadline).await
            }
            other => other,
        }
    }

    /// One request (already encoded, with request id `id`) on a new stream of `conn`.
    async fn exchange(
        &self,
        conn: &quinn::Connection,
        bytes: &[u8],
        id: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Map<String, Value>, ClientError> {
        let exchange = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| ClientError::Failed(e.to_string()))?;
            write_frame(&mut send, bytes)
                .await
                .map_err(|e| ClientError::Failed(e.to_string()))?;
            send.finish()
                .map_err(|e| ClientError::Failed(e.to_string()))?;
            read_stream_frame(&mut recv, MAX_AGENT_FRAME)
                .await
                .map_err(|e| ClientError::Failed(e.to_string()))
        };
        let answer = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| ClientError::Failed(format!("no answer within {:?}", self.timeout)))??;
        let m = agent::parse_response(&answer).map_err(ClientError::Protocol)?;
        if m.get("request_id") != Some(&json!(id)) {
            return Err(ClientError::Protocol(
                "answer carries another request_id".into(),
            ));
        }
        if m.get("success") == Some(&Value::Bool(true)) {
            Ok(m)
        } else {
            let error = m
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request refused");
            let code = m.get("code").and_then(Value::as_str);
            let mut refusal = Refusal::new(ErrorCode::of_answer(code, error), error);
            refusal.retry_after_ms = m.get("retry_after_ms").and_then(Value::as_u64);
            Err(ClientError::Refused(refusal))
        }
    }

    pub(crate) fn close(&self, code: u32, reason: &[u8]) {
        self.endpoint.close(quinn::VarInt::from_u32(code), reason);
    }

    pub(crate) async fn wait_idle(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Whether the node closed `conn` before reading anything on it: it was stopping (see
/// [`agent::NOT_SERVED_REASON`]) or at its limit of agent connections (`BUSY`).
fn closed_unread(conn: &quinn::Connection) -> bool {
    use crate::node::close_code::{BUSY, SHUTTING_DOWN};
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if (c.error_code == quinn::VarInt::from_u32(SHUTTING_DOWN)
                && c.reason.as_ref() == agent::NOT_SERVED_REASON.as_bytes())
                || c.error_code == quinn::VarInt::from_u32(BUSY)
    )
}

/// Answers the node's pings (node-opened streams) for as long as the connection lives.
/// `AgentClient` does this by itself; it is public for code holding raw connections.
pub fn spawn_ping_answerer(conn: quinn::Connection) {
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                let Ok(bytes) = read_stream_frame(&mut recv, MAX_AGENT_FRAME).await else {
                    return;
                };
                let env = agent::parse_request(&bytes);
                let answer = match env.request {
                    Ok(AgentRequest::PingAgent { timestamp }) => {
                        let mut f = Map::new();
                        f.insert("timestamp".into(), timestamp);
                        agent::ok_response(agent::PING_AGENT, env.request_id.as_ref(), f)
                    }
                    Ok(_) => agent::error_response(
                        env.command.as_deref(),
                        env.request_id.as_ref(),
                        &Refusal::new(ErrorCode::UnknownCommand, "agents answer only ping_agent"),
                    ),
                    Err(e) => {
                        agent::error_response(env.command.as_deref(), env.request_id.as_ref(), &e)
                    }
                };
                if write_frame(&mut send, &answer).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
    });
}
