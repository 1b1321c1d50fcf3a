//! Config snapshot: the JSON the control plane pushes, and the immutable structure it is
//! compiled into. Requests read one `Arc<Snapshot>` for their whole life.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Uri};
use serde::Deserialize;

use crate::billing::{OrgAccount, Prices};
use crate::error::Error;
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
    /// Models the gateway serves.
    pub models: Vec<ModelDoc>,
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
}

/// One upstream provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderDoc {
    /// Provider id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Wire protocol; `openai`.
    pub protocol: String,
    /// Base URL including the version path, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Credential sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout_ms: u64,
    /// Time allowed until the response headers arrive.
    pub first_byte_timeout_ms: u64,
    /// Time allowed between body chunks.
    pub idle_timeout_ms: u64,
}

/// One model the gateway serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDoc {
    /// Name clients ask for.
    pub name: String,
    /// `chat` or `embedding`.
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelKind {
    Chat,
    Embedding,
}

pub(crate) struct Org {
    pub(crate) id: String,
    pub(crate) active: bool,
    pub(crate) balance: i64,
    pub(crate) spent_mark: i64,
    pub(crate) account: Arc<OrgAccount>,
}

pub(crate) struct Key {
    pub(crate) key_id: String,
    pub(crate) account_id: String,
    pub(crate) org: Arc<Org>,
    pub(crate) revoked: bool,
    pub(crate) expires_at: Option<i64>,
    pub(crate) allowed_models: Option<HashSet<String>>,
}

impl Key {
    pub(crate) fn may_use(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .map_or(true, |set| set.contains(model))
    }
}

pub(crate) struct Provider {
    pub(crate) id: String,
    pub(crate) chat_uri: Uri,
    pub(crate) embeddings_uri: Uri,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) first_byte_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) client: HttpClient,
}

pub(crate) struct Model {
    pub(crate) name: String,
    pub(crate) kind: ModelKind,
    pub(crate) upstream_model: String,
    pub(crate) prices: Prices,
    pub(crate) max_output_tokens: u64,
    pub(crate) provider: Arc<Provider>,
}

/// The compiled, immutable snapshot.
pub(crate) struct Snapshot {
    pub(crate) version: u64,
    pub(crate) keys: HashMap<[u8; 32], Key>,
    pub(crate) models: HashMap<String, Arc<Model>>,
    /// Model names in snapshot order, for `/v1/models`.
    pub(crate) model_order: Vec<String>,
}

impl Snapshot {
    /// The snapshot served before the control plane pushes one: no keys, version 0.
    pub(crate) fn empty() -> Self {
        Snapshot {
            version: 0,
            keys: HashMap::new(),
            models: HashMap::new(),
            model_order: Vec::new(),
        }
    }

    /// Compile a document. `accounts` holds the live counters by org id and is extended
    /// for new orgs; `clients` shares upstream connection pools across snapshots.
    pub(crate) fn compile(
        doc: SnapshotDoc,
        accounts: &mut HashMap<String, Arc<OrgAccount>>,
        clients: &ClientCache,
    ) -> Result<Self, Error> {
        let mut orgs: HashMap<String, Arc<Org>> = HashMap::with_capacity(doc.orgs.len());
        for o in doc.orgs {
            let account = accounts.entry(o.id.clone()).or_default().clone();
            let org = Arc::new(Org {
                id: o.id.clone(),
                active: o.status == "active",
                balance: o.balance,
                spent_mark: o.spent_mark,
                account,
            });
            if orgs.insert(o.id.clone(), org).is_some() {
                return Err(Error::Config(format!("duplicate org id {:?}", o.id)));
            }
        }

        let mut keys = HashMap::with_capacity(doc.keys.len());
        for k in doc.keys {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&k.hash, &mut hash).map_err(|_| {
                Error::Config(format!(
                    "key {:?}: hash must be 64 hex characters",
                    k.key_id
                ))
            })?;
            let org = orgs.get(&k.org_id).cloned().ok_or_else(|| {
                Error::Config(format!("key {:?}: unknown org_id {:?}", k.key_id, k.org_id))
            })?;
            let key = Key {
                revoked: k.status != "active",
                key_id: k.key_id,
                account_id: k.account_id,
                org,
                expires_at: k.expires_at,
                allowed_models: k.allowed_models.map(|v| v.into_iter().collect()),
            };
            if keys.insert(hash, key).is_some() {
                return Err(Error::Config("duplicate key hash".into()));
            }
        }

