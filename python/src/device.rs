//! The copy-free solve of CUDA tensors: the Python side preprocesses the values on the device and passes raw
//! pointers and the caller's stream here; the exact equilibrium is queued on that stream (the C ABI's
//! `cage_solve_device_f32`). With `emulated`, the pointers are host memory and the kernels run on the host
//! emulation: the same path, testable without a GPU.

use crate::errors::{to_py, value_error};
use cage::backend::cuda_usable;
use cage::gpu::{DeviceEquilibrium, EqOptions, with_shared_emulator, with_shared_gpu};
use pyo3::prelude::*;

/// Whether a CUDA GPU is usable by cage in this process.
#[pyfunction]
pub fn cuda_available() -> bool {
    cuda_usable().is_ok()
}

/// Queues the exact equilibrium of B x J x N f32 game values (preprocessed, weights applied) on `stream`.
/// Pointers are device addresses (host addresses with `emulated`); `payoffs` and `stats` may be 0.
#[pyfunction]
#[pyo3(signature = (rows, candidates, principals, base, values, tau, policy, payoffs, stats, stream, emulated, tol=None, max_iter=None))]
#[allow(clippy::too_many_arguments)]
pub fn solve_device_f32(
    py: Python<'_>,
    rows: usize,
    candidates: usize,
    principals: usize,
    base: u64,
    values: u64,
    tau: u64,
    policy: u64,
    payoffs: u64,
    stats: u64,
    stream: usize,
    emulated: bool,
    tol: Option<f64>,
    max_iter: Option<u32>,
) -> PyResult<()> {
    for (what, p) in [("base_logprobs", base), ("values", values), ("tau", tau), ("policy", policy)] {
        if p == 0 {
            return Err(value_error(format!("{what} is a null pointer")));
        }
    }
    let mut opts = EqOptions::default();
    if let Some(t) = tol {
        opts.tol = t;
    }
    if let Some(m) = max_iter {
        opts.max_iter = m;
    }
    let job = DeviceEquilibrium { rows, candidates, principals, base, values, tau, policy, payoffs, stats, stream };
    // SAFETY: the Python caller (cage._device) passes pointers of live tensors of the documented sizes, on this
    // process's device (host arrays with `emulated`), kept alive until the stream is synchronised.
    let run = |g: &mut cage::gpu::Gpu| unsafe { g.equilibrium_device(&job, &opts) };
    if emulated {
        py.detach(|| with_shared_emulator(run)).map_err(to_py)
    } else {
        cuda_usable().map_err(to_py)?;
        py.detach(|| with_shared_gpu(run)).map_err(to_py)
    }
}
