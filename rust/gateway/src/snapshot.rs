//! Config snapshot: the JSON the control plane pushes, and the immutable structure it is
//! compiled into. Requests read one `Arc<Snapshot>` for their whole life.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::billing::{Budgets, OrgAccount, Prices, UnitPrices, UsageMark, PPM_ONE};
use crate::error::Error;
use crate::guard::CategorySet;
use crate::ipset::{Cidr, IpSet};
use crate::limits::{LimitState, Limits, LiveCounters};
use crate::policy::{Policy, PolicyDoc, Scope};
use crate::protocol::{Endpoints, Protocol};
use crate::routing::{
    DeploymentStats, ProviderState, RouteDoc, RoutingConfig, RoutingDoc, Strategy,
};
use crate::screen::OrgGuard;
use crate::upstream::{ClientCache, HttpClient};

/// The snapshot document (`tests/contract/snapshot.json`). Unknown fields are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDoc {
    /// Monotonic version; an older or equal one is ignored.
    pub version: u64,
    /// Organizations with their balances.
    pub orgs: Vec<OrgDoc>,
    /// API keys by keyed hash.
    pub keys: Vec<KeyDoc>,
    /// Upstream providers.
    pub providers: Vec<ProviderDoc>,
    /// Deployments: several entries may share a name (alternatives for it).
    pub models: Vec<ModelDoc>,
    /// Routing strategy and aliases per model name.
    #[serde(default)]
    pub routes: Vec<RouteDoc>,
    /// Retry, fallback and circuit-breaker settings.
    #[serde(default)]
    pub routing: RoutingDoc,
    /// Source addresses refused before authentication (attack interception).
    #[serde(default)]
    pub blocked_ips: Vec<BlockedIpDoc>,
    /// Keys served by other gateways (another pool's, or the shared ones): hashes only,
    /// so this gateway can tell a key that exists elsewhere from an invalid one.
    #[serde(default)]
    pub elsewhere_keys: Vec<ElsewhereKeyDoc>,
    /// Applications: groups of one org's keys with limits and budgets of their own.
    #[serde(default)]
    pub applications: Vec<ApplicationDoc>,
}

/// One application: its limits apply across all of its keys together.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationDoc {
    /// Application id.
    pub id: String,
    /// Owning org; only that org's keys may belong to it.
    pub org_id: String,
    /// Limits over all of the application's keys.
    #[serde(default)]
    pub limits: LimitsDoc,
    /// The application's spend in the current day and month, for budgets.
    #[serde(default)]
    pub usage: UsageDoc,
}

/// One `elsewhere_keys` entry: an active key whose org is served by other gateways.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElsewhereKeyDoc {
    /// HMAC-SHA256 of the key, lowercase hex.
    pub hash: String,
    /// Version of the key-hash secret `hash` was made with.
    #[serde(default = "default_secret_version")]
    pub secret_version: u32,
    /// Its org is served by the shared gateways (else by a dedicated pool).
    #[serde(default)]
    pub shared: bool,
}

/// One organization.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgDoc {
    /// Org id.
    pub id: String,
    /// `active`, or anything else to refuse its keys.
    pub status: String,
    /// Balance in nano-units as of `spent_mark`.
    pub balance: i64,
    /// The engine `spent` value already deducted from `balance`.
    pub spent_mark: i64,
    /// Which providers and models the org may reach (absent: no provider that trains on
    /// submitted data).
    #[serde(default)]
    pub policy: PolicyDoc,
    /// Org-wide limits.
    #[serde(default)]
    pub limits: LimitsDoc,
    /// Org spend in the current day and month, for budgets.
    #[serde(default)]
    pub usage: UsageDoc,
    /// Sensitive-content guard.
    #[serde(default)]
    pub guard: GuardDoc,
    /// Discount or surcharge on every price, parts per million (900000 = 10% off).
    #[serde(default = "default_price_factor")]
    pub price_factor_ppm: u32,
    /// Restriction of processing: the calls of its keys are recorded with a keyed token
    /// for the client address and the User-Agent's product only (`restrict.rs`).
    #[serde(default)]
    pub restrict_client: bool,
}

