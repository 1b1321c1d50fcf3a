//! Prometheus metrics from atomics. Every label value comes from a fixed set.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::ApiError;
use crate::phase::PhaseCpu;

/// Interface paths, the only values of the `path` label and the record's `path` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathLabel {
    Chat,
    Embeddings,
    Models,
    Other,
    Messages,
    Responses,
    Images,
    Moderations,
    Rerank,
    Speech,
    Transcriptions,
    Translations,
}

impl PathLabel {
    const ALL: [PathLabel; 12] = [
        PathLabel::Chat,
        PathLabel::Embeddings,
        PathLabel::Models,
        PathLabel::Other,
        PathLabel::Messages,
        PathLabel::Responses,
        PathLabel::Images,
        PathLabel::Moderations,
        PathLabel::Rerank,
        PathLabel::Speech,
        PathLabel::Transcriptions,
        PathLabel::Translations,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PathLabel::Chat => "/v1/chat/completions",
            PathLabel::Embeddings => "/v1/embeddings",
            PathLabel::Models => "/v1/models",
            PathLabel::Other => "other",
            PathLabel::Messages => "/v1/messages",
            PathLabel::Responses => "/v1/responses",
            PathLabel::Images => "/v1/images/generations",
            PathLabel::Moderations => "/v1/moderations",
            PathLabel::Rerank => "/v1/rerank",
            PathLabel::Speech => "/v1/audio/speech",
            PathLabel::Transcriptions => "/v1/audio/transcriptions",
            PathLabel::Translations => "/v1/audio/translations",
        }
    }
}

/// Upper bounds of the latency histogram, seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// The `kind` label of `onetoken_tokens_total`.
const TOKEN_KINDS: [&str; 3] = ["prompt", "completion", "cached"];

#[derive(Default)]
pub(crate) struct Metrics {
    requests: [AtomicU64; PathLabel::ALL.len()],
    errors: ErrorCounts,
    buckets: [AtomicU64; BUCKETS.len()],
    duration_count: AtomicU64,
    duration_sum_us: AtomicU64,
    /// Tokens charged: prompt (cached included), completion, cached.
    tokens: [AtomicU64; TOKEN_KINDS.len()],
    /// Cost charged, nano-units.
    cost_nano: AtomicU64,
    pub(crate) in_flight: AtomicI64,
    /// Client connections open now.
    pub(crate) connections_open: AtomicU64,
    /// Connections closed on accept because `max_connections` were open.
    pub(crate) connections_refused: AtomicU64,
    /// Connections closed by the header or idle timeout.
    pub(crate) connections_timed_out: AtomicU64,
    /// CPU time by request phase (`phase_timing`).
    pub(crate) phase_cpu: PhaseCpu,
}

/// One counter per error code (more codes than `Default` covers for arrays).
struct ErrorCounts([AtomicU64; ApiError::ALL.len()]);

