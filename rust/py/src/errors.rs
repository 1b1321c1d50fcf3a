//! The one mapping from Rust errors to the Python exception hierarchy.

use onetoken_gateway::Error;
use pyo3::exceptions::PyException;
use pyo3::PyErr;

pyo3::create_exception!(
    _core,
    OnetokenError,
    PyException,
    "Base class of every error raised by the extension."
);
pyo3::create_exception!(
    _core,
    ConfigError,
    OnetokenError,
    "Engine configuration or snapshot JSON was rejected."
);
pyo3::create_exception!(
    _core,
    BindError,
    OnetokenError,
    "The listener could not bind its address."
);
pyo3::create_exception!(
    _core,
    TlsError,
    OnetokenError,
    "The certificate or private key could not be loaded."
);
pyo3::create_exception!(
    _core,
    EngineStateError,
    OnetokenError,
    "The call does not fit the engine's state."
);

/// Every engine error, exhaustively, onto its exception class.
pub(crate) fn to_py(err: Error) -> PyErr {
    match err {
        Error::Config(m) => ConfigError::new_err(m),
        Error::Bind(m) => BindError::new_err(m),
        Error::Tls(m) => TlsError::new_err(m),
        Error::State(m) => EngineStateError::new_err(m),
    }
}

/// Mock upstream errors are start-up failures: a bad or busy address.
pub(crate) fn mock_to_py(message: String) -> PyErr {
    BindError::new_err(message)
}
