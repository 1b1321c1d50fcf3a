//! Engine configuration: the process-level settings (listener, secret, queue). Per-tenant
//! configuration arrives separately as a snapshot.

use serde::Deserialize;

use crate::error::Error;

/// Engine configuration (`tests/contract/engine_config.json`). Unknown fields are
/// rejected with an error naming the field.
#[derive(Debug, Clone, Deserialize)]
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
    /// Capacity of the in-memory record queue; overflow is spooled to disk.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Directory of the overflow spool files.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    /// Largest accepted request body.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Default grace period for a graceful stop.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Journal every record to `<spool_dir>/journal-*.jsonl` before queueing it, so a
    /// killed process loses none (see `Engine::ack_records`).
    #[serde(default = "default_journal")]
    pub journal: bool,
}

/// A key-hash secret from before a rotation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousSecret {
    /// The `secret_version` of keys hashed with it.
    pub version: u32,
    /// The secret, hex.
    pub secret_hex: String,
}

/// PEM files for TLS termination.
#[derive(Debug, Clone, Deserialize)]
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
fn default_journal() -> bool {
    true
}
fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_worker_threads() -> usize {
    2
}
fn default_queue_capacity() -> usize {
    100_000
}
fn default_spool_dir() -> String {
    "./.onetoken/spool".to_owned()
}
fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}

impl EngineConfig {
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
        if self.queue_capacity == 0 {
            return Err(Error::Config("queue_capacity must be positive".into()));
        }
        self.secrets()?;
        if self.max_body_bytes == 0 {
            return Err(Error::Config("max_body_bytes must be positive".into()));
        }
        Ok(())
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