fn default_price_factor() -> u32 {
    PPM_ONE
}

fn default_secret_version() -> u32 {
    1
}

/// `limits` of an org or key; `null` means no limit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsDoc {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens (prompt estimate plus max output, corrected at settle) per minute.
    pub tpm: Option<u32>,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
    /// Spend per UTC day, nano-units.
    pub budget_day: Option<i64>,
    /// Spend per UTC month, nano-units.
    pub budget_month: Option<i64>,
}

/// `usage` of an org or key: ledger spend in the current day and month.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageDoc {
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    /// `YYYYMM` (UTC).
    pub month: i32,
    /// Spend in `day`.
    pub spent_day: i64,
    /// Spend in `month`.
    pub spent_month: i64,
    /// The engine spend counter value already included in the two sums.
    pub spent_mark: i64,
}

/// Guard mode of an org.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardMode {
    /// No scan.
    #[default]
    Off,
    /// Scan, forward, and note the categories found in the record.
    Flag,
    /// Scan and refuse a request with findings.
    Block,
}

/// `guard` of an org.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardDoc {
    /// `off`, `flag` or `block`.
    pub mode: GuardMode,
    /// Categories to scan for; null means all.
    #[serde(default)]
    pub categories: Option<Vec<String>>,
}

/// One `blocked_ips` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockedIpDoc {
    /// CIDR or single address, v4 or v6.
    pub cidr: String,
    /// Unix seconds until which the block holds.
    pub until: i64,
    /// Which requests from the source are refused.
    #[serde(default)]
    pub mode: BlockMode,
}

/// What a `blocked_ips` entry refuses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockMode {
    /// Every request, before authentication.
    #[default]
    All,
    /// Only requests without a known key (a 401 flood): the valid keys behind the same
    /// address (a NAT, one misconfigured client among many) keep working.
    Unauthenticated,
}

impl LimitsDoc {
    fn compile(&self) -> Limits {
        Limits {
            rpm: self.rpm,
            tpm: self.tpm,
            concurrency: self.concurrency,
            budgets: Budgets {
                day: self.budget_day,
                month: self.budget_month,
            },
        }
    }
}

impl UsageDoc {
    fn compile(&self) -> UsageMark {
        UsageMark {
            day: self.day,
            month: self.month,
            spent_day: self.spent_day,
            spent_month: self.spent_month,
            spent_mark: self.spent_mark,
        }
    }
}

/// One API key, known only by its hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDoc {
    /// HMAC-SHA256 of the key, lowercase hex.
    pub hash: String,
    /// Key identifier written to records.
    pub key_id: String,
    /// Display form (prefix and last four), unused by the hot path.
    pub display: String,
    /// Owning org.
    pub org_id: String,
    /// Owning account.
    pub account_id: String,
    /// `active` or `revoked`.
    pub status: String,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
    /// Model names the key may use; null means all.
    pub allowed_models: Option<Vec<String>>,
    /// Version of the key-hash secret `hash` was made with.
    #[serde(default = "default_secret_version")]
    pub secret_version: u32,
    /// Unix seconds before which the key is refused.
    #[serde(default)]
    pub not_before: Option<i64>,
    /// CIDRs or addresses the key may be used from; null means anywhere.
    #[serde(default)]
    pub allowed_ips: Option<Vec<String>>,
    /// Per-key limits.
    #[serde(default)]
    pub limits: LimitsDoc,
    /// This key's spend in the current day and month, for budgets.
    #[serde(default)]
    pub usage: UsageDoc,
    /// Narrows the org policy (both apply).
    #[serde(default)]
    pub policy: PolicyDoc,
    /// Its account asked for restriction of processing (the org's applies as well).
    #[serde(default)]
    pub restrict_client: bool,
    /// The application the key belongs to; null for none.
    #[serde(default)]
    pub application_id: Option<String>,
}

