//! Engine configuration: the process-level settings (listener, secret, journal dir). Per-tenant
//! configuration arrives separately as a snapshot.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ipset::IpSet;
use crate::trace::OtelConfig;

fn cidr_set(field: &str, cidrs: &[String]) -> Result<IpSet, Error> {
    IpSet::from_entries(cidrs.iter().map(|c| (c.as_str(), None)))
        .map_err(|e| Error::Config(format!("{field}: {e}")))
}

/// Engine configuration (`tests/contract/engine_config.json`). Unknown fields are
/// rejected with an error naming the field.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Address to listen on, `host:port` (port 0 picks a free one).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// HMAC-SHA256 secret for API key hashes, hex.
    pub key_hash_secret_hex: String,
    /// Version number of `key_hash_secret_hex` (keys' `secret_version`).
    #[serde(default = "default_secret_version")]
    pub key_hash_secret_version: u32,
    /// Earlier secrets still accepted after a rotation.
    #[serde(default)]
    pub previous_key_hash_secrets: Vec<PreviousSecret>,
    /// TLS termination; plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Tokio worker threads of the engine's runtime.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    /// Directory of the record journal (`<data_dir>/spool`): segments and lock files.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    /// Largest accepted request body.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest accepted audio upload (`/v1/audio/transcriptions`, `/translations`): it is
    /// streamed through, not held, so it may be larger than `max_body_bytes`.
    #[serde(default = "default_max_upload_bytes")]
    pub max_upload_bytes: u64,
    /// How long [`crate::Engine::drain`] lets in-flight requests finish before it cancels
    /// them.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// CIDRs a platform provider (one not scoped to an org) may reach although they are
    /// private, loopback or otherwise non-public. Org-scoped providers never may.
    #[serde(default)]
    pub upstream_private_cidrs: Vec<String>,
    /// Peers whose `X-Forwarded-For` (and PROXY protocol header) names the client; empty
    /// trusts none, so the client is always the TCP peer.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Every connection starts with a PROXY protocol v2 header (a load balancer in front).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Separate listener for `GET /metrics` (and `/healthz`); when absent the metrics are
    /// served over HTTP nowhere (the embedding program still reads them).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Connections served at once; further ones are closed on accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time for a connection's PROXY header, TLS handshake and first request head to
    /// arrive; on HTTP/1.1 also the longest wait for each later request head (so it bounds
    /// keep-alive gaps as well).
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A connection with no request in progress and no bytes either way for this long is
    /// closed (HTTP/1.1 keep-alive and HTTP/2 alike).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Largest request head (request line and headers); above it the answer is 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest single upstream SSE event; a longer one ends the stream as an upstream error.
    #[serde(default = "default_max_upstream_event_bytes")]
    pub max_upstream_event_bytes: usize,
    /// Largest non-streamed upstream response body.
    #[serde(default = "default_max_upstream_body_bytes")]
    pub max_upstream_body_bytes: usize,
    /// Time allowed for a whole upstream response, from the request's start to its last
    /// byte, however steadily the bytes trickle in.
    #[serde(default = "default_upstream_deadline_ms")]
    pub upstream_deadline_ms: u64,
    /// Count the thread CPU time of each request phase in `/metrics`
    /// (`onetoken_phase_cpu_seconds_total`); a clock read per phase when on.
    #[serde(default)]
    pub phase_timing: bool,
    /// Limits and money shared with the other gateways through Redis
    /// (docs/scale-out.md); absent, this engine keeps them in its own memory alone.
    #[serde(default)]
    pub shared: Option<SharedConfig>,
    /// Traces and metrics over OTLP/HTTP (docs/observability.md); absent, nothing is
    /// traced and a request pays one branch.
    #[serde(default)]
    pub otel: Option<OtelConfig>,
}

/// Redis for limits and money shared across gateways.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    /// `redis://host:port/db`, `rediss://…` or `unix:///path/to/redis.sock`.
    pub redis_url: String,
    /// Prefix of every key this engine writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How often the refiller tops up leases, returns idle ones and heartbeats.
    #[serde(default = "default_refill_interval_ms")]
    pub refill_interval_ms: u64,
    /// Longest a request waits for a refill when its lease is short.
    #[serde(default = "default_wait_ms")]
    pub wait_ms: u64,
    /// A Redis command that takes longer than this counts as Redis being down.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
    /// Rate units leased longer than this go back to Redis; concurrency slots an
    /// instance stops refreshing (it died) count for nothing after this long.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
}

fn default_key_prefix() -> String {
    "ot:".to_owned()
}
fn default_refill_interval_ms() -> u64 {
    100
}
fn default_wait_ms() -> u64 {
    // Only a request whose lease is short waits; a refill is one round trip, but a busy
    // machine can delay the pass well past 25 ms, and a refusal then would be false.
    200
}
fn default_redis_timeout_ms() -> u64 {
    250
}
fn default_lease_ttl_ms() -> u64 {
    3_000
}

