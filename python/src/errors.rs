//! [`CageError`] as Python exceptions: bad input is a `ValueError` carrying the CLI's message, a missing GPU or a
//! failing CUDA call a `RuntimeError`, a file that cannot be read an `OSError`.

use cage::CageError;
use pyo3::PyErr;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};

/// The Python exception of a library error, with the message the CLI prints.
pub fn to_py(e: CageError) -> PyErr {
    let msg = e.to_string();
    match e {
        CageError::NoGpu(_) | CageError::Cuda(_) => PyRuntimeError::new_err(msg),
        CageError::Io { .. } => PyOSError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// A `ValueError` with `msg`.
pub fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}
