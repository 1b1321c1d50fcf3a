//! The request path, one request top to bottom. [`handle`] runs the phases in order over
//! one call context ([`Call`]), and [`respond`] turns their outcome into the response:
//!
//! admit → authenticate → route → reserve → forward → relay, then settle and record
//! (in `call.rs`) once the response has been handed to the connection or abandoned.
//!
//! Each phase reads what earlier phases put in the context, adds what it learns, and
//! stops the request by returning a [`Failure`].

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::auth;
use crate::billing;
use crate::body::{collect, RecordedBody, RespBody, StreamBody, StreamLimits};
use crate::call::{request_cost, Call};
use crate::engine::Shared;
use crate::error::{ApiError, Failure};
use crate::limits::{self, LeaseKind, Refusal};
use crate::metrics::PathLabel;
use crate::phase::{Phase, PhaseClock};
use crate::protocol::{self, openai, units, upload, validate, ClientApi, StreamIds, StreamRelay};
use crate::routing::{self, NotServed, Permit, Served};
use crate::screen::Verdict;
use crate::snapshot::{Deployment, Key, ModelGroup, ModelKind, Snapshot};
use crate::upstream::UpBody;

/// Upstream error bodies are read only to pick out `error.type`/`error.code`.
const MAX_UPSTREAM_ERROR_BYTES: usize = 64 * 1024;

