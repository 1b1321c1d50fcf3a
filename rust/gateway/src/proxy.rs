//! The request path, as named phases: route, authenticate, read, parse, pick the model,
//! reserve, forward, relay, settle and record.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::billing::{self, OrgAccount, Prices, UnpricedSlot, Usage};
use crate::body::{collect, RecordedBody, RespBody, StreamBody, StreamLimits};
use crate::engine::Shared;
use crate::error::{error_body, error_body_with_message, is_safe_ident, json_response, ApiError};
use crate::limits::{self, Admission, Refusal};
use crate::metrics::PathLabel;
use crate::policy::Denial;
use crate::protocol::validate::{self, Invalid};
use crate::protocol::{self, ClientApi, StreamIds, StreamRelay};
use crate::records::CallRecord;
use crate::routing::{self, NotServed, Permit, Unavailable};
use crate::screen::Verdict;
use crate::snapshot::{Deployment, ModelKind, Snapshot};
use crate::sse::{Message, UsageDoc};
use crate::{auth, tokens};

/// Upstream error bodies are read only to pick out `error.type`/`error.code`.
const MAX_UPSTREAM_ERROR_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    Models,
    Chat,
    Embeddings,
    Messages,
    Responses,
    NotFound,
    MethodNotAllowed(PathLabel),
}

fn route(method: &Method, path: &str) -> Route {
    let (expected, route) = match path {
        "/healthz" => (Method::GET, Route::Health),
        "/v1/models" => (Method::GET, Route::Models),
        "/v1/chat/completions" => (Method::POST, Route::Chat),
        "/v1/embeddings" => (Method::POST, Route::Embeddings),
        "/v1/messages" => (Method::POST, Route::Messages),
        "/v1/responses" => (Method::POST, Route::Responses),
        _ => return Route::NotFound,
    };
    if *method == expected {
        return route;
    }
    Route::MethodNotAllowed(match route {
        Route::Models => PathLabel::Models,
        Route::Chat => PathLabel::Chat,
        Route::Embeddings => PathLabel::Embeddings,
        Route::Messages => PathLabel::Messages,
        Route::Responses => PathLabel::Responses,
        _ => PathLabel::Other,
    })
}

impl Route {
    fn label(self) -> PathLabel {
        match self {
            Route::Models => PathLabel::Models,
            Route::Chat => PathLabel::Chat,
            Route::Embeddings => PathLabel::Embeddings,
            Route::Messages => PathLabel::Messages,
            Route::Responses => PathLabel::Responses,
            Route::MethodNotAllowed(l) => l,
            Route::Health | Route::NotFound => PathLabel::Other,
        }
    }
}

/// Why a request failed before a response was relayed.
enum Failure {
    Api(ApiError),
    /// Upstream answered with an error status; only its status and validated
    /// identifiers survive.
    Upstream {
        status: StatusCode,
        kind: Option<String>,
        code: Option<String>,
    },
    /// Refused by a rate, concurrency or budget limit: 429 with `Retry-After`.
    Limited(Refusal),
    /// Refused by the org's sensitive-content guard; the message names the categories.
    Blocked(&'static str),
    /// No deployment the org and key policies permit: 403 naming the rule.
    Denied(Denial),
    /// The body lacks what the client API requires: 400 naming the parameter.
    Invalid(Invalid),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        if r.is_limited() {
            Failure::Limited(r)
        } else {
            Failure::Api(r.error)
        }
    }
}

