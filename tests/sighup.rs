//! `agentreg node` reloads its TLS files on SIGHUP (a renewal agent's usual way to tell a
//! server, e.g. step-ca's `--exec`), and is not stopped by it.

#[path = "common/faultnet.rs"]
#[allow(dead_code)]
mod faultnet;
#[path = "fault/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "common/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::time::Duration;

use harness::{wait_until, Cluster};
use pki::{der, presented, Ca};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_makes_a_node_take_up_its_renewed_certificate() {
    let mut cluster = Cluster::start().await;
    wait_until("a leader", Duration::from_secs(30), || cluster.leader()).await;
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
    wait_until(
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
    let status = wait_until("node 2's status", Duration::from_secs(10), || {
        cluster.status(2)
    })
    .await;
    assert_eq!(status.node_id, 2);
    assert!(status.tls_valid_until.is_some());
}