/// The hyper service: never fails at the HTTP level; every failure is a response.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let endpoint = Endpoint::of(req.method(), req.uri().path());
    if endpoint == Endpoint::Health {
        return Ok(crate::server::health(&shared));
    }
    let mut call = Call::new(shared.clone(), start, endpoint.label(), peer, req.headers());
    let request_id = HeaderValue::from_str(&call.request_id).ok();
    // A request refused before its body was read leaves that body on an HTTP/1.1
    // connection, which hyper then closes; saying so lets keep-alive clients open a fresh
    // connection instead of failing their next request on a dead one.
    let unread_body_closes = req.version() < Version::HTTP_2 && has_body(req.headers());
    let outcome = process(&shared, &mut call, endpoint, req).await;
    let close_connection = (unread_body_closes && !call.body_consumed) || call.head_refused;
    let mut resp = respond(&shared, call, endpoint, outcome);
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    if close_connection {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// The phases up to the response, each timed under its name when `phase_timing` is on
/// and a span of the request's trace when it is traced.
async fn process(
    shared: &Shared,
    call: &mut Call,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Result<Reply, Failure> {
    let mut clock = PhaseClock::new(shared, call.trace.is_some());
    let outcome = phases(shared, call, &mut clock, endpoint, req).await;
    if let (Some(trace), Some(spans)) = (call.trace.as_mut(), clock.spans) {
        trace.phases = spans;
    }
    outcome
}

async fn phases(
    shared: &Shared,
    call: &mut Call,
    clock: &mut PhaseClock<'_>,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Result<Reply, Failure> {
    let snap = clock.time(Phase::Admit, || admit(shared, call, endpoint, &req))?;
    let key = clock.time(Phase::Authenticate, || {
        authenticate(shared, call, &snap, req.headers())
    })?;
    // The org decides whether a client's trace context is continued.
    if let Some(trace) = call.trace.as_mut() {
        if !trace.org(key.org.trace_context) {
            call.trace = None;
            clock.spans = None;
        }
    }
    let Some(api) = endpoint.api() else {
        // `/v1/models` is answered from the snapshot: nothing to route or reserve.
        let anthropic = req.headers().contains_key("anthropic-version");
        return Ok(clock.time(Phase::Route, || models_list(&snap, key, anthropic)));
    };
    let (mut ask, doc, upload) = if api.upload() {
        let (ask, upload) = clock
            .timed(
                Phase::Route,
                route_upload(shared, call, &snap, key, api, req),
            )
            .await?;
        (ask, Map::new(), Some(upload))
    } else {
        let (ask, doc) = clock
            .timed(Phase::Route, route(shared, call, &snap, key, api, req))
            .await?;
        (ask, doc, None)
    };
    // When a lease is short, wait for refills until `wait_ms` has passed or a refill
    // came back starved (the shared limit itself has no room).
    let mut deadline = None;
    let plan = loop {
        let wait = match deadline {
            None => Wait::First,
            Some(d) if Instant::now() >= d => Wait::Over,
            Some(_) => Wait::Again,
        };
        let tried = clock.time(Phase::Reserve, || {
            reserve(shared, call, key, &mut ask, &doc, wait)
        })?;
        if let Some(plan) = tried {
            break plan;
        }
        let Some(limits) = &shared.shared_limits else {
            return Err(ApiError::Internal.into());
        };
        let d = *deadline.get_or_insert_with(|| {
            limits.waits.fetch_add(1, Ordering::Relaxed);
            limits.wait_deadline(Instant::now())
        });
        clock.timed(Phase::Reserve, limits.wait_for_refill(d)).await;
    };
    let served = match upload {
        Some(upload) => {
            clock
                .timed(
                    Phase::Forward,
                    forward_upload(shared, call, &snap, &ask, plan, upload),
                )
                .await?
        }
        None => {
            clock
                .timed(Phase::Forward, forward(call, &snap, &ask, doc, plan))
                .await?
        }
    };
    clock
        .timed(Phase::Relay, relay(shared, call, &ask, served))
        .await
}

/// The interface a request addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Health,
    Models,
    Chat,
    Embeddings,
    Messages,
    Responses,
    Images,
    Moderations,
    Rerank,
    Speech,
    Transcriptions,
    Translations,
    NotFound,
    MethodNotAllowed(PathLabel),
}

impl Endpoint {
    fn of(method: &Method, path: &str) -> Endpoint {
        let (expected, endpoint) = match path {
            "/healthz" => (Method::GET, Endpoint::Health),
            "/v1/models" => (Method::GET, Endpoint::Models),
            "/v1/chat/completions" => (Method::POST, Endpoint::Chat),
            "/v1/embeddings" => (Method::POST, Endpoint::Embeddings),
            "/v1/messages" => (Method::POST, Endpoint::Messages),
            "/v1/responses" => (Method::POST, Endpoint::Responses),
            "/v1/images/generations" => (Method::POST, Endpoint::Images),
            "/v1/moderations" => (Method::POST, Endpoint::Moderations),
            "/v1/rerank" => (Method::POST, Endpoint::Rerank),
            "/v1/audio/speech" => (Method::POST, Endpoint::Speech),
            "/v1/audio/transcriptions" => (Method::POST, Endpoint::Transcriptions),
            "/v1/audio/translations" => (Method::POST, Endpoint::Translations),
            _ => return Endpoint::NotFound,
        };
        if *method == expected {
            return endpoint;
        }
        Endpoint::MethodNotAllowed(endpoint.label())
    }

    fn label(self) -> PathLabel {
        match self {
            Endpoint::Models => PathLabel::Models,
            Endpoint::Chat => PathLabel::Chat,
            Endpoint::Embeddings => PathLabel::Embeddings,
            Endpoint::Messages => PathLabel::Messages,
            Endpoint::Responses => PathLabel::Responses,
            Endpoint::Images => PathLabel::Images,
            Endpoint::Moderations => PathLabel::Moderations,
            Endpoint::Rerank => PathLabel::Rerank,
            Endpoint::Speech => PathLabel::Speech,
            Endpoint::Transcriptions => PathLabel::Transcriptions,
            Endpoint::Translations => PathLabel::Translations,
            Endpoint::MethodNotAllowed(l) => l,
            Endpoint::Health | Endpoint::NotFound => PathLabel::Other,
        }
    }

    /// The client API of a proxied endpoint.
    fn api(self) -> Option<ClientApi> {
        match self {
            Endpoint::Chat => Some(ClientApi::Chat),
            Endpoint::Embeddings => Some(ClientApi::Embeddings),
            Endpoint::Messages => Some(ClientApi::Messages),
            Endpoint::Responses => Some(ClientApi::Responses),
            Endpoint::Images => Some(ClientApi::Images),
            Endpoint::Moderations => Some(ClientApi::Moderations),
            Endpoint::Rerank => Some(ClientApi::Rerank),
            Endpoint::Speech => Some(ClientApi::Speech),
            Endpoint::Transcriptions => Some(ClientApi::Transcription),
            Endpoint::Translations => Some(ClientApi::Translation),
            _ => None,
        }
    }
}

/// Admit: refuse what needs no key work (a malformed head, an unknown endpoint, a
/// request that went round a gateway loop, a blocked address), and take the snapshot the
/// rest of the request is served from.
fn admit(
    shared: &Shared,
    call: &mut Call,
    endpoint: Endpoint,
    req: &Request<Incoming>,
) -> Result<Arc<Snapshot>, Failure> {
    if let Some(err) = crate::server::request_defect(req, shared.config.max_header_bytes) {
        call.head_refused = true;
        return Err(err.into());
    }
    match endpoint {
        Endpoint::NotFound => return Err(ApiError::NotFound.into()),
        Endpoint::MethodNotAllowed(_) => return Err(ApiError::MethodNotAllowed.into()),
        _ => {}
    }
    // A request relayed by a gateway (this one or another): a provider points back at a
    // gateway. Refused before anything else, so a loop ends at its second hop.
    if req.headers().contains_key(protocol::HOP_HEADER) {
        return Err(ApiError::LoopDetected.into());
    }
    let snap = shared.snapshot.load_full();
    if !snap.blocked_ips.is_empty() && snap.blocked_ips.contains(call.peer, now_unix_secs()) {
        return Err(ApiError::IpBlocked.into());
    }
    Ok(snap)
}

/// Authenticate: the key, before the body is read (an unknown caller cannot make the
/// gateway buffer a large one), and whether it may be used now from this address.
fn authenticate<'s>(
    shared: &Shared,
    call: &mut Call,
    snap: &'s Snapshot,
    headers: &HeaderMap,
) -> Result<&'s Key, Failure> {
    let raw_key = auth::extract_key(headers);
    let Some(key) = raw_key.and_then(|raw| shared.keyring.lookup(&snap.keys, raw)) else {
        // A key of an org served by other gateways is told so, not called invalid.
        if let Some(elsewhere) = raw_key
            .filter(|_| !snap.elsewhere_keys.is_empty())
            .and_then(|raw| shared.keyring.lookup(&snap.elsewhere_keys, raw))
        {
            return Err(Failure::wrong_pool(elsewhere.shared));
        }
        return Err(unauthenticated(snap, call.peer).into());
    };
    call.org_id.clone_from(&key.org.id);
    call.account_id.clone_from(&key.account_id);
    call.key_id.clone_from(&key.key_id);
    call.restricted = key.restrict_client;
    if let Some(app) = &key.application {
        call.application_id.clone_from(&app.id);
    }
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
        .is_some_and(|ips| !ips.contains(call.peer, now))
    {
        // The record keeps key_id/org_id so the control plane can raise a key-risk event.
        return Err(ApiError::KeyIpNotAllowed.into());
    }
    if !key.org.active {
        return Err(ApiError::OrgDisabled.into());
    }
    Ok(key)
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

