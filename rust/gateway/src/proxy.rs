//! The request path, as named phases: route, authenticate, read, parse, pick the model,
//! reserve, forward, relay, settle and record.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::billing::{self, OrgAccount, Prices, Usage};
use crate::body::{RespBody, StreamBody};
use crate::engine::Shared;
use crate::error::{error_body, is_safe_ident, json_response, ApiError};
use crate::metrics::PathLabel;
use crate::records::CallRecord;
use crate::snapshot::{Model, ModelKind, Snapshot};
use crate::sse::{Message, SseRelay, UsageDoc};
use crate::{auth, tokens, upstream};

/// Upstream error bodies are read only to pick out `error.type`/`error.code`.
const MAX_UPSTREAM_ERROR_BYTES: usize = 64 * 1024;
/// Cap on a non-streamed upstream answer (large embedding batches stay well below).
const MAX_UPSTREAM_BODY_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    Metrics,
    Models,
    Chat,
    Embeddings,
    NotFound,
    MethodNotAllowed(PathLabel),
}

fn route(method: &Method, path: &str) -> Route {
    let (expected, route) = match path {
        "/healthz" => (Method::GET, Route::Health),
        "/metrics" => (Method::GET, Route::Metrics),
        "/v1/models" => (Method::GET, Route::Models),
        "/v1/chat/completions" => (Method::POST, Route::Chat),
        "/v1/embeddings" => (Method::POST, Route::Embeddings),
        _ => return Route::NotFound,
    };
    if *method == expected {
        return route;
    }
    Route::MethodNotAllowed(match route {
        Route::Models => PathLabel::Models,
        Route::Chat => PathLabel::Chat,
        Route::Embeddings => PathLabel::Embeddings,
        _ => PathLabel::Other,
    })
}

impl Route {
    fn label(self) -> PathLabel {
        match self {
            Route::Models => PathLabel::Models,
            Route::Chat => PathLabel::Chat,
            Route::Embeddings => PathLabel::Embeddings,
            Route::MethodNotAllowed(l) => l,
            Route::Health | Route::Metrics | Route::NotFound => PathLabel::Other,
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
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
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
        relay: SseRelay,
        idle: Duration,
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
    prompt_estimate: u64,
    pub(crate) upstream_usage: Option<Usage>,
    pub(crate) relayed_tokens: u64,
    /// The upstream answered with success: what was relayed is chargeable.
    chargeable: bool,
    response_started: bool,
    ttfb: Option<Duration>,
    done: bool,
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
            prompt_estimate: 0,
            upstream_usage: None,
            relayed_tokens: 0,
            chargeable: false,
            response_started: false,
            ttfb: None,
            done: false,
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
            billing::usage_cost(usage, self.prices)
        } else {
            0
        };
        if let Some((account, reserved)) = self.reservation.take() {
            account.settle(reserved, cost);
        }
        let elapsed = self.start.elapsed();
        let shared = &self.shared;
        if let Some(err) = err {
            shared.metrics.error(err);
        }
        shared.metrics.observe(elapsed);
        shared.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
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
        shared.records.push(rec);
    }
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
    match route {
        Route::Health => return Ok(health(&shared)),
        Route::Metrics => {
            let mut resp = Response::new(RespBody::from(Bytes::from(shared.metrics_text())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return Ok(resp);
        }
        _ => {}
    }
    let mut log = RequestLog::new(shared.clone(), start, route.label(), peer, req.headers());
    let request_id = HeaderValue::from_str(&log.rec.request_id).ok();
    let result = process(&shared, &mut log, route, req).await;
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
            log.finish(status.as_u16(), None);
            resp
        }
        Ok(Reply::Stream {
            upstream,
            relay,
            idle,
        }) => {
            log.mark_response_start();
            log.rec.streamed = 1;
            let mut resp = Response::new(RespBody::Stream(Box::new(StreamBody::new(
                upstream, relay, idle, log,
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
            log.finish(err.status().as_u16(), Some(err));
            json_response(err.status(), error_body(err, None, None))
        }
        Err(Failure::Upstream { status, kind, code }) => {
            log.mark_response_start();
            log.finish(status.as_u16(), Some(ApiError::UpstreamError));
            let body = error_body(ApiError::UpstreamError, kind.as_deref(), code.as_deref());
            json_response(status, body)
        }
    };
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    Ok(resp)
}

fn health(shared: &Shared) -> Response<RespBody> {
    let version = shared.snapshot.load().version;
    let (status, body) = if shared.draining.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"draining"}"#.to_owned(),
        )
    } else if version == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"starting"}"#.to_owned(),
        )
    } else {
        (
            StatusCode::OK,
            format!(r#"{{"status":"ok","snapshot_version":{version}}}"#),
        )
    };
    json_response(status, Bytes::from(body))
}

