//! Reads journal segments back for ingestion: the one replay path of the records an
//! engine wrote with [`crate::records::write_line`], straight into a [`CallBatch`] (the
//! call_log block in Native format plus the ledger's and observers' groups), without an
//! owned record per line.
//!
//! A reader resumes at a byte offset and only ever consumes whole lines, so it can follow a
//! segment that a live engine is still appending to. A line that does not parse is counted
//! and skipped, never returned or echoed: it may be torn, and its bytes are not the
//! reader's to show.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;

pub use crate::call_batch::{
    BatchParts, CallGroup, FailureGroup, UsageGroup, COLUMNS, COLUMN_DOCS,
};
use crate::call_batch::{CallBatch, Row};
use crate::call_log::{call_log, Field, Plain};
use crate::records::CallRecord;

/// What one [`read_batch`] call found.
#[derive(Debug, Default)]
pub struct BatchRead {
    /// The records read, as ingestion consumes them.
    pub batch: BatchParts,
    /// Where the next read resumes: just after the last line consumed.
    pub next_offset: u64,
    /// Lines consumed that were not records (torn, truncated or foreign).
    pub bad_lines: u64,
}

/// Read whole lines of the segment at `path` from byte `offset`, at most `max_records`
/// records and, with `until`, no line past that byte offset (a retry then reads exactly
/// the range it read before, even if the segment grew since). A trailing line without `\n` is left for a later read unless `complete` (the
/// segment will never grow again), in which case it is consumed and counted as bad.
///
/// # Errors
/// The file cannot be opened, positioned or read.
pub fn read_batch(
    path: &Path,
    offset: u64,
    max_records: usize,
    complete: bool,
    until: Option<u64>,
) -> std::io::Result<BatchRead> {
    let mut batch = CallBatch::default();
    let (next_offset, bad_lines) =
        read_lines(path, offset, max_records, complete, until, &mut batch)?;
    Ok(BatchRead {
        batch: batch.finish(),
        next_offset,
        bad_lines,
    })
}

/// What one [`read_segment`] call found.
#[derive(Debug, Default)]
pub struct SegmentRead {
    /// The records parsed, in file order.
    pub records: Vec<CallRecord>,
    /// Where the next read resumes: just after the last line consumed.
    pub next_offset: u64,
    /// Lines consumed that were not records (torn, truncated or foreign).
    pub bad_lines: u64,
}

/// The same lines as [`read_batch`], as whole [`CallRecord`]s: for tools and tests that
/// look at single records; ingestion reads batches.
///
/// # Errors
/// The file cannot be opened, positioned or read.
pub fn read_segment(
    path: &Path,
    offset: u64,
    max_records: usize,
    complete: bool,
) -> std::io::Result<SegmentRead> {
    let mut records = Vec::new();
    let (next_offset, bad_lines) =
        read_lines(path, offset, max_records, complete, None, &mut records)?;
    Ok(SegmentRead {
        records,
        next_offset,
        bad_lines,
    })
}

/// What a reader collects the records of its lines into.
trait Records {
    fn count(&self) -> usize;
    /// Add one line (with its `\n`); false when it is not a record.
    fn take(&mut self, line: &[u8]) -> bool;
}

impl Records for CallBatch {
    fn count(&self) -> usize {
        self.rows()
    }

    fn take(&mut self, line: &[u8]) -> bool {
        parse_into(line, self)
    }
}

impl Records for Vec<CallRecord> {
    fn count(&self) -> usize {
        self.len()
    }

    fn take(&mut self, line: &[u8]) -> bool {
        parse_record(line).map(|r| self.push(r)).is_some()
    }
}