/// What the client asked for, as the route phase resolved it.
struct Ask<'s> {
    api: ClientApi,
    group: &'s ModelGroup,
    /// The deployments the org scope, endpoint and policies permit, in priority order
    /// (the reserve phase turns them into the plan's order).
    candidates: Vec<Arc<Deployment>>,
    stream: bool,
    /// A streaming chat client asked for the usage chunk.
    client_wants_usage: bool,
    /// The units to reserve when they are not read from a JSON body (an upload's audio).
    units: Option<billing::Units>,
}

/// Route: read and parse the body, check what the client API requires, resolve the
/// model to the deployments this key may reach, and run the org's content guard.
async fn route<'s>(
    shared: &Shared,
    call: &mut Call,
    snap: &'s Snapshot,
    key: &Key,
    api: ClientApi,
    req: Request<Incoming>,
) -> Result<(Ask<'s>, Map<String, Value>), Failure> {
    let body = read_body(req, shared.config.max_body_bytes).await?;
    call.body_consumed = true;
    let doc: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(ApiError::InvalidRequest.into()),
        Err(_) => return Err(ApiError::InvalidJson.into()),
    };
    drop(body);
    // What the client API requires, before anything is reserved or sent.
    validate::check(api, &doc)?;

    let kind = match api {
        ClientApi::Embeddings => ModelKind::Embedding,
        ClientApi::Images => ModelKind::Image,
        ClientApi::Moderations => ModelKind::Moderation,
        ClientApi::Rerank => ModelKind::Rerank,
        ClientApi::Speech => ModelKind::Speech,
        // Uploads are routed by `route_upload`.
        ClientApi::Transcription | ClientApi::Translation => ModelKind::Transcription,
        ClientApi::Chat | ClientApi::Messages | ClientApi::Responses => ModelKind::Chat,
    };
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
    model_name.clone_into(&mut call.model_requested);
    if !key.may_use(model_name) && !key.may_use(&group.name) {
        return Err(ApiError::ModelNotAllowed.into());
    }
    let mut candidates = match routing::permitted(group, key, api) {
        Ok(c) => c,
        Err(routing::Unavailable::NotFound) => return Err(ApiError::ModelNotFound.into()),
        Err(routing::Unavailable::Denied(d)) => return Err(d.into()),
    };
    // Audio in a chat message goes only where it can be read: a deployment that would
    // silently drop it is not tried, and none left is the client's 400, not a 5xx.
    if protocol::has_audio_input(api, &doc) {
        candidates.retain(|d| d.provider.protocol.takes_audio());
        if candidates.is_empty() {
            return Err(validate::Invalid {
                param: "messages",
                message: "Audio input is not supported by the providers serving this model.",
            }
            .into());
        }
    }

    // The org's sensitive-content guard, on the bytes in memory: only categories and
    // counts come out. Before admission, so a blocked request holds no limit or money.
    match key.org.guard.check(&doc) {
        Verdict::Pass => {}
        Verdict::Block(message) => {
            return Err(Failure::with_message(
                ApiError::SensitiveContentBlocked,
                message,
                None,
            ))
        }
        Verdict::Flag(findings) => call.guard_flags = findings.flags(),
    }

    let ask = Ask {
        api,
        group,
        candidates,
        stream: kind == ModelKind::Chat && doc.get("stream").and_then(Value::as_bool) == Some(true),
        client_wants_usage: openai::wants_usage(&doc),
        units: None,
    };
    Ok((ask, doc))
}

