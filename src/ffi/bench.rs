//! `cage bench ffi`: what the C boundary costs. Not part of the C ABI: nothing here is `extern "C"` or
//! `#[repr(C)]`, so `include/cage.h` does not see it; it calls that surface the way a C program would.

use super::{CageSolver, CageStatus, cage_options_default, cage_solve_f32, cage_solver_create, cage_solver_destroy};
use crate::error::{CageError, Result};
use crate::problem::{Batch, BatchInput, Normalize};
use crate::solver::{Method, SolveOptions};
use std::time::Instant;

/// `cage bench ffi`: the time of a k = 50, J = 2, B = 1 solve through [`cage_solve_f32`] and through the direct
/// Rust calls a Rust user would make for the same work (`Batch::new` from the slices, then `solve`), in the same
/// process on the same inputs; the difference is what the C boundary costs.
pub fn overhead(calls: usize) -> Result<String> {
    let (n, j) = (50usize, 2usize);
    // Deterministic inputs shaped like a decoding step (peaked base, spread values).
    let base: Vec<f32> = (0..n).map(|a| -0.15 * a as f32 - 0.5 * ((a * 7919 % 13) as f32 / 13.0)).collect();
    let values: Vec<f32> = (0..j * n).map(|i| ((i * 2654435761usize) % 1000) as f32 / 250.0 - 2.0).collect();
    let weights = [0.6f32, 0.4];
    let mut policy = vec![0f32; n];
    let mut payoffs = vec![0f32; j];
    let opts = cage_options_default();
    let mut solver: *mut CageSolver = std::ptr::null_mut();
    // SAFETY: valid options and out pointer.
    let st = unsafe { cage_solver_create(&opts, &mut solver) };
    if st != CageStatus::CageOk {
        return Err(CageError::InvalidArgument("cage_solver_create failed".into()));
    }
    let rust_call = || -> Result<()> {
        let batch = Batch::new(BatchInput {
            rows: 1,
            candidates: n,
            principals: j,
            base_logprobs: base.to_vec(),
            values: values.to_vec(),
            weights: weights.to_vec(),
            tau: vec![0.1],
            normalize: Normalize::ShiftMin,
            names: vec![],
        })?;
        std::hint::black_box(crate::solver::solve(&batch, &SolveOptions::new(Method::Exact))?);
        Ok(())
    };
    let mut c_call = || {
        // SAFETY: every buffer has the documented length; the solver is used by this thread only.
        let st = unsafe {
            cage_solve_f32(
                solver,
                1,
                n,
                j,
                base.as_ptr(),
                values.as_ptr(),
                weights.as_ptr(),
                std::ptr::null(),
                policy.as_mut_ptr(),
                payoffs.as_mut_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        std::hint::black_box(st);
    };
    // Median over batches of 100 calls, alternating the two so that both see the same machine state.
    let batches = (calls / 100).max(5);
    let (mut rust_ns, mut c_ns) = (Vec::with_capacity(batches), Vec::with_capacity(batches));
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..100 {
            rust_call()?;
        }
        rust_ns.push(t.elapsed().as_nanos() as f64 / 100.0);
        let t = Instant::now();
        for _ in 0..100 {
            c_call();
        }
        c_ns.push(t.elapsed().as_nanos() as f64 / 100.0);
    }
    // SAFETY: created above, destroyed once.
    unsafe { cage_solver_destroy(solver) };
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (r, c) = (median(&mut rust_ns), median(&mut c_ns));
    Ok(format!(
        "ffi overhead, k = 50, J = 2, B = 1, exact, f32, CPU ({} calls each):\n  direct Rust call  {:8.0} ns\n  \
         cage_solve_f32    {:8.0} ns\n  C boundary cost   {:8.0} ns",
        batches * 100,
        r,
        c,
        c - r
    ))
}
