//! `agentreg node` processes and renewed TLS material: a node reloads its TLS files on
//! SIGHUP (a renewal agent's usual way to tell a server, e.g. step-ca's `--exec`) and is not
//! stopped by it; a node killed and restarted with a renewed key still resets the
//! connections of its previous run.

#[path = "common/faultnet.rs"]
#[allow(dead_code)]
mod faultnet;
#[path = "fault/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "common/pki.rs"]
#[allow(dead_code)]
mod pki;
#[path = "common/wait.rs"]
mod wait;

use std::time::Duration;

use agentreg::transport::tls::{agent_client_config, DEFAULT_SERVER_NAME};
use harness::{wait_for, Cluster};
use pki::{der, presented, Ca};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_makes_a_node_take_up_its_renewed_certificate() {
    let mut cluster = Cluster::start().await;
    wait_for("a leader", Duration::from_secs(30), || cluster.leader()).await;
    let tls_dir = cluster.tls_dir();
    let ca = cluster.ca_pem();
    let addr = cluster.addrs[&2];
    let before = presented(addr, &ca).await.expect("handshake");

    // Renewed files; the node looks at them by itself only every 60 s (the default).
    let (cert, key) = Ca::dev(&tls_dir).node_cert(2, Duration::from_secs(5 * 86_400 + 43_200));
    std::fs::write(tls_dir.join("node2.pem"), &cert).unwrap();
    std::fs::write(tls_dir.join("node2.key"), &key).unwrap();
    assert_eq!(
        presented(addr, &ca).await,
        Ok(before),
        "not before the signal"
    );

    cluster.hang_up(2);
    wait_for(
        "node 2 to present its renewed certificate",
        Duration::from_secs(20),
        || async { (presented(addr, &ca).await == Ok(der(&cert))).then_some(()) },
    )
    .await;
    assert_eq!(
        cluster.exited(2, Duration::ZERO).await,
        None,
        "SIGHUP stopped the node"
    );
    let log = std::fs::read_to_string(cluster.log_path(2)).expect("log");
    assert!(
        log.contains("TLS material reloaded") && log.contains("expires_in=5d"),
        "the log says so:\n{log}"
    );
    let status = wait_for("node 2's status", Duration::from_secs(10), || {
        cluster.status(2)
    })
    .await;
    assert_eq!(status.node_id, 2);
    assert!(status.tls_valid_until.is_some());
}

/// The QUIC endpoint's stateless-reset key must be the same in every run of a node, or the
/// connections of a run before a crash linger until their idle timeout (a peer's cannot
/// even carry a vote meanwhile). It used to be derived from the TLS key at each start, so
/// the first restart after a renewal with a new key, the usual kind, lost it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restarted_with_a_renewed_key_resets_its_previous_runs_connections() {
    let mut cluster = Cluster::start().await;
    wait_for("a leader", Duration::from_secs(30), || cluster.leader()).await;
    wait_for("node 2 serving", Duration::from_secs(30), || {
        cluster.status(2)
    })
    .await;
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(agent_client_config(&cluster.ca_pem()).unwrap());
    let conn = client
        .connect(cluster.addrs[&2], DEFAULT_SERVER_NAME)
        .unwrap()
        .await
        .expect("an agent connects to node 2");

    // A renewal with a new key (as step-ca's renewals make), then a crash and a restart.
    let tls_dir = cluster.tls_dir();
    let (cert, key) = Ca::dev(&tls_dir).node_cert(2, Duration::from_secs(30 * 86_400));
    std::fs::write(tls_dir.join("node2.pem"), &cert).unwrap();
    std::fs::write(tls_dir.join("node2.key"), &key).unwrap();
    cluster.kill(2);
    cluster.spawn(2);
    let ca = cluster.ca_pem();
    let addr = cluster.addrs[&2];
    wait_for(
        "node 2 back, with its renewed certificate",
        Duration::from_secs(30),
        || async { (presented(addr, &ca).await == Ok(der(&cert))).then_some(()) },
    )
    .await;

    // The agent sends on its old connection; the node's answer must end it at once (the
    // agent's idle timeout is 10 s).
    if let Ok((mut send, _recv)) = conn.open_bi().await {
        let _ = send.write_all(&[0u8; 200]).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(3), conn.closed())
        .await
        .expect("the old connection ends at once, not at the idle timeout");
    assert!(
        matches!(ended, quinn::ConnectionError::Reset),
        "ended by a stateless reset, got {ended:?}"
    );
}
