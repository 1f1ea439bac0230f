//! Heartbeats with short timings: silent agents, closed connections, fencing, lost and
//! restarted nodes. Every eviction is a committed log entry, checked on every node's table.

mod common;

use std::time::Duration;

use agentreg::config::HeartbeatConfig;
use agentreg::registry::{Command, Op, Outcome};
use common::*;
use serde_json::{json, Map};
use tokio::time::Instant;

fn hb(interval_ms: u64, agent_timeout_ms: u64, ping_timeout_ms: u64) -> Options {
    Options {
        heartbeat: HeartbeatConfig {
            interval_ms,
            agent_timeout_ms,
            ping_timeout_ms,
        },
        ..Options::default()
    }
}

/// Registers `agent_id` over a raw connection that will never answer a ping.
async fn silent_agent(cluster: &TestCluster, node: u64, agent_id: &str) -> (RawAgent, u64) {
    let raw = cluster.raw(node).await;
    let a = raw
        .request(json!({"type":"system_request","command":"register_agent","agent_id":agent_id}))
        .await;
    assert_eq!(a["success"], true, "{a}");
    let session_id = a["session_id"].as_u64().unwrap();
    (raw, session_id)
}

fn session_everywhere_gone(cluster: &TestCluster, agent_id: &str) -> bool {
    cluster
        .nodes
        .keys()
        .all(|id| !cluster.tables(*id).sessions.contains_key(agent_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_agent_is_evicted_within_timeout_plus_interval_and_live_ones_stay() {
    let cluster = TestCluster::start(hb(200, 600, 150)).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let live = cluster.agent(2).await;
    let live_reg = live
        .register("lively", Map::new(), None, false)
        .await
        .unwrap();

    let (_raw, session_id) = silent_agent(&cluster, 2, "mute").await;
    cluster.applied_everywhere(session_id).await;
    let registered = Instant::now();
    // Bound: agent_timeout + heartbeat_interval, plus time to commit and apply the eviction
    // on all three nodes on a busy test machine.
    let bound = Duration::from_millis(600 + 200) + Duration::from_secs(2);
    wait_for(
        "the silent agent to be evicted on every node",
        bound,
        || async { session_everywhere_gone(&cluster, "mute").then_some(()) },
    )
    .await;
    tracing::info!(
        elapsed_ms = registered.elapsed().as_millis() as u64,
        "evicted"
    );

    // The eviction is counted once its write returns to the node that proposed it, which
    // can be a moment after every node has applied it.
    wait_for("the eviction counted on node 2", TIMEOUT, || async {
        (cluster.node(2).status().heartbeat.evictions_committed >= 1).then_some(())
    })
    .await;
    // Several more timeouts later, the agent that answers is still registered, same session.
    let status = cluster.node(2).status();
    assert!(status.heartbeat.pings_missed >= 1, "{status:?}");
    let sent_before = status.heartbeat.pings_sent;
    wait_for("more ping rounds", TIMEOUT, || async {
        (cluster.node(2).status().heartbeat.pings_sent >= sent_before + 6).then_some(())
    })
    .await;
    for id in 1..=3 {
        assert_eq!(
            cluster.tables(id).sessions["lively"].session_id,
            live_reg.session_id,
            "node {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_connection_is_evicted_without_waiting_for_the_timeout() {
    // A timeout so long the test would fail if eviction waited for it.
    let cluster = TestCluster::start(hb(5_000, 60_000, 1_000)).await;
    cluster.leader().await;
    let (raw, session_id) = silent_agent(&cluster, 3, "leaver").await;
    cluster.applied_everywhere(session_id).await;
    raw.conn.close(0u32.into(), b"bye");
    wait_for(
        "the closed connection's session to be evicted",
        Duration::from_secs(10),
        || async { session_everywhere_gone(&cluster, "leaver").then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eviction_for_an_old_session_leaves_the_new_one_in_place() {
    let cluster = TestCluster::start(Options::default()).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let a = cluster.agent(1).await;
    let cert = a.claim_agent_id("fenced", false).await.unwrap();
    let old = a.register("fenced", Map::new(), None, false).await.unwrap();
    let b = cluster.agent(3).await;
    let new = b
        .register("fenced", Map::new(), Some(cert), false)
        .await
        .unwrap();
    // The late eviction of the first session, as a slow node would send it.
    let w = cluster
        .node(1)
        .write(Command {
            at: now(),
            op: Op::Evict {
                agent_id: "fenced".into(),
                session_id: old.session_id,
            },
        })
        .await
        .unwrap();
    assert_eq!(w.response, Ok(Outcome::SessionEnded { ended: None }));
    cluster.applied_everywhere(w.index).await;
    for id in 1..=3 {
        assert_eq!(
            cluster.tables(id).sessions["fenced"].session_id,
            new.session_id,
            "node {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_nodes_sessions_vanish_and_its_agents_move_to_the_survivors() {
    let mut cluster = TestCluster::start(hb(200, 600, 150)).await;
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let victim = cluster.follower().await;

    // Agents with certificates and failover, and legacy agents without, all on the victim.
    let mut movers = Vec::new();
    for i in 0..5 {
        let c = cluster.agent(victim).await;
        let id = format!("mover-{i}");
        c.claim_agent_id(&id, false).await.unwrap();
        let reg = c.register(&id, Map::new(), None, false).await.unwrap();
        assert_eq!(reg.node_id, victim);
        movers.push((id, c));
    }
    let mut stranded = Vec::new();
    for i in 0..5 {
        let (raw, s) = silent_agent(&cluster, victim, &format!("stranded-{i}")).await;
        stranded.push(raw);
        cluster.applied_everywhere(s).await;
    }

    tracing::info!("--- killing node {victim} (leader is {leader})");
    let killed = Instant::now();
    cluster.crash(victim).await;
    let bound = Duration::from_millis(600 + 200) + Duration::from_secs(3);
    wait_for(
        "every session of the killed node gone or moved",
        bound,
        || async {
            cluster
                .nodes
                .keys()
                .all(|id| {
                    cluster
                        .tables(*id)
                        .sessions
                        .values()
                        .all(|s| s.conn.node_id != victim)
                })
                .then_some(())
        },
    )
    .await;
    tracing::info!(
        elapsed_ms = killed.elapsed().as_millis() as u64,
        "sessions of the killed node gone"
    );
    wait_for(
        "every agent with a certificate registered on a survivor",
        TIMEOUT,
        || async {
            movers
                .iter()
                .all(|(id, c)| {
                    c.registration().is_some_and(|r| r.node_id != victim)
                        && cluster.nodes.keys().all(|n| {
                            cluster
                                .tables(*n)
                                .sessions
                                .get(id)
                                .is_some_and(|s| s.conn.node_id != victim)
                        })
                })
                .then_some(())
        },
    )
    .await;
    for i in 0..5 {
        assert!(session_everywhere_gone(&cluster, &format!("stranded-{i}")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_evicts_the_sessions_it_held_before() {
    // The leader would wait 60 s before evicting a lost node's sessions: whatever goes
    // sooner was evicted by the restarted node itself.
    let mut cluster = TestCluster::start(hb(200, 60_000, 150)).await;
    cluster.leader().await;
    let node = cluster.follower().await;
    let (_raw, s) = silent_agent(&cluster, node, "from-before").await;
    cluster.applied_everywhere(s).await;
    cluster.crash(node).await;
    for id in cluster.nodes.keys() {
        assert!(
            cluster.tables(*id).sessions.contains_key("from-before"),
            "a crashed node leaves its sessions behind"
        );
    }
    cluster.restart(node).await;
    let restarted = Instant::now();
    wait_for(
        "the restarted node to evict its old session",
        Duration::from_secs(15),
        || async { session_everywhere_gone(&cluster, "from-before").then_some(()) },
    )
    .await;
    assert!(restarted.elapsed() < Duration::from_secs(30));
}

/// A node spreads its pings over the round instead of sending them all at each tick: with
/// a 1 s interval and a 200 ms ping timeout, the pings of one round reach 40 agents over
/// about 800 ms. (A burst at every tick delays the last answers past the ping timeout on a
/// busy machine, and live agents get evicted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pings_are_spread_over_the_round_not_sent_in_a_burst() {
    use agentreg::proto::agent;
    use agentreg::transport::frame::{read_frame, write_frame, MAX_AGENT_FRAME};
    use std::sync::{Arc, Mutex};

    const AGENTS: usize = 40;
    let cluster = TestCluster::start(hb(1_000, 10_000, 200)).await;
    cluster.leader().await;
    cluster.keyring_ready().await;

    // Every ping reaching any of the agents, with the instant it arrived.
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let (raw, _) = silent_agent(&cluster, 2, &format!("paced-{i}")).await;
        let (conn, arrivals) = (raw.conn.clone(), arrivals.clone());
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let Ok(_ping) = read_frame(&mut recv, MAX_AGENT_FRAME).await else {
                    return;
                };
                arrivals.lock().unwrap().push(Instant::now());
                let answer = agent::ok_response(agent::PING_AGENT, None, Map::new());
                if write_frame(&mut send, &answer).await.is_ok() {
                    let _ = send.finish();
                }
            }
        });
        agents.push(raw);
    }

    // From now on every round pings all of them. Wait for three rounds' worth of pings and
    // look at the first whole round: the 40 pings that follow the first pause.
    arrivals.lock().unwrap().clear();
    wait_for("three more ping rounds", TIMEOUT, || async {
        (arrivals.lock().unwrap().len() >= 3 * AGENTS).then_some(())
    })
    .await;
    let mut times = arrivals.lock().unwrap().clone();
    times.sort();
    let round_start = times
        .windows(2)
        .position(|w| w[1] - w[0] > Duration::from_millis(100))
        .expect("a pause between two rounds")
        + 1;
    let round = &times[round_start..round_start + AGENTS];
    let span = round[AGENTS - 1] - round[0];
    assert!(
        span >= Duration::from_millis(500),
        "one round's {AGENTS} pings arrived within {span:?}: sent in a burst"
    );
    let status = cluster.node(2).status().heartbeat;
    assert_eq!(status.evictions_proposed, 0, "{status:?}");
    drop(agents);
}

/// A node lets an agent stay silent (no keep-alives, no requests) for its agent_timeout, not
/// just QUIC's usual 10 s: a large fleet with a long heartbeat need not send a packet every
/// few seconds per agent to keep its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_connection_lives_as_long_as_the_agent_timeout() {
    use agentreg::transport::tls;

    let cluster = TestCluster::start(hb(20_000, 60_000, 5_000)).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut config = tls::agent_client_config(&cluster.ca_pem()).unwrap();
    // No keep-alives from this side, and it would wait a minute itself.
    config.transport_config(tls::agent_transport(
        Duration::ZERO,
        Duration::from_secs(60),
    ));
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(cluster.addrs[&2], tls::DEFAULT_SERVER_NAME)
        .unwrap()
        .await
        .expect("connects");
    let raw = RawAgent::from_parts(endpoint, conn);
    let a = raw
        .request(json!({"type":"system_request","command":"ping_agent","timestamp":1}))
        .await;
    assert_eq!(a["success"], true, "{a}");

    let quiet = tls::IDLE_TIMEOUT + Duration::from_secs(3);
    tokio::select! {
        reason = raw.conn.closed() => panic!("the node closed a silent connection: {reason}"),
        _ = tokio::time::sleep(quiet) => {}
    }
    let a = raw
        .request(json!({"type":"system_request","command":"ping_agent","timestamp":2}))
        .await;
    assert_eq!(a["success"], true, "{a}");
}
