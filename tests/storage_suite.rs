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
