//! An engine's journal read back the way ingestion reads it: every segment of the instance
//! in order, whole lines only, each record once. Shared by the `common` and `fleet`
//! harnesses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use onetoken_gateway::journal_reader::read_segment;
use onetoken_gateway::CallRecord;
use parking_lot::Mutex;

/// The segment files of `instance_id` in `dir`, in write order.
pub fn segments(dir: &Path, instance_id: &str) -> Vec<PathBuf> {
    let prefix = format!("journal-{instance_id}-");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy();
                    name.starts_with(&prefix) && name.ends_with(".jsonl")
                })
                .collect()
        })
        .unwrap_or_default();
    // Zero-padded segment numbers: name order is write order.
    v.sort();
    v
}

/// Every record the instance journaled so far, in write order.
pub fn journal_records(dir: &Path, instance_id: &str) -> Vec<CallRecord> {
    JournalTail::new(dir, instance_id).take()
}

/// Reads on from where the previous [`JournalTail::take`] stopped.
pub struct JournalTail {
    dir: PathBuf,
    instance_id: String,
    offsets: Mutex<BTreeMap<PathBuf, u64>>,
}

impl JournalTail {
    pub fn new(dir: &Path, instance_id: &str) -> Self {
        JournalTail {
            dir: dir.to_owned(),
            instance_id: instance_id.to_owned(),
            offsets: Mutex::new(BTreeMap::new()),
        }
    }

    /// The records journaled since the last call, in write order. A line that does not
    /// parse fails the test: the engine must never write one.
    pub fn take(&self) -> Vec<CallRecord> {
        let mut offsets = self.offsets.lock();
        let mut out = Vec::new();
        for path in segments(&self.dir, &self.instance_id) {
            let offset = offsets.entry(path.clone()).or_insert(0);
            let read = read_segment(&path, *offset, usize::MAX, false).unwrap();
            assert_eq!(read.bad_lines, 0, "bad journal line in {}", path.display());
            *offset = read.next_offset;
            out.extend(read.records);
        }
        out
    }
}
