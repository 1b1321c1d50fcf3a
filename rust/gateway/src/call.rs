//! The call context: what one request has learned so far, phase by phase, and the two
//! phases that close every request once its response has been handed over or abandoned:
//! settle (the cost, against what was reserved) and record (the one call record, built
//! from the context here and nowhere else).

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap};

use crate::billing::{self, OrgAccount, Prices, UnitPrices, Units, UnpricedSlot, Usage};
use crate::engine::Shared;
use crate::error::ApiError;
use crate::limits::Admission;
use crate::metrics::PathLabel;
use crate::phase::{Mark, Phase};
use crate::records::CallRecord;
use crate::trace::{Attr, Trace};

/// One request, from its head to its record. It settles the reservation and emits
/// exactly one `CallRecord`: explicitly through `finish`, or from `Drop` when the request
/// is abandoned (client gone, engine stopping).
pub(crate) struct Call {
    pub(crate) shared: Arc<Shared>,
    pub(crate) start: Instant,
    /// Request start, microseconds since the Unix epoch.
    ts: i64,
    pub(crate) request_id: String,
    path: PathLabel,
    /// Client address, for `blocked_ips` and `allowed_ips`.
    pub(crate) peer: IpAddr,
    user_agent: String,

    // admit
    /// The request head was refused as malformed: the connection closes after the answer.
    pub(crate) head_refused: bool,

    // authenticate: who calls (ids only; kept when a later check refuses the key, so the
    // control plane can raise a key-risk event).
    pub(crate) org_id: String,
    pub(crate) account_id: String,
    pub(crate) key_id: String,
    /// The key's account or org restricted processing: the record gets a keyed token for
    /// `peer` and the User-Agent's product only; the clear values stay in this struct.
    pub(crate) restricted: bool,

    // route
    /// The request body was read to its end, so the connection can carry another request.
    pub(crate) body_consumed: bool,
    /// The name the client asked for, only once it is a configured model.
    pub(crate) model_requested: String,
    /// The sensitive-content guard's categories and counts.
    pub(crate) guard_flags: String,
    pub(crate) application_id: String,

    // reserve
    /// The org balance reservation, settled against the cost.
    pub(crate) reservation: Option<(Arc<OrgAccount>, i64)>,
    /// Concurrency slots, token charges and the key-budget reservation.
    pub(crate) admission: Admission,
    /// Held by a request that reserved nothing.
    pub(crate) unpriced: Option<UnpricedSlot>,
    /// The org's price factor, applied when the cost is computed.
    pub(crate) price_factor_ppm: u32,
    pub(crate) prompt_estimate: u64,
    /// The units the request asked for (charged when the upstream reports none).
    pub(crate) units_requested: Units,
    /// Refused by a rate, concurrency or budget limit.
    pub(crate) rate_limited: bool,

    // forward
    pub(crate) attempts: u8,
    pub(crate) model_served: String,
    pub(crate) provider: String,
    /// Prices of the deployment that served.
    pub(crate) prices: Prices,
    /// Per-request price of the deployment that served.
    pub(crate) request_price: i64,
    /// Unit prices of the deployment that served, for the requested image variant.
    pub(crate) unit_prices: UnitPrices,

    // relay
    /// The upstream answered with success: what was relayed is chargeable.
    pub(crate) chargeable: bool,
    pub(crate) streamed: bool,
    pub(crate) upstream_usage: Option<Usage>,
    pub(crate) relayed_tokens: u64,
    /// Units the answer carried (images, search units), else those requested.
    pub(crate) units: Units,
    response_started: bool,
    ttfb: Option<Duration>,

    /// Settled and recorded.
    done: bool,
    /// CPU nanoseconds settle and record counted while a relay poll ran them, which the
    /// relay's own count leaves out.
    pub(crate) closing_cpu_ns: u64,
    /// The request's trace, when tracing is on and it may be exported.
    pub(crate) trace: Option<Box<Trace>>,
}

