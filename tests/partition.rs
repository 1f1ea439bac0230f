//! A node cut off from the other two across the real QUIC transport (UDP proxies between the
//! nodes): it commits nothing, so it evicts nothing; the majority keeps serving and evicts
//! the cut node's sessions; agents moving over take over at once; after the cut heals every
//! node holds the same tables.

mod common;

use std::time::Duration;

use agentreg::config::{HeartbeatConfig, RaftConfig};
use agentreg::registry::Outcome;
use common::*;
use serde_json::{json, Map};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_node_commits_nothing_and_converges_after_healing() {
    let cluster = TestCluster::start(Options {
        heartbeat: HeartbeatConfig {
            interval_ms: 200,
            agent_timeout_ms: 600,
            ping_timeout_ms: 150,
        },
        faults: true,
        ..Options::default()
    })
    .await;
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let cut = cluster.follower().await;
    let majority = cluster.others(cut);

    // An agent with a certificate and one without, both on the node about to be cut off.
    let roamer = cluster.agent(cut).await;
    let cert = roamer.claim_agent_id("roamer", false).await.unwrap();
    let reg = roamer
        .register("roamer", Map::new(), None, false)
        .await
        .unwrap();
    assert_eq!(reg.node_id, cut);
    let legacy = cluster.raw(cut).await;
    let a = legacy
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"legacy"}))
        .await;
    assert_eq!(a["success"], true, "{a}");
    cluster
        .applied_everywhere(a["session_id"].as_u64().unwrap())
        .await;

    tracing::info!("--- cutting node {cut} off (leader {leader})");
    cluster.net().isolate(cut);
    let frozen = cluster.node(cut).status();

    tracing::info!("--- the majority evicts the cut node's sessions and keeps serving");
    let bound = Duration::from_millis(600 + 200) + Duration::from_secs(4);
    wait_for(
        "the majority to evict the cut node's sessions",
        bound,
        || async {
            majority
                .iter()
                .all(|id| {
                    cluster
                        .tables(*id)
                        .sessions
                        .values()
                        .all(|s| s.conn.node_id != cut)
                })
                .then_some(())
        },
    )
    .await;
    let w = claim_ok(cluster.node(majority[0]), "during-the-cut").await;
    // The agent's second instance registers on the majority side with the certificate: at once.
    let heir = cluster.agent(majority[1]).await;
    let heir_reg = heir
        .register("roamer", Map::new(), Some(cert.clone()), false)
        .await
        .unwrap();
    assert_eq!(heir_reg.node_id, majority[1]);

    tracing::info!("--- the cut node committed and applied nothing, evicted nothing");
    let during = cluster.node(cut).status();
    assert_eq!(
        during.applied_index, frozen.applied_index,
        "the cut node applied entries"
    );
    assert_eq!(
        during.heartbeat.evictions_committed,
        frozen.heartbeat.evictions_committed
    );
    assert!(cluster.tables(cut).sessions.contains_key("legacy"));
    assert!(!cluster.tables(cut).claims.contains_key("during-the-cut"));
    // And a write through it cannot succeed (no quorum), even forwarded.
    let raw = cluster.raw(cut).await;
    let a = raw
        .request(
            json!({"type":"system_request","command":"claim_agent_id","agent_id":"minority-claim"}),
        )
        .await;
    assert_eq!(a["success"], false, "{a}");

    tracing::info!("--- healing");
    cluster.net().heal();
    let last = cluster
        .node(majority[0])
        .raft()
        .metrics()
        .borrow()
        .last_log_index
        .unwrap();
    cluster.applied_everywhere(last.max(w.index)).await;
    // With a 600 ms agent timeout a starved test machine can evict "roamer" for a moment
    // (its client then registers it again): wait for agreeing tables that hold it.
    wait_for(
        "all three nodes to hold the same tables, with a session for roamer",
        TIMEOUT,
        || async {
            let t1 = cluster.tables(1);
            (t1 == cluster.tables(2)
                && t1 == cluster.tables(3)
                && t1.sessions.contains_key("roamer"))
            .then_some(())
        },
    )
    .await;
    let t = cluster.tables(cut);
    assert!(
        !t.claims.contains_key("minority-claim"),
        "a minority write was applied"
    );
    assert!(
        !t.sessions.contains_key("legacy"),
        "the evicted legacy session came back"
    );
    // One owner for "roamer": the session in the table is held by a live client.
    let s = &t.sessions["roamer"];
    let owners: Vec<u64> = [&roamer, &heir]
        .iter()
        .filter_map(|c| c.registration())
        .filter(|r| r.session_id == s.session_id)
        .map(|r| r.node_id)
        .collect();
    assert_eq!(
        owners.len(),
        1,
        "session {} is claimed by {owners:?}",
        s.session_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_leader_acknowledges_nothing_and_its_entries_are_discarded() {
    let (cluster, old) = TestCluster::ready_with_faults().await;
    let others = cluster.others(old);

    tracing::info!("--- isolating leader {old}");
    cluster.net().isolate(old);
    let raw = cluster.raw(old).await;
    let started = tokio::time::Instant::now();
    let a = raw
        .request(
            json!({"type":"system_request","command":"claim_agent_id","agent_id":"orphan-claim"}),
        )
        .await;
    assert_eq!(
        a["success"], false,
        "an isolated leader acknowledged a write: {a}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the refusal took {:?}",
        started.elapsed()
    );

    tracing::info!("--- the majority elects a new leader and serves");
    let new = cluster.leader_among(&others).await;
    let w = claim_ok(cluster.node(new), "majority-claim").await;

    tracing::info!("--- healing: the old leader's uncommitted entry is discarded");
    cluster.net().heal();
    wait_for(
        "all three nodes to hold the same tables",
        TIMEOUT,
        || async {
            let t1 = cluster.tables(1);
            (t1 == cluster.tables(2)
                && t1 == cluster.tables(3)
                && t1.claims.contains_key("majority-claim"))
            .then_some(())
        },
    )
    .await;
    cluster.applied_everywhere(w.index).await;
    for id in 1..=3 {
        assert!(
            !cluster.tables(id).claims.contains_key("orphan-claim"),
            "node {id}"
        );
    }
}

/// A cut-off node refuses a linearizable validation ("cluster unavailable") but answers a
/// local one from its own tables, and the local verdict can be stale: a revocation the
/// majority acknowledged meanwhile is not seen there until the cut heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_validation_answers_without_a_quorum_and_may_be_stale() {
    let (cluster, leader) = TestCluster::ready_with_faults().await;
    let cut = cluster.follower().await;
    let agent = cluster.agent(leader).await;
    let cert = agent.claim_agent_id("local-reader", false).await.unwrap();
    cluster.applied_everywhere(cert.serial).await;

    cluster.net().isolate(cut);
    agent.revoke_certificate(&cert).await.unwrap();
    let raw = cluster.raw(cut).await;
    let validate = |consistency: &str| {
        json!({"type": "system_request", "command": "validate_certificate",
               "certificate": cert, "consistency": consistency})
    };
    let lin = raw.request(validate("linearizable")).await;
    assert_eq!(lin["success"], false, "{lin}");
    assert_eq!(lin["code"], "unavailable", "{lin}");
    assert!(
        lin["error"].as_str().unwrap().contains("unavailable"),
        "{lin}"
    );
    let local = raw.request(validate("local")).await;
    assert_eq!(local["success"], true, "{local}");
    assert_eq!(
        local["valid"], true,
        "the cut-off node has not seen the revocation: {local}"
    );

    cluster.net().heal();
    wait_for("the healed node to see the revocation", TIMEOUT, || async {
        let v = raw.request(validate("local")).await;
        (v["valid"] == false).then_some(())
    })
    .await;
    agent.close().await;
}

