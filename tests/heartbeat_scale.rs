//! 2,000 agents on one node are pinged every interval without a false eviction.
//!
//! Ignored in the default (debug) run: 2,000 TLS handshakes and 2,000 pings a second with
//! three nodes and the agents in one unoptimised process saturate a 2-core machine, and the
//! test then measures the build, not the node. `.ci/run` runs it optimised:
//! `cargo test --release --test heartbeat_scale -- --ignored`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentreg::config::HeartbeatConfig;
use agentreg::transport::frame::{read_frame, write_frame, MAX_AGENT_FRAME};
use agentreg::transport::tls;
use common::*;
use serde_json::json;

const AGENTS: usize = 2_000;
/// Memory both ends of one agent connection may cost together (the node's side and the
/// agent's, as they share this process). quinn allocates every stream a connection may
/// open up front: with 1,024 streams allowed each way this was about 240 KiB; with an
/// agent's limits (64 towards the node, 8 towards the agent) it is about 80 KiB.
const MAX_BYTES_PER_AGENT: u64 = 128 * 1024;

/// Resident memory of this process.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

async fn request(conn: &quinn::Connection, v: serde_json::Value) -> serde_json::Value {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, v.to_string().as_bytes())
        .await
        .unwrap();
    send.finish().unwrap();
    let bytes = read_frame(&mut recv, MAX_AGENT_FRAME).await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "run optimised by .ci/run: cargo test --release --test heartbeat_scale -- --ignored"]
async fn two_thousand_agents_on_one_node_are_pinged_without_false_evictions() {
    let cluster = TestCluster::start(Options {
        heartbeat: HeartbeatConfig {
            interval_ms: 1_000,
            agent_timeout_ms: 4_000,
            ping_timeout_ms: 500,
        },
        ..Options::default()
    })
    .await;
    cluster.leader().await;
    // Agents spread over several client sockets, as over several hosts.
    let endpoints: Vec<Arc<quinn::Endpoint>> = (0..20)
        .map(|_| {
            let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            e.set_default_client_config(tls::agent_client_config(&cluster.ca_pem()).unwrap());
            Arc::new(e)
        })
        .collect();
    let node = cluster.addrs[&1];
    let rss_before = rss();

    tracing::info!("--- connecting and registering {AGENTS} agents on node 1");
    let started = tokio::time::Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..AGENTS {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let conn = endpoint
                .connect(node, tls::DEFAULT_SERVER_NAME)
                .unwrap()
                .await
                .unwrap_or_else(|e| panic!("agent {i} cannot connect: {e}"));
            agentreg::client::spawn_ping_answerer(conn.clone());
            let a = request(
                &conn,
                json!({"type":"system_request","command":"register_agent","agent_id":format!("scale-{i}")}),
            )
            .await;
            assert_eq!(a["success"], true, "{a}");
            conn
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    tracing::info!(secs = started.elapsed().as_secs_f64(), "all registered");
    let last = cluster
        .node(1)
        .raft()
        .metrics()
        .borrow()
        .last_log_index
        .unwrap();
    cluster.applied_everywhere(last).await;

    tracing::info!("--- watching five ping rounds");
    let before = cluster.node(1).status().heartbeat;
    let rounds_started = tokio::time::Instant::now();
    wait_for(
        "five rounds of pings to every agent",
        Duration::from_secs(60),
        || async {
            let hb = cluster.node(1).status().heartbeat;
            (hb.pings_sent >= before.pings_sent + 5 * AGENTS as u64).then_some(())
        },
    )
    .await;
    let elapsed = rounds_started.elapsed();
    let per_agent = rss().saturating_sub(rss_before) / AGENTS as u64;
    let after = cluster.node(1).status().heartbeat;
    tracing::info!(
        secs = elapsed.as_secs_f64(),
        pings = after.pings_sent - before.pings_sent,
        missed = after.pings_missed - before.pings_missed,
        per_agent,
        "ping rounds done"
    );
    assert!(
        per_agent < MAX_BYTES_PER_AGENT,
        "{per_agent} bytes of memory per agent connection (both ends)"
    );
    assert_eq!(after.agents_connected, AGENTS as u64);
    assert_eq!(
        after.pings_missed, before.pings_missed,
        "pings went unanswered"
    );
    assert_eq!(after.evictions_proposed, 0, "false evictions were proposed");
    for id in 1..=3 {
        assert_eq!(cluster.tables(id).sessions.len(), AGENTS, "node {id}");
    }
    // Each round fits in its interval: five rounds took about five intervals, not more.
    assert!(
        elapsed < Duration::from_secs(5 + 4),
        "five ping rounds took {elapsed:?}: a round does not fit in its interval"
    );
    for e in endpoints {
        e.close(0u32.into(), b"done");
    }
}