enum Reply {
    Full {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    Stream {
        upstream: Incoming,
        relay: StreamRelay,
        idle: Duration,
        deadline: tokio::time::Instant,
        permit: Option<Permit>,
    },
}

/// The record of one request under construction. It settles the reservation and emits
/// exactly one `CallRecord`: explicitly through `finish`, or from `Drop` when the request
/// is abandoned (client gone, engine stopping).
pub(crate) struct RequestLog {
    shared: Arc<Shared>,
    start: Instant,
    rec: CallRecord,
    reservation: Option<(Arc<OrgAccount>, i64)>,
    prices: Prices,
    /// Per-request price of the deployment that served.
    request_price: i64,
    /// The org's price factor, applied when the cost is computed.
    price_factor_ppm: u32,
    /// Concurrency slots, token charges and the key-budget reservation.
    admission: Admission,
    /// Held by a request that reserved nothing.
    unpriced: Option<UnpricedSlot>,
    /// Client address, for `blocked_ips` and `allowed_ips`.
    peer: IpAddr,
    prompt_estimate: u64,
    pub(crate) upstream_usage: Option<Usage>,
    pub(crate) relayed_tokens: u64,
    /// The upstream answered with success: what was relayed is chargeable.
    chargeable: bool,
    response_started: bool,
    ttfb: Option<Duration>,
    done: bool,
    /// The request body was read to its end, so the connection can carry another request.
    body_consumed: bool,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl RequestLog {
    fn new(
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
        let rec = CallRecord {
            ts,
            request_id: shared.next_request_id(),
            path: path.as_str(),
            usage_source: "none",
            rate_limit: "pass",
            source_ip: peer.to_string(),
            user_agent: user_agent(headers),
            ..CallRecord::default()
        };
        RequestLog {
            shared,
            start,
            rec,
            reservation: None,
            prices: Prices::default(),
            request_price: 0,
            price_factor_ppm: billing::PPM_ONE,
            admission: Admission::default(),
            unpriced: None,
            peer,
            prompt_estimate: 0,
            upstream_usage: None,
            relayed_tokens: 0,
            chargeable: false,
            response_started: false,
            ttfb: None,
            done: false,
            body_consumed: false,
        }
    }

    fn mark_response_start(&mut self) {
        self.response_started = true;
        self.ttfb = Some(self.start.elapsed());
    }

    /// Settle and emit the record (once).
    pub(crate) fn finish(&mut self, status: u16, err: Option<ApiError>) {
        if self.done {
            return;
        }
        self.done = true;
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
        let cost = if self.chargeable {
            billing::usage_cost_at(usage, self.prices, self.price_factor_ppm)
                .saturating_add(request_cost(self.request_price, self.price_factor_ppm))
        } else {
            0
        };
        if let Some((account, reserved)) = self.reservation.take() {
            account.settle(reserved, cost);
        }
        self.admission
            .settle(cost, usage.prompt.saturating_add(usage.completion));
        self.unpriced = None;
        let elapsed = self.start.elapsed();
        let shared = &self.shared;
        if let Some(err) = err {
            shared.metrics.error(err);
        }
        shared.metrics.observe(elapsed);
        let mut rec = std::mem::take(&mut self.rec);
        rec.prompt_tokens = clamp_u32(usage.prompt);
        rec.completion_tokens = clamp_u32(usage.completion);
        rec.cached_tokens = clamp_u32(usage.cached);
        rec.usage_source = source;
        rec.cost = cost;
        rec.status = status;
        rec.error_code = err.map_or("", ApiError::code);
        rec.latency_us = micros(elapsed);
        rec.ttfb_us = micros(self.ttfb.unwrap_or(elapsed));
        emit(self.shared.clone(), rec);
    }
}

/// Journal a finished record, then count the request as no longer in flight.
///
/// This runs inside the connection's poll, before hyper flushes the bytes it was just
/// handed: a client that has seen the end of its response therefore has its record in
/// the journal, so a SIGKILL right after cannot lose a completed request. Deferring the
/// write past the flush would save a few microseconds of latency and open that window.
fn emit(shared: Arc<Shared>, rec: CallRecord) {
    shared.records.push(rec);
    shared.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// Attach the request's record to a whole response: it is emitted when the body has been
/// handed over (or dropped), with this status and error.
fn recorded(
    resp: Response<RespBody>,
    mut log: RequestLog,
    status: u16,
    err: Option<ApiError>,
) -> Response<RespBody> {
    let (parts, body) = resp.into_parts();
    let body = match body {
        RespBody::Full(bytes) => {
            RespBody::Recorded(Box::new(RecordedBody::new(bytes, status, err, log)))
        }
        other => {
            log.finish(status, err);
            other
        }
    };
    Response::from_parts(parts, body)
}

impl Drop for RequestLog {
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

/// The hyper service: never fails at the HTTP level; every failure is a response.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let route = route(req.method(), req.uri().path());
    if route == Route::Health {
        return Ok(crate::server::health(&shared));
    }
    let mut log = RequestLog::new(shared.clone(), start, route.label(), peer, req.headers());
    let request_id = HeaderValue::from_str(&log.rec.request_id).ok();
    // A request refused before its body was read leaves that body on an HTTP/1.1
    // connection, which hyper then closes; saying so lets keep-alive clients open a fresh
    // connection instead of failing their next request on a dead one.
    let unread_body_closes = req.version() < Version::HTTP_2 && has_body(req.headers());
    let defect = crate::server::request_defect(&req, shared.config.max_header_bytes);
    let result = match defect {
        Some(err) => Err(err.into()),
        None => process(&shared, &mut log, route, req).await,
    };
    let close_connection = (unread_body_closes && !log.body_consumed) || defect.is_some();
    let mut resp = match result {
        Ok(Reply::Full {
            status,
            content_type,
            body,
        }) => {
            log.mark_response_start();
            let mut resp = Response::new(RespBody::from(body));
            *resp.status_mut() = status;
            if let Some(ct) = content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            recorded(resp, log, status.as_u16(), None)
        }
        Ok(Reply::Stream {
            upstream,
            relay,
            idle,
            deadline,
            permit,
        }) => {
            log.mark_response_start();
            log.rec.streamed = 1;
            let limits = StreamLimits {
                idle,
                deadline,
                max_event_bytes: shared.config.max_upstream_event_bytes,
            };
            let mut resp = Response::new(RespBody::Stream(Box::new(StreamBody::new(
                upstream, relay, limits, permit, log,
            ))));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        Err(Failure::Api(err)) => {
            log.mark_response_start();
            let resp = error_reply(route, err.status(), err, None, None, None);
            recorded(resp, log, err.status().as_u16(), Some(err))
        }
        Err(Failure::Denied(denial)) => {
            let err = ApiError::PolicyDenied;
            log.mark_response_start();
            let resp = error_reply(
                route,
                err.status(),
                err,
                None,
                None,
                Some((denial.message(), None)),
            );
            recorded(resp, log, err.status().as_u16(), Some(err))
        }
        Err(Failure::Blocked(message)) => {
            let err = ApiError::SensitiveContentBlocked;
            log.mark_response_start();
            let resp = error_reply(route, err.status(), err, None, None, Some((message, None)));
            recorded(resp, log, err.status().as_u16(), Some(err))
        }
        Err(Failure::Invalid(invalid)) => {
            let err = ApiError::InvalidRequest;
            log.mark_response_start();
            let detail = Some((invalid.message, Some(invalid.param)));
            let resp = error_reply(route, err.status(), err, None, None, detail);
            recorded(resp, log, err.status().as_u16(), Some(err))
        }
        Err(Failure::Limited(refusal)) => {
            log.mark_response_start();
            log.rec.rate_limit = "limited";
            let status = refusal.error.status();
            let mut resp = error_reply(route, status, refusal.error, None, None, None);
            refusal.apply(resp.headers_mut());
            recorded(resp, log, status.as_u16(), Some(refusal.error))
        }
        Err(Failure::Upstream { status, kind, code }) => {
            log.mark_response_start();
            let err = ApiError::UpstreamError;
            let resp = error_reply(route, status, err, kind.as_deref(), code.as_deref(), None);
            recorded(resp, log, status.as_u16(), Some(err))
        }
    };
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    if close_connection {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// Whether the request announces a body (a non-zero length, or chunked).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// An error in the client's protocol: Anthropic's shape on `/v1/messages`, OpenAI's
/// elsewhere. Every text is the gateway's own; `detail` is a message other than the
/// code's default, and the parameter at fault.
fn error_reply(
    route: Route,
    status: StatusCode,
    err: ApiError,
    kind: Option<&str>,
    code: Option<&str>,
    detail: Option<(&'static str, Option<&'static str>)>,
) -> Response<RespBody> {
    let body = if route == Route::Messages {
        protocol::anthropic::error_body(status, err, detail.map(|d| d.0))
    } else if let Some((message, param)) = detail {
        error_body_with_message(err, message, param)
    } else {
        error_body(err, kind, code)
    };
    json_response(status, body)
}

/// The per-request price under the org's price factor.
fn request_cost(price: i64, factor_ppm: u32) -> i64 {
    if price == 0 {
        return 0;
    }
    // One million "tokens" at a per-million price is the price itself, factor applied
    // and rounded up like every other part.
    billing::cost_ppm(1_000_000, price, factor_ppm)
}

fn now_unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The refusal of a request without a known key: `ip_blocked` from a source blocked for
/// failing authentication, else `invalid_api_key`.
fn unauthenticated(snap: &Snapshot, peer: IpAddr) -> ApiError {
    if !snap.blocked_unauthenticated.is_empty()
        && snap.blocked_unauthenticated.contains(peer, now_unix_secs())
    {
        ApiError::IpBlocked
    } else {
        ApiError::InvalidApiKey
    }
}

async fn process(
    shared: &Shared,
    log: &mut RequestLog,
    route: Route,
    req: Request<Incoming>,
) -> Result<Reply, Failure> {
    match route {
        Route::NotFound => return Err(ApiError::NotFound.into()),
        Route::MethodNotAllowed(_) => return Err(ApiError::MethodNotAllowed.into()),
        _ => {}
    }

    // A request relayed by a gateway (this one or another): a provider points back at a
    // gateway. Refused before anything else, so a loop ends at its second hop.
    if req.headers().contains_key(protocol::HOP_HEADER) {
        return Err(ApiError::LoopDetected.into());
    }

    // The whole upstream response must have arrived by then, however it trickles in.
    let deadline = tokio::time::Instant::from_std(log.start)
        + Duration::from_millis(shared.config.upstream_deadline_ms);

    // Attack interception: refused before any key work.
    let snap: Arc<Snapshot> = shared.snapshot.load_full();
    if !snap.blocked_ips.is_empty() && snap.blocked_ips.contains(log.peer, now_unix_secs()) {
        return Err(ApiError::IpBlocked.into());
    }

    // Authenticate before reading the body, so an unknown caller cannot make the gateway
    // buffer a large one.
    let key = auth::extract_key(req.headers())
        .and_then(|raw_key| shared.keyring.lookup(&snap.keys, raw_key))
        .ok_or_else(|| unauthenticated(&snap, log.peer))?;
    log.rec.org_id.clone_from(&key.org.id);
    log.rec.account_id.clone_from(&key.account_id);
    log.rec.key_id.clone_from(&key.key_id);
    if key.revoked {
        return Err(ApiError::KeyRevoked.into());
    }
    let now = now_unix_secs();
    if key.expires_at.is_some_and(|t| t <= now) {
        return Err(ApiError::KeyExpired.into());
    }
    if key.not_before.is_some_and(|t| now < t) {
        return Err(ApiError::KeyNotYetValid.into());
    }
    if key
        .allowed_ips
        .as_ref()
        .is_some_and(|ips| !ips.contains(log.peer, now))
    {
        // The record keeps key_id/org_id so the control plane can raise a key-risk event.
        return Err(ApiError::KeyIpNotAllowed.into());
    }
    if !key.org.active {
        return Err(ApiError::OrgDisabled.into());
    }

    if route == Route::Models {
        let anthropic = req.headers().contains_key("anthropic-version");
        return Ok(models_list(&snap, key, anthropic));
    }
    let api = match route {
        Route::Messages => ClientApi::Messages,
        Route::Responses => ClientApi::Responses,
        Route::Embeddings => ClientApi::Embeddings,
        _ => ClientApi::Chat,
    };
    let kind = if api == ClientApi::Embeddings {
        ModelKind::Embedding
    } else {
        ModelKind::Chat
    };

    let body = read_body(req, shared.config.max_body_bytes).await?;
    log.body_consumed = true;
    let mut doc: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(ApiError::InvalidRequest.into()),
        Err(_) => return Err(ApiError::InvalidJson.into()),
    };
    drop(body);
    // What the client API requires, before anything is reserved or sent.
    validate::check(api, &doc).map_err(Failure::Invalid)?;

    let model_name = doc
        .get("model")
        .and_then(Value::as_str)
        .ok_or(ApiError::InvalidRequest)?;
    let group = snap
        .models
        .get(model_name)
        .filter(|g| g.kind == kind)
        .ok_or(ApiError::ModelNotFound)?;
    // The name the client asked for (an alias is a configured name too).
    model_name.clone_into(&mut log.rec.model_requested);
    if !key.may_use(model_name) && !key.may_use(&group.name) {
        return Err(ApiError::ModelNotAllowed.into());
    }
    // Org scope, endpoint and policies: the deployments this request may reach.
    let candidates = match routing::permitted(group, key, api) {
        Ok(c) => c,
        Err(Unavailable::NotFound) => return Err(ApiError::ModelNotFound.into()),
        Err(Unavailable::Denied(d)) => return Err(Failure::Denied(d)),
    };

    // The org's sensitive-content guard, on the bytes in memory: only categories and
    // counts come out. Before admission, so a blocked request holds no limit or money.
    match key.org.guard.check(&doc) {
        Verdict::Pass => {}
        Verdict::Block(message) => return Err(Failure::Blocked(message)),
        Verdict::Flag(findings) => log.rec.guard_flags = findings.flags(),
    }

    let prompt_estimate =
        protocol::estimate_prompt(api, &doc).unwrap_or_else(|| estimate_prompt(kind, &doc));
    let asked_out = protocol::requested_max_out(api, &doc).or_else(|| requested_out(&doc));
    let max_out =
        |d: &Deployment| asked_out.map_or(d.max_output_tokens, |n| n.min(d.max_output_tokens));
    // Chat `n` asks for that many choices, each up to `max_out`; pass-through forwards it
    // (translations produce one choice), so the bounds below cover n outputs there.
    let choices = match api {
        ClientApi::Chat => doc.get("n").and_then(Value::as_u64).unwrap_or(1),
        _ => 1,
    };
    let out_bound = |d: &Deployment| {
        let n = if protocol::translates(api, d.provider.protocol) {
            1
        } else {
            choices
        };
        max_out(d).saturating_mul(n)
    };
    let stream =
        kind == ModelKind::Chat && doc.get("stream").and_then(Value::as_bool) == Some(true);
    let client_wants_usage = doc
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);

    let org = &key.org;
    // Upper bound over every deployment that may end up serving (fallbacks included).
    let reserve_on = |d: &Deployment| {
        billing::reserve_amount_at(
            prompt_estimate,
            out_bound(d),
            d.prices,
            org.price_factor_ppm,
        )
        .saturating_add(request_cost(d.request_price, org.price_factor_ppm))
    };
    let amount = candidates.iter().map(|d| reserve_on(d)).max().unwrap_or(0);
    let tokens_bound = candidates.iter().map(|d| out_bound(d)).max().unwrap_or(0);
    // Money bounds a priced request; a free one takes a slot of a per-org cap instead.
    if amount == 0 {
        let slot = org
            .account
            .try_unpriced(billing::UNPRICED_IN_FLIGHT_PER_ORG)
            .ok_or_else(Refusal::busy)?;
        log.unpriced = Some(slot);
    }
    // Limits, budgets and the balance; the org reservation is settled in `finish`.
    log.admission = limits::admit(key, prompt_estimate.saturating_add(tokens_bound), amount)?;
    log.reservation = Some((org.account.clone(), amount));
    log.price_factor_ppm = org.price_factor_ppm;
    log.prompt_estimate = prompt_estimate;

    let order = routing::order(group.strategy, candidates, reserve_on);
    let mut attempts = routing::Attempts {
        deadline,
        count: 0,
        last: None,
    };
    let result = routing::forward(
        &snap.routing,
        &order,
        api,
        &mut doc,
        stream,
        &max_out,
        &mut attempts,
    )
    .await;
    drop(doc);
    log.rec.attempts = attempts.count;
    if let Some(d) = &attempts.last {
        log.rec.model_served.clone_from(&d.upstream_model);
        log.rec.provider.clone_from(&d.provider.id);
    }
    let served = match result {
        Ok(s) => s,
        Err(NotServed::Api(e)) => return Err(e.into()),
        Err(NotServed::Status { status, body, idle }) => {
            return Err(upstream_failure(status, body, idle, deadline).await)
        }
    };
    let d = served.deployment;
    let resp = served.response;
    let protocol = d.provider.protocol;
    let idle = d.provider.idle_timeout;
    // Billing uses the prices of the deployment that served.
    log.prices = d.prices;
    log.request_price = d.request_price;
    let status = resp.status();
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    log.chargeable = true;
    if stream && is_sse {
        let ids = || StreamIds {
            id: log.rec.request_id.clone(),
            model: d.upstream_model.clone(),
        };
        return Ok(Reply::Stream {
            upstream: resp.into_body(),
            relay: StreamRelay::new(api, protocol, !client_wants_usage, ids),
            idle,
            deadline,
            permit: Some(served.permit),
        });
    }

    let mut content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let max = shared.config.max_upstream_body_bytes;
    let mut body = match collect(resp.into_body(), idle, deadline, max).await {
        Ok(b) => b,
        Err(e) => {
            // Nothing reached the client, so nothing is charged.
            log.chargeable = false;
            return Err(e.into());
        }
    };
    if protocol::translates(api, protocol) {
        let Some((out, reply)) =
            protocol::translate_reply(api, protocol, &body, &log.rec.request_id)
        else {
            // An answer we cannot read is not delivered, so it is not charged.
            log.chargeable = false;
            return Err(ApiError::UpstreamError.into());
        };
        log.upstream_usage = reply.usage;
        if reply.usage.is_none() {
            log.relayed_tokens = reply.output_tokens();
        }
        body = out;
        content_type = Some(HeaderValue::from_static("application/json"));
    } else if matches!(api, ClientApi::Chat | ClientApi::Embeddings) {
        meter_reply(log, &body);
    } else {
        let (usage, counted) = protocol::meter_passthrough(api, &body);
        log.upstream_usage = usage;
        log.relayed_tokens = counted;
    }
    Ok(Reply::Full {
        status,
        content_type,
        body,
    })
}

async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::BodyTooLarge);
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::BodyTooLarge)
        }
        Err(_) => Err(ApiError::ClientDisconnected),
    }
}

