//! The replicated core over real QUIC on 127.0.0.1: elections, forwarding, leader loss,
//! catch-up by snapshot, full restarts.

mod common;

use agentreg::config::RaftConfig;
use agentreg::registry::Outcome;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_sent_to_a_follower_is_applied_on_all_three() {
    let cluster = TestCluster::start(Options::default()).await;
    tracing::info!("--- waiting for a leader and the keyring");
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let follower = cluster.follower().await;
    assert_ne!(leader, follower);

    tracing::info!("--- claiming through follower {follower}");
    let w = claim_ok(cluster.node(follower), "agent-1").await;
    cluster.applied_everywhere(w.index).await;
    let Ok(Outcome::Claimed { certificate }) = &w.response else {
        unreachable!()
    };
    for id in 1..=3 {
        let t = cluster.tables(id);
        let claim = t
            .claims
            .get("agent-1")
            .unwrap_or_else(|| panic!("node {id} lacks the claim"));
        assert_eq!(claim.serial, certificate.serial, "node {id}");
        assert!(
            claim.serial >= w.index,
            "a serial is at least the claim's log index"
        );
    }
    assert_eq!(cluster.tables(1), cluster.tables(2));
    assert_eq!(cluster.tables(2), cluster.tables(3));

    tracing::info!("--- a second claim of the same id through another node is refused");
    let other = (1..=3).find(|id| *id != follower).unwrap();
    let w2 = cluster.node(other).write(claim("agent-1")).await.unwrap();
    assert!(w2.response.is_err(), "{:?}", w2.response);
}

/// Group commit: many claims in flight at once share log entries (one append, one fsync,
/// one replication round each), and every claim still gets its own answer and serial.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_share_log_entries_and_each_gets_its_own_serial() {
    let cluster = TestCluster::start(Options::default()).await;
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let before = cluster.node(leader).status().last_log_index.unwrap();
    let n = 300;
    let writes = futures::future::join_all((0..n).map(|i| {
        cluster
            .node(1 + (i as u64 % 3))
            .write(claim(&format!("burst-{i}")))
    }))
    .await;
    let mut serials = std::collections::BTreeSet::new();
    let mut last_index = 0;
    for (i, w) in writes.into_iter().enumerate() {
        let w = w.expect("write acknowledged");
        let Ok(Outcome::Claimed { certificate }) = &w.response else {
            panic!("claim {i} refused: {:?}", w.response)
        };
        assert_eq!(certificate.agent_id, format!("burst-{i}"));
        assert!(
            serials.insert(certificate.serial),
            "serial {} given twice",
            certificate.serial
        );
        last_index = last_index.max(w.index);
    }
    let used = last_index - before;
    assert!(
        used < n as u64 / 2,
        "{n} concurrent claims took {used} log entries: no group commit"
    );
    cluster.applied_everywhere(last_index).await;
    for id in 1..=3 {
        let t = cluster.tables(id);
        for i in 0..n {
            assert!(
                t.claims.contains_key(&format!("burst-{i}")),
                "node {id} lacks burst-{i}"
            );
        }
    }
    assert_eq!(cluster.tables(1), cluster.tables(2));
    assert_eq!(cluster.tables(2), cluster.tables(3));
}

