//! `dro_core.Loss`: a thin wrapper of [`dro_core::Loss`].

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

use crate::error::{positive, to_py};

/// A continuous piecewise-linear loss. Build one with `Loss.neg_log`,
/// `Loss.softplus`, `Loss.max_affine` or `Loss.interpolate`.
#[pyclass(frozen, from_py_object, name = "Loss", module = "dro_core")]
#[derive(Clone)]
pub struct PyLoss {
    pub inner: dro_core::Loss,
}

#[pymethods]
impl PyLoss {
    /// The paper's default: tangents of -log at j/k, j = 1..k; support [0, 1].
    #[staticmethod]
    #[pyo3(signature = (k = 6))]
    fn neg_log(k: i64) -> PyResult<Self> {
        let k = positive("k", k)?;
        Ok(PyLoss { inner: dro_core::Loss::neg_log(k).map_err(to_py)? })
    }

    /// softplus(-z) (the DPO loss of a margin) by k tangents spread over [lo, hi].
    #[staticmethod]
    fn softplus(k: i64, lo: f64, hi: f64) -> PyResult<Self> {
        let k = positive("k", k)?;
        Ok(PyLoss { inner: dro_core::Loss::softplus(k, lo, hi).map_err(to_py)? })
    }

    /// max_k slopes[k] * z + intercepts[k] (convex).
    #[staticmethod]
    fn max_affine(slopes: Vec<f64>, intercepts: Vec<f64>) -> PyResult<Self> {
        Ok(PyLoss { inner: dro_core::Loss::max_affine(slopes, intercepts).map_err(to_py)? })
    }

    /// Linear interpolation through (x[j], y[j]), extended linearly beyond the ends.
    #[staticmethod]
    fn interpolate(x: Vec<f64>, y: Vec<f64>) -> PyResult<Self> {
        Ok(PyLoss { inner: dro_core::Loss::interpolate(x, y).map_err(to_py)? })
    }

    /// The support the loss was built for, or None.
    #[getter]
    fn natural_support(&self) -> Option<(f64, f64)> {
        self.inner.natural_support()
    }

    /// Whether the loss is convex.
    #[getter]
    fn is_convex(&self) -> bool {
        self.inner.is_convex()
    }

    /// ℓ at each point of z (a 1-D float64 array).
    fn __call__<'py>(&self, py: Python<'py>, z: PyReadonlyArray1<'py, f64>) -> Bound<'py, PyArray1<f64>> {
        let v: Vec<f64> = z.as_array().iter().map(|&x| self.inner.eval(x)).collect();
        PyArray1::from_vec(py, v)
    }

    /// The right derivative of ℓ at each point of z.
    fn slope<'py>(&self, py: Python<'py>, z: PyReadonlyArray1<'py, f64>) -> Bound<'py, PyArray1<f64>> {
        let v: Vec<f64> = z.as_array().iter().map(|&x| self.inner.slope(x)).collect();
        PyArray1::from_vec(py, v)
    }

    /// The candidate points (location, ℓ) on [lo, hi]: the ends and the concave kinks inside.
    fn candidates(&self, lo: f64, hi: f64) -> Vec<(f64, f64)> {
        self.inner.candidates(lo, hi)
    }

    fn __repr__(&self) -> String {
        format!("Loss.{}", self.inner.name())
    }
}