/// One upstream provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderDoc {
    /// Provider id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Wire protocol: `openai`, `azure`, `anthropic` or `gemini`.
    pub protocol: String,
    /// Base URL: with the version path for `openai`, `anthropic` and `gemini` (e.g.
    /// `https://api.openai.com/v1`), the resource origin for `azure`.
    pub base_url: String,
    /// Credential, sent the way the protocol expects (`Authorization: Bearer`, `api-key`,
    /// `x-api-key`, `x-goog-api-key`).
    pub api_key: Option<String>,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout_ms: u64,
    /// Time allowed until the response headers arrive.
    pub first_byte_timeout_ms: u64,
    /// Time allowed between body chunks.
    pub idle_timeout_ms: u64,
    /// Azure `api-version`, or Anthropic `anthropic-version`.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Vendor name, for policies (`openai`, `anthropic`, `google`, ...).
    #[serde(default)]
    pub vendor: String,
    /// Jurisdiction, for policies (`us`, `eu`, `cn-mainland`, ...).
    #[serde(default)]
    pub region: String,
    /// The provider keeps submitted content.
    #[serde(default)]
    pub retains_content: bool,
    /// The provider may train on submitted content.
    #[serde(default)]
    pub trains_on_data: bool,
    /// The provider contractually retains nothing.
    #[serde(default)]
    pub zero_retention: bool,
    /// Compliance tags (informational).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Requests in flight to this provider at once; null means no limit.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// The org that configured this provider; null for a platform provider. Only platform
    /// providers may reach the operator's `upstream_private_cidrs`.
    #[serde(default)]
    pub org_id: Option<String>,
}

/// One model the gateway serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDoc {
    /// Name clients ask for.
    pub name: String,
    /// `chat`, `embedding`, `image`, `moderation`, `rerank`, `speech` or
    /// `transcription`.
    pub kind: String,
    /// Provider that serves it.
    pub provider_id: String,
    /// Model name sent upstream.
    pub upstream_model: String,
    /// Nano-units per million uncached prompt tokens.
    pub input_price: i64,
    /// Nano-units per million output tokens.
    pub output_price: i64,
    /// Nano-units per million cached prompt tokens.
    pub cached_input_price: i64,
    /// Output cap, and the default when the request sets none.
    pub max_output_tokens: u64,
    /// Only this org's keys may use the deployment; null means every org.
    #[serde(default)]
    pub org_id: Option<String>,
    /// Nano-units per request, added to the token cost.
    #[serde(default)]
    pub request_price: i64,
    /// Nano-units per image, by `"<size>/<quality>"`, `"<size>"` or `"default"` (the most
    /// specific listed entry applies).
    #[serde(default)]
    pub image_prices: BTreeMap<String, i64>,
    /// Nano-units per second of audio in.
    #[serde(default)]
    pub audio_second_price: i64,
    /// Nano-units per million characters of speech input.
    #[serde(default)]
    pub character_price: i64,
    /// Nano-units per rerank search unit.
    #[serde(default)]
    pub search_unit_price: i64,
    /// Order for the `priority` strategy (lower first).
    #[serde(default)]
    pub priority: i32,
    /// Share for the `weighted` strategy.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelKind {
    Chat,
    Embedding,
    Image,
    Moderation,
    Rerank,
    Speech,
    /// Speech to text: serves transcriptions and translations.
    Transcription,
}

pub(crate) struct Org {
    pub(crate) id: String,
    pub(crate) active: bool,
    pub(crate) balance: i64,
    pub(crate) spent_mark: i64,
    pub(crate) account: Arc<OrgAccount>,
    pub(crate) limits: Limits,
    pub(crate) limiter: Arc<LimitState>,
    pub(crate) usage: UsageMark,
    pub(crate) price_factor_ppm: u32,
    pub(crate) guard: OrgGuard,
    pub(crate) policy: Policy,
    /// `policy.trace_context`: trace context crosses the gateway for this org.
    pub(crate) trace_context: bool,
    pub(crate) restrict_client: bool,
}

