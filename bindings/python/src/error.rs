//! The one place where core errors cross into Python.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// Bad input becomes `ValueError` (its message starts with the argument's
/// name); a thread-pool failure becomes `RuntimeError`.
pub fn to_py(e: dro_core::DroError) -> PyErr {
    match e {
        dro_core::DroError::InvalidArgument { .. } => PyValueError::new_err(e.to_string()),
        dro_core::DroError::ThreadPool(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// A Python int that must be a positive count.
pub fn positive(arg: &str, v: i64) -> Result<usize, PyErr> {
    if v < 1 {
        Err(PyValueError::new_err(format!("{arg}: must be >= 1, got {v}")))
    } else {
        Ok(v as usize)
    }
}
