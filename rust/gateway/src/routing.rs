//! Routing: which deployments may serve a request (org scope, endpoint, policies), in
//! which order (the route's strategy), and the attempt loop that falls back and retries
//! before anything reached the client.
//!
//! Live state (circuit breakers and in-flight counts per provider, latency averages per
//! deployment) lives outside the snapshot, keyed by provider id and deployment, so it
//! survives config swaps.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use std::collections::HashMap;

use crate::billing::{Prices, UnitPrices};
use crate::error::ApiError;
use crate::policy::{self, Denial, Scope};
use crate::protocol::upload::UploadError;
use crate::protocol::{self, auth_headers, ClientApi, Endpoints, Protocol};
use crate::snapshot::{
    Deployment, Dropped, Key, ModelDoc, ModelGroup, ModelKind, Provider, ProviderDoc,
};
use crate::trace::AttemptTrace;
use crate::upstream::{self, AddressScope, ClientCache, UpBody};

/// How a route orders its deployments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Lowest `priority` first; the rest are fallbacks in order.
    #[default]
    Priority,
    /// Random by `weight`; the rest are fallbacks (drawn by weight as well).
    Weighted,
    /// Cheapest upper-bound cost for this request first.
    LowestPrice,
    /// Lowest moving average of time to first byte first (unmeasured ones first, so
    /// every deployment gets measured).
    LowestLatency,
}

/// `routes[]` of the snapshot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDoc {
    /// The model name this route applies to.
    pub name: String,
    /// Ordering of its deployments.
    #[serde(default)]
    pub strategy: Strategy,
    /// Extra names clients may ask for.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `routing` of the snapshot. The snapshot leaves it out while the platform's settings equal
/// these defaults, so the control plane's (`gateway_schemas.Routing`) must be the same:
/// `routing_defaults_json` lets a test compare them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingDoc {
    /// Upstream attempts per request, the first included.
    pub max_attempts: u32,
    /// No new attempt starts after this long since the first.
    pub retry_deadline_ms: u64,
    /// Pause before re-trying a deployment already tried (doubles each round).
    pub backoff_ms: u64,
    /// Consecutive failures that open a provider's circuit (0: never).
    pub breaker_failures: u32,
    /// How long an open circuit refuses traffic before one probe is let through.
    pub breaker_open_ms: u64,
}

impl Default for RoutingDoc {
    fn default() -> Self {
        RoutingDoc {
            max_attempts: 3,
            retry_deadline_ms: 15_000,
            backoff_ms: 50,
            breaker_failures: 5,
            breaker_open_ms: 30_000,
        }
    }
}

/// The routing defaults as a JSON object.
pub fn routing_defaults_json() -> Result<String, serde_json::Error> {
    serde_json::to_string(&RoutingDoc::default())
}

/// Compiled `routing`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoutingConfig {
    max_attempts: u32,
    retry_deadline: Duration,
    backoff: Duration,
    breaker_failures: u32,
    breaker_open_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig::from(&RoutingDoc::default())
    }
}

impl From<&RoutingDoc> for RoutingConfig {
    fn from(d: &RoutingDoc) -> Self {
        RoutingConfig {
            max_attempts: d.max_attempts.clamp(1, 255),
            retry_deadline: Duration::from_millis(d.retry_deadline_ms),
            backoff: Duration::from_millis(d.backoff_ms),
            breaker_failures: d.breaker_failures,
            breaker_open_ms: d.breaker_open_ms.max(1),
        }
    }
}

/// Milliseconds since the first call, never 0 (0 means "closed" in the breaker).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// Live state of one provider.
#[derive(Debug, Default)]
pub(crate) struct ProviderState {
    failures: AtomicU32,
    /// 0: closed. Otherwise the instant (`now_ms`) until which the circuit refuses.
    open_until: AtomicU64,
    in_flight: AtomicU32,
}