/// What the settle phase charged.
struct Charge {
    usage: Usage,
    units: Units,
    source: &'static str,
    cost: i64,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Call {
    pub(crate) fn new(
        shared: Arc<Shared>,
        start: Instant,
        path: PathLabel,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Self {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        shared.metrics.request(path);
        shared.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let trace = shared
            .tracer
            .as_ref()
            .and_then(|t| Trace::begin(t, headers, start));
        Call {
            trace,
            ts,
            request_id: shared.next_request_id(),
            path,
            peer,
            user_agent: user_agent(headers),
            shared,
            start,
            head_refused: false,
            org_id: String::new(),
            account_id: String::new(),
            key_id: String::new(),
            restricted: false,
            body_consumed: false,
            model_requested: String::new(),
            guard_flags: String::new(),
            application_id: String::new(),
            reservation: None,
            admission: Admission::default(),
            unpriced: None,
            price_factor_ppm: billing::PPM_ONE,
            prompt_estimate: 0,
            units_requested: Units::default(),
            rate_limited: false,
            attempts: 0,
            model_served: String::new(),
            provider: String::new(),
            prices: Prices::default(),
            request_price: 0,
            unit_prices: UnitPrices::default(),
            chargeable: false,
            streamed: false,
            upstream_usage: None,
            relayed_tokens: 0,
            units: Units::default(),
            response_started: false,
            ttfb: None,
            done: false,
            closing_cpu_ns: 0,
        }
    }

    /// When the whole upstream response must have arrived, however it trickles in.
    pub(crate) fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.start)
            + Duration::from_millis(self.shared.config.upstream_deadline_ms)
    }

    pub(crate) fn mark_response_start(&mut self) {
        self.response_started = true;
        self.ttfb = Some(self.start.elapsed());
    }

    /// Settle, then record (once).
    pub(crate) fn finish(&mut self, status: u16, err: Option<ApiError>) {
        if self.done {
            return;
        }
        self.done = true;
        // Past the grace period the runtime drops the upstream connections as well: a
        // stream cut then is this gateway's shutdown, not the provider's failure.
        let err = match err {
            Some(ApiError::UpstreamStreamCut) if self.shared.aborting.load(Ordering::Relaxed) => {
                Some(ApiError::ShuttingDown)
            }
            other => other,
        };
        let from = Mark::now(self.shared.config.phase_timing);
        let settle_start = self.trace.is_some().then(Instant::now);
        let charge = self.settle();
        let (settled, from) = self
            .shared
            .metrics
            .phase_cpu
            .charge_until(Phase::Settle, from, 0);
        let attrs = self.record(charge, status, err);
        let recorded = self.shared.metrics.phase_cpu.charge(Phase::Record, from, 0);
        self.closing_cpu_ns = settled.saturating_add(recorded);
        if let (Some(mut trace), Some(t), Some(attrs)) = (self.trace.take(), settle_start, attrs) {
            trace.end(t, attrs, status >= 500);
        }
    }

    /// The settle phase: usage (the upstream's, else estimated, nothing when not
    /// chargeable), its cost, charged against the reservation and the limits.
    fn settle(&mut self) -> Charge {
        let (usage, source) = match (self.chargeable, self.upstream_usage) {
            (true, Some(u)) => (u, "upstream"),
            (true, None) => (
                Usage {
                    prompt: self.prompt_estimate,
                    completion: self.relayed_tokens,
                    cached: 0,
                },
                "estimated",
            ),
            (false, _) => (Usage::default(), "none"),
        };
        let units = if self.chargeable {
            self.units
        } else {
            Units::default()
        };
        let cost = if self.chargeable {
            billing::usage_cost_at(usage, self.prices, self.price_factor_ppm)
                .saturating_add(request_cost(self.request_price, self.price_factor_ppm))
                .saturating_add(billing::units_cost_at(
                    units,
                    self.unit_prices,
                    self.price_factor_ppm,
                ))
        } else {
            0
        };
        if let Some((account, reserved)) = self.reservation.take() {
            account.settle(reserved, cost);
        }
        self.admission
            .settle(cost, usage.prompt.saturating_add(usage.completion));
        self.unpriced = None;
        Charge {
            usage,
            units,
            source,
            cost,
        }
    }

