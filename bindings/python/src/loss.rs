//! `dro_core.Loss`: a thin wrapper of [`dro_core::Loss`].

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

use crate::error::{float_arg, floats_arg, int_arg, positive, to_py};

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
    #[pyo3(signature = (k = None))]
    fn neg_log(k: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let k = match k {
            None => 6,
            Some(k) => positive("k", int_arg("k", k)?)?,
        };
        Ok(PyLoss { inner: dro_core::Loss::neg_log(k).map_err(to_py)? })
    }

    /// softplus(-z) (the DPO loss of a margin) by k tangents spread over [lo, hi].
    #[staticmethod]
    fn softplus(k: &Bound<'_, PyAny>, lo: &Bound<'_, PyAny>, hi: &Bound<'_, PyAny>) -> PyResult<Self> {
        let k = positive("k", int_arg("k", k)?)?;
        let (lo, hi) = (float_arg("lo", lo)?, float_arg("hi", hi)?);
        Ok(PyLoss { inner: dro_core::Loss::softplus(k, lo, hi).map_err(to_py)? })
    }

    /// max_k slopes[k] * z + intercepts[k] (convex).
    #[staticmethod]
    fn max_affine(slopes: &Bound<'_, PyAny>, intercepts: &Bound<'_, PyAny>) -> PyResult<Self> {
        let (slopes, intercepts) = (floats_arg("slopes", slopes)?, floats_arg("intercepts", intercepts)?);
        Ok(PyLoss { inner: dro_core::Loss::max_affine(slopes, intercepts).map_err(to_py)? })
    }

    /// Linear interpolation through (x[j], y[j]), extended linearly beyond the ends.
    #[staticmethod]
    fn interpolate(x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>) -> PyResult<Self> {
        let (x, y) = (floats_arg("x", x)?, floats_arg("y", y)?);
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
