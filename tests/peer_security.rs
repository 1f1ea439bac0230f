//! The peer link refuses strangers and survives garbage: mutual TLS against the cluster CA,
//! malformed and oversized frames close only their own stream.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentreg::raft::network::{PeerClient, PeerDialer, PeerError, PeerRequest, PeerResponse};
use agentreg::transport::tls::{self, NodeTls};
use common::*;
use openraft::raft::VoteRequest;
use openraft::Vote;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const CALL: Duration = Duration::from_secs(5);

/// A vote request with a huge term: if it were ever delivered, every node would step down and
/// adopt the term, which the tests check did not happen.
fn disruptive_vote() -> PeerRequest {
    PeerRequest::Vote(VoteRequest::new(Vote::new(1_000, 99), None))
}

fn harmless_vote() -> PeerRequest {
    PeerRequest::Vote(VoteRequest::new(Vote::new(0, 99), None))
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn dialer_with(tls: &NodeTls) -> PeerDialer {
    PeerDialer {
        endpoint: client_endpoint(),
        client_config: tls.peer_client_config().unwrap(),
        server_name: tls::DEFAULT_SERVER_NAME.into(),
    }
}

/// A peer-ALPN client config built by hand: trusts `ca_pem`, presents `client` (or nothing),
/// without the checks `NodeTls` applies to its own material.
fn raw_dialer(ca_pem: &str, client: Option<(&str, &str)>) -> PeerDialer {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut crypto = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .map(Result::unwrap)
                .collect();
            builder
                .with_client_auth_cert(
                    chain,
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![tls::ALPN_PEER.to_vec()];
    PeerDialer {
        endpoint: client_endpoint(),
        client_config: quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
        )),
        server_name: tls::DEFAULT_SERVER_NAME.into(),
    }
}

fn max_term(cluster: &TestCluster) -> u64 {
    cluster
        .nodes
        .values()
        .map(|n| n.raft().metrics().borrow().current_term)
        .max()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let cluster = TestCluster::start(Options::default()).await;
    let leader = cluster.leader().await;
    let term = max_term(&cluster);

    let foreign = tls::generate_dev_material(&[1], &[]).unwrap();
    let (_, cert, key) = &foreign.nodes[0];
    // Trusts the real CA (so the node passes the client's check), but presents a certificate
    // of another CA: the node must refuse it.
    let real_ca = std::fs::read_to_string(cluster.tls_dir().join("ca.pem")).unwrap();
    let client = PeerClient::new(
        leader,
        cluster.addrs[&leader].to_string(),
        raw_dialer(&real_ca, Some((cert, key))),
    );
    let err = client
        .call(&disruptive_vote(), CALL)
        .await
        .expect_err("foreign peer was served");
    tracing::info!(error = %err, "refused as expected");

    // Another CA's material entirely (it cannot even verify the node).
    let tls = NodeTls::from_pem(&foreign.ca_cert_pem, cert, key).unwrap();
    let client = PeerClient::new(
        leader,
        cluster.addrs[&leader].to_string(),
        dialer_with(&tls),
    );
    assert!(matches!(
        client.call(&disruptive_vote(), CALL).await,
        Err(PeerError::Unreachable { .. })
    ));

    assert_eq!(
        max_term(&cluster),
        term,
        "a refused peer's vote request reached Raft"
    );
    assert_eq!(cluster.leader().await, leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_certificate_cannot_speak_raft() {
    let cluster = TestCluster::start(Options::default()).await;
    let leader = cluster.leader().await;
    let term = max_term(&cluster);
    let read = |name: &str| std::fs::read_to_string(cluster.tls_dir().join(name)).unwrap();
    let (ca, op_cert, op_key) = (read("ca.pem"), read("operator.pem"), read("operator.key"));

    // Signed by the cluster CA, but an operator's (clientAuth only): refused on the peer ALPN.
    let client = PeerClient::new(
        leader,
        cluster.addrs[&leader].to_string(),
        raw_dialer(&ca, Some((&op_cert, &op_key))),
    );
    let err = client
        .call(&disruptive_vote(), CALL)
        .await
        .expect_err("an operator certificate was served as a peer");
    tracing::info!(error = %err, "refused as expected");
    assert_eq!(max_term(&cluster), term, "the operator's vote reached Raft");

    // A node's certificate on the same path is served (the check is not refusing everyone).
    let (node_cert, node_key) = (read("node2.pem"), read("node2.key"));
    let client = PeerClient::new(
        leader,
        cluster.addrs[&leader].to_string(),
        raw_dialer(&ca, Some((&node_cert, &node_key))),
    );
    assert!(matches!(
        client.call(&harmless_vote(), CALL).await,
        Ok(PeerResponse::Vote(_))
    ));
    assert_eq!(cluster.leader().await, leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_without_a_client_certificate_is_refused() {
    let cluster = TestCluster::start(Options::default()).await;
    let leader = cluster.leader().await;
    let term = max_term(&cluster);

    let ca_pem = std::fs::read_to_string(cluster.tls_dir().join("ca.pem")).unwrap();
    let client = PeerClient::new(
        leader,
        cluster.addrs[&leader].to_string(),
        raw_dialer(&ca_pem, None),
    );
    client
        .call(&disruptive_vote(), CALL)
        .await
        .expect_err("peer without certificate was served");
    assert_eq!(
        max_term(&cluster),
        term,
        "an unauthenticated vote request reached Raft"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_peer_frames_close_only_their_stream() {
    let cluster = TestCluster::start(Options::default()).await;
    let leader = cluster.leader().await;
    let tls = NodeTls::load(&tls::TlsFiles {
        ca: cluster.tls_dir().join("ca.pem"),
        cert: cluster.tls_dir().join("node2.pem"),
        key: cluster.tls_dir().join("node2.key"),
    })
    .unwrap();
    let endpoint = client_endpoint();
    let conn = endpoint
        .connect_with(
            tls.peer_client_config().unwrap(),
            cluster.addrs[&leader],
            tls::DEFAULT_SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();

    // Garbage inside a well-formed frame.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(CALL, recv.read_to_end(1 << 20))
        .await
        .expect("stream left hanging");
    assert!(answer.is_err(), "garbage got an answer: {answer:?}");

    // A length far over the limit: refused before the body is read.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let answer = tokio::time::timeout(CALL, recv.read_to_end(1 << 20))
        .await
        .expect("stream left hanging");
    assert!(answer.is_err(), "oversized frame got an answer: {answer:?}");

    // Zero length.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 0]).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(CALL, recv.read_to_end(1 << 20))
        .await
        .expect("stream left hanging");
    assert!(answer.is_err(), "empty frame got an answer: {answer:?}");

    // The same connection, and the node, still serve well-formed requests.
    let client = PeerClient::new(
        leader,
        cluster.addrs[&leader].to_string(),
        dialer_with(&tls),
    );
    match client
        .call(&harmless_vote(), CALL)
        .await
        .expect("node still serves")
    {
        PeerResponse::Vote(Ok(v)) => assert!(!v.vote_granted),
        other => panic!("unexpected answer {other:?}"),
    }
    let w = claim_ok(cluster.node(leader), "still-serving").await;
    cluster.applied_everywhere(w.index).await;
    conn.close(0u32.into(), b"done");
}
