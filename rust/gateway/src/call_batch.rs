//! One journal batch as ingestion needs it, built while the lines are parsed: the call_log
//! block in ClickHouse's Native format (inserted as is), the ledger's usage groups, and
//! the per-dimension call counts the detectors and budget events look at. Python then
//! touches a few dozen groups per batch instead of every record's columns.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::call_log::{call_log, Field};
use crate::records::CallRecord;

/// The multiply-rotate hash of rustc (FxHash): the maps here are keyed by short strings
/// and small integer tuples from a local file, where SipHash's flooding resistance buys
/// nothing and costs a fifth of the reader's time.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.add(u64::from_le_bytes(word));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(tail) ^ ((rest.len() as u64) << 56));
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_i64(&mut self, i: i64) {
        self.add(i as u64);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
type FxSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

/// Microseconds in a UTC day: usage groups never straddle one.
const DAY_US: i64 = 86_400_000_000;

/// Charged calls of one (org, key, requested model, UTC day, application) in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageGroup {
    pub org_id: String,
    pub key_id: String,
    /// Empty when the key was in no application (a key moved mid-batch makes two groups).
    pub application_id: String,
    pub model: String,
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    pub calls: u64,
    /// Sum of the calls' costs, nano-units; wider than a record's so it cannot overflow.
    pub cost: i128,
    /// Earliest `ts` of the group, microseconds.
    pub first_ts: i64,
}

/// Calls of a batch per key, status, error code and provider (what rates, error rates
/// and provider health count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallGroup {
    pub key_id: String,
    pub status: u16,
    pub error_code: String,
    pub provider: String,
    pub calls: u64,
}

/// Failed calls (status >= 400 or an error code) that share every dimension, source
/// address included: auth floods, key risks and refused budgets are found among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureGroup {
    pub org_id: String,
    pub account_id: String,
    pub key_id: String,
    pub source_ip: String,
    pub status: u16,
    pub error_code: String,
    pub provider: String,
    pub calls: u64,
    /// The group's first record: its request id, path and user agent (a key-risk event
    /// names one request it stands for).
    pub first_request_id: String,
    pub first_path: String,
    pub first_user_agent: String,
}

/// A failure group while the batch is read.
struct FailureAcc {
    calls: u64,
    first_row: usize,
    request_id: String,
    path: u32,
    user_agent: String,
}

macro_rules! batch {
    ($($(#[doc = $doc:literal])* $name:ident: $ty:ty => $column:ident $clickhouse:literal,)*) => {
        /// A record as read from a journal line; strings borrow from the line.
        #[derive(Debug)]
        pub(crate) struct Row<'a> {
            $(pub $name: <$ty as Field>::Ref<'a>,)*
        }

        impl Row<'_> {
            /// Whether every value can be one the engine wrote.
            pub(crate) fn fits(&self) -> bool {
                true $(&& <$ty as Field>::fits(self.$name))*
            }

            /// The owned record; `None` when a value cannot be one the engine wrote.
            pub(crate) fn record(&self) -> Option<CallRecord> {
                Some(CallRecord {
                    $($name: <$ty as Field>::to_record(self.$name)?,)*
                })
            }
        }

        /// The Native columns of a batch, in call_log order.
        #[derive(Default)]
        struct Columns {
            $($name: $column,)*
        }

        impl Columns {
            fn push(&mut self, r: &Row<'_>) {
                $(self.$name.push(r.$name);)*
            }

            /// Bytes of the encoded block, roughly.
            fn size_hint(&self) -> usize {
                0 $(+ self.$name.size_hint())*
            }

            fn encode(&self, rows: usize, out: &mut Vec<u8>) {
                put_uvarint(out, COLUMNS.len() as u64);
                put_uvarint(out, rows as u64);
                $(
                    put_str(out, stringify!($name));
                    put_str(out, $clickhouse);
                    self.$name.encode(out);
                )*
            }
        }

        /// call_log's columns and their ClickHouse types, in table order (Python takes them
        /// through `_core.call_log_native_columns`, and a test checks the analytics
        /// migrations create exactly these).
        pub const COLUMNS: &[(&str, &str)] = &[$((stringify!($name), $clickhouse),)*];

        /// What each call_log column means, in table order: its declaration's `///` lines
        /// as written, one `\n` after each. docs/analytics.md and the ClickHouse column
        /// comments are made from these (through `_core.call_log_column_docs`).
        pub const COLUMN_DOCS: &[(&str, &str)] =
            &[$((stringify!($name), concat!($($doc, "\n"),*)),)*];
    };
}
call_log!(batch);

/// Each distinct value once, numbered in order of first appearance.
#[derive(Default)]
struct Dict {
    ids: FxMap<String, u32>,
    values: Vec<String>,
}

impl Dict {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        // A batch holds at most `usize` rows and far fewer distinct values than u32::MAX.
        let id = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        self.ids.insert(s.to_owned(), id);
        self.values.push(s.to_owned());
        id
    }

    fn get(&self, id: u32) -> String {
        self.values.get(id as usize).cloned().unwrap_or_default()
    }
}