/// The one line loop of both readers: whole lines from `offset` while `out` holds fewer
/// than `max_records` and before `until`, each handed to `out` (not a record: counted
/// bad). A trailing line without `\n` is left for a later read unless `complete` (the
/// segment will never grow again), in which case it is consumed and counted as bad.
/// Returns where the next read resumes and the bad lines.
fn read_lines(
    path: &Path,
    offset: u64,
    max_records: usize,
    complete: bool,
    until: Option<u64>,
    out: &mut impl Records,
) -> std::io::Result<(u64, u64)> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, file);
    let mut next_offset = offset;
    let mut bad_lines = 0;
    let mut line = Vec::with_capacity(1024);
    while out.count() < max_records && until.is_none_or(|end| next_offset < end) {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // The end of the file in the middle of a line: the engine may still be
            // writing it, unless the segment is complete.
            if complete {
                bad_lines += 1;
                next_offset += n as u64;
            }
            break;
        }
        next_offset += n as u64;
        if !out.take(&line) {
            bad_lines += 1;
        }
    }
    Ok((next_offset, bad_lines))
}

/// Whether the engine instance owning the lock file `lock_path`
/// (`journal-<instance>.lock`) is alive: it holds an exclusive `flock` on it for its whole
/// life, and the OS releases it when the process dies. A missing lock file means no live
/// instance.
///
/// # Errors
/// The lock file exists but cannot be opened or locked for another reason.
pub fn instance_live(lock_path: &Path) -> std::io::Result<bool> {
    let file = match File::open(lock_path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        // Got it, so nobody holds it; it is released when `file` closes.
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Large enough that a batch of records takes few `read(2)`s.
const READ_BUFFER: usize = 1 << 20;

macro_rules! line_readers {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $column:ident $clickhouse:literal,)*) => {
        /// A record line as the general JSON reader takes it: a line with an escape, or
        /// not in [`crate::records::write_line`]'s exact form.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Line {
            $($name: <$ty as Field>::Json,)*
        }

        impl Line {
            fn row(&self) -> Row<'_> {
                Row {
                    $($name: <$ty as Field>::json_ref(&self.$name),)*
                }
            }
        }

        /// The common line, read without a general JSON parser: exactly the bytes
        /// [`crate::records::write_line`] writes (its keys in its order, no whitespace)
        /// and no escape in any string, so every value is a slice of the line. Anything
        /// else is `None` and goes to serde_json, which then decides; so this accepts only
        /// lines serde_json would read the same way, and is several times faster on them.
        fn parse_plain(line: &[u8]) -> Option<Row<'_>> {
            let body = line.strip_suffix(b"\n")?;
            if memchr::memchr(b'\\', body).is_some() {
                return None;
            }
            let mut p = Plain {
                s: std::str::from_utf8(body).ok()?,
                pos: 0,
            };
            p.lit("{")?;
            let mut read = 0;
            $(
                p.lit(concat!("\"", stringify!($name), "\":"))?;
                let $name = <$ty as Field>::parse_plain(&mut p)?;
                read += 1;
                p.lit(if read == COLUMNS.len() { "}" } else { "," })?;
            )*
            (p.pos == p.s.len()).then_some(Row { $($name,)* })
        }
    };
}
call_log!(line_readers);

/// Columns added after the journal format first shipped (ClickHouse 011): a line an
/// earlier engine wrote, still unshipped when the engine was upgraded, lacks them and
/// reads them as 0, as ClickHouse reads rows from before them. Any other missing column
/// still makes a line bad.
const ADDED_LATER: [&str; 4] = ["images", "audio_ms", "characters", "search_units"];

/// A line through the general JSON reader, with [`ADDED_LATER`] columns it lacks as 0.
fn parse_json(line: &[u8]) -> Option<Line> {
    if let Ok(l) = serde_json::from_slice::<Line>(line) {
        return Some(l);
    }
    let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_slice(line) else {
        return None;
    };
    let mut filled = false;
    for name in ADDED_LATER {
        if !fields.contains_key(name) {
            fields.insert(name.to_owned(), serde_json::Value::from(0));
            filled = true;
        }
    }
    if !filled {
        return None;
    }
    serde_json::from_value(serde_json::Value::Object(fields)).ok()
}

/// Add one line (with its `\n`) to the batch; false when it is not a record.
fn parse_into(line: &[u8], batch: &mut CallBatch) -> bool {
    parse_current_into(line, batch)
        || before_applications(line).is_some_and(|l| parse_current_into(&l, batch))
}

