//! `dro_core._solve` and `dro_core.Solution`.

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::error::{positive, to_py};
use crate::loss::PyLoss;

/// The exact worst case of every group and its dual certificate.
#[pyclass(frozen, name = "Solution", module = "dro_core")]
pub struct PySolution {
    /// Worst-case expected loss averaged over all N samples: sum_g n_g/N * V_g.
    #[pyo3(get)]
    value: f64,
    /// Mean loss at the data.
    #[pyo3(get)]
    empirical_value: f64,
    /// The dual objective; equals `value` up to rounding.
    #[pyo3(get)]
    dual_value: f64,
    /// Worst-case value of each group.
    #[pyo3(get)]
    group_values: Py<PyArray1<f64>>,
    /// Empirical value of each group.
    #[pyo3(get)]
    group_empirical_values: Py<PyArray1<f64>>,
    /// Dual value of each group.
    #[pyo3(get)]
    group_dual_values: Py<PyArray1<f64>>,
    /// Optimal multiplier of each group's budget (0 if the budget is not used up).
    #[pyo3(get)]
    lam: Py<PyArray1<f64>>,
    /// Mean transport of each group (<= eps).
    #[pyo3(get)]
    budget_used: Py<PyArray1<f64>>,
    /// Number of samples in each group.
    #[pyo3(get)]
    group_sizes: Py<PyArray1<i64>>,
    /// The label of each group.
    #[pyo3(get)]
    group_labels: Py<PyArray1<i64>>,
    /// Group index (into the per-group arrays) of each sample.
    #[pyo3(get)]
    group_index: Py<PyArray1<i64>>,
    /// Atom locations, (N, 2).
    #[pyo3(get)]
    loc: Py<PyArray2<f64>>,
    /// Atom masses, (N, 2); rows sum to 1.
    #[pyo3(get)]
    mass: Py<PyArray2<f64>>,
    /// xi - loc, (N, 2): the shift the leader subtracts.
    #[pyo3(get)]
    shift: Py<PyArray2<f64>>,
    /// Gradient-matching scalar weights, (N,).
    #[pyo3(get)]
    weights: Py<PyArray1<f64>>,
    /// The support used.
    #[pyo3(get)]
    support: (f64, f64),
    /// The radius used.
    #[pyo3(get)]
    eps: f64,
    /// What the certificate is recomputed from: the data and the loss solved.
    xi: Py<PyArray1<f64>>,
    loss: dro_core::Loss,
}

/// The proof that a `Solution` is optimal, recomputed from its atoms and the
/// data (see `Solution.certificate`). Each measure is 0 for a perfect answer.
#[pyclass(frozen, name = "Certificate", module = "dro_core")]
pub struct PyCertificate {
    inner: dro_core::Certificate,
}

