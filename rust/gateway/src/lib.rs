//! onetoken hot path: an OpenAI-compatible relay that authenticates, routes, meters and
//! bills every call, and keeps only metadata records (never request or response content).
//!
//! The crate is pure Rust; `rust/py` wraps [`Engine`] for the Python control plane.

mod auth;
pub mod billing;
mod body;
mod call;
mod call_batch;
mod call_log;
mod client_ip;
mod config;
mod conn;
mod engine;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
mod ipset;
mod journal;
pub mod journal_reader;
mod limits;
mod metrics;
mod phase;
mod policy;
mod protocol;
mod proxy;
mod records;
mod restrict;
mod routing;
mod screen;
mod server;
mod shared;
mod snapshot;
pub mod sse;
pub mod tokens;
mod trace;
mod upstream;
#[doc(hidden)]
pub mod xorshift;

pub use auth::hash_key;
pub use config::{EngineConfig, PreviousSecret, SharedConfig, TlsConfig};
pub use engine::{Engine, Stats};
pub use error::Error;
pub use phase::PHASE_NAMES;
pub use records::CallRecord;
pub use routing::routing_defaults_json;
pub use snapshot::{validate as validate_snapshot, Dropped, SnapshotDoc};
pub use trace::OtelConfig;
pub use upstream::address_is_public;
pub use upstream::Resolve;