#[derive(Deserialize)]
struct UpstreamErrorDoc {
    error: Option<UpstreamErrorInner>,
}

#[derive(Deserialize)]
struct UpstreamErrorInner {
    #[serde(rename = "type")]
    kind: Option<Value>,
    code: Option<Value>,
}

async fn upstream_failure(
    status: StatusCode,
    body: Incoming,
    idle: Duration,
    deadline: tokio::time::Instant,
) -> Failure {
    let status = if status.as_u16() >= 400 {
        status
    } else {
        StatusCode::BAD_GATEWAY
    };
    let (mut kind, mut code) = (None, None);
    if let Ok(bytes) = collect(body, idle, deadline, MAX_UPSTREAM_ERROR_BYTES).await {
        if let Ok(UpstreamErrorDoc { error: Some(inner) }) = serde_json::from_slice(&bytes) {
            let safe = |v: Option<Value>| match v {
                Some(Value::String(s)) if is_safe_ident(&s) => Some(s),
                _ => None,
            };
            kind = safe(inner.kind);
            code = safe(inner.code);
        }
    }
    Failure::Upstream { status, kind, code }
}

#[derive(Deserialize)]
struct ReplyDoc<'a> {
    #[serde(default)]
    usage: Option<UsageDoc>,
    #[serde(default, borrow)]
    choices: Option<Vec<ReplyChoice<'a>>>,
}