impl ProviderState {
    /// Whether a request may go to this provider now. Closed: yes. Open: no until
    /// `open_ms` passed; then exactly one caller wins the half-open probe (the circuit is
    /// re-armed for everyone else, so a probe that never reports only delays the next).
    fn allow(&self, open_ms: u64) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = now_ms();
        if now < until {
            return false;
        }
        self.open_until
            .compare_exchange(until, now + open_ms, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    fn success(&self) {
        // Loads first: the common healthy case writes nothing (no cache-line traffic).
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Release);
        }
    }

    fn failure(&self, cfg: &RoutingConfig) {
        if cfg.breaker_failures == 0 {
            return;
        }
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        // A failed half-open probe re-opens at once.
        if n >= cfg.breaker_failures || self.open_until.load(Ordering::Acquire) != 0 {
            self.open_until
                .store(now_ms() + cfg.breaker_open_ms, Ordering::Release);
        }
    }

    fn try_acquire(self: &Arc<Self>, max: Option<u32>) -> Option<Permit> {
        let Some(max) = max else {
            return Some(Permit(None));
        };
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit(Some(self.clone())))
    }
}

/// One in-flight slot of a provider with `max_concurrency`; released on drop (the end of
/// the response, streams included).
pub(crate) struct Permit(Option<Arc<ProviderState>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Moving average of time to first byte of one deployment, microseconds (0: unmeasured).
#[derive(Debug, Default)]
pub(crate) struct DeploymentStats {
    ttfb_ewma_us: AtomicU64,
}

impl DeploymentStats {
    /// EWMA with alpha 1/4: recent enough to follow a degrading upstream, smooth enough
    /// to ignore one slow answer. Racing updates may lose a sample, which is harmless.
    fn observe(&self, d: Duration) {
        let sample = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.ttfb_ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old.saturating_mul(3).saturating_add(sample)) / 4
        };
        self.ttfb_ewma_us.store(new.max(1), Ordering::Relaxed);
    }

    pub(crate) fn ttfb_us(&self) -> u64 {
        self.ttfb_ewma_us.load(Ordering::Relaxed)
    }
}

/// Why no deployment is available to a request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unavailable {
    /// The name has no deployment this key's org can see for this endpoint.
    NotFound,
    /// Deployments exist, and the first one's refusal is named.
    Denied(Denial),
}

/// The deployments of `group` this key may use for `api`, in priority order.
pub(crate) fn permitted(
    group: &ModelGroup,
    key: &Key,
    api: ClientApi,
) -> Result<Vec<Arc<Deployment>>, Unavailable> {
    let org = &key.org;
    let mut denial = None;
    let mut out = Vec::with_capacity(group.deployments.len());
    for d in &group.deployments {
        if !d.visible_to(&org.id) || !api.served_by(d.provider.protocol) {
            continue;
        }
        match policy::permits(&org.policy, &key.policy, d) {
            Ok(()) => out.push(d.clone()),
            // Name the rule closest to success: a key rule means the org would have
            // allowed that deployment, so it is the one the caller can act on.
            Err(e) => match denial {
                None => denial = Some(e),
                Some(prev) if prev.scope == Scope::Org && e.scope == Scope::Key => denial = Some(e),
                Some(_) => {}
            },
        }
    }
    if out.is_empty() {
        return Err(denial.map_or(Unavailable::NotFound, Unavailable::Denied));
    }
    Ok(out)
}

/// The deployments of `group` that may serve `key`: visible to its org and permitted by
/// both policies.
fn reachable<'a>(group: &'a ModelGroup, key: &'a Key) -> impl Iterator<Item = &'a Deployment> {
    let org = &key.org;
    group
        .deployments
        .iter()
        .map(|d| &**d)
        .filter(|d| d.visible_to(&org.id) && policy::permits(&org.policy, &key.policy, d).is_ok())
}

/// Whether `key` may reach `group` through any endpoint (for `/v1/models`).
pub(crate) fn listed(group: &ModelGroup, key: &Key) -> bool {
    reachable(group, key).next().is_some()
}