        let mut providers: HashMap<String, Arc<Provider>> = HashMap::new();
        for p in doc.providers {
            if p.protocol != "openai" {
                return Err(Error::Config(format!(
                    "provider {:?}: unsupported protocol {:?} (supported: openai)",
                    p.id, p.protocol
                )));
            }
            let base = p.base_url.trim_end_matches('/');
            let parse = |suffix: &str| -> Result<Uri, Error> {
                let uri: Uri = format!("{base}{suffix}")
                    .parse()
                    .map_err(|_| Error::Config(format!("provider {:?}: invalid base_url", p.id)))?;
                match uri.scheme_str() {
                    Some("http") | Some("https") if uri.authority().is_some() => Ok(uri),
                    _ => Err(Error::Config(format!(
                        "provider {:?}: base_url must be an http or https URL",
                        p.id
                    ))),
                }
            };
            let authorization = match &p.api_key {
                Some(k) => Some(HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                    Error::Config(format!(
                        "provider {:?}: api_key is not a valid header value",
                        p.id
                    ))
                })?),
                None => None,
            };
            let provider = Provider {
                chat_uri: parse("/chat/completions")?,
                embeddings_uri: parse("/embeddings")?,
                authorization,
                first_byte_timeout: Duration::from_millis(p.first_byte_timeout_ms.max(1)),
                idle_timeout: Duration::from_millis(p.idle_timeout_ms.max(1)),
                client: clients.get(Duration::from_millis(p.connect_timeout_ms.max(1)))?,
                id: p.id.clone(),
            };
            if providers.insert(p.id.clone(), Arc::new(provider)).is_some() {
                return Err(Error::Config(format!("duplicate provider id {:?}", p.id)));
            }
        }

        let mut models = HashMap::with_capacity(doc.models.len());
        let mut model_order = Vec::with_capacity(doc.models.len());
        for m in doc.models {
            let kind = match m.kind.as_str() {
                "chat" => ModelKind::Chat,
                "embedding" => ModelKind::Embedding,
                _ => {
                    return Err(Error::Config(format!(
                        "model {:?}: kind must be \"chat\" or \"embedding\"",
                        m.name
                    )))
                }
            };
            if m.input_price < 0 || m.output_price < 0 || m.cached_input_price < 0 {
                return Err(Error::Config(format!(
                    "model {:?}: prices must be >= 0",
                    m.name
                )));
            }
            let provider = providers.get(&m.provider_id).cloned().ok_or_else(|| {
                Error::Config(format!(
                    "model {:?}: unknown provider_id {:?}",
                    m.name, m.provider_id
                ))
            })?;
            let model = Model {
                name: m.name.clone(),
                kind,
                upstream_model: m.upstream_model,
                prices: Prices {
                    input: m.input_price,
                    output: m.output_price,
                    cached_input: m.cached_input_price,
                },
                max_output_tokens: m.max_output_tokens,
                provider,
            };
            if models.insert(m.name.clone(), Arc::new(model)).is_some() {
                return Err(Error::Config(format!("duplicate model name {:?}", m.name)));
            }
            model_order.push(m.name);
        }

        Ok(Snapshot {
            version: doc.version,
            keys,
            models,
            model_order,
        })
    }
}

/// Parse a snapshot document; serde's message names an unknown field.
pub(crate) fn parse(json: &[u8]) -> Result<SnapshotDoc, Error> {
    serde_json::from_slice(json).map_err(|e| Error::Config(format!("snapshot: {e}")))
}
