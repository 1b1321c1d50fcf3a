//! Call metadata records: a bounded in-memory queue, drained by the control plane, with
//! JSONL overflow segments when the queue is full. Records never hold content.
//!
//! Overflow segments are written as `overflow-<instance>-<seq>.jsonl.open` and renamed to
//! `overflow-<instance>-<seq>.jsonl` when sealed; the control plane reads (claims, then
//! deletes) only `*.jsonl`, so a file it can see is complete and never written again.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::journal::{self, Journal, JournalStats, NO_SEGMENT};

/// One call's metadata; the fields are the columns of `tests/contract/call_log_columns.json`
/// in order.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CallRecord {
    /// Request start, microseconds since the Unix epoch.
    pub ts: i64,
    /// Unique request id, also sent as `x-request-id`.
    pub request_id: String,
    /// Org id; empty when the key was not recognised.
    pub org_id: String,
    /// Account id; empty when the key was not recognised.
    pub account_id: String,
    /// API key identifier (never the key); empty when not recognised.
    pub key_id: String,
    /// Interface path from a fixed set.
    pub path: &'static str,
    /// Requested model, only when it is a configured model.
    pub model_requested: String,
    /// Upstream model that served it.
    pub model_served: String,
    /// Provider id.
    pub provider: String,
    /// Prompt tokens (cached included).
    pub prompt_tokens: u32,
    /// Output tokens.
    pub completion_tokens: u32,
    /// Cached prompt tokens.
    pub cached_tokens: u32,
    /// `upstream`, `estimated` or `none`.
    pub usage_source: &'static str,
    /// Charged amount, nano-units.
    pub cost: i64,
    /// HTTP status sent to the client (499 when it went away first).
    pub status: u16,
    /// Error code; empty on success.
    pub error_code: &'static str,
    /// Request start to end of response, microseconds.
    pub latency_us: u32,
    /// Request start to first response byte, microseconds.
    pub ttfb_us: u32,
    /// 1 when the response was an SSE stream.
    pub streamed: u8,
    /// Client peer address.
    pub source_ip: String,
    /// User-Agent, at most 256 bytes.
    pub user_agent: String,
    /// `pass` or `limited`.
    pub rate_limit: &'static str,
    /// Upstream attempts (0 when never forwarded).
    pub attempts: u8,
    /// Sensitive-content guard result, `category:count,...` ([`crate::guard::Findings::flags`]);
    /// empty when the guard is off or found nothing. Categories and counts only.
    pub guard_flags: String,
}

impl CallRecord {
    /// Column names in contract order.
    pub const COLUMNS: [&'static str; 24] = [
        "ts",
        "request_id",
        "org_id",
        "account_id",
        "key_id",
        "path",
        "model_requested",
        "model_served",
        "provider",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "usage_source",
        "cost",
        "status",
        "error_code",
        "latency_us",
        "ttfb_us",
        "streamed",
        "source_ip",
        "user_agent",
        "rate_limit",
        "attempts",
        "guard_flags",
    ];
}

/// A non-empty overflow segment is sealed at most this long after its first record, so
/// the control plane can replay it while the queue stays full.
pub(crate) const OVERFLOW_SEGMENT_AGE: Duration = Duration::from_secs(1);

/// The overflow segment being written.
struct OpenSegment {
    seq: u64,
    file: File,
    /// When its first record was written (a segment is created by its first record).
    since: Instant,
    /// Journal segments of the records in it, as (segment, count) runs: those records are
    /// done for the journal only once this file is sealed, so a crash before the seal
    /// still leaves them in the journal.
    journal_runs: Vec<(u64, u64)>,
}

struct Overflow {
    dir: PathBuf,
    instance_id: String,
    next_seq: u64,
    current: Option<OpenSegment>,
    dir_ready: bool,
    max_age: Duration,
}

impl Overflow {
    fn path(&self, seq: u64, open: bool) -> PathBuf {
        let suffix = if open { ".jsonl.open" } else { ".jsonl" };
        self.dir
            .join(format!("overflow-{}-{seq:08}{suffix}", self.instance_id))
    }
}

