//! Backups: `snapshot save` takes the tables from a live cluster; `snapshot restore` rebuilds
//! every member's data dir from the file, and the restored cluster serves exactly the
//! backed-up tables (claims, revocations, signing keys) and takes new writes.

mod common;

use std::time::Duration;

use agentreg::cli::AdminClient;
use agentreg::node::{AdminRequest, NodeStatus};
use agentreg::raft::backup::{self, Backup, BackupError};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_restored_from_a_backup_serves_the_backed_up_tables() {
    let mut cluster = TestCluster::start(Options::default()).await;
    cluster.leader().await;
    cluster.keyring_ready().await;
    let agent = cluster.agent(2).await;
    let kept = agent.claim_agent_id("kept", false).await.unwrap();
    let revoked = agent.claim_agent_id("revoked", false).await.unwrap();
    agent.revoke_certificate(&revoked).await.unwrap();

    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    let addr = cluster.addrs[&3].to_string();
    let (answer, bytes) = admin
        .call_with_data(
            &addr,
            &AdminRequest::SnapshotSave,
            1 << 30,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let backup = Backup::from_bytes(&bytes).unwrap();
    let summary = backup.summary().unwrap();
    assert_eq!(answer["bytes"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(summary.cluster_id, "test");
    assert_eq!(summary.taken_from, 3);
    assert!(
        summary.tables.claims >= 1 && summary.tables.keys == 1,
        "{summary:?}"
    );
    let backed_up_tables = backup.tables().unwrap();
    assert!(backed_up_tables.claims.contains_key("kept"));

    // Written after the backup: gone after the restore.
    agent.claim_agent_id("after-backup", false).await.unwrap();
    agent.close().await;
    admin.close().await;

    for id in [1, 2, 3] {
        cluster.stop(id).await;
    }
    let peers: Vec<(u64, String)> = cluster.configs[&1]
        .peers
        .iter()
        .map(|p| (p.id, p.addr.clone()))
        .collect();
    for id in [1, 2, 3] {
        let dir = cluster.configs[&id].data_dir.clone();
        // A data dir in use is refused and left as it was.
        let err = backup::restore(&backup, &dir, "test", id, &peers)
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::DataDirInUse(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let at = backup::restore(&backup, &dir, "test", id, &peers)
            .await
            .unwrap();
        assert_eq!(Some(at), backup.meta.last_log_id);
    }
    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    cluster.leader().await;

    // Every node holds the backed-up tables, and the cluster takes new writes.
    let agent = cluster.agent(1).await;
    assert!(agent.validate_certificate(&kept).await.unwrap().valid);
    assert!(!agent.validate_certificate(&revoked).await.unwrap().valid);
    let again = agent
        .claim_agent_id("after-backup", false)
        .await
        .expect("an id claimed after the backup is free again");
    assert!(again.serial > backup.meta.last_log_id.unwrap().index);
    let taken = agent.claim_agent_id("kept", false).await;
    assert!(taken.is_err(), "a backed-up claim still holds: {taken:?}");
    agent.close().await;

    // All three agree on the tables; the new term is above the backup's.
    let admin = AdminClient::new(&cluster.admin_args()).unwrap();
    wait_for("the restored nodes to agree", TIMEOUT, || async {
        let mut seen = Vec::new();
        for addr in cluster.addrs.values() {
            let v = admin
                .call(&addr.to_string(), &AdminRequest::Status)
                .await
                .ok()?;
            let s: NodeStatus = serde_json::from_value(v["status"].clone()).ok()?;
            seen.push((s.applied_index, s.state_digest, s.term));
        }
        let first = seen[0].clone();
        (seen.iter().all(|s| *s == first)
            && first.2 > backup.meta.last_log_id.unwrap().leader_id.term)
            .then_some(())
    })
    .await;
    admin.close().await;
}
