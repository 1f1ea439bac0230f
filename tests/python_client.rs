//! A second implementation of the agent protocol: clients/python/agentreg_client.py, written
//! from docs/protocol.md alone, walks through an agent's life against a cluster (claim with
//! a token and sent again, a rival claim, validation, registration, answering the node's
//! pings, its node stopped and the agent registered again at another, a tampered
//! certificate, the error codes, release), each connection first sent a QUIC Retry, and the
//! first node it is given refusing for its clock (it must send the request elsewhere). It
//! checks every answer itself; this test runs it, stops its node when it waits for that,
//! and reads its result.
//!
//! It needs python3 with aioquic. Where that is missing the test says so and passes, unless
//! AGENTREG_PYTHON_CLIENT=required (CI sets it, after installing aioquic): then it fails.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use agentreg::client::ErrorCode;
use common::*;
use serde_json::Value;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/clients/python/agentreg_client.py"
);

/// Whether python3 with aioquic is here; fails if it must be and is not.
fn python_with_aioquic() -> bool {
    let here = std::process::Command::new("python3")
        .args(["-c", "import aioquic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !here {
        assert_ne!(
            std::env::var("AGENTREG_PYTHON_CLIENT").as_deref(),
            Ok("required"),
            "python3 with aioquic is required (AGENTREG_PYTHON_CLIENT=required) and missing"
        );
        eprintln!("SKIPPED: python3 with aioquic is not installed (pip install aioquic)");
    }
    here
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_client_written_from_the_protocol_document_walks_an_agents_life() {
    if !python_with_aioquic() {
        return;
    }
    // Every connection is first sent a QUIC Retry, as a node under load does (docs/protocol.md,
    // "Transport"): another QUIC stack must answer it by itself.
    let (mut cluster, leader) = TestCluster::ready(Options {
        limits: agentreg::config::LimitsConfig {
            retry_after_handshakes: 0,
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    // Through a follower (its writes are forwarded to the leader), whose clock is off: the
    // walk's first request is refused clock_skew there and sent to the next node.
    let node = cluster.follower().await;
    cluster.node(node).shift_clock_for_tests(2 * 86_400_000);
    let raw = cluster.raw(node).await;
    let probe = serde_json::json!({"type": "system_request", "command": "claim_agent_id",
                                   "agent_id": "probe"});
    wait_for("the follower to refuse for its clock", TIMEOUT, || async {
        (raw.request(probe.clone()).await["code"] == ErrorCode::ClockSkew.as_str()).then_some(())
    })
    .await;
    let ca = cluster.dir.path().join("python-ca.pem");
    std::fs::write(&ca, cluster.ca_pem()).unwrap();

    // It is told every node: the skewed follower, the other follower, the leader; and to
    // wait after registering for its node to go: the test then stops that node (the other
    // follower; 0x103) and the walk carries on at the next, the leader.
    let other = cluster
        .others(node)
        .into_iter()
        .find(|id| *id != leader)
        .unwrap();
    let order = [node, other, leader].map(|id| cluster.addrs[&id].to_string());
    let mut command = tokio::process::Command::new("python3");
    command.arg(SCRIPT).arg("--ca").arg(&ca);
    for addr in order {
        command.args(["--node", &addr]);
    }
    let mut walk = command
        .args(["--agent-id", "snake", "--move"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut out = tokio::io::BufReader::new(walk.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    let mut stopped = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while let Some(line) = tokio::time::timeout_at(deadline, out.next_line())
        .await
        .expect("the walk ends within 90 s")
        .expect("its output")
    {
        if line.contains("for the node to go") {
            let at: Value = serde_json::from_str(&line).unwrap();
            let id = *cluster
                .addrs
                .iter()
                .find(|(_, a)| at["node"] == a.to_string())
                .expect("a node of the cluster")
                .0;
            cluster.stop(id).await;
            stopped = Some(id);
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let out = tokio::time::timeout_at(deadline, walk.wait_with_output())
        .await
        .expect("the walk ends within 90 s")
        .expect("python3 runs");
    let said = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the walk failed:\n{said}");

    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let steps: Vec<&str> = lines.iter().filter_map(|l| l["step"].as_str()).collect();
    assert_eq!(steps.len(), 13, "{said}");
    let moved: Vec<&Value> = lines.iter().filter_map(|l| l.get("moved")).collect();
    assert_eq!(moved[0]["because"], "clock_skew", "{said}");
    assert_eq!(moved[0]["from"], cluster.addrs[&node].to_string(), "{said}");
    assert_eq!(
        stopped,
        Some(other),
        "the walk had moved from the skewed node to the next"
    );
    assert!(steps.contains(&"answer the node's pings"), "{said}");
    assert!(steps.contains(&"register on another node"), "{said}");
    let result = lines.last().unwrap();
    assert_eq!(result["failures"], serde_json::json!([]), "{said}");

    // What the Python client did is what the cluster holds: the certificate it was issued
    // and released is refused by every node left, as Rust's client sees it.
    let cert = agentreg::proto::agent::parse_certificate(&result["certificate"]).unwrap();
    let left = cluster.others(other);
    for &id in &left {
        let v = cluster
            .agent(id)
            .await
            .validate_certificate(&cert)
            .await
            .unwrap();
        assert_eq!(
            v.code,
            Some(ErrorCode::CertificateRevoked),
            "node {id}: {v:?}"
        );
    }
    assert!(!cluster.tables(left[0]).claims.contains_key("snake"));

    // Retries were sent (to every connection, the Python client's included).
    let retried = metric(cluster.node(left[0]), "agentreg_handshakes_retried_total").await;
    assert!(retried.is_some_and(|r| r >= 1.0), "{retried:?}");
}