impl Default for ErrorCounts {
    fn default() -> Self {
        ErrorCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Metrics {
    pub(crate) fn request(&self, path: PathLabel) {
        self.requests[path as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn error(&self, err: ApiError) {
        self.errors.0[err.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// What a request was charged: its tokens and cost.
    pub(crate) fn charged(&self, prompt: u64, completion: u64, cached: u64, cost: i64) {
        for (counter, n) in self.tokens.iter().zip([prompt, completion, cached]) {
            counter.fetch_add(n, Ordering::Relaxed);
        }
        self.cost_nano
            .fetch_add(u64::try_from(cost).unwrap_or(0), Ordering::Relaxed);
    }

    pub(crate) fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.duration_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, extra: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP onetoken_requests_total Requests received, by interface path."
        );
        let _ = writeln!(out, "# TYPE onetoken_requests_total counter");
        for p in PathLabel::ALL {
            let v = self.requests[p as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "onetoken_requests_total{{path=\"{}\"}} {v}",
                p.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP onetoken_errors_total Failed requests, by error code."
        );
        let _ = writeln!(out, "# TYPE onetoken_errors_total counter");
        for e in ApiError::ALL {
            let v = self.errors.0[e.index()].load(Ordering::Relaxed);
            let _ = writeln!(out, "onetoken_errors_total{{code=\"{}\"}} {v}", e.code());
        }
        let _ = writeln!(
            out,
            "# HELP onetoken_tokens_total Tokens charged, by kind (prompt includes cached)."
        );
        let _ = writeln!(out, "# TYPE onetoken_tokens_total counter");
        for (kind, v) in TOKEN_KINDS.iter().zip(&self.tokens) {
            let v = v.load(Ordering::Relaxed);
            let _ = writeln!(out, "onetoken_tokens_total{{kind=\"{kind}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP onetoken_cost_nano_total Cost charged, nano-units of the currency."
        );
        let _ = writeln!(out, "# TYPE onetoken_cost_nano_total counter");
        let _ = writeln!(
            out,
            "onetoken_cost_nano_total {}",
            self.cost_nano.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP onetoken_request_duration_seconds Request start to end of response."
        );
        let _ = writeln!(out, "# TYPE onetoken_request_duration_seconds histogram");
        let mut cumulative = 0u64;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "onetoken_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = self.duration_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "onetoken_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.duration_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "onetoken_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "onetoken_request_duration_seconds_count {count}");
        // Rendered with Display: counts as integers, the snapshot age as a fraction.
        let gauges: [(&str, &str, &str, String); 11] = [
            (
                "onetoken_connections_open",
                "gauge",
                "Client connections open.",
                self.connections_open.load(Ordering::Relaxed).to_string(),
            ),
            (
                "onetoken_connections_refused_total",
                "counter",
                "Client connections closed on accept at the max_connections cap.",
                self.connections_refused.load(Ordering::Relaxed).to_string(),
            ),
            (
                "onetoken_connections_timed_out_total",
                "counter",
                "Client connections closed by the header-read or idle timeout.",
                self.connections_timed_out
                    .load(Ordering::Relaxed)
                    .to_string(),
            ),
            (
                "onetoken_in_flight_requests",
                "gauge",
                "Requests being served.",
                self.in_flight.load(Ordering::Relaxed).to_string(),
            ),
            (
                "onetoken_records_total",
                "counter",
                "Records emitted.",
                extra.records_total.to_string(),
            ),
            (
                "onetoken_snapshot_version",
                "gauge",
                "Version of the config snapshot serving.",
                extra.snapshot_version.to_string(),
            ),
            (
                "onetoken_snapshot_dropped_entries",
                "gauge",
                "Entries the serving config snapshot left out as invalid.",
                extra.snapshot_dropped.to_string(),
            ),
            (
                "onetoken_journal_segments_total",
                "counter",
                "Record journal segment files this instance opened.",
                extra.journal_segments.to_string(),
            ),
            (
                "onetoken_journal_errors_total",
                "counter",
                "Records lost: their journal append failed.",
                extra.journal_errors.to_string(),
            ),
            (
                "onetoken_control_reachable",
                "gauge",
                "1 when the last exchange with the control plane succeeded.",
                u8::from(extra.control_reachable).to_string(),
            ),
            (
                "onetoken_snapshot_age_seconds",
                "gauge",
                "Seconds since the serving snapshot was last confirmed current.",
                extra.snapshot_age_seconds.to_string(),
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        }
        if let Some(s) = &extra.shared {
            let rows: [(&str, &str, &str, String); 9] = [
                (
                    "onetoken_redis_up",
                    "gauge",
                    "1 when the refiller's last round trip to the shared Redis succeeded.",
                    u8::from(s.up).to_string(),
                ),
                (
                    "onetoken_redis_round_trips_total",
                    "counter",
                    "Round trips the refiller made to the shared Redis.",
                    s.round_trips.to_string(),
                ),
                (
                    "onetoken_redis_round_trip_seconds_total",
                    "counter",
                    "Time spent in round trips to the shared Redis.",
                    s.round_trip_seconds.to_string(),
                ),
                (
                    "onetoken_redis_failed_passes_total",
                    "counter",
                    "Refill passes cut short because the shared Redis did not answer.",
                    s.round_trip_errors.to_string(),
                ),
                (
                    "onetoken_shared_refill_waits_total",
                    "counter",
                    "Requests that found their money lease short and waited for a refill.",
                    s.waits.to_string(),
                ),
                (
                    "onetoken_shared_balance_fallbacks_total",
                    "counter",
                    "Requests refused (503 shared_state_unavailable) because the money lease \
                     ran out while the shared Redis was unreachable.",
                    s.balance_fallbacks.to_string(),
                ),
                (
                    "onetoken_shared_slot_fallbacks_total",
                    "counter",
                    "Concurrency leases set to this gateway's share of the limit because the \
                     shared Redis was unreachable (one per key or org per refill pass).",
                    s.slot_fallbacks.to_string(),
                ),
                (
                    "onetoken_shared_rate_fallbacks_total",
                    "counter",
                    "rpm or tpm leases refilled locally at this gateway's share of the limit \
                     because the shared Redis was unreachable (one per limit per refill pass).",
                    s.rate_fallbacks.to_string(),
                ),
                (
                    "onetoken_shared_live_gateways",
                    "gauge",
                    "Gateways with a recent heartbeat in the shared Redis, as last counted.",
                    s.live_gateways.to_string(),
                ),
            ];
            for (name, kind, help, v) in rows {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} {kind}");
                let _ = writeln!(out, "{name} {v}");
            }
        }
        self.phase_cpu.render(&mut out);
        out
    }

    /// The request metrics as OTLP JSON `metrics`: the series of `/metrics` under the
    /// same names and labels (cumulative, since `start_ns`).
    pub(crate) fn otlp(&self, start_ns: u64, now_ns: u64) -> Value {
        let (start, now) = (start_ns.to_string(), now_ns.to_string());
        let point = |label: &str, value: &str, n: u64| {
            json!({"attributes": [{"key": label, "value": {"stringValue": value}}],
                   "startTimeUnixNano": start, "timeUnixNano": now, "asInt": n.to_string()})
        };
        let sum = |name: &str, unit: &str, points: Vec<Value>| {
            json!({"name": name, "unit": unit, "sum": {
                "dataPoints": points, "aggregationTemporality": 2, "isMonotonic": true}})
        };
        let requests = PathLabel::ALL
            .iter()
            .map(|p| {
                point(
                    "path",
                    p.as_str(),
                    self.requests[*p as usize].load(Ordering::Relaxed),
                )
            })
            .collect();
        let errors = ApiError::ALL
            .iter()
            .map(|e| {
                point(
                    "code",
                    e.code(),
                    self.errors.0[e.index()].load(Ordering::Relaxed),
                )
            })
            .collect();
        // OTLP buckets are per bucket, with one more for what lies above the last bound.
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count = self.duration_count.load(Ordering::Relaxed);
        let above = count.saturating_sub(counts.iter().sum());
        let buckets: Vec<String> = counts.iter().chain([&above]).map(u64::to_string).collect();
        let tokens = TOKEN_KINDS
            .iter()
            .zip(&self.tokens)
            .map(|(kind, v)| point("kind", kind, v.load(Ordering::Relaxed)))
            .collect();
        let cost = json!({"startTimeUnixNano": start, "timeUnixNano": now,
                          "asInt": self.cost_nano.load(Ordering::Relaxed).to_string()});
        json!([
            sum("onetoken_requests_total", "1", requests),
            sum("onetoken_errors_total", "1", errors),
            sum("onetoken_tokens_total", "1", tokens),
            sum("onetoken_cost_nano_total", "1", vec![cost]),
            {"name": "onetoken_request_duration_seconds", "unit": "s", "histogram": {
                "aggregationTemporality": 2,
                "dataPoints": [{
                    "startTimeUnixNano": start, "timeUnixNano": now,
                    "count": count.to_string(),
                    "sum": self.duration_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
                    "bucketCounts": buckets,
                    "explicitBounds": BUCKETS,
                }]}},
            {"name": "onetoken_in_flight_requests", "unit": "1", "gauge": {"dataPoints": [{
                "timeUnixNano": now,
                "asInt": self.in_flight.load(Ordering::Relaxed).to_string()}]}},
        ])
    }
}

/// Values owned elsewhere, rendered with the metrics.
pub(crate) struct Gauges {
    pub(crate) records_total: u64,
    pub(crate) snapshot_version: u64,
    pub(crate) snapshot_dropped: u64,
    pub(crate) journal_segments: u64,
    pub(crate) journal_errors: u64,
    pub(crate) control_reachable: bool,
    pub(crate) snapshot_age_seconds: f64,
    /// Shared-limit figures, when limits are shared through Redis.
    pub(crate) shared: Option<crate::shared::SharedGauges>,
}