    /// The record phase: the call record from the context, journaled, then the
    /// request no longer counts as in flight.
    ///
    /// This runs inside the connection's poll, before hyper flushes the bytes it was just
    /// handed: a client that has seen the end of its response therefore has its record in
    /// the journal, so a SIGKILL right after cannot lose a completed request. Deferring
    /// the write past the flush would save a few microseconds of latency and open that
    /// window.
    ///
    /// Returns the trace's request attributes when the request is traced: metadata of the
    /// record only (ids, names, status, counts, cost), never its address or user agent.
    fn record(
        &mut self,
        charge: Charge,
        status: u16,
        err: Option<ApiError>,
    ) -> Option<Vec<(&'static str, Attr)>> {
        let elapsed = self.start.elapsed();
        let metrics = &self.shared.metrics;
        if let Some(err) = err {
            metrics.error(err);
        }
        metrics.observe(elapsed);
        metrics.charged(
            charge.usage.prompt,
            charge.usage.completion,
            charge.usage.cached,
            charge.cost,
        );
        let take = std::mem::take::<String>;
        let (source_ip, user_agent) = if self.restricted {
            (
                self.shared.redactor.ip(self.peer),
                crate::restrict::product(&take(&mut self.user_agent)),
            )
        } else {
            (self.peer.to_string(), take(&mut self.user_agent))
        };
        let rec = CallRecord {
            ts: self.ts,
            request_id: take(&mut self.request_id),
            org_id: take(&mut self.org_id),
            account_id: take(&mut self.account_id),
            key_id: take(&mut self.key_id),
            path: self.path.as_str(),
            model_requested: take(&mut self.model_requested),
            model_served: take(&mut self.model_served),
            provider: take(&mut self.provider),
            prompt_tokens: clamp_u32(charge.usage.prompt),
            completion_tokens: clamp_u32(charge.usage.completion),
            cached_tokens: clamp_u32(charge.usage.cached),
            usage_source: charge.source,
            cost: charge.cost,
            status,
            error_code: err.map_or("", ApiError::code),
            latency_us: micros(elapsed),
            ttfb_us: micros(self.ttfb.unwrap_or(elapsed)),
            streamed: u8::from(self.streamed),
            source_ip,
            user_agent,
            rate_limit: if self.rate_limited { "limited" } else { "pass" },
            attempts: self.attempts,
            guard_flags: take(&mut self.guard_flags),
            application_id: take(&mut self.application_id),
            images: clamp_u32(charge.units.images),
            audio_ms: clamp_u32(charge.units.audio_ms),
            characters: clamp_u32(charge.units.characters),
            search_units: clamp_u32(charge.units.search_units),
        };
        let attrs = self.trace.as_ref().map(|_| span_attributes(&rec));
        self.shared.records.push(rec);
        metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        attrs
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.shared.aborting.load(Ordering::Relaxed) {
            let status = if self.response_started { 200 } else { 503 };
            self.finish(status, Some(ApiError::ShuttingDown));
        } else {
            self.finish(499, Some(ApiError::ClientDisconnected));
        }
    }
}

/// The request span's attributes, from its record.
fn span_attributes(rec: &CallRecord) -> Vec<(&'static str, Attr)> {
    let text = |s: &str| Attr::Str(s.to_owned());
    let int = |n: u32| Attr::Int(i64::from(n));
    vec![
        ("onetoken.request_id", text(&rec.request_id)),
        ("http.route", Attr::Static(rec.path)),
        (
            "http.response.status_code",
            Attr::Int(i64::from(rec.status)),
        ),
        ("onetoken.error_code", Attr::Static(rec.error_code)),
        ("onetoken.org_id", text(&rec.org_id)),
        ("onetoken.key_id", text(&rec.key_id)),
        ("onetoken.model_requested", text(&rec.model_requested)),
        ("onetoken.model_served", text(&rec.model_served)),
        ("onetoken.provider", text(&rec.provider)),
        ("onetoken.attempts", Attr::Int(i64::from(rec.attempts))),
        ("onetoken.streamed", Attr::Bool(rec.streamed == 1)),
        ("onetoken.tokens.prompt", int(rec.prompt_tokens)),
        ("onetoken.tokens.completion", int(rec.completion_tokens)),
        ("onetoken.tokens.cached", int(rec.cached_tokens)),
        ("onetoken.usage_source", Attr::Static(rec.usage_source)),
        ("onetoken.cost", Attr::Int(rec.cost)),
    ]
}

fn user_agent(headers: &HeaderMap) -> String {
    let Some(v) = headers.get(header::USER_AGENT) else {
        return String::new();
    };
    let s = String::from_utf8_lossy(v.as_bytes());
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The per-request price under the org's price factor.
pub(crate) fn request_cost(price: i64, factor_ppm: u32) -> i64 {
    if price == 0 {
        return 0;
    }
    // One million "tokens" at a per-million price is the price itself, factor applied
    // and rounded up like every other part.
    billing::cost_ppm(1_000_000, price, factor_ppm)
}