/// An application: limits and budgets shared by its keys.
pub(crate) struct Application {
    pub(crate) id: String,
    pub(crate) limits: Limits,
    /// Rate and concurrency state; survives swaps (keyed by application id).
    pub(crate) limiter: Arc<LimitState>,
    /// Spend counters (budgets); survive swaps (keyed by application id).
    pub(crate) account: Arc<OrgAccount>,
    pub(crate) usage: UsageMark,
}

pub(crate) struct Key {
    pub(crate) key_id: String,
    pub(crate) account_id: String,
    pub(crate) org: Arc<Org>,
    pub(crate) revoked: bool,
    pub(crate) expires_at: Option<i64>,
    pub(crate) allowed_models: Option<HashSet<String>>,
    pub(crate) secret_version: u32,
    pub(crate) not_before: Option<i64>,
    /// Compiled `allowed_ips`; `None` = anywhere.
    pub(crate) allowed_ips: Option<IpSet>,
    pub(crate) limits: Limits,
    pub(crate) limiter: Arc<LimitState>,
    /// Spend counters of this key (budgets), carried over by key id.
    pub(crate) account: Arc<OrgAccount>,
    pub(crate) usage: UsageMark,
    /// Narrows the org policy.
    pub(crate) policy: Policy,
    /// Its account's or its org's restriction of processing, the stricter of the two.
    pub(crate) restrict_client: bool,
    /// The application whose limits also apply.
    pub(crate) application: Option<Arc<Application>>,
}

/// A key this gateway does not serve because its org is served by other gateways.
pub(crate) struct ElsewhereKey {
    pub(crate) secret_version: u32,
    /// Served by the shared gateways (else by a dedicated pool).
    pub(crate) shared: bool,
}

impl Key {
    pub(crate) fn may_use(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|set| set.contains(model))
    }
}

pub(crate) struct Provider {
    pub(crate) id: String,
    pub(crate) protocol: Protocol,
    /// Credential and version headers, in the protocol's form.
    pub(crate) auth_headers: Vec<(HeaderName, HeaderValue)>,
    /// Lowercase, for policies.
    pub(crate) vendor: String,
    /// Lowercase, for policies.
    pub(crate) region: String,
    pub(crate) trains_on_data: bool,
    pub(crate) zero_retention: bool,
    pub(crate) max_concurrency: Option<u32>,
    pub(crate) first_byte_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) client: HttpClient,
    /// Breaker and in-flight count; survives snapshot swaps (keyed by provider id).
    pub(crate) state: Arc<ProviderState>,
}

/// One deployment: a public model name served by one provider.
pub(crate) struct Deployment {
    pub(crate) name: String,
    pub(crate) upstream_model: String,
    pub(crate) prices: Prices,
    pub(crate) request_price: i64,
    /// Unit prices; the image price is chosen per call ([`Deployment::unit_prices_for`]).
    pub(crate) unit_prices: UnitPrices,
    /// Per-image prices by `"<size>/<quality>"`, `"<size>"` or `"default"`.
    pub(crate) image_prices: Vec<(String, i64)>,
    pub(crate) max_output_tokens: u64,
    /// Only this org may use it.
    pub(crate) org_id: Option<String>,
    pub(crate) priority: i32,
    pub(crate) weight: u32,
    pub(crate) provider: Arc<Provider>,
    pub(crate) endpoints: Endpoints,
    /// Latency average; survives snapshot swaps.
    pub(crate) stats: Arc<DeploymentStats>,
}

