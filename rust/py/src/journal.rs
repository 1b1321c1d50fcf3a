//! `_core.read_journal_batch` and `_core.journal_instance_live`: the record journal read
//! back for ingestion, as a call_log block and aggregated groups.

use std::path::Path;

use onetoken_gateway::journal_reader;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

/// One read of a journal segment, as ingestion consumes it (see `_core.pyi`).
#[pyclass(module = "onetoken._core", name = "JournalBatch", frozen, get_all)]
pub(crate) struct JournalBatch {
    native: Py<PyBytes>,
    rows: usize,
    next_offset: u64,
    bad_lines: u64,
    min_ts: i64,
    max_ts: i64,
    usage: Py<PyList>,
    calls: Py<PyList>,
    owners: Py<PyDict>,
    failures: Py<PyList>,
    sources: Py<PyList>,
}

/// Up to `max_records` records of the segment at `path` from byte `offset`, none past
/// byte `until` when given: whole lines only; `complete` also consumes (as bad) a trailing line without `\n`. OSError when the
/// file cannot be read.
#[pyfunction]
#[pyo3(signature = (path, offset, max_records, complete, *, until=None))]
pub(crate) fn read_journal_batch(
    py: Python<'_>,
    path: &str,
    offset: u64,
    max_records: usize,
    complete: bool,
    until: Option<u64>,
) -> PyResult<JournalBatch> {
    let read = py.detach(|| {
        journal_reader::read_batch(Path::new(path), offset, max_records, complete, until)
    })?;
    let b = read.batch;
    let usage = PyList::empty(py);
    for g in &b.usage {
        usage.append((
            &g.org_id,
            &g.key_id,
            &g.model,
            g.day,
            g.calls,
            g.cost,
            g.first_ts,
            &g.application_id,
        ))?;
    }
    let calls = PyList::empty(py);
    for g in &b.calls {
        calls.append((&g.key_id, g.status, &g.error_code, &g.provider, g.calls))?;
    }
    let owners = PyDict::new(py);
    for (key, org, account) in &b.owners {
        owners.set_item(key, (org, account))?;
    }
    let failures = PyList::empty(py);
    for g in &b.failures {
        failures.append((
            &g.org_id,
            &g.account_id,
            &g.key_id,
            &g.source_ip,
            g.status,
            &g.error_code,
            &g.provider,
            g.calls,
            (&g.first_request_id, &g.first_path, &g.first_user_agent),
        ))?;
    }
    let sources = PyList::empty(py);
    for (key, ips) in &b.sources {
        sources.append((key, PyList::new(py, ips)?))?;
    }
    Ok(JournalBatch {
        native: PyBytes::new(py, &b.native).unbind(),
        rows: b.rows,
        next_offset: read.next_offset,
        bad_lines: read.bad_lines,
        min_ts: b.min_ts,
        max_ts: b.max_ts,
        usage: usage.unbind(),
        calls: calls.unbind(),
        owners: owners.unbind(),
        failures: failures.unbind(),
        sources: sources.unbind(),
    })
}

/// call_log's (column, ClickHouse type) pairs as the Native block encodes them.
#[pyfunction]
pub(crate) fn call_log_native_columns() -> Vec<(&'static str, &'static str)> {
    journal_reader::COLUMNS.to_vec()
}

/// call_log's (column, description) pairs in table order: each column's doc comment in
/// the engine's declaration, its lines joined by spaces.
#[pyfunction]
pub(crate) fn call_log_column_docs() -> Vec<(&'static str, String)> {
    journal_reader::COLUMN_DOCS
        .iter()
        .map(|&(name, doc)| (name, doc.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect()
}

/// Whether the engine instance owning `journal-<instance>.lock` at `lock_path` is alive
/// (holds its lock). False when the file does not exist.
#[pyfunction]
pub(crate) fn journal_instance_live(py: Python<'_>, lock_path: &str) -> PyResult<bool> {
    Ok(py.detach(|| journal_reader::instance_live(Path::new(lock_path)))?)
}
