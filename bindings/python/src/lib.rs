//! Python bindings of `dro_core`, built by maturin as `dro_core._dro_core`.
//! One file per core module; `error.rs` is the only place errors cross over.

use pyo3::prelude::*;

mod error;
mod loss;
mod solve;

#[pymodule]
fn _dro_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<loss::PyLoss>()?;
    m.add_class::<solve::PySolution>()?;
    m.add_class::<solve::PyCertificate>()?;
    m.add_function(wrap_pyfunction!(solve::_solve, m)?)?;
    m.add("CHUNK", dro_core::CHUNK)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