#[pymethods]
impl PyCertificate {
    /// Whether every check holds within its tolerance: primal feasible, dual
    /// feasible, equal objectives. `assert sol.certificate().ok`.
    #[getter]
    fn ok(&self) -> bool {
        self.inner.is_optimal()
    }
    /// The names of the failing checks (empty when `ok`).
    #[getter]
    fn failures(&self) -> Vec<&'static str> {
        self.inner.failures()
    }
    /// max over groups of (mean transport - eps)+, recomputed from the atoms.
    #[getter]
    fn budget_excess(&self) -> f64 {
        self.inner.budget_excess
    }
    /// Largest distance of an atom outside the support.
    #[getter]
    fn support_violation(&self) -> f64 {
        self.inner.support_violation
    }
    /// The most negative mass, as a positive number.
    #[getter]
    fn negative_mass(&self) -> f64 {
        self.inner.negative_mass
    }
    /// max_i |sum_j mass_ij - 1|.
    #[getter]
    fn mass_sum_error(&self) -> f64 {
        self.inner.mass_sum_error
    }
    /// max over groups of (-lam)+.
    #[getter]
    fn negative_lam(&self) -> f64 {
        self.inner.negative_lam
    }
    /// max over groups of |primal - dual|, both recomputed.
    #[getter]
    fn gap(&self) -> f64 {
        self.inner.gap
    }
    /// max over groups of lam * (eps - transport)+ (complementary slackness).
    #[getter]
    fn slackness(&self) -> f64 {
        self.inner.slackness
    }
    /// max over groups of |reported value - recomputed primal value|.
    #[getter]
    fn value_mismatch(&self) -> f64 {
        self.inner.value_mismatch
    }
    /// max over groups of |reported budget_used - recomputed transport|.
    #[getter]
    fn budget_mismatch(&self) -> f64 {
        self.inner.budget_mismatch
    }
    /// Tolerance of the value checks (rel * the largest |loss| met).
    #[getter]
    fn tol_value(&self) -> f64 {
        self.inner.tol_value
    }
    /// Tolerance of the transport and support checks (rel * max(1, |lo|, |hi|)).
    #[getter]
    fn tol_transport(&self) -> f64 {
        self.inner.tol_transport
    }
    /// Tolerance of the mass checks (rel).
    #[getter]
    fn tol_mass(&self) -> f64 {
        self.inner.tol_mass
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "Certificate(ok={}, budget_excess={:.3e}, support_violation={:.3e}, negative_mass={:.3e}, \
             mass_sum_error={:.3e}, negative_lam={:.3e}, gap={:.3e}, slackness={:.3e})",
            if c.is_optimal() { "True" } else { "False" },
            c.budget_excess,
            c.support_violation,
            c.negative_mass,
            c.mass_sum_error,
            c.negative_lam,
            c.gap,
            c.slackness
        )
    }
}

#[pymethods]
impl PySolution {
    /// |value - dual_value|.
    #[getter]
    fn dual_gap(&self) -> f64 {
        (self.value - self.dual_value).abs()
    }

    /// The optimality proof, recomputed from the atoms, the data and the loss:
    /// primal feasibility (transport <= eps in every group, atoms inside the
    /// support, masses >= 0 summing to 1), dual feasibility (lam >= 0) and
    /// equal primal and dual values, at relative tolerance `rel`.
    #[pyo3(signature = (rel = 1e-9))]
    fn certificate(&self, py: Python<'_>, rel: f64) -> PyResult<PyCertificate> {
        let sol = self.to_core(py)?;
        let xi = self.xi.bind(py).readonly();
        let x = xi.as_slice().map_err(|_| PyValueError::new_err("xi: not contiguous"))?;
        let inner = sol.certificate_with(x, &self.loss, rel).map_err(to_py)?;
        Ok(PyCertificate { inner })
    }

    fn __repr__(&self) -> String {
        format!(
            "Solution(value={}, empirical_value={}, dual_gap={:.3e}, groups={}, eps={})",
            self.value,
            self.empirical_value,
            self.dual_gap(),
            Python::attach(|py| self.lam.bind(py).len().unwrap_or(0)),
            self.eps
        )
    }
}

impl PySolution {
    /// The core solution these arrays hold (for the certificate).
    fn to_core(&self, py: Python<'_>) -> PyResult<dro_core::Solution> {
        let v1 = |a: &Py<PyArray1<f64>>| -> PyResult<Vec<f64>> { Ok(a.bind(py).readonly().as_slice()?.to_vec()) };
        let v2 = |a: &Py<PyArray2<f64>>| -> PyResult<Vec<f64>> { Ok(a.bind(py).readonly().as_slice()?.to_vec()) };
        let vu = |a: &Py<PyArray1<i64>>| -> PyResult<Vec<usize>> {
            Ok(a.bind(py).readonly().as_slice()?.iter().map(|&g| g as usize).collect())
        };
        Ok(dro_core::Solution {
            value: self.value,
            empirical_value: self.empirical_value,
            dual_value: self.dual_value,
            group_values: v1(&self.group_values)?,
            group_empirical_values: v1(&self.group_empirical_values)?,
            group_dual_values: v1(&self.group_dual_values)?,
            lam: v1(&self.lam)?,
            budget_used: v1(&self.budget_used)?,
            group_sizes: vu(&self.group_sizes)?,
            group_labels: self.group_labels.bind(py).readonly().as_slice()?.to_vec(),
            group_index: vu(&self.group_index)?,
            loc: v2(&self.loc)?,
            mass: v2(&self.mass)?,
            shift: v2(&self.shift)?,
            weights: v1(&self.weights)?,
            support: self.support,
            eps: self.eps,
        })
    }
}