/// An upload's prefix, read in the route phase, and the rest of the client's body, sent
/// in the forward phase.
struct PendingUpload {
    prefix: upload::Prefix,
    rest: Incoming,
    content_type: HeaderValue,
    declared: Option<u64>,
}

/// Route for an audio upload: only the multipart prefix up to the `model` part is read
/// (the audio stays in the client's body until it is sent upstream). The org's content
/// guard has no text to read here: audio is not screened.
async fn route_upload<'s>(
    shared: &Shared,
    call: &mut Call,
    snap: &'s Snapshot,
    key: &Key,
    api: ClientApi,
    req: Request<Incoming>,
) -> Result<(Ask<'s>, PendingUpload), Failure> {
    let cap = shared.config.max_upload_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Refused before a byte of it is read.
    if declared.is_some_and(|n| n > cap) {
        return Err(ApiError::BodyTooLarge.into());
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .filter(|v| v.to_str().ok().and_then(upload::boundary).is_some())
        .cloned()
        .ok_or(validate::Invalid {
            param: "file",
            message: "The request must be multipart/form-data with a boundary.",
        })?;
    let boundary = content_type
        .to_str()
        .ok()
        .and_then(upload::boundary)
        .unwrap_or_default()
        .to_owned();
    let mut rest = req.into_body();
    let prefix = upload::read_prefix(&mut rest, &boundary)
        .await
        .map_err(upload_refusal)?;
    let model_name = prefix.model();
    let group = snap
        .models
        .get(model_name)
        .filter(|g| g.kind == ModelKind::Transcription)
        .ok_or(ApiError::ModelNotFound)?;
    model_name.clone_into(&mut call.model_requested);
    if !key.may_use(model_name) && !key.may_use(&group.name) {
        return Err(ApiError::ModelNotAllowed.into());
    }
    let candidates = match routing::permitted(group, key, api) {
        Ok(c) => c,
        Err(routing::Unavailable::NotFound) => return Err(ApiError::ModelNotFound.into()),
        Err(routing::Unavailable::Denied(d)) => return Err(d.into()),
    };
    // The longest audio the upload can hold; a body of unknown length may reach the cap.
    let units = billing::Units {
        audio_ms: upload::reserved_audio_ms(declared.unwrap_or(cap)),
        ..billing::Units::default()
    };
    let ask = Ask {
        api,
        group,
        candidates,
        stream: false,
        client_wants_usage: false,
        units: Some(units),
    };
    Ok((
        ask,
        PendingUpload {
            prefix,
            rest,
            content_type,
            declared,
        },
    ))
}

/// A refused upload prefix as the client's error.
fn upload_refusal(r: upload::Refused) -> Failure {
    let invalid = |param, message| validate::Invalid { param, message }.into();
    match r {
        upload::Refused::ModelMissing => invalid("model", "The \"model\" field is required."),
        upload::Refused::ModelAfterFile => {
            invalid("model", "The \"model\" field must come before the file.")
        }
        upload::Refused::PrefixTooLarge => invalid(
            "model",
            "The \"model\" field must come within the first 64 KiB of the form.",
        ),
        upload::Refused::Malformed => invalid("file", "The multipart form is malformed."),
        upload::Refused::Disconnected => ApiError::ClientDisconnected.into(),
    }
}

/// The deployments to try, in order, and the output cap the reservation covers.
struct Plan {
    order: Vec<Arc<Deployment>>,
    asked_out: Option<u64>,
}

impl Plan {
    /// The output cap per choice on `d`: the client's, within the deployment's.
    fn max_out(&self, d: &Deployment) -> u64 {
        self.asked_out
            .map_or(d.max_output_tokens, |n| n.min(d.max_output_tokens))
    }
}

/// Reserve: bound the prompt and output tokens, then take the limits, budgets and the
/// balance for the dearest deployment that may end up serving (fallbacks included). The
/// reservation is settled in the settle phase.
/// Where a request is in its waits for a lease refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Not waited yet.
    First,
    /// Waited, and time is left.
    Again,
    /// `wait_ms` has passed.
    Over,
}

