//! The copy-free device entry point of the C ABI, run on the host emulation of the CUDA kernels (where device
//! pointers are host pointers) and compared with the CPU solver; on a machine without a GPU the CUDA backend
//! is a clear NO_GPU error.

use cage::ffi::*;
use cage::solver::{Method, SolveOptions, solve};
use cage::{Batch, BatchInput, Normalize};
use std::ptr::{null, null_mut};

fn solver(backend: CageBackend) -> (CageStatus, *mut CageSolver) {
    let mut o = cage_options_default();
    o.backend = backend as i32;
    let mut s = null_mut();
    // SAFETY: valid options and out pointer.
    (unsafe { cage_solver_create(&o, &mut s) }, s)
}

#[test]
fn device_solve_on_the_emulation_matches_the_cpu() {
    let (rows, n, j) = (3usize, 37usize, 2usize);
    let mut seed = 12345u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32
    };
    let base: Vec<f32> = (0..rows * n).map(|_| -6.0 * next()).collect();
    let values: Vec<f32> = (0..rows * j * n).map(|_| 2.0 * next()).collect();
    let tau = vec![0.1f32, 0.3, 0.05];
    let want = solve(
        &Batch::new(BatchInput {
            rows,
            candidates: n,
            principals: j,
            base_logprobs: base.clone(),
            values: values.clone(),
            weights: vec![1.0; rows * j],
            tau: tau.clone(),
            normalize: Normalize::None,
            names: vec![],
        })
        .unwrap(),
        &SolveOptions::new(Method::Exact),
    )
    .unwrap();

    let (st, s) = solver(CageBackend::CageBackendEmulated);
    assert_eq!(st, CageStatus::CageOk);
    let (mut policy, mut payoffs, mut stats) = (vec![0f32; rows * n], vec![0f32; rows * j], vec![0f32; rows * 3]);
    // SAFETY: under the emulation device memory is host memory; every buffer has the documented length.
    let st = unsafe {
        cage_solve_device_f32(
            s,
            rows,
            n,
            j,
            base.as_ptr(),
            values.as_ptr(),
            tau.as_ptr(),
            policy.as_mut_ptr(),
            payoffs.as_mut_ptr(),
            stats.as_mut_ptr(),
            null_mut(),
        )
    };
    assert_eq!(st, CageStatus::CageOk);
    for r in 0..rows {
        assert_eq!(stats[r * 3 + 2], 1.0, "row {r} converged");
        for a in 0..n {
            let (got, exp) = (policy[r * n + a], want.policy[r * n + a]);
            assert!((got - exp).abs() < 2e-5, "row {r}, candidate {a}: {got} vs {exp}");
        }
    }
    for (got, exp) in payoffs.iter().zip(&want.payoffs) {
        assert!((got - exp).abs() < 1e-4 * (1.0 + exp.abs()), "{got} vs {exp}");
    }
    // Bad calls are errors, and the solver stays usable.
    // SAFETY: null pointers are rejected before anything is read.
    let st = unsafe {
        cage_solve_device_f32(
            s,
            rows,
            n,
            j,
            null(),
            values.as_ptr(),
            tau.as_ptr(),
            policy.as_mut_ptr(),
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(st, CageStatus::CageErrNull);
    let msg = unsafe { std::ffi::CStr::from_ptr(cage_last_error()) }.to_string_lossy().into_owned();
    assert!(msg.contains("d_base_logprobs"), "{msg}");
    // SAFETY: J = 0 is rejected before anything is read.
    let st = unsafe {
        cage_solve_device_f32(
            s,
            rows,
            n,
            0,
            base.as_ptr(),
            values.as_ptr(),
            tau.as_ptr(),
            policy.as_mut_ptr(),
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(st, CageStatus::CageErrInvalid);
    // SAFETY: created above, destroyed once.
    unsafe { cage_solver_destroy(s) };
}

#[test]
fn device_pointers_need_a_gpu_backend() {
    let (st, s) = solver(CageBackend::CageBackendCpu);
    assert_eq!(st, CageStatus::CageOk);
    let x = [0f32; 4];
    let mut out = [0f32; 4];
    // SAFETY: the CPU backend refuses before touching the pointers.
    let st = unsafe {
        cage_solve_device_f32(
            s,
            1,
            4,
            1,
            x.as_ptr(),
            x.as_ptr(),
            x.as_ptr(),
            out.as_mut_ptr(),
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(st, CageStatus::CageErrInvalid);
    unsafe { cage_solver_destroy(s) };
    let (st, s) = solver(CageBackend::CageBackendCuda);
    if cage::gpu::cuda::probe().is_err() {
        assert_eq!(st, CageStatus::CageErrNoGpu);
        let msg = unsafe { std::ffi::CStr::from_ptr(cage_last_error()) }.to_string_lossy().into_owned();
        assert!(msg.contains("no usable CUDA GPU"), "{msg}");
        println!("SKIP the GPU half of device_pointers_need_a_gpu_backend: no GPU");
    } else {
        assert_eq!(st, CageStatus::CageOk);
        unsafe { cage_solver_destroy(s) };
    }
}