/// Found by the fault suite (its double-owner check): an unregister sent to a node that had
/// not yet applied a takeover of its agent's session was answered with success. The node
/// proposes Unregister with the session id from its own, lagging table; once applied that
/// entry ends nothing (the id no longer matches), and the agent must be told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unregister_proposed_from_a_lagging_table_after_a_takeover_is_refused() {
    let (cluster, _) = TestCluster::ready_with_faults().await;
    let lagging = cluster.follower().await;
    let other = (1..=3).find(|id| *id != lagging).unwrap();

    let old = cluster.raw(lagging).await;
    agentreg::client::spawn_ping_answerer(old.conn.clone());
    let c = old
        .request(json!({"type":"system_request","command":"claim_agent_id","agent_id":"u"}))
        .await;
    assert_eq!(c["success"], true, "{c}");
    let cert = c["certificate"].clone();
    let r = old
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"u","certificate":cert}))
        .await;
    assert_eq!(r["success"], true, "{r}");
    let old_session = r["session_id"].as_u64().unwrap();
    cluster.applied_everywhere(old_session).await;

    tracing::info!("--- node {lagging} cut off; the agent takes its id over through node {other}");
    cluster.net().isolate(lagging);
    let new = cluster.raw(other).await;
    agentreg::client::spawn_ping_answerer(new.conn.clone());
    let t = new
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"u","certificate":cert}))
        .await;
    assert_eq!(t["success"], true, "{t}");
    assert_eq!(t["took_over"], true, "{t}");
    assert_eq!(
        cluster.tables(lagging).sessions["u"].session_id,
        old_session,
        "the cut-off node still holds the old session"
    );

    tracing::info!(
        "--- the old connection unregisters through the lagging node, then the cut heals"
    );
    let answer = tokio::spawn(async move {
        let body = json!({"type":"system_request","command":"unregister_agent","agent_id":"u"})
            .to_string()
            .into_bytes();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let a = old.send_raw(&frame).await;
        (a, old.conn.close_reason())
    });
    // The node reads the session id from its table as the request arrives; it cannot catch
    // up before the cut heals.
    wait_for(
        "the unregister to reach the lagging node",
        TIMEOUT,
        || async { (cluster.node(lagging).requests_in_flight() > 0).then_some(()) },
    )
    .await;
    cluster.net().heal();
    // Applying the takeover also closes the old connection (taken over), so the answer may
    // lose that race; what it must never be is a success.
    match answer.await.unwrap() {
        (Some(a), _) => {
            assert_eq!(a["success"], false, "{a}");
            assert_eq!(a["code"], "not_registered", "{a}");
            assert_eq!(
                a["error"],
                format!("Agent ID u is not registered on this connection (session {old_session} already ended)"),
                "{a}"
            );
        }
        (None, reason) => assert!(
            matches!(&reason, Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code == quinn::VarInt::from_u32(agentreg::node::close_code::TAKEN_OVER)),
            "no answer, and the connection was not closed as taken over: {reason:?}"
        ),
    }
    let w = claim_ok(cluster.node(other), "barrier").await;
    cluster.applied_everywhere(w.index).await;
    for id in 1..=3 {
        let s = &cluster.tables(id).sessions["u"];
        assert_eq!(s.session_id, t["session_id"].as_u64().unwrap(), "node {id}");
    }
}

