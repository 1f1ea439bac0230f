//! openraft's storage conformance suite against the sled log and state machine, plus the
//! data-directory identity checks.

use agentreg::raft::types::{StorageError, TypeConfig};
use agentreg::raft::{DataDir, DataDirError, LogStore, StateMachineStore};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path(), "suite", 0).expect("open data dir");
        Ok((dir, data.log, data.state_machine))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("storage suite failed: {e}");
    }
}

#[test]
fn data_dir_of_another_cluster_or_node_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    drop(DataDir::open(dir.path(), "alpha", 1).unwrap());
    let err = DataDir::open(dir.path(), "beta", 1)
        .err()
        .expect("other cluster accepted");
    assert!(matches!(err, DataDirError::Mismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("alpha") && err.to_string().contains("beta"),
        "{err}"
    );
    let err = DataDir::open(dir.path(), "alpha", 2)
        .err()
        .expect("other node accepted");
    assert!(matches!(err, DataDirError::Mismatch { .. }), "{err}");
    // Refusals changed nothing: the rightful owner still opens it.
    DataDir::open(dir.path(), "alpha", 1).unwrap();
}

/// A node's QUIC endpoint secret is written the first time and read back ever after,
/// whatever the node offers later (its TLS key, from which the first one is derived, may be
/// renewed); one of the wrong size is refused and left as it was.
#[test]
fn the_endpoint_secret_is_written_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path(), "alpha", 1).unwrap();
    assert_eq!(
        data.endpoint_secret(dir.path(), || [1u8; 40]).unwrap(),
        [1u8; 40]
    );
    assert_eq!(
        data.endpoint_secret(dir.path(), || [2u8; 40]).unwrap(),
        [1u8; 40]
    );
    drop(data);
    // Reopened (open waits for the lock this process held a moment ago).
    let data = DataDir::open(dir.path(), "alpha", 1).unwrap();
    assert_eq!(
        data.endpoint_secret(dir.path(), || [3u8; 40]).unwrap(),
        [1u8; 40]
    );

    data.db
        .open_tree("identity")
        .unwrap()
        .insert("quic_endpoint_secret", &[9u8; 7][..])
        .unwrap();
    let err = data
        .endpoint_secret(dir.path(), || [4u8; 40])
        .expect_err("a secret of 7 bytes taken");
    assert!(
        matches!(
            err,
            DataDirError::EndpointSecret {
                len: 7,
                expected: 40,
                ..
            }
        ),
        "{err}"
    );
    let kept = data
        .db
        .open_tree("identity")
        .unwrap()
        .get("quic_endpoint_secret")
        .unwrap();
    assert_eq!(kept.as_deref(), Some(&[9u8; 7][..]), "left as it was");
}

/// sled releases its lock on a closed database only once its background threads let go of
/// it, a moment after the last handle is dropped: a data dir closed a moment ago (here, held
/// 200 ms more) opens once the lock is free instead of failing (it failed once in CI, right
/// after a refusal closed it, under load). One that stays in use is refused, naming the lock.
#[test]
fn a_data_dir_locked_a_moment_longer_opens_and_one_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Opened first, on a fresh directory: nothing else can hold the lock yet.
    let lingering = sled::Config::new()
        .path(dir.path().join("db"))
        .open()
        .unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(lingering);
    });
    let data = DataDir::open(dir.path(), "alpha", 1).expect("opened once the lock was free");
    release.join().unwrap();

    let started = std::time::Instant::now();
    let err = DataDir::open(dir.path(), "alpha", 1)
        .err()
        .expect("a data dir in use opened twice");
    assert!(matches!(err, DataDirError::Open { .. }), "{err}");
    assert!(err.to_string().contains("lock"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    drop(data);
}

/// A data directory written before the log's entries moved out of sled: entries 1..=20 in
/// the `log` tree (1..=5 purged), a vote, the node's identity.
fn old_layout(path: &std::path::Path) {
    use agentreg::raft::types::{codec, Entry, LogId, Vote};
    use openraft::{CommittedLeaderId, EntryPayload};
    let db = sled::Config::new().path(path.join("db")).open().unwrap();
    let identity = db.open_tree("identity").unwrap();
    identity.insert("cluster_id", "alpha").unwrap();
    identity.insert("node_id", &1u64.to_be_bytes()).unwrap();
    let meta = db.open_tree("meta").unwrap();
    meta.insert("vote", codec::encode(&Vote::new(3, 1)).unwrap())
        .unwrap();
    let purged = LogId::new(CommittedLeaderId::new(1, 1), 5);
    meta.insert("last_purged", codec::encode(&purged).unwrap())
        .unwrap();
    let log = db.open_tree("log").unwrap();
    for i in 3..=20u64 {
        let e = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1 + i / 10, 1), i),
            payload: EntryPayload::Blank,
        };
        log.insert(i.to_be_bytes(), codec::encode(&e).unwrap())
            .unwrap();
    }
    db.flush().unwrap();
}

#[tokio::test]
async fn a_log_kept_in_sled_by_an_earlier_version_is_moved_out_once() {
    use openraft::storage::RaftLogStorage;
    use openraft::RaftLogReader;
    let dir = tempfile::tempdir().unwrap();
    old_layout(dir.path());
    // An earlier attempt that crashed half way left this behind.
    std::fs::create_dir(dir.path().join("log.new")).unwrap();
    std::fs::write(
        dir.path().join("log.new").join("0000000000000001.wal"),
        b"junk",
    )
    .unwrap();

    // The wrong node is refused before anything moves.
    assert!(DataDir::open(dir.path(), "alpha", 2).is_err());
    assert!(!dir.path().join("log").exists());

    for _ in 0..2 {
        let data = DataDir::open(dir.path(), "alpha", 1).expect("open the old layout");
        let mut log = data.log.clone();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(5));
        assert_eq!(
            state.last_log_id.map(|l| (l.leader_id.term, l.index)),
            Some((3, 20))
        );
        let got: Vec<u64> = log
            .try_get_log_entries(0..100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(got, (6..=20).collect::<Vec<_>>());
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(openraft::Vote::new(3, 1))
        );
        assert!(data.db.open_tree("log").unwrap().is_empty());
        assert!(!dir.path().join("log.new").exists());
        drop(log);
        drop(data);
    }
}
