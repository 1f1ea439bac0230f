//! Operator side of the admin protocol: mutual TLS with the operator certificate, tries each
//! endpoint in turn.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use super::AdminArgs;
use crate::node::{AdminRequest, ListFrame};
use crate::transport::frame::{read_frame, write_frame};
use crate::transport::tls::{NodeTls, TlsFiles};

/// Largest answer frame read. Requests stay small (the node takes at most 4 MiB), but list
/// answers grow with the tables: about 150 bytes per session, so this fits a million.
const MAX_ANSWER: usize = 256 * 1024 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A node answered `success: false`.
#[derive(Debug, thiserror::Error)]
#[error("{addr}: {error}")]
pub struct Refused {
    pub addr: String,
    /// What kind of refusal (`crate::node::admin_code`); none from nodes of builds before
    /// codes.
    pub code: Option<String>,
    pub error: String,
}

impl Refused {
    /// Whether another node may serve the request: this one is stopping, cannot reach a
    /// quorum, or is not the leader. An answer without a code (a node of a build before
    /// codes) is taken as such, as all refusals were.
    pub fn elsewhere(&self) -> bool {
        use crate::node::admin_code::*;
        match self.code.as_deref() {
            None => true,
            Some(c) => [SHUTTING_DOWN, UNAVAILABLE, NOT_LEADER].contains(&c),
        }
    }

    /// Whether the cluster could not answer (rather than refusing): worth retrying later.
    pub fn transient(&self) -> bool {
        self.elsewhere() || self.code.as_deref() == Some(crate::node::admin_code::OUTCOME_UNKNOWN)
    }
}

/// No endpoint could serve the request: each was unreachable, or refused it for a reason
/// another node might not have had.
#[derive(Debug, thiserror::Error)]
#[error("no endpoint answered: {0}")]
pub struct NoEndpoint(pub String);

pub struct AdminClient {
    endpoint: quinn::Endpoint,
    server_name: String,
}

impl AdminClient {
    /// # Errors
    /// The operator's TLS files are unusable.
    pub fn new(args: &AdminArgs) -> anyhow::Result<Self> {
        let tls = NodeTls::load(&TlsFiles {
            ca: args.ca.clone(),
            cert: args.cert.clone(),
            key: args.key.clone(),
        })?;
        let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address"))
            .context("cannot open a UDP socket")?;
        endpoint.set_default_client_config(tls.admin_client_config()?);
        Ok(AdminClient {
            endpoint,
            server_name: args.server_name.clone(),
        })
    }

    /// Sends one request to `addr`.
    ///
    /// # Errors
    /// The node cannot be reached, or it answered `success: false`.
    pub async fn call(&self, addr: &str, req: &AdminRequest) -> anyhow::Result<serde_json::Value> {
        let (conn, _, answer) = self.exchange_in_time(addr, req).await?;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        Ok(answer)
    }

    /// [`AdminClient::exchange`], given up after [`CALL_TIMEOUT`].
    async fn exchange_in_time(
        &self,
        addr: &str,
        req: &AdminRequest,
    ) -> anyhow::Result<(quinn::Connection, quinn::RecvStream, serde_json::Value)> {
        tokio::time::timeout(CALL_TIMEOUT, self.exchange(addr, req))
            .await
            .with_context(|| format!("{addr} did not answer within {CALL_TIMEOUT:?}"))?
    }

