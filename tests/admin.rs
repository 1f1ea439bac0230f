//! The operator side: status over mutual TLS, key rotation and retirement through the log,
//! the imported initial signing key.

mod common;

use agentreg::cli::{AdminClient, Refused};
use agentreg::client::ErrorCode;
use agentreg::identity::{KeyState, Secret};
use agentreg::node::{AdminRequest, ListFilter, NodeStatus, LIST_FRAME_ROWS};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_names_every_member_and_the_leader() {
    let cluster = TestCluster::start(Options::default()).await;
    let leader = cluster.leader().await;
    cluster.keyring_ready().await;
    let args = cluster.admin_args();
    let admin = AdminClient::new(&args).unwrap();
    for (id, addr) in &cluster.addrs {
        let v = admin
            .call(&addr.to_string(), &AdminRequest::Status)
            .await
            .unwrap();
        let s: NodeStatus = serde_json::from_value(v["status"].clone()).unwrap();
        assert_eq!(s.node_id, *id);
        assert_eq!(s.leader, Some(leader));
        assert_eq!(s.members.len(), 3);
        assert_eq!(s.tables.keys, 1);
        assert_eq!(s.role, if *id == leader { "leader" } else { "follower" });
        // The data dir's size (its log and tables) and the room left beside it.
        let disk = s.disk.expect("disk in status");
        assert!(disk.used_bytes > 0, "{disk:?}");
        assert!(disk.available_bytes.is_some_and(|a| a > 0), "{disk:?}");
    }
    // A node that is down is skipped with a message; the next one answers.
    let mut endpoints = vec!["127.0.0.1:9".to_owned()];
    endpoints.extend(args.endpoints.clone());
    let (addr, _) = admin
        .call_any(&endpoints, &AdminRequest::Status)
        .await
        .unwrap();
    assert_ne!(addr, "127.0.0.1:9");
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotated_keys_keep_validating_until_retired() {
    let cluster = TestCluster::start(Options::default()).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let agent = cluster.agent(1).await;
    let old = agent
        .claim_agent_id("before-rotation", false)
        .await
        .unwrap();

    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    let endpoints = cluster.admin_args().endpoints;
    let (_, v) = admin
        .call_any(&endpoints, &AdminRequest::KeysRotate)
        .await
        .unwrap();
    let new_key = v["key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_key, old.key_id);

    let fresh = agent.claim_agent_id("after-rotation", false).await.unwrap();
    assert_eq!(fresh.key_id, new_key);
    let checker = cluster.agent(3).await;
    assert!(
        checker.validate_certificate(&old).await.unwrap().valid,
        "rotation broke an old certificate"
    );
    assert!(checker.validate_certificate(&fresh).await.unwrap().valid);

    // The active key cannot be retired.
    let err = admin
        .call_any(
            &endpoints,
            &AdminRequest::KeysRetire {
                key_id: new_key.clone(),
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("active signing key"), "{err:#}");
    assert_eq!(refusal_code(&err), Some("refused"), "{err:#}");
    admin
        .call_any(
            &endpoints,
            &AdminRequest::KeysRetire {
                key_id: old.key_id.clone(),
            },
        )
        .await
        .unwrap();
    let v = checker.validate_certificate(&old).await.unwrap();
    assert_eq!(v.reason.as_deref(), Some("signing key retired"));
    assert_eq!(v.code, Some(ErrorCode::CertificateKeyRetired));
    assert!(checker.validate_certificate(&fresh).await.unwrap().valid);

    let (_, v) = admin
        .call_any(&endpoints, &AdminRequest::KeysList)
        .await
        .unwrap();
    let listed = v["keys"].to_string();
    assert!(
        listed.contains("retired") && listed.contains("active"),
        "{listed}"
    );
    assert!(
        !listed.contains("secret"),
        "key listing shows secrets: {listed}"
    );
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_initial_key_can_be_imported_from_a_secret_file() {
    let secret = b"0123456789abcdef0123456789abcdef-imported".to_vec();
    let cluster = TestCluster::start(Options {
        hmac_secret: Some([secret.clone(), b"\n".to_vec()].concat()),
        ..Options::default()
    })
    .await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    for id in 1..=3 {
        let state = cluster.node(id).state().read();
        let (key_id, s) = state.state.keyring().active().unwrap();
        assert_eq!(s, &Secret::new(secret.clone()), "node {id}");
        assert_eq!(
            state.state.keyring().get(key_id).unwrap().state,
            KeyState::Active
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_health_and_readiness_over_http() {
    let (cluster, leader) = TestCluster::ready_with_faults().await;
    let agent = cluster.agent(leader).await;
    agent.claim_agent_id("measured", false).await.unwrap();
    agent
        .register("measured", serde_json::Map::new(), None, false)
        .await
        .unwrap();
    let _ = agent.claim_agent_id("measured", false).await;

    let (code, body) = http_get(cluster.node(leader), "/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        "agentreg_role{role=\"leader\"} 1",
        "agentreg_term ",
        "agentreg_commit_index ",
        "agentreg_applied_index ",
        "agentreg_agents_connected 1",
        "agentreg_claims 1",
        "agentreg_pings_sent_total",
        "agentreg_pings_missed_total",
        "agentreg_evictions_committed_total",
        "agentreg_requests_total{command=\"claim_agent_id\",outcome=\"ok\"} 1",
        "agentreg_requests_total{command=\"claim_agent_id\",outcome=\"error\"} 1",
        "agentreg_request_duration_seconds_bucket{le=",
        "agentreg_data_dir_bytes ",
        "agentreg_data_dir_available_bytes ",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in\n{body}");
    }
    let cert = agent.certificate().unwrap();
    assert!(
        !body.contains(&cert.signature),
        "a secret reached the metrics"
    );

    for id in 1..=3 {
        assert_eq!(http_get(cluster.node(id), "/healthz").await.0, 200);
        assert_eq!(http_get(cluster.node(id), "/readyz").await.0, 200);
    }
    tracing::info!("--- a node cut off from the others is alive but not ready");
    let cut = cluster.follower().await;
    cluster.net().isolate(cut);
    assert_eq!(http_get(cluster.node(cut), "/healthz").await.0, 200);
    let (code, body) = http_get(cluster.node(cut), "/readyz").await;
    assert_eq!(code, 503, "{body}");
    cluster.net().heal();
    wait_for("the healed node to be ready again", TIMEOUT, || async {
        (http_get(cluster.node(cut), "/readyz").await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_list_agents_and_claims_and_revoke_by_id() {
    let cluster = TestCluster::start(Options::default()).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let a = cluster.agent(2).await;
    let cert = a.claim_agent_id("listed", false).await.unwrap();
    let meta = serde_json::json!({"role": "worker"})
        .as_object()
        .unwrap()
        .clone();
    let reg = a.register("listed", meta, None, false).await.unwrap();
    let mut events = a.events();

    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    let endpoints = cluster.admin_args().endpoints;
    let (_, v) = admin
        .call_any(
            &endpoints,
            &AdminRequest::AgentsList {
                only: Default::default(),
                stream: false,
            },
        )
        .await
        .unwrap();
    let agents: Vec<agentreg::node::AgentInfo> =
        serde_json::from_value(v["agents"].clone()).unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(
        (
            agents[0].agent_id.as_str(),
            agents[0].node_id,
            agents[0].session_id,
            agents[0].certificate_serial
        ),
        ("listed", 2, reg.session_id, Some(cert.serial))
    );
    assert_eq!(agents[0].metadata["role"], "worker");
    let (_, v) = admin
        .call_any(
            &endpoints,
            &AdminRequest::ClaimsList {
                only: Default::default(),
                stream: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(v["claims"][0]["serial"], cert.serial);
    assert_eq!(v["more"], 0);
    // A prefix and a limit: the first matching ids in order, and how many more matched.
    let other = cluster.agent(1).await;
    for id in ["lot-c", "lot-a", "lone", "lot-b"] {
        other.claim_agent_id(id, false).await.unwrap();
    }
    let list = |prefix: &str, limit| AdminRequest::ClaimsList {
        only: ListFilter {
            prefix: Some(prefix.into()),
            limit,
        },
        stream: false,
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["claims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["agent_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, v) = admin
        .call_any(&endpoints, &list("lot-", Some(2)))
        .await
        .unwrap();
    assert_eq!(
        (ids(&v), &v["more"]),
        (vec!["lot-a".into(), "lot-b".into()], &json!(1))
    );
    let (_, v) = admin.call_any(&endpoints, &list("lo", None)).await.unwrap();
    assert_eq!(ids(&v), ["lone", "lot-a", "lot-b", "lot-c"]);
    let (_, v) = admin
        .call_any(&endpoints, &list("nobody", None))
        .await
        .unwrap();
    assert_eq!((ids(&v).len(), &v["more"]), (0, &json!(0)));
    let (_, v) = admin
        .call_any(
            &endpoints,
            &AdminRequest::AgentsList {
                only: ListFilter {
                    prefix: Some("list".into()),
                    limit: Some(0),
                },
                stream: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (v["agents"].as_array().unwrap().len(), &v["more"]),
        (0, &json!(1))
    );
    let (_, v) = admin
        .call_any(
            &endpoints,
            &AdminRequest::ClaimsShow {
                agent_id: "listed".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(v["claim"]["agent_id"], "listed");
    assert_eq!(v["session"]["node_id"], 2);
    let err = admin
        .call_any(
            &endpoints,
            &AdminRequest::ClaimsShow {
                agent_id: "nobody".into(),
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("neither claimed nor connected"),
        "{err:#}"
    );
    // Final: answered by the first endpoint, not tried on the next.
    assert_eq!(refusal_code(&err), Some("not_found"), "{err:#}");
    assert_eq!(
        err.downcast_ref::<Refused>().unwrap().addr,
        endpoints[0],
        "{err:#}"
    );

    // Revoking by id ends the session too; the agent is told and does not come back.
    let (_, v) = admin
        .call_any(
            &endpoints,
            &AdminRequest::Revoke {
                agent_id: "listed".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(v["session_ended"], true);
    let ev = tokio::time::timeout(TIMEOUT, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, agentreg::client::ClientEvent::SessionLost { .. }),
        "{ev:?}"
    );
    assert_eq!(
        cluster
            .agent(3)
            .await
            .validate_certificate(&cert)
            .await
            .unwrap()
            .reason
            .as_deref(),
        Some("revoked")
    );
    admin.close().await;
}

/// The code of a node's refusal, if `err` is one.
fn refusal_code(err: &anyhow::Error) -> Option<&str> {
    err.downcast_ref::<Refused>()?.code.as_deref()
}

/// A list longer than a frame comes in frames of rows, and gives what the one-frame answer
/// gives: the same rows in the same order, the same count of rows a limit left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_lists_stream_in_frames_with_the_rows_of_one_answer() {
    let (cluster, leader) = TestCluster::ready(Options::default()).await;
    let rows = 2 * LIST_FRAME_ROWS + 100;
    let node = cluster.node(leader);
    for chunk in (0..rows).collect::<Vec<_>>().chunks(100) {
        let ids: Vec<String> = chunk.iter().map(|i| format!("bulk-{i:05}")).collect();
        futures::future::join_all(ids.iter().map(|id| claim_ok(node, id))).await;
    }
    claim_ok(node, "other").await;
    let a = cluster.agent(2).await;
    a.claim_agent_id("bulk-registered", false).await.unwrap();
    a.register("bulk-registered", Default::default(), None, false)
        .await
        .unwrap();

    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    let endpoints = cluster.admin_args().endpoints;
    let claims = |prefix: &str, limit, stream| AdminRequest::ClaimsList {
        only: ListFilter {
            prefix: Some(prefix.into()),
            limit,
        },
        stream,
    };
    for (prefix, limit, frames, more) in [
        ("bulk-", None, 3, 0),
        (
            "bulk-",
            Some(LIST_FRAME_ROWS + 1),
            2,
            rows - LIST_FRAME_ROWS,
        ),
        ("bulk-", Some(0), 0, rows + 1),
        ("nobody", None, 0, 0),
    ] {
        let mut list = admin
            .list_any(&endpoints, &claims(prefix, limit, true))
            .await
            .unwrap();
        let mut streamed = Vec::new();
        let mut sizes = Vec::new();
        while let Some(batch) = list.next().await.unwrap() {
            sizes.push(batch.len());
            streamed.extend(batch);
        }
        assert_eq!(
            sizes.len(),
            frames,
            "{prefix} {limit:?}: frames of {sizes:?}"
        );
        assert!(sizes.iter().all(|n| *n <= LIST_FRAME_ROWS));
        assert_eq!(list.more(), more as u64, "{prefix} {limit:?}");
        let (_, whole) = admin
            .call_any(&endpoints, &claims(prefix, limit, false))
            .await
            .unwrap();
        assert_eq!(whole["more"], more);
        assert_eq!(json!(streamed), whole["claims"], "{prefix} {limit:?}");
    }
    let mut agents = admin
        .list_any(
            &endpoints,
            &AdminRequest::AgentsList {
                only: Default::default(),
                stream: true,
            },
        )
        .await
        .unwrap();
    let first = agents.next().await.unwrap().expect("one frame of rows");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["agent_id"], "bulk-registered");
    assert_eq!(first[0]["node_id"], 2);
    assert!(agents.next().await.unwrap().is_none());
}
