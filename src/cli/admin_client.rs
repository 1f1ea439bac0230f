//! Operator side of the admin protocol: mutual TLS with the operator certificate, tries each
//! endpoint in turn.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};

use super::AdminArgs;
use crate::node::AdminRequest;
use crate::transport::frame::{read_frame, write_frame};
use crate::transport::tls::{NodeTls, TlsFiles};

/// Largest answer frame read. Requests stay small (the node takes at most 4 MiB), but list
/// answers grow with the tables: about 150 bytes per session, so this fits a million.
const MAX_ANSWER: usize = 256 * 1024 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

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
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(addr, req))
            .await
            .with_context(|| format!("{addr} did not answer within {CALL_TIMEOUT:?}"))?
    }

    async fn call_inner(
        &self,
        addr: &str,
        req: &AdminRequest,
    ) -> anyhow::Result<serde_json::Value> {
        let (conn, _, answer) = self.exchange(addr, req).await?;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        Ok(answer)
    }

    /// Connects, sends `req`, reads the answer frame; fails on `success: false`.
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
            bail!(
                "{addr}: {}",
                answer["error"].as_str().unwrap_or("request failed")
            );
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

    /// Sends `req` to each endpoint in turn until one answers; says which were down.
    ///
    /// # Errors
    /// No endpoint answered.
    pub async fn call_any(
        &self,
        endpoints: &[String],
        req: &AdminRequest,
    ) -> anyhow::Result<(String, serde_json::Value)> {
        let mut failures = Vec::new();
        for addr in endpoints {
            match self.call(addr, req).await {
                Ok(v) => return Ok((addr.clone(), v)),
                Err(e) => {
                    eprintln!("{addr}: unreachable ({e:#}); trying the next endpoint");
                    failures.push(format!("{addr}: {e:#}"));
                }
            }
        }
        bail!("no endpoint answered: {}", failures.join("; "))
    }

    pub async fn close(self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