/// Bounded record queue plus overflow spool, with the crash journal in front of both.
pub(crate) struct Records {
    /// Records with the journal segment holding each (`NO_SEGMENT` when none).
    queue: Mutex<VecDeque<(u64, CallRecord)>>,
    capacity: usize,
    depth: AtomicUsize,
    pub(crate) total: AtomicU64,
    pub(crate) spooled: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Overflow segments renamed to their final `.jsonl` name.
    pub(crate) overflow_sealed: AtomicU64,
    overflow: Mutex<Overflow>,
    journal: Option<Journal>,
}

thread_local! {
    /// Reused serialization buffer: a record becomes a line without an allocation.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl Records {
    pub(crate) fn new(capacity: usize, spool_dir: &str, instance_id: &str) -> Self {
        Records {
            queue: Mutex::new(VecDeque::with_capacity(capacity.min(65_536))),
            capacity,
            depth: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            spooled: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            overflow_sealed: AtomicU64::new(0),
            overflow: Mutex::new(Overflow {
                dir: PathBuf::from(spool_dir),
                instance_id: instance_id.to_owned(),
                next_seq: 0,
                current: None,
                dir_ready: false,
                max_age: OVERFLOW_SEGMENT_AGE,
            }),
            journal: None,
        }
    }

    /// Journal every record before it is queued.
    pub(crate) fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = Some(journal);
        self
    }

    #[cfg(test)]
    fn with_overflow_age(self, age: Duration) -> Self {
        self.overflow.lock().max_age = age;
        self
    }

    /// Journal the record (when journaling), then queue it, or append it to the overflow
    /// segment when the queue is full. `total` counts it only afterwards, so a record
    /// that is counted is on disk or in the queue.
    pub(crate) fn push(&self, record: CallRecord) {
        let mut record = Some(record);
        let _ = LINE.try_with(|cell| {
            if let Ok(mut buf) = cell.try_borrow_mut() {
                if let Some(r) = record.take() {
                    self.push_with(r, &mut buf);
                }
            }
        });
        if let Some(r) = record {
            // The thread's buffer is unavailable (thread teardown): use one of its own.
            self.push_with(r, &mut Vec::with_capacity(1024));
        }
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn push_with(&self, record: CallRecord, buf: &mut Vec<u8>) {
        buf.clear();
        let seg = match &self.journal {
            Some(journal) => {
                write_line(&record, buf);
                // Journal first: once the record is in the queue, a kill must not lose it.
                journal.append(buf).unwrap_or(NO_SEGMENT)
            }
            None => NO_SEGMENT,
        };
        let record = {
            let mut q = self.queue.lock();
            if q.len() < self.capacity {
                q.push_back((seg, record));
                self.depth.store(q.len(), Ordering::Relaxed);
                return;
            }
            record
        };
        if buf.is_empty() {
            write_line(&record, buf);
        }
        self.spool_line(buf, seg);
    }

    /// Overflow path: append one JSON line to the open segment. Rare by design (the queue
    /// is sized for the drain interval), so a blocking write under a lock is acceptable.
    fn spool_line(&self, line: &[u8], seg: u64) -> bool {
        let mut ov = self.overflow.lock();
        let max_age = ov.max_age;
        if ov
            .current
            .as_ref()
            .is_some_and(|c| c.since.elapsed() >= max_age)
        {
            self.seal_locked(&mut ov);
        }
        if ov.current.is_none() {
            if !ov.dir_ready {
                ov.dir_ready = journal::create_private_dir(&ov.dir).is_ok();
            }
            let seq = ov.next_seq;
            let opened = journal::open_private_append(&ov.path(seq, true));
            match opened {
                Ok(file) => {
                    ov.next_seq += 1;
                    ov.current = Some(OpenSegment {
                        seq,
                        file,
                        since: Instant::now(),
                        journal_runs: Vec::new(),
                    });
                }
                Err(_) => {
                    ov.dir_ready = false;
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        }
        let Some(cur) = ov.current.as_mut() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        if cur.file.write_all(line).is_err() {
            // Part of the line may be on disk: seal so it ends that file (the reader skips
            // a torn last line) and the next record starts a fresh one.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.seal_locked(&mut ov);
            return false;
        }
        if seg != NO_SEGMENT {
            match cur.journal_runs.last_mut() {
                Some((s, n)) if *s == seg => *n += 1,
                _ => cur.journal_runs.push((seg, 1)),
            }
        }
        self.spooled.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Rename the open segment to its final name; from then on the control plane may
    /// claim it, and nothing writes to it again. A failed rename keeps it open, to be
    /// retried at the next seal.
    fn seal_locked(&self, ov: &mut Overflow) {
        let Some(cur) = ov.current.take() else {
            return;
        };
        if std::fs::rename(ov.path(cur.seq, true), ov.path(cur.seq, false)).is_err() {
            ov.current = Some(cur);
            return;
        }
        self.overflow_sealed.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = &self.journal {
            // The sealed file now carries these records, so the journal need not.
            j.spooled(&cur.journal_runs);
        }
    }

    /// Seal the open overflow segment, if any.
    pub(crate) fn seal_overflow(&self) {
        let mut ov = self.overflow.lock();
        self.seal_locked(&mut ov);
    }

    /// Periodic: seal an overflow segment that has been non-empty for the maximum age,
    /// even when no record arrives to trigger it.
    pub(crate) fn tick(&self) {
        let mut ov = self.overflow.lock();
        let max_age = ov.max_age;
        if ov
            .current
            .as_ref()
            .is_some_and(|c| c.since.elapsed() >= max_age)
        {
            self.seal_locked(&mut ov);
        }
    }

    pub(crate) fn drain(&self, max: usize) -> Vec<CallRecord> {
        let out = {
            let mut q = self.queue.lock();
            let n = max.min(q.len());
            if let Some(j) = &self.journal {
                // Under the queue lock, so the journal sees records in drain order.
                j.drained(q.iter().take(n).map(|(seg, _)| *seg));
            }
            let out: Vec<CallRecord> = q.drain(..n).map(|(_, r)| r).collect();
            self.depth.store(q.len(), Ordering::Relaxed);
            out
        };
        if !out.is_empty() {
            // The queue has room again: what overflowed meanwhile is ready for replay.
            self.seal_overflow();
        }
        out
    }

    /// The oldest `count` drained records are stored by the control plane: journal
    /// segments holding only such records are deleted. Returns how many were taken.
    pub(crate) fn ack(&self, count: u64) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.ack(count))
    }

    /// No request will emit a record any more (the engine stopped): seal the overflow
    /// segment, then the journal.
    pub(crate) fn stop(&self) {
        self.seal_overflow();
        if let Some(j) = &self.journal {
            j.stop();
        }
    }

    pub(crate) fn journal_stats(&self) -> JournalStats {
        self.journal
            .as_ref()
            .map_or_else(JournalStats::default, Journal::stats)
    }

    pub(crate) fn journal_errors(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or(0, |j| j.errors.load(Ordering::Relaxed))
    }

    pub(crate) fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

impl Drop for Records {
    fn drop(&mut self) {
        // An engine dropped without a stop must not leave records in a file the control
        // plane never reads.
        self.seal_overflow();
    }
}

/// One record as a JSON line (`\n`-terminated) appended to `out`: the overflow and
/// journal line format. Byte for byte what `serde_json` writes for the record, without
/// the serializer machinery: integers are formatted by hand and strings copied whole
/// unless they hold a character JSON requires escaped.
pub(crate) fn write_line(r: &CallRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"ts\":");
    push_i64(out, r.ts);
    field_str(out, b",\"request_id\":", &r.request_id);
    field_str(out, b",\"org_id\":", &r.org_id);
    field_str(out, b",\"account_id\":", &r.account_id);
    field_str(out, b",\"key_id\":", &r.key_id);
    field_str(out, b",\"path\":", r.path);
    field_str(out, b",\"model_requested\":", &r.model_requested);
    field_str(out, b",\"model_served\":", &r.model_served);
    field_str(out, b",\"provider\":", &r.provider);
    field_u64(out, b",\"prompt_tokens\":", u64::from(r.prompt_tokens));
    field_u64(
        out,
        b",\"completion_tokens\":",
        u64::from(r.completion_tokens),
    );
    field_u64(out, b",\"cached_tokens\":", u64::from(r.cached_tokens));
    field_str(out, b",\"usage_source\":", r.usage_source);
    out.extend_from_slice(b",\"cost\":");
    push_i64(out, r.cost);
    field_u64(out, b",\"status\":", u64::from(r.status));
    field_str(out, b",\"error_code\":", r.error_code);
    field_u64(out, b",\"latency_us\":", u64::from(r.latency_us));
    field_u64(out, b",\"ttfb_us\":", u64::from(r.ttfb_us));
    field_u64(out, b",\"streamed\":", u64::from(r.streamed));
    field_str(out, b",\"source_ip\":", &r.source_ip);
    field_str(out, b",\"user_agent\":", &r.user_agent);
    field_str(out, b",\"rate_limit\":", r.rate_limit);
    field_u64(out, b",\"attempts\":", u64::from(r.attempts));
    field_str(out, b",\"guard_flags\":", &r.guard_flags);
    out.extend_from_slice(b"}\n");
}

fn field_str(out: &mut Vec<u8>, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    push_json_str(out, value);
}

fn field_u64(out: &mut Vec<u8>, key: &[u8], value: u64) {
    out.extend_from_slice(key);
    push_u64(out, value);
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        // `v % 10` is below 10, so the cast cannot truncate.
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// A JSON string with `serde_json`'s escapes: `"` and `\`, the short forms `\b \t \n \f
/// \r`, `\u00xx` (lower-case hex) for the other control characters, everything else as is.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            b'\t' => b't',
            b'\n' => b'n',
            0x0c => b'f',
            b'\r' => b'r',
            0x00..=0x1f => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.push(b'\\');
        out.push(short);
        if short == b'u' {
            out.extend_from_slice(b"00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn dir() -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("onetoken-records-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn rec(i: u64) -> CallRecord {
        CallRecord {
            ts: 1_780_000_000_000_000 + i as i64,
            request_id: format!("req_{i:010}"),
            path: "/v1/chat/completions",
            usage_source: "none",
            rate_limit: "pass",
            status: 200,
            ..CallRecord::default()
        }
    }

    /// What the control plane's sink does with engine overflow files (sink.py
    /// `replay_spool`): list `overflow-*.jsonl`, rename each to `claimed-*`, read it,
    /// delete it. Returns the request ids read.
    fn sink_pass(dir: &Path) -> Vec<String> {
        let mut ids = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("overflow-") && n.ends_with(".jsonl"))
            .collect();
        names.sort();
        for name in names {
            let claimed = dir.join(format!("claimed-{}-{name}", rand::random::<u32>()));
            if std::fs::rename(dir.join(&name), &claimed).is_err() {
                continue;
            }
            let text = std::fs::read_to_string(&claimed).unwrap();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                ids.push(v["request_id"].as_str().unwrap().to_owned());
            }
            std::fs::remove_file(&claimed).unwrap();
        }
        ids
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn assert_each_once(seen: &[String], n: u64) {
        let mut count: BTreeMap<&str, u32> = BTreeMap::new();
        for id in seen {
            *count.entry(id.as_str()).or_default() += 1;
        }
        let dup: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
        assert!(dup.is_empty(), "read twice: {dup:?}");
        let missing: Vec<String> = (0..n)
            .map(|i| rec(i).request_id)
            .filter(|id| !count.contains_key(id.as_str()))
            .collect();
        assert!(missing.is_empty(), "lost: {missing:?}");
        assert_eq!(seen.len() as u64, n);
    }

    #[test]
    fn write_line_is_serde_json_byte_for_byte() {
        let tricky = [
            "",
            "plain",
            "quote \" backslash \\ slash / done",
            "\u{0}\u{1}\u{7}\u{8}\t\n\u{b}\u{c}\r\u{e}\u{1f} \u{7f}",
            "ünïcödé ✓ 🦀 \u{2028}\u{2029}",
            "Mozilla/5.0 (X11; Linux x86_64) \"quoted\"",
        ];
        let mut buf = Vec::new();
        for (i, s) in tricky.iter().enumerate() {
            for ts in [0, -1, i64::MIN, i64::MAX, 1_780_000_000_000_000] {
                let r = CallRecord {
                    ts,
                    request_id: format!("req_{i}"),
                    org_id: (*s).to_owned(),
                    account_id: s.repeat(2),
                    key_id: "key_x".into(),
                    path: "/v1/chat/completions",
                    model_requested: (*s).to_owned(),
                    model_served: "m".into(),
                    provider: (*s).to_owned(),
                    prompt_tokens: u32::MAX,
                    completion_tokens: 0,
                    cached_tokens: 7,
                    usage_source: "estimated",
                    cost: ts / -3,
                    status: 499,
                    error_code: "client_disconnected",
                    latency_us: 1_000_000,
                    ttfb_us: 10,
                    streamed: 1,
                    source_ip: "::1".into(),
                    user_agent: (*s).to_owned(),
                    rate_limit: "limited",
                    attempts: u8::MAX,
                    guard_flags: (*s).to_owned(),
                };
                buf.clear();
                write_line(&r, &mut buf);
                let mut expected = serde_json::to_vec(&r).unwrap();
                expected.push(b'\n');
                assert_eq!(
                    String::from_utf8_lossy(&buf),
                    String::from_utf8_lossy(&expected)
                );
            }
        }
        buf.clear();
        write_line(&CallRecord::default(), &mut buf);
        let mut expected = serde_json::to_vec(&CallRecord::default()).unwrap();
        expected.push(b'\n');
        assert_eq!(buf, expected);
    }

    /// The sink claims and deletes overflow files between the engine's writes: a record
    /// is only ever visible in a sealed file, so none is lost and none read twice.
    #[test]
    fn overflow_segments_are_sealed_before_the_sink_can_claim_them() {
        let d = dir();
        let ds = d.to_str().unwrap();
        let records = Records::new(3, ds, "inst").with_journal(Journal::new(
            ds,
            "inst",
            journal::SEGMENT_RECORDS,
            Duration::from_secs(3600),
        ));
        let records = records.with_overflow_age(Duration::from_secs(3600));
        let mut seen = Vec::new();
        let mut drained = 0u64;
        let mut take = |records: &Records, max: usize, seen: &mut Vec<String>| {
            let out = records.drain(max);
            drained += out.len() as u64;
            seen.extend(out.into_iter().map(|r| r.request_id));
        };

        // Queue full after 3; the next 7 overflow into one open segment the sink cannot see.
        for i in 0..10 {
            records.push(rec(i));
            seen.extend(sink_pass(&d));
        }
        assert!(seen.is_empty());
        assert_eq!(records.spooled.load(Ordering::Relaxed), 7);
        assert_eq!(records.total.load(Ordering::Relaxed), 10);
        let open = names(&d)
            .into_iter()
            .filter(|n| n.ends_with(".jsonl.open"))
            .collect::<Vec<_>>();
        assert_eq!(open, ["overflow-inst-00000000.jsonl.open"]);
        assert_eq!(
            records.journal_stats().unacked,
            10,
            "overflow records stay in the journal until their file is sealed"
        );

        // A drain makes room: the segment is sealed, and the journal lets its records go.
        take(&records, 2, &mut seen);
        assert_eq!(records.overflow_sealed.load(Ordering::Relaxed), 1);
        assert_eq!(records.journal_stats().unacked, 3);
        let batch = sink_pass(&d);
        assert_eq!(batch.len(), 7);
        seen.extend(batch);

        // Room for 2, then overflow again, with the sink claiming after every write.
        for i in 10..20 {
            records.push(rec(i));
            seen.extend(sink_pass(&d));
        }
        assert_eq!(seen.len(), 9, "nothing of the open segment was read");
        records.tick();
        assert_eq!(
            records.overflow_sealed.load(Ordering::Relaxed),
            1,
            "young segment: the tick leaves it open"
        );

        // Stop seals the last segment; the final drain takes the queue.
        records.stop();
        assert_eq!(records.overflow_sealed.load(Ordering::Relaxed), 2);
        seen.extend(sink_pass(&d));
        take(&records, usize::MAX, &mut seen);
        assert_each_once(&seen, 20);
        assert!(!names(&d).iter().any(|n| n.starts_with("overflow-")));

        // Every drained record acknowledged: the journal is gone too.
        assert_eq!(records.ack(drained), drained);
        assert!(names(&d).is_empty(), "left behind: {:?}", names(&d));
        assert_eq!(records.journal_stats(), JournalStats::default());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Journal and overflow segments (and the spool dir the engine creates for them) are
    /// private to the service's user whatever the umask (a test process's is usually 022).
    #[cfg(unix)]
    #[test]
    fn journal_and_overflow_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir();
        let spool = d.join("spool");
        let ds = spool.to_str().unwrap();
        let records = Records::new(0, ds, "priv")
            .with_journal(Journal::new(ds, "priv", 1, Duration::from_secs(3600)))
            .with_overflow_age(Duration::from_secs(3600));
        for i in 0..3 {
            records.push(rec(i));
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&spool), 0o700);
        let made = names(&spool);
        assert!(made.iter().any(|n| n.starts_with("journal-")), "{made:?}");
        assert!(made.iter().any(|n| n.starts_with("overflow-")), "{made:?}");
        for name in made {
            assert_eq!(mode(&spool.join(&name)), 0o600, "{name}");
        }
        records.stop();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn old_segments_are_sealed_by_age() {
        let d = dir();
        let records =
            Records::new(0, d.to_str().unwrap(), "aged").with_overflow_age(Duration::ZERO);
        records.push(rec(0));
        assert_eq!(names(&d), ["overflow-aged-00000000.jsonl.open"]);
        records.tick();
        assert_eq!(names(&d), ["overflow-aged-00000000.jsonl"]);
        // The next write finds nothing open and starts the next segment.
        records.push(rec(1));
        records.push(rec(2));
        assert_eq!(
            names(&d),
            [
                "overflow-aged-00000000.jsonl",
                "overflow-aged-00000001.jsonl",
                "overflow-aged-00000002.jsonl.open"
            ],
            "a write to an old segment seals it first"
        );
        drop(records);
        assert!(
            !names(&d).iter().any(|n| n.ends_with(".open")),
            "dropping the records seals"
        );
        let mut seen = sink_pass(&d);
        seen.sort();
        assert_each_once(&seen, 3);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The race itself: one thread pushes (overflowing most of the time, draining now and
    /// then), another claims and deletes overflow files as fast as it can.
    #[test]
    fn concurrent_claims_lose_nothing() {
        const N: u64 = 3_000;
        let d = dir();
        let ds = d.to_str().unwrap();
        let records = Records::new(16, ds, "race")
            .with_journal(Journal::new(ds, "race", 500, Duration::from_millis(5)))
            .with_overflow_age(Duration::from_millis(1));
        let done = AtomicBool::new(false);
        let (mut seen, mut drained) = std::thread::scope(|s| {
            let sink = s.spawn(|| {
                let mut ids = Vec::new();
                while !done.load(Ordering::Acquire) {
                    ids.extend(sink_pass(&d));
                }
                ids
            });
            let mut drained = Vec::new();
            for i in 0..N {
                records.push(rec(i));
                if i % 97 == 0 {
                    drained.extend(records.drain(8).into_iter().map(|r| r.request_id));
                }
                if i % 13 == 0 {
                    records.tick();
                }
            }
            records.stop();
            done.store(true, Ordering::Release);
            (sink.join().unwrap(), drained)
        });
        seen.extend(sink_pass(&d));
        drained.extend(records.drain(usize::MAX).into_iter().map(|r| r.request_id));
        assert!(records.spooled.load(Ordering::Relaxed) > N / 2);
        assert_eq!(records.dropped.load(Ordering::Relaxed), 0);
        seen.append(&mut drained);
        assert_each_once(&seen, N);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
