//! A node whose disk writes fail: it stops serving instead of answering from tables that no
//! longer change, exits with status 1 for its supervisor to restart it, its agents move to
//! the other nodes, the other two go on committing, and once restarted it catches up.
//!
//! The failure is real: the node's file-size limit is dropped to zero (RLIMIT_FSIZE), so its
//! next write to the log fails with EFBIG, as on a full disk.

#[path = "common/faultnet.rs"]
#[allow(dead_code)]
mod faultnet;
#[path = "fault/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "common/wait.rs"]
mod wait;

use std::time::Duration;

use agentreg::client::{AgentClient, ClientConfig, ClientEvent};
use agentreg::proto::agent::Consistency;
use harness::{wait_for, Cluster, NODES};

/// An agent client that tries node `first` first, then the others.
async fn client(cluster: &Cluster, first: u64) -> AgentClient {
    let mut nodes = vec![cluster.addrs[&first].to_string()];
    nodes.extend(
        NODES
            .iter()
            .filter(|id| **id != first)
            .map(|id| cluster.addrs[id].to_string()),
    );
    let mut config = ClientConfig::new(nodes, cluster.ca_pem());
    config.request_timeout = Duration::from_secs(15);
    config.reconnect_max = Duration::from_millis(500);
    AgentClient::connect(config).await.expect("client connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_disk_fails_stops_and_its_agents_move() {
    let mut cluster = Cluster::start().await;
    let leader = wait_for("a leader", Duration::from_secs(30), || cluster.leader()).await;

    // An agent registered on the leader, and another client that claims through it.
    let agent = client(&cluster, leader).await;
    wait_for("the signing keyring", Duration::from_secs(30), || async {
        agent.claim_agent_id("disk-a", false).await.ok()
    })
    .await;
    let reg = agent
        .register("disk-a", Default::default(), None, false)
        .await
        .expect("registers");
    assert_eq!(reg.node_id, leader);
    let mut events = agent.events();
    let claimer = client(&cluster, leader).await;

    // From now on every write of the leader's to a file fails: the next is the log append
    // of this claim, which the other two then commit under a new leader.
    cluster.limit_file_size(leader, 0);
    let cert = claimer
        .claim_agent_id("disk-b", false)
        .await
        .expect("the other two commit the claim");

    let status = cluster
        .exited(leader, Duration::from_secs(30))
        .await
        .expect("the node whose disk failed exits on its own");
    assert_eq!(
        status.code(),
        Some(1),
        "exits with status 1 (not killed by a signal): {status}"
    );
    let log = std::fs::read_to_string(cluster.log_path(leader)).expect("log");
    assert!(
        log.contains("raft stopped on a fault") && log.contains("File too large"),
        "the log says what failed:\n{log}"
    );

    // The registered agent moved to another node by itself.
    let moved_to = wait_for(
        "the agent to register elsewhere",
        Duration::from_secs(30),
        || {
            let ev = events.try_recv().ok();
            async move {
                match ev {
                    Some(ClientEvent::Reconnected { node, .. }) => Some(node),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert_ne!(moved_to, cluster.addrs[&leader].to_string());
    assert!(
        agent
            .validate_certificate(&cert)
            .await
            .expect("answers")
            .valid
    );

    // Restarted with a working disk, the node catches up: the same claims and sessions as
    // the others, and it serves local validations from them.
    cluster.spawn(leader);
    let others: Vec<u64> = NODES.iter().copied().filter(|n| *n != leader).collect();
    let expected = wait_for("the survivors' tables", Duration::from_secs(30), || {
        cluster.tables(others[0])
    })
    .await;
    assert!(expected.0.contains_key("disk-a") && expected.0.contains_key("disk-b"));
    assert!(expected.1.contains_key("disk-a"));
    wait_for(
        "the restarted node to catch up",
        Duration::from_secs(60),
        || async { (cluster.tables(leader).await.as_ref() == Some(&expected)).then_some(()) },
    )
    .await;
    let local = client(&cluster, leader).await;
    assert_eq!(
        local.current_node(),
        Some(cluster.addrs[&leader].to_string())
    );
    let verdict = local
        .validate_certificate_with(&cert, Consistency::Local)
        .await
        .expect("the restarted node answers");
    assert!(verdict.valid);
    for c in [agent, claimer, local] {
        c.close().await;
    }
}
