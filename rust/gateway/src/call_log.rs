//! The call_log columns, declared once: [`call_log!`] holds the table, and the record
//! ([`crate::records::CallRecord`]), its journal line (writer and both readers), the
//! ingestion batch ([`crate::call_batch`]) and [`crate::call_batch::COLUMNS`] are generated
//! from it. [`Field`] says how each field type is written to and read from a line.

/// The table: each column in call_log order, with its record field's type, the batch's
/// Native column for it and its ClickHouse type. `call_log!(then)` expands `then!` on it.
/// Each column's `///` lines are its documentation for the people who query it
/// (docs/analytics.md and the ClickHouse column comments are made from them): meaning,
/// unit, the values it takes and what empty means, in plain words without doc links.
macro_rules! call_log {
    ($then:ident) => {
        $then! {
            /// Request start (when the gateway began handling the request), UTC, microsecond
            /// precision; stored as microseconds since the Unix epoch.
            ts: i64 => NumColumn "DateTime64(6, 'UTC')",
            /// Unique request id, also sent to the client as `x-request-id`. A record
            /// replayed after a crash repeats it: count calls with `uniqExact(request_id)`
            /// or read with `FINAL`.
            request_id: String => StrColumn "String",
            /// Org id (the control DB's); empty when the key was not recognised: no known
            /// key (401), or a key served by another gateway pool (403).
            org_id: String => StrColumn "String",
            /// Account id of the key's owner; empty when the key was not recognised.
            account_id: String => StrColumn "String",
            /// API key id (its record in the control DB, never the key itself); empty when
            /// the key was not recognised.
            key_id: String => StrColumn "String",
            /// Interface called: `/v1/chat/completions`, `/v1/embeddings`, `/v1/messages`,
            /// `/v1/responses`, `/v1/images/generations`, `/v1/moderations`, `/v1/rerank`,
            /// `/v1/audio/speech`, `/v1/audio/transcriptions`, `/v1/audio/translations`,
            /// `/v1/models`, or `other` for any other path.
            path: &'static str => LcColumn "LowCardinality(String)",
            /// Model name the client asked for (a configured name or alias); empty when
            /// the request named no configured model (so a client's typo is never stored).
            model_requested: String => LcColumn "LowCardinality(String)",
            /// Upstream model of the last deployment tried; empty when never forwarded.
            model_served: String => LcColumn "LowCardinality(String)",
            /// Provider id of the last deployment tried (names are in the control DB);
            /// empty when never forwarded.
            provider: String => LcColumn "LowCardinality(String)",
            /// Prompt tokens charged, cached ones included; 0 when `usage_source` is
            /// `none`.
            prompt_tokens: u32 => NumColumn "UInt32",
            /// Output tokens charged; 0 when `usage_source` is `none`.
            completion_tokens: u32 => NumColumn "UInt32",
            /// Of `prompt_tokens`, those the upstream served from its prompt cache.
            cached_tokens: u32 => NumColumn "UInt32",
            /// Where the token counts come from: `upstream` (the provider's usage report),
            /// `estimated` (the gateway's count, when the provider reported none) or
            /// `none` (not chargeable: refused or failed before any output).
            usage_source: &'static str => LcColumn "LowCardinality(String)",
            /// Amount charged, in nano-units (10^-9) of the deployment's currency, price
            /// factor applied; 0 when nothing was charged. The ledger holds the billed
            /// amounts: this is the per-call view of them.
            cost: i64 => NumColumn "Int64",
            /// HTTP status sent to the client; 499 when the client went away first. A
            /// stream that failed after its 200 went out keeps 200: `error_code` says so.
            status: u16 => NumColumn "UInt16",
            /// Why the call failed: the code of the OpenAI-shaped error (e.g. `rate_limited`,
            /// `upstream_timeout`, `client_disconnected`), also on a stream that broke after
            /// its 200 (`upstream_stream_cut`, `shutting_down`); empty when it ended well.
            error_code: &'static str => LcColumn "LowCardinality(String)",
            /// Request start to the end of the response, microseconds.
            latency_us: u32 => NumColumn "UInt32",
            /// Request start to the first response byte, microseconds: time to first token
            /// on a stream; equals `latency_us` when no byte was sent before the end.
            ttfb_us: u32 => NumColumn "UInt32",
            /// 1 when the response was relayed as it arrived (a server-sent-event stream, or
            /// the audio of `/v1/audio/speech`), else 0.
            streamed: u8 => NumColumn "UInt8",
            /// Client address: the connection's peer, or the address a trusted load
            /// balancer passed on.
            source_ip: String => StrColumn "String",
            /// The client's User-Agent header, cut to 256 bytes; empty when absent.
            user_agent: String => StrColumn "String",
            /// `limited` when a rate, concurrency or budget limit refused the request,
            /// else `pass`.
            rate_limit: &'static str => LcColumn "LowCardinality(String)",
            /// Upstream attempts, retries and fallbacks included; 0 when never forwarded.
            attempts: u8 => NumColumn "UInt8",
            /// Sensitive-content guard result: `category:count` pairs joined by `,` (e.g.
            /// `bank_card:2,phone:1`); empty when the guard is off or found nothing.
            /// Categories and counts only, never the matched text.
            guard_flags: String => LcColumn "LowCardinality(String)",
            /// Application id (its record in the control DB) the key belonged to when the
            /// call was made; empty when the key was in no application or not recognised.
            /// A key moved to another application counts for the new one from then on.
            application_id: String => LcColumn "LowCardinality(String)",
            /// Images generated and charged (`/v1/images/generations`: the images the
            /// upstream returned, else the count requested); 0 for other interfaces and
            /// when nothing was charged.
            images: u32 => NumColumn "UInt32",
            /// Audio input charged, milliseconds (priced per second; for transcriptions and
            /// translations the duration the upstream reported, else the reservation's
            /// bound); 0 for interfaces without audio input and when nothing was charged.
            audio_ms: u32 => NumColumn "UInt32",
            /// Characters of text turned into speech and charged (`/v1/audio/speech`: the
            /// characters of `input`); 0 for other interfaces and when nothing was charged.
            characters: u32 => NumColumn "UInt32",
            /// Rerank search units charged (`/v1/rerank`: the upstream's billed units, else
            /// one per started hundred documents); 0 for other interfaces and when nothing
            /// was charged.
            search_units: u32 => NumColumn "UInt32",
        }
    };
}
pub(crate) use call_log;