fn parse_current_into(line: &[u8], batch: &mut CallBatch) -> bool {
    if let Some(row) = parse_plain(line) {
        return push_checked(batch, &row);
    }
    let Some(l) = parse_json(line) else {
        return false;
    };
    push_checked(batch, &l.row())
}

/// A line journaled before `application_id` existed (it ends at `guard_flags`), with the
/// column added as empty: it is a call of a key in no application, as ClickHouse reads
/// rows from before the column. Without this, the calls an older engine journaled just
/// before an upgrade would be bad lines and never billed. `None` for any other line.
fn before_applications(line: &[u8]) -> Option<Vec<u8>> {
    let body = line.strip_suffix(b"\n")?.strip_suffix(b"}")?;
    if memchr::memmem::find(body, b"\"application_id\":").is_some() {
        return None;
    }
    let mut out = Vec::with_capacity(line.len() + 24);
    out.extend_from_slice(body);
    out.extend_from_slice(b",\"application_id\":\"\"}\n");
    Some(out)
}

fn push_checked(batch: &mut CallBatch, row: &Row<'_>) -> bool {
    if !row.fits() {
        return false;
    }
    batch.push(row);
    true
}

/// One line (with its `\n`) as an owned record, or `None` when it is not one.
fn parse_record(line: &[u8]) -> Option<CallRecord> {
    parse_current_record(line).or_else(|| parse_current_record(&before_applications(line)?))
}

