//! Call metadata records and their line format. A record is journaled (see
//! [`crate::journal`]) as it is emitted; records never hold content.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::call_log::{call_log, Field};
use crate::journal::{self, Journal};

macro_rules! record {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $column:ident $clickhouse:literal,)*) => {
        /// One call's metadata; the fields are the call_log columns in order.
        #[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
        pub struct CallRecord {
            $($(#[$doc])* pub $name: $ty,)*
        }

        /// One record as a JSON line (`\n`-terminated) appended to `out`: the journal line
        /// format. Byte for byte what `serde_json` writes for the record, without the
        /// serializer machinery: integers are formatted by hand and strings copied whole
        /// unless they hold a character JSON requires escaped.
        pub(crate) fn write_line(r: &CallRecord, out: &mut Vec<u8>) {
            let open = out.len();
            $(
                out.extend_from_slice(concat!(",\"", stringify!($name), "\":").as_bytes());
                r.$name.write_json(out);
            )*
            // Every key was written after a separator; the first one opens the object.
            if let Some(first) = out.get_mut(open) {
                *first = b'{';
            }
            out.extend_from_slice(b"}\n");
        }
    };
}
call_log!(record);

impl CallRecord {
    /// A typical served chat call, the `i`th of a run (its `ts` and `request_id` differ):
    /// what the journal's cost and throughput measurements write and read.
    #[doc(hidden)]
    pub fn sample(i: u32) -> CallRecord {
        CallRecord {
            ts: 1_780_000_000_000_000 + i64::from(i),
            request_id: format!("req_0123456789abcdef{i:010x}"),
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
        }
    }
}

/// Emits records into the instance's journal.
pub(crate) struct Records {
    journal: Journal,
    /// Records emitted (journaled or lost).
    pub(crate) total: AtomicU64,
}

thread_local! {
    /// Reused serialization buffer: a record becomes a line without an allocation.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl Records {
    pub(crate) fn new(spool_dir: &str, instance_id: &str) -> Self {
        Records {
            journal: Journal::new(
                spool_dir,
                instance_id,
                journal::SEGMENT_RECORDS,
                journal::SEGMENT_AGE,
            ),
            total: AtomicU64::new(0),
        }
    }

    /// Journal the record. `total` counts it only afterwards, so a record that is counted
    /// is on disk (or counted lost in `journal_errors`).
    pub(crate) fn push(&self, record: CallRecord) {
        let mut record = Some(record);
        let _ = LINE.try_with(|cell| {
            if let Ok(mut buf) = cell.try_borrow_mut() {
                if let Some(r) = record.take() {
                    self.push_with(&r, &mut buf);
                }
            }
        });
        if let Some(r) = record {
            // The thread's buffer is unavailable (thread teardown): use one of its own.
            self.push_with(&r, &mut Vec::with_capacity(1024));
        }
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn push_with(&self, record: &CallRecord, buf: &mut Vec<u8>) {
        buf.clear();
        write_line(record, buf);
        self.journal.append(buf);
    }

    /// No request will emit a record any more (the engine stopped).
    pub(crate) fn stop(&self) {
        self.journal.stop();
    }

    pub(crate) fn journal_errors(&self) -> u64 {
        self.journal.errors.load(Ordering::Relaxed)
    }

    pub(crate) fn journal_segments(&self) -> u64 {
        self.journal.segments()
    }
}

pub(crate) fn push_u64(out: &mut Vec<u8>, mut v: u64) {
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

pub(crate) fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// A JSON string with `serde_json`'s escapes: `"` and `\`, the short forms `\b \t \n \f
/// \r`, `\u00xx` (lower-case hex) for the other control characters, everything else as is.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
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
    #![allow(clippy::unwrap_used)]
    use super::*;

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
                    application_id: (*s).to_owned(),
                    images: u32::MAX,
                    audio_ms: 1,
                    characters: 0,
                    search_units: 9,
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
}