    /// Connects, sends `req`, reads the answer frame; fails on `success: false` with
    /// [`Refused`].
    async fn exchange(
        &self,
        addr: &str,
        req: &AdminRequest,
    ) -> anyhow::Result<(quinn::Connection, quinn::RecvStream, serde_json::Value)> {
        let sock: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("cannot resolve {addr}"))?
            .next()
            .with_context(|| format!("{addr} resolves to no address"))?;
        let conn = self
            .endpoint
            .connect(sock, &self.server_name)?
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .with_context(|| format!("{addr} refused the request"))?;
        write_frame(&mut send, serde_json::to_vec(req)?.as_slice()).await?;
        send.finish()?;
        let bytes = read_frame(&mut recv, MAX_ANSWER)
            .await
            .with_context(|| format!("no answer from {addr}"))?;
        let answer: serde_json::Value =
            serde_json::from_slice(&bytes).context("malformed answer")?;
        if answer["success"] != serde_json::Value::Bool(true) {
            conn.close(quinn::VarInt::from_u32(0), b"done");
            return Err(Refused {
                addr: addr.to_owned(),
                code: answer["code"].as_str().map(str::to_owned),
                error: answer["error"]
                    .as_str()
                    .unwrap_or("request failed")
                    .to_owned(),
            }
            .into());
        }
        Ok((conn, recv, answer))
    }

    /// Sends `req` to `addr` and reads, after the answer frame, the data that follows it
    /// (up to `max` bytes) until the node ends the stream.
    ///
    /// # Errors
    /// As [`AdminClient::call`]; also when the data is cut short or too large.
    pub async fn call_with_data(
        &self,
        addr: &str,
        req: &AdminRequest,
        max: usize,
        timeout: Duration,
    ) -> anyhow::Result<(serde_json::Value, Vec<u8>)> {
        tokio::time::timeout(timeout, async {
            let (conn, mut recv, answer) = self.exchange(addr, req).await?;
            let data = recv
                .read_to_end(max)
                .await
                .with_context(|| format!("reading data from {addr}"))?;
            conn.close(quinn::VarInt::from_u32(0), b"done");
            Ok((answer, data))
        })
        .await
        .with_context(|| format!("{addr} did not finish within {timeout:?}"))?
    }

    /// Sends `req` to each endpoint in turn until one answers it; says which could not. A
    /// refusal on the request's merits ends the round at once.
    ///
    /// # Errors
    /// [`Refused`] (final), or [`NoEndpoint`].
    pub async fn call_any(
        &self,
        endpoints: &[String],
        req: &AdminRequest,
    ) -> anyhow::Result<(String, serde_json::Value)> {
        self.first_answer(endpoints, |addr| async move {
            let answer = self.call(&addr, req).await?;
            Ok((addr, answer))
        })
        .await
    }

    /// Asks for a list (`AgentsList` or `ClaimsList`; it is sent with `stream` set) from
    /// the endpoints in turn, as [`AdminClient::call_any`], and gives its rows as they
    /// arrive: a large list is never one frame in memory, on the node or here. From a node
    /// of a build before streamed lists, the rows of its one answer frame.
    ///
    /// # Errors
    /// As [`AdminClient::call_any`]; a request that is not a list.
    pub async fn list_any(
        &self,
        endpoints: &[String],
        req: &AdminRequest,
    ) -> anyhow::Result<ListRows> {
        let (req, name) = match req.clone() {
            AdminRequest::AgentsList { only, .. } => (
                AdminRequest::AgentsList { only, stream: true },
                ListFrame::AGENTS,
            ),
            AdminRequest::ClaimsList { only, .. } => (
                AdminRequest::ClaimsList { only, stream: true },
                ListFrame::CLAIMS,
            ),
            other => anyhow::bail!("not a list: {other:?}"),
        };
        let req = &req;
        self.first_answer(endpoints, |addr| async move {
            let (conn, recv, first) = self.exchange_in_time(&addr, req).await?;
            Ok(ListRows::new(addr, conn, recv, name, first))
        })
        .await
    }

    /// Runs `attempt` on each endpoint in turn until one succeeds; says which could not. A
    /// refusal on the request's merits ends the round at once.
    async fn first_answer<T, Fut>(
        &self,
        endpoints: &[String],
        attempt: impl Fn(String) -> Fut,
    ) -> anyhow::Result<T>
    where
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let mut failures = Vec::new();
        for addr in endpoints {
            match attempt(addr.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) => match e.downcast_ref::<Refused>() {
                    Some(r) if !r.elsewhere() => return Err(e),
                    Some(r) => {
                        eprintln!("{addr}: {}; trying the next endpoint", r.error);
                        failures.push(format!("{e:#}"));
                    }
                    None => {
                        eprintln!("{addr}: unreachable ({e:#}); trying the next endpoint");
                        failures.push(format!("{addr}: {e:#}"));
                    }
                },
            }
        }
        Err(NoEndpoint(failures.join("; ")).into())
    }

    pub async fn close(self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// The rows of a list as they arrive (see [`crate::node::ListFrame`]).
pub struct ListRows {
    addr: String,
    conn: quinn::Connection,
    /// The answer stream, until the list has ended.
    recv: Option<quinn::RecvStream>,
    name: &'static str,
    /// The rows of a one-frame answer (a node of an earlier build), given at the first call.
    whole: Option<Vec<serde_json::Value>>,
    more: u64,
}

impl ListRows {
    fn new(
        addr: String,
        conn: quinn::Connection,
        recv: quinn::RecvStream,
        name: &'static str,
        mut first: serde_json::Value,
    ) -> ListRows {
        let streamed = first["stream"] == true;
        let (recv, whole) = if streamed {
            (Some(recv), None)
        } else {
            conn.close(quinn::VarInt::from_u32(0), b"done");
            let rows = match first[name].take() {
                serde_json::Value::Array(rows) => rows,
                _ => Vec::new(),
            };
            (None, Some(rows))
        };
        ListRows {
            more: first["more"].as_u64().unwrap_or(0),
            addr,
            conn,
            recv,
            name,
            whole,
        }
    }

    /// The node that answers.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The next rows, in agent id order; `None` once the list has ended.
    ///
    /// # Errors
    /// The node went silent for [`CALL_TIMEOUT`] or the list was cut short (the rows given
    /// so far are not all of it), or a frame was malformed.
    pub async fn next(&mut self) -> anyhow::Result<Option<Vec<serde_json::Value>>> {
        if let Some(rows) = self.whole.take() {
            return Ok(Some(rows));
        }
        let Some(recv) = self.recv.as_mut() else {
            return Ok(None);
        };
        let addr = &self.addr;
        let bytes = tokio::time::timeout(CALL_TIMEOUT, read_frame(recv, MAX_ANSWER))
            .await
            .with_context(|| format!("{addr} sent no more of the list for {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("the list from {addr} was cut short"))?;
        let mut frame: serde_json::Value =
            serde_json::from_slice(&bytes).context("malformed list frame")?;
        if frame["end"] == true {
            self.more = frame["more"].as_u64().unwrap_or(0);
            self.recv = None;
            self.conn.close(quinn::VarInt::from_u32(0), b"done");
            return Ok(None);
        }
        match frame[self.name].take() {
            serde_json::Value::Array(rows) => Ok(Some(rows)),
            _ => anyhow::bail!("malformed list frame from {addr}: no {} rows", self.name),
        }
    }

    /// How many more rows matched beyond the limit; known once [`ListRows::next`] has
    /// given `None`.
    pub fn more(&self) -> u64 {
        self.more
    }
}