/// Two nodes whose link was cut for a while must serve as a quorum as soon as the cut heals,
/// when the third node goes next. While a path drops everything, QUIC backs off its
/// retransmissions exponentially (each probe timeout doubles), so after a few seconds of loss
/// the connection's next probe can be seconds away, and a connection kept through the cut
/// would carry nothing for that long after the heal, with both nodes up and a quorum between
/// them. (Seen in fault runs: "cut 2-3, heal, isolate 1" left nodes 2 and 3 unable to commit
/// for up to 5 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quorum_whose_link_was_cut_commits_promptly_once_it_heals() {
    let cluster = TestCluster::start(Options {
        raft: RaftConfig {
            write_timeout_ms: 1_000,
            ..Options::default().raft
        },
        faults: true,
        ..Options::default()
    })
    .await;
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let follower = cluster.follower().await;
    let third = (1..=3).find(|id| ![leader, follower].contains(id)).unwrap();

    tracing::info!("--- cutting {leader}-{follower}; {third} keeps the quorum");
    cluster.net().cut(leader, follower);
    // The cut lasts long enough for QUIC's probe timeout to back off to seconds; the
    // cluster keeps committing through it (leader and third).
    let cut_until = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut n = 0;
    while tokio::time::Instant::now() < cut_until {
        n += 1;
        let _ = cluster
            .node(third)
            .write(claim(&format!("during-cut-{n}")))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    tracing::info!("--- healing, then cutting {third} off: {leader} and {follower} are the quorum");
    cluster.net().heal();
    cluster.net().isolate(third);
    let started = tokio::time::Instant::now();
    // A takeover may be needed (the follower campaigned during the cut, with a higher term):
    // lease (800 ms) + election timeout (<= 800 ms) + a vote and a commit, with room.
    let bound = Duration::from_millis(800 + 800) + Duration::from_millis(1_400);
    let mut attempt = 0;
    let by = wait_for("a write committed by the two-node quorum", TIMEOUT, || {
        attempt += 1;
        let id = if attempt % 2 == 0 { leader } else { follower };
        let cmd = claim(&format!("after-heal-{attempt}"));
        let cluster = &cluster;
        async move {
            let w = cluster.node(id).write(cmd).await.ok()?;
            matches!(w.response, Ok(Outcome::Claimed { .. })).then_some(id)
        }
    })
    .await;
    let took = started.elapsed();
    tracing::info!("--- node {by} committed a write {took:?} after the heal");
    assert!(
        took < bound,
        "the two-node quorum committed nothing for {took:?} after the heal (bound {bound:?})"
    );
}

