//! Nodes take up renewed TLS material while they serve: a node certificate renewed before
//! it expires, and a whole new CA, without a restart and without dropping the connections
//! that are open. Material that does not fit is refused and the node goes on with what it
//! has.

mod common;

use std::time::Duration;

use agentreg::transport::tls::TlsError;
use common::pki::{der, presented, Ca};
use common::*;
use serde_json::json;

const DAY: u64 = 86_400;

fn write(path: std::path::PathBuf, contents: &str) {
    std::fs::write(&path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The expiry a node's /metrics reports.
async fn expiry_in_metrics(node: &agentreg::node::Node) -> u64 {
    metric(node, "agentreg_tls_certificate_expiry_timestamp_seconds")
        .await
        .expect("the expiry gauge") as u64
}

fn near(got: u64, want: u64) -> bool {
    got.abs_diff(want) < 120
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_moves_to_a_new_ca_without_a_restart() {
    let (mut cluster, _) = TestCluster::ready(Options::default()).await;
    let tls_dir = cluster.tls_dir();
    let old_ca = cluster.ca_pem();
    let new_ca = Ca::new("agentreg CA 2027");
    // An agent connected before the rotation, to see that open connections carry on.
    let before = cluster.raw(1).await;
    let held = before
        .request(
            json!({"type": "system_request", "command": "claim_agent_id",
                        "agent_id": "held"}),
        )
        .await;
    assert_eq!(held["success"], true, "{held}");

    // 1. Every node trusts both CAs.
    write(
        tls_dir.join("ca.pem"),
        &format!("{old_ca}{}", new_ca.cert_pem),
    );
    for id in 1..=3 {
        cluster.node(id).reload_tls().expect("both CAs");
    }
    // 2. Every node gets a certificate of the new CA, valid for 30 days.
    let mut issued = std::collections::BTreeMap::new();
    for id in 1..=3 {
        let (cert, key) = new_ca.node_cert(id, Duration::from_secs(30 * DAY));
        write(tls_dir.join(format!("node{id}.pem")), &cert);
        write(tls_dir.join(format!("node{id}.key")), &key);
        let until = cluster.node(id).reload_tls().expect("the new certificate");
        assert!(near(until, now() + 30 * DAY), "node {id}: {until}");
        issued.insert(id, cert);
    }
    // 3. The old CA goes.
    write(tls_dir.join("ca.pem"), &new_ca.cert_pem);
    for id in 1..=3 {
        cluster.node(id).reload_tls().expect("the new CA alone");
    }

    // New connections get the new certificates: an agent that trusts only the new CA
    // connects, one that trusts only the old one no longer does.
    for id in 1..=3 {
        let addr = cluster.addrs[&id];
        let got = presented(addr, &new_ca.cert_pem).await;
        assert_eq!(got, Ok(der(&issued[&id])), "node {id}");
        let old = presented(addr, &old_ca).await;
        assert!(
            old.is_err(),
            "node {id} still presents a certificate of the old CA"
        );
        // What operators see.
        let until = cluster
            .node(id)
            .status()
            .tls_valid_until
            .expect("expiry in status");
        assert!(near(until, now() + 30 * DAY), "node {id}: {until}");
        assert_eq!(expiry_in_metrics(cluster.node(id)).await, until);
    }
    // The connection opened before carries on.
    let valid = before
        .request(
            json!({"type": "system_request", "command": "validate_certificate",
                        "certificate": held["certificate"], "consistency": "linearizable"}),
        )
        .await;
    assert_eq!(valid["valid"], true, "{valid}");

    // Peers present and verify by the new CA too: node 2, restarted with the new material
    // (the only CA it trusts now), is dialled by the others and dials them, and a claim
    // through it commits everywhere.
    cluster.crash(2).await;
    cluster.restart(2).await;
    let w = claim_ok(cluster.node(2), "after-rotation").await;
    cluster.applied_everywhere(w.index).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn material_that_does_not_fit_is_refused_and_the_node_goes_on_with_what_it_has() {
    let (cluster, _) = TestCluster::ready(Options::default()).await;
    let tls_dir = cluster.tls_dir();
    let ca = Ca::dev(&tls_dir);
    let addr = cluster.addrs[&1];
    let in_use = presented(addr, &cluster.ca_pem()).await.expect("handshake");
    let until = cluster.node(1).status().tls_valid_until.unwrap();

    // A renewal half written: the new certificate, the old key.
    let (cert, key) = ca.node_cert(1, Duration::from_secs(30 * DAY));
    write(tls_dir.join("node1.pem"), &cert);
    let e = cluster.node(1).reload_tls().unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    // A certificate of the CA that is not a node's (an operator's: clientAuth only).
    let (operator, operator_key) = ca.operator_cert();
    write(tls_dir.join("node1.pem"), &operator);
    write(tls_dir.join("node1.key"), &operator_key);
    let e = cluster.node(1).reload_tls().unwrap_err();
    assert!(matches!(e, TlsError::NotANodeCertificate { .. }), "{e}");
    assert!(e.to_string().contains("node1.pem"), "names the file: {e}");
    // A key file gone.
    std::fs::remove_file(tls_dir.join("node1.key")).unwrap();
    let e = cluster.node(1).reload_tls().unwrap_err();
    assert!(matches!(e, TlsError::Missing { .. }), "{e}");

    // Nothing changed: the same certificate for new connections, the same expiry, and the
    // node serves.
    assert_eq!(presented(addr, &cluster.ca_pem()).await, Ok(in_use));
    assert_eq!(cluster.node(1).status().tls_valid_until, Some(until));
    let w = claim_ok(cluster.node(1), "still-serving").await;
    cluster.applied_everywhere(w.index).await;

    // The renewal completed, it is taken up.
    write(tls_dir.join("node1.pem"), &cert);
    write(tls_dir.join("node1.key"), &key);
    cluster.node(1).reload_tls().expect("the whole renewal");
    assert_eq!(presented(addr, &cluster.ca_pem()).await, Ok(der(&cert)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_takes_up_renewed_files_by_itself() {
    let (mut cluster, _) = TestCluster::ready(Options::default()).await;
    cluster.crash(1).await;
    cluster.configs.get_mut(&1).unwrap().tls.reload_check_secs = 1;
    cluster.restart(1).await;
    let tls_dir = cluster.tls_dir();

    // Written the way a renewal agent may write them: the certificate, then the key.
    let (cert, key) = Ca::dev(&tls_dir).node_cert(1, Duration::from_secs(3 * DAY));
    write(tls_dir.join("node1.pem"), &cert);
    write(tls_dir.join("node1.key"), &key);
    let ca = cluster.ca_pem();
    wait_for(
        "node 1 to present its renewed certificate",
        TIMEOUT,
        || async { (presented(cluster.addrs[&1], &ca).await == Ok(der(&cert))).then_some(()) },
    )
    .await;
    let until = cluster.node(1).status().tls_valid_until.unwrap();
    assert!(near(until, now() + 3 * DAY), "{until}");
    let w = claim_ok(cluster.node(1), "renewed").await;
    cluster.applied_everywhere(w.index).await;
}
