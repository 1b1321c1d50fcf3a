//! Tracing over OTLP: one trace per sampled request, its spans the request's phases and
//! upstream attempts, exported as OTLP/HTTP JSON by a background task.
//!
//! The request path only ever appends to a bounded queue (a mutex held for a push): a slow
//! or dead collector costs dropped spans, counted in `/metrics`, never a wait. Attributes
//! are metadata from the call context (ids, names, status, counts, cost); nothing from a
//! body or a header value is ever put on a span.
//!
//! OTLP/HTTP with the JSON encoding over the hyper client the gateway already links keeps
//! the opentelemetry SDK, tonic and prost out of the build.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::Error;

/// The W3C trace context header, read from clients and written to upstreams.
pub(crate) const TRACEPARENT: &str = "traceparent";

/// `otel` in the engine configuration: where spans go, and how many.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OtelConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans are posted to
    /// `<endpoint>/v1/traces`, metrics to `<endpoint>/v1/metrics`.
    pub endpoint: String,
    /// Head sampling: the share of requests traced, 0.0 to 1.0. A client's `traceparent`
    /// (continued when its org allows it) decides by its sampled flag instead.
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// `service.name` of the exported resource.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// How often queued spans and the metrics are sent.
    #[serde(default = "default_export_interval_ms")]
    pub export_interval_ms: u64,
    /// Spans held for export at most; beyond it new spans are dropped (and counted).
    #[serde(default = "default_queue_spans")]
    pub queue_spans: usize,
}

fn default_ratio() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "onetoken-gateway".to_owned()
}
fn default_export_interval_ms() -> u64 {
    1_000
}
fn default_queue_spans() -> usize {
    65_536
}

impl OtelConfig {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(Error::Config("otel.ratio must be between 0 and 1".into()));
        }
        if self.export_interval_ms == 0 || self.queue_spans == 0 {
            return Err(Error::Config(
                "otel.export_interval_ms and otel.queue_spans must be positive".into(),
            ));
        }
        self.endpoint
            .parse::<http::Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("http" | "https")))
            .ok_or_else(|| Error::Config("otel.endpoint must be an http(s) URL".into()))?;
        Ok(())
    }
}

/// A client's `traceparent`, version 00 (RFC: W3C Trace Context level 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parent {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: u64,
    pub(crate) sampled: bool,
}

impl Parent {
    /// The header's value, or `None` when it is not a valid version-00 traceparent (then
    /// it is ignored, as the specification asks).
    pub(crate) fn parse(headers: &HeaderMap) -> Option<Parent> {
        let v = headers.get(TRACEPARENT)?.to_str().ok()?;
        let mut parts = v.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
            return None;
        }
        let mut trace_id = [0u8; 16];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16)
            .ok()
            .filter(|_| flags.len() == 2)?;
        let lower = |s: &str| !s.bytes().any(|b| b.is_ascii_uppercase());
        if trace_id == [0; 16] || span_id == 0 || !lower(trace) || !lower(span) {
            return None;
        }
        Some(Parent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }
}

