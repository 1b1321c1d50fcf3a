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

use http::{Response, StatusCode};
use hyper::body::Incoming;
use rand::Rng;
use serde::Deserialize;
use serde_json::{Map, Value};

use std::collections::HashMap;

use crate::billing::Prices;
use crate::error::{ApiError, Error};
use crate::policy::{self, Denial, Scope};
use crate::protocol::{self, auth_headers, ClientApi, Endpoints, Protocol};
use crate::snapshot::{Deployment, Key, ModelDoc, ModelGroup, ModelKind, Provider, ProviderDoc};
use crate::upstream::{self, AddressScope, ClientCache};

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

/// `routing` of the snapshot.
#[derive(Debug, Clone, Deserialize)]
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

/// Whether `key` may reach `group` through any endpoint (for `/v1/models`).
pub(crate) fn listed(group: &ModelGroup, key: &Key) -> bool {
    let org = &key.org;
    group
        .deployments
        .iter()
        .any(|d| d.visible_to(&org.id) && policy::permits(&org.policy, &key.policy, d).is_ok())
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

/// What the attempt loop did, for the record.
pub(crate) struct Attempts {
    pub(crate) count: u8,
    /// The deployment of the last attempt (the one that served, on success).
    pub(crate) last: Option<Arc<Deployment>>,
}

fn retryable_status(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
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
        let req =
            protocol::upstream_request(api, doc, d, stream, max_out(d)).map_err(NotServed::Api)?;
        let sent = Instant::now();
        let result =
            tokio::time::timeout(provider.first_byte_timeout, provider.client.request(req)).await;
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

/// Model names and aliases to their groups, and the `/v1/models` listing order.
pub(crate) type Catalog = (HashMap<String, Arc<ModelGroup>>, Vec<String>);

/// Providers, deployments and routes of a snapshot: model names (and aliases) to the
/// deployments that can serve them, plus the listing order for `/v1/models`.
pub(crate) fn compile_catalog(
    provider_docs: Vec<ProviderDoc>,
    model_docs: Vec<ModelDoc>,
    route_docs: Vec<RouteDoc>,
    clients: &ClientCache,
) -> Result<Catalog, Error> {
    let mut providers: HashMap<String, (Arc<Provider>, Option<String>, String)> = HashMap::new();
    for p in provider_docs {
        let cfg = |msg: &str| Error::Config(format!("provider {:?}: {msg}", p.id));
        let protocol = Protocol::parse(&p.protocol).ok_or_else(|| {
            cfg("protocol must be \"openai\", \"azure\", \"anthropic\" or \"gemini\"")
        })?;
        // Validates the base URL once for the provider (deployments build their paths).
        Endpoints::build(protocol, &p.base_url, p.api_version.as_deref(), "probe")
            .map_err(|e| cfg(&e))?;
        let auth_headers = auth_headers(protocol, p.api_key.as_deref(), p.api_version.as_deref())
            .map_err(|e| cfg(&e))?;
        let provider = Provider {
            protocol,
            auth_headers,
            vendor: p.vendor.to_ascii_lowercase(),
            region: p.region.to_ascii_lowercase(),
            trains_on_data: p.trains_on_data,
            zero_retention: p.zero_retention,
            max_concurrency: p.max_concurrency,
            first_byte_timeout: Duration::from_millis(p.first_byte_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(p.idle_timeout_ms.max(1)),
            client: clients.get(
                Duration::from_millis(p.connect_timeout_ms.max(1)),
                if p.org_id.is_some() {
                    AddressScope::Org
                } else {
                    AddressScope::Platform
                },
            )?,
            state: clients.provider_state(&p.id),
            id: p.id.clone(),
        };
        let entry = (Arc::new(provider), p.api_version, p.base_url);
        if providers.insert(p.id.clone(), entry).is_some() {
            return Err(Error::Config(format!("duplicate provider id {:?}", p.id)));
        }
    }

    let mut groups: Vec<(String, ModelKind, Vec<Arc<Deployment>>)> = Vec::new();
    for m in model_docs {
        let cfg = |msg: String| Error::Config(format!("model {:?}: {msg}", m.name));
        let kind = match m.kind.as_str() {
            "chat" => ModelKind::Chat,
            "embedding" => ModelKind::Embedding,
            _ => return Err(cfg("kind must be \"chat\" or \"embedding\"".into())),
        };
        if m.input_price < 0
            || m.output_price < 0
            || m.cached_input_price < 0
            || m.request_price < 0
        {
            return Err(cfg("prices must be >= 0".into()));
        }
        let (provider, api_version, base_url) = providers
            .get(&m.provider_id)
            .ok_or_else(|| cfg(format!("unknown provider_id {:?}", m.provider_id)))?;
        let api = match kind {
            ModelKind::Chat => ClientApi::Chat,
            ModelKind::Embedding => ClientApi::Embeddings,
        };
        if !api.served_by(provider.protocol) {
            return Err(cfg(format!(
                "provider {:?} cannot serve {} models",
                m.provider_id, m.kind
            )));
        }
        let endpoints = Endpoints::build(
            provider.protocol,
            base_url,
            api_version.as_deref(),
            &m.upstream_model,
        )
        .map_err(cfg)?;
        let deployment = Arc::new(Deployment {
            stats: clients.deployment_stats(&provider.id, &m.upstream_model),
            name: m.name.clone(),
            prices: Prices {
                input: m.input_price,
                output: m.output_price,
                cached_input: m.cached_input_price,
            },
            request_price: m.request_price,
            max_output_tokens: m.max_output_tokens,
            org_id: m.org_id,
            priority: m.priority,
            weight: m.weight,
            provider: provider.clone(),
            endpoints,
            upstream_model: m.upstream_model,
        });
        match groups.iter_mut().find(|g| g.0 == m.name) {
            Some(g) if g.1 != kind => {
                return Err(cfg(
                    "every deployment of a name must have the same kind".into()
                ))
            }
            Some(g) => g.2.push(deployment),
            None => groups.push((m.name, kind, vec![deployment])),
        }
    }

    let mut routes: HashMap<String, RouteDoc> = HashMap::new();
    for r in route_docs {
        if !groups.iter().any(|g| g.0 == r.name) {
            return Err(Error::Config(format!(
                "route {:?}: no model of that name",
                r.name
            )));
        }
        let name = r.name.clone();
        if routes.insert(name.clone(), r).is_some() {
            return Err(Error::Config(format!("duplicate route {name:?}")));
        }
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
        if models.insert(alias.clone(), group).is_some() {
            return Err(Error::Config(format!(
                "alias {alias:?} is already a model name or alias"
            )));
        }
        order.push(alias);
    }
    Ok((models, order))
}
