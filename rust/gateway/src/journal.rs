//! Record journal: the one durable log of call records. Every record is appended to a
//! segment file before the last byte of its response reaches the client; ingestion (the
//! control plane) tails the segments with [`crate::journal_reader`] and deletes them once
//! stored. The engine never deletes a segment.
//!
//! Each record is one JSON line ([`crate::records::write_line`]) written with a single
//! `write(2)` to a file opened with `O_APPEND`, so lines are never interleaved. There is no
//! fsync: the threat is the process dying (SIGKILL, OOM, panic), and the page cache outlives
//! the process; a host crash can lose the last seconds.
//!
//! Files, in the spool directory (0700, files 0600):
//! - `journal-<instance>-<segment:08>.jsonl`, the segments of one engine instance;
//! - `journal-<instance>.lock`, held with an exclusive `flock` while the instance runs, so
//!   a reader knows whether a segment may still grow (a segment is complete once a
//!   higher-numbered one exists or its instance is not live);
//! - `gateway.lock`: held exclusively by the one engine serving this data dir, or shared by
//!   every engine serving it when limits and money are shared through Redis (a gateway
//!   that keeps them in memory would grant a key its limits once more beside the others).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::Error;

/// Creates the spool directory (and missing parents) readable by this user only.
///
/// Journal segments hold call records (source addresses, key and account ids): their
/// modes must not depend on the umask the process was started with.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Opens (creating it 0600 if needed) a file for appending; see `create_private_dir`.
pub(crate) fn open_private_append(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Rotate after this many records...
pub(crate) const SEGMENT_RECORDS: u64 = 65_536;
/// ...or this long after the segment was opened, so ingestion can delete what it stored
/// while the engine keeps writing.
pub(crate) const SEGMENT_AGE: Duration = Duration::from_secs(2);

/// The locks a running engine holds on its spool directory; released (by closing the
/// files) when dropped, or by the OS when the process dies.
pub(crate) struct SpoolLocks {
    _gateway: File,
    _instance: File,
}

impl SpoolLocks {
    /// Take the data dir's gateway lock and this instance's lock (it is live while held).
    /// `shared_limits`: this engine shares limits and money through Redis, so other such
    /// engines may serve the data dir beside it (the lock is taken shared); otherwise it
    /// must be the only one (taken exclusive).
    pub(crate) fn acquire(
        dir: &Path,
        instance_id: &str,
        shared_limits: bool,
    ) -> Result<Self, Error> {
        let io = |what: &Path, e: std::io::Error| Error::Bind(format!("{}: {e}", what.display()));
        create_private_dir(dir).map_err(|e| io(dir, e))?;
        let gateway_path = dir.join("gateway.lock");
        let gateway = open_private_append(&gateway_path).map_err(|e| io(&gateway_path, e))?;
        let taken = if shared_limits {
            gateway.try_lock_shared()
        } else {
            gateway.try_lock()
        };
        match taken {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let data_dir = dir.parent().filter(|p| !p.as_os_str().is_empty());
                let why = if shared_limits {
                    "a gateway that keeps limits in its own memory"
                } else {
                    "another gateway"
                };
                return Err(Error::Bind(format!(
                    "{why} is serving data dir {} (it holds {}); several gateways may share \
                     a data dir only when all of them share limits through ONETOKEN_REDIS_URL",
                    data_dir.unwrap_or(dir).display(),
                    gateway_path.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(io(&gateway_path, e)),
        }
        let instance_path = instance_lock_path(dir, instance_id);
        let instance = open_private_append(&instance_path).map_err(|e| io(&instance_path, e))?;
        // Blocking: a reader checking liveness holds it only for an instant, and nobody
        // else uses this instance's name.
        instance.lock().map_err(|e| io(&instance_path, e))?;
        Ok(SpoolLocks {
            _gateway: gateway,
            _instance: instance,
        })
    }
}

/// `<dir>/journal-<instance>.lock`.
pub(crate) fn instance_lock_path(dir: &Path, instance_id: &str) -> PathBuf {
    dir.join(format!("journal-{instance_id}.lock"))
}

struct Current {
    file: File,
    opened: Instant,
    written: u64,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    next_seg: u64,
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
    /// Records lost: the append failed, or came after stop.
    pub(crate) errors: AtomicU64,
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

    /// Append one line (ending in `\n`); false when it is lost (counted in `errors`).
    pub(crate) fn append(&self, line: &[u8]) -> bool {
        let mut st = self.state.lock();
        if st.stopped {
            // The instance lock may be released: a reader would take the segment for
            // complete and could delete it under this write.
            self.errors.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let rotate = st
            .current
            .as_ref()
            .is_some_and(|c| c.written >= self.max_records || c.opened.elapsed() >= self.max_age);
        if rotate {
            st.current = None;
        }
        if st.current.is_none() {
            if !st.dir_ready {
                st.dir_ready = create_private_dir(&self.dir).is_ok();
            }
            let seg = st.next_seg;
            match open_private_append(&self.path(seg)) {
                Ok(file) => {
                    st.next_seg += 1;
                    st.current = Some(Current {
                        file,
                        opened: Instant::now(),
                        written: 0,
                    });
                }
                Err(_) => {
                    st.dir_ready = false;
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        }
        let Some(cur) = st.current.as_mut() else {
            return false;
        };
        // One write(2): a short line to a regular file is written whole unless the disk
        // is full, and O_APPEND places it after every earlier append.
        let ok = matches!(cur.file.write(line), Ok(n) if n == line.len());
        if !ok {
            // A partial line may be on disk: start a fresh segment so the next line does
            // not continue it (the reader counts the torn one as bad).
            self.errors.fetch_add(1, Ordering::Relaxed);
            st.current = None;
            return false;
        }
        cur.written += 1;
        true
    }

    /// No more records are coming: later appends are refused, so the instance lock can be
    /// released (making every segment complete for readers).
    pub(crate) fn stop(&self) {
        let mut st = self.state.lock();
        st.stopped = true;
        st.current = None;
    }

    /// Segments opened so far.
    pub(crate) fn segments(&self) -> u64 {
        self.state.lock().next_seg
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::journal_reader::{instance_live, read_segment};
    use crate::records::{write_line, CallRecord};

    /// Append `each` records `req_{t}_{i}` whose user agents are `ua` repeated up to
    /// `ua_max` times (lines of many lengths).
    fn append_records(j: &Journal, t: u64, each: u64, ua: &str, ua_max: usize) {
        let mut buf = Vec::new();
        for i in 0..each {
            buf.clear();
            let rec = CallRecord {
                request_id: format!("req_{t}_{i}"),
                user_agent: ua.repeat(usize::try_from(i).unwrap() % ua_max),
                ..CallRecord::default()
            };
            write_line(&rec, &mut buf);
            assert!(j.append(&buf));
        }
    }

    /// A journal in `d` whose segments age out only after an hour.
    fn journal_in(d: &Path, instance: &str, segment_records: u64) -> Journal {
        let age = Duration::from_secs(3600);
        Journal::new(d.to_str().unwrap(), instance, segment_records, age)
    }

    /// [`append_records`] from `threads` threads at once; returns when every one is done.
    fn append_concurrently(j: &Journal, threads: u64, each: u64, ua: &str, ua_max: usize) {
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || append_records(j, t, each, ua, ua_max));
            }
        });
    }

    /// `ids` are `req_{thread}_{i}` for every thread and i, each exactly once.
    fn assert_each_written_once(mut ids: Vec<String>, threads: u64, each: u64) {
        ids.sort();
        let mut expected: Vec<String> = (0..threads)
            .flat_map(|t| (0..each).map(move |i| format!("req_{t}_{i}")))
            .collect();
        expected.sort();
        assert_eq!(ids, expected);
    }

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
    fn rotates_by_count_and_never_deletes() {
        let d = dir();
        let j = journal_in(&d, "abc", 3);
        for i in 0..7 {
            assert!(j.append(format!("{{\"n\":{i}}}\n").as_bytes()));
        }
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
        j.stop();
        assert_eq!(files(&d).len(), 3, "stopping deletes nothing");
        assert!(!j.append(b"{}\n"), "refused after stop");
        assert_eq!(j.errors.load(Ordering::Relaxed), 1);
        assert_eq!(j.segments(), 3);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn age_rotation_and_failed_writes() {
        let d = dir();
        let j = Journal::new(d.to_str().unwrap(), "y", 100, Duration::ZERO);
        assert!(j.append(b"{}\n"));
        assert!(j.append(b"{}\n"));
        assert_eq!(j.segments(), 2, "max age 0: every append rotates");

        // An unwritable directory: the append fails and is counted, nothing panics.
        let blocked = d.join("file-not-dir");
        std::fs::write(&blocked, b"").unwrap();
        let bad = Journal::new(blocked.to_str().unwrap(), "z", 10, Duration::ZERO);
        assert!(!bad.append(b"{}\n"));
        assert_eq!(bad.errors.load(Ordering::Relaxed), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The gateway lock admits one engine per spool dir that keeps limits in memory, or
    /// any number that share them; never both kinds. The instance lock says the instance
    /// is live until the locks are dropped.
    #[test]
    fn spool_locks_admit_one_local_or_many_shared_gateways() {
        let d = dir();
        let spool = d.join("spool");
        let refused = |instance: &str, shared: bool| {
            let Err(Error::Bind(message)) = SpoolLocks::acquire(&spool, instance, shared) else {
                panic!("{instance} took the gateway lock");
            };
            message
        };
        let first = SpoolLocks::acquire(&spool, "one", false).unwrap();
        assert!(instance_live(&instance_lock_path(&spool, "one")).unwrap());
        let message = refused("two", false);
        assert!(
            message.starts_with(&format!(
                "another gateway is serving data dir {} (it holds {})",
                d.display(),
                spool.join("gateway.lock").display()
            )),
            "{message}"
        );
        assert!(refused("two", true).starts_with("a gateway that keeps limits in its own memory"));
        assert!(!instance_live(&instance_lock_path(&spool, "two")).unwrap());
        drop(first);
        assert!(!instance_live(&instance_lock_path(&spool, "one")).unwrap());

        // Gateways that share limits serve one data dir together; a local one cannot join.
        let a = SpoolLocks::acquire(&spool, "a", true).unwrap();
        let b = SpoolLocks::acquire(&spool, "b", true).unwrap();
        assert!(instance_live(&instance_lock_path(&spool, "a")).unwrap());
        assert!(instance_live(&instance_lock_path(&spool, "b")).unwrap());
        assert!(refused("c", false).starts_with("another gateway"));
        drop((a, b));
        let again = SpoolLocks::acquire(&spool, "c", false).unwrap();
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Journal files and the spool dir the engine creates for them are private to the
    /// service's user whatever the umask (a test process's is usually 022).
    #[cfg(unix)]
    #[test]
    fn journal_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir();
        let spool = d.join("spool");
        let locks = SpoolLocks::acquire(&spool, "priv", false).unwrap();
        let j = journal_in(&spool, "priv", 1);
        for _ in 0..3 {
            assert!(j.append(b"{}\n"));
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&spool), 0o700);
        let made = files(&spool);
        assert_eq!(made.len(), 5, "{made:?}");
        for name in made {
            assert_eq!(mode(&spool.join(&name)), 0o600, "{name}");
        }
        drop(locks);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Concurrent appends land whole and each exactly once, readable by the reader while
    /// they are written.
    #[test]
    fn concurrent_appends_are_whole_lines() {
        const THREADS: u64 = 4;
        const EACH: u64 = 500;
        let d = dir();
        let j = journal_in(&d, "many", 700);
        append_concurrently(&j, THREADS, EACH, "x", 300);
        let mut ids = Vec::new();
        for name in files(&d) {
            let read = read_segment(&d.join(name), 0, usize::MAX, true).unwrap();
            assert_eq!(read.bad_lines, 0);
            ids.extend(read.records.into_iter().map(|r| r.request_id));
        }
        assert_each_written_once(ids, THREADS, EACH);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Ingestion tails a segment while requests append to it: every record is read once,
    /// whole, and no line is ever seen half written.
    #[test]
    fn a_reader_tailing_a_live_segment_sees_each_record_once() {
        use std::sync::atomic::AtomicBool;

        const THREADS: u64 = 3;
        const EACH: u64 = 2_000;
        let d = dir();
        let j = journal_in(&d, "tail", u64::MAX);
        let segment = d.join("journal-tail-00000000.jsonl");
        let writing = AtomicBool::new(true);
        let ids = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut ids = Vec::new();
                let mut offset = 0;
                loop {
                    // Read the flag first: a read after the writers stopped sees everything.
                    let last = !writing.load(Ordering::Acquire);
                    if let Ok(read) = read_segment(&segment, offset, 97, false) {
                        assert_eq!(read.bad_lines, 0, "a line read half written");
                        offset = read.next_offset;
                        let more = !read.records.is_empty();
                        ids.extend(read.records.into_iter().map(|r| r.request_id));
                        if more {
                            continue;
                        }
                    }
                    if last {
                        return ids;
                    }
                }
            });
            append_concurrently(&j, THREADS, EACH, "y", 700);
            writing.store(false, Ordering::Release);
            reader.join().unwrap()
        });
        assert_each_written_once(ids, THREADS, EACH);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Cost of journaling, per record: serialization and the write(2). Run with
    /// `--nocapture` to see the numbers.
    #[test]
    fn cost_per_record() {
        use crate::records::{CallRecord, Records};
        let d = dir();
        let rec = CallRecord::sample(42);
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
            assert!(j.append(&buf));
        }
        let write = t.elapsed() / N;
        let records = Records::new(d.to_str().unwrap(), "bench2");
        let t = Instant::now();
        for _ in 0..N {
            records.push(rec.clone());
        }
        let push = t.elapsed() / N;
        println!(
            "journal cost per record ({} bytes): serialize {ser:?} (serde_json {ser_serde:?}), \
             append (write(2) under the lock) {write:?}; Records::push {push:?}",
            buf.len()
        );
        // Loose bound: debug builds serialize ~50x slower; this only catches a blocking
        // mistake such as an fsync per record.
        assert!(push < Duration::from_millis(1));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
