//! Membership changes while serving: a fourth node joins, a dead node is removed, agents
//! stay connected and writes go on.

mod common;

use agentreg::cli::AdminClient;
use agentreg::node::AdminRequest;
use common::*;
use serde_json::Map;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fourth_node_joins_and_a_dead_one_is_removed_while_agents_stay_connected() {
    let mut cluster = TestCluster::start(Options {
        spares: 1,
        ..Options::default()
    })
    .await;
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let doomed = cluster.follower().await;
    let steady: Vec<u64> = (1..=3).filter(|id| *id != doomed).collect();
    // A legacy agent on the node that will die, and be removed, with its session.
    let stranded = cluster.raw(doomed).await;
    let a = stranded
        .request(serde_json::json!({"type":"system_request","command":"register_agent","agent_id":"stranded"}))
        .await;
    assert_eq!(a["success"], true, "{a}");
    let mut agents = Vec::new();
    for (i, node) in steady.iter().enumerate() {
        let c = cluster.agent(*node).await;
        let id = format!("steady-{i}");
        c.claim_agent_id(&id, false).await.unwrap();
        let reg = c.register(&id, Map::new(), None, false).await.unwrap();
        agents.push((id, c, reg));
    }

    tracing::info!("--- node 4 joins");
    cluster.start_spare(4).await;
    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    let leader_addr = cluster.addrs[&leader].to_string();
    let v = admin
        .call(
            &leader_addr,
            &AdminRequest::MembersAdd {
                node_id: 4,
                addr: cluster.addrs[&4].to_string(),
            },
        )
        .await
        .unwrap();
    let index = v["index"].as_u64().unwrap();
    // Adding it again is refused.
    assert!(admin
        .call(
            &leader_addr,
            &AdminRequest::MembersAdd {
                node_id: 4,
                addr: cluster.addrs[&4].to_string()
            }
        )
        .await
        .is_err());
    // A follower says where the leader is.
    let follower_addr = cluster.addrs[&steady
        .iter()
        .copied()
        .find(|id| *id != leader)
        .unwrap_or(doomed)]
        .to_string();
    let err = admin
        .call(
            &follower_addr,
            &AdminRequest::MembersRemove { node_id: doomed },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("run on the leader"), "{err:#}");
    cluster.applied_everywhere(index).await;
    // With four voters the leadership cannot be handed over (two votes are no majority).
    let err = admin
        .call(
            &leader_addr,
            &AdminRequest::MembersMoveLeader { node_id: Some(4) },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("two or three voters"), "{err:#}");
    assert_eq!(
        cluster.tables(4),
        cluster.tables(leader),
        "the new node did not catch up"
    );

    // The others know its clock (and would go on reporting it once it is removed).
    let gauge = format!("agentreg_peer_clock_offset_seconds{{peer=\"{doomed}\"}}");
    let reports = |metrics: &str| metrics.contains(&gauge);
    wait_for("the others to know its clock", TIMEOUT, || async {
        for n in &steady {
            let (_, metrics) = http_get(cluster.node(*n), "/metrics").await;
            if !reports(&metrics) {
                return None;
            }
        }
        Some(())
    })
    .await;

    tracing::info!("--- node {doomed} dies and is removed");
    cluster.crash(doomed).await;
    let v = admin
        .call(
            &leader_addr,
            &AdminRequest::MembersRemove { node_id: doomed },
        )
        .await
        .unwrap();
    cluster
        .applied_everywhere(v["index"].as_u64().unwrap())
        .await;
    for id in cluster.nodes.keys() {
        let members: Vec<u64> = cluster
            .node(*id)
            .status()
            .members
            .iter()
            .map(|m| m.id)
            .collect();
        let mut want: Vec<u64> = steady.clone();
        want.push(4);
        want.sort();
        assert_eq!(members, want, "node {id}");
    }
    // The removed node's sessions are evicted by the leader like a lost node's.
    wait_for(
        "the removed node's session to be evicted",
        TIMEOUT,
        || async {
            cluster
                .nodes
                .keys()
                .all(|n| !cluster.tables(*n).sessions.contains_key("stranded"))
                .then_some(())
        },
    )
    .await;
    // Nor do the others go on reporting its clock (its last offset would stay in /metrics).
    wait_for(
        "the removed node's clock offset to leave /metrics",
        TIMEOUT,
        || async {
            for n in cluster.nodes.keys() {
                let (_, metrics) = http_get(cluster.node(*n), "/metrics").await;
                if reports(&metrics) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    for n in cluster.nodes.keys() {
        let clock = cluster.node(*n).status().clock.expect("clock in status");
        assert!(
            !clock.peer_offsets_secs.contains_key(&doomed),
            "node {n}: {clock:?}"
        );
    }
    // Writes go on, through the new node too, and the agents never left their sessions.
    let w = claim_ok(cluster.node(4), "after-membership-change").await;
    cluster.applied_everywhere(w.index).await;
    for (id, c, reg) in &agents {
        assert_eq!(
            c.registration().unwrap().session_id,
            reg.session_id,
            "{id} had to reconnect"
        );
        for n in cluster.nodes.keys() {
            assert_eq!(
                cluster.tables(*n).sessions[id].session_id,
                reg.session_id,
                "node {n}"
            );
        }
    }
    admin.close().await;
}

/// `agentreg members move-leader`: the leader hands its leadership to the node named (or to
/// any caught-up voter) and writes go on; refused, changing nothing, at a follower, for a
/// node that does not vote and for the leader itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leadership_moves_to_the_node_named_and_writes_go_on() {
    let (cluster, leader) = TestCluster::ready(Options::default()).await;
    cluster.keyring_ready().await;
    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    let at = |id: u64| cluster.addrs[&id].to_string();
    let move_to = |node_id| AdminRequest::MembersMoveLeader { node_id };
    // The higher of the two followers: the first caught up (the lower) would not do.
    let named = cluster.others(leader).into_iter().max().unwrap();
    let follower = cluster.others(leader).into_iter().min().unwrap();

    for (to, node_id, said) in [
        (follower, Some(named), "run on the leader"),
        (leader, Some(9), "not a voting member"),
        (leader, Some(leader), "leads already"),
    ] {
        let err = admin.call(&at(to), &move_to(node_id)).await.unwrap_err();
        assert!(err.to_string().contains(said), "{err:#}");
    }
    assert_eq!(cluster.leader().await, leader);
    let term = cluster.term(leader);

    let v = admin
        .call(&at(leader), &move_to(Some(named)))
        .await
        .unwrap();
    assert_eq!(v["leader"], named, "{v}");
    let nodes = &cluster;
    let handovers = |id| metric(nodes.node(id), "agentreg_leadership_handovers_total");
    assert_eq!(handovers(leader).await, Some(1.0));
    assert_eq!(handovers(named).await, Some(0.0));
    assert_eq!(cluster.leader().await, named);
    assert_eq!(cluster.term(named), term + 1, "one election, won at once");
    // Writes go on, through the old leader too.
    claim_ok(cluster.node(leader), "after-the-move").await;

    // And on to whichever voter is ready.
    let v = admin.call(&at(named), &move_to(None)).await.unwrap();
    let next = v["leader"].as_u64().unwrap();
    assert_ne!(next, named, "{v}");
    assert_eq!(cluster.leader().await, next);
    claim_ok(cluster.node(named), "after-the-second-move").await;

    // A voter that has stopped answering is refused at once, and the leadership stays.
    let mut cluster = cluster;
    let gone = cluster.others(next).into_iter().max().unwrap();
    cluster.crash(gone).await;
    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    let refusal = wait_for("a move to the crashed node refused", TIMEOUT, || async {
        let err = admin
            .call(&cluster.addrs[&next].to_string(), &move_to(Some(gone)))
            .await
            .expect_err("no move to a crashed node");
        let err = err.to_string();
        err.contains("has not answered").then_some(err)
    })
    .await;
    assert!(refusal.contains(&format!("node {gone}")), "{refusal}");
    assert_eq!(cluster.leader().await, next);
}
