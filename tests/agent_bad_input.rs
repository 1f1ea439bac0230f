//! Every kind of bad input on the agent endpoint gets a clear `success:false` answer (or a
//! closed stream when the frame cannot be read), changes nothing, and the node keeps serving.

mod common;

use agentreg::identity::{Certificate, Secret};
use common::*;
use serde_json::{json, Value};

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn req(command: &str, fields: Value) -> Value {
    let mut v = json!({"type": "system_request", "command": command, "request_id": "t-1"});
    v.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let cluster = TestCluster::start(Options::default()).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let owner = cluster.agent(1).await;
    let cert = owner.claim_agent_id("owned", false).await.unwrap();
    let other = owner.claim_agent_id("other", false).await.unwrap();
    let revoked = owner.claim_agent_id("gone", false).await.unwrap();
    owner.revoke_certificate(&revoked).await.unwrap();
    let w = claim_ok(cluster.node(1), "barrier").await;
    cluster.applied_everywhere(w.index).await;
    let before: Vec<_> = (1..=3).map(|id| cluster.tables(id)).collect();

    let raw = cluster.raw(2).await;
    tracing::info!("--- frames that cannot be read");
    // Zero length and over-long frames get an error answer; a truncated one too, as far as
    // the stream allows.
    let a = raw
        .send_raw(&[0, 0, 0, 0])
        .await
        .expect("answer to an empty frame");
    assert_eq!(
        (a["success"].clone(), a["error"].as_str().unwrap()),
        (json!(false), "bad frame: frame length is zero")
    );
    assert_eq!(a["code"], "bad_request", "{a}");
    let a = raw
        .send_raw(&65537u32.to_be_bytes())
        .await
        .expect("answer to an over-long frame");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("over the limit of 65536"),
        "{a}"
    );
    let a = raw.send_raw(&[0, 0, 0, 50, b'{']).await;
    if let Some(a) = a {
        assert!(
            a["error"]
                .as_str()
                .unwrap()
                .contains("ended inside a frame"),
            "{a}"
        );
    }
    let a = raw.send_raw(&[0, 0]).await;
    if let Some(a) = a {
        assert_eq!(a["success"], false);
    }

    tracing::info!("--- frames that are not requests");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (frame(&[0xff, 0xfe, 0xfd]), "request is not valid UTF-8"),
        (
            frame(b"[1,2]"),
            "request must be a JSON object, not an array",
        ),
        (
            frame(b"\"claim\""),
            "request must be a JSON object, not a string",
        ),
        (frame(b"{\"type\":"), "request is not valid JSON"),
        (
            frame(req("claim_agent_id", json!({})).to_string().as_bytes()),
            "missing field agent_id",
        ),
        (
            frame(
                req("claim_agent_id", json!({"agent_id": 7}))
                    .to_string()
                    .as_bytes(),
            ),
            "field agent_id must be a string, not a number",
        ),
        (
            frame(
                req("claim_agent_id", json!({"agent_id": "x", "force": "yes"}))
                    .to_string()
                    .as_bytes(),
            ),
            "field force must be true or false",
        ),
        (
            frame(
                req("register_agent", json!({"agent_id": "x", "metadata": 5}))
                    .to_string()
                    .as_bytes(),
            ),
            "field metadata must be an object",
        ),
        (
            frame(
                req("validate_certificate", json!({"certificate": "abc"}))
                    .to_string()
                    .as_bytes(),
            ),
            "field certificate must be an object",
        ),
        (
            frame(
                req(
                    "validate_certificate",
                    json!({"certificate": {"agent_id": "x"}}),
                )
                .to_string()
                .as_bytes(),
            ),
            "certificate is malformed",
        ),
        (
            frame(
                req("ping_agent", json!({"timestamp": "now"}))
                    .to_string()
                    .as_bytes(),
            ),
            "field timestamp must be a number",
        ),
    ];
    for (bytes, want) in cases {
        let a = raw.send_raw(&bytes).await.expect("an answer");
        assert_eq!(a["type"], "system_response");
        assert_eq!(a["success"], false, "{a}");
        assert_eq!(a["code"], "bad_request", "{a}");
        assert!(
            a["error"].as_str().unwrap().contains(want),
            "wanted {want:?} in {a}"
        );
    }
    let a = raw.request(req("fly", json!({}))).await;
    assert_eq!(a["code"], "unknown_command", "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .starts_with("unknown command \"fly\""),
        "{a}"
    );
    assert_eq!(
        (a["request_id"].clone(), a["command"].clone()),
        (json!("t-1"), json!("fly")),
        "request_id and command are echoed"
    );

    tracing::info!("--- certificates that must not pass");
    let mut bad: Vec<(Certificate, &str)> = Vec::new();
    let altered = |f: &dyn Fn(&mut Certificate)| {
        let mut c = cert.clone();
        f(&mut c);
        c
    };
    bad.push((altered(&|c| c.agent_id = "owned2".into()), "bad signature"));
    bad.push((altered(&|c| c.serial += 1), "bad signature"));
    bad.push((altered(&|c| c.issued_at -= 1), "bad signature"));
    bad.push((altered(&|c| c.expires_at += 3600), "bad signature"));
    bad.push((altered(&|c| c.key_id = "k999".into()), "unknown key"));
    bad.push((
        altered(&|c| c.certificate_hash = "ab".repeat(32)),
        "bad signature",
    ));
    bad.push((altered(&|c| c.signature = "ab".repeat(32)), "bad signature"));
    let key_id = cert.key_id.clone();
    bad.push((
        Certificate::issue(
            "owned",
            cert.serial,
            cert.issued_at,
            cert.expires_at,
            &key_id,
            &Secret::new(vec![42; 32]),
        ),
        "bad signature",
    ));
    let secret = cluster
        .node(1)
        .state()
        .read()
        .state
        .keyring()
        .active()
        .unwrap()
        .1
        .clone();
    bad.push((
        Certificate::issue(
            "owned",
            cert.serial,
            now() - 7200,
            now() - 3600,
            &key_id,
            &secret,
        ),
        "expired",
    ));
    bad.push((revoked.clone(), "revoked"));
    for (c, reason) in &bad {
        let a = raw
            .request(req("validate_certificate", json!({"certificate": c})))
            .await;
        assert_eq!(
            (a["success"].clone(), a["valid"].clone()),
            (json!(true), json!(false)),
            "{a}"
        );
        assert_eq!(a["reason"], *reason, "{c:?}");
        // The code names the same reason: "bad signature" is certificate_bad_signature.
        let code = format!("certificate_{}", reason.replace(' ', "_"));
        assert_eq!(a["code"], code, "{a}");
        let a = raw
            .request(req(
                "register_agent",
                json!({"agent_id": c.agent_id, "certificate": c}),
            ))
            .await;
        assert_eq!(a["success"], false, "{a}");
        assert_eq!(
            (&a["code"], &a["error"]),
            (
                &json!(code),
                &json!(format!("certificate validation failed: {reason}"))
            )
        );
        let a = raw
            .request(req(
                "claim_agent_id",
                json!({"agent_id": c.agent_id, "force": true, "certificate": c}),
            ))
            .await;
        assert_eq!(a["success"], false, "{a}");
        let a = raw
            .request(req("release_agent_id", json!({"certificate": c})))
            .await;
        assert_eq!(a["success"], false, "{a}");
    }
    // A valid certificate for another id.
    let a = raw
        .request(req(
            "register_agent",
            json!({"agent_id": "owned", "certificate": other}),
        ))
        .await;
    assert_eq!(
        a["error"],
        "certificate validation failed: issued for another agent"
    );

    tracing::info!("--- nothing changed, and every node still serves");
    let w = claim_ok(cluster.node(3), "barrier-2").await;
    cluster.applied_everywhere(w.index).await;
    for id in 1..=3 {
        let mut t = cluster.tables(id);
        let barrier = t.claims.remove("barrier-2").expect("the barrier claim");
        // The barrier claim took the next id; refused commands took none.
        assert_eq!(t.next_id, barrier.serial + 1);
        assert!(barrier.serial >= before[id as usize - 1].next_id);
        t.next_id = before[id as usize - 1].next_id;
        assert_eq!(
            t,
            before[id as usize - 1],
            "bad input changed node {id}'s tables"
        );
    }
    let a = raw
        .request(req("ping_agent", json!({"timestamp": 12.5})))
        .await;
    assert_eq!(
        (a["success"].clone(), a["timestamp"].clone()),
        (json!(true), json!(12.5))
    );
    assert!(
        cluster
            .agent(2)
            .await
            .validate_certificate(&cert)
            .await
            .unwrap()
            .valid
    );
}