/// `Ok(None)` when a lease (money or slots) is short and waiting may still help: the
/// caller waits for a refill and tries again.
fn reserve(
    shared: &Shared,
    call: &mut Call,
    key: &Key,
    ask: &mut Ask<'_>,
    doc: &Map<String, Value>,
    wait: Wait,
) -> Result<Option<Plan>, Failure> {
    let api = ask.api;
    let prompt_estimate = protocol::estimate_prompt(api, doc);
    let asked_out = protocol::requested_max_out(api, doc);
    let max_out =
        |d: &Deployment| asked_out.map_or(d.max_output_tokens, |n| n.min(d.max_output_tokens));
    // Chat `n` asks for that many choices, each up to `max_out`; pass-through forwards it
    // (translations produce one choice), so the bounds below cover n outputs there.
    let choices = match api {
        ClientApi::Chat => openai::choices(doc),
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
    let org = &key.org;
    // Unit-priced APIs reserve what the request asks for (images, search units).
    let units = ask.units.unwrap_or_else(|| units::requested(api, doc));
    let (size, quality) = units::image_variant(doc);
    let reserve_on = |d: &Deployment| {
        billing::reserve_amount_at(
            prompt_estimate,
            out_bound(d),
            d.prices,
            org.price_factor_ppm,
        )
        .saturating_add(request_cost(d.request_price, org.price_factor_ppm))
        .saturating_add(billing::units_cost_at(
            units,
            d.unit_prices_for(size, quality),
            org.price_factor_ppm,
        ))
    };
    let amount = most(&ask.candidates, reserve_on);
    let tokens_bound = most(&ask.candidates, out_bound);
    // Money bounds a priced request; a free one takes a slot of a per-org cap instead.
    if amount == 0 {
        let slot = org
            .account
            .try_unpriced(billing::UNPRICED_IN_FLIGHT_PER_ORG)
            .ok_or_else(Refusal::busy)?;
        call.unpriced = Some(slot);
    }
    call.admission = match limits::admit(key, prompt_estimate.saturating_add(tokens_bound), amount)
    {
        Ok(admission) => admission,
        Err(refusal) => {
            let Some((kind, starved)) = refusal.lease_short else {
                return Err(refusal.into());
            };
            // A starved refill seen before this request waited may be stale: wait once.
            let last = wait == Wait::Over || (wait == Wait::Again && starved);
            if !last {
                return Ok(None);
            }
            // Redis answered and still granted too little: the limit is reached across
            // the gateways (for money: the cap is held or spent, as good as no balance).
            // Redis did not answer, or no refill landed in time: money fails closed, and
            // says why rather than claim the balance is gone; slots and rates fell back
            // to this gateway's share, so the refusal stands as it is.
            return Err(match &shared.shared_limits {
                Some(limits) if kind == LeaseKind::Money && (!limits.up() || !starved) => {
                    limits.balance_fallbacks.fetch_add(1, Ordering::Relaxed);
                    Refusal::shared_unavailable().into()
                }
                _ => refusal.into(),
            });
        }
    };
    call.reservation = Some((org.account.clone(), amount));
    call.price_factor_ppm = org.price_factor_ppm;
    call.prompt_estimate = prompt_estimate;
    call.units_requested = units;
    Ok(Some(Plan {
        order: routing::order(
            ask.group.strategy,
            std::mem::take(&mut ask.candidates),
            reserve_on,
        ),
        asked_out,
    }))
}

/// Forward: the request to each deployment in order until one answers with success, or
/// the upstream's error once no attempt is left.
async fn forward(
    call: &mut Call,
    snap: &Snapshot,
    ask: &Ask<'_>,
    mut doc: Map<String, Value>,
    plan: Plan,
) -> Result<Served, Failure> {
    let deadline = call.deadline();
    let mut attempts = routing::Attempts {
        deadline,
        count: 0,
        last: None,
        trace: call.trace.as_ref().map(|t| t.attempts()),
    };
    let max_out = |d: &Deployment| plan.max_out(d);
    // The image price depends on what was asked; kept before the body goes upstream.
    let variant = (ask.api == ClientApi::Images).then(|| {
        let (size, quality) = units::image_variant(&doc);
        (size.to_owned(), quality.to_owned())
    });
    let result = routing::forward(
        &snap.routing,
        &plan.order,
        ask.api,
        &mut doc,
        ask.stream,
        &max_out,
        &mut attempts,
    )
    .await;
    drop(doc);
    record_attempts(call, attempts);
    match result {
        Ok(served) => {
            // Billing uses the prices of the deployment that served.
            call.prices = served.deployment.prices;
            call.request_price = served.deployment.request_price;
            call.unit_prices = match &variant {
                Some((size, quality)) => served.deployment.unit_prices_for(size, quality),
                None => served.deployment.unit_prices,
            };
            Ok(served)
        }
        Err(NotServed::Api(e)) => Err(e.into()),
        Err(NotServed::Status { status, body, idle }) => {
            Err(upstream_failure(status, body, idle, deadline).await)
        }
    }
}

/// What the attempts leave on the call's record: their count, their trace spans, and the
/// deployment of the last one (the one that served, on success).
fn record_attempts(call: &mut Call, attempts: routing::Attempts) {
    call.attempts = attempts.count;
    if let (Some(trace), Some(a)) = (call.trace.as_mut(), attempts.trace) {
        trace.attempts = a.spans;
    }
    if let Some(d) = &attempts.last {
        call.model_served.clone_from(&d.upstream_model);
        call.provider.clone_from(&d.provider.id);
    }
}

/// Forward an upload: one attempt (the client's body cannot be sent twice), the rest of
/// it streamed through under the size cap.
async fn forward_upload(
    shared: &Shared,
    call: &mut Call,
    snap: &Snapshot,
    ask: &Ask<'_>,
    plan: Plan,
    upload: PendingUpload,
) -> Result<Served, Failure> {
    let deadline = call.deadline();
    let mut attempts = routing::Attempts {
        deadline,
        count: 0,
        last: None,
        trace: call.trace.as_ref().map(|t| t.attempts()),
    };
    let mut over = None;
    let PendingUpload {
        prefix,
        rest,
        content_type,
        declared,
    } = upload;
    let cap = shared.config.max_upload_bytes;
    let result = routing::forward_upload(
        &plan.order,
        &snap.routing,
        |d| {
            let (body, flag) = upload::Upload::new(&prefix, &d.upstream_model, rest, cap, declared);
            over = Some(flag);
            protocol::upload_request(ask.api, d, UpBody::Upload(Box::new(body)), content_type)
        },
        &mut attempts,
    )
    .await;
    drop(prefix);
    record_attempts(call, attempts);
    // However the upstream took it, an upload over the cap is the client's 413.
    if over.as_ref().is_some_and(upload::OverCap::is_set) {
        return Err(ApiError::BodyTooLarge.into());
    }
    match result {
        Ok(served) => {
            // The upstream answered the upload, so it read it: the connection stays usable.
            // Any failure before leaves the rest of the body unread, and the connection
            // is closed.
            call.body_consumed = true;
            call.prices = served.deployment.prices;
            call.request_price = served.deployment.request_price;
            call.unit_prices = served.deployment.unit_prices;
            Ok(served)
        }
        Err(NotServed::Api(e)) => Err(e.into()),
        Err(NotServed::Status { status, body, idle }) => {
            Err(upstream_failure(status, body, idle, deadline).await)
        }
    }
}

/// An upstream error status: the client gets that status and only the plain identifiers
/// of the upstream's error body.
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
    let (kind, code) = match collect(body, idle, deadline, MAX_UPSTREAM_ERROR_BYTES).await {
        Ok(bytes) => openai::error_ids(&bytes),
        Err(_) => (None, None),
    };
    Failure::upstream(status, kind, code)
}

