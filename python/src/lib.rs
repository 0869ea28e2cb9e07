//! The `cage._cage` extension module: the solver on numpy arrays ([`solve`]), the copy-free device entry point
//! for CUDA tensors ([`device`]) the decoding engine ([`engine`]) and the merge of a sharded sweep ([`sweep`]). The pure-Python package `cage` wraps it
//! (python/cage); the Rust crate `cage` knows nothing of Python.

mod device;
mod engine;
mod errors;
mod solve;
mod sweep;

use pyo3::prelude::*;

#[pymodule]
fn _cage(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(solve::solve, m)?)?;
    m.add_function(wrap_pyfunction!(solve::rust_call_seconds, m)?)?;
    m.add_function(wrap_pyfunction!(device::solve_device_f32, m)?)?;
    m.add_function(wrap_pyfunction!(device::cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(sweep::sweep_check, m)?)?;
    m.add_function(wrap_pyfunction!(sweep::read_prompts, m)?)?;
    m.add_function(wrap_pyfunction!(sweep::write_sweep, m)?)?;
    m.add_class::<solve::Solution>()?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<engine::Results>()?;
    Ok(())
}