impl Deployment {
    /// The unit prices of a call asking for images of this size and quality: the price of
    /// `"<size>/<quality>"`, else of `"<size>"`, else the default, else the dearest listed
    /// (a combination the operator did not price is never served for less).
    pub(crate) fn unit_prices_for(&self, size: &str, quality: &str) -> UnitPrices {
        let mut prices = self.unit_prices;
        if self.image_prices.is_empty() {
            return prices;
        }
        let listed = |k: &str| {
            self.image_prices
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, p)| *p)
        };
        let exact = format!("{size}/{quality}");
        prices.image = listed(&exact)
            .or_else(|| listed(size))
            .or_else(|| listed("default"))
            .unwrap_or_else(|| self.image_prices.iter().map(|(_, p)| *p).max().unwrap_or(0));
        prices
    }

    /// Visible to keys of `org` (deployments scoped to another org are not).
    pub(crate) fn visible_to(&self, org: &str) -> bool {
        self.org_id.as_deref().is_none_or(|o| o == org)
    }
}

/// A model name (or alias) and the deployments that can serve it.
pub(crate) struct ModelGroup {
    /// The canonical name (aliases resolve to the same group).
    pub(crate) name: String,
    pub(crate) kind: ModelKind,
    pub(crate) strategy: Strategy,
    /// In priority order (stable: snapshot order breaks ties).
    pub(crate) deployments: Vec<Arc<Deployment>>,
}

/// The compiled, immutable snapshot.
pub(crate) struct Snapshot {
    pub(crate) version: u64,
    pub(crate) keys: HashMap<[u8; 32], Key>,
    /// Keys served by other gateways (dedicated pools), by hash.
    pub(crate) elsewhere_keys: HashMap<[u8; 32], ElsewhereKey>,
    /// Model names and aliases.
    pub(crate) models: HashMap<String, Arc<ModelGroup>>,
    /// Model names in snapshot order, then aliases, for `/v1/models`.
    pub(crate) model_order: Vec<String>,
    pub(crate) routing: RoutingConfig,
    /// Sources refused before authentication.
    pub(crate) blocked_ips: IpSet,
    /// Sources whose requests are refused only when they carry no known key.
    pub(crate) blocked_unauthenticated: IpSet,
}

impl Snapshot {
    /// The snapshot served before the control plane pushes one: no keys, version 0.
    pub(crate) fn empty() -> Self {
        Snapshot {
            version: 0,
            keys: HashMap::new(),
            elsewhere_keys: HashMap::new(),
            models: HashMap::new(),
            model_order: Vec::new(),
            routing: RoutingConfig::default(),
            blocked_ips: IpSet::default(),
            blocked_unauthenticated: IpSet::default(),
        }
    }

