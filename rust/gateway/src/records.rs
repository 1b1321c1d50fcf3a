//! Call metadata records: a bounded in-memory queue, drained by the control plane, with an
//! append-only JSONL spool when the queue is full. Records never hold content.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use serde::Serialize;

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
}

impl CallRecord {
    /// Column names in contract order.
    pub const COLUMNS: [&'static str; 23] = [
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
    ];
}

/// Bounded record queue plus overflow spool.
pub(crate) struct Records {
    queue: Mutex<VecDeque<CallRecord>>,
    capacity: usize,
    depth: AtomicUsize,
    pub(crate) total: AtomicU64,
    pub(crate) spooled: AtomicU64,
    pub(crate) dropped: AtomicU64,
    spool_path: PathBuf,
    spool: Mutex<Option<File>>,
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
            spool_path: PathBuf::from(spool_dir).join(format!("overflow-{instance_id}.jsonl")),
            spool: Mutex::new(None),
        }
    }

    pub(crate) fn push(&self, record: CallRecord) {
        self.total.fetch_add(1, Ordering::Relaxed);
        {
            let mut q = self.queue.lock();
            if q.len() < self.capacity {
                q.push_back(record);
                self.depth.store(q.len(), Ordering::Relaxed);
                return;
            }
        }
        self.spool_one(&record);
    }

    /// Overflow path: append one JSON line. Rare by design (the queue is sized for the
    /// drain interval), so a blocking write under a lock is acceptable here.
    fn spool_one(&self, record: &CallRecord) {
        let mut line = match serde_json::to_vec(record) {
            Ok(v) => v,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        line.push(b'\n');
        let mut guard = self.spool.lock();
        if guard.is_none() {
            if let Some(dir) = self.spool_path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            *guard = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.spool_path)
                .ok();
        }
        let written = guard
            .as_mut()
            .map(|f| f.write_all(&line).is_ok())
            .unwrap_or(false);
        if written {
            self.spooled.fetch_add(1, Ordering::Relaxed);
        } else {
            *guard = None;
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn drain(&self, max: usize) -> Vec<CallRecord> {
        let mut q = self.queue.lock();
        let n = max.min(q.len());
        let out: Vec<CallRecord> = q.drain(..n).collect();
        self.depth.store(q.len(), Ordering::Relaxed);
        out
    }

    pub(crate) fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}
