//! The one place where core errors cross into Python.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};
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

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// A Python int argument (not a bool, not a float such as 2.5): `ValueError`
/// naming `arg` otherwise, like every other bad argument.
pub fn int_arg(arg: &str, v: &Bound<'_, PyAny>) -> PyResult<i64> {
    if v.is_instance_of::<PyBool>() || !(v.is_instance_of::<PyInt>() || v.hasattr("__index__")?) {
        return Err(PyValueError::new_err(format!("{arg}: must be an int, got {} {}", type_name(v), v.repr()?)));
    }
    v.extract::<i64>().map_err(|_| {
        PyValueError::new_err(format!(
            "{arg}: must fit in 64 bits, got {}",
            v.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })
}

/// A real-number argument (int or float, not a bool or a string).
pub fn float_arg(arg: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    if v.is_instance_of::<PyBool>()
        || !(v.is_instance_of::<PyFloat>() || v.is_instance_of::<PyInt>() || v.hasattr("__float__")?)
    {
        return Err(PyValueError::new_err(format!("{arg}: must be a real number, got {}", type_name(v))));
    }
    v.extract::<f64>().map_err(|_| PyValueError::new_err(format!("{arg}: must be a real number, got {}", type_name(v))))
}

/// A sequence of real numbers (list, tuple, 1-D array).
pub fn floats_arg(arg: &str, v: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    if v.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyValueError::new_err(format!("{arg}: must be a sequence of real numbers, got str")));
    }
    let it = v.try_iter().map_err(|_| {
        PyValueError::new_err(format!("{arg}: must be a sequence of real numbers, got {}", type_name(v)))
    })?;
    let mut out = Vec::new();
    for (i, item) in it.enumerate() {
        let item = item?;
        out.push(float_arg(&format!("{arg}[{i}]"), &item)?);
    }
    Ok(out)
}