/// A leader cut off with writes in flight, whose entries are then dropped not by a
/// conflicting entry but by a snapshot from the leader that moved on (its log was behind the
/// snapshot), must propose again when it leads next. openraft answers a pending write when
/// its index is applied or truncated; a snapshot that covers the index does neither, so
/// without help the write would wait forever and hold one of the proposer's slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_stranded_writes_a_snapshot_dropped_proposes_again() {
    let cluster = TestCluster::start(Options {
        raft: RaftConfig {
            write_timeout_ms: 1_000,
            snapshot_logs_since_last: 20,
            max_in_snapshot_log_to_keep: 0,
            ..Options::default().raft
        },
        faults: true,
        ..Options::default()
    })
    .await;
    let old = cluster.leader().await;
    cluster.keyring_ready().await;
    let others = cluster.others(old);

    tracing::info!("--- isolating leader {old} with writes in flight");
    cluster.net().isolate(old);
    // One after the other, so that each is an entry of its own and the proposer's every slot
    // holds one (each call gives up after the write timeout; its entry stays in the log).
    for i in 0..2 {
        let r = cluster
            .node(old)
            .write(claim(&format!("stranded-{i}")))
            .await;
        assert!(r.is_err(), "an isolated leader acknowledged a write: {r:?}");
    }

    tracing::info!("--- the majority moves on past a snapshot");
    let new = cluster.leader_among(&others).await;
    let mut last = 0;
    for i in 0..60 {
        last = claim_ok(cluster.node(new), &format!("moved-on-{i}"))
            .await
            .index;
    }
    let old_last = cluster
        .node(old)
        .raft()
        .metrics()
        .borrow()
        .last_log_index
        .unwrap_or(0);
    wait_for("a snapshot past the old leader's log", TIMEOUT, || async {
        let m = cluster.node(new).raft().metrics().borrow().clone();
        (m.purged.map_or(0, |p| p.index) > old_last).then_some(())
    })
    .await;

    tracing::info!("--- healing: {old} catches up by snapshot");
    cluster.net().heal();
    cluster.applied_everywhere(last).await;

    tracing::info!("--- {old} leads again and must propose");
    cluster.net().isolate(new);
    let third = *others.iter().find(|id| **id != new).unwrap();
    wait_for(
        &format!("node {old} elected with {third}"),
        TIMEOUT,
        || async {
            let m = cluster.node(old).raft().metrics().borrow().clone();
            if m.current_leader == Some(old) {
                return Some(());
            }
            let _ = cluster.node(old).raft().trigger().elect().await;
            None
        },
    )
    .await;
    let started = tokio::time::Instant::now();
    let w = cluster.node(old).write(claim("after-return")).await;
    assert!(
        matches!(&w, Ok(w) if matches!(w.response, Ok(Outcome::Claimed { .. }))),
        "node {old}, leading again, could not commit: {w:?} after {:?}",
        started.elapsed()
    );
}