/// The `traceparent` value naming `span_id` of `trace_id`, sampled.
pub(crate) fn traceparent(trace_id: [u8; 16], span_id: u64) -> HeaderValue {
    let mut s = String::with_capacity(55);
    let _ = write!(s, "00-{}-{span_id:016x}-01", hex::encode(trace_id));
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn span_id() -> u64 {
    // Zero is the invalid span id.
    rand::random::<u64>().max(1)
}

/// An attribute value: metadata only, so strings, integers and flags.
#[derive(Debug, Clone)]
pub(crate) enum Attr {
    Str(String),
    /// A value from a fixed set (path, error code, usage source): no copy per request.
    Static(&'static str),
    Int(i64),
    Bool(bool),
}

/// A finished span, as queued for export.
#[derive(Debug)]
pub(crate) struct SpanData {
    trace_id: [u8; 16],
    span_id: u64,
    parent: u64,
    name: &'static str,
    /// 2 = server (the request), 3 = client (an upstream attempt), 1 = internal.
    kind: u8,
    start_ns: u64,
    end_ns: u64,
    error: bool,
    attrs: Vec<(&'static str, Attr)>,
}

/// A span of the request path, timed on the monotonic clock.
#[derive(Debug)]
pub(crate) struct PhaseSpan {
    pub(crate) name: &'static str,
    pub(crate) span_id: u64,
    pub(crate) start: Instant,
    pub(crate) end: Instant,
}

impl PhaseSpan {
    pub(crate) fn open(name: &'static str) -> Self {
        let now = Instant::now();
        PhaseSpan {
            name,
            span_id: span_id(),
            start: now,
            end: now,
        }
    }
}

/// One upstream attempt.
#[derive(Debug)]
pub(crate) struct AttemptSpan {
    span_id: u64,
    start: Instant,
    end: Instant,
    provider: String,
    model: String,
    /// The upstream's status, or the gateway's error code when none came.
    outcome: Result<u16, &'static str>,
}

/// What the attempt loop records of a traced request, and the context it sends upstream.
#[derive(Debug)]
pub(crate) struct AttemptTrace {
    trace_id: [u8; 16],
    /// Send `traceparent` upstream (the org allows it).
    propagate: bool,
    pub(crate) spans: Vec<AttemptSpan>,
}

impl AttemptTrace {
    /// An attempt starts: its span opens, and the request to the upstream names it as
    /// parent when propagation is allowed.
    pub(crate) fn start<B>(&mut self, req: &mut Request<B>, provider: &str, model: &str) {
        let id = span_id();
        if self.propagate {
            req.headers_mut()
                .insert(TRACEPARENT, traceparent(self.trace_id, id));
        }
        let now = Instant::now();
        self.spans.push(AttemptSpan {
            span_id: id,
            start: now,
            end: now,
            provider: provider.to_owned(),
            model: model.to_owned(),
            outcome: Err(""),
        });
    }

    /// The attempt that started last has its answer (or failure).
    pub(crate) fn end(&mut self, outcome: Result<u16, &'static str>) {
        if let Some(s) = self.spans.last_mut() {
            s.end = Instant::now();
            s.outcome = outcome;
        }
    }
}

/// The trace of one request, from its head to its record. Exists only while tracing is
/// on and the request may be exported (sampled, or carrying a client's context that its
/// org may yet allow to decide).
#[derive(Debug)]
pub(crate) struct Trace {
    tracer: Arc<Tracer>,
    trace_id: [u8; 16],
    root: u64,
    /// The client's span, once its org allowed continuing it.
    parent: u64,
    /// The client's context, until the org is known.
    client: Option<Parent>,
    /// Export this trace: the ratio's verdict, or the continued parent's flag.
    sampled: bool,
    /// The org allows trace context to cross the gateway.
    pub(crate) propagate: bool,
    start: Instant,
    start_unix_ns: u64,
    pub(crate) phases: Vec<PhaseSpan>,
    pub(crate) attempts: Vec<AttemptSpan>,
}

impl Trace {
    /// The trace of a request starting now, or `None` when it will not be exported.
    pub(crate) fn begin(
        tracer: &Arc<Tracer>,
        headers: &HeaderMap,
        start: Instant,
    ) -> Option<Box<Trace>> {
        let sampled = tracer.sample();
        let client = Parent::parse(headers);
        if !sampled && client.is_none_or(|p| !p.sampled) {
            return None;
        }
        Some(Box::new(Trace {
            tracer: tracer.clone(),
            trace_id: rand::random::<u128>().max(1).to_be_bytes(),
            root: span_id(),
            parent: 0,
            client,
            sampled,
            propagate: false,
            start,
            start_unix_ns: unix_ns(),
            phases: Vec::with_capacity(8),
            attempts: Vec::new(),
        }))
    }

    /// The org is known: with `allowed`, a client's context is continued (its trace, its
    /// span as parent, its sampled flag) and the context goes on to the upstream. Returns
    /// whether the trace is still to be exported.
    pub(crate) fn org(&mut self, allowed: bool) -> bool {
        self.propagate = allowed;
        if let Some(p) = self.client.take().filter(|_| allowed) {
            self.trace_id = p.trace_id;
            self.parent = p.span_id;
            self.sampled = p.sampled;
        }
        self.sampled
    }

    /// The context the attempt loop needs.
    pub(crate) fn attempts(&self) -> AttemptTrace {
        AttemptTrace {
            trace_id: self.trace_id,
            propagate: self.propagate,
            spans: Vec::new(),
        }
    }

    /// The request's phases ended: relay lasts until the response was handed over, then
    /// settle (with record) runs from `settle_start` to now.
    pub(crate) fn end(
        &mut self,
        settle_start: Instant,
        root: Vec<(&'static str, Attr)>,
        error: bool,
    ) {
        if !self.sampled {
            return;
        }
        if let Some(relay) = self.phases.iter_mut().rfind(|p| p.name == "relay") {
            relay.end = settle_start;
        }
        let mut settle = PhaseSpan::open("settle");
        settle.start = settle_start;
        self.phases.push(settle);
        let end = Instant::now();
        let at = |t: Instant| {
            self.start_unix_ns.saturating_add(
                u64::try_from(t.saturating_duration_since(self.start).as_nanos())
                    .unwrap_or(u64::MAX),
            )
        };
        let forward = self
            .phases
            .iter()
            .rfind(|p| p.name == "forward")
            .map_or(self.root, |p| p.span_id);
        let mut spans = Vec::with_capacity(1 + self.phases.len() + self.attempts.len());
        spans.push(SpanData {
            trace_id: self.trace_id,
            span_id: self.root,
            parent: self.parent,
            name: "request",
            kind: 2,
            start_ns: self.start_unix_ns,
            end_ns: at(end),
            error,
            attrs: root,
        });
        for p in &self.phases {
            spans.push(SpanData {
                trace_id: self.trace_id,
                span_id: p.span_id,
                parent: self.root,
                name: p.name,
                kind: 1,
                start_ns: at(p.start),
                end_ns: at(p.end),
                error: false,
                attrs: Vec::new(),
            });
        }
        for (n, a) in self.attempts.drain(..).enumerate() {
            let mut attrs = vec![
                (
                    "onetoken.attempt",
                    Attr::Int(i64::try_from(n + 1).unwrap_or(i64::MAX)),
                ),
                ("onetoken.provider", Attr::Str(a.provider)),
                ("onetoken.model_served", Attr::Str(a.model)),
            ];
            let error = match a.outcome {
                Ok(status) => {
                    attrs.push(("http.response.status_code", Attr::Int(i64::from(status))));
                    status >= 400
                }
                Err(code) => {
                    attrs.push(("error.type", Attr::Static(code)));
                    true
                }
            };
            spans.push(SpanData {
                trace_id: self.trace_id,
                span_id: a.span_id,
                parent: forward,
                name: "upstream",
                kind: 3,
                start_ns: at(a.start),
                end_ns: at(a.end),
                error,
                attrs,
            });
        }
        self.tracer.push(spans);
    }
}

pub(crate) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The engine's tracer: the sampling ratio, the export queue and its counters.
#[derive(Debug)]
pub(crate) struct Tracer {
    config: OtelConfig,
    /// A request is sampled when a random u64 falls below this.
    threshold: u64,
    queue: Mutex<VecDeque<SpanData>>,
    pub(crate) exported: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) export_failures: AtomicU64,
}

impl Tracer {
    pub(crate) fn new(config: OtelConfig) -> Self {
        // 2^64 * ratio, saturating at 1.0 (every request).
        let threshold = if config.ratio >= 1.0 {
            u64::MAX
        } else {
            (config.ratio * 18_446_744_073_709_551_616.0) as u64
        };
        Tracer {
            config,
            threshold,
            queue: Mutex::new(VecDeque::new()),
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            export_failures: AtomicU64::new(0),
        }
    }

    fn sample(&self) -> bool {
        self.threshold != 0 && rand::random::<u64>() <= self.threshold
    }

    /// Queue a trace's spans, or count them dropped when the queue is full.
    fn push(&self, spans: Vec<SpanData>) {
        let mut q = self.queue.lock();
        if q.len() + spans.len() > self.config.queue_spans {
            drop(q);
            self.dropped
                .fetch_add(spans.len() as u64, Ordering::Relaxed);
            return;
        }
        q.extend(spans);
    }

    pub(crate) fn render(&self, out: &mut String) {
        for (name, help, v) in [
            ("onetoken_otel_spans_exported_total", "Spans the collector accepted.", &self.exported),
            ("onetoken_otel_spans_dropped_total", "Spans dropped: the export queue was full, or the collector refused or could not be reached.", &self.dropped),
            ("onetoken_otel_export_failures_total", "OTLP exports that failed (spans or metrics).", &self.export_failures),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
    }

    /// The OTLP/HTTP JSON body of `spans`, written straight into the buffer (no value
    /// tree: at full sampling this runs for every span of every request).
    fn encode(&self, spans: &[SpanData]) -> Vec<u8> {
        let mut out = String::with_capacity(256 + spans.len() * 640);
        out.push_str(r#"{"resourceSpans":[{"resource":"#);
        out.push_str(&self.resource().to_string());
        out.push_str(r#","scopeSpans":[{"scope":{"name":"onetoken"},"spans":["#);
        for (i, s) in spans.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                r#"{{"traceId":"{}","spanId":"{:016x}","#,
                hex::encode(s.trace_id),
                s.span_id
            );
            if s.parent != 0 {
                let _ = write!(out, r#""parentSpanId":"{:016x}","#, s.parent);
            }
            let _ = write!(
                out,
                r#""name":"{}","kind":{},"startTimeUnixNano":"{}","endTimeUnixNano":"{}","status":{{"code":{}}},"attributes":["#,
                s.name,
                s.kind,
                s.start_ns,
                s.end_ns.max(s.start_ns),
                if s.error { 2 } else { 0 }
            );
            for (j, (k, v)) in s.attrs.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                let _ = write!(out, r#"{{"key":"{k}","value":"#);
                match v {
                    Attr::Str(text) => {
                        out.push_str(r#"{"stringValue":"#);
                        out.push_str(&Value::from(text.as_str()).to_string());
                        out.push('}');
                    }
                    Attr::Static(text) => {
                        out.push_str(r#"{"stringValue":"#);
                        out.push_str(&Value::from(*text).to_string());
                        out.push('}');
                    }
                    // OTLP JSON carries 64-bit integers as strings.
                    Attr::Int(n) => {
                        let _ = write!(out, r#"{{"intValue":"{n}"}}"#);
                    }
                    Attr::Bool(b) => {
                        let _ = write!(out, r#"{{"boolValue":{b}}}"#);
                    }
                }
                out.push('}');
            }
            out.push_str("]}");
        }
        out.push_str("]}]}]}");
        out.into_bytes()
    }

    fn resource(&self) -> Value {
        json!({"attributes": [{"key": "service.name",
                               "value": {"stringValue": self.config.service_name}}]})
    }

    fn take(&self, max: usize) -> Vec<SpanData> {
        let mut q = self.queue.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }
}

/// Spans per OTLP request: a collector's default body limit (4 MiB) holds this many.
const BATCH: usize = 2_048;

type OtlpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// The background exporter: every interval, the queued spans (in batches) and the
/// metrics go to the collector. A failed post drops what it carried and counts it.
pub(crate) async fn export(tracer: Arc<Tracer>, metrics: impl Fn() -> Value + Send) {
    let Ok(client) = client() else {
        return;
    };
    let base = tracer.config.endpoint.trim_end_matches('/').to_owned();
    let metrics_url = format!("{base}/v1/metrics");
    let every = Duration::from_millis(tracer.config.export_interval_ms);
    // The first round one interval after start: nothing is queued before then.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        send_spans(&client, &tracer).await;
        let body = json!({"resourceMetrics": [{
            "resource": tracer.resource(),
            "scopeMetrics": [{"scope": {"name": "onetoken"}, "metrics": metrics()}],
        }]});
        if !post(&client, &metrics_url, body.to_string().into_bytes()).await {
            tracer.export_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What is queued, once: at stop, after the requests in flight have finished, so their
/// spans are not lost with the runtime.
pub(crate) async fn flush(tracer: &Tracer) {
    if let Ok(client) = client() {
        send_spans(&client, tracer).await;
    }
}

/// The queued spans in batches, until the queue is empty or a post fails (that batch is
/// dropped; the rest waits for the next round).
async fn send_spans(client: &OtlpClient, tracer: &Tracer) {
    let url = format!("{}/v1/traces", tracer.config.endpoint.trim_end_matches('/'));
    loop {
        let batch = tracer.take(BATCH);
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        if post(client, &url, tracer.encode(&batch)).await {
            tracer.exported.fetch_add(n, Ordering::Relaxed);
        } else {
            tracer.export_failures.fetch_add(1, Ordering::Relaxed);
            tracer.dropped.fetch_add(n, Ordering::Relaxed);
            return;
        }
    }
}

fn client() -> Result<OtlpClient, Error> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| Error::Tls(format!("OTLP client TLS setup: {e}")))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// One OTLP post, bounded in time so a hung collector delays only the exporter.
async fn post(client: &OtlpClient, url: &str, body: Vec<u8>) -> bool {
    let Ok(req) = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
    else {
        return false;
    };
    let sent = async {
        let resp = client.request(req).await.ok()?;
        let ok = resp.status().is_success();
        // Read the answer so the connection can be reused.
        let _ = resp.into_body().collect().await;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), sent).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static("")),
        );
        h
    }

    #[test]
    fn traceparent_parses_only_valid_version_00() {
        let p = Parent::parse(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        assert_eq!(
            p,
            Some(Parent {
                trace_id: [
                    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e,
                    0x0e, 0x47, 0x36
                ],
                span_id: 0x00f0_67aa_0ba9_02b7,
                sampled: true,
            })
        );
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert_eq!(Parent::parse(&headers(bad)), None, "{bad}");
        }
        let unsampled = Parent::parse(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ));
        assert_eq!(unsampled.map(|p| p.sampled), Some(false));
        let tp = traceparent([0xab; 16], 0x1234);
        assert_eq!(
            tp,
            "00-abababababababababababababababab-0000000000001234-01"
        );
    }

    #[test]
    fn the_encoding_is_otlp_json() {
        let tracer = Tracer::new(OtelConfig {
            endpoint: "http://127.0.0.1:9".into(),
            ratio: 1.0,
            service_name: "gw \"1\"".into(),
            export_interval_ms: 1000,
            queue_spans: 8,
        });
        let span = |parent, attrs| SpanData {
            trace_id: [0xab; 16],
            span_id: 0x10,
            parent,
            name: "request",
            kind: 2,
            start_ns: 5,
            end_ns: 7,
            error: true,
            attrs,
        };
        let body = tracer.encode(&[
            span(
                0,
                vec![
                    ("s", Attr::Str("a \"quoted\"\n value".into())),
                    ("t", Attr::Static("/v1/models")),
                    ("i", Attr::Int(-3)),
                    ("b", Attr::Bool(true)),
                ],
            ),
            span(0x20, vec![]),
        ]);
        let doc: Value = serde_json::from_slice(&body).unwrap_or_default();
        let rs = &doc["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0]["value"]["stringValue"],
            "gw \"1\""
        );
        let spans = &rs["scopeSpans"][0]["spans"];
        let first = &spans[0];
        assert_eq!(first["traceId"], "abababababababababababababababab");
        assert_eq!(first["spanId"], "0000000000000010");
        assert!(first.get("parentSpanId").is_none());
        assert_eq!(spans[1]["parentSpanId"], "0000000000000020");
        assert_eq!(first["startTimeUnixNano"], "5");
        assert_eq!(first["status"]["code"], 2);
        let attrs = &first["attributes"];
        assert_eq!(attrs[0]["value"]["stringValue"], "a \"quoted\"\n value");
        assert_eq!(attrs[1]["value"]["stringValue"], "/v1/models");
        assert_eq!(attrs[2]["value"]["intValue"], "-3");
        assert_eq!(attrs[3]["value"]["boolValue"], true);
        assert_eq!(spans[1]["attributes"], serde_json::json!([]));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let tracer = Tracer::new(OtelConfig {
            endpoint: "http://127.0.0.1:9".into(),
            ratio: 0.0,
            service_name: "t".into(),
            export_interval_ms: 1000,
            queue_spans: 3,
        });
        assert!(!tracer.sample());
        let span = || SpanData {
            trace_id: [1; 16],
            span_id: 1,
            parent: 0,
            name: "request",
            kind: 2,
            start_ns: 1,
            end_ns: 2,
            error: false,
            attrs: vec![],
        };
        tracer.push(vec![span(), span()]);
        tracer.push(vec![span(), span()]);
        assert_eq!(tracer.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(tracer.take(10).len(), 2);
    }
}