/// Who may process a request of `key` for `group`: the distinct data-handling facts
/// (vendor, region, training, zero retention) of the providers that may serve it, in
/// priority order. `/v1/models` shows them so that a developer knows before calling.
pub(crate) fn processors<'a>(group: &'a ModelGroup, key: &'a Key) -> Vec<&'a Provider> {
    let mut out: Vec<&Provider> = Vec::new();
    for d in reachable(group, key) {
        let p = &*d.provider;
        let same = |q: &&Provider| {
            q.vendor == p.vendor
                && q.region == p.region
                && q.trains_on_data == p.trains_on_data
                && q.zero_retention == p.zero_retention
        };
        if !out.iter().any(same) {
            out.push(p);
        }
    }
    out
}

/// Order `candidates` (in priority order) by the route's strategy. `cost` is the
/// upper-bound cost of this request on a deployment.
pub(crate) fn order(
    strategy: Strategy,
    mut candidates: Vec<Arc<Deployment>>,
    cost: impl Fn(&Deployment) -> i64,
) -> Vec<Arc<Deployment>> {
    if candidates.len() < 2 {
        return candidates;
    }
    match strategy {
        Strategy::Priority => {}
        Strategy::LowestPrice => candidates.sort_by_cached_key(|d| cost(d)),
        Strategy::LowestLatency => candidates.sort_by_key(|d| d.stats.ttfb_us()),
        Strategy::Weighted => {
            // Successive weighted draws without replacement.
            let mut rng = rand::thread_rng();
            let mut rest = candidates;
            let mut out = Vec::with_capacity(rest.len());
            while !rest.is_empty() {
                let total: u64 = rest.iter().map(|d| u64::from(d.weight)).sum();
                let i = if total == 0 {
                    0
                } else {
                    let mut pick = rng.gen_range(0..total);
                    rest.iter()
                        .position(|d| {
                            let w = u64::from(d.weight);
                            if pick < w {
                                true
                            } else {
                                pick -= w;
                                false
                            }
                        })
                        .unwrap_or(0)
                };
                out.push(rest.remove(i));
            }
            return out;
        }
    }
    candidates
}

/// The upstream answered with success headers.
pub(crate) struct Served {
    pub(crate) deployment: Arc<Deployment>,
    pub(crate) response: Response<Incoming>,
    pub(crate) permit: Permit,
}

/// Every attempt failed, or the last failure may not be retried.
pub(crate) enum NotServed {
    Api(ApiError),
    /// The upstream's error status; its body is only read for safe identifiers.
    Status {
        status: StatusCode,
        body: Incoming,
        idle: Duration,
    },
}

/// The attempt loop's time bound, and what it did, for the record.
pub(crate) struct Attempts {
    /// The request's whole upstream deadline: no wait for response headers outlasts it.
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) count: u8,
    /// The deployment of the last attempt (the one that served, on success).
    pub(crate) last: Option<Arc<Deployment>>,
    /// A traced request's attempt spans and the context sent upstream.
    pub(crate) trace: Option<AttemptTrace>,
}

fn retryable_status(s: StatusCode) -> bool {
    // A loop (a provider pointing back at a gateway) answers the same on every attempt.
    s == StatusCode::TOO_MANY_REQUESTS || (s.is_server_error() && s != StatusCode::LOOP_DETECTED)
}

