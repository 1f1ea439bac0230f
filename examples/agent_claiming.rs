//! What the OpenAgents agent-claiming example promises, against a running cluster:
//! claim an id, save the certificate, disconnect, reconnect to a different node with the
//! certificate, and take over a session left behind.
//!
//! Start a local cluster first (`scripts/local-cluster.sh`), then:
//!
//! ```sh
//! cargo run --example agent_claiming
//! ```
//!
//! AGENTREG_ENDPOINTS (comma-separated host:port) and AGENTREG_CA (path) point it elsewhere.

use std::time::Duration;

use agentreg::client::{load_certificate, AgentClient, ClientConfig, ClientError, ClientEvent};
use anyhow::Context;
use serde_json::{json, Map, Value};

/// A client whose first choice is `nodes[first]`.
async fn client_on(nodes: &[String], ca: &str, first: usize) -> anyhow::Result<AgentClient> {
    let mut order = nodes.to_vec();
    order.rotate_left(first % nodes.len());
    Ok(AgentClient::connect(ClientConfig::new(order, ca.to_owned())).await?)
}

fn metadata(name: &str) -> Map<String, Value> {
    json!({ "name": name })
        .as_object()
        .cloned()
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoints = std::env::var("AGENTREG_ENDPOINTS")
        .unwrap_or_else(|_| "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103".into());
    let nodes: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
    let ca_path =
        std::env::var("AGENTREG_CA").unwrap_or_else(|_| ".local-cluster/tls/ca.pem".into());
    let ca = std::fs::read_to_string(&ca_path).with_context(|| {
        format!("cannot read the cluster CA {ca_path}; is the local cluster running?")
    })?;
    let agent_id = format!("example-agent-{}", std::process::id());
    let dir = tempfile::tempdir()?;
    let cert_file = dir.path().join("certificate.json");

    println!("1. claim {agent_id} through {}", nodes[0]);
    let first = client_on(&nodes, &ca, 0).await?;
    let cert = first.claim_agent_id(&agent_id, false).await?;
    println!(
        "   certificate serial {}, valid until {}",
        cert.serial, cert.expires_at
    );
    first.save_certificate(&cert_file)?;
    println!("   saved to {}", cert_file.display());
    let reg = first
        .register(&agent_id, metadata("first run"), None, false)
        .await?;
    println!(
        "   registered: session {} on node {}",
        reg.session_id, reg.node_id
    );

    println!("2. disconnect");
    first.close().await;

    println!(
        "3. reconnect to a different node ({}) with the saved certificate",
        nodes[1 % nodes.len()]
    );
    let second = client_on(&nodes, &ca, 1).await?;
    let cert = load_certificate(&cert_file)?;
    let reg = second
        .register(&agent_id, metadata("second run"), Some(cert.clone()), false)
        .await?;
    println!(
        "   registered: session {} on node {}",
        reg.session_id, reg.node_id
    );
    let mut second_events = second.events();

    println!(
        "4. the second run hangs with its connection open; a third run takes over from {}",
        nodes[2 % nodes.len()]
    );
    let third = client_on(&nodes, &ca, 2).await?;
    let reg = third
        .register(&agent_id, metadata("third run"), Some(cert), false)
        .await?;
    println!(
        "   registered: session {} on node {} (took over: {})",
        reg.session_id, reg.node_id, reg.took_over
    );
    match tokio::time::timeout(Duration::from_secs(5), second_events.recv()).await {
        Ok(Ok(ClientEvent::SessionLost { reason })) => {
            println!("   the left-behind session was told: {reason}")
        }
        other => println!("   (no notice reached the left-behind session: {other:?})"),
    }

    println!("5. someone without the certificate cannot take the id");
    let stranger = client_on(&nodes, &ca, 0).await?;
    match stranger.register(&agent_id, Map::new(), None, true).await {
        Err(ClientError::Refused(r)) => println!("   refused ({}): {}", r.code, r.error),
        Err(e) => anyhow::bail!("no answer from the cluster: {e}"),
        Ok(r) => anyhow::bail!("a stranger registered {agent_id}: {r:?}"),
    }

    println!("6. release the id (its certificate is revoked)");
    let cert = third
        .certificate()
        .context("third run holds the certificate")?;
    third.release_agent_id(&cert).await?;
    let v = stranger.validate_certificate(&cert).await?;
    println!(
        "   validation now says: valid={} reason={:?}",
        v.valid, v.reason
    );
    third.close().await;
    stranger.close().await;
    Ok(())
}
