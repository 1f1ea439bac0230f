//! `[limits]`: an address that claims faster than the node allows is refused with
//! `rate_limited` and the time to wait, nothing is written for the refused claims, and other
//! addresses and other nodes are not held up; a node at its limit of agent connections (in
//! all, or from one address) closes new ones unread and the agents go to another node; a
//! flood of handshakes' first packets costs the node a Retry each, not a handshake, and a
//! node full of handshakes still takes its peers' connections; a request
//! that never arrives in full is answered at a deadline, and an agent connection parks little
//! on its node, behind slow requests or in large requests it sends slowly.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentreg::client::{AgentClient, ClientError, ClientEvent, ErrorCode};
use agentreg::config::LimitsConfig;
use agentreg::transport::tls;
use common::*;
use serde_json::{json, Value};

fn claim(agent_id: &str) -> Value {
    json!({"type": "system_request", "command": "claim_agent_id", "agent_id": agent_id})
}

/// A cluster with `limits`, its nodes on 127.0.0.5: agents and floods come from other
/// addresses (127.0.0.1 and up), not from a node's, which a full node lets through.
async fn with_limits(limits: LimitsConfig) -> (TestCluster, u64) {
    TestCluster::ready(Options {
        limits,
        host: NODES_HOST,
        ..Options::default()
    })
    .await
}

