//! Record journal: every call record is appended to a segment file before it is queued,
//! so a process killed with records still in memory leaves them on disk for the control
//! plane to replay on the next start.
//!
//! Each record is one JSON line (the overflow spool's format) written with a single
//! `write(2)` to a file opened with `O_APPEND`, so concurrent appends never interleave.
//! There is no fsync: the threat is the process dying (SIGKILL, OOM, panic), and the page
//! cache outlives the process; a host crash can lose the last seconds.
//!
//! Segments are `journal-<instance_id>-<segment:08>.jsonl` in the spool directory. A
//! segment is deleted once it is sealed (rotated or the engine stopped) and every record
//! in it was either drained and then acknowledged by the control plane, or written to an
//! overflow segment that has since been sealed. Records are acknowledged by count, in drain order, so the journal keeps
//! the segment of every drained record in that order until the acknowledgement arrives.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Creates the spool directory (and missing parents) readable by this user only.
///
/// Journal and overflow segments hold call records (source addresses, key and account
/// ids): their modes must not depend on the umask the process was started with.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Opens (creating it 0600 if needed) a segment for appending; see `create_private_dir`.
pub(crate) fn open_private_append(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Marks a drained record that never reached the journal (its write failed).
pub(crate) const NO_SEGMENT: u64 = u64::MAX;

/// Rotate after this many records...
pub(crate) const SEGMENT_RECORDS: u64 = 65_536;
/// ...or this long after the segment was opened.
pub(crate) const SEGMENT_AGE: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone, Copy)]
struct Segment {
    written: u64,
    /// Drained and acknowledged, or spooled.
    done: u64,
    sealed: bool,
}

struct Current {
    seg: u64,
    file: File,
    opened: Instant,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    next_seg: u64,
    segments: BTreeMap<u64, Segment>,
    /// Drained, not yet acknowledged: (segment, count) runs in drain order.
    pending: VecDeque<(u64, u64)>,
    pending_total: u64,
    stopped: bool,
    dir_ready: bool,
}

/// The journal of one engine instance.
pub(crate) struct Journal {
    dir: PathBuf,
    instance_id: String,
    max_records: u64,
    max_age: Duration,
    state: Mutex<State>,
    /// Appends that failed (the record still goes to the queue).
    pub(crate) errors: AtomicU64,
}

/// Counters for `Engine::stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct JournalStats {
    pub(crate) segments: u64,
    pub(crate) unacked: u64,
}

impl Journal {
    pub(crate) fn new(dir: &str, instance_id: &str, max_records: u64, max_age: Duration) -> Self {
        Journal {
            dir: PathBuf::from(dir),
            instance_id: instance_id.to_owned(),
            max_records: max_records.max(1),
            max_age,
            state: Mutex::new(State::default()),
            errors: AtomicU64::new(0),
        }
    }

    fn path(&self, seg: u64) -> PathBuf {
        self.dir
            .join(format!("journal-{}-{seg:08}.jsonl", self.instance_id))
    }

