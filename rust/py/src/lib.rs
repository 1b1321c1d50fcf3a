//! `onetoken._core`: Python bindings of the gateway. Glue only; the logic lives in
//! `onetoken-gateway` and `onetoken-mock-upstream`.

mod engine;
mod errors;
mod journal;
mod mock;

use pyo3::prelude::*;
use pyo3::types::PyList;

/// HMAC-SHA256 of the key under the secret, lowercase hex.
#[pyfunction]
fn hash_key(secret: &[u8], key: &str) -> String {
    onetoken_gateway::hash_key(secret, key)
}

/// Whether `ip` (an IPv4 or IPv6 address) is public under the engine's upstream address
/// rule; ValueError when it is not an address.
#[pyfunction]
fn address_is_public(ip: &str) -> PyResult<bool> {
    ip.parse::<std::net::IpAddr>()
        .map(onetoken_gateway::address_is_public)
        .map_err(|_| pyo3::exceptions::PyValueError::new_err("not an IP address"))
}

/// Tokens in `text` under the gateway's tokenizer (o200k_base).
#[pyfunction]
fn count_tokens(py: Python<'_>, text: &str) -> usize {
    py.detach(|| onetoken_gateway::tokens::count(text))
}

/// The entries a snapshot document would lose under the engine's rules, as dicts with
/// `kind`, `id`, `field` and `reason`. Raises ConfigError only when the document does not
/// parse.
#[pyfunction]
fn validate_snapshot<'py>(py: Python<'py>, snapshot_json: &[u8]) -> PyResult<Bound<'py, PyList>> {
    let dropped = py
        .detach(|| onetoken_gateway::validate_snapshot(snapshot_json))
        .map_err(errors::to_py)?;
    engine::dropped_list(py, &dropped)
}

/// The engine config's defaults (every field but the secret) as a JSON object.
#[pyfunction]
fn engine_config_defaults() -> PyResult<String> {
    onetoken_gateway::EngineConfig::defaults_json().map_err(errors::to_py)
}

/// The engine's routing defaults (retries, circuit breakers) as a JSON object.
#[pyfunction]
fn routing_defaults() -> PyResult<String> {
    onetoken_gateway::routing_defaults_json()
        .map_err(|e| errors::to_py(onetoken_gateway::Error::Config(e.to_string())))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("OnetokenError", py.get_type::<errors::OnetokenError>())?;
    m.add("ConfigError", py.get_type::<errors::ConfigError>())?;
    m.add("BindError", py.get_type::<errors::BindError>())?;
    m.add("TlsError", py.get_type::<errors::TlsError>())?;
    m.add(
        "EngineStateError",
        py.get_type::<errors::EngineStateError>(),
    )?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<mock::MockUpstream>()?;
    m.add_function(wrap_pyfunction!(hash_key, m)?)?;
    m.add_function(wrap_pyfunction!(count_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(address_is_public, m)?)?;
    m.add_function(wrap_pyfunction!(validate_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(engine_config_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(routing_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(journal::read_journal_batch, m)?)?;
    m.add_function(wrap_pyfunction!(journal::call_log_native_columns, m)?)?;
    m.add_function(wrap_pyfunction!(journal::call_log_column_docs, m)?)?;
    m.add_class::<journal::JournalBatch>()?;
    m.add_function(wrap_pyfunction!(journal::journal_instance_live, m)?)?;
    m.add_function(wrap_pyfunction!(mock::serve_mock_upstream, m)?)?;
    Ok(())
}
