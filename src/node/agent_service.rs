//! The agent endpoint (ALPN `agentreg/1`): one request per client-opened stream, JSON in
//! length-prefixed frames (docs/protocol.md). Writes go through the Raft log; validations
//! pass the read-index barrier first.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio_util::task::TaskTracker;

use super::limits::Source;
use super::{read, write, Inner};
use crate::identity::Certificate;
use crate::proto::agent::{
    self, AgentRequest, ErrorCode, Refusal, CONNECTION_CLOSING_ERROR, SHUTTING_DOWN_ERROR,
};
use crate::registry::{ClaimArgs, ConnRef, EndCause, Op, Outcome, SessionEnd, TokenHash};
use crate::transport::frame::{
    read_end_if_there, read_stream_frame_within, write_frame, FrameBudget, FrameError,
    MAX_AGENT_FRAME,
};

/// QUIC close codes a node uses on agent connections (documented in docs/protocol.md).
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const TAKEN_OVER: u32 = 0x100;
    pub const REVOKED: u32 = 0x101;
    pub const EVICTED: u32 = 0x102;
    pub const SHUTTING_DOWN: u32 = 0x103;
    /// The node holds as many agent connections as it may (in all, or from the agent's
    /// address): nothing on the connection was read; connect to another node.
    pub const BUSY: u32 = 0x104;
}

pub(super) async fn serve(inner: Arc<Inner>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let source = Source::of(remote.ip());
    // Held while the connection is served: it counts against the limits until then.
    let _admitted = match inner.conn_limits.admit(source) {
        Ok(admitted) => admitted,
        Err(full) => {
            inner.metrics.connections_refused.inc();
            tracing::debug!(%remote, reason = full.reason(), "agent connection refused");
            conn.close(
                quinn::VarInt::from_u32(close_code::BUSY),
                full.reason().as_bytes(),
            );
            return;
        }
    };
    let (conn_id, conn_requests) = inner.conns.add(conn.clone());
    let partial = Arc::new(FrameBudget::new(PARTIAL_REQUEST_BYTES));
    tracing::debug!(%remote, conn_id, "agent connected");
    // The connection's requests run inside this task, side by side, not as tasks of their
    // own: a spawn per request (copying its future to the heap and scheduling it, often on
    // the other worker) cost about a tenth of a claim's CPU at 64 in flight
    // (docs/benchmarks.md). One agent's requests then share one thread; agents are many.
    // Boxed: an empty set keeps a stub of its future type, and this one is kilobytes, kept
    // for every agent connection.
    let mut running: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    loop {
        let (send, recv) = tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            Some(()) = running.next(), if !running.is_empty() => continue,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%remote, conn_id, reason = %e, "agent connection ended");
                    break;
                }
            },
        };
        // Admitted or refused as its stream arrives, and counted before that check: a drain
        // or a session closer that finds no request in flight has begun first, and then this
        // request is refused (nothing done) rather than cut off; one that was admitted is
        // waited for.
        let in_drain = inner.requests.token();
        let in_conn = conn_requests.token();
        let refusal = if inner.draining.is_cancelled() {
            Some((ErrorCode::ShuttingDown, SHUTTING_DOWN_ERROR))
        } else if conn_requests.is_closed() {
            Some((ErrorCode::ConnectionClosing, CONNECTION_CLOSING_ERROR))
        } else {
            None
        };
        let inner = inner.clone();
        let partial = partial.clone();
        running.push(
            async move {
                // A request that panics must not take its neighbours on the connection (or the
                // cleanup below) with it, as it could not when it was a task of its own.
                let served = AssertUnwindSafe(serve_stream(
                    &inner, conn_id, source, &partial, refusal, send, recv,
                ));
                if served.catch_unwind().await.is_err() {
                    tracing::error!(conn_id, "an agent request panicked; its stream was dropped");
                }
                drop((in_drain, in_conn));
            }
            .boxed(),
        );
    }
    // Requests already admitted finish (a drain waits for them) while the connection is
    // cleaned up.
    if !running.is_empty() {
        tokio::spawn(async move { while running.next().await.is_some() {} });
    }
    if let Some(agent_id) = inner.conns.remove(conn_id) {
        // While the node stops, its sessions are handed back in one EvictNode instead.
        if !inner.draining.is_cancelled() {
            evict_after_disconnect(&inner, conn_id, &agent_id).await;
        }
    }
}