const NODES_HOST: &str = "127.0.0.5";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_address_that_claims_too_fast_waits_and_nothing_is_written_for_it() {
    // A burst of 3, then one a second.
    let (cluster, _) = with_limits(LimitsConfig {
        claims_per_hour_per_address: 3_600,
        claim_burst: 3,
        ..LimitsConfig::default()
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_refused_for_the_rate_waits_as_long_as_the_node_says() {
    // One claim every two seconds from an address, no burst beyond that.
    let (cluster, _) = with_limits(LimitsConfig {
        claims_per_hour_per_address: 1_800,
        claim_burst: 1,
        ..LimitsConfig::default()
    })
    .await;
    let mut config = cluster.client_config(1);
    // Retries after other failures come fast; the renewal is due about a second into the
    // day-long certificate, before the bucket the claim emptied has refilled.
    const LIFETIME: u64 = 24 * 3600;
    config.reconnect_max = Duration::from_millis(50);
    config.renew_fraction = 1.0 / LIFETIME as f64;
    let client = AgentClient::connect(config).await.expect("connect");
    let mut events = client.events();
    let first = client
        .claim_agent_id("renewer", false)
        .await
        .expect("claim");
    assert_eq!(first.expires_at - first.issued_at, LIFETIME);
    client.set_certificate(first.clone());

    let mut refusals = Vec::new();
    let renewed = tokio::time::timeout(TIMEOUT, async {
        loop {
            match events.recv().await {
                Ok(ClientEvent::Renewed { serial, .. }) => break serial,
                Ok(ClientEvent::Trouble { error }) => refusals.push(error),
                Ok(_) => {}
                Err(e) => refusals.push(format!("events lost: {e}")),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("renewed; troubles: {refusals:?}"));
    assert_ne!(renewed, first.serial);
    // Refused once, then sent again when the node said, not every 50 ms.
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    assert!(refusals[0].contains("too many claims"), "{refusals:?}");
    let (_, metrics) = http_get(cluster.node(1), "/metrics").await;
    assert!(
        metrics.contains("\nagentreg_claims_rate_limited_total 1\n"),
        "{metrics}"
    );
    client.close().await;
}

/// How the node closed `agent`'s connection: (code, reason).
async fn closed(agent: &RawAgent) -> (u64, String) {
    let reason = tokio::time::timeout(TIMEOUT, agent.conn.closed())
        .await
        .expect("the node closes the connection");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("closed otherwise: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_at_its_connection_limits_sends_new_agents_to_another_node() {
    let (cluster, _) = with_limits(LimitsConfig {
        max_agent_connections: 3,
        max_agent_connections_per_address: 2,
        ..LimitsConfig::default()
    })
    .await;
    let busy = u64::from(agentreg::node::close_code::BUSY);

    // Two connections from one address are served; a third from it is closed unread.
    let first = cluster.raw_from(1, "127.0.0.1").await;
    assert_eq!(first.request(claim("first")).await["success"], true);
    let second = cluster.raw_from(1, "127.0.0.1").await;
    assert_eq!(second.request(claim("second")).await["success"], true);
    let third = cluster.raw_from(1, "127.0.0.1").await;
    let (code, reason) = closed(&third).await;
    assert_eq!(code, busy, "{reason}");
    assert!(
        reason.contains("too many connections from this address"),
        "{reason}"
    );

    // Another address is served, up to the node's limit of three.
    let other = cluster.raw_from(1, "127.0.0.2").await;
    assert_eq!(other.request(claim("other")).await["success"], true);
    let over = cluster.raw_from(1, "127.0.0.3").await;
    let (code, reason) = closed(&over).await;
    assert_eq!(code, busy, "{reason}");
    assert!(reason.contains("node at its limit"), "{reason}");
    let (_, metrics) = http_get(cluster.node(1), "/metrics").await;
    assert!(
        metrics.contains("\nagentreg_agent_connections_refused_total 2\n"),
        "{metrics}"
    );
    // The connections served were not disturbed.
    assert_eq!(first.request(claim("first-again")).await["success"], true);

    // A connection that ends frees its place.
    first.conn.close(0u32.into(), b"done");
    let back = wait_for("a place on node 1", TIMEOUT, || async {
        let agent = cluster.raw_from(1, "127.0.0.1").await;
        let (mut send, mut recv) = agent.conn.open_bi().await.ok()?;
        send.write_all(&frame(&claim("back"))).await.ok()?;
        let _ = send.finish();
        read_answer(&mut recv).await.map(|a| (agent, a))
    })
    .await;
    assert_eq!(back.1["success"], true, "{}", back.1);

    // Node 1 is full again: AgentClient, told to try it first, claims through the next.
    let client = cluster.agent(1).await;
    client
        .claim_agent_id("moved-on", false)
        .await
        .expect("claimed through another node");
    assert_ne!(client.current_node(), Some(cluster.addrs[&1].to_string()));
    client.close().await;
}

/// Sends the first packets of `n` handshakes to `to` from one socket that never answers what
/// comes back, as a flood from spoofed addresses would. The socket is kept open (dropped, it
/// would have the kernel answer for it).
fn flood_first_packets(ca_pem: &str, to: SocketAddr, n: usize) -> UdpSocket {
    flood(ca_pem, to, n, false)
}

/// As [`flood_first_packets`], but each handshake answers the node's Retry (as a flooder at
/// its own address can) before it stalls.
fn flood_validated(ca_pem: &str, to: SocketAddr, n: usize) -> UdpSocket {
    flood(ca_pem, to, n, true)
}

fn flood(ca_pem: &str, to: SocketAddr, n: usize, answer_retry: bool) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let mut config = tls::agent_client_config(ca_pem).unwrap();
    // A stalled handshake lasts until the smaller of this and the node's idle timeout.
    config.transport_config(tls::client_transport(
        Duration::ZERO,
        Duration::from_secs(60),
    ));
    let mut packet = Vec::new();
    let send = |conn: &mut quinn_proto::Connection, packet: &mut Vec<u8>| {
        packet.clear();
        let sent = conn
            .poll_transmit(Instant::now(), 1, packet)
            .expect("a packet to send");
        socket.send_to(&packet[..sent.size], to).unwrap();
    };
    for _ in 0..n {
        let (handle, mut conn) = endpoint
            .connect(Instant::now(), config.clone(), to, tls::DEFAULT_SERVER_NAME)
            .unwrap();
        send(&mut conn, &mut packet);
        if !answer_retry {
            continue;
        }
        // The Retry comes among the packets the node sends the earlier, stalled handshakes.
        loop {
            let mut datagram = vec![0; 2048];
            let (len, from) = socket.recv_from(&mut datagram).expect("the node's Retry");
            let event = endpoint.handle(
                Instant::now(),
                from,
                None,
                None,
                bytes::BytesMut::from(&datagram[..len]),
                &mut packet,
            );
            if let Some(quinn_proto::DatagramEvent::ConnectionEvent(h, event)) = event {
                if h == handle {
                    conn.handle_event(event);
                    send(&mut conn, &mut packet);
                    break;
                }
            }
        }
    }
    socket
}

/// Waits until node `id`'s metric `name` has a value `ok` takes.
async fn wait_for_metric(cluster: &TestCluster, id: u64, name: &str, ok: impl Fn(u64) -> bool) {
    let ok = &ok;
    wait_for(name, TIMEOUT, || async move {
        ok(metric(cluster, id, name).await).then_some(())
    })
    .await
}

/// The value of the metric `name` (without labels) on node `id`.
async fn metric(cluster: &TestCluster, id: u64, name: &str) -> u64 {
    common::metric(cluster.node(id), name)
        .await
        .unwrap_or_else(|| panic!("{name} missing from /metrics")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_first_packets_costs_a_retry_each_and_agents_still_connect() {
    let (cluster, _) = with_limits(LimitsConfig {
        retry_after_handshakes: 8,
        max_handshakes: 16,
        handshake_timeout_ms: 3_000,
        ..LimitsConfig::default()
    })
    .await;
    let _flooder = flood_first_packets(&cluster.ca_pem(), cluster.addrs[&1], 200);

    // The first eight are taken on (and never finished); the other 192 are sent a Retry,
    // which the flooder never answers: nothing of them is kept. (A peer dialling node 1
    // meanwhile is retried too, and its handshake is in progress for a moment.)
    wait_for_metric(&cluster, 1, "agentreg_handshakes_retried_total", |v| {
        v >= 192
    })
    .await;
    let in_progress = metric(&cluster, 1, "agentreg_handshakes_in_progress").await;
    assert!((8..=10).contains(&in_progress), "{in_progress}");
    assert_eq!(
        metric(&cluster, 1, "agentreg_handshakes_refused_total").await,
        0
    );

    // An agent meanwhile answers its Retry and is served by the node.
    let client = cluster.agent(1).await;
    client
        .claim_agent_id("through-the-flood", false)
        .await
        .expect("claim");
    assert_eq!(client.current_node(), Some(cluster.addrs[&1].to_string()));
    assert!(metric(&cluster, 1, "agentreg_handshakes_retried_total").await >= 193);
    client.close().await;

    // The unfinished handshakes are dropped after the timeout.
    wait_for_metric(&cluster, 1, "agentreg_handshakes_in_progress", |v| v == 0).await;
    assert_eq!(
        metric(&cluster, 1, "agentreg_handshakes_timed_out_total").await,
        8
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handshakes_beyond_the_maximum_are_refused_and_agents_go_to_another_node() {
    // Retry off in effect: the flood holds every place until its handshakes time out.
    let (cluster, _) = with_limits(LimitsConfig {
        retry_after_handshakes: 1_000,
        max_handshakes: 16,
        handshake_timeout_ms: 5_000,
        ..LimitsConfig::default()
    })
    .await;
    let _flooder = flood_first_packets(&cluster.ca_pem(), cluster.addrs[&1], 40);
    wait_for_metric(&cluster, 1, "agentreg_handshakes_refused_total", |v| {
        v >= 24
    })
    .await;
    assert_eq!(
        metric(&cluster, 1, "agentreg_handshakes_in_progress").await,
        16
    );

    // Told to try node 1 first, the agent is refused there at once and claims elsewhere.
    let client = cluster.agent(1).await;
    client
        .claim_agent_id("moved-on", false)
        .await
        .expect("claim");
    assert_ne!(client.current_node(), Some(cluster.addrs[&1].to_string()));
    assert!(metric(&cluster, 1, "agentreg_handshakes_refused_total").await >= 25);
    client.close().await;
}

/// A node full of handshakes still takes its peers' connections: a flood must not keep a
/// restarted node from reaching the leader (here, to forward an agent's claim to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_full_of_handshakes_still_takes_its_peers_connections() {
    let defaults = Options::default();
    let (mut cluster, leader) = TestCluster::ready(Options {
        limits: LimitsConfig {
            retry_after_handshakes: 0,
            max_handshakes: 4,
            handshake_timeout_ms: 60_000,
            ..LimitsConfig::default()
        },
        host: NODES_HOST,
        // The node's idle timeout for agents: the flood holds the leader that long (60 s).
        heartbeat: agentreg::config::HeartbeatConfig {
            agent_timeout_ms: 60_000,
            ..defaults.heartbeat.clone()
        },
        ..defaults
    })
    .await;
    let follower = cluster.follower().await;
    cluster.crash(follower).await;
    // The leader full: four handshakes from 127.0.0.1 that proved their address and stall.
    let (ca, to) = (cluster.ca_pem(), cluster.addrs[&leader]);
    let _flooder = tokio::task::spawn_blocking(move || flood_validated(&ca, to, 4))
        .await
        .unwrap();
    wait_for_metric(&cluster, leader, "agentreg_handshakes_in_progress", |v| {
        v == 4
    })
    .await;
    let mut agent = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
    agent.set_default_client_config(tls::agent_client_config(&cluster.ca_pem()).unwrap());
    let refused = agent.connect(to, tls::DEFAULT_SERVER_NAME).unwrap().await;
    assert!(refused.is_err(), "an agent is refused by the full leader");

    // The follower comes back: its first forward dials the leader, which takes it.
    cluster.restart(follower).await;
    wait_for(
        "the follower ready (its clock compared)",
        TIMEOUT,
        || async { (http_get(cluster.node(follower), "/readyz").await.0 == 200).then_some(()) },
    )
    .await;
    let answer = cluster
        .raw(follower)
        .await
        .request(claim("forwarded"))
        .await;
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(
        metric(&cluster, leader, "agentreg_handshakes_in_progress").await,
        4,
        "the flood still fills the leader"
    );
    assert!(metric(&cluster, leader, "agentreg_handshakes_let_through_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_validated_address_gets_its_share_of_handshakes_and_others_theirs() {
    // Every new connection proves its address; four handshakes at once from one.
    let (cluster, _) = with_limits(LimitsConfig {
        retry_after_handshakes: 0,
        max_handshakes_per_address: 4,
        handshake_timeout_ms: 5_000,
        ..LimitsConfig::default()
    })
    .await;
    let (ca, node) = (cluster.ca_pem(), cluster.addrs[&1]);
    let _flooder = tokio::task::spawn_blocking(move || flood_validated(&ca, node, 10))
        .await
        .unwrap();
    // (Peers dialling meanwhile are retried too.)
    wait_for_metric(&cluster, 1, "agentreg_handshakes_refused_total", |v| v >= 6).await;
    assert_eq!(
        metric(&cluster, 1, "agentreg_handshakes_in_progress").await,
        4
    );
    assert!(metric(&cluster, 1, "agentreg_handshakes_retried_total").await >= 10);

    // Another address is served meanwhile.
    let neighbour = cluster.raw_from(1, "127.0.0.2").await;
    assert_eq!(neighbour.request(claim("neighbour")).await["success"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_never_arrives_in_full_is_answered_at_the_deadline() {
    let (cluster, _) = with_limits(LimitsConfig {
        request_read_timeout_ms: 500,
        ..LimitsConfig::default()
    })
    .await;
    let agent = cluster.raw(1).await;
    // A frame announced at 1,000 bytes, ten of them sent, the stream left open.
    let (mut send, mut recv) = agent.conn.open_bi().await.unwrap();
    send.write_all(&1000u32.to_be_bytes()).await.unwrap();
    send.write_all(&[b' '; 10]).await.unwrap();
    let answer = read_answer(&mut recv).await.expect("an answer");
    assert_eq!(
        (answer["success"].clone(), answer["code"].clone()),
        (json!(false), json!("bad_request")),
        "{answer}"
    );
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("frame not received in full within 500 ms"),
        "{answer}"
    );
    // The connection goes on serving.
    assert_eq!(agent.request(claim("after")).await["success"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_parks_little_on_its_node_behind_slow_requests() {
    let (cluster, leader) = TestCluster::ready_with_faults().await;
    let agent = cluster.raw(leader).await;
    // Cut off from its followers, the leader's claims wait (for the write timeout, 10 s).
    cluster.net().isolate(leader);
    // Eight claims, each followed on its stream by as much as the node takes in: it reads
    // no further while the claim waits, so what it takes stays in its buffers. All of it
    // is sent within the claims' wait (a stream stalled for 0.3 s is done).
    let mut taken = 0;
    let mut streams = Vec::new();
    for i in 0..8 {
        let (mut send, recv) = agent.conn.open_bi().await.unwrap();
        let mut data = frame(&claim(&format!("slow-{i}")));
        data.resize(data.len() + (2 << 20), b' ');
        let mut sent = 0;
        while sent < data.len() {
            // Stalled: flow control has run out (the window is the node's to give).
            match tokio::time::timeout(Duration::from_millis(300), send.write(&data[sent..])).await
            {
                Ok(Ok(n)) => sent += n,
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => break,
            }
        }
        taken += sent;
        streams.push((send, recv));
    }
    // The connection's window (256 KiB), not 1.25 MB for each stream.
    assert!(taken <= 256 * 1024, "the node took in {taken} bytes");
    drop(streams);
}

/// How many bytes the node takes in of `streams` requests sent at once on `conn`, each
/// announced at the largest size (64 KiB) and sent in full but for its last byte: what
/// the node holds for the connection until its request deadline.
async fn taken_by_unfinished_requests(conn: &quinn::Connection, streams: usize) -> usize {
    let mut writers = Vec::new();
    for _ in 0..streams {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        writers.push(tokio::spawn(async move {
            let mut data = 65_536u32.to_be_bytes().to_vec();
            data.resize(4 + 65_535, b' ');
            let mut sent = 0;
            while sent < data.len() {
                // Stalled: flow control has run out (the window is the node's to give).
                let write = send.write(&data[sent..]);
                match tokio::time::timeout(Duration::from_millis(500), write).await {
                    Ok(Ok(n)) => sent += n,
                    Ok(Err(e)) => panic!("{e}"),
                    Err(_) => break,
                }
            }
            (sent, send, recv)
        }));
    }
    // The streams are kept open until all are measured (quinn finishes a dropped stream).
    let mut streams = Vec::new();
    for w in writers {
        streams.push(w.await.unwrap());
    }
    streams.iter().map(|(sent, ..)| sent).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_requests_sent_slowly_hold_little_and_large_requests_sent_whole_are_served() {
    let (cluster, _) = with_limits(LimitsConfig::default()).await;
    let agent = cluster.raw(1).await;
    // On all 64 streams: what the node reads of four (256 KiB), and the connection's
    // window of what it has not read (256 KiB), not 64 times 64 KiB.
    let taken = taken_by_unfinished_requests(&agent.conn, 64).await;
    assert!(
        taken <= 512 * 1024 + 64 * 4,
        "the node took in {taken} bytes"
    );
    // Another agent is served meanwhile.
    assert_eq!(
        cluster.raw(1).await.request(claim("other")).await["success"],
        true
    );

    // Sixteen requests of 60 KiB sent at once, whole: they take turns, and all are answered.
    let agent = cluster.raw(1).await;
    let mut pings = Vec::new();
    for i in 0..16 {
        let pad = " ".repeat(60 * 1024);
        let ping =
            json!({"type": "system_request", "command": "ping_agent", "timestamp": i, "pad": pad});
        let agent = agent.conn.clone();
        pings.push(tokio::spawn(async move {
            let (mut send, mut recv) = agent.open_bi().await.unwrap();
            send.write_all(&frame(&ping)).await.unwrap();
            send.finish().unwrap();
            read_answer(&mut recv).await.expect("an answer")
        }));
    }
    for (i, ping) in pings.into_iter().enumerate() {
        let answer = ping.await.unwrap();
        assert_eq!(
            (&answer["success"], &answer["timestamp"]),
            (&json!(true), &json!(i)),
            "{answer}"
        );
    }
}
