//! Every identity event leaves one audit line with its ids and outcome, and never a secret;
//! at the binary's default level, that line is the only one it leaves.

mod common;

use std::sync::{Arc, Mutex};

use agentreg::cli::AdminClient;
use agentreg::node::AdminRequest;
use common::*;
use serde_json::Map;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_events_are_audited_without_secrets() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    // The logger the binary installs, at its default level, writing plain lines here.
    use agentreg::cli::logging;
    tracing::subscriber::set_global_default(logging::subscriber(
        agentreg::cli::LogFormat::Text,
        tracing_subscriber::EnvFilter::new(logging::DEFAULT_FILTER),
        move || writer.clone(),
        false,
    ))
    .expect("the only logger of this test binary");

    let cluster = TestCluster::start(Options::default()).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let a = cluster.agent(1).await;
    let cert = a.claim_agent_id("audited", false).await.unwrap();
    let _ = a.claim_agent_id("audited", false).await;
    a.register("audited", Map::new(), None, false)
        .await
        .unwrap();
    let b = cluster.agent(2).await;
    b.register("audited", Map::new(), Some(cert.clone()), false)
        .await
        .unwrap();
    b.revoke_certificate(&cert).await.unwrap();
    b.revoke_certificate(&cert).await.unwrap();
    // A claim sent twice with its claim token: the second is a repeat.
    let token = "the-claim-token-of-agent-repeated";
    for id in [2, 3] {
        let answer = cluster
            .raw(id)
            .await
            .request(serde_json::json!({"type":"system_request","command":"claim_agent_id","agent_id":"repeated","claim_token":token}))
            .await;
        assert_eq!(answer["success"], true, "{answer}");
    }
    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    admin
        .call_any(&cluster.admin_args().endpoints, &AdminRequest::KeysRotate)
        .await
        .unwrap();
    admin.close().await;

    let lines = buffer.lines();
    let find = |needles: &[&str]| {
        lines
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .unwrap_or_else(|| panic!("no audit line with {needles:?} in\n{}", lines.join("\n")))
            .clone()
    };
    let serial = format!("serial={}", cert.serial);
    find(&[
        "event=\"claim\"",
        "agent_id=\"audited\"",
        "node_id=1",
        &serial,
        "outcome=ok",
    ]);
    find(&[
        "event=\"claim\"",
        "agent_id=\"audited\"",
        "outcome=refused: Agent ID audited is already claimed",
    ]);
    find(&[
        "event=\"register\"",
        "agent_id=\"audited\"",
        "node_id=1",
        "session_id=",
        "outcome=ok",
    ]);
    find(&[
        "event=\"takeover\"",
        "agent_id=\"audited\"",
        "node_id=2",
        "replaced session",
    ]);
    find(&[
        "event=\"revoke\"",
        "agent_id=\"audited\"",
        &serial,
        "outcome=ok",
    ]);
    find(&[
        "event=\"revoke\"",
        &serial,
        "outcome=ok",
        "detail=already revoked",
    ]);
    // One line per event: the claim and the two revocations of its certificate, each in the
    // audit trail and nowhere else.
    let with_serial: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(&format!("{serial} ")) || l.ends_with(&serial))
        .collect();
    assert_eq!(with_serial.len(), 3, "{with_serial:#?}");
    assert!(
        with_serial.iter().all(|l| l.contains(" audit: ")),
        "{with_serial:#?}"
    );
    find(&[
        "event=\"claim\"",
        "agent_id=\"repeated\"",
        "node_id=3",
        "outcome=ok",
        "detail=repeated: the same claim token, the same certificate",
    ]);
    find(&["event=\"keyring_init\"", "outcome=ok"]);
    find(&["event=\"key_rotate\"", "outcome=ok"]);
    let all = lines.join("\n");
    assert!(
        !all.contains(&cert.signature),
        "a signature reached the audit log"
    );
    assert!(
        !all.contains(&cert.certificate_hash),
        "a certificate hash reached the audit log"
    );
    assert!(!all.contains(token), "a claim token reached the audit log");
    for id in 1..=3 {
        for (_, key) in cluster.node(id).state().read().state.keyring().iter() {
            if let Some(s) = &key.secret {
                assert!(
                    !all.contains(&hex::encode(s.expose())),
                    "a signing key reached the audit log"
                );
            }
        }
    }
}
