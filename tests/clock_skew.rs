//! A node whose clock is far from its peers' stamps no writes and judges no certificates
//! (`clock_skew`, docs/protocol.md), and takes them up again once its clock agrees. Without
//! that, a node two days ahead would, with its next write, free ids still claimed (their
//! certificates look expired at its time) and drop revocations of certificates that are
//! still valid everywhere else.

mod common;

use std::time::Duration;

use agentreg::client::ErrorCode;
use common::*;
use serde_json::{json, Value};

const TWO_DAYS_MS: i64 = 2 * 86_400_000;

fn claim(agent_id: &str) -> Value {
    json!({"type": "system_request", "command": "claim_agent_id", "agent_id": agent_id})
}

fn validate(cert: &Value, consistency: &str) -> Value {
    json!({"type": "system_request", "command": "validate_certificate",
           "certificate": cert, "consistency": consistency})
}

/// The offset a node's metrics report for `peer`'s clock, in seconds.
async fn offset_of(node: &agentreg::node::Node, peer: u64) -> Option<f64> {
    metric(
        node,
        &format!("agentreg_peer_clock_offset_seconds{{peer=\"{peer}\"}}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_clock_is_two_days_ahead_stamps_nothing_until_it_agrees_again() {
    let (cluster, leader) = TestCluster::ready(Options::default()).await;
    let skewed = cluster.follower().await;
    let other = cluster.others(skewed)[0];

    // A claim, and a revoked certificate whose revocation must stay.
    let healthy = cluster.raw(other).await;
    let held = healthy.request(claim("held")).await;
    assert_eq!(held["success"], true, "{held}");
    let gone = healthy.request(claim("gone")).await;
    let gone_cert = gone["certificate"].clone();
    let revoke = json!({"type": "system_request", "command": "revoke_certificate",
                        "certificate": gone_cert});
    assert_eq!(healthy.request(revoke).await["success"], true);

    cluster.node(skewed).shift_clock_for_tests(TWO_DAYS_MS);
    let raw = cluster.raw(skewed).await;
    // It finds out from its peers' answers to its probes (a read changes nothing meanwhile).
    let refused = wait_for(
        "the skewed node to refuse",
        Duration::from_secs(15),
        || async {
            let a = raw.request(validate(&held["certificate"], "local")).await;
            (a["code"] == ErrorCode::ClockSkew.as_str()).then_some(a)
        },
    )
    .await;
    assert_eq!(refused["success"], false);
    assert!(
        refused["error"].as_str().unwrap().contains("172800"),
        "says how far: {refused}"
    );

    // Nothing it would stamp goes through: the claim of an id held elsewhere (its time would
    // have found the claim expired), a new claim, a linearizable validation.
    for request in [
        claim("held"),
        claim("fresh"),
        validate(&held["certificate"], "linearizable"),
    ] {
        let a = raw.request(request.clone()).await;
        assert_eq!(
            (a["success"].clone(), a["code"].clone()),
            (json!(false), json!("clock_skew")),
            "{request} -> {a}"
        );
    }
    // Both sides see the offset (each from its own probes).
    let near = |got: Option<f64>, want: f64| got.filter(|g| (g - want).abs() < 5.0);
    wait_for(
        "the offsets in /metrics",
        Duration::from_secs(15),
        || async {
            near(offset_of(cluster.node(skewed), leader).await, -172_800.0)?;
            near(offset_of(cluster.node(other), skewed).await, 172_800.0)
        },
    )
    .await;

    // Operators see it: `status` says why the node refuses and how far off the others are,
    // /readyz turns load balancers away, and a gauge is there to alert on. The healthy
    // nodes' status shows them serving.
    let clock = cluster
        .node(skewed)
        .status()
        .clock
        .expect("clock in status");
    let why = clock.refused.as_deref().expect("refusing");
    assert!(why.contains("ahead of node"), "{why}");
    let widest = clock.widest_offset_secs().expect("offsets");
    assert!((widest + 172_800.0).abs() < 5.0, "{clock:?}");
    let (code, body) = http_get(cluster.node(skewed), "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot vouch for its clock"), "{body}");
    let (_, metrics) = http_get(cluster.node(skewed), "/metrics").await;
    assert!(
        metrics.contains("\nagentreg_clock_refused 1\n"),
        "{metrics}"
    );
    let other_clock = cluster.node(other).status().clock.expect("clock in status");
    assert_eq!(other_clock.refused, None);
    let (code, body) = http_get(cluster.node(other), "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = http_get(cluster.node(other), "/metrics").await;
    assert!(
        metrics.contains("\nagentreg_clock_refused 0\n"),
        "{metrics}"
    );

    // AgentClient moves on by itself: its claim, sent to the skewed node first, is served by
    // the next.
    let client = cluster.agent(skewed).await;
    assert_eq!(
        client.current_node(),
        Some(cluster.addrs[&skewed].to_string())
    );
    let moved = client
        .claim_agent_id("moved", false)
        .await
        .expect("claimed elsewhere");
    assert_eq!(moved.agent_id, "moved");
    assert_ne!(
        client.current_node(),
        Some(cluster.addrs[&skewed].to_string())
    );
    client.close().await;

    // The others serve as before, and nothing changed: the id is still held, the revoked
    // certificate still revoked, no "fresh" claim.
    let a = healthy.request(claim("held")).await;
    assert_eq!(a["code"], "already_claimed", "{a}");
    let a = healthy.request(validate(&gone_cert, "linearizable")).await;
    assert_eq!(
        (a["valid"].clone(), a["code"].clone()),
        (json!(false), json!("certificate_revoked")),
        "{a}"
    );
    let tables = cluster.tables(other);
    assert!(!tables.claims.contains_key("fresh"));
    assert!(tables.revocations.len() == 1);

    // Its clock put right, it serves again.
    cluster.node(skewed).shift_clock_for_tests(0);
    let a = wait_for(
        "the node to serve again",
        Duration::from_secs(15),
        || async {
            let a = raw.request(claim("after")).await;
            (a["success"] == true).then_some(a)
        },
    )
    .await;
    assert_eq!(a["agent_id"], "after");
    let a = raw.request(validate(&held["certificate"], "local")).await;
    assert_eq!(a["valid"], true, "{a}");
    assert_eq!(cluster.node(skewed).status().clock.unwrap().refused, None);
    let (code, body) = http_get(cluster.node(skewed), "/readyz").await;
    assert_eq!(code, 200, "{body}");
}
