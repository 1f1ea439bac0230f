//! The Raft log's entries, in append-only segment files of their own.
//!
//! ```text
//! <data dir>/log/0000000000000001.wal   segments, numbered in the order they were written
//! record = u32 LE payload length | u32 LE CRC-32 of the payload | payload = bincode(Record)
//! ```
//!
//! Why not sled (where the vote and the node's identity stay): an append must be on disk
//! before openraft is told so, and twice per claim (the leader's, then a follower's). sled
//! 0.34 writes with `sync_file_range` and needs an `fdatasync` after it, two trips to the
//! disk per append; here an append of a batch is one `pwrite` and one `fdatasync`.
//!
//! Each segment is created at its full size (sparse) and synced, with its directory, before
//! the first record goes in, so an `fdatasync` after an append never has to write the file's
//! size. A zero length ends a segment's records; a batch that does not fit in the rest of
//! the newest segment starts the next one.
//!
//! Removing the log's tail (openraft's `truncate`, on a follower whose unacknowledged
//! entries a new leader overwrites) is itself a record. Purging the head (after a snapshot)
//! forgets the entries in memory and deletes whole segments of purged entries; the purge
//! point is kept by the caller, and entries at or below it are skipped when the log is read
//! back.
//!
//! Reading back at start: the segments in order, every record checked. A damaged or
//! incomplete record in the newest segment is a write that a crash interrupted before it
//! was synced, so never acknowledged: the log ends before it, and the rest of that segment
//! is zeroed so that later appends are read back alone. Damage anywhere else, or entries
//! out of order, is refused with an error naming the file and offset.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::RaftLogId;
use serde::{Deserialize, Serialize};

use super::types::{codec, Entry, LogId};

/// Size a segment is created with.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// Bytes before a record's payload: its length and its checksum.
const HEADER: usize = 8;

