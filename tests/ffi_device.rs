//! The copy-free device entry point of the C ABI, run on the host emulation of the CUDA kernels (where device
//! pointers are host pointers) and compared with the CPU solver; on a machine without a GPU the CUDA backend
//! is a clear NO_GPU error.

use cage::ffi::*;
use cage::solver::{Method, SolveOptions, solve};
use cage::{Batch, BatchInput, Normalize};
use std::ptr::{null, null_mut};

#[path = "common/skip.rs"]
mod support;

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
        support::skip("the GPU half of device_pointers_need_a_gpu_backend: no GPU");
    } else {
        assert_eq!(st, CageStatus::CageOk);
        unsafe { cage_solver_destroy(s) };
    }
}

/// The decoding step on device logits through the C ABI (emulation: device pointers are host pointers): the
/// greedy token of each row is a most likely candidate of the game the CPU builds and solves from the same
/// logits (top-k, q = log pi_ARM - log pi_ref with shift_min and the weights, the exact equilibrium); bad
/// arguments are errors.
#[test]
fn device_decode_step_matches_the_cpu_game() {
    let (rows, v, j, k) = (2usize, 300usize, 2usize, 16usize);
    let mut seed = 777u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32
    };
    let logits: Vec<f32> = (0..rows * v).map(|_| 8.0 * next() - 4.0).collect();
    let arm: Vec<f32> = (0..rows * j * v).map(|_| 8.0 * next() - 4.0).collect();
    let reference: Vec<f32> = (0..rows * v).map(|_| 8.0 * next() - 4.0).collect();
    let weights = vec![0.7f32, 0.3, 1.0, 2.0];
    let tau = vec![0.2f32, 0.5];
    let (st, s) = solver(CageBackend::CageBackendEmulated);
    assert_eq!(st, CageStatus::CageOk);
    let (mut tokens, mut converged) = (vec![u32::MAX; rows], vec![0u8; rows]);
    let call = |choice: i32, tokens: *mut u32, converged: *mut u8| {
        // SAFETY: host buffers of the documented lengths stand for device memory under the emulation.
        unsafe {
            cage_decode_step_device_f32(
                s,
                rows,
                v,
                j,
                k,
                logits.as_ptr(),
                arm.as_ptr(),
                reference.as_ptr(),
                weights.as_ptr(),
                tau.as_ptr(),
                choice,
                1,
                0,
                tokens,
                converged,
            )
        }
    };
    assert_eq!(
        call(CageChoice::CageChoiceGreedy as i32, tokens.as_mut_ptr(), converged.as_mut_ptr()),
        CageStatus::CageOk
    );
    assert_eq!(converged, vec![1, 1]);
    // The CPU's game from the same logits.
    let lse = |x: &[f32]| cage::softmax::logsumexp(x) as f32;
    let (mut base, mut values, mut ids) = (vec![], vec![0f32; rows * j * k], vec![]);
    for r in 0..rows {
        let row = &logits[r * v..(r + 1) * v];
        let sel = cage::candidates::select(row, cage::candidates::Selection::TopK(k)).unwrap();
        let rf = &reference[r * v..(r + 1) * v];
        for p in 0..j {
            let a = &arm[(r * j + p) * v..(r * j + p + 1) * v];
            for (c, &id) in sel.ids.iter().enumerate() {
                values[(r * j + p) * k + c] = (a[id as usize] - lse(a)) - (rf[id as usize] - lse(rf));
            }
        }
        base.extend_from_slice(&sel.base_logprobs);
        ids.extend_from_slice(&sel.ids);
    }
    let batch = Batch::new(BatchInput {
        rows,
        candidates: k,
        principals: j,
        base_logprobs: base,
        values,
        weights: weights.clone(),
        tau: tau.clone(),
        normalize: Normalize::ShiftMin,
        names: vec![],
    })
    .unwrap();
    let sol = solve(&batch, &SolveOptions::new(Method::Exact)).unwrap();
    for r in 0..rows {
        let pi = sol.policy_row(r);
        let best = pi.iter().cloned().fold(0.0f32, f32::max);
        let c = ids[r * k..(r + 1) * k].iter().position(|&t| t == tokens[r]).expect("a candidate");
        assert!(pi[c] >= best - 1e-4, "row {r}: token {} has pi {} < {best}", tokens[r], pi[c]);
    }
    // Bad arguments: an unknown choice, no token buffer.
    assert_eq!(call(7, tokens.as_mut_ptr(), null_mut()), CageStatus::CageErrInvalid);
    assert_ne!(call(0, null_mut(), null_mut()), CageStatus::CageOk);
    // SAFETY: a solver from cage_solver_create.
    unsafe { cage_solver_destroy(s) };
    // A CPU solver has no device.
    let (_, cpu) = solver(CageBackend::CageBackendCpu);
    // SAFETY: the call is refused before any pointer is read.
    let st = unsafe {
        cage_decode_step_device_f32(
            cpu,
            1,
            v,
            0,
            k,
            logits.as_ptr(),
            null(),
            null(),
            null(),
            null(),
            0,
            0,
            0,
            tokens.as_mut_ptr(),
            null_mut(),
        )
    };
    assert_eq!(st, CageStatus::CageErrInvalid);
    // SAFETY: as above.
    unsafe { cage_solver_destroy(cpu) };
}