    /// Compile a document entry by entry. An entry that does not hold up (a key whose org
    /// is unknown, a model on a missing provider, a route to no model, ...) is left out and
    /// listed in the returned report, so one bad entry never keeps key revocations, org
    /// disables or IP blocks of the rest from taking effect. `accounts` holds the live
    /// counters by org and key id and is extended for new ones; `clients` shares upstream
    /// connection pools across snapshots.
    pub(crate) fn compile(
        doc: SnapshotDoc,
        accounts: &mut LiveCounters,
        clients: &ClientCache,
    ) -> (Self, Vec<Dropped>) {
        let mut report = Vec::new();
        // Money, rates and slots shared through Redis: new live state holds leases.
        let leased = accounts.leased;
        let mut orgs: HashMap<String, Arc<Org>> = HashMap::with_capacity(doc.orgs.len());
        for o in doc.orgs {
            if orgs.contains_key(&o.id) {
                report.push(Dropped::new("org", &o.id, "id", "duplicate"));
                continue;
            }
            let guard = compile_guard(&o.guard).unwrap_or_else(|| {
                // Scanning for every category keeps the org's chosen mode (a blocking
                // guard stays blocking) instead of failing open.
                report.push(Dropped::new(
                    "guard",
                    &o.id,
                    "guard.categories",
                    "unknown_category",
                ));
                OrgGuard {
                    mode: o.guard.mode,
                    categories: CategorySet::all(),
                }
            });
            let account = accounts
                .orgs
                .entry(o.id.clone())
                .or_insert_with(|| Arc::new(OrgAccount::new(leased)))
                .clone();
            let limiter = accounts
                .org_limits
                .entry(o.id.clone())
                .or_insert_with(|| Arc::new(LimitState::new(leased)))
                .clone();
            let org = Arc::new(Org {
                id: o.id.clone(),
                active: o.status == "active",
                balance: o.balance,
                spent_mark: o.spent_mark,
                account,
                limits: o.limits.compile(),
                limiter,
                usage: o.usage.compile(),
                price_factor_ppm: o.price_factor_ppm,
                guard,
                trace_context: o.policy.trace_context,
                policy: Policy::compile(o.policy, Scope::Org),
                restrict_client: o.restrict_client,
            });
            orgs.insert(o.id, org);
        }

        let mut apps: HashMap<String, Arc<Application>> =
            HashMap::with_capacity(doc.applications.len());
        let mut app_orgs: HashMap<String, String> = HashMap::with_capacity(apps.capacity());
        for a in doc.applications {
            if apps.contains_key(&a.id) {
                report.push(Dropped::new("application", &a.id, "id", "duplicate"));
                continue;
            }
            if !orgs.contains_key(&a.org_id) {
                report.push(Dropped::new("application", &a.id, "org_id", "unknown_org"));
                continue;
            }
            let app = Application {
                id: a.id.clone(),
                limits: a.limits.compile(),
                limiter: accounts
                    .app_limits
                    .entry(a.id.clone())
                    .or_insert_with(|| Arc::new(LimitState::new(leased)))
                    .clone(),
                account: accounts
                    .apps
                    .entry(a.id.clone())
                    .or_insert_with(|| Arc::new(OrgAccount::for_key(leased)))
                    .clone(),
                usage: a.usage.compile(),
            };
            app_orgs.insert(a.id.clone(), a.org_id);
            apps.insert(a.id, Arc::new(app));
        }

        let mut keys = HashMap::with_capacity(doc.keys.len());
        for k in doc.keys {
            let drop = |field, reason| Dropped::new("key", &k.key_id, field, reason);
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(&k.hash, &mut hash).is_err() {
                report.push(drop("hash", "invalid_hash"));
                continue;
            }
            if keys.contains_key(&hash) {
                report.push(drop("hash", "duplicate"));
                continue;
            }
            let Some(org) = orgs.get(&k.org_id).cloned() else {
                report.push(drop("org_id", "unknown_org"));
                continue;
            };
            // A key whose application is unknown (or another org's) is refused rather than
            // served without the application's limits.
            let application = match &k.application_id {
                None => None,
                Some(id) => match apps.get(id) {
                    Some(app) if app_orgs.get(id) == Some(&k.org_id) => Some(Arc::clone(app)),
                    _ => {
                        report.push(drop("application_id", "unknown_application"));
                        continue;
                    }
                },
            };
            let allowed_ips = match &k.allowed_ips {
                None => None,
                Some(list) => match IpSet::from_entries(list.iter().map(|c| (c.as_str(), None))) {
                    Ok(set) => Some(set),
                    // Refusing the key is the safe side of an unreadable address scope.
                    Err(_) => {
                        report.push(drop("allowed_ips", "invalid_cidr"));
                        continue;
                    }
                },
            };
            let key = Key {
                secret_version: k.secret_version,
                not_before: k.not_before,
                allowed_ips,
                limits: k.limits.compile(),
                limiter: accounts
                    .key_limits
                    .entry(k.key_id.clone())
                    .or_insert_with(|| Arc::new(LimitState::new(leased)))
                    .clone(),
                account: accounts
                    .keys
                    .entry(k.key_id.clone())
                    .or_insert_with(|| Arc::new(OrgAccount::for_key(leased)))
                    .clone(),
                usage: k.usage.compile(),
                policy: Policy::compile(k.policy, Scope::Key),
                restrict_client: k.restrict_client || org.restrict_client,
                application,
                revoked: k.status != "active",
                key_id: k.key_id,
                account_id: k.account_id,
                org,
                expires_at: k.expires_at,
                allowed_models: k.allowed_models.map(|v| v.into_iter().collect()),
            };
            keys.insert(hash, key);
        }

        let mut elsewhere_keys = HashMap::with_capacity(doc.elsewhere_keys.len());
        for (i, k) in doc.elsewhere_keys.iter().enumerate() {
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(&k.hash, &mut hash).is_err() {
                report.push(Dropped::new(
                    "elsewhere_key",
                    &i.to_string(),
                    "hash",
                    "invalid_hash",
                ));
                continue;
            }
            // A key served here wins: the control plane never lists one key in both.
            if !keys.contains_key(&hash) {
                let entry = ElsewhereKey {
                    secret_version: k.secret_version,
                    shared: k.shared,
                };
                elsewhere_keys.insert(hash, entry);
            }
        }

        let (models, model_order) = crate::routing::compile_catalog(
            doc.providers,
            doc.models,
            doc.routes,
            clients,
            &mut report,
        );
        let routing = RoutingConfig::from(&doc.routing);

        // Entries whose CIDR does not parse are dropped and reported, never the snapshot.
        let mut all = Vec::with_capacity(doc.blocked_ips.len());
        let mut unauthenticated = Vec::new();
        for (i, b) in doc.blocked_ips.iter().enumerate() {
            if Cidr::parse(&b.cidr).is_none() {
                report.push(Dropped::new(
                    "blocked_ip",
                    &i.to_string(),
                    "cidr",
                    "invalid_cidr",
                ));
                continue;
            }
            let entry = (b.cidr.as_str(), Some(b.until));
            match b.mode {
                BlockMode::All => all.push(entry),
                BlockMode::Unauthenticated => unauthenticated.push(entry),
            }
        }
        // Every entry parsed above, so these cannot fail; an empty set is the fallback.
        let blocked_ips = IpSet::from_entries(all).unwrap_or_default();
        let blocked_unauthenticated = IpSet::from_entries(unauthenticated).unwrap_or_default();

        let snapshot = Snapshot {
            version: doc.version,
            keys,
            elsewhere_keys,
            models,
            model_order,
            routing,
            blocked_ips,
            blocked_unauthenticated,
        };
        (snapshot, report)
    }
}

