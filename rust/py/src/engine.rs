//! `onetoken._core.Engine`: a thin wrapper; blocking calls release the GIL.

use std::time::Duration;

use onetoken_gateway::{Dropped, Engine as CoreEngine, EngineConfig};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::to_py;

/// The gateway: a hyper server on a tokio runtime that Rust owns.
#[pyclass(module = "onetoken._core", name = "Engine", frozen)]
pub(crate) struct Engine {
    inner: CoreEngine,
}

#[pymethods]
impl Engine {
    #[new]
    fn new(config_json: &[u8]) -> PyResult<Self> {
        let config = EngineConfig::from_json(config_json).map_err(to_py)?;
        Ok(Engine {
            inner: CoreEngine::new(config).map_err(to_py)?,
        })
    }

    fn start(&self, py: Python<'_>) -> PyResult<String> {
        let addr = py.detach(|| self.inner.start()).map_err(to_py)?;
        Ok(addr.to_string())
    }

    fn load_snapshot(&self, py: Python<'_>, snapshot_json: &[u8]) -> PyResult<u64> {
        py.detach(|| self.inner.load_snapshot(snapshot_json))
            .map_err(to_py)
    }

    fn snapshot_dropped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        dropped_list(py, &self.inner.snapshot_dropped())
    }

    fn set_control_status(&self, reachable: bool) {
        self.inner.set_control_status(reachable);
    }

    #[pyo3(signature = (grace_seconds=None))]
    fn stop(&self, py: Python<'_>, grace_seconds: Option<f64>) {
        match grace_seconds {
            Some(secs) => {
                let grace = Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::ZERO);
                py.detach(|| self.inner.stop(grace));
            }
            None => py.detach(|| self.inner.drain()),
        }
    }

    fn metrics_text(&self) -> String {
        self.inner.metrics_text()
    }

    fn org_spend<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (org, spent, reserved) in self.inner.org_spend() {
            out.set_item(org, (spent, reserved))?;
        }
        Ok(out)
    }

    fn key_spend<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (key, spent, reserved) in self.inner.key_spend() {
            out.set_item(key, (spent, reserved))?;
        }
        Ok(out)
    }

    fn application_spend<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (app, spent, reserved) in self.inner.application_spend() {
            out.set_item(app, (spent, reserved))?;
        }
        Ok(out)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let out = PyDict::new(py);
        out.set_item("records_total", s.records_total)?;
        out.set_item("in_flight", s.in_flight)?;
        out.set_item("snapshot_version", s.snapshot_version)?;
        out.set_item("journal_segments", s.journal_segments)?;
        out.set_item("journal_errors", s.journal_errors)?;
        Ok(out)
    }

    #[getter]
    fn address(&self) -> Option<String> {
        self.inner.address().map(|a| a.to_string())
    }

    /// The metrics listener's bound address while running (None without `metrics_listen`).
    #[getter]
    fn metrics_address(&self) -> Option<String> {
        self.inner.metrics_address().map(|a| a.to_string())
    }

    #[getter]
    fn running(&self) -> bool {
        self.inner.running()
    }

    #[getter]
    fn instance_id(&self) -> &str {
        self.inner.instance_id()
    }
}

/// Snapshot entries left out, as `{"kind", "id", "field", "reason"}` dicts.
pub(crate) fn dropped_list<'py>(
    py: Python<'py>,
    dropped: &[Dropped],
) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for d in dropped {
        let entry = PyDict::new(py);
        entry.set_item("kind", d.kind)?;
        entry.set_item("id", &d.id)?;
        entry.set_item("field", d.field)?;
        entry.set_item("reason", d.reason)?;
        out.append(entry)?;
    }
    Ok(out)
}
