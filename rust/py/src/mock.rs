//! `onetoken._core.MockUpstream` and `serve_mock_upstream`.

use std::time::Duration;

use onetoken_mock_upstream::{MockDefaults, MockServer};
use parking_lot::Mutex;
use pyo3::prelude::*;

use crate::errors::{mock_to_py, EngineStateError};

/// The bundled fake model provider (OpenAI-compatible), on its own runtime.
#[pyclass(module = "onetoken._core", name = "MockUpstream", frozen)]
pub(crate) struct MockUpstream {
    listen: String,
    defaults: MockDefaults,
    server: Mutex<Option<MockServer>>,
}

/// Server-wide defaults; each request's `mock` controls still override them.
fn defaults(chunks: Option<u32>, delay_ms: Option<u64>, latency_ms: Option<u64>) -> MockDefaults {
    let base = MockDefaults::default();
    MockDefaults {
        chunks: chunks.unwrap_or(base.chunks),
        delay_ms: delay_ms.unwrap_or(base.delay_ms),
        latency_ms: latency_ms.unwrap_or(base.latency_ms),
    }
}

#[pymethods]
impl MockUpstream {
    #[new]
    #[pyo3(signature = (listen, *, chunks=None, delay_ms=None, latency_ms=None))]
    fn new(
        listen: String,
        chunks: Option<u32>,
        delay_ms: Option<u64>,
        latency_ms: Option<u64>,
    ) -> Self {
        MockUpstream {
            listen,
            defaults: defaults(chunks, delay_ms, latency_ms),
            server: Mutex::new(None),
        }
    }

    fn start(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| {
            let mut slot = self.server.lock();
            if slot.is_some() {
                return Err(EngineStateError::new_err(
                    "mock upstream is already running",
                ));
            }
            let server =
                MockServer::start(&self.listen, self.defaults.clone()).map_err(mock_to_py)?;
            let addr = server.addr().to_string();
            *slot = Some(server);
            Ok(addr)
        })
    }

    fn stop(&self, py: Python<'_>) {
        let server = self.server.lock().take();
        if let Some(server) = server {
            py.detach(|| server.stop());
        }
    }

    fn request_count(&self) -> u64 {
        self.server
            .lock()
            .as_ref()
            .map_or(0, MockServer::request_count)
    }

    /// Bytes of audio uploads received so far (see `MockServer::upload_bytes`).
    fn upload_bytes(&self) -> u64 {
        self.server
            .lock()
            .as_ref()
            .map_or(0, MockServer::upload_bytes)
    }
}

/// Run the fake provider in the foreground until SIGINT/SIGTERM. The GIL is released
/// while waiting and retaken briefly to let Python's signal handlers run.
#[pyfunction]
#[pyo3(signature = (listen, *, chunks=None, delay_ms=None, latency_ms=None))]
pub(crate) fn serve_mock_upstream(
    py: Python<'_>,
    listen: &str,
    chunks: Option<u32>,
    delay_ms: Option<u64>,
    latency_ms: Option<u64>,
) -> PyResult<()> {
    let defaults = defaults(chunks, delay_ms, latency_ms);
    let server = py
        .detach(|| MockServer::start(listen, defaults))
        .map_err(mock_to_py)?;
    eprintln!(
        "onetoken mock upstream listening on http://{}",
        server.addr()
    );
    let result = loop {
        py.detach(|| std::thread::sleep(Duration::from_millis(100)));
        if let Err(e) = py.check_signals() {
            break Err(e);
        }
    };
    py.detach(|| server.stop());
    // Ctrl-C is the normal way to stop the foreground server.
    match result {
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) => Ok(()),
        other => other,
    }
}