/// What the relay phase hands to the client.
enum Reply {
    Full {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    Stream {
        upstream: Incoming,
        relay: StreamRelay,
        /// The upstream's for a byte stream; `text/event-stream` when `None`.
        content_type: Option<HeaderValue>,
        idle: Duration,
        deadline: tokio::time::Instant,
        permit: Option<Permit>,
    },
}

/// Relay: a stream is handed over as it is (metered event by event while it is sent);
/// a whole answer is collected, translated into the client's protocol when the upstream
/// speaks another, and metered.
async fn relay(
    shared: &Shared,
    call: &mut Call,
    ask: &Ask<'_>,
    served: Served,
) -> Result<Reply, Failure> {
    let d = served.deployment;
    let resp = served.response;
    let api = ask.api;
    let protocol = d.provider.protocol;
    let idle = d.provider.idle_timeout;
    let deadline = call.deadline();
    let status = resp.status();
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    call.chargeable = true;
    if ask.stream && is_sse {
        let ids = || StreamIds {
            id: call.request_id.clone(),
            model: d.upstream_model.clone(),
        };
        return Ok(Reply::Stream {
            upstream: resp.into_body(),
            relay: StreamRelay::new(api, protocol, !ask.client_wants_usage, ids),
            content_type: None,
            idle,
            deadline,
            permit: Some(served.permit),
        });
    }

    let mut content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    if api == ClientApi::Speech {
        // Audio goes to the client as it arrives, never held whole. Its price is per
        // input character, known from the request.
        call.units = call.units_requested;
        return Ok(Reply::Stream {
            upstream: resp.into_body(),
            relay: StreamRelay::raw(),
            content_type,
            idle,
            deadline,
            permit: Some(served.permit),
        });
    }
    let max = shared.config.max_upstream_body_bytes;
    let mut body = match collect(resp.into_body(), idle, deadline, max).await {
        Ok(b) => b,
        Err(e) => {
            // Nothing reached the client, so nothing is charged.
            call.chargeable = false;
            return Err(e.into());
        }
    };
    if protocol::translates(api, protocol) {
        let Some((out, reply)) = protocol::translate_reply(api, protocol, &body, &call.request_id)
        else {
            // An answer we cannot read is not delivered, so it is not charged.
            call.chargeable = false;
            return Err(ApiError::UpstreamError.into());
        };
        call.upstream_usage = reply.usage;
        if reply.usage.is_none() {
            call.relayed_tokens = reply.output_tokens();
        }
        body = out;
        content_type = Some(HeaderValue::from_static("application/json"));
    } else if api.upload() {
        // The duration the upstream heard, else the reservation's bound.
        match upload::reported_audio_ms(&body) {
            Some(audio_ms) => {
                call.units = billing::Units {
                    audio_ms,
                    ..billing::Units::default()
                };
                call.upstream_usage = Some(billing::Usage::default());
            }
            None => call.units = call.units_requested,
        }
    } else if api.unit_priced() {
        // Counts only: the images, scores and results themselves are relayed, not kept.
        match units::meter(api, &body) {
            Some(counted) => {
                call.units = counted;
                call.upstream_usage = Some(billing::Usage::default());
            }
            None => call.units = call.units_requested,
        }
    } else {
        let (usage, counted) = protocol::meter_passthrough(api, &body);
        call.upstream_usage = usage;
        call.relayed_tokens = counted;
    }
    Ok(Reply::Full {
        status,
        content_type,
        body,
    })
}

/// The one place an outcome becomes a response: the reply, or the failure in the
/// client's protocol. The call travels with the body, which settles and records it.
fn respond(
    shared: &Shared,
    mut call: Call,
    endpoint: Endpoint,
    outcome: Result<Reply, Failure>,
) -> Response<RespBody> {
    call.mark_response_start();
    match outcome {
        Ok(Reply::Full {
            status,
            content_type,
            body,
        }) => {
            let mut resp = Response::new(RespBody::from(body));
            *resp.status_mut() = status;
            if let Some(ct) = content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            recorded(resp, call, status.as_u16(), None)
        }
        Ok(Reply::Stream {
            upstream,
            relay,
            content_type,
            idle,
            deadline,
            permit,
        }) => {
            call.streamed = true;
            let limits = StreamLimits {
                idle,
                deadline,
                max_event_bytes: shared.config.max_upstream_event_bytes,
            };
            let mut resp = Response::new(RespBody::Stream(Box::new(StreamBody::new(
                upstream, relay, limits, permit, call,
            ))));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                content_type.unwrap_or(HeaderValue::from_static("text/event-stream")),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        Err(failure) => {
            call.rate_limited = failure.limited();
            let resp = failure.response(endpoint == Endpoint::Messages);
            recorded(resp, call, failure.status.as_u16(), Some(failure.error))
        }
    }
}

/// Attach the call to a whole response: it is settled and recorded when the body has
/// been handed over (or dropped), with this status and error.
fn recorded(
    resp: Response<RespBody>,
    mut call: Call,
    status: u16,
    err: Option<ApiError>,
) -> Response<RespBody> {
    let (parts, body) = resp.into_parts();
    let body = match body {
        RespBody::Full(bytes) => {
            RespBody::Recorded(Box::new(RecordedBody::new(bytes, status, err, call)))
        }
        other => {
            call.finish(status, err);
            other
        }
    };
    Response::from_parts(parts, body)
}

/// Whether the request announces a body (a non-zero length, or chunked).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

fn now_unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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

/// The names (and aliases) the key can reach: allowed for it, with at least one
/// deployment its org sees and both policies permit. Anthropic's list shape when the
/// caller is the anthropic SDK (it sends `anthropic-version`).
///
/// Each entry also carries `processors`: the vendor, region and data-handling flags of
/// every provider that may serve the key for that name (SDKs ignore unknown fields).
fn models_list(snap: &Snapshot, key: &Key, anthropic: bool) -> Reply {
    let names = snap.model_order.iter().filter_map(|name| {
        let group = snap.models.get(name.as_str())?;
        let usable = (key.may_use(name) || key.may_use(&group.name)) && routing::listed(group, key);
        usable.then(|| (name, processors(group, key)))
    });
    let body = if anthropic {
        let data: Vec<Value> = names
            .map(|(name, processors)| {
                serde_json::json!({"type": "model", "id": name, "display_name": name,
                                   "created_at": "1970-01-01T00:00:00Z",
                                   "processors": processors})
            })
            .collect();
        let first = data.first().and_then(|m| m.get("id")).cloned();
        let last = data.last().and_then(|m| m.get("id")).cloned();
        serde_json::json!({"data": data, "has_more": false, "first_id": first, "last_id": last})
    } else {
        let data: Vec<Value> = names
            .map(|(name, processors)| {
                serde_json::json!({"id": name, "object": "model", "created": 0,
                                   "owned_by": "onetoken", "processors": processors})
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

/// [`routing::processors`] as JSON objects.
fn processors(group: &ModelGroup, key: &Key) -> Vec<Value> {
    routing::processors(group, key)
        .into_iter()
        .map(|p| {
            serde_json::json!({"vendor": p.vendor, "region": p.region,
                               "trains_on_data": p.trains_on_data,
                               "zero_retention": p.zero_retention})
        })
        .collect()
}

/// The largest `f` over the candidate deployments (zero when there are none): what must be
/// held when any of them may serve.
#[inline]
fn most<T: Ord + Default>(candidates: &[Arc<Deployment>], f: impl Fn(&Deployment) -> T) -> T {
    candidates.iter().map(|d| f(d)).max().unwrap_or_default()
}