/// One snapshot entry the engine left out, and why. Ids and fixed codes only: never a
/// credential, URL or any other configured value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// `org`, `guard`, `application`, `key`, `provider`, `model`, `route`, `alias`,
    /// `blocked_ip` or `elsewhere_key`.
    pub kind: &'static str,
    /// Org id, application id, key id, provider id, model name, route name, alias, or the position of a
    /// `blocked_ips` or `elsewhere_keys` entry.
    pub id: String,
    /// The field at fault, as named in the snapshot document.
    pub field: &'static str,
    /// Low-cardinality reason code (docs/snapshot.md lists them).
    pub reason: &'static str,
}

impl Dropped {
    pub(crate) fn new(
        kind: &'static str,
        id: &str,
        field: &'static str,
        reason: &'static str,
    ) -> Self {
        Dropped {
            kind,
            id: id.to_owned(),
            field,
            reason,
        }
    }
}

/// `None`: a category name is unknown.
fn compile_guard(guard: &GuardDoc) -> Option<OrgGuard> {
    let categories = match &guard.categories {
        None => CategorySet::all(),
        Some(names) => CategorySet::from_names(names).ok()?,
    };
    Some(OrgGuard {
        mode: guard.mode,
        categories,
    })
}

/// The entries a snapshot document would lose when compiled: the engine's own rules, run
/// without touching a running engine (the control plane checks a change with it before
/// committing). Only a document that does not parse is an error.
pub fn validate(json: &[u8]) -> Result<Vec<Dropped>, Error> {
    let doc = parse(json)?;
    let (_, report) = Snapshot::compile(doc, &mut LiveCounters::default(), &ClientCache::default());
    Ok(report)
}

/// Parse a snapshot document; serde's message names an unknown field.
pub(crate) fn parse(json: &[u8]) -> Result<SnapshotDoc, Error> {
    serde_json::from_slice(json).map_err(|e| Error::Config(format!("snapshot: {e}")))
}
