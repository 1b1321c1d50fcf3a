//! `_core.read_journal` and `_core.journal_instance_live`: the record journal read back
//! for ingestion, as the same column batches the call log stores.

use std::path::Path;

use onetoken_gateway::journal_reader;
use onetoken_gateway::CallRecord;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// Up to `max_records` records of the segment at `path` from byte `offset`, as
/// `(columns or None, next_offset, bad_lines)`. Whole lines only; `complete` also consumes
/// (as bad) a trailing line without `\n`. OSError when the file cannot be read.
#[pyfunction]
pub(crate) fn read_journal<'py>(
    py: Python<'py>,
    path: &str,
    offset: u64,
    max_records: usize,
    complete: bool,
) -> PyResult<(Option<Bound<'py, PyDict>>, u64, u64)> {
    let read =
        py.detach(|| journal_reader::read_segment(Path::new(path), offset, max_records, complete))?;
    let batch = if read.records.is_empty() {
        None
    } else {
        Some(columns(py, &read.records)?)
    };
    Ok((batch, read.next_offset, read.bad_lines))
}

/// Whether the engine instance owning `journal-<instance>.lock` at `lock_path` is alive
/// (holds its lock). False when the file does not exist.
#[pyfunction]
pub(crate) fn journal_instance_live(py: Python<'_>, lock_path: &str) -> PyResult<bool> {
    Ok(py.detach(|| journal_reader::instance_live(Path::new(lock_path)))?)
}

/// Column-oriented batch, keys in contract order.
pub(crate) fn columns<'py>(
    py: Python<'py>,
    records: &[CallRecord],
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    macro_rules! column {
        ($name:ident) => {
            out.set_item(
                stringify!($name),
                PyList::new(py, records.iter().map(|r| &r.$name))?,
            )?;
        };
    }
    column!(ts);
    column!(request_id);
    column!(org_id);
    column!(account_id);
    column!(key_id);
    column!(path);
    column!(model_requested);
    column!(model_served);
    column!(provider);
    column!(prompt_tokens);
    column!(completion_tokens);
    column!(cached_tokens);
    column!(usage_source);
    column!(cost);
    column!(status);
    column!(error_code);
    column!(latency_us);
    column!(ttfb_us);
    column!(streamed);
    column!(source_ip);
    column!(user_agent);
    column!(rate_limit);
    column!(attempts);
    column!(guard_flags);
    Ok(out)
}