use std::collections::HashSet;
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::records::{push_i64, push_json_str, push_u64};

/// How a record field's type is written to a journal line and read back from one.
pub(crate) trait Field: Sized {
    /// The value as a parsed line holds it: strings borrow from the line.
    type Ref<'a>: Copy;
    /// The value as the general JSON reader produces it.
    type Json: serde::de::DeserializeOwned;

    /// The value as JSON, byte for byte what `serde_json` writes.
    fn write_json(&self, out: &mut Vec<u8>);
    /// The value at the position in a line without escapes.
    fn parse_plain<'a>(p: &mut Plain<'a>) -> Option<Self::Ref<'a>>;
    fn json_ref(v: &Self::Json) -> Self::Ref<'_>;
    /// The owned record value; `None` when the line cannot be one the engine wrote.
    fn to_record(v: Self::Ref<'_>) -> Option<Self>;
    /// Whether a read value can be one the engine wrote.
    fn fits(_: Self::Ref<'_>) -> bool {
        true
    }
}

/// The number types: written in decimal, read as JSON integers.
macro_rules! number_field {
    ($($t:ty: $write:expr, $parse:expr;)*) => {$(
        impl Field for $t {
            type Ref<'a> = $t;
            type Json = $t;

            #[inline]
            fn write_json(&self, out: &mut Vec<u8>) {
                $write(*self, out);
            }

            fn parse_plain<'a>(p: &mut Plain<'a>) -> Option<$t> {
                $parse(p)
            }

            fn json_ref(v: &$t) -> $t {
                *v
            }

            fn to_record(v: $t) -> Option<$t> {
                Some(v)
            }
        }
    )*};
}
number_field! {
    u8: |v, out| push_u64(out, u64::from(v)), |p: &mut Plain<'_>| u8::try_from(p.digits()?).ok();
    u16: |v, out| push_u64(out, u64::from(v)), |p: &mut Plain<'_>| u16::try_from(p.digits()?).ok();
    u32: |v, out| push_u64(out, u64::from(v)), |p: &mut Plain<'_>| u32::try_from(p.digits()?).ok();
    i64: |v, out| push_i64(out, v), |p: &mut Plain<'_>| p.int();
}

