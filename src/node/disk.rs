//! How much disk the data dir takes, and how much is left where it lives.
//!
//! A node whose disk fills stops (its next log write fails, see `duties.rs`), so operators
//! need to see it coming: both figures are in `/metrics` and `status`, and `agentreg
//! health` names a node with less room left than its data dir already takes. That is the
//! bound that matters: a snapshot is written whole beside the one it replaces, and log
//! segments accumulate until the snapshot lets them go.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Below this much room a node is named by `agentreg health` whatever its data dir takes.
const LEAST_ROOM: u64 = 64 << 20;

/// The data dir's size and the room left on its filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Bytes in the files under the data dir.
    pub used_bytes: u64,
    /// Bytes the node's user may still write on the data dir's filesystem; absent where
    /// the system does not say.
    pub available_bytes: Option<u64>,
}

impl DiskUsage {
    /// The data dir at `dir`, now.
    pub(crate) fn of(dir: &Path) -> DiskUsage {
        DiskUsage {
            used_bytes: size_of_dir(dir),
            available_bytes: available(dir),
        }
    }

    /// What `agentreg health` says of it, if anything.
    pub(crate) fn problem(&self) -> Option<String> {
        let available = self.available_bytes?;
        (available < self.used_bytes.max(LEAST_ROOM)).then(|| {
            format!(
                "its disk has {} left, less than its data dir takes ({}): the next snapshot \
                 may not fit, and a failed write stops the node",
                mib(available),
                mib(self.used_bytes)
            )
        })
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Bytes in the regular files under `dir` (symbolic links not followed); what cannot be
/// read counts as nothing.
fn size_of_dir(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size_of_dir(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(unix)]
fn available(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` is valid for one statvfs, which
    // the call fills when it returns 0.
    let r = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    // Both are 64-bit on the platforms built for; the conversion keeps 32-bit ones building.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Some(blocks.saturating_mul(size))
}

#[cfg(not(unix))]
fn available(_: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_measured_with_the_room_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(dir.path().join("wal")).unwrap();
        std::fs::write(dir.path().join("wal/1"), vec![0u8; 234]).unwrap();
        let usage = DiskUsage::of(dir.path());
        assert_eq!(usage.used_bytes, 1234);
        assert!(usage.available_bytes.is_some_and(|a| a > 0), "{usage:?}");
    }

    #[test]
    fn too_little_room_is_less_than_the_data_dir_takes() {
        let usage = |used: u64, available: u64| DiskUsage {
            used_bytes: used << 20,
            available_bytes: Some(available << 20),
        };
        assert_eq!(usage(100, 1000).problem(), None);
        let low = usage(100, 99)
            .problem()
            .expect("less room than the data dir");
        assert!(
            low.contains("99.0 MiB left") && low.contains("(100.0 MiB)"),
            "{low}"
        );
        assert!(usage(1, 63).problem().is_some(), "at least 64 MiB left");
        assert_eq!(usage(1, 64).problem(), None);
        let unknown = DiskUsage {
            used_bytes: 1,
            available_bytes: None,
        };
        assert_eq!(unknown.problem(), None);
    }
}