/// A follower sends the writes it receives while earlier ones are on their way to the leader
/// together, in one call; every write still gets its own answer, and is applied on the
/// follower before it is acknowledged there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_forwards_concurrent_writes_in_batches_and_answers_each() {
    let cluster = TestCluster::start(Options::default()).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let follower = cluster.follower().await;
    let node = cluster.node(follower);
    // Every tenth id is claimed twice at once: exactly one of the two may win.
    let ids: Vec<String> = (0..200)
        .map(|i| format!("fwd-{}", if i % 10 == 9 { i - 1 } else { i }))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    let writes = futures::future::join_all(
        ids.iter()
            .map(|id| async move { (id, node.write(claim(id)).await) }),
    )
    .await;
    let tables = cluster.tables(follower);
    let mut won = std::collections::BTreeMap::new();
    for (id, w) in writes {
        let w = w.unwrap_or_else(|e| panic!("claim of {id} not acknowledged: {e}"));
        match &w.response {
            Ok(Outcome::Claimed { certificate }) => {
                assert_eq!(&certificate.agent_id, id, "another write's answer");
                assert!(
                    won.insert(id.clone(), certificate.serial).is_none(),
                    "{id} was claimed twice"
                );
                assert_eq!(
                    tables.claims.get(id).map(|c| c.serial),
                    Some(certificate.serial),
                    "acknowledged claim of {id} not applied on the follower"
                );
            }
            other => assert!(
                ids.iter().filter(|i| *i == id).count() == 2,
                "the only claim of {id} failed: {other:?}"
            ),
        }
    }
    assert_eq!(won.len(), distinct.len(), "every id has exactly one winner");

    let (_, text) = http_get(node, "/metrics").await;
    let counter = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    let forwarded = counter("agentreg_forwarded_writes_total");
    let calls = counter("agentreg_forward_calls_total");
    assert!(forwarded >= 200, "{forwarded} writes forwarded");
    assert!(
        calls * 4 < forwarded,
        "{forwarded} writes took {calls} calls to the leader: not batched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_leader_is_killed_a_new_one_takes_writes_and_nothing_acknowledged_is_lost() {
    let mut cluster = TestCluster::start(Options::default()).await;
    let old = cluster.leader().await;
    cluster.keyring_ready().await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let via = 1 + (i % 3);
        let id = format!("before-{i}");
        claim_ok(cluster.node(via), &id).await;
        acked.push(id);
    }

    tracing::info!("--- killing leader {old}");
    cluster.crash(old).await;
    let new = cluster.leader().await;
    assert_ne!(new, old);

    tracing::info!("--- writing through the survivors");
    let mut last = 0;
    for (i, via) in cluster
        .nodes
        .keys()
        .copied()
        .collect::<Vec<_>>()
        .into_iter()
        .cycle()
        .take(10)
        .enumerate()
    {
        let id = format!("after-{i}");
        last = claim_ok(cluster.node(via), &id).await.index;
        acked.push(id);
    }
    cluster.applied_everywhere(last).await;
    for id in cluster.nodes.keys() {
        let t = cluster.tables(*id);
        for a in &acked {
            assert!(
                t.claims.contains_key(a),
                "node {id} lost acknowledged claim {a}"
            );
        }
    }

    tracing::info!("--- the old leader comes back and converges");
    cluster.restart(old).await;
    cluster.applied_everywhere(last).await;
    assert_eq!(cluster.tables(old), cluster.tables(new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_catches_up_by_snapshot_after_the_log_was_purged() {
    let opts = Options {
        raft: RaftConfig {
            snapshot_logs_since_last: 50,
            max_in_snapshot_log_to_keep: 0,
            ..Options::default().raft
        },
        ..Options::default()
    };
    let mut cluster = TestCluster::start(opts).await;
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let lagger = cluster.follower().await;
    let lagger_index = cluster
        .node(lagger)
        .raft()
        .metrics()
        .borrow()
        .last_log_index
        .unwrap_or(0);

    tracing::info!("--- stopping node {lagger}, then writing more than a snapshot's worth");
    cluster.stop(lagger).await;
    let mut last = 0;
    for i in 0..150 {
        last = claim_ok(cluster.node(leader), &format!("bulk-{i}"))
            .await
            .index;
    }
    cluster.applied_everywhere(last).await;
    let purged = wait_for("the leader to purge its log", TIMEOUT, || async {
        let m = cluster.node(leader).raft().metrics().borrow().clone();
        m.purged.map(|p| p.index).filter(|p| *p > lagger_index)
    })
    .await;
    tracing::info!(
        purged,
        lagger_index,
        "--- leader purged past what the stopped node has"
    );

    cluster.restart(lagger).await;
    cluster.applied_everywhere(last).await;
    let m = cluster.node(lagger).raft().metrics().borrow().clone();
    assert!(
        m.snapshot.is_some_and(|s| s.index > lagger_index),
        "node {lagger} caught up without installing a snapshot: {:?}",
        m.snapshot
    );
    assert_eq!(cluster.tables(lagger), cluster.tables(leader));
    assert_eq!(cluster.tables(lagger).claims.len(), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_three_restart_from_disk_to_exactly_the_acknowledged_state() {
    let opts = Options {
        raft: RaftConfig {
            // Restart with part of the state in a snapshot and part in the log.
            snapshot_logs_since_last: 30,
            ..Options::default().raft
        },
        ..Options::default()
    };
    let mut cluster = TestCluster::start(opts).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let mut last = 0;
    for i in 0..45 {
        last = claim_ok(cluster.node(1 + i % 3), &format!("durable-{i}"))
            .await
            .index;
    }
    cluster.applied_everywhere(last).await;
    let before = cluster.tables(1);

    tracing::info!("--- stopping all three");
    for id in 1..=3 {
        cluster.stop(id).await;
    }
    tracing::info!("--- restarting all three");
    for id in 1..=3 {
        cluster.restart(id).await;
    }
    cluster.leader().await;
    cluster.applied_everywhere(last).await;
    for id in 1..=3 {
        assert_eq!(
            cluster.tables(id),
            before,
            "node {id} restarted to another state"
        );
    }
    // Still one cluster that takes writes; nothing was re-initialised.
    let w = claim_ok(cluster.node(2), "after-restart").await;
    assert!(w.index > last);
    for id in 1..=3 {
        let members = cluster.node(id).status().members;
        assert_eq!(members.len(), 3);
    }
}

/// Linearizable reads a follower serves at the same time share their read index: one call
/// to the leader (and one confirmation of leadership there) serves many of them, and each
/// still sees every write acknowledged before it began.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_linearizable_reads_on_a_follower_share_read_index_rounds() {
    let cluster = TestCluster::start(Options::default()).await;
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let follower = cluster.follower().await;
    let node = cluster.node(follower);
    let counters = || async {
        let (_, text) = http_get(node, "/metrics").await;
        let counter = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        };
        (
            counter("agentreg_read_index_reads_total"),
            counter("agentreg_read_index_rounds_total"),
        )
    };
    let (reads_before, rounds_before) = counters().await;
    cluster
        .node(leader)
        .write(claim("seen-by-every-read"))
        .await
        .expect("claim acknowledged by the leader");
    let n = 200;
    let reads = futures::future::join_all((0..n).map(|_| async {
        node.read_barrier().await?;
        Ok::<bool, agentreg::node::ReadError>(
            cluster
                .tables(follower)
                .claims
                .contains_key("seen-by-every-read"),
        )
    }))
    .await;
    for r in reads {
        assert!(
            r.expect("read barrier passed"),
            "a read began after the claim was acknowledged and did not see it"
        );
    }
    let (reads_after, rounds_after) = counters().await;
    let (reads, rounds) = (reads_after - reads_before, rounds_after - rounds_before);
    // The node's own duties (the heartbeat's orphan sweep) pass the barrier too, now and then.
    assert!(reads >= n, "{reads} reads counted for {n} barriers");
    assert!(
        rounds * 4 < n,
        "{n} concurrent reads took {rounds} read-index rounds: not shared"
    );
}
