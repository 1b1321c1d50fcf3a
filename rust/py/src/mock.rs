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
    server: Mutex<Option<MockServer>>,
}

#[pymethods]
impl MockUpstream {
    #[new]
    fn new(listen: String) -> Self {
        MockUpstream {
            listen,
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
                MockServer::start(&self.listen, MockDefaults::default()).map_err(mock_to_py)?;
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
}

/// Run the fake provider in the foreground until SIGINT/SIGTERM. The GIL is released
/// while waiting and retaken briefly to let Python's signal handlers run.
#[pyfunction]
pub(crate) fn serve_mock_upstream(py: Python<'_>, listen: &str) -> PyResult<()> {
    let server = py
        .detach(|| MockServer::start(listen, MockDefaults::default()))
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
