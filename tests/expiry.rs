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
        let claims = metric(cluster.node(*id), "agentreg_claims").await;
        assert_eq!(claims, Some(1.0), "node {id}");
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

/// Mid-upgrade, a member of a build before `ForgetExpiredClaims` could not read the entry:
/// it would stop following at it, and with a second such member the cluster would commit
/// nothing more. So while a member has not said it reads the entry (a build before build
/// probes refuses the question unread), the leader keeps the expired claims and says why;
/// once every member reads it, they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_claims_wait_until_every_member_reads_the_entry_that_forgets_them() {
    let (cluster, leader) = TestCluster::ready(Options::default()).await;
    let earlier = cluster.follower().await;
    cluster.node(earlier).act_as_earlier_build_for_tests(true);
    let peer_format = format!("agentreg_peer_log_format{{peer=\"{earlier}\"}}");
    wait_for(
        "the leader to hear that a member reads log format 1",
        TIMEOUT,
        || async { (metric(cluster.node(leader), &peer_format).await? == 1.0).then_some(()) },
    )
    .await;

    let raw = cluster.raw(leader).await;
    for i in 0..5 {
        let a = raw.request(claim(&format!("short-lived-{i}"))).await;
        assert_eq!(a["success"], true, "{a}");
    }
    claims_everywhere(&cluster, 5, "every claim").await;
    for node in cluster.nodes.values() {
        node.shift_clock_for_tests(A_DAY_AND_TWO_HOURS_MS);
    }
    // Its status and its gauge say so (read together: a clock probe landing between two
    // of the shifts above can make the leader distrust its clock for a round).
    let why = wait_for("the leader to say why it keeps them", TIMEOUT, || async {
        let held_back = metric(cluster.node(leader), "agentreg_expired_claims_held_back").await;
        let why = cluster.node(leader).status().forgetting_held_back?;
        (held_back == Some(1.0)).then_some(why)
    })
    .await;
    assert!(
        why.contains(&format!("node {earlier} reads log format 1, not 2")),
        "{why}"
    );
    for id in cluster.nodes.keys() {
        assert_eq!(cluster.tables(*id).claims.len(), 5, "node {id}");
    }

    // The member upgraded: the claims go, and nothing is held back any more.
    cluster.node(earlier).act_as_earlier_build_for_tests(false);
    claims_everywhere(&cluster, 0, "the expired claims forgotten").await;
    assert_eq!(cluster.node(leader).status().forgetting_held_back, None);
    assert_eq!(
        metric(cluster.node(leader), "agentreg_expired_claims_held_back").await,
        Some(0.0)
    );
    let build = cluster
        .node(earlier)
        .status()
        .build
        .expect("build in status");
    assert_eq!(build.log_format, agentreg::registry::LOG_FORMAT);
}
