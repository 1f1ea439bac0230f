//! The transport floor: what a request and its answer cost over agentreg's QUIC stack alone,
//! with no Raft, no disk and no registry behind them. A child process (this binary, run with
//! [`SERVE_FLAG`]) serves agent connections the way a node does (its TLS material, endpoint,
//! transport settings and socket buffers; one stream per request, read to its end, answered,
//! finished and held until the answer is acknowledged) and answers every request with a
//! claim answer's worth of bytes. The bench drives it like the claim rows: 48 connections,
//! claim requests, 1, 64 and 256 in flight. Its CPU per request, set beside a claim row's, is
//! the part of a claim's cost that is the transport's.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agentreg::transport::frame::{read_stream_frame, write_frame, MAX_AGENT_FRAME};
use agentreg::transport::tls::{self, NodeTls, TlsFiles};
use anyhow::Context;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::stats::Cell;
use crate::Args;

/// The hidden first argument that makes this binary the floor's server.
pub const SERVE_FLAG: &str = "--serve-quic-echo";

/// Bytes of every answer: about a claim's answer with its certificate.
const ANSWER_BYTES: usize = 400;

/// Serves on 127.0.0.1 with node 1's material in `dir` and prints the port on stdout;
/// returns only if the endpoint closes.
pub async fn serve(dir: &Path) -> anyhow::Result<()> {
    let endpoint = bind(dir)?;
    println!("{}", endpoint.local_addr()?.port());
    answer_all(endpoint).await;
    Ok(())
}

/// A node's kind of endpoint on 127.0.0.1, with node 1's material in `dir`.
fn bind(dir: &Path) -> anyhow::Result<quinn::Endpoint> {
    let node = NodeTls::load(&TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("node1.pem"),
        key: dir.join("node1.key"),
    })?;
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let s = socket2::SockRef::from(&socket);
    s.set_recv_buffer_size(4 << 20)?;
    s.set_send_buffer_size(4 << 20)?;
    let endpoint = quinn::Endpoint::new(
        tls::endpoint_config(&node.endpoint_secret()),
        Some(node.server_config(tls::IDLE_TIMEOUT)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok(endpoint)
}

/// Answers every request on `endpoint` until it closes.
async fn answer_all(endpoint: quinn::Endpoint) {
    let answer: Arc<[u8]> = vec![b'x'; ANSWER_BYTES].into();
    while let Some(incoming) = endpoint.accept().await {
        let answer = answer.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    if read_stream_frame(&mut recv, MAX_AGENT_FRAME).await.is_err()
                        || write_frame(&mut send, &answer).await.is_err()
                    {
                        return;
                    }
                    // As a node's request task does (`finish_and_wait`).
                    if send.finish().is_ok() {
                        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
                    }
                });
            }
        });
    }
}

/// The server process; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start() -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let tls_dir: PathBuf = dir.path().join("tls");
        tls::write_dev_material(&tls_dir, &[1], &[], false)?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg(SERVE_FLAG)
            .arg(&tls_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the transport floor's server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
        };
        let mut line = String::new();
        let stdout = tokio::process::ChildStdout::from_std(stdout)?;
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .context("the transport floor's server did not say its port within 10 s")??;
        let port: u16 = line
            .trim()
            .parse()
            .with_context(|| format!("the transport floor's server said {line:?}"))?;
        server.addr.set_port(port);
        Ok(server)
    }
}

/// The floor's rows: requests answered at 1, 64 and 256 in flight over 48 connections.
pub async fn rows(args: &Args, rows: &mut Vec<(String, Cell)>) -> anyhow::Result<()> {
    let server = Server::start().await?;
    let ca = std::fs::read_to_string(server.dir.path().join("tls/ca.pem"))?;
    // The claim rows' client settings.
    let client_config = crate::agentreg_side::agent_client_config(args, &ca)?;
    let endpoint = crate::agentreg_side::client_endpoint()?;
    let mut conns = Vec::new();
    for _ in 0..48 {
        conns.push(
            endpoint
                .connect_with(client_config.clone(), server.addr, tls::DEFAULT_SERVER_NAME)?
                .await
                .context("connection to the transport floor's server")?,
        );
    }
    let conns = Arc::new(conns);
    for inflight in [1usize, 64, 256] {
        let rate = crate::drive(inflight, args.duration(), {
            let conns = conns.clone();
            move |slot| {
                let conn = conns[slot % conns.len()].clone();
                async move { exchange(&conn).await }
            }
        })
        .await;
        rows.push((
            format!("QUIC floor (no Raft), {inflight} in flight"),
            Cell::Rate(rate),
        ));
    }
    for conn in conns.iter() {
        conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    drop(server);
    Ok(())
}

/// One claim request on a new stream, and its answer read to the end.
async fn exchange(conn: &quinn::Connection) -> Result<(), String> {
    let req = json!({"command": "claim_agent_id", "agent_id": "claim-1234567"});
    let answer = crate::agentreg_side::exchange(conn, req).await?;
    if answer.len() == ANSWER_BYTES {
        Ok(())
    } else {
        Err(format!("answer of {} bytes", answer.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor's server answers a claim request over an agent connection with a claim
    /// answer's worth of bytes, and many streams of one connection one after another.
    #[tokio::test]
    async fn the_floor_server_answers_agent_requests() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        tls::write_dev_material(&tls_dir, &[1], &[], false).unwrap();
        let endpoint = bind(&tls_dir).unwrap();
        let addr = endpoint.local_addr().unwrap();
        tokio::spawn(answer_all(endpoint));
        let ca = std::fs::read_to_string(tls_dir.join("ca.pem")).unwrap();
        let client = crate::agentreg_side::client_endpoint().unwrap();
        let conn = client
            .connect_with(
                tls::agent_client_config(&ca).unwrap(),
                addr,
                tls::DEFAULT_SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap();
        for _ in 0..200 {
            exchange(&conn).await.expect("an answer of ANSWER_BYTES");
        }
    }
}
