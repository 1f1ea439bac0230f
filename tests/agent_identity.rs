//! The agent protocol end to end over real QUIC against a three-node cluster: claims,
//! validation, registration, takeover, revocation, and AgentClient failover.

mod common;

use std::time::Duration;

use agentreg::client::{
    load_certificate, AgentClient, ClientError, ClientEvent, ErrorCode::*, Refusal,
};
use agentreg::registry::{ClaimArgs, Command, Op, Tables};
use common::*;
use serde_json::{json, Map};

async fn ready() -> TestCluster {
    TestCluster::ready(Options::default()).await.0
}

/// The refusal, code and text, a request was answered with.
fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> Refusal {
    match r {
        Err(ClientError::Refused(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_through_node_1_validates_through_node_3() {
    let cluster = ready().await;
    let a = cluster.agent(1).await;
    let cert = a.claim_agent_id("alpha", false).await.unwrap();
    assert_eq!(cert.agent_id, "alpha");
    let c = cluster.agent(3).await;
    assert_eq!(c.current_node().unwrap(), cluster.addrs[&3].to_string());
    let v = c.validate_certificate(&cert).await.unwrap();
    assert!(v.valid && v.code.is_none() && v.reason.is_none(), "{v:?}");
    assert_eq!(v.agent_id, "alpha");
    // The same id cannot be claimed again, through any node.
    let e = refused(c.claim_agent_id("alpha", false).await);
    assert_eq!(
        e,
        Refusal::new(AlreadyClaimed, "Agent ID alpha is already claimed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_acknowledged_by_node_2_fails_validation_on_all_three_at_once() {
    let cluster = ready().await;
    let owner = cluster.agent(1).await;
    let cert = owner.claim_agent_id("to-revoke", false).await.unwrap();
    let clients = [
        cluster.agent(1).await,
        cluster.agent(2).await,
        cluster.agent(3).await,
    ];
    for c in &clients {
        assert!(c.validate_certificate(&cert).await.unwrap().valid);
    }
    clients[1].revoke_certificate(&cert).await.unwrap();
    // No waiting: the very next validation on every node must see the revocation.
    for (i, c) in clients.iter().enumerate() {
        let v = c.validate_certificate(&cert).await.unwrap();
        assert!(
            !v.valid,
            "node {} still validates a revoked certificate",
            i + 1
        );
        assert_eq!(v.reason.as_deref(), Some("revoked"));
        assert_eq!(v.code, Some(CertificateRevoked));
    }
    // The revoked certificate proves nothing any more.
    let e = refused(
        owner
            .register("to-revoke", Map::new(), Some(cert.clone()), false)
            .await,
    );
    assert_eq!(
        e,
        Refusal::new(CertificateRevoked, "certificate validation failed: revoked")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_clients_racing_for_one_id_produce_exactly_one_owner() {
    let cluster = ready().await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let config = cluster.client_config(1 + i % 3);
        tasks.push(tokio::spawn(async move {
            let c = agentreg::client::AgentClient::connect(config)
                .await
                .unwrap();
            let r = c.claim_agent_id("contested", false).await;
            c.close().await;
            r
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(cert) => winners.push(cert),
            Err(ClientError::Refused(e)) => assert_eq!(
                e,
                Refusal::new(AlreadyClaimed, "Agent ID contested is already claimed")
            ),
            Err(e) => panic!("claim failed without an answer: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "{} clients won", winners.len());
    let serial = winners[0].serial;
    cluster.applied_everywhere(serial).await;
    for id in 1..=3 {
        assert_eq!(
            cluster.tables(id).claims["contested"].serial,
            serial,
            "node {id} disagrees"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn force_needs_a_valid_certificate_for_the_same_id() {
    let cluster = ready().await;
    let owner = cluster.agent(1).await;
    let cert = owner.claim_agent_id("forced", false).await.unwrap();
    let other = cluster.agent(2).await;
    let other_cert = other.claim_agent_id("someone-else", false).await.unwrap();

    // Force without proof.
    let e = refused(other.claim_agent_id("forced", true).await);
    assert_eq!(
        e,
        Refusal::new(
            ForceNeedsCertificate,
            "Agent ID forced is already claimed; force needs a valid certificate for it"
        )
    );
    // Force with a certificate for another id, sent raw so the client cannot pick the right one.
    let raw = cluster.raw(3).await;
    let a = raw
        .request(json!({"type":"system_request","command":"claim_agent_id","agent_id":"forced","force":true,"certificate":other_cert}))
        .await;
    assert_eq!(a["success"], false);
    assert_eq!(
        (&a["code"], &a["error"]),
        (
            &json!("certificate_other_agent"),
            &json!("certificate validation failed: issued for another agent")
        )
    );
    // The owner re-issues with its certificate; the old one is superseded.
    let renewed = owner.claim_agent_id("forced", true).await.unwrap();
    assert!(renewed.serial > cert.serial);
    assert_eq!(
        other
            .validate_certificate(&cert)
            .await
            .unwrap()
            .reason
            .as_deref(),
        Some("superseded by a newer certificate")
    );
    assert!(other.validate_certificate(&renewed).await.unwrap().valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_claim_is_free_to_claim_again() {
    let cluster = ready().await;
    // A claim made two hours ago with a one-hour lifetime, as the log would hold it.
    let w = cluster
        .node(1)
        .write(Command {
            at: now() - 7200,
            op: Op::Claim(ClaimArgs {
                agent_id: "stale".into(),
                ttl_secs: 3600,
                force: false,
                proof: None,
                conn: None,
            }),
        })
        .await
        .unwrap();
    let Ok(agentreg::registry::Outcome::Claimed { certificate: old }) = w.response else {
        panic!("{w:?}")
    };
    let c = cluster.agent(2).await;
    let v = c.validate_certificate(&old).await.unwrap();
    assert_eq!(v.reason.as_deref(), Some("expired"));
    assert_eq!(v.code, Some(CertificateExpired));
    let e = refused(
        c.register("stale", Map::new(), Some(old.clone()), false)
            .await,
    );
    assert_eq!(
        e,
        Refusal::new(CertificateExpired, "certificate validation failed: expired")
    );
    let fresh = c.claim_agent_id("stale", false).await.unwrap();
    assert!(fresh.serial > old.serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_rules_and_takeover_across_nodes() {
    let cluster = ready().await;
    let owner = cluster.agent(1).await;
    let cert = owner.claim_agent_id("worker", false).await.unwrap();
    let other_cert = owner.claim_agent_id("worker-2", false).await.unwrap();
    owner.set_certificate(cert.clone());

    let stranger = cluster.agent(2).await;
    assert_eq!(
        refused(stranger.register("worker", Map::new(), None, false).await),
        Refusal::new(
            CertificateRequired,
            "Agent ID worker is claimed; register with its certificate"
        )
    );
    assert_eq!(
        refused(
            stranger
                .register("worker", Map::new(), Some(other_cert), false)
                .await
        ),
        Refusal::new(
            CertificateOtherAgent,
            "certificate validation failed: issued for another agent"
        )
    );

    let reg1 = owner
        .register("worker", Map::new(), Some(cert.clone()), false)
        .await
        .unwrap();
    assert_eq!(reg1.node_id, 1);
    let mut owner_events = owner.events();

    // The same certificate on node 2 takes the session over; node 1 closes the old connection.
    let heir = cluster.agent(2).await;
    let reg2 = heir
        .register("worker", Map::new(), Some(cert.clone()), false)
        .await
        .unwrap();
    assert!(reg2.took_over);
    assert!(reg2.session_id > reg1.session_id);
    let ev = tokio::time::timeout(TIMEOUT, owner_events.recv())
        .await
        .expect("owner told")
        .unwrap();
    match ev {
        ClientEvent::SessionLost { reason } => assert!(reason.contains("taken over"), "{reason}"),
        other => panic!("unexpected event {other:?}"),
    }
    cluster.applied_everywhere(reg2.session_id).await;
    for id in 1..=3 {
        let s = cluster.tables(id).sessions["worker"].clone();
        assert_eq!(
            (s.session_id, s.conn.node_id),
            (reg2.session_id, 2),
            "node {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unclaimed_ids_register_without_certificate_and_cannot_be_taken_without_one() {
    let cluster = ready().await;
    let first = cluster.agent(1).await;
    let reg = first
        .register("legacy", Map::new(), None, false)
        .await
        .unwrap();
    let second = cluster.agent(3).await;
    let connected = Refusal::new(
        AlreadyConnected,
        "Agent ID legacy is already connected (node 1); present its certificate to take over",
    );
    assert_eq!(
        refused(second.register("legacy", Map::new(), None, false).await),
        connected
    );
    assert_eq!(
        refused(second.register("legacy", Map::new(), None, true).await),
        connected,
        "force_reconnect without a certificate took over although the cluster does not allow it"
    );
    // Nor can the connected id be claimed from another connection.
    assert_eq!(
        refused(second.claim_agent_id("legacy", false).await),
        connected
    );
    // The connection holding it can claim it.
    first.claim_agent_id("legacy", false).await.unwrap();
    cluster.applied_everywhere(reg.session_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_connection_is_evicted_at_once_and_unregister_ends_the_session() {
    let cluster = ready().await;
    let a = cluster.agent(2).await;
    a.register("short-lived", Map::new(), None, false)
        .await
        .unwrap();
    a.abandon();
    wait_for(
        "the closed connection's session to be evicted",
        TIMEOUT,
        || async {
            (1..=3)
                .all(|id| !cluster.tables(id).sessions.contains_key("short-lived"))
                .then_some(())
        },
    )
    .await;

    let b = cluster.agent(3).await;
    let reg = b.register("polite", Map::new(), None, false).await.unwrap();
    b.unregister().await.unwrap();
    cluster.applied_everywhere(reg.session_id + 1).await;
    assert!(!cluster.tables(3).sessions.contains_key("polite"));
    // Another connection can now register the id.
    cluster
        .agent(1)
        .await
        .register("polite", Map::new(), None, false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_your_own_certificate_answers_and_ends_your_session() {
    // Regression: the session closer used to close the connection under the answer.
    let cluster = ready().await;
    let a = cluster.agent(2).await;
    let cert = a.claim_agent_id("self-revoker", false).await.unwrap();
    let reg = a
        .register("self-revoker", Map::new(), None, false)
        .await
        .unwrap();
    a.revoke_certificate(&cert)
        .await
        .expect("the answer arrives");
    assert!(a.registration().is_none());
    assert!(a.certificate().is_none());
    cluster.applied_everywhere(reg.session_id + 1).await;
    assert!(!cluster.tables(2).sessions.contains_key("self-revoker"));
    // The connection is still usable.
    a.ping().await.unwrap();
    let b = cluster.agent(2).await;
    let c2 = b.claim_agent_id("self-releaser", false).await.unwrap();
    b.register("self-releaser", Map::new(), None, false)
        .await
        .unwrap();
    b.release_agent_id(&c2).await.expect("the answer arrives");
    assert!(b.registration().is_none());
    b.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_frees_the_id_and_revokes_the_certificate() {
    let cluster = ready().await;
    let a = cluster.agent(1).await;
    let cert = a.claim_agent_id("leaving", false).await.unwrap();
    a.release_agent_id(&cert).await.unwrap();
    let b = cluster.agent(3).await;
    assert_eq!(
        b.validate_certificate(&cert)
            .await
            .unwrap()
            .reason
            .as_deref(),
        Some("revoked")
    );
    b.claim_agent_id("leaving", false).await.unwrap();
    // Releasing again with the dead certificate is refused.
    assert_eq!(
        refused(a.release_agent_id(&cert).await),
        Refusal::new(CertificateRevoked, "certificate validation failed: revoked")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_survive_a_file_and_the_client_renews_them() {
    let cluster = ready().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cert.json");
    let mut config = cluster.client_config(1);
    // One hour lifetime: renew after ~0.7 s.
    config.renew_fraction = 0.0002;
    let a = agentreg::client::AgentClient::connect(config)
        .await
        .unwrap();
    let mut events = a.events();
    let cert = a.claim_agent_id("renewing", false).await.unwrap();
    a.save_certificate(&path).unwrap();
    assert_eq!(load_certificate(&path).unwrap(), cert);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let renewed = loop {
        match tokio::time::timeout(TIMEOUT, events.recv())
            .await
            .expect("renewal in time")
            .unwrap()
        {
            ClientEvent::Renewed { serial, .. } => break serial,
            other => tracing::info!(?other, "event"),
        }
    };
    assert!(renewed > cert.serial);
    assert_eq!(a.certificate().unwrap().serial, renewed);
    let b = cluster.agent(2).await;
    assert!(
        b.validate_certificate(&a.certificate().unwrap())
            .await
            .unwrap()
            .valid
    );
    assert!(!b.validate_certificate(&cert).await.unwrap().valid);
    a.abandon();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_on_a_killed_node_is_registered_elsewhere_with_its_certificate() {
    let mut cluster = ready().await;
    let a = cluster.agent(1).await;
    let mut events = a.events();
    let cert = a.claim_agent_id("survivor", false).await.unwrap();
    let reg = a
        .register("survivor", Map::new(), None, false)
        .await
        .unwrap();
    assert_eq!(reg.node_id, 1);

    tracing::info!("--- killing node 1 under the agent");
    cluster.crash(1).await;
    let node = loop {
        match tokio::time::timeout(TIMEOUT, events.recv())
            .await
            .expect("reconnected in time")
            .unwrap()
        {
            ClientEvent::Reconnected { node, .. } => break node,
            other => tracing::info!(?other, "event"),
        }
    };
    assert_ne!(node, cluster.addrs[&1].to_string());
    let reg2 = a.registration().unwrap();
    assert_ne!(reg2.node_id, 1);
    cluster.applied_everywhere(reg2.session_id).await;
    for id in [2, 3] {
        let t = cluster.tables(id);
        let s = &t.sessions["survivor"];
        assert_eq!(
            (s.session_id, s.conn.node_id, s.cert_serial),
            (reg2.session_id, reg2.node_id, Some(cert.serial))
        );
    }
    // It keeps working there.
    assert!(a.ping().await.unwrap() < Duration::from_secs(5));
}

/// A node reads each request to the end of its stream: it never tells an agent to stop
/// sending on a stream the agent has finished. (quinn sends STOP_SENDING for a receive stream
/// dropped before its end was read, even when the end had arrived: that was one more packet
/// to the agent, on its own, after every answer.) Requests through the leader and through a
/// follower, reads, refusals and unknown commands alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_sends_no_stop_sending_for_requests_the_agent_finished() {
    let cluster = ready().await;
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    for node in [leader, follower] {
        let raw = cluster.raw(node).await;
        let mut answers = Vec::new();
        for i in 0..10 {
            let id = format!("quiet-{node}-{i}");
            let claimed = raw
                .request(
                    json!({"type": "system_request", "command": "claim_agent_id", "agent_id": id}),
                )
                .await;
            assert_eq!(claimed["success"], true, "{claimed}");
            let certificate = claimed["certificate"].clone();
            answers.push(
                raw.request(json!({"type": "system_request", "command": "validate_certificate", "certificate": certificate}))
                    .await,
            );
            answers.push(
                raw.request(
                    json!({"type": "system_request", "command": "claim_agent_id", "agent_id": id}),
                )
                .await,
            );
            answers.push(
                raw.request(json!({"type": "system_request", "command": "no_such_command"}))
                    .await,
            );
        }
        for a in answers.chunks(3) {
            assert_eq!(a[0]["success"], true, "validation: {}", a[0]);
            assert_eq!(a[1]["success"], false, "second claim: {}", a[1]);
            assert_eq!(a[2]["success"], false, "unknown command: {}", a[2]);
        }
        let frames = raw.conn.stats().frame_rx;
        assert_eq!(
            frames.stop_sending, 0,
            "node {node} asked the agent to stop sending on finished streams: {frames:?}"
        );
    }
}

/// A session that ends (here its certificate is revoked from another connection) closes its
/// connection with 0x101, but only once the requests begun on it have their answers: a write
/// committed as the session ended is never left answerless. A request arriving meanwhile is
/// refused and changes nothing. The agent holds one answer back by not reading it: its
/// receive window is smaller than the answer, so the node cannot finish delivering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_whose_session_ended_answers_its_requests_before_closing() {
    let mut opts = Options::default();
    // The raw agent answers no pings: only the revocation may end its session here.
    opts.heartbeat.interval_ms = 30_000;
    opts.heartbeat.ping_timeout_ms = 5_000;
    opts.heartbeat.agent_timeout_ms = 300_000;
    let cluster = TestCluster::start(opts).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let node = 2;
    let mut client = agentreg::transport::tls::agent_client_config(&cluster.ca_pem()).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(64));
    client.transport_config(std::sync::Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(
            cluster.addrs[&node],
            agentreg::transport::tls::DEFAULT_SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let agent = RawAgent::from_parts(endpoint, conn);

    let claimed = agent
        .request(json!({"type": "system_request", "command": "claim_agent_id", "agent_id": "held"}))
        .await;
    assert_eq!(claimed["success"], true, "{claimed}");
    let certificate = claimed["certificate"].clone();
    let registered = agent
        .request(json!({"type": "system_request", "command": "register_agent", "agent_id": "held", "certificate": certificate}))
        .await;
    assert_eq!(registered["success"], true, "{registered}");

    // A claim on the agent's connection whose answer the agent does not read yet.
    let (mut send, mut recv) = agent.conn.open_bi().await.unwrap();
    let request =
        json!({"type": "system_request", "command": "claim_agent_id", "agent_id": "answered-late"});
    send.write_all(&frame(&request)).await.unwrap();
    send.finish().unwrap();
    wait_for("the held claim committed", TIMEOUT, || async {
        cluster
            .tables(node)
            .claims
            .contains_key("answered-late")
            .then_some(())
    })
    .await;

    let revoked = cluster
        .raw(3)
        .await
        .request(json!({"type": "system_request", "command": "revoke_certificate", "certificate": certificate}))
        .await;
    assert_eq!(revoked["success"], true, "{revoked}");
    wait_for(
        "the session's end applied on the agent's node",
        TIMEOUT,
        || async { (cluster.node(node).status().heartbeat.agents_connected == 0).then_some(()) },
    )
    .await;

    let late = agent
        .request(json!({"type": "system_request", "command": "claim_agent_id", "agent_id": "refused-late"}))
        .await;
    assert_eq!(late["success"], false, "{late}");
    assert_eq!(late["code"], "connection_closing", "{late}");
    assert!(
        late["error"]
            .as_str()
            .unwrap()
            .contains("connection closing"),
        "{late}"
    );
    assert!(!cluster.tables(node).claims.contains_key("refused-late"));

    let answer = read_answer(&mut recv)
        .await
        .expect("the held claim is answered before the connection closes");
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(answer["agent_id"], "answered-late", "{answer}");

    match tokio::time::timeout(TIMEOUT, agent.conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => assert_eq!(
            c.error_code,
            quinn::VarInt::from_u32(agentreg::node::close_code::REVOKED)
        ),
        other => panic!("connection ended with {other:?}, not 0x101"),
    }
}

/// A claim sent again with its claim token, through another node, is answered with the
/// certificate the first one issued; nobody else gets the id, token or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_sent_again_with_its_token_gets_the_same_certificate_through_any_node() {
    let cluster = ready().await;
    let claim = |token: &str| json!({"type":"system_request","command":"claim_agent_id","agent_id":"retried","claim_token":token});
    let token = "7f3a0c9e5b2d4e8f1a6c3b9d0e7f2a5c";
    let first = cluster.raw(1).await.request(claim(token)).await;
    assert_eq!(first["success"], true, "{first}");
    assert_eq!(first["repeated"], false, "{first}");
    for id in [2, 3, 1] {
        let again = cluster.raw(id).await.request(claim(token)).await;
        assert_eq!(again["success"], true, "node {id}: {again}");
        assert_eq!(again["repeated"], true, "node {id}: {again}");
        assert_eq!(again["certificate"], first["certificate"], "node {id}");
    }
    let other = cluster
        .raw(2)
        .await
        .request(claim("another-claimants-token"))
        .await;
    assert_eq!(
        (&other["code"], &other["error"]),
        (
            &json!("already_claimed"),
            &json!("Agent ID retried is already claimed")
        ),
        "{other}"
    );
    let plain = cluster
        .raw(3)
        .await
        .request(json!({"type":"system_request","command":"claim_agent_id","agent_id":"retried"}))
        .await;
    assert_eq!(
        plain["error"], "Agent ID retried is already claimed",
        "{plain}"
    );
    // One claim, one certificate: the repeats issued nothing.
    let serial = first["certificate"]["serial"].as_u64().unwrap();
    for id in [1, 2, 3] {
        let t = cluster.tables(id);
        assert_eq!(t.claims["retried"].serial, serial, "node {id}");
    }
}

/// A cluster where the agent is served by a follower (`serving`) which can be made to lose
/// the answers to the writes it forwards, and the node that saw them committed (`other`,
/// the second follower).
struct LostAnswers {
    cluster: TestCluster,
    leader: u64,
    serving: u64,
    other: u64,
    agent: AgentClient,
}

impl LostAnswers {
    async fn start() -> LostAnswers {
        let (cluster, leader) = TestCluster::ready_with_faults().await;
        let serving = cluster.follower().await;
        let other = *cluster
            .others(serving)
            .iter()
            .find(|id| **id != leader)
            .unwrap();
        let agent = cluster.agent(serving).await;
        LostAnswers {
            cluster,
            leader,
            serving,
            other,
            agent,
        }
    }

    /// Runs `op` while the serving node still reaches the leader but hears nothing back:
    /// the write it forwards is committed (leader and the other follower) and never
    /// answered. Once `committed` holds on the other follower's tables, the serving node
    /// dies; what `op` ends with is returned.
    async fn lose_the_answer<T: Send + 'static>(
        &mut self,
        op: impl std::future::Future<Output = T> + Send + 'static,
        committed: impl Fn(&Tables) -> bool,
    ) -> T {
        self.cluster.net().cut_one_way(self.leader, self.serving);
        let running = tokio::spawn(op);
        wait_for("the write committed", TIMEOUT, || async {
            committed(&self.cluster.tables(self.other)).then_some(())
        })
        .await;
        assert!(
            !running.is_finished(),
            "answered without the leader's answer"
        );
        self.cluster.crash(self.serving).await;
        tokio::time::timeout(TIMEOUT, running)
            .await
            .expect("the write ends in time")
            .unwrap()
    }

    /// The client now talks to another node than the one that died.
    fn moved_on(&self) {
        let node = self.agent.current_node().expect("connected");
        assert_ne!(node, self.cluster.addrs[&self.serving].to_string());
    }
}

/// The node serving a claim dies after the claim is committed but before it answers: the
/// client sends the claim again, with its claim token, to another node, and gets the
/// certificate that claim issued (where a claim sent afresh would find the id taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_whose_node_dies_before_answering_a_claim_gets_the_certificate_it_issued() {
    let mut lost = LostAnswers::start().await;
    let agent = lost.agent.clone();
    let cert = lost
        .lose_the_answer(
            async move { agent.claim_agent_id("unlucky", false).await },
            |t| t.claims.contains_key("unlucky"),
        )
        .await
        .expect("the claim is answered through another node");
    lost.moved_on();
    assert_eq!(
        lost.cluster.tables(lost.other).claims["unlucky"].serial,
        cert.serial
    );
    let v = lost.agent.validate_certificate(&cert).await.unwrap();
    assert!(v.valid, "{v:?}");
    assert_eq!(lost.agent.certificate(), Some(cert));
}

/// The same for a release: sent again, it finds its certificate revoked by itself, and the
/// client reports the release done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_whose_node_dies_before_answering_a_release_reports_it_done() {
    let mut lost = LostAnswers::start().await;
    let cert = lost.agent.claim_agent_id("leaving", false).await.unwrap();
    let (agent, c) = (lost.agent.clone(), cert.clone());
    lost.lose_the_answer(async move { agent.release_agent_id(&c).await }, |t| {
        !t.claims.contains_key("leaving")
    })
    .await
    .expect("the release is reported done");
    lost.moved_on();
    assert_eq!(lost.agent.certificate(), None, "the client let go of it");
    let v = lost.agent.validate_certificate(&cert).await.unwrap();
    assert_eq!(v.code, Some(CertificateRevoked), "{v:?}");
    // The id is free.
    lost.agent.claim_agent_id("leaving", false).await.unwrap();
}

/// The same for a revocation, which simply succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_whose_node_dies_before_answering_a_revocation_reports_it_done() {
    let mut lost = LostAnswers::start().await;
    let cert = lost
        .agent
        .claim_agent_id("revoked-late", false)
        .await
        .unwrap();
    let (agent, c) = (lost.agent.clone(), cert.clone());
    let serial = cert.serial;
    lost.lose_the_answer(
        async move { agent.revoke_certificate(&c).await },
        move |t| t.revocations.contains_key(&serial),
    )
    .await
    .expect("the revocation is reported done");
    lost.moved_on();
    let v = lost.agent.validate_certificate(&cert).await.unwrap();
    assert_eq!(v.code, Some(CertificateRevoked), "{v:?}");
}
