//! Claims per source address (`[limits]`): an address that claims faster than the node
//! allows is refused with `rate_limited` and the time to wait, nothing is written for the
//! refused claims, and other addresses and other nodes are not held up.

mod common;

use agentreg::client::{ClientError, ErrorCode};
use agentreg::config::LimitsConfig;
use common::*;
use serde_json::{json, Value};

fn claim(agent_id: &str) -> Value {
    json!({"type": "system_request", "command": "claim_agent_id", "agent_id": agent_id})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_address_that_claims_too_fast_waits_and_nothing_is_written_for_it() {
    let opts = Options {
        // A burst of 3, then one a second.
        limits: LimitsConfig {
            claims_per_hour_per_address: 3_600,
            claim_burst: 3,
        },
        ..Options::default()
    };
    let (cluster, _) = TestCluster::ready(opts).await;
    let flooder = cluster.raw_from(1, "127.0.0.1").await;
    for i in 0..3 {
        let a = flooder.request(claim(&format!("burst-{i}"))).await;
        assert_eq!(a["success"], true, "{a}");
    }
    let refused = flooder.request(claim("one-too-many")).await;
    assert_eq!(
        (refused["success"].clone(), refused["code"].clone()),
        (json!(false), json!("rate_limited")),
        "{refused}"
    );
    let wait = refused["retry_after_ms"]
        .as_u64()
        .expect("how long to wait");
    assert!((1..=1_000).contains(&wait), "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("127.0.0.1"),
        "{refused}"
    );

    // Another address on the same node, and the same address on another node, claim.
    let neighbour = cluster.raw_from(1, "127.0.0.2").await;
    assert_eq!(neighbour.request(claim("neighbour")).await["success"], true);
    let elsewhere = cluster.raw_from(2, "127.0.0.1").await;
    assert_eq!(elsewhere.request(claim("elsewhere")).await["success"], true);

    // Nothing was written for the refused claim.
    let w = claim_ok(cluster.node(1), "barrier").await;
    cluster.applied_everywhere(w.index).await;
    for id in 1..=3 {
        assert!(
            !cluster.tables(id).claims.contains_key("one-too-many"),
            "node {id}"
        );
    }
    let (_, metrics) = http_get(cluster.node(1), "/metrics").await;
    assert!(
        metrics.contains("\nagentreg_claims_rate_limited_total 1\n"),
        "{metrics}"
    );

    // Once the bucket has refilled (a second), the address claims again.
    let again = wait_for("the address to claim again", TIMEOUT, || async {
        let a = flooder.request(claim("one-too-many")).await;
        (a["success"] == true).then_some(a)
    })
    .await;
    assert_eq!(again["agent_id"], "one-too-many");

    // AgentClient hands the refusal and the wait to its caller (it does not try the id on
    // another node: the limit is the operator's).
    let client = cluster.agent(1).await;
    let refusal = loop {
        match client.claim_agent_id("client-claim", false).await {
            Ok(cert) => client.release_agent_id(&cert).await.expect("release"),
            Err(ClientError::Refused(r)) => break r,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(refusal.code, ErrorCode::RateLimited, "{refusal}");
    assert!(refusal.retry_after_ms.is_some(), "{refusal:?}");
    client.close().await;
}