/// A key-hash secret from before a rotation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousSecret {
    /// The `secret_version` of keys hashed with it.
    pub version: u32,
    /// The secret, hex.
    pub secret_hex: String,
}

/// PEM files for TLS termination.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert_path: String,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_path: String,
}

fn default_secret_version() -> u32 {
    1
}
fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_worker_threads() -> usize {
    2
}
fn default_spool_dir() -> String {
    "./.onetoken/spool".to_owned()
}
fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}
/// OpenAI's own cap on an audio file.
fn default_max_upload_bytes() -> u64 {
    25 * 1024 * 1024
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_max_connections() -> usize {
    20_000
}
fn default_header_read_timeout_ms() -> u64 {
    30_000
}
fn default_idle_timeout_ms() -> u64 {
    120_000
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}
fn default_max_upstream_event_bytes() -> usize {
    1024 * 1024
}
fn default_max_upstream_body_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_upstream_deadline_ms() -> u64 {
    30 * 60 * 1000
}

impl EngineConfig {
    /// Every optional field at its default, as a JSON object: the one source of the
    /// engine's defaults (the control plane's settings take theirs from it).
    pub fn defaults_json() -> Result<String, Error> {
        let cfg: EngineConfig = serde_json::from_str(r#"{"key_hash_secret_hex": ""}"#)
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut v = serde_json::to_value(cfg).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(fields) = v.as_object_mut() {
            fields.remove("key_hash_secret_hex");
        }
        Ok(v.to_string())
    }

    /// Parse and validate the configuration JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let cfg: EngineConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let secret = self.secret()?;
        if secret.is_empty() {
            return Err(Error::Config("key_hash_secret_hex is empty".into()));
        }
        if self.worker_threads == 0 || self.worker_threads > 1024 {
            return Err(Error::Config(
                "worker_threads must be between 1 and 1024".into(),
            ));
        }
        self.secrets()?;
        if self.max_body_bytes == 0 {
            return Err(Error::Config("max_body_bytes must be positive".into()));
        }
        let positive = [
            ("max_upload_bytes", self.max_upload_bytes),
            ("max_connections", self.max_connections as u64),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            (
                "max_upstream_event_bytes",
                self.max_upstream_event_bytes as u64,
            ),
            (
                "max_upstream_body_bytes",
                self.max_upstream_body_bytes as u64,
            ),
            ("upstream_deadline_ms", self.upstream_deadline_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("{name} must be positive")));
        }
        if let Some(otel) = &self.otel {
            otel.validate()?;
        }
        if self.max_header_bytes < 1024 {
            return Err(Error::Config(
                "max_header_bytes must be at least 1024".into(),
            ));
        }
        self.private_cidrs()?;
        self.proxies()?;
        if let Some(shared) = &self.shared {
            if shared.redis_url.is_empty() {
                return Err(Error::Config("shared.redis_url is empty".into()));
            }
            if shared.refill_interval_ms == 0 || shared.timeout_ms == 0 {
                return Err(Error::Config(
                    "shared.refill_interval_ms and shared.timeout_ms must be positive".into(),
                ));
            }
            // Slots are refreshed every pass; a ttl shorter than a few passes would let
            // a live instance's slots lapse between two of them.
            if shared.lease_ttl_ms < 4 * shared.refill_interval_ms {
                return Err(Error::Config(
                    "shared.lease_ttl_ms must be at least 4 refill intervals".into(),
                ));
            }
        }
        Ok(())
    }

    /// `upstream_private_cidrs`, compiled.
    pub(crate) fn private_cidrs(&self) -> Result<IpSet, Error> {
        cidr_set("upstream_private_cidrs", &self.upstream_private_cidrs)
    }

    /// `trusted_proxies`, compiled.
    pub(crate) fn proxies(&self) -> Result<IpSet, Error> {
        cidr_set("trusted_proxies", &self.trusted_proxies)
    }

    /// Every accepted key-hash secret as (version, bytes), the current one first.
    pub(crate) fn secrets(&self) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        let mut out = vec![(self.key_hash_secret_version, self.secret()?)];
        for p in &self.previous_key_hash_secrets {
            let bytes = hex::decode(&p.secret_hex).map_err(|_| {
                Error::Config(format!(
                    "previous_key_hash_secrets: version {} is not valid hex",
                    p.version
                ))
            })?;
            if bytes.is_empty() {
                return Err(Error::Config(format!(
                    "previous_key_hash_secrets: version {} is empty",
                    p.version
                )));
            }
            if out.iter().any(|(v, _)| *v == p.version) {
                return Err(Error::Config(format!(
                    "key hash secret version {} appears twice",
                    p.version
                )));
            }
            out.push((p.version, bytes));
        }
        Ok(out)
    }

    pub(crate) fn secret(&self) -> Result<Vec<u8>, Error> {
        hex::decode(&self.key_hash_secret_hex)
            .map_err(|_| Error::Config("key_hash_secret_hex is not valid hex".into()))
    }
}