/// What a record holds.
// Records are made one at a time and encoded (or decoded and taken apart) at once.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize)]
enum Record {
    Entry(Entry),
    /// Entries from `since` on are removed.
    Truncate {
        since: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("raft log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("raft log {path} is damaged at byte {offset}: {what}")]
    Damaged {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("raft log: entry {got} cannot follow entry {after}")]
    OutOfOrder { after: u64, got: u64 },
    #[error("raft log: a write failed earlier; no more writes until the node restarts")]
    Broken,
    #[error("raft log: cannot encode a record: {0}")]
    Encode(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where an entry is.
#[derive(Clone, Copy)]
struct Loc {
    log_id: LogId,
    segment: u64,
    /// Start of the record (its header) in the segment.
    offset: u64,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    /// The highest entry index written into it, if any.
    last_index: Option<u64>,
}

/// What readers look at: the live entries and the segments that hold them.
struct Index {
    segments: BTreeMap<u64, Segment>,
    /// The live entries, in index order, without gaps.
    locs: VecDeque<Loc>,
}

/// The segment being appended to; only writers look at it.
struct Head {
    segment: u64,
    file: Arc<File>,
    size: u64,
    /// Where the next record goes.
    end: u64,
    /// A write failed: what is on disk is unknown, so nothing more is written.
    broken: bool,
}

/// The log's entries on disk. Writes (`append`, `truncate`, `purge`) block on the disk and
/// are serialized; reads run alongside them.
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    index: RwLock<Index>,
    head: Mutex<Head>,
}

impl Wal {
    /// Opens the log in `dir` (created if missing), skipping entries at or below `purged`.
    ///
    /// # Errors
    /// The directory or a segment cannot be read or written, or a segment other than the
    /// newest is damaged.
    pub fn open(dir: &Path, segment_bytes: u64, purged: Option<u64>) -> Result<Wal, WalError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let numbers = segment_numbers(dir).map_err(io_err(dir))?;

        let mut index = Index {
            segments: BTreeMap::new(),
            locs: VecDeque::new(),
        };
        let mut head = None;
        for (i, &n) in numbers.iter().enumerate() {
            let newest = i + 1 == numbers.len();
            let path = segment_path(dir, n);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let size = file.metadata().map_err(io_err(&path))?.len();
            let (end, last_index) = replay(n, &path, &file, size, newest, purged, &mut index)?;
            let file = Arc::new(file);
            if newest {
                head = Some(Head {
                    segment: n,
                    file: file.clone(),
                    size,
                    end,
                    broken: false,
                });
            }
            index.segments.insert(n, Segment { file, last_index });
        }
        let head = match head {
            Some(h) => h,
            None => {
                let (head, segment) = new_segment(dir, 1, segment_bytes)?;
                index.segments.insert(1, segment);
                head
            }
        };
        Ok(Wal {
            dir: dir.to_owned(),
            segment_bytes,
            index: RwLock::new(index),
            head: Mutex::new(head),
        })
    }

    fn head(&self) -> MutexGuard<'_, Head> {
        self.head.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_index(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest live entry's id.
    pub fn last_log_id(&self) -> Option<LogId> {
        self.read_index().locs.back().map(|l| l.log_id)
    }

    /// Appends `entries`, which must continue the log without a gap, and syncs them.
    ///
    /// # Errors
    /// The entries do not continue the log (nothing is written), or the write failed (and
    /// the log takes no more writes).
    pub fn append(&self, entries: Vec<Entry>) -> Result<(), WalError> {
        let mut head = self.head();
        if head.broken {
            return Err(WalError::Broken);
        }
        let mut prev = self.last_log_id().map(|l| l.index);
        let mut buf = Vec::new();
        let mut locs = Vec::with_capacity(entries.len());
        for entry in entries {
            let log_id = *entry.get_log_id();
            check_follows(prev, log_id.index)?;
            prev = Some(log_id.index);
            let offset = buf.len() as u64;
            let len = push_record(&mut buf, &Record::Entry(entry))?;
            locs.push(Loc {
                log_id,
                segment: 0,
                offset,
                len,
            });
        }
        let Some(last) = locs.last().map(|l| l.log_id.index) else {
            return Ok(());
        };
        let (segment, base) = self.write(&mut head, &buf)?;
        let mut index = self.write_index();
        index.locs.extend(locs.into_iter().map(|mut l| {
            l.segment = segment;
            l.offset += base;
            l
        }));
        if let Some(s) = index.segments.get_mut(&segment) {
            s.last_index = Some(s.last_index.map_or(last, |l| l.max(last)));
        }
        Ok(())
    }

    /// Removes the entries from index `since` on, durably.
    ///
    /// # Errors
    /// The write failed (and the log takes no more writes).
    pub fn truncate(&self, since: u64) -> Result<(), WalError> {
        let mut head = self.head();
        if head.broken {
            return Err(WalError::Broken);
        }
        if self
            .read_index()
            .locs
            .back()
            .is_none_or(|l| l.log_id.index < since)
        {
            return Ok(());
        }
        let mut buf = Vec::new();
        push_record(&mut buf, &Record::Truncate { since })?;
        self.write(&mut head, &buf)?;
        let mut index = self.write_index();
        while index.locs.back().is_some_and(|l| l.log_id.index >= since) {
            index.locs.pop_back();
        }
        Ok(())
    }

    /// Forgets the entries up to and including `upto` and deletes the segments that hold
    /// nothing else. The caller keeps `upto` durably first: a segment that survives a crash
    /// here is skipped up to it when read back.
    ///
    /// # Errors
    /// A segment could not be deleted.
    pub fn purge(&self, upto: u64) -> Result<(), WalError> {
        let head = self.head();
        let doomed: Vec<u64> = {
            let mut index = self.write_index();
            while index.locs.front().is_some_and(|l| l.log_id.index <= upto) {
                index.locs.pop_front();
            }
            let mut doomed = Vec::new();
            while let Some(entry) = index.segments.first_entry() {
                let s = entry.get();
                if *entry.key() == head.segment || s.last_index.is_some_and(|l| l > upto) {
                    break;
                }
                doomed.push(entry.remove_entry().0);
            }
            doomed
        };
        for &n in &doomed {
            let path = segment_path(&self.dir, n);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        if !doomed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The live entries with index in `start..end`.
    ///
    /// # Errors
    /// A segment could not be read, or holds something else than was written there.
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<Entry>, WalError> {
        // Runs of records that are next to each other in one segment, each read at once.
        let mut runs: Vec<(Arc<File>, Vec<Loc>)> = Vec::new();
        {
            let index = self.read_index();
            let Some(first) = index.locs.front().map(|l| l.log_id.index) else {
                return Ok(Vec::new());
            };
            let from = start.saturating_sub(first) as usize;
            let to = (end.saturating_sub(first) as usize).min(index.locs.len());
            for loc in index.locs.range(from.min(to)..to) {
                let adjacent = runs
                    .last()
                    .and_then(|(_, run)| run.last())
                    .is_some_and(|p| {
                        p.segment == loc.segment
                            && p.offset + HEADER as u64 + u64::from(p.len) == loc.offset
                    });
                if adjacent {
                    if let Some((_, run)) = runs.last_mut() {
                        run.push(*loc);
                    }
                    continue;
                }
                let Some(s) = index.segments.get(&loc.segment) else {
                    return Err(WalError::Damaged {
                        path: segment_path(&self.dir, loc.segment),
                        offset: loc.offset,
                        what: "segment missing".into(),
                    });
                };
                runs.push((s.file.clone(), vec![*loc]));
            }
        }
        let mut out = Vec::new();
        for (file, run) in runs {
            let (first, last) = (run[0], run[run.len() - 1]);
            let path = segment_path(&self.dir, first.segment);
            let base = first.offset;
            let mut buf =
                vec![0; (last.offset + HEADER as u64 + u64::from(last.len) - base) as usize];
            file.read_exact_at(&mut buf, base).map_err(io_err(&path))?;
            for loc in run {
                let at = (loc.offset - base) as usize;
                let damaged = |what: String| WalError::Damaged {
                    path: path.clone(),
                    offset: loc.offset,
                    what,
                };
                match parse_record(&buf[at..]) {
                    Ok((Record::Entry(e), _)) if *e.get_log_id() == loc.log_id => out.push(e),
                    Ok(_) => return Err(damaged(format!("not entry {}", loc.log_id))),
                    Err(what) => return Err(damaged(what)),
                }
            }
        }
        Ok(out)
    }

    /// Writes `buf` (whole records) into the newest segment, or a new one if it does not
    /// fit, and syncs it. Returns the segment and the offset it went to.
    fn write(&self, head: &mut Head, buf: &[u8]) -> Result<(u64, u64), WalError> {
        let result = (|| {
            if head.size - head.end < buf.len() as u64 {
                let size = self.segment_bytes.max(buf.len() as u64);
                let (next, segment) = new_segment(&self.dir, head.segment + 1, size)?;
                self.write_index().segments.insert(next.segment, segment);
                *head = next;
            }
            let path = segment_path(&self.dir, head.segment);
            head.file
                .write_all_at(buf, head.end)
                .and_then(|()| head.file.sync_data())
                .map_err(io_err(&path))?;
            let at = head.end;
            head.end += buf.len() as u64;
            Ok((head.segment, at))
        })();
        if result.is_err() {
            head.broken = true;
        }
        result
    }
}

/// Creates segment `n` of `size` bytes, synced with its directory: the head to append to,
/// and the segment for the index.
fn new_segment(dir: &Path, n: u64, size: u64) -> Result<(Head, Segment), WalError> {
    let path = segment_path(dir, n);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err(&path))?;
    file.set_len(size)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&path))?;
    sync_dir(dir)?;
    let file = Arc::new(file);
    let head = Head {
        segment: n,
        file: file.clone(),
        size,
        end: 0,
        broken: false,
    };
    let segment = Segment {
        file,
        last_index: None,
    };
    Ok((head, segment))
}

/// Whether any segment in `dir` holds a record (a missing `dir` holds none). Reads only.
///
/// # Errors
/// `dir` or a segment in it cannot be read.
pub fn holds_records(dir: &Path) -> io::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    for n in segment_numbers(dir)? {
        let mut first = [0; 4];
        let file = File::open(segment_path(dir, n))?;
        let got = file.read_at(&mut first, 0)?;
        if got > 0 && first[..got].iter().any(|b| *b != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The numbers of the segments in `dir`, in order.
fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let name = item?.file_name();
        if let Some(n) = name
            .to_string_lossy()
            .strip_suffix(".wal")
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016x}.wal"))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Entry `index` must follow the newest live entry, `last`, without a gap. Any index may
/// start an empty log (openraft appends after its purge point, or after a snapshot).
fn check_follows(last: Option<u64>, index: u64) -> Result<(), WalError> {
    match last {
        Some(l) if l + 1 != index => Err(WalError::OutOfOrder {
            after: l,
            got: index,
        }),
        _ => Ok(()),
    }
}

/// Appends `record` with its header to `buf`; returns the payload's length.
fn push_record(buf: &mut Vec<u8>, record: &Record) -> Result<u32, WalError> {
    let payload = codec::encode(record).map_err(|e| WalError::Encode(e.to_string()))?;
    let len = u32::try_from(payload.len())
        .map_err(|_| WalError::Encode(format!("{} bytes, over 4 GiB", payload.len())))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    Ok(len)
}

/// Reads the record at the start of `bytes`: the record and its length with header.
fn parse_record(bytes: &[u8]) -> Result<(Record, usize), String> {
    if bytes.len() < HEADER {
        return Err("record header cut off".into());
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if len == 0 {
        return Err("empty record".into());
    }
    let Some(payload) = bytes.get(HEADER..HEADER + len) else {
        return Err(format!("record of {len} bytes cut off"));
    };
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let record = codec::decode(payload).map_err(|e| format!("undecodable record: {e}"))?;
    Ok((record, HEADER + len))
}

/// Reads segment `n` into `index`; returns where its records end and the highest entry
/// index in it.
fn replay(
    n: u64,
    path: &Path,
    file: &File,
    size: u64,
    newest: bool,
    purged: Option<u64>,
    index: &mut Index,
) -> Result<(u64, Option<u64>), WalError> {
    let mut bytes = vec![0; size as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io_err(path))?;
    let mut at = 0usize;
    let mut last_index = None;
    while bytes.len() - at >= HEADER && bytes[at..at + 4] != [0; 4] {
        let (record, used) = match parse_record(&bytes[at..]) {
            Ok(r) => r,
            Err(what) if newest => {
                tracing::warn!(
                    segment = %path.display(),
                    offset = at,
                    "raft log ends in an incomplete write ({what}); it was never acknowledged, dropping it"
                );
                break;
            }
            Err(what) => {
                return Err(WalError::Damaged {
                    path: path.to_owned(),
                    offset: at as u64,
                    what,
                })
            }
        };
        match record {
            Record::Entry(e) => {
                let log_id = *e.get_log_id();
                last_index = Some(last_index.map_or(log_id.index, |l: u64| l.max(log_id.index)));
                if purged.is_some_and(|p| log_id.index <= p) {
                    // Purged, in a segment that also holds live entries (or survived a crash).
                } else {
                    check_follows(index.locs.back().map(|l| l.log_id.index), log_id.index)
                        .map_err(|e| WalError::Damaged {
                            path: path.to_owned(),
                            offset: at as u64,
                            what: e.to_string(),
                        })?;
                    index.locs.push_back(Loc {
                        log_id,
                        segment: n,
                        offset: at as u64,
                        len: (used - HEADER) as u32,
                    });
                }
            }
            Record::Truncate { since } => {
                while index.locs.back().is_some_and(|l| l.log_id.index >= since) {
                    index.locs.pop_back();
                }
            }
        }
        at += used;
    }
    // Whatever follows the last whole record of the newest segment (an interrupted write)
    // is zeroed, so that it cannot be read as records after the ones appended next.
    if newest && bytes[at..].iter().any(|b| *b != 0) {
        file.write_all_at(&vec![0; bytes.len() - at], at as u64)
            .and_then(|()| file.sync_data())
            .map_err(io_err(path))?;
    }
    Ok((at as u64, last_index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn entries(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
        range.map(|i| entry(term, i)).collect()
    }

    /// (term, index) of every live entry.
    fn contents(wal: &Wal) -> Vec<(u64, u64)> {
        wal.read(0, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    fn ids(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<(u64, u64)> {
        range.map(|i| (term, i)).collect()
    }

    fn segments(dir: &Path) -> Vec<u64> {
        segment_numbers(dir).unwrap()
    }

    /// A log in `dir` holding entries 1..=3: it, its segment's path and where the next
    /// record goes.
    fn three_entries(dir: &Path) -> (Wal, PathBuf, u64) {
        let wal = Wal::open(dir, SEGMENT_BYTES, None).unwrap();
        wal.append(entries(1, 1..=3)).unwrap();
        let (segment, end) = {
            let head = wal.head();
            (head.segment, head.end)
        };
        (wal, segment_path(dir, segment), end)
    }

    /// A log in `dir` with room for a few records per segment, entries 1..=`n` appended one
    /// by one: a segment for every few entries.
    fn small_segments(dir: &Path, n: u64) -> Wal {
        let wal = Wal::open(dir, 100, None).unwrap();
        for i in 1..=n {
            wal.append(vec![entry(1, i)]).unwrap();
        }
        wal
    }

    #[test]
    fn appends_are_read_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), SEGMENT_BYTES, None).unwrap();
        assert!(wal.last_log_id().is_none() && !holds_records(dir.path()).unwrap());
        wal.append(entries(1, 1..=4)).unwrap();
        wal.append(entries(2, 5..=9)).unwrap();
        assert!(holds_records(dir.path()).unwrap());
        drop(wal);
        let wal = Wal::open(dir.path(), SEGMENT_BYTES, None).unwrap();
        let mut want = ids(1, 1..=4);
        want.extend(ids(2, 5..=9));
        assert_eq!(contents(&wal), want);
        assert_eq!(wal.last_log_id().map(|l| l.index), Some(9));
        let some: Vec<u64> = wal
            .read(3, 6)
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(some, vec![3, 4, 5]);
        assert!(wal.read(10, 20).unwrap().is_empty());
    }

    #[test]
    fn an_entry_out_of_order_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), SEGMENT_BYTES, None).unwrap();
        wal.append(entries(1, 1..=3)).unwrap();
        let err = wal.append(entries(1, 5..=6)).unwrap_err();
        assert!(matches!(err, WalError::OutOfOrder { got: 5, .. }), "{err}");
        let err = wal.append(vec![entry(1, 4), entry(1, 6)]).unwrap_err();
        assert!(matches!(err, WalError::OutOfOrder { got: 6, .. }), "{err}");
        wal.append(entries(1, 4..=4)).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), SEGMENT_BYTES, None).unwrap();
        assert_eq!(contents(&wal), ids(1, 1..=4));
    }

    #[test]
    fn a_truncated_tail_stays_truncated_and_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), SEGMENT_BYTES, None).unwrap();
        wal.append(entries(1, 1..=10)).unwrap();
        wal.truncate(6).unwrap();
        assert_eq!(contents(&wal), ids(1, 1..=5));
        wal.append(entries(2, 6..=8)).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), SEGMENT_BYTES, None).unwrap();
        let mut want = ids(1, 1..=5);
        want.extend(ids(2, 6..=8));
        assert_eq!(contents(&wal), want);
        // Truncating past the end changes nothing.
        wal.truncate(20).unwrap();
        assert_eq!(contents(&wal), want);
    }

    #[test]
    fn batches_roll_over_into_new_segments_and_purging_deletes_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let wal = small_segments(dir.path(), 40);
        // A batch larger than a segment gets a segment of its own size.
        wal.append(entries(1, 41..=60)).unwrap();
        let before = segments(dir.path());
        assert!(before.len() > 5, "{before:?}");
        assert_eq!(contents(&wal), ids(1, 1..=60));

        wal.purge(30).unwrap();
        let after = segments(dir.path());
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
        assert_eq!(contents(&wal), ids(1, 31..=60));
        // A purge point beyond the end empties the log; appends continue after it.
        drop(wal);
        let wal = Wal::open(dir.path(), 100, Some(30)).unwrap();
        assert_eq!(contents(&wal), ids(1, 31..=60));
        wal.purge(70).unwrap();
        assert!(wal.last_log_id().is_none());
        wal.append(vec![entry(2, 71)]).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), 100, Some(70)).unwrap();
        assert_eq!(contents(&wal), ids(2, 71..=71));
    }

    #[test]
    fn a_write_cut_short_by_a_crash_is_dropped_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, path, end) = three_entries(dir.path());
        wal.append(entries(1, 4..=6)).unwrap();
        drop(wal);
        // The second batch only half reached the disk: its bytes after the first record's
        // header are lost, so the first record is cut short; the later records arrived.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0; 6], end + HEADER as u64 + 2).unwrap();
        drop(file);

        let wal = Wal::open(dir.path(), SEGMENT_BYTES, None).unwrap();
        assert_eq!(contents(&wal), ids(1, 1..=3));
        // The next append goes where the broken one was, and is read back alone.
        wal.append(entries(2, 4..=4)).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), SEGMENT_BYTES, None).unwrap();
        let mut want = ids(1, 1..=3);
        want.push((2, 4));
        assert_eq!(contents(&wal), want);
    }

    #[test]
    fn damage_before_the_newest_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(small_segments(dir.path(), 10));
        let first = segment_path(dir.path(), segments(dir.path())[0]);
        let file = OpenOptions::new().write(true).open(&first).unwrap();
        file.write_all_at(&[0xff], HEADER as u64).unwrap();
        drop(file);
        let err = Wal::open(dir.path(), 100, None)
            .err()
            .expect("damage accepted");
        assert!(matches!(err, WalError::Damaged { offset: 0, .. }), "{err}");
        assert!(
            err.to_string().contains(&first.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn entries_out_of_order_on_disk_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, path, end) = three_entries(dir.path());
        drop(wal);
        // A whole, well-formed record of entry 7 right after entry 3.
        let mut buf = Vec::new();
        push_record(&mut buf, &Record::Entry(entry(1, 7))).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&buf, end).unwrap();
        drop(file);
        let err = Wal::open(dir.path(), SEGMENT_BYTES, None)
            .err()
            .expect("a gap accepted");
        assert!(
            matches!(&err, WalError::Damaged { offset, .. } if *offset == end),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_failed_write_stops_all_further_writes() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 100, None).unwrap();
        wal.append(entries(1, 1..=1)).unwrap();
        // The next segment cannot be created.
        let blocker = segment_path(dir.path(), 2);
        std::fs::create_dir(&blocker).unwrap();
        assert!(matches!(
            wal.append(entries(1, 2..=20)),
            Err(WalError::Io { .. })
        ));
        std::fs::remove_dir(&blocker).unwrap();
        assert!(matches!(
            wal.append(entries(1, 2..=2)),
            Err(WalError::Broken)
        ));
        assert!(matches!(wal.truncate(1), Err(WalError::Broken)));
        assert_eq!(contents(&wal), ids(1, 1..=1));
    }
}