#[derive(Deserialize)]
struct ReplyChoice<'a> {
    #[serde(default, borrow)]
    message: Option<Message<'a>>,
}

/// Usage of a non-streamed answer: the upstream's, else the counted output.
fn meter_reply(log: &mut RequestLog, body: &[u8]) {
    if let Ok(doc) = serde_json::from_slice::<ReplyDoc<'_>>(body) {
        log.upstream_usage = doc.usage.as_ref().map(UsageDoc::to_usage);
        if log.upstream_usage.is_none() {
            log.relayed_tokens = doc
                .choices
                .iter()
                .flatten()
                .filter_map(|c| c.message.as_ref())
                .map(Message::tokens)
                .sum();
        }
    }
}

/// The output cap a chat request asks for, if any.
pub(crate) fn requested_out(doc: &Map<String, Value>) -> Option<u64> {
    doc.get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| doc.get("max_tokens").and_then(Value::as_u64))
}

/// Tokens each chat message adds beyond its content (role and framing).
const PER_MESSAGE_TOKENS: u64 = 4;

fn text_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => tokens::count(s) as u64,
        // Content parts: only text parts carry tokens we can count here.
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(|s| tokens::count(s) as u64)
            .sum(),
        _ => 0,
    }
}

/// Prompt tokens, counted in memory from the parsed body; only the number is kept.
pub(crate) fn estimate_prompt(kind: ModelKind, doc: &Map<String, Value>) -> u64 {
    match kind {
        ModelKind::Chat => {
            let Some(messages) = doc.get("messages").and_then(Value::as_array) else {
                return 0;
            };
            messages
                .iter()
                .map(|m| {
                    let mut n = PER_MESSAGE_TOKENS;
                    if let Some(c) = m.get("content") {
                        n += text_tokens(c);
                    }
                    for call in m
                        .get("tool_calls")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(args) = call.pointer("/function/arguments") {
                            n += text_tokens(args);
                        }
                    }
                    n
                })
                .sum()
        }
        ModelKind::Embedding => match doc.get("input") {
            Some(Value::String(s)) => tokens::count(s) as u64,
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => tokens::count(s) as u64,
                    // Pre-tokenized input: a list of token ids.
                    Value::Array(ids) => ids.len() as u64,
                    Value::Number(_) => 1,
                    _ => 0,
                })
                .sum(),
            _ => 0,
        },
    }
}