/// The agent's connection is gone: end its session through the log (if it is still the
/// session of this connection), so the id is free to reconnect elsewhere at once.
async fn evict_after_disconnect(inner: &Inner, conn_id: u64, agent_id: &str) {
    let me = ConnRef {
        node_id: inner.id,
        conn_id,
    };
    if let Some(session_id) = inner.session_on(agent_id, me) {
        super::heartbeat::evict(inner, agent_id, session_id, "connection closed").await;
    }
}

/// What a connection's partial requests over 4 KiB may hold between them while they arrive
/// (one of the largest has 64 KiB): a request that would take more is not read until others
/// are whole, so its bytes stay with QUIC, within the connection's flow-control window,
/// which stops the agent. Without it, an agent announcing large requests on its 64 streams
/// and trickling them in made its node hold up to 4 MiB per connection.
const PARTIAL_REQUEST_BYTES: usize = 256 * 1024;

/// Serves one request; `refusal` is the answer to anything but a ping when the request
/// arrived after the node began to drain or the connection began to close.
async fn serve_stream(
    inner: &Inner,
    conn_id: u64,
    source: Source,
    partial: &FrameBudget,
    refusal: Option<(ErrorCode, &'static str)>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // A request trickled in (or announced and never sent) holds its stream, and what has
    // arrived of it, only this long. Nearly always the whole request is there when its
    // stream is accepted: then no timer is set (one per request cost measurably at 64 in
    // flight).
    let read = {
        let mut reading = std::pin::pin!(read_stream_frame_within(
            &mut recv,
            MAX_AGENT_FRAME,
            Some(partial)
        ));
        match futures::poll!(reading.as_mut()) {
            std::task::Poll::Ready(read) => read,
            std::task::Poll::Pending => {
                let deadline = Duration::from_millis(inner.config.limits.request_read_timeout_ms);
                tokio::time::timeout(deadline, reading)
                    .await
                    .unwrap_or(Err(FrameError::TimedOut(deadline)))
            }
        }
    };
    let answer = match read {
        Ok(bytes) => {
            let started = std::time::Instant::now();
            inner.conns.touch(conn_id);
            let env = agent::parse_request(&bytes);
            let command = env.command.as_deref();
            let rid = env.request_id.as_ref();
            match env.request {
                Ok(req) => {
                    let command = command.unwrap_or_default();
                    let result = match refusal {
                        Some((code, e)) if !matches!(req, AgentRequest::PingAgent { .. }) => {
                            Err(Refusal::new(code, e))
                        }
                        _ => handle(inner, conn_id, source, req).await,
                    };
                    inner
                        .metrics
                        .request(command, result.is_ok(), started.elapsed());
                    match result {
                        Ok(fields) => agent::ok_response(command, rid, fields),
                        Err(e) => agent::error_response(Some(command), rid, &e),
                    }
                }
                Err(e) => {
                    inner.metrics.request("invalid", false, started.elapsed());
                    agent::error_response(command, rid, &e)
                }
            }
        }
        Err(FrameError::Io(e)) => {
            tracing::debug!(conn_id, error = %e, "agent stream failed");
            return;
        }
        Err(e) => {
            tracing::debug!(conn_id, error = %e, "bad agent frame");
            let _ = recv.stop(quinn::VarInt::from_u32(0x10));
            agent::error_response(None, None, &format!("bad frame: {e}").into())
        }
    };
    if write_frame(&mut send, &answer).await.is_ok() {
        super::finish_and_wait(send).await;
    }
    // The agent finished its side right after its request; if that end came after the
    // request itself, it is here by now (see read_end_if_there).
    read_end_if_there(&mut recv);
}

type Fields = Map<String, Value>;

fn fields(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

use write::commit;

async fn handle(
    inner: &Inner,
    conn_id: u64,
    source: Source,
    req: AgentRequest,
) -> Result<Fields, Refusal> {
    let conn = ConnRef {
        node_id: inner.id,
        conn_id,
    };
    match req {
        AgentRequest::PingAgent { timestamp } => Ok(fields(json!({ "timestamp": timestamp }))),
        AgentRequest::ClaimAgentId {
            agent_id,
            force,
            certificate,
            claim_token,
        } => {
            inner.claim_limits.admit(source).map_err(|limited| {
                inner.metrics.claims_limited.inc();
                let wait = limited.retry_after;
                Refusal::new(
                    ErrorCode::RateLimited,
                    format!(
                        "too many claims from {source}: at most {} an hour from one address \
                         ([limits] claims_per_hour_per_address); try again in {:.1} s",
                        inner.config.limits.claims_per_hour_per_address,
                        wait.as_secs_f64()
                    ),
                )
                .retry_after(wait)
            })?;
            let claim = ClaimArgs {
                agent_id: agent_id.clone(),
                ttl_secs: inner.config.certificate_ttl_secs(),
                force,
                proof: certificate,
                conn: Some(conn),
            };
            // Only the token's hash leaves this node.
            let op = match claim_token {
                Some(t) => Op::ClaimWithToken {
                    claim,
                    token: TokenHash::of(&t),
                },
                None => Op::Claim(claim),
            };
            // Logged by the audit trail (write::write), like every identity event.
            let (certificate, repeated) = match commit(inner, op).await? {
                Outcome::Claimed { certificate } => (certificate, false),
                Outcome::ClaimRepeated { certificate } => (certificate, true),
                other => return Err(unexpected(&other)),
            };
            Ok(fields(json!({
                "agent_id": agent_id,
                "certificate": certificate,
                "repeated": repeated,
            })))
        }
        AgentRequest::ValidateCertificate {
            certificate,
            consistency,
        } => {
            if consistency == agent::Consistency::Linearizable {
                read::barrier(inner).await.map_err(|e| {
                    Refusal::new(
                        ErrorCode::Unavailable,
                        format!("{}: {e}", agent::UNAVAILABLE_PREFIX),
                    )
                })?;
            }
            validation(inner, &certificate)
        }
        AgentRequest::RegisterAgent {
            agent_id,
            metadata,
            certificate,
            force_reconnect,
        } => {
            if let Some(other) = inner.conns.agent_of(conn_id).filter(|a| *a != agent_id) {
                return Err(Refusal::new(
                    ErrorCode::ConnectionInUse,
                    format!("this connection is registered as agent {other}; open another connection for agent {agent_id}"),
                ));
            }
            let op = Op::Register {
                agent_id: agent_id.clone(),
                conn,
                metadata: Value::Object(metadata).to_string(),
                certificate,
                force_reconnect,
                allow_uncertified_takeover: inner.config.identity.allow_uncertified_takeover,
            };
            match commit(inner, op).await? {
                Outcome::Registered {
                    session_id,
                    replaced,
                } => {
                    inner.conns.set_agent(conn_id, Some(agent_id.clone()));
                    Ok(fields(json!({
                        "agent_id": agent_id,
                        "session_id": session_id,
                        "node_id": inner.id,
                        "took_over": replaced.is_some(),
                    })))
                }
                other => Err(unexpected(&other)),
            }
        }
        AgentRequest::UnregisterAgent { agent_id } => {
            let session_id = inner.session_on(&agent_id, conn).ok_or_else(|| {
                Refusal::new(
                    ErrorCode::NotRegistered,
                    format!("Agent ID {agent_id} is not registered on this connection"),
                )
            })?;
            let outcome = commit(
                inner,
                Op::Unregister {
                    agent_id: agent_id.clone(),
                    session_id,
                },
            )
            .await?;
            inner.conns.set_agent(conn_id, None);
            // This node's tables may have lagged: the session can have been taken over or
            // evicted before the unregister was committed. Say so rather than "success".
            if !matches!(outcome, Outcome::SessionEnded { ended: Some(_) }) {
                return Err(Refusal::new(
                    ErrorCode::NotRegistered,
                    format!("Agent ID {agent_id} is not registered on this connection (session {session_id} already ended)"),
                ));
            }
            Ok(fields(
                json!({ "agent_id": agent_id, "session_id": session_id }),
            ))
        }
        AgentRequest::ReleaseAgentId { certificate } => {
            let agent_id = certificate.agent_id.clone();
            let result = commit(
                inner,
                Op::Release {
                    certificate,
                    by: Some(conn),
                },
            )
            .await;
            match result? {
                Outcome::Released { serial, .. } => {
                    Ok(fields(json!({ "agent_id": agent_id, "serial": serial })))
                }
                other => Err(unexpected(&other)),
            }
        }
        AgentRequest::RevokeCertificate { certificate } => {
            let agent_id = certificate.agent_id.clone();
            let result = commit(
                inner,
                Op::RevokeCertificate {
                    certificate,
                    by: Some(conn),
                },
            )
            .await;
            match result? {
                Outcome::Revoked { serial, .. } => Ok(fields(
                    json!({ "agent_id": agent_id, "serial": serial, "revoked": true }),
                )),
                other => Err(unexpected(&other)),
            }
        }
    }
}

/// The verdict on `certificate` by this node's tables and clock (unless its clock is off).
fn validation(inner: &Inner, certificate: &Certificate) -> Result<Fields, Refusal> {
    let now = write::now_checked(inner).map_err(|e| write::skewed(&e))?;
    let result = inner.state.read().state.validate(certificate, now);
    Ok(match result {
        Ok(()) => fields(json!({ "valid": true, "agent_id": certificate.agent_id })),
        Err(reason) => fields(json!({
            "valid": false,
            "agent_id": certificate.agent_id,
            "reason": reason.to_string(),
            "code": ErrorCode::of_invalid(reason).as_str(),
        })),
    })
}

fn unexpected(outcome: &Outcome) -> Refusal {
    tracing::error!(?outcome, "unexpected outcome");
    Refusal::new(ErrorCode::Internal, "internal error: unexpected result")
}

/// Closes the local connections of sessions that applied entries ended.
pub(super) fn spawn_session_closer(
    inner: Arc<Inner>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<SessionEnd>,
) {
    let tasks = inner.tasks.clone();
    tasks.spawn(async move {
        loop {
            let end = tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                e = events.recv() => match e {
                    Some(e) => e,
                    None => break,
                },
            };
            if end.session.conn.node_id != inner.id {
                continue;
            }
            let code = match end.cause {
                EndCause::TakenOver { .. } => close_code::TAKEN_OVER,
                EndCause::Revoked => close_code::REVOKED,
                EndCause::Evicted => close_code::EVICTED,
                // The agent asked (unregister, or revoking/releasing its own certificate on
                // this connection): it gets its answer, the connection stays open.
                EndCause::Unregistered => continue,
            };
            let Some((conn, requests)) = inner.conns.detach(end.session.conn.conn_id, &end.agent_id) else {
                continue;
            };
            let reason = format!("session {} of agent {} ended: {}", end.session.session_id, end.agent_id, end.cause);
            tracing::info!(agent_id = %end.agent_id, session_id = end.session.session_id, cause = %end.cause, "closing agent connection");
            close_when_answered(&inner, conn, requests, code, reason);
        }
    });
}

/// Closes an agent connection once the requests it carried are answered (bounded by the
/// same budget as the drain on shutdown): a write committed just as its session ended
/// still gets its answer. `requests` is already closed, so no new request begins meanwhile.
pub(super) fn close_when_answered(
    inner: &Arc<Inner>,
    conn: quinn::Connection,
    requests: TaskTracker,
    code: u32,
    reason: String,
) {
    let budget = inner.answer_budget();
    let shutdown = inner.shutdown.clone();
    inner.tasks.spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            r = tokio::time::timeout(budget, requests.wait()) => if r.is_err() {
                tracing::warn!(in_flight = requests.len(), "requests still unanswered after {budget:?}; closing their connection");
            },
        }
        conn.close(quinn::VarInt::from_u32(code), reason.as_bytes());
    });
}