fn now_unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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

    // Authenticate before reading the body, so an unknown caller cannot make the gateway
    // buffer a large one.
    let snap: Arc<Snapshot> = shared.snapshot.load_full();
    let raw_key = auth::extract_key(req.headers()).ok_or(ApiError::InvalidApiKey)?;
    let key = snap
        .keys
        .get(&shared.hasher.digest(raw_key))
        .ok_or(ApiError::InvalidApiKey)?;
    log.rec.org_id.clone_from(&key.org.id);
    log.rec.account_id.clone_from(&key.account_id);
    log.rec.key_id.clone_from(&key.key_id);
    if key.revoked {
        return Err(ApiError::KeyRevoked.into());
    }
    if key.expires_at.is_some_and(|t| t <= now_unix_secs()) {
        return Err(ApiError::KeyExpired.into());
    }
    if !key.org.active {
        return Err(ApiError::OrgDisabled.into());
    }

    if route == Route::Models {
        return Ok(models_list(&snap, key));
    }
    let kind = if route == Route::Chat {
        ModelKind::Chat
    } else {
        ModelKind::Embedding
    };

    let body = read_body(req, shared.config.max_body_bytes).await?;
    let mut doc: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(ApiError::InvalidRequest.into()),
        Err(_) => return Err(ApiError::InvalidJson.into()),
    };
    drop(body);

    let model_name = doc
        .get("model")
        .and_then(Value::as_str)
        .ok_or(ApiError::InvalidRequest)?;
    let model: &Arc<Model> = snap
        .models
        .get(model_name)
        .filter(|m| m.kind == kind)
        .ok_or(ApiError::ModelNotFound)?;
    log.rec.model_requested.clone_from(&model.name);
    if !key.may_use(&model.name) {
        return Err(ApiError::ModelNotAllowed.into());
    }

    let prompt_estimate = estimate_prompt(kind, &doc);
    let max_out = requested_max_out(&doc, model.max_output_tokens);
    let stream =
        kind == ModelKind::Chat && doc.get("stream").and_then(Value::as_bool) == Some(true);
    let client_wants_usage = doc
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);

    let amount = billing::reserve_amount(prompt_estimate, max_out, model.prices);
    let org = &key.org;
    if !org.account.try_reserve(org.balance, org.spent_mark, amount) {
        return Err(ApiError::InsufficientBalance.into());
    }
    log.reservation = Some((org.account.clone(), amount));
    log.prices = model.prices;
    log.prompt_estimate = prompt_estimate;

    doc.insert(
        "model".to_owned(),
        Value::String(model.upstream_model.clone()),
    );
    if stream {
        // Ask for the usage chunk so billing uses the upstream's own count.
        match doc.get_mut("stream_options") {
            Some(Value::Object(opts)) => {
                opts.insert("include_usage".to_owned(), Value::Bool(true));
            }
            _ => {
                let mut opts = Map::new();
                opts.insert("include_usage".to_owned(), Value::Bool(true));
                doc.insert("stream_options".to_owned(), Value::Object(opts));
            }
        }
    }
    let out = serde_json::to_vec(&doc).map_err(|_| ApiError::Internal)?;
    drop(doc);

    let provider = &model.provider;
    log.rec.model_served.clone_from(&model.upstream_model);
    log.rec.provider.clone_from(&provider.id);
    log.rec.attempts = 1;
    let uri = if kind == ModelKind::Chat {
        &provider.chat_uri
    } else {
        &provider.embeddings_uri
    };
    let mut upstream_req = Request::new(Full::new(Bytes::from(out)));
    *upstream_req.method_mut() = Method::POST;
    *upstream_req.uri_mut() = uri.clone();
    let h = upstream_req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if stream {
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
    }
    if let Some(auth) = &provider.authorization {
        h.insert(header::AUTHORIZATION, auth.clone());
    }

    let resp = match tokio::time::timeout(
        provider.first_byte_timeout,
        provider.client.request(upstream_req),
    )
    .await
    {
        Err(_) => return Err(ApiError::UpstreamTimeout.into()),
        Ok(Err(e)) => return Err(upstream::classify(&e).into()),
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    if !status.is_success() {
        return Err(upstream_failure(status, resp.into_body(), provider.idle_timeout).await);
    }
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    log.chargeable = true;
    if stream && is_sse {
        return Ok(Reply::Stream {
            upstream: resp.into_body(),
            relay: SseRelay::new(!client_wants_usage),
            idle: provider.idle_timeout,
        });
    }

    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let body = match collect(
        resp.into_body(),
        provider.idle_timeout,
        MAX_UPSTREAM_BODY_BYTES,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            // Nothing reached the client, so nothing is charged.
            log.chargeable = false;
            return Err(e.into());
        }
    };
    meter_reply(log, &body);
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

/// Read a whole upstream body, frame by frame, each within the idle timeout.
async fn collect(mut body: Incoming, idle: Duration, max: usize) -> Result<Bytes, ApiError> {
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(ApiError::UpstreamTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ApiError::UpstreamError),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // The common case is a single frame, kept without a copy.
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&data);
            }
        }
        if first.as_ref().map_or(rest.len(), Bytes::len) > max {
            return Err(ApiError::UpstreamError);
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(rest)))
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

async fn upstream_failure(status: StatusCode, body: Incoming, idle: Duration) -> Failure {
    let status = if status.as_u16() >= 400 {
        status
    } else {
        StatusCode::BAD_GATEWAY
    };
    let (mut kind, mut code) = (None, None);
    if let Ok(bytes) = collect(body, idle, MAX_UPSTREAM_ERROR_BYTES).await {
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

fn requested_max_out(doc: &Map<String, Value>, cap: u64) -> u64 {
    let asked = doc
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| doc.get("max_tokens").and_then(Value::as_u64));
    asked.map_or(cap, |n| n.min(cap))
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
fn estimate_prompt(kind: ModelKind, doc: &Map<String, Value>) -> u64 {
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

fn models_list(snap: &Snapshot, key: &crate::snapshot::Key) -> Reply {
    let data: Vec<Value> = snap
        .model_order
        .iter()
        .filter(|name| key.may_use(name))
        .map(|name| {
            serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": "onetoken"})
        })
        .collect();
    let body = serde_json::json!({"object": "list", "data": data}).to_string();
    Reply::Full {
        status: StatusCode::OK,
        content_type: Some(HeaderValue::from_static("application/json")),
        body: Bytes::from(body),
    }
}