fn arr1(py: Python<'_>, v: Vec<f64>) -> Py<PyArray1<f64>> {
    PyArray1::from_vec(py, v).unbind()
}

fn arr1_i(py: Python<'_>, v: impl Iterator<Item = i64>) -> Py<PyArray1<i64>> {
    PyArray1::from_vec(py, v.collect()).unbind()
}

fn arr2(py: Python<'_>, v: Vec<f64>) -> PyResult<Py<PyArray2<f64>>> {
    let n = v.len() / 2;
    Ok(PyArray1::from_vec(py, v).reshape([n, 2])?.unbind())
}

/// The native solve. `dro_core.solve` (Python) normalises the arguments and calls this.
///
/// `group_size` > 0 means consecutive chunks; `labels` means one label per sample;
/// neither means one global ball.
#[pyfunction]
#[pyo3(signature = (xi, eps, group_size, labels, loss, support, threads))]
#[allow(clippy::too_many_arguments)]
pub fn _solve(
    py: Python<'_>,
    xi: PyReadonlyArray1<'_, f64>,
    eps: f64,
    group_size: Option<i64>,
    labels: Option<PyReadonlyArray1<'_, i64>>,
    loss: Option<PyLoss>,
    support: Option<(f64, f64)>,
    threads: Option<i64>,
) -> PyResult<PySolution> {
    let x = xi.as_slice().map_err(|_| PyValueError::new_err("xi: must be a contiguous 1-D float64 array"))?;
    let labels_slice = match &labels {
        Some(l) => Some(
            l.as_slice().map_err(|_| PyValueError::new_err("groups: labels must be a contiguous 1-D int64 array"))?,
        ),
        None => None,
    };
    let groups = match (group_size, labels_slice) {
        (Some(_), Some(_)) => return Err(PyValueError::new_err("groups: give a group size or labels, not both")),
        (Some(g), None) => dro_core::Groups::Chunks(positive("groups", g)?),
        (None, Some(l)) => dro_core::Groups::Labels(l),
        (None, None) => dro_core::Groups::Global,
    };
    let threads = threads.map(|t| positive("threads", t)).transpose()?;
    let loss = match loss {
        Some(l) => l.inner,
        None => dro_core::Loss::neg_log(6).map_err(to_py)?,
    };
    let opts = dro_core::Options { support, threads };
    // the heavy part runs without the GIL
    let sol = py.detach(|| dro_core::solve(x, eps, groups, &loss, &opts)).map_err(to_py)?;
    let xi_kept = xi.as_unbound().clone_ref(py);
    Ok(PySolution {
        value: sol.value,
        empirical_value: sol.empirical_value,
        dual_value: sol.dual_value,
        group_values: arr1(py, sol.group_values),
        group_empirical_values: arr1(py, sol.group_empirical_values),
        group_dual_values: arr1(py, sol.group_dual_values),
        lam: arr1(py, sol.lam),
        budget_used: arr1(py, sol.budget_used),
        group_sizes: arr1_i(py, sol.group_sizes.iter().map(|&s| s as i64)),
        group_labels: arr1_i(py, sol.group_labels.into_iter()),
        group_index: arr1_i(py, sol.group_index.iter().map(|&g| g as i64)),
        loc: arr2(py, sol.loc)?,
        mass: arr2(py, sol.mass)?,
        shift: arr2(py, sol.shift)?,
        weights: arr1(py, sol.weights),
        support: sol.support,
        eps: sol.eps,
        xi: xi_kept,
        loss,
    })
}