/// The string types: `String`, and `&'static str` for the columns the engine writes from
/// small fixed sets (path, usage source, error code, rate limit), kept once per process.
macro_rules! text_field {
    ($($t:ty: $to_record:expr, $fits:expr;)*) => {$(
        impl Field for $t {
            type Ref<'a> = &'a str;
            type Json = String;

            #[inline]
            fn write_json(&self, out: &mut Vec<u8>) {
                push_json_str(out, self);
            }

            fn parse_plain<'a>(p: &mut Plain<'a>) -> Option<&'a str> {
                p.string()
            }

            fn json_ref(v: &String) -> &str {
                v
            }

            fn to_record(v: &str) -> Option<$t> {
                $to_record(v)
            }

            fn fits(v: &str) -> bool {
                $fits(v)
            }
        }
    )*};
}
text_field! {
    String: |v: &str| Some(v.to_owned()), |_| true;
    &'static str: intern, |v: &str| v.len() <= FIXED_SET_LEN_MAX;
}

/// The engine writes path, usage source, error code and rate limit from small fixed sets;
/// a longer value is not a line it wrote.
const FIXED_SET_LEN_MAX: usize = 64;

/// Each distinct fixed-set value is kept once for the life of the process. The cap bounds
/// that memory should a file hold other values: such a line is then bad rather than a leak.
const INTERNED_MAX: usize = 1024;

fn intern(s: &str) -> Option<&'static str> {
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN.get_or_init(|| Mutex::new(HashSet::new())).lock();
    if let Some(&kept) = seen.get(s) {
        return Some(kept);
    }
    if seen.len() >= INTERNED_MAX || s.len() > FIXED_SET_LEN_MAX {
        return None;
    }
    let kept: &'static str = Box::leak(s.to_owned().into_boxed_str());
    seen.insert(kept);
    Some(kept)
}

/// A position in a line without escapes (the caller ruled out backslashes), for the
/// journal reader's fast path.
pub(crate) struct Plain<'a> {
    pub(crate) s: &'a str,
    pub(crate) pos: usize,
}

impl<'a> Plain<'a> {
    pub(crate) fn lit(&mut self, expected: &str) -> Option<()> {
        let rest = self.s.get(self.pos..)?;
        if !rest.starts_with(expected) {
            return None;
        }
        self.pos += expected.len();
        Some(())
    }

    /// A string without escapes: up to the next quote, and without the raw control
    /// characters JSON forbids in strings.
    fn string(&mut self) -> Option<&'a str> {
        self.lit("\"")?;
        let rest = self.s.get(self.pos..)?;
        let end = memchr::memchr(b'"', rest.as_bytes())?;
        let value = rest.get(..end)?;
        if value.bytes().any(|b| b < 0x20) {
            return None;
        }
        self.pos += end + 1;
        Some(value)
    }

    /// JSON digits (no leading zero but a lone 0) as u64; None on overflow.
    fn digits(&mut self) -> Option<u64> {
        let bytes = self.s.as_bytes().get(self.pos..)?;
        let n = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 || (n > 1 && bytes.first() == Some(&b'0')) {
            return None;
        }
        let mut v: u64 = 0;
        for &b in bytes.get(..n)? {
            v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
        self.pos += n;
        Some(v)
    }

    fn int(&mut self) -> Option<i64> {
        let negative = self.lit("-").is_some();
        let magnitude = self.digits()?;
        if negative {
            // i64::MIN's magnitude is one more than i64::MAX.
            0i64.checked_sub_unsigned(magnitude)
        } else {
            i64::try_from(magnitude).ok()
        }
    }
}
