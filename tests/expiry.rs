//! Claims whose certificates expired over an hour ago are forgotten by the whole cluster (the
//! leader proposes `ForgetExpiredClaims`), unless an agent registered with the certificate is
//! still connected. Without that, every id ever claimed (agents that claim a fresh id each
//! run, and never come back) would keep its row in every node's memory, snapshots and
//! backups for as long as the cluster runs.

mod common;

use common::*;
use serde_json::{json, Value};

/// Past the 24 h certificates the nodes issue and the hour an expired claim is still kept.
const A_DAY_AND_TWO_HOURS_MS: i64 = 26 * 3_600_000;

fn claim(agent_id: &str) -> Value {
    json!({"type": "system_request", "command": "claim_agent_id", "agent_id": agent_id})
}

fn claims_gauge(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("agentreg_claims "))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until every node's claims table holds `n` claims.
async fn claims_everywhere(cluster: &TestCluster, n: usize, what: &str) {
    wait_for(&format!("{what} on every node"), TIMEOUT, || async {
        cluster
            .nodes
            .keys()
            .all(|id| cluster.tables(*id).claims.len() == n)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_expired_over_an_hour_ago_are_forgotten_everywhere_unless_held() {
    let (mut cluster, leader) = TestCluster::ready(Options::default()).await;
    let f = cluster.follower().await;
    let spare = cluster
        .others(f)
        .into_iter()
        .find(|n| *n != leader)
        .unwrap();

    // Agents that claim an id and leave.
    let raw = cluster.raw(f).await;
    for i in 0..20 {
        let a = raw.request(claim(&format!("ephemeral-{i}"))).await;
        assert_eq!(a["success"], true, "{a}");
    }
    // One that stays connected, registered with its certificate.
    let agent = cluster.agent(f).await;
    let cert = agent.claim_agent_id("stays", false).await.unwrap();
    agent
        .register("stays", Default::default(), Some(cert), false)
        .await
        .unwrap();
    claims_everywhere(&cluster, 21, "every claim").await;
    // Nothing is forgotten while the certificates are valid.
    assert_eq!(cluster.tables(leader).claims.len(), 21);

    // A day and two hours later by every node's clock.
    for node in cluster.nodes.values() {
        node.shift_clock_for_tests(A_DAY_AND_TWO_HOURS_MS);
    }
    claims_everywhere(&cluster, 1, "the expired claims forgotten").await;
    let tables = cluster.tables(leader);
    assert!(tables.claims.contains_key("stays"), "the held claim stays");
    assert!(tables.sessions.contains_key("stays"));
    for id in cluster.nodes.keys() {
        assert_eq!(cluster.tables(*id).digest(), tables.digest(), "node {id}");
        let (_, metrics) = http_get(cluster.node(*id), "/metrics").await;
        assert_eq!(claims_gauge(&metrics), Some(1.0), "node {id}");
    }

    // A forgotten id is free, as it was once expired.
    let again = raw.request(claim("ephemeral-0")).await;
    assert_eq!(again["success"], true, "{again}");

    // A node restarted from its data dir rebuilds the same tables.
    cluster.stop(spare).await;
    cluster.restart(spare).await;
    wait_for("the restarted node to catch up", TIMEOUT, || async {
        (cluster.tables(spare).digest() == cluster.tables(leader).digest()).then_some(())
    })
    .await;
    assert_eq!(cluster.tables(spare).claims.len(), 2);
}