/// Try `order` until one serves. A failure may be retried only before any byte reached
/// the client, which is always the case here (this returns at the first success
/// headers): connect errors, 429 and 5xx are retried, on the next deployment at once or
/// on one already tried after a backoff, within `max_attempts` and the deadline. A
/// first-byte timeout is not retried (the upstream may still be working on it).
pub(crate) async fn forward(
    cfg: &RoutingConfig,
    order: &[Arc<Deployment>],
    api: ClientApi,
    doc: &mut Map<String, Value>,
    stream: bool,
    max_out: &(dyn Fn(&Deployment) -> u64 + Sync),
    attempts: &mut Attempts,
) -> Result<Served, NotServed> {
    let n = order.len();
    let start = Instant::now();
    // Deployments already tried, as a bitmask (no allocation on the hot path); beyond
    // 128 candidates a re-try simply skips the backoff.
    let mut tried: u128 = 0;
    let mut last: Option<NotServed> = None;
    let mut busy = false;
    let mut skipped_in_a_row = 0usize;
    let mut pos = 0usize;
    while u32::from(attempts.count) < cfg.max_attempts && skipped_in_a_row < n {
        let i = pos % n;
        let round = pos / n;
        pos += 1;
        let Some(d) = order.get(i) else { break };
        let provider = &d.provider;
        let Some(permit) = provider.state.try_acquire(provider.max_concurrency) else {
            busy = true;
            skipped_in_a_row += 1;
            continue;
        };
        if !provider.state.allow(cfg.breaker_open_ms) {
            skipped_in_a_row += 1;
            continue;
        }
        if attempts.count > 0 {
            let was_tried = i < 128 && tried & (1u128 << i) != 0;
            let wait = if was_tried {
                let exp = u32::try_from(round.saturating_sub(1))
                    .unwrap_or(u32::MAX)
                    .min(8);
                cfg.backoff.saturating_mul(1 << exp)
            } else {
                Duration::ZERO
            };
            if start.elapsed() + wait > cfg.retry_deadline {
                break;
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        skipped_in_a_row = 0;
        if i < 128 {
            tried |= 1u128 << i;
        }
        attempts.count = attempts.count.saturating_add(1);
        attempts.last = Some(d.clone());
        let mut req =
            protocol::upstream_request(api, doc, d, stream, max_out(d)).map_err(NotServed::Api)?;
        if let Some(trace) = attempts.trace.as_mut() {
            trace.start(&mut req, &provider.id, &d.upstream_model);
        }
        let sent = Instant::now();
        let first_byte = attempts
            .deadline
            .min(tokio::time::Instant::now() + provider.first_byte_timeout);
        let result =
            tokio::time::timeout_at(first_byte, provider.client.request(req.map(UpBody::from)))
                .await;
        if let Some(trace) = attempts.trace.as_mut() {
            trace.end(match &result {
                Err(_) => Err(ApiError::UpstreamTimeout.code()),
                Ok(Err(e)) => Err(upstream::classify(e).code()),
                Ok(Ok(resp)) => Ok(resp.status().as_u16()),
            });
        }
        match result {
            Err(_) => {
                provider.state.failure(cfg);
                return Err(NotServed::Api(ApiError::UpstreamTimeout));
            }
            Ok(Err(e)) => {
                let err = upstream::classify(&e);
                // A refused address is the provider's configuration, not its health.
                if err != ApiError::UpstreamAddressRefused {
                    provider.state.failure(cfg);
                }
                if !e.is_connect() {
                    return Err(NotServed::Api(err));
                }
                last = Some(NotServed::Api(err));
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                if status.is_success() {
                    provider.state.success();
                    d.stats.observe(sent.elapsed());
                    return Ok(Served {
                        deployment: d.clone(),
                        response: resp,
                        permit,
                    });
                }
                if status.is_server_error() {
                    provider.state.failure(cfg);
                } else {
                    // It answered: alive, whatever it thought of the request.
                    provider.state.success();
                }
                let failure = NotServed::Status {
                    status,
                    body: resp.into_body(),
                    idle: provider.idle_timeout,
                };
                if !retryable_status(status) {
                    return Err(failure);
                }
                last = Some(failure);
            }
        }
    }
    Err(match last {
        Some(f) => f,
        None if busy => NotServed::Api(ApiError::UpstreamBusy),
        // Every circuit open: nothing was tried.
        None => NotServed::Api(ApiError::UpstreamUnreachable),
    })
}

/// An audio upload to the first deployment in `order` that can take it now: one attempt,
/// since the upload is streamed from the client and cannot be sent twice. A deployment
/// skipped (busy, circuit open) was not attempted, so the next one may take it.
pub(crate) async fn forward_upload(
    order: &[Arc<Deployment>],
    cfg: &RoutingConfig,
    request: impl FnOnce(&Deployment) -> Result<Request<UpBody>, ApiError>,
    attempts: &mut Attempts,
) -> Result<Served, NotServed> {
    let mut busy = false;
    let chosen = order.iter().find_map(|d| {
        let provider = &d.provider;
        let Some(permit) = provider.state.try_acquire(provider.max_concurrency) else {
            busy = true;
            return None;
        };
        provider
            .state
            .allow(cfg.breaker_open_ms)
            .then_some((d, permit))
    });
    let Some((d, permit)) = chosen else {
        return Err(NotServed::Api(if busy {
            ApiError::UpstreamBusy
        } else {
            ApiError::UpstreamUnreachable
        }));
    };
    let provider = &d.provider;
    attempts.count = 1;
    attempts.last = Some(d.clone());
    let mut req = request(d).map_err(NotServed::Api)?;
    if let Some(trace) = attempts.trace.as_mut() {
        trace.start(&mut req, &provider.id, &d.upstream_model);
    }
    let sent = Instant::now();
    let first_byte = attempts
        .deadline
        .min(tokio::time::Instant::now() + provider.first_byte_timeout);
    let result = tokio::time::timeout_at(first_byte, provider.client.request(req)).await;
    if let Some(trace) = attempts.trace.as_mut() {
        trace.end(match &result {
            Err(_) => Err(ApiError::UpstreamTimeout.code()),
            Ok(Err(e)) => Err(upstream::classify(e).code()),
            Ok(Ok(resp)) => Ok(resp.status().as_u16()),
        });
    }
    match result {
        Err(_) => {
            provider.state.failure(cfg);
            Err(NotServed::Api(ApiError::UpstreamTimeout))
        }
        Ok(Err(e)) => {
            // The client's body failing (gone, over the cap) says nothing of the provider.
            if let Some(client) = upload_failure(&e) {
                return Err(NotServed::Api(match client {
                    UploadError::TooLarge => ApiError::BodyTooLarge,
                    UploadError::Client => ApiError::ClientDisconnected,
                }));
            }
            let err = upstream::classify(&e);
            if err != ApiError::UpstreamAddressRefused {
                provider.state.failure(cfg);
            }
            Err(NotServed::Api(err))
        }
        Ok(Ok(resp)) => {
            let status = resp.status();
            if status.is_server_error() {
                provider.state.failure(cfg);
            } else {
                provider.state.success();
            }
            if !status.is_success() {
                return Err(NotServed::Status {
                    status,
                    body: resp.into_body(),
                    idle: provider.idle_timeout,
                });
            }
            d.stats.observe(sent.elapsed());
            Ok(Served {
                deployment: d.clone(),
                response: resp,
                permit,
            })
        }
    }
}

/// The upload error that failed an upstream request, if that is what failed it.
fn upload_failure<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e UploadError> {
    let mut at = Some(e);
    while let Some(err) = at {
        if let Some(u) = err.downcast_ref::<UploadError>() {
            return Some(u);
        }
        at = err.source();
    }
    None
}

/// Model names and aliases to their groups, and the `/v1/models` listing order.
pub(crate) type Catalog = (HashMap<String, Arc<ModelGroup>>, Vec<String>);

/// Providers, deployments and routes of a snapshot: model names (and aliases) to the
/// deployments that can serve them, plus the listing order for `/v1/models`. An entry
/// that does not hold up is left out and added to `report`; what depends on it (the
/// models of a dropped provider, the route of a dropped model) goes with it.
pub(crate) fn compile_catalog(
    provider_docs: Vec<ProviderDoc>,
    model_docs: Vec<ModelDoc>,
    route_docs: Vec<RouteDoc>,
    clients: &ClientCache,
    report: &mut Vec<Dropped>,
) -> Catalog {
    let mut providers: HashMap<String, (Arc<Provider>, Option<String>, String)> = HashMap::new();
    for p in provider_docs {
        match compile_provider(&p, clients, &providers) {
            Ok(provider) => {
                providers.insert(
                    p.id.clone(),
                    (Arc::new(provider), p.api_version, p.base_url),
                );
            }
            Err((field, reason)) => report.push(Dropped::new("provider", &p.id, field, reason)),
        }
    }

    let mut groups: Vec<(String, ModelKind, Vec<Arc<Deployment>>)> = Vec::new();
    for m in model_docs {
        let compiled = compile_model(&m, &providers, clients);
        let group = groups.iter_mut().find(|g| g.0 == m.name);
        match (compiled, group) {
            (Err((field, reason)), _) => {
                report.push(Dropped::new("model", &m.name, field, reason));
            }
            (Ok((kind, _)), Some(g)) if g.1 != kind => {
                // Every deployment of a name must have the kind of the first one.
                report.push(Dropped::new("model", &m.name, "kind", "kind_mismatch"));
            }
            (Ok((_, d)), Some(g)) => g.2.push(d),
            (Ok((kind, d)), None) => groups.push((m.name, kind, vec![d])),
        }
    }

    let mut routes: HashMap<String, RouteDoc> = HashMap::new();
    for r in route_docs {
        if !groups.iter().any(|g| g.0 == r.name) {
            report.push(Dropped::new("route", &r.name, "name", "unknown_model"));
            continue;
        }
        if routes.contains_key(&r.name) {
            report.push(Dropped::new("route", &r.name, "name", "duplicate"));
            continue;
        }
        routes.insert(r.name.clone(), r);
    }

    let mut models = HashMap::with_capacity(groups.len());
    let mut order = Vec::with_capacity(groups.len());
    let mut aliases = Vec::new();
    for (name, kind, mut deployments) in groups {
        // Stable: equal priorities keep snapshot order.
        deployments.sort_by_key(|d| d.priority);
        let route = routes.get(&name);
        let group = Arc::new(ModelGroup {
            name: name.clone(),
            kind,
            strategy: route.map_or(Strategy::Priority, |r| r.strategy),
            deployments,
        });
        for alias in route.map(|r| r.aliases.as_slice()).unwrap_or_default() {
            aliases.push((alias.clone(), group.clone()));
        }
        models.insert(name.clone(), group);
        order.push(name);
    }
    for (alias, group) in aliases {
        if models.contains_key(&alias) {
            report.push(Dropped::new("alias", &alias, "aliases", "name_taken"));
            continue;
        }
        models.insert(alias.clone(), group);
        order.push(alias);
    }
    (models, order)
}

/// Why an entry is left out: the field at fault and a reason code.
type Fault = (&'static str, &'static str);

fn compile_provider(
    p: &ProviderDoc,
    clients: &ClientCache,
    known: &HashMap<String, (Arc<Provider>, Option<String>, String)>,
) -> Result<Provider, Fault> {
    if known.contains_key(&p.id) {
        return Err(("id", "duplicate"));
    }
    let protocol = Protocol::parse(&p.protocol).ok_or(("protocol", "unknown_protocol"))?;
    // Validates the base URL once for the provider (deployments build their paths).
    Endpoints::build(protocol, &p.base_url, p.api_version.as_deref(), "probe")
        .map_err(|_| ("base_url", "invalid_url"))?;
    if auth_headers(protocol, p.api_key.as_deref(), None).is_err() {
        return Err(("api_key", "invalid_header_value"));
    }
    let auth_headers = auth_headers(protocol, p.api_key.as_deref(), p.api_version.as_deref())
        .map_err(|_| ("api_version", "invalid_header_value"))?;
    // Org-scoped providers never get the operator's private-address allow-list.
    let scope = if p.org_id.is_some() {
        AddressScope::Org
    } else {
        AddressScope::Platform
    };
    let client = clients
        .get(Duration::from_millis(p.connect_timeout_ms.max(1)), scope)
        .map_err(|_| ("connect_timeout_ms", "client_unavailable"))?;
    Ok(Provider {
        protocol,
        auth_headers,
        vendor: p.vendor.to_ascii_lowercase(),
        region: p.region.to_ascii_lowercase(),
        trains_on_data: p.trains_on_data,
        zero_retention: p.zero_retention,
        max_concurrency: p.max_concurrency,
        first_byte_timeout: Duration::from_millis(p.first_byte_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(p.idle_timeout_ms.max(1)),
        client,
        state: clients.provider_state(&p.id),
        id: p.id.clone(),
    })
}

fn compile_model(
    m: &ModelDoc,
    providers: &HashMap<String, (Arc<Provider>, Option<String>, String)>,
    clients: &ClientCache,
) -> Result<(ModelKind, Arc<Deployment>), Fault> {
    let kind = match m.kind.as_str() {
        "chat" => ModelKind::Chat,
        "embedding" => ModelKind::Embedding,
        "image" => ModelKind::Image,
        "moderation" => ModelKind::Moderation,
        "rerank" => ModelKind::Rerank,
        "speech" => ModelKind::Speech,
        "transcription" => ModelKind::Transcription,
        _ => return Err(("kind", "unknown_kind")),
    };
    for (field, price) in [
        ("input_price", m.input_price),
        ("output_price", m.output_price),
        ("cached_input_price", m.cached_input_price),
        ("request_price", m.request_price),
        ("audio_second_price", m.audio_second_price),
        ("character_price", m.character_price),
        ("search_unit_price", m.search_unit_price),
    ]
    .into_iter()
    .chain(m.image_prices.values().map(|p| ("image_prices", *p)))
    {
        if price < 0 {
            return Err((field, "negative_price"));
        }
    }
    let (provider, api_version, base_url) = providers
        .get(&m.provider_id)
        .ok_or(("provider_id", "unknown_provider"))?;
    let api = match kind {
        ModelKind::Chat => ClientApi::Chat,
        ModelKind::Embedding => ClientApi::Embeddings,
        ModelKind::Image => ClientApi::Images,
        ModelKind::Moderation => ClientApi::Moderations,
        ModelKind::Rerank => ClientApi::Rerank,
        ModelKind::Speech => ClientApi::Speech,
        // Translations are served by the same models and protocols.
        ModelKind::Transcription => ClientApi::Transcription,
    };
    if !api.served_by(provider.protocol) {
        return Err(("kind", "not_served_by_protocol"));
    }
    let endpoints = Endpoints::build(
        provider.protocol,
        base_url,
        api_version.as_deref(),
        &m.upstream_model,
    )
    .map_err(|_| ("upstream_model", "invalid_url"))?;
    let deployment = Deployment {
        stats: clients.deployment_stats(&provider.id, &m.upstream_model),
        name: m.name.clone(),
        prices: Prices {
            input: m.input_price,
            output: m.output_price,
            cached_input: m.cached_input_price,
        },
        request_price: m.request_price,
        unit_prices: UnitPrices {
            image: 0,
            audio_second: m.audio_second_price,
            character: m.character_price,
            search_unit: m.search_unit_price,
        },
        image_prices: m
            .image_prices
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        max_output_tokens: m.max_output_tokens,
        org_id: m.org_id.clone(),
        priority: m.priority,
        weight: m.weight,
        provider: provider.clone(),
        endpoints,
        upstream_model: m.upstream_model.clone(),
    };
    Ok((kind, Arc::new(deployment)))
}