    /// Append one line (ending in `\n`); returns its segment, or `None` when the write
    /// failed (counted; the caller still queues the record).
    pub(crate) fn append(&self, line: &[u8]) -> Option<u64> {
        let mut st = self.state.lock();
        let rotate = st.current.as_ref().is_some_and(|c| {
            st.segments.get(&c.seg).map_or(0, |s| s.written) >= self.max_records
                || c.opened.elapsed() >= self.max_age
        });
        if rotate {
            self.seal_current(&mut st);
        }
        if st.current.is_none() {
            if !st.dir_ready {
                st.dir_ready = create_private_dir(&self.dir).is_ok();
            }
            let seg = st.next_seg;
            match open_private_append(&self.path(seg)) {
                Ok(file) => {
                    st.next_seg += 1;
                    st.segments.insert(seg, Segment::default());
                    st.current = Some(Current {
                        seg,
                        file,
                        opened: Instant::now(),
                    });
                }
                Err(_) => {
                    st.dir_ready = false;
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let cur = st.current.as_mut()?;
        let seg = cur.seg;
        // One write(2): a short line to a regular file is written whole unless the disk
        // is full, and O_APPEND places it after every earlier append.
        let ok = matches!(cur.file.write(line), Ok(n) if n == line.len());
        if !ok {
            // A partial line may be on disk: start a fresh segment so the next line does
            // not continue it (the reader skips the one bad line).
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.seal_current(&mut st);
            return None;
        }
        if let Some(s) = st.segments.get_mut(&seg) {
            s.written += 1;
        }
        Some(seg)
    }

    /// Records taken from the queue, oldest first, by segment.
    pub(crate) fn drained(&self, segs: impl Iterator<Item = u64>) {
        let mut st = self.state.lock();
        for seg in segs {
            st.pending_total += 1;
            match st.pending.back_mut() {
                Some((s, n)) if *s == seg => *n += 1,
                _ => st.pending.push_back((seg, 1)),
            }
        }
    }

    /// Records went to the overflow spool instead of the queue, given as (segment, count)
    /// runs, and their overflow file is sealed: it now carries them, so the journal need
    /// not.
    pub(crate) fn spooled(&self, runs: &[(u64, u64)]) {
        if runs.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        for &(seg, n) in runs {
            if let Some(s) = st.segments.get_mut(&seg) {
                s.done += n;
            }
        }
        self.collect(&mut st);
    }

    /// The oldest `count` drained records are stored by the control plane. Returns how
    /// many were acknowledged (at most the number drained and not yet acknowledged).
    pub(crate) fn ack(&self, count: u64) -> u64 {
        let mut st = self.state.lock();
        let mut left = count.min(st.pending_total);
        let acked = left;
        while left > 0 {
            let Some((seg, n)) = st.pending.front_mut() else {
                break;
            };
            let take = (*n).min(left);
            let seg = *seg;
            *n -= take;
            left -= take;
            if *n == 0 {
                st.pending.pop_front();
            }
            if let Some(s) = st.segments.get_mut(&seg) {
                s.done += take;
            }
        }
        st.pending_total -= acked;
        self.collect(&mut st);
        acked
    }

    /// No more records are coming from this engine's requests: seal the open segment so
    /// it is deleted as soon as its last record is acknowledged.
    pub(crate) fn stop(&self) {
        let mut st = self.state.lock();
        st.stopped = true;
        self.seal_current(&mut st);
    }

    pub(crate) fn stats(&self) -> JournalStats {
        let st = self.state.lock();
        JournalStats {
            segments: st.segments.len() as u64,
            unacked: st
                .segments
                .values()
                .map(|s| s.written.saturating_sub(s.done))
                .sum(),
        }
    }

    fn seal_current(&self, st: &mut State) {
        if let Some(cur) = st.current.take() {
            if let Some(s) = st.segments.get_mut(&cur.seg) {
                s.sealed = true;
            }
        }
        self.collect(st);
    }

    /// Delete sealed segments whose records are all accounted for. An idle open segment
    /// that is complete is sealed first, so a quiet or stopped engine leaves no file.
    fn collect(&self, st: &mut State) {
        let idle_complete = st.current.as_ref().is_some_and(|c| {
            let complete = st.segments.get(&c.seg).is_some_and(|s| s.done >= s.written);
            complete && (st.stopped || c.opened.elapsed() >= self.max_age)
        });
        if idle_complete {
            if let Some(cur) = st.current.take() {
                if let Some(s) = st.segments.get_mut(&cur.seg) {
                    s.sealed = true;
                }
            }
        }
        let finished: Vec<u64> = st
            .segments
            .iter()
            .filter(|(_, s)| s.sealed && s.done >= s.written)
            .map(|(seg, _)| *seg)
            .collect();
        for seg in finished {
            match std::fs::remove_file(self.path(seg)) {
                Ok(()) => {
                    st.segments.remove(&seg);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    st.segments.remove(&seg);
                }
                // Kept in the map and retried at the next collection.
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dir() -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("onetoken-journal-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn files(d: &PathBuf) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rotates_and_deletes_only_acknowledged_sealed_segments() {
        let d = dir();
        let j = Journal::new(d.to_str().unwrap(), "abc", 3, Duration::from_secs(3600));
        let segs: Vec<u64> = (0..7)
            .map(|i| j.append(format!("{{\"n\":{i}}}\n").as_bytes()).unwrap())
            .collect();
        assert_eq!(segs, [0, 0, 0, 1, 1, 1, 2]);
        assert_eq!(
            files(&d),
            [
                "journal-abc-00000000.jsonl",
                "journal-abc-00000001.jsonl",
                "journal-abc-00000002.jsonl"
            ]
        );
        let first = std::fs::read_to_string(d.join("journal-abc-00000000.jsonl")).unwrap();
        assert_eq!(first, "{\"n\":0}\n{\"n\":1}\n{\"n\":2}\n");

        // Drained out of journal order (queue order may differ slightly).
        j.drained([0, 1, 0, 0].into_iter());
        assert_eq!(j.ack(3), 3);
        assert_eq!(
            files(&d).len(),
            3,
            "segment 0 still has one unacknowledged record"
        );
        assert_eq!(j.ack(1), 1);
        assert_eq!(files(&d).len(), 2, "segment 0 complete and sealed: deleted");
        assert_eq!(j.ack(5), 0, "nothing more was drained");

        // Segment 1: one drained above, one spooled, the last drained now.
        j.spooled(&[(1, 1)]);
        j.drained([1, 2].into_iter());
        assert_eq!(j.ack(10), 2);
        assert_eq!(
            files(&d),
            ["journal-abc-00000002.jsonl"],
            "the open segment stays while running"
        );
        j.stop();
        assert!(
            files(&d).is_empty(),
            "stopped and complete: nothing remains"
        );
        assert_eq!(j.stats(), JournalStats::default());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unacknowledged_records_survive_stop() {
        let d = dir();
        let j = Journal::new(d.to_str().unwrap(), "x", 100, Duration::from_secs(3600));
        j.append(b"{}\n").unwrap();
        j.append(b"{}\n").unwrap();
        j.drained([0, 0].into_iter());
        j.ack(1);
        j.stop();
        assert_eq!(files(&d), ["journal-x-00000000.jsonl"]);
        assert_eq!(j.stats().unacked, 1);
        j.ack(1);
        assert!(files(&d).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn age_rotation_and_failed_writes() {
        let d = dir();
        let j = Journal::new(d.to_str().unwrap(), "y", 100, Duration::ZERO);
        assert_eq!(j.append(b"{}\n"), Some(0));
        assert_eq!(
            j.append(b"{}\n"),
            Some(1),
            "max age 0: every append rotates"
        );
        j.drained([0, 1, NO_SEGMENT].into_iter());
        assert_eq!(j.ack(3), 3);
        assert!(
            files(&d).is_empty(),
            "idle and complete: even the open one goes"
        );

        // An unwritable directory: the append fails and is counted, nothing panics.
        let blocked = d.join("file-not-dir");
        std::fs::write(&blocked, b"").unwrap();
        let bad = Journal::new(blocked.to_str().unwrap(), "z", 10, Duration::ZERO);
        assert_eq!(bad.append(b"{}\n"), None);
        assert_eq!(bad.errors.load(Ordering::Relaxed), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Cost of journaling, per record: serialization, the write(2), and the whole
    /// `Records::push` (journal plus queue). Run with `--nocapture` to see the numbers.
    #[test]
    fn cost_per_record() {
        use crate::records::{CallRecord, Records};
        let d = dir();
        let rec = CallRecord {
            ts: 1_780_000_000_000_000,
            request_id: "req_0123456789abcdef0000000042".into(),
            org_id: "org_0123456789".into(),
            account_id: "acc_0123456789".into(),
            key_id: "key_0123456789".into(),
            path: "/v1/chat/completions",
            model_requested: "gpt-4o-mini".into(),
            model_served: "gpt-4o-mini-2024-07-18".into(),
            provider: "prov_openai".into(),
            prompt_tokens: 1234,
            completion_tokens: 567,
            usage_source: "upstream",
            cost: 123_456_789,
            status: 200,
            latency_us: 456_789,
            ttfb_us: 12_345,
            streamed: 1,
            source_ip: "203.0.113.77".into(),
            user_agent: "OpenAI/Python 1.54.0".into(),
            rate_limit: "pass",
            attempts: 1,
            ..CallRecord::default()
        };
        const N: u32 = 20_000;
        let mut buf = Vec::with_capacity(1024);
        let t = Instant::now();
        for _ in 0..N {
            buf.clear();
            serde_json::to_writer(&mut buf, &rec).unwrap();
            buf.push(b'\n');
        }
        let ser_serde = t.elapsed() / N;
        let serde_line = buf.clone();
        let t = Instant::now();
        for _ in 0..N {
            buf.clear();
            crate::records::write_line(&rec, &mut buf);
        }
        let ser = t.elapsed() / N;
        assert_eq!(buf, serde_line);
        let j = Journal::new(d.to_str().unwrap(), "bench", SEGMENT_RECORDS, SEGMENT_AGE);
        let t = Instant::now();
        for _ in 0..N {
            j.append(&buf).unwrap();
        }
        let write = t.elapsed() / N;
        let journaled = Records::new(1 << 20, d.to_str().unwrap(), "bench2").with_journal(
            Journal::new(d.to_str().unwrap(), "bench2", SEGMENT_RECORDS, SEGMENT_AGE),
        );
        let plain = Records::new(1 << 20, d.to_str().unwrap(), "bench3");
        let t = Instant::now();
        for _ in 0..N {
            plain.push(rec.clone());
        }
        let push_plain = t.elapsed() / N;
        let t = Instant::now();
        for _ in 0..N {
            journaled.push(rec.clone());
        }
        let push_journaled = t.elapsed() / N;
        println!(
            "journal cost per record ({} bytes): serialize {ser:?} (serde_json {ser_serde:?}), \
             append (write(2) under the lock) {write:?}; \
             Records::push without journal {push_plain:?}, with journal {push_journaled:?}",
            buf.len()
        );
        // Loose bound: debug builds serialize ~50x slower; this only catches a blocking
        // mistake such as an fsync per record.
        assert!(push_journaled < Duration::from_millis(1));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