/// The names (and aliases) the key can reach: allowed for it, with at least one
/// deployment its org sees and both policies permit. Anthropic's list shape when the
/// caller is the anthropic SDK (it sends `anthropic-version`).
fn models_list(snap: &Snapshot, key: &crate::snapshot::Key, anthropic: bool) -> Reply {
    let names = snap.model_order.iter().filter(|name| {
        snap.models
            .get(name.as_str())
            .is_some_and(|g| (key.may_use(name) || key.may_use(&g.name)) && routing::listed(g, key))
    });
    let body = if anthropic {
        let data: Vec<Value> = names
            .map(|name| {
                serde_json::json!({"type": "model", "id": name, "display_name": name,
                                   "created_at": "1970-01-01T00:00:00Z"})
            })
            .collect();
        let first = data.first().and_then(|m| m.get("id")).cloned();
        let last = data.last().and_then(|m| m.get("id")).cloned();
        serde_json::json!({"data": data, "has_more": false, "first_id": first, "last_id": last})
    } else {
        let data: Vec<Value> = names
            .map(|name| {
                serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": "onetoken"})
            })
            .collect();
        serde_json::json!({"object": "list", "data": data})
    };
    Reply::Full {
        status: StatusCode::OK,
        content_type: Some(HeaderValue::from_static("application/json")),
        body: Bytes::from(body.to_string()),
    }
}