/// `a` is a successful ping answer echoing `timestamp`.
fn assert_pong(a: &Value, timestamp: u64) {
    assert_eq!(
        (&a["success"], &a["timestamp"]),
        (&json!(true), &json!(timestamp)),
        "{a}"
    );
}

/// A request still arriving (half its frame sent) holds up nothing else on its connection:
/// the node serves a connection's requests side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_still_arriving_does_not_hold_up_the_next_on_its_connection() {
    let cluster = TestCluster::start(Options::default()).await;
    cluster.leader().await;
    let raw = cluster.raw(2).await;
    let slow = frame(
        req("ping_agent", json!({"timestamp": 1}))
            .to_string()
            .as_bytes(),
    );
    let (mut send, mut recv) = raw.conn.open_bi().await.expect("open stream");
    send.write_all(&slow[..10]).await.unwrap();
    // Streams are accepted in order, so the node has the slow one before this one.
    let a = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        raw.request(req("ping_agent", json!({"timestamp": 2}))),
    )
    .await
    .expect("a ping answered while another request on the connection is still arriving");
    assert_pong(&a, 2);
    send.write_all(&slow[10..]).await.unwrap();
    send.finish().unwrap();
    let a = read_answer(&mut recv)
        .await
        .expect("the slow request answered");
    assert_pong(&a, 1);
}