/// A fixed-width number column's Native data: each value little-endian.
#[derive(Default)]
struct NumColumn(Vec<u8>);

impl NumColumn {
    #[inline]
    fn push(&mut self, v: impl LittleEndian) {
        v.put(&mut self.0);
    }

    fn size_hint(&self) -> usize {
        self.0.len()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
}

trait LittleEndian {
    fn put(self, out: &mut Vec<u8>);
}

macro_rules! little_endian {
    ($($t:ty),*) => {$(
        impl LittleEndian for $t {
            #[inline]
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
little_endian!(i64, u32, u16, u8);

/// A `String` column's Native data: each value as a LEB128 length and its bytes.
#[derive(Default)]
struct StrColumn(Vec<u8>);

impl StrColumn {
    #[inline]
    fn push(&mut self, s: &str) {
        put_str(&mut self.0, s);
    }

    fn size_hint(&self) -> usize {
        self.0.len()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
}

/// A `LowCardinality(String)` column: its dictionary and one index per row.
#[derive(Default)]
struct LcColumn {
    dict: Dict,
    index: Vec<u32>,
}

impl LcColumn {
    fn push(&mut self, s: &str) {
        let id = self.dict.id(s);
        self.index.push(id);
    }

    /// The dictionary id of the last row's value.
    fn last(&self) -> u32 {
        self.index.last().copied().unwrap_or_default()
    }

    fn size_hint(&self) -> usize {
        self.index.len() * 4
    }

    /// Native serialization as clickhouse-connect writes it: the shared-dictionary
    /// version (1) as the column prefix, then the index width with "has additional keys"
    /// and "needs dictionary update", the keys as a String column, and the row indexes.
    fn encode(&self, out: &mut Vec<u8>) {
        const HAS_ADDITIONAL_KEYS: u64 = 1 << 9;
        const NEED_UPDATE_DICTIONARY: u64 = 1 << 10;
        let keys = self.dict.values.len();
        let width: u64 = if keys <= 1 << 8 {
            0
        } else if keys <= 1 << 16 {
            1
        } else {
            2
        };
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(
            &(width | HAS_ADDITIONAL_KEYS | NEED_UPDATE_DICTIONARY).to_le_bytes(),
        );
        out.extend_from_slice(&(keys as u64).to_le_bytes());
        for k in &self.dict.values {
            put_str(out, k);
        }
        out.extend_from_slice(&(self.index.len() as u64).to_le_bytes());
        // Indexes are below `keys`, so each narrowing below keeps its value.
        for &i in &self.index {
            match width {
                0 => out.push(i as u8),
                1 => out.extend_from_slice(&(i as u16).to_le_bytes()),
                _ => out.extend_from_slice(&i.to_le_bytes()),
            }
        }
    }
}

/// (org, key, model) dictionary ids, the UTC day and the application's dictionary id.
type UsageKey = (u32, u32, u32, i64, u32);
/// Key id, status, (error code, provider) ids.
type CallKey = (u32, u16, u32, u32);
/// (org, account, key, source ip) ids, status, (error code, provider) ids.
type FailureKey = (u32, u32, u32, u32, u16, u32, u32);

/// The batch being read: its columns and the groups.
#[derive(Default)]
pub struct CallBatch {
    rows: usize,
    columns: Columns,
    // Dimensions the groups use that are plain String columns.
    orgs: Dict,
    accounts: Dict,
    keys: Dict,
    ips: Dict,
    min_ts: i64,
    max_ts: i64,
    usage: FxMap<UsageKey, (u64, i128, i64)>,
    calls: FxMap<CallKey, u64>,
    failures: FxMap<FailureKey, FailureAcc>,
    /// Per key id: the (org, account) of its first record.
    owners: Vec<Option<(u32, u32)>>,
    /// Per key id: its distinct source address ids, in order of appearance.
    sources: Vec<Vec<u32>>,
    source_seen: FxSet<(u32, u32)>,
}

/// What a batch read hands to ingestion.
#[derive(Debug, Default)]
pub struct BatchParts {
    /// The call_log block (Native format); empty when there are no rows.
    pub native: Vec<u8>,
    pub rows: usize,
    /// Smallest and largest `ts` of the batch (0 when empty).
    pub min_ts: i64,
    pub max_ts: i64,
    /// Only calls with cost > 0 of a known org.
    pub usage: Vec<UsageGroup>,
    pub calls: Vec<CallGroup>,
    /// (key, org, account) of each key's first record, keys in order of appearance.
    pub owners: Vec<(String, String, String)>,
    /// In order of each group's first record.
    pub failures: Vec<FailureGroup>,
    /// Each key's distinct source addresses (both non-empty), keys in order of appearance.
    pub sources: Vec<(String, Vec<String>)>,
}

impl CallBatch {
    pub(crate) fn push(&mut self, r: &Row<'_>) {
        if self.rows == 0 {
            self.min_ts = r.ts;
            self.max_ts = r.ts;
        } else {
            self.min_ts = self.min_ts.min(r.ts);
            self.max_ts = self.max_ts.max(r.ts);
        }
        self.rows += 1;
        self.columns.push(r);
        let c = &self.columns;
        let (path, model) = (c.path.last(), c.model_requested.last());
        let (provider, code) = (c.provider.last(), c.error_code.last());
        let app = c.application_id.last();

        let org = self.orgs.id(r.org_id);
        let key = self.keys.id(r.key_id);
        *self
            .calls
            .entry((key, r.status, code, provider))
            .or_insert(0) += 1;
        let k = key as usize;
        if self.owners.len() <= k {
            self.owners.resize(k + 1, None);
            self.sources.resize_with(k + 1, Vec::new);
        }
        if !r.key_id.is_empty() {
            let account = self.accounts.id(r.account_id);
            self.owners[k].get_or_insert((org, account));
            if !r.source_ip.is_empty() {
                let ip = self.ips.id(r.source_ip);
                if self.source_seen.insert((key, ip)) {
                    self.sources[k].push(ip);
                }
            }
        }
        if r.status >= 400 || !r.error_code.is_empty() {
            let account = self.accounts.id(r.account_id);
            let ip = self.ips.id(r.source_ip);
            let row = self.rows - 1;
            self.failures
                .entry((org, account, key, ip, r.status, code, provider))
                .or_insert_with(|| FailureAcc {
                    calls: 0,
                    first_row: row,
                    request_id: r.request_id.to_owned(),
                    path,
                    user_agent: r.user_agent.to_owned(),
                })
                .calls += 1;
        }
        if r.cost > 0 && !r.org_id.is_empty() {
            let day = r.ts.div_euclid(DAY_US);
            let g = self
                .usage
                .entry((org, key, model, day, app))
                .or_insert((0, 0, r.ts));
            g.0 += 1;
            g.1 += i128::from(r.cost);
            g.2 = g.2.min(r.ts);
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn finish(self) -> BatchParts {
        let native = if self.rows == 0 {
            Vec::new()
        } else {
            self.encode()
        };
        let mut usage: Vec<UsageGroup> = self
            .usage
            .iter()
            .map(
                |(&(org, key, model, day, app), &(calls, cost, first_ts))| UsageGroup {
                    org_id: self.orgs.get(org),
                    key_id: self.keys.get(key),
                    application_id: self.columns.application_id.dict.get(app),
                    model: self.columns.model_requested.dict.get(model),
                    day,
                    calls,
                    cost,
                    first_ts,
                },
            )
            .collect();
        // A stable order: the same batch always yields the same list.
        usage.sort_by(|a, b| {
            (
                a.first_ts,
                &a.org_id,
                &a.key_id,
                &a.model,
                a.day,
                &a.application_id,
            )
                .cmp(&(
                    b.first_ts,
                    &b.org_id,
                    &b.key_id,
                    &b.model,
                    b.day,
                    &b.application_id,
                ))
        });
        let mut calls: Vec<CallGroup> = self
            .calls
            .iter()
            .map(|(&(key, status, code, provider), &n)| CallGroup {
                key_id: self.keys.get(key),
                status,
                error_code: self.columns.error_code.dict.get(code),
                provider: self.columns.provider.dict.get(provider),
                calls: n,
            })
            .collect();
        calls.sort_by(|a, b| {
            (&a.key_id, a.status, &a.error_code, &a.provider).cmp(&(
                &b.key_id,
                b.status,
                &b.error_code,
                &b.provider,
            ))
        });
        let mut failures: Vec<(usize, FailureGroup)> = self
            .failures
            .iter()
            .map(|(&(org, account, key, ip, status, code, provider), acc)| {
                (
                    acc.first_row,
                    FailureGroup {
                        org_id: self.orgs.get(org),
                        account_id: self.accounts.get(account),
                        key_id: self.keys.get(key),
                        source_ip: self.ips.get(ip),
                        status,
                        error_code: self.columns.error_code.dict.get(code),
                        provider: self.columns.provider.dict.get(provider),
                        calls: acc.calls,
                        first_request_id: acc.request_id.clone(),
                        first_path: self.columns.path.dict.get(acc.path),
                        first_user_agent: acc.user_agent.clone(),
                    },
                )
            })
            .collect();
        failures.sort_by_key(|(first_row, _)| *first_row);
        // Key ids are numbered in order of appearance.
        let owners = self
            .owners
            .iter()
            .enumerate()
            .filter_map(|(k, o)| {
                let (org, account) = (*o)?;
                let key = u32::try_from(k).ok()?;
                Some((
                    self.keys.get(key),
                    self.orgs.get(org),
                    self.accounts.get(account),
                ))
            })
            .collect();
        let sources = self
            .sources
            .iter()
            .enumerate()
            .filter(|(_, ips)| !ips.is_empty())
            .filter_map(|(k, ips)| {
                let key = u32::try_from(k).ok()?;
                Some((
                    self.keys.get(key),
                    ips.iter().map(|&ip| self.ips.get(ip)).collect(),
                ))
            })
            .collect();
        BatchParts {
            native,
            rows: self.rows,
            min_ts: self.min_ts,
            max_ts: self.max_ts,
            usage,
            calls,
            owners,
            failures: failures.into_iter().map(|(_, g)| g).collect(),
            sources,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.columns.size_hint() + 4096);
        self.columns.encode(self.rows, &mut out);
        out
    }
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uvarint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}