/// One row of the device solve on the emulation with the given inputs: (status, policy, payoffs, stats).
fn device_row(base: &[f32], values: &[f32], tau: f32) -> (CageStatus, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, j) = (base.len(), values.len() / base.len());
    let (st, s) = solver(CageBackend::CageBackendEmulated);
    assert_eq!(st, CageStatus::CageOk);
    let (mut policy, mut payoffs, mut stats) = (vec![0f32; n], vec![0f32; j], vec![0f32; 3]);
    // SAFETY: under the emulation device memory is host memory; every buffer has the documented length.
    let st = unsafe {
        cage_solve_device_f32(
            s,
            1,
            n,
            j,
            base.as_ptr(),
            values.as_ptr(),
            &tau,
            policy.as_mut_ptr(),
            payoffs.as_mut_ptr(),
            stats.as_mut_ptr(),
            null_mut(),
        )
    };
    // SAFETY: created above, destroyed once.
    unsafe { cage_solver_destroy(s) };
    (st, policy, payoffs, stats)
}

#[test]
fn device_solve_on_bad_inputs_is_nan_out_and_not_converged() {
    let base = [-0.5f32, -1.0, -2.0, f32::NEG_INFINITY];
    let values = [0.0f32, 1.0, 0.5, 0.0, 1.0, 0.0, 0.2, 0.0];
    let (st, policy, _, stats) = device_row(&base, &values, 0.1);
    assert_eq!(st, CageStatus::CageOk);
    assert_eq!(stats[2], 1.0, "the valid row converges");
    assert!(policy.iter().all(|p| p.is_finite()));
    // The header's promise: inputs are not validated, and a NaN, an infinity, a negative value or a tau that
    // is not > 0 gives NaN policy and payoffs and a row that says it did not converge. NaN values used to be
    // ignored (a finite policy marked converged).
    let mut cases: Vec<(String, Vec<f32>, Vec<f32>, f32)> = Vec::new();
    for (i, bad) in [f32::NAN, f32::INFINITY, -1.0].into_iter().enumerate() {
        let mut v = values.to_vec();
        v[5] = bad;
        cases.push((format!("value {bad}"), base.to_vec(), v, 0.1));
        if i < 2 {
            let mut b = base.to_vec();
            b[1] = bad;
            cases.push((format!("base {bad}"), b, values.to_vec(), 0.1));
        }
    }
    for t in [f32::NAN, f32::INFINITY, 0.0, -0.1] {
        cases.push((format!("tau {t}"), base.to_vec(), values.to_vec(), t));
    }
    // A row whose candidates are all excluded has no policy to speak of: 0 everywhere, not converged.
    let (st, policy, _, stats) = device_row(&[f32::NEG_INFINITY; 4], &values, 0.1);
    assert_eq!(st, CageStatus::CageOk);
    assert_eq!((policy, stats[2]), (vec![0.0; 4], 0.0));
    for (what, b, v, t) in cases {
        let (st, policy, payoffs, stats) = device_row(&b, &v, t);
        assert_eq!(st, CageStatus::CageOk, "{what}: the inputs are not validated");
        assert_eq!(stats[2], 0.0, "{what}: a row with bad input must not report convergence ({stats:?})");
        assert!(stats[1].is_nan(), "{what}: residual {}", stats[1]);
        assert!(policy[..3].iter().all(|p| p.is_nan()), "{what}: policy {policy:?}");
        assert!(payoffs.iter().all(|p| p.is_nan()), "{what}: payoffs {payoffs:?}");
    }
}

#[test]
fn device_decode_step_with_nan_arm_logits_names_the_row() {
    let (rows, v, j, k) = (2usize, 64usize, 1usize, 8usize);
    let logits: Vec<f32> = (0..rows * v).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let arm: Vec<f32> = (0..rows * j * v).map(|i| ((i * 13) % 7) as f32 * 0.5).collect();
    let reference: Vec<f32> = (0..rows * v).map(|i| ((i * 5) % 3) as f32 * 0.2).collect();
    let (weights, tau) = ([1.0f32, 1.0], [0.3f32, 0.3]);
    let (st, s) = solver(CageBackend::CageBackendEmulated);
    assert_eq!(st, CageStatus::CageOk);
    let mut tokens = vec![0u32; rows];
    // NaN at one ARM logit, then at one reference logit, of row 1: its values (through the log-normaliser)
    // are NaN. This used to pick a token as if nothing were wrong.
    for in_arm in [true, false] {
        let (mut arm, mut reference) = (arm.clone(), reference.clone());
        if in_arm {
            arm[v + 5] = f32::NAN;
        } else {
            reference[v + 5] = f32::NAN;
        }
        // SAFETY: host buffers of the documented lengths stand for device memory under the emulation.
        let st = unsafe {
            cage_decode_step_device_f32(
                s,
                rows,
                v,
                j,
                k,
                logits.as_ptr(),
                arm.as_ptr(),
                reference.as_ptr(),
                weights.as_ptr(),
                tau.as_ptr(),
                0,
                0,
                0,
                tokens.as_mut_ptr(),
                null_mut(),
            )
        };
        let msg = unsafe { std::ffi::CStr::from_ptr(cage_last_error()) }.to_string_lossy().into_owned();
        assert_eq!(st, CageStatus::CageErrInvalid, "{msg}");
        assert!(msg.contains("row 1"), "{msg}");
    }
    // SAFETY: created above, destroyed once.
    unsafe { cage_solver_destroy(s) };
}