fn parse_current_record(line: &[u8]) -> Option<CallRecord> {
    if let Some(row) = parse_plain(line) {
        return row.record();
    }
    let l = parse_json(line)?;
    l.row().record()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;
    use std::path::PathBuf;

    use super::*;
    use crate::records::{write_line, CallRecord};

    fn segment(bytes: &[u8]) -> (PathBuf, PathBuf) {
        let d =
            std::env::temp_dir().join(format!("onetoken-reader-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("journal-test-00000000.jsonl");
        std::fs::write(&p, bytes).unwrap();
        (d, p)
    }

    fn rec(i: u32, text: &str) -> CallRecord {
        CallRecord {
            ts: 1_780_000_000_000_000 + i64::from(i),
            request_id: format!("req_{i:010}"),
            org_id: "org_1".into(),
            account_id: "acc_1".into(),
            key_id: "key_1".into(),
            path: "/v1/chat/completions",
            model_requested: text.to_owned(),
            model_served: "m".into(),
            provider: "p".into(),
            prompt_tokens: u32::MAX,
            completion_tokens: i,
            cached_tokens: 3,
            usage_source: "estimated",
            cost: -i64::from(i) * 1_000_000_007,
            status: 499,
            error_code: "client_disconnected",
            latency_us: 10,
            ttfb_us: 5,
            streamed: 1,
            source_ip: "::1".into(),
            user_agent: text.to_owned(),
            rate_limit: "limited",
            attempts: u8::MAX,
            guard_flags: "email:2".into(),
            application_id: "app_1".into(),
            images: i,
            audio_ms: u32::MAX,
            characters: 11,
            search_units: 2,
        }
    }

    fn native_str(s: &str) -> Vec<u8> {
        let mut out = vec![u8::try_from(s.len()).unwrap()];
        out.extend_from_slice(s.as_bytes());
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn lines(records: &[CallRecord]) -> Vec<u8> {
        let mut buf = Vec::new();
        for r in records {
            write_line(r, &mut buf);
        }
        buf
    }

    #[test]
    fn round_trips_write_line_including_escapes() {
        let tricky = [
            "",
            "plain",
            "quote \" backslash \\ slash /",
            "\u{0}\u{1}\u{8}\t\n\u{b}\u{c}\r\u{1f}\u{7f}",
            "ünïcödé ✓ 🦀 \u{2028}",
        ];
        let written: Vec<CallRecord> = tricky
            .iter()
            .enumerate()
            .map(|(i, t)| rec(u32::try_from(i).unwrap(), t))
            .chain([CallRecord::default()])
            .collect();
        let bytes = lines(&written);
        let (d, p) = segment(&bytes);
        let read = read_batch(&p, 0, usize::MAX, false, None).unwrap();
        assert_eq!(read.batch.rows, written.len());
        assert_eq!(read.next_offset, bytes.len() as u64);
        assert_eq!(read.bad_lines, 0);
        // Each string reaches the block unescaped, as a Native String (length, bytes);
        // tests/unit/test_journal_batch.py reads the block back through ClickHouse.
        for t in tricky {
            assert!(contains(&read.batch.native, &native_str(t)), "{t:?}");
        }
        let models: Vec<&str> = read.batch.usage.iter().map(|g| g.model.as_str()).collect();
        assert!(
            models.is_empty(),
            "negative costs charge nothing: {models:?}"
        );
        let counts: Vec<u64> = read.batch.calls.iter().map(|g| g.calls).collect();
        assert_eq!(counts.iter().sum::<u64>(), written.len() as u64);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resumes_at_offsets_and_stops_at_max_records() {
        let written: Vec<CallRecord> = (0..5).map(|i| rec(i, "x")).collect();
        let bytes = lines(&written);
        let (d, p) = segment(&bytes);
        let mut offset = 0;
        let mut got = 0;
        let mut reads = 0;
        loop {
            let read = read_batch(&p, offset, 2, false, None).unwrap();
            assert!(read.batch.rows <= 2);
            if read.batch.rows == 0 {
                assert_eq!(read.next_offset, offset, "nothing more: the offset stays");
                assert!(read.batch.native.is_empty());
                break;
            }
            offset = read.next_offset;
            got += read.batch.rows;
            reads += 1;
        }
        assert_eq!(reads, 3);
        assert_eq!(got, written.len());
        assert_eq!(offset, bytes.len() as u64);
        assert_eq!(read_batch(&p, 0, 0, true, None).unwrap().next_offset, 0);
        // Bounded by a byte offset: the same lines as an earlier read, however many
        // records it may take.
        let first_two = read_batch(&p, 0, 2, false, None).unwrap();
        let again = read_batch(&p, 0, 100, false, Some(first_two.next_offset)).unwrap();
        assert_eq!(
            (again.batch.rows, again.next_offset, again.batch.native),
            (2, first_two.next_offset, first_two.batch.native)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A live engine may be in the middle of a line: the reader waits for its end, and
    /// only a complete segment's torn tail is consumed (as bad).
    #[test]
    fn a_partial_tail_is_read_once_finished_or_skipped_when_complete() {
        let first = lines(&[rec(0, "a")]);
        let second = lines(&[rec(1, "b")]);
        let (cut_at, _) = second.split_at(second.len() / 2);
        let mut bytes = first.clone();
        bytes.extend_from_slice(cut_at);
        let (d, p) = segment(&bytes);

        let read = read_batch(&p, 0, 10, false, None).unwrap();
        assert_eq!(read.batch.rows, 1);
        assert_eq!(read.batch.min_ts, rec(0, "a").ts);
        assert_eq!(read.next_offset, first.len() as u64);
        assert_eq!(read.bad_lines, 0);

        // The engine finishes the line: the next read from the offset gets it whole.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&second[cut_at.len()..]).unwrap();
        let read = read_batch(&p, first.len() as u64, 10, false, None).unwrap();
        assert_eq!((read.batch.rows, read.batch.max_ts), (1, rec(1, "b").ts));
        assert_eq!(read.next_offset, (first.len() + second.len()) as u64);

        // A tail that will never be finished (the instance died mid-write).
        f.write_all(&second[..10]).unwrap();
        let end = (first.len() + second.len()) as u64;
        let live = read_batch(&p, end, 10, false, None).unwrap();
        assert_eq!(
            (live.batch.rows, live.next_offset, live.bad_lines),
            (0, end, 0)
        );
        let dead = read_batch(&p, end, 10, true, None).unwrap();
        assert_eq!(
            (dead.batch.rows, dead.next_offset, dead.bad_lines),
            (0, end + 10, 1)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lines_from_before_applications_read_as_no_application() {
        let charged = CallRecord {
            cost: 5,
            ..rec(0, "a")
        };
        let mut old = String::from_utf8(lines(&[charged])).unwrap();
        old = old.replace(",\"application_id\":\"app_1\"", "");
        assert!(!old.contains("application_id"));
        let (d, p) = segment(old.as_bytes());
        let read = read_batch(&p, 0, 10, false, None).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!((read.batch.rows, read.bad_lines), (1, 0));
        assert_eq!(read.batch.usage.len(), 1);
        assert_eq!(read.batch.usage[0].application_id, "");
        let record = parse_record(old.as_bytes()).unwrap();
        assert_eq!(record.application_id, "");
        assert_eq!(record.guard_flags, "email:2");
    }

    #[test]
    fn bad_lines_are_counted_and_skipped() {
        let mut bytes = lines(&[rec(0, "a")]);
        bytes.extend_from_slice(b"{\"ts\":1,\"request_id\":\"torn\n");
        bytes.extend_from_slice(b"\n");
        bytes.extend_from_slice(b"not json at all\xff\n");
        // A well-formed object that is not a record: a wrong type, a missing column, an
        // unknown one, a value out of range.
        let mut wrong = lines(&[rec(1, "w")]);
        let text = String::from_utf8(wrong.clone()).unwrap();
        wrong.clear();
        for bad in [
            text.replace("\"status\":499", "\"status\":\"499\""),
            text.replace(",\"guard_flags\":\"email:2\"", ""),
            text.replace("}\n", ",\"extra\":1}\n"),
            text.replace("\"attempts\":255", "\"attempts\":256"),
            text.replace(
                "\"path\":\"/v1/chat/completions\"",
                &format!("\"path\":\"{}\"", "p".repeat(65)),
            ),
        ] {
            wrong.extend_from_slice(bad.as_bytes());
        }
        bytes.extend_from_slice(&wrong);
        bytes.extend_from_slice(&lines(&[rec(2, "b")]));
        let (d, p) = segment(&bytes);
        let read = read_batch(&p, 0, 10, false, None).unwrap();
        assert_eq!(read.batch.rows, 2);
        assert_eq!(
            (read.batch.min_ts, read.batch.max_ts),
            (rec(0, "a").ts, rec(2, "b").ts)
        );
        assert_eq!(read.bad_lines, 8);
        assert_eq!(read.next_offset, bytes.len() as u64);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lines_from_before_the_unit_columns_read_them_as_zero() {
        let text = String::from_utf8(lines(&[rec(5, "old")])).unwrap();
        let old = text.replace(
            ",\"images\":5,\"audio_ms\":4294967295,\"characters\":11,\"search_units\":2",
            "",
        );
        assert_ne!(old, text, "the test line has the unit columns to take away");
        let record = parse_record(old.as_bytes()).unwrap();
        assert_eq!(
            (
                record.images,
                record.audio_ms,
                record.characters,
                record.search_units
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(record.request_id, rec(5, "old").request_id);
        let mut batch = CallBatch::default();
        assert!(parse_into(old.as_bytes(), &mut batch));
        // Only those: a line missing an older column is still not a record.
        let no_flags = old.replace(",\"guard_flags\":\"email:2\"", "");
        assert!(parse_record(no_flags.as_bytes()).is_none());
    }

    #[test]
    fn an_instance_is_live_while_its_lock_is_held() {
        let (d, _) = segment(b"");
        let lock = d.join("journal-test.lock");
        assert!(!instance_live(&lock).unwrap(), "no lock file: not live");
        let held = File::create(&lock).unwrap();
        assert!(!instance_live(&lock).unwrap(), "a lock file nobody holds");
        held.lock().unwrap();
        assert!(instance_live(&lock).unwrap());
        assert!(
            instance_live(&lock).unwrap(),
            "checking does not take the lock away"
        );
        drop(held);
        assert!(
            !instance_live(&lock).unwrap(),
            "closed (as when the process dies)"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_missing_segment_is_an_error() {
        let p =
            std::env::temp_dir().join(format!("onetoken-absent-{:016x}", rand::random::<u64>()));
        assert_eq!(
            read_batch(&p, 0, 1, false, None).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }
}

#[cfg(test)]
mod group_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::records::{write_line, CallRecord};

    const DAY: i64 = 86_400_000_000;

    fn rec(ts: i64, org: &str, key: &str, model: &str, cost: i64) -> CallRecord {
        CallRecord {
            ts,
            request_id: format!("r{ts}{org}{key}{model}{cost}"),
            org_id: org.into(),
            account_id: format!("acc-{org}"),
            key_id: key.into(),
            model_requested: model.into(),
            provider: "p".into(),
            cost,
            status: 200,
            source_ip: "10.0.0.1".into(),
            ..CallRecord::default()
        }
    }

    /// Usage groups are per (org, key, model, UTC day, application), count only charged calls of a
    /// known org, sum costs beyond i64 and keep the earliest ts; call groups count every
    /// record.
    #[test]
    fn usage_and_call_groups() {
        let records = [
            rec(5 * DAY - 1, "o", "k", "m", i64::MAX),
            rec(5 * DAY - 2, "o", "k", "m", i64::MAX),
            rec(5 * DAY, "o", "k", "m", 7),
            rec(5 * DAY + 1, "o", "k2", "m", 1),
            rec(5 * DAY + 2, "o", "k", "m", 0),
            rec(5 * DAY + 3, "o", "k", "m", -3),
            rec(5 * DAY + 4, "", "", "m", 9),
            // The key moved into an application: its calls from then on are a group of
            // their own, so the ledger can say which application spent them.
            CallRecord {
                application_id: "app_a".into(),
                ..rec(5 * DAY + 5, "o", "k", "m", 4)
            },
        ];
        let mut buf = Vec::new();
        for r in &records {
            write_line(r, &mut buf);
        }
        let p =
            std::env::temp_dir().join(format!("onetoken-groups-{:016x}", rand::random::<u64>()));
        std::fs::write(&p, &buf).unwrap();
        let read = read_batch(&p, 0, 100, false, None).unwrap();
        std::fs::remove_file(&p).unwrap();
        let g =
            |org: &str, key: &str, day: i64, calls: u64, cost: i128, first_ts: i64| UsageGroup {
                org_id: org.into(),
                key_id: key.into(),
                application_id: String::new(),
                model: "m".into(),
                day,
                calls,
                cost,
                first_ts,
            };
        assert_eq!(
            read.batch.usage,
            [
                g("o", "k", 4, 2, 2 * i128::from(i64::MAX), 5 * DAY - 2),
                g("o", "k", 5, 1, 7, 5 * DAY),
                g("o", "k2", 5, 1, 1, 5 * DAY + 1),
                UsageGroup {
                    application_id: "app_a".into(),
                    ..g("o", "k", 5, 1, 4, 5 * DAY + 5)
                },
            ]
        );
        let calls: Vec<(&str, u64)> = read
            .batch
            .calls
            .iter()
            .map(|c| (c.key_id.as_str(), c.calls))
            .collect();
        assert_eq!(calls, [("", 1), ("k", 6), ("k2", 1)]);
        let owner = |k: &str| (k.to_owned(), "o".to_owned(), "acc-o".to_owned());
        assert_eq!(read.batch.owners, [owner("k"), owner("k2")]);
        let ips = |k: &str| (k.to_owned(), vec!["10.0.0.1".to_owned()]);
        assert_eq!(read.batch.sources, [ips("k"), ips("k2")]);
        assert!(read.batch.failures.is_empty(), "every call succeeded");
        assert_eq!(
            (read.batch.min_ts, read.batch.max_ts),
            (5 * DAY - 2, 5 * DAY + 5)
        );
    }
}

#[cfg(test)]
mod failure_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::records::{write_line, CallRecord};

    /// Failures (an error status or code) keep every dimension and their first request;
    /// successes only count towards `calls`.
    #[test]
    fn failures_are_grouped_with_their_first_request() {
        let rec = |id: &str, ip: &str, status: u16, code: &'static str| CallRecord {
            request_id: id.into(),
            org_id: "o".into(),
            account_id: "a".into(),
            key_id: "k".into(),
            source_ip: ip.into(),
            status,
            error_code: code,
            user_agent: format!("ua-{id}"),
            ..CallRecord::default()
        };
        let records = [
            rec("r0", "1.1.1.1", 200, ""),
            rec("r1", "2.2.2.2", 401, "key_revoked"),
            rec("r2", "2.2.2.2", 401, "key_revoked"),
            rec("r3", "3.3.3.3", 502, ""),
            rec("r4", "1.1.1.1", 200, "stream_aborted"),
        ];
        let mut buf = Vec::new();
        for r in &records {
            write_line(r, &mut buf);
        }
        let p = std::env::temp_dir().join(format!("onetoken-fail-{:016x}", rand::random::<u64>()));
        std::fs::write(&p, &buf).unwrap();
        let read = read_batch(&p, 0, 100, false, None).unwrap();
        std::fs::remove_file(&p).unwrap();
        let got: Vec<(&str, u16, &str, u64, &str, &str)> = read
            .batch
            .failures
            .iter()
            .map(|g| {
                (
                    g.source_ip.as_str(),
                    g.status,
                    g.error_code.as_str(),
                    g.calls,
                    g.first_request_id.as_str(),
                    g.first_user_agent.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("2.2.2.2", 401, "key_revoked", 2, "r1", "ua-r1"),
                ("3.3.3.3", 502, "", 1, "r3", "ua-r3"),
                ("1.1.1.1", 200, "stream_aborted", 1, "r4", "ua-r4"),
            ]
        );
        let ips: Vec<&str> = read.batch.sources[0].1.iter().map(String::as_str).collect();
        assert_eq!(ips, ["1.1.1.1", "2.2.2.2", "3.3.3.3"]);
    }
}

#[cfg(test)]
mod plain_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::records::{write_line, CallRecord};

    fn line(r: &CallRecord) -> Vec<u8> {
        let mut buf = Vec::new();
        write_line(r, &mut buf);
        buf
    }

    fn via_serde(line: &[u8]) -> Option<String> {
        let l = serde_json::from_slice::<Line>(line).ok()?;
        Some(format!("{:?}", l.row()))
    }

    /// The fast path reads a line exactly as serde_json does, or leaves it to serde_json.
    #[test]
    fn plain_lines_read_as_serde_reads_them() {
        let mut records = vec![CallRecord::default()];
        for (ts, cost) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (-1, 0), (0, -1)] {
            records.push(CallRecord {
                ts,
                cost,
                request_id: "req_1".into(),
                user_agent: "ünïcödé ✓ 🦀 \u{2028}".into(),
                prompt_tokens: u32::MAX,
                status: u16::MAX,
                streamed: u8::MAX,
                attempts: u8::MAX,
                ..CallRecord::default()
            });
        }
        for r in &records {
            let l = line(r);
            let fast = parse_plain(&l).map(|row| format!("{row:?}"));
            assert!(fast.is_some(), "{r:?}");
            assert_eq!(fast, via_serde(&l));
        }
        // Escapes, whitespace, another key order, leading zeros, out of range, raw
        // control characters: not the plain shape, so serde_json decides.
        let plain = String::from_utf8(line(&records[1])).unwrap();
        for other in [
            line(&CallRecord {
                user_agent: "quote \" inside".into(),
                ..CallRecord::default()
            }),
            plain.replacen("{\"ts\":", "{ \"ts\":", 1).into_bytes(),
            plain
                .replace("\"status\":65535", "\"status\":065535")
                .into_bytes(),
            plain
                .replace("\"status\":65535", "\"status\":65536")
                .into_bytes(),
            plain
                .replace("\"attempts\":255", "\"attempts\":2.5")
                .into_bytes(),
            plain
                .replace("\"request_id\":\"req_1\"", "\"request_id\":\"req\t1\"")
                .into_bytes(),
            plain.replace("}\n", ",\"extra\":1}\n").into_bytes(),
        ] {
            assert_eq!(parse_plain(&other).map(|_| ()), None);
        }
    }
}
