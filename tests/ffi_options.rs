//! The C ABI beyond its default options, each against a reference the test computes or the f64 reference
//! solver: every `CageMethod` in f64 and f32, `normalize = NONE`, per-row tau and `tau = NULL`, the backends
//! AUTO, CUDA and EMULATED on the host entry points, and sampled decoding steps on device pointers (the host
//! emulation) against the CPU's game and token choice for the same (seed, row, step).

mod common;

use cage::ffi::*;
use cage::sampling::{Choice, choose_row};
use cage::solver::{Method, SolveOptions, reference, solve};
use cage::{Batch, BatchInput, Normalize};
use common::{RandomGame, agent_policy, rng};
use std::ptr::{null, null_mut};

/// A batch of random games as the C ABI takes it: B x N base, B x J x N raw values, B x J weights, B taus.
struct Games {
    rows: usize,
    n: usize,
    j: usize,
    base: Vec<f64>,
    q: Vec<f64>,
    w: Vec<f64>,
    tau: Vec<f64>,
}

impl Games {
    fn new(seed: u64, rows: usize, n: usize, j: usize) -> Self {
        let mut r = rng(seed);
        let g: Vec<RandomGame> = (0..rows).map(|_| RandomGame::new(&mut r, n, j)).collect();
        Games {
            rows,
            n,
            j,
            base: g.iter().flat_map(|g| g.base.clone()).collect(),
            q: g.iter().flat_map(|g| g.q.clone()).collect(),
            w: g.iter().flat_map(|g| g.w.clone()).collect(),
            // Distinct temperatures per row, so that a solver using one tau for all rows is seen.
            tau: (0..rows).map(|i| [0.07, 0.3, 1.2, 0.15][i % 4]).collect(),
        }
    }

    /// The batch with taus `tau` (one per row, or one for all).
    fn batch(&self, normalize: Normalize, tau: Vec<f64>) -> Batch<f64> {
        Batch::new(BatchInput {
            rows: self.rows,
            candidates: self.n,
            principals: self.j,
            base_logprobs: self.base.clone(),
            values: self.q.clone(),
            weights: self.w.clone(),
            tau,
            normalize,
            names: vec![],
        })
        .unwrap()
    }

    /// The game values v (J x N) of row `r`: (q - min q) w for shift_min, q w for none; computed here.
    fn v(&self, r: usize, normalize: Normalize) -> Vec<Vec<f64>> {
        (0..self.j)
            .map(|p| {
                let q = &self.q[(r * self.j + p) * self.n..(r * self.j + p + 1) * self.n];
                let shift = match normalize {
                    Normalize::ShiftMin => q.iter().cloned().fold(f64::INFINITY, f64::min),
                    Normalize::None => 0.0,
                };
                q.iter().map(|x| (x - shift) * self.w[r * self.j + p]).collect()
            })
            .collect()
    }
}

/// What a host solve returned.
struct Out<T> {
    status: CageStatus,
    policy: Vec<T>,
    payoffs: Vec<T>,
    iterations: Vec<u32>,
    converged: Vec<u8>,
}

fn create(o: &CageOptions) -> (CageStatus, *mut CageSolver) {
    let mut s = null_mut();
    // SAFETY: valid options and out pointer.
    (unsafe { cage_solver_create(o, &mut s) }, s)
}

fn last_error() -> String {
    // SAFETY: cage_last_error returns a valid C string of this thread.
    unsafe { std::ffi::CStr::from_ptr(cage_last_error()) }.to_string_lossy().into_owned()
}

fn options(method: CageMethod, normalize: CageNormalize, backend: CageBackend) -> CageOptions {
    let mut o = cage_options_default();
    o.method = method as i32;
    o.normalize = normalize as i32;
    o.backend = backend as i32;
    o
}

/// `cage_solve_f64` with options `o`; `tau` per row, or None for NULL.
fn solve_f64(o: &CageOptions, g: &Games, tau: Option<&[f64]>) -> Out<f64> {
    let (st, s) = create(o);
    assert_eq!(st, CageStatus::CageOk, "{}", last_error());
    let (b, n, j) = (g.rows, g.n, g.j);
    let mut out = Out {
        status: st,
        policy: vec![0.0; b * n],
        payoffs: vec![0.0; b * j],
        iterations: vec![0; b],
        converged: vec![0; b],
    };
    // SAFETY: every buffer has the documented length; the solver is used by this thread only.
    out.status = unsafe {
        cage_solve_f64(
            s,
            b,
            n,
            j,
            g.base.as_ptr(),
            g.q.as_ptr(),
            g.w.as_ptr(),
            tau.map_or(null(), |t| t.as_ptr()),
            out.policy.as_mut_ptr(),
            out.payoffs.as_mut_ptr(),
            out.iterations.as_mut_ptr(),
            out.converged.as_mut_ptr(),
        )
    };
    // SAFETY: created above, destroyed once.
    unsafe { cage_solver_destroy(s) };
    out
}

/// `cage_solve_f32` on the same games rounded to f32.
fn solve_f32(o: &CageOptions, g: &Games, tau: Option<&[f64]>) -> Out<f32> {
    let (st, s) = create(o);
    assert_eq!(st, CageStatus::CageOk, "{}", last_error());
    let (b, n, j) = (g.rows, g.n, g.j);
    let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (base, q, w, t) = (f(&g.base), f(&g.q), f(&g.w), tau.map(f));
    let mut out = Out {
        status: st,
        policy: vec![0.0; b * n],
        payoffs: vec![0.0; b * j],
        iterations: vec![0; b],
        converged: vec![0; b],
    };
    // SAFETY: every buffer has the documented length; the solver is used by this thread only.
    out.status = unsafe {
        cage_solve_f32(
            s,
            b,
            n,
            j,
            base.as_ptr(),
            q.as_ptr(),
            w.as_ptr(),
            t.as_ref().map_or(null(), |t| t.as_ptr()),
            out.policy.as_mut_ptr(),
            out.payoffs.as_mut_ptr(),
            out.iterations.as_mut_ptr(),
            out.converged.as_mut_ptr(),
        )
    };
    // SAFETY: created above, destroyed once.
    unsafe { cage_solver_destroy(s) };
    out
}

fn max_diff<T: cage::Real>(a: &[T], b: &[f64]) -> f64 {
    common::max_diff(a, b)
}

/// The policy each method must give, computed without the C ABI: the f64 reference solver for the equilibrium
/// (exact, jacobi), the library's truncated iteration for paper (an approximation defined by its algorithm),
/// softmax(base) for base and softmax(base + sum_j v_j / tau) for linear.
fn expected(m: Method, g: &Games, normalize: Normalize, tau: &[f64]) -> (Vec<f64>, Option<Vec<f64>>) {
    match m {
        Method::Exact | Method::Jacobi => {
            let sol = reference::solve(&g.batch(normalize, tau.to_vec()), 1e-13, 1_000_000);
            assert!(sol.converged.iter().all(|&c| c), "the reference did not converge");
            (sol.policy, Some(sol.payoffs))
        }
        Method::Paper => {
            let sol = solve(&g.batch(normalize, tau.to_vec()), &SolveOptions::new(Method::Paper)).unwrap();
            (sol.policy, Some(sol.payoffs))
        }
        Method::Base | Method::Linear => {
            let mut pi = vec![];
            for (r, &t) in tau.iter().enumerate().take(g.rows) {
                let base = &g.base[r * g.n..(r + 1) * g.n];
                let total: Vec<f64> = match m {
                    Method::Linear => (0..g.n).map(|a| g.v(r, normalize).iter().map(|v| v[a]).sum()).collect(),
                    _ => vec![0.0; g.n],
                };
                pi.extend(agent_policy(base, &total, t));
            }
            (pi, None)
        }
    }
}

const METHODS: [(CageMethod, Method); 5] = [
    (CageMethod::CageMethodExact, Method::Exact),
    (CageMethod::CageMethodJacobi, Method::Jacobi),
    (CageMethod::CageMethodPaper, Method::Paper),
    (CageMethod::CageMethodBase, Method::Base),
    (CageMethod::CageMethodLinear, Method::Linear),
];

#[test]
fn every_method_in_f64_and_f32_matches_its_reference() {
    let g = Games::new(1, 4, 23, 3);
    for (cm, m) in METHODS {
        let o = options(cm, CageNormalize::CageNormalizeShiftMin, CageBackend::CageBackendCpu);
        let (want, payoffs) = expected(m, &g, Normalize::ShiftMin, &g.tau);
        let tol = if m == Method::Jacobi { 1e-7 } else { 1e-9 };
        let r64 = solve_f64(&o, &g, Some(&g.tau));
        assert_eq!(r64.status, CageStatus::CageOk, "{m}: {}", last_error());
        assert!(max_diff(&r64.policy, &want) < tol, "{m} f64 policy off by {}", max_diff(&r64.policy, &want));
        let r32 = solve_f32(&o, &g, Some(&g.tau));
        assert_eq!(r32.status, CageStatus::CageOk, "{m}: {}", last_error());
        // `paper` truncates L-BFGS-B with finite differences of step 1e-8, which turn the f32 rounding of the
        // inputs into different iterates: its f32 reference is the library on the same f32 game.
        let (want32, payoffs32) = match m {
            Method::Paper => {
                let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
                let b32 = Batch::new(BatchInput {
                    rows: g.rows,
                    candidates: g.n,
                    principals: g.j,
                    base_logprobs: f(&g.base),
                    values: f(&g.q),
                    weights: f(&g.w),
                    tau: f(&g.tau),
                    normalize: Normalize::ShiftMin,
                    names: vec![],
                })
                .unwrap();
                let s = solve(&b32, &SolveOptions::new(m)).unwrap();
                let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
                (f64s(&s.policy), Some(f64s(&s.payoffs)))
            }
            _ => (want.clone(), payoffs.clone()),
        };
        let d32 = max_diff(&r32.policy, &want32);
        assert!(d32 < 2e-4, "{m} f32 policy off by {d32}");
        if let (Some(p), Some(p32)) = (payoffs, payoffs32) {
            assert!(max_diff(&r64.payoffs, &p) < 1e-6, "{m} f64 payoffs off by {}", max_diff(&r64.payoffs, &p));
            assert!(max_diff(&r32.payoffs, &p32) < 1e-3, "{m} f32 payoffs off by {}", max_diff(&r32.payoffs, &p32));
        }
        // The iteration counts are those of the method asked for (exact and jacobi reach the same policy by
        // different routes, and paper stops early).
        let lib = solve(&g.batch(Normalize::ShiftMin, g.tau.clone()), &SolveOptions::new(m)).unwrap();
        assert_eq!(r64.iterations, lib.iterations, "{m}: iterations");
        let conv: Vec<u8> = lib.converged.iter().map(|&c| c as u8).collect();
        assert_eq!(r64.converged, conv, "{m}: converged flags");
    }
    // paper is an approximation that differs from the equilibrium on these games: mapping it to exact or
    // jacobi would be seen.
    let (exact, _) = expected(Method::Exact, &g, Normalize::ShiftMin, &g.tau);
    let (paper, _) = expected(Method::Paper, &g, Normalize::ShiftMin, &g.tau);
    assert!(max_diff(&paper, &exact) > 1e-5, "paper equals exact here: {}", max_diff(&paper, &exact));
    // Out-of-range enums are refused by name.
    for (field, set) in [("method", 5), ("normalize", 2), ("backend", 4)] {
        let mut o = cage_options_default();
        match field {
            "method" => o.method = set,
            "normalize" => o.normalize = set,
            _ => o.backend = set,
        }
        let (st, _) = create(&o);
        assert_eq!(st, CageStatus::CageErrInvalid, "{field} {set}");
        assert!(last_error().contains(&format!("unknown {field} {set}")), "{}", last_error());
    }
}

#[test]
fn normalize_none_uses_the_raw_values() {
    // Values >= 0 with a positive minimum: NONE and SHIFT_MIN give different games.
    let mut g = Games::new(2, 3, 17, 2);
    g.q.iter_mut().for_each(|x| *x += 3.5);
    for (cm, m) in METHODS {
        let o = options(cm, CageNormalize::CageNormalizeNone, CageBackend::CageBackendCpu);
        let (want, payoffs) = expected(m, &g, Normalize::None, &g.tau);
        let got = solve_f64(&o, &g, Some(&g.tau));
        assert_eq!(got.status, CageStatus::CageOk, "{m}: {}", last_error());
        let tol = if m == Method::Jacobi { 1e-7 } else { 1e-9 };
        assert!(max_diff(&got.policy, &want) < tol, "{m}: off by {}", max_diff(&got.policy, &want));
        if let Some(p) = payoffs {
            assert!(max_diff(&got.payoffs, &p) < 1e-6, "{m}: payoffs off by {}", max_diff(&got.payoffs, &p));
        }
    }
    // A constant added to a principal's values leaves the equilibrium policy as it is and adds the constant to
    // its payoff: with NONE each payoff exceeds the SHIFT_MIN one by w_j min_a q_j, computed here.
    let exact = |nz| options(CageMethod::CageMethodExact, nz, CageBackend::CageBackendCpu);
    let none = solve_f64(&exact(CageNormalize::CageNormalizeNone), &g, Some(&g.tau));
    let shift = solve_f64(&exact(CageNormalize::CageNormalizeShiftMin), &g, Some(&g.tau));
    assert!(max_diff(&none.policy, &shift.policy) < 1e-9);
    for r in 0..g.rows {
        for p in 0..g.j {
            let q = &g.q[(r * g.j + p) * g.n..(r * g.j + p + 1) * g.n];
            let lift = g.w[r * g.j + p] * q.iter().cloned().fold(f64::INFINITY, f64::min);
            let (a, b) = (none.payoffs[r * g.j + p], shift.payoffs[r * g.j + p]);
            assert!((a - b - lift).abs() < 1e-8, "row {r} principal {p}: {a} - {b} != {lift}");
        }
    }
    // Negative values under NONE are refused.
    g.q[5] = -1.0;
    let o = options(CageMethod::CageMethodExact, CageNormalize::CageNormalizeNone, CageBackend::CageBackendCpu);
    assert_eq!(solve_f64(&o, &g, Some(&g.tau)).status, CageStatus::CageErrInvalid);
}

#[test]
fn per_row_tau_and_null_tau() {
    let g = Games::new(3, 4, 19, 2);
    let mut o = options(CageMethod::CageMethodExact, CageNormalize::CageNormalizeShiftMin, CageBackend::CageBackendCpu);
    // Per row: each row solved at its own temperature.
    let per_row = solve_f64(&o, &g, Some(&g.tau));
    for r in 0..g.rows {
        let one = Games {
            rows: 1,
            n: g.n,
            j: g.j,
            base: g.base[r * g.n..(r + 1) * g.n].to_vec(),
            q: g.q[r * g.j * g.n..(r + 1) * g.j * g.n].to_vec(),
            w: g.w[r * g.j..(r + 1) * g.j].to_vec(),
            tau: vec![g.tau[r]],
        };
        let (want, _) = expected(Method::Exact, &one, Normalize::ShiftMin, &one.tau);
        let got = &per_row.policy[r * g.n..(r + 1) * g.n];
        assert!(max_diff(got, &want) < 1e-9, "row {r} at tau {}", g.tau[r]);
    }
    // NULL: every row at the solver's tau.
    o.tau = 0.37;
    let null_tau = solve_f64(&o, &g, None);
    assert_eq!(null_tau.status, CageStatus::CageOk, "{}", last_error());
    let (want, _) = expected(Method::Exact, &g, Normalize::ShiftMin, &[0.37; 4]);
    assert!(max_diff(&null_tau.policy, &want) < 1e-9, "tau = NULL is not the solver's tau");
    let (other, _) = expected(Method::Exact, &g, Normalize::ShiftMin, &[0.1; 4]);
    assert!(max_diff(&other, &want) > 1e-3);
    // A bad tau in a row is refused, naming it.
    let mut bad = g.tau.clone();
    bad[2] = 0.0;
    let st = solve_f64(&o, &g, Some(&bad)).status;
    assert_eq!(st, CageStatus::CageErrInvalid);
    assert!(last_error().contains("tau"), "{}", last_error());
}

/// AUTO and EMULATED solve host buffers as the CPU does when no GPU is usable (EMULATED always: its host
/// solves are the CPU's); CUDA without a GPU is NO_GPU at creation. With a GPU, AUTO and CUDA solve on it
/// (f32) within f32 rounding of the reference, and the methods the kernels lack are refused by name on CUDA.
#[test]
fn backends_on_the_host_entry_points() {
    let g = Games::new(4, 3, 29, 2);
    let cpu_opts =
        options(CageMethod::CageMethodExact, CageNormalize::CageNormalizeShiftMin, CageBackend::CageBackendCpu);
    let cpu = solve_f32(&cpu_opts, &g, Some(&g.tau));
    let (want, _) = expected(Method::Exact, &g, Normalize::ShiftMin, &g.tau);
    let emu = solve_f32(
        &options(CageMethod::CageMethodExact, CageNormalize::CageNormalizeShiftMin, CageBackend::CageBackendEmulated),
        &g,
        Some(&g.tau),
    );
    assert_eq!(emu.policy, cpu.policy, "EMULATED host solves are the CPU's");
    let gpu = cage::backend::cuda_usable().is_ok();
    for (cm, m) in METHODS {
        let auto = solve_f32(
            &options(cm, CageNormalize::CageNormalizeShiftMin, CageBackend::CageBackendAuto),
            &g,
            Some(&g.tau),
        );
        assert_eq!(auto.status, CageStatus::CageOk, "AUTO {m}: {}", last_error());
        let cpu = solve_f32(
            &options(cm, CageNormalize::CageNormalizeShiftMin, CageBackend::CageBackendCpu),
            &g,
            Some(&g.tau),
        );
        if !gpu || !cage::backend::runs_on_gpu(m) {
            assert_eq!(auto.policy, cpu.policy, "AUTO {m} without the GPU is the CPU");
        } else {
            let (want, _) = expected(m, &g, Normalize::ShiftMin, &g.tau);
            assert!(max_diff(&auto.policy, &want) < 1e-4, "AUTO {m} on the GPU: {}", max_diff(&auto.policy, &want));
        }
    }
    let o = options(CageMethod::CageMethodExact, CageNormalize::CageNormalizeShiftMin, CageBackend::CageBackendCuda);
    if !gpu {
        let (st, _) = create(&o);
        assert_eq!(st, CageStatus::CageErrNoGpu);
        assert!(last_error().contains("GPU"), "{}", last_error());
        common::skip::skip("the GPU half of backends_on_the_host_entry_points: no GPU");
        return;
    }
    let cuda = solve_f32(&o, &g, Some(&g.tau));
    assert_eq!(cuda.status, CageStatus::CageOk, "{}", last_error());
    assert!(max_diff(&cuda.policy, &want) < 1e-4, "CUDA exact: {}", max_diff(&cuda.policy, &want));
    assert_eq!(cuda.converged, vec![1; g.rows]);
    let f64_on_gpu = solve_f64(&o, &g, Some(&g.tau));
    assert_eq!(f64_on_gpu.status, CageStatus::CageOk, "{}", last_error());
    assert!(max_diff(&f64_on_gpu.policy, &want) < 1e-4, "CUDA exact through f64");
    let linear =
        options(CageMethod::CageMethodLinear, CageNormalize::CageNormalizeShiftMin, CageBackend::CageBackendCuda);
    assert_eq!(solve_f32(&linear, &g, Some(&g.tau)).status, CageStatus::CageErrInvalid);
    assert!(last_error().contains("linear"), "{}", last_error());
}

/// Sampled decoding steps on device pointers (the emulation: device pointers are host pointers): each row's
/// token is the CPU's choice, keyed by (seed, row, step), from the policy of the game the CPU builds from the
/// same logits (top-k, q = log pi_ARM - log pi_ref, shift_min and weights, the exact equilibrium), for Gumbel
/// and race, over several steps, with per-row tau and with tau = NULL; J = 0 samples the base's top-k.
#[test]
fn sampled_device_steps_match_the_cpu_choice() {
    let (rows, v, k) = (3usize, 200usize, 24usize);
    let mut r = rng(8);
    use rand::Rng;
    let mut draw = |len: usize| (0..len).map(|_| r.random_range(-3.0f32..3.0)).collect::<Vec<f32>>();
    let (logits, arm, reference) = (draw(rows * v), draw(rows * 2 * v), draw(rows * v));
    let weights = vec![0.7f32, 0.3, 1.0, 2.0, 0.5, 0.5];
    let taus = [0.2f32, 0.5, 1.5];
    let mut o = cage_options_default();
    o.backend = CageBackend::CageBackendEmulated as i32;
    o.tau = 0.8;
    let (st, s) = create(&o);
    assert_eq!(st, CageStatus::CageOk);
    let mut tokens = vec![u32::MAX; rows];
    let (mut changed, mut checked) = (0, 0);
    for j in [0usize, 2] {
        for (choice, code) in [(Choice::Gumbel, 1), (Choice::Race, 2), (Choice::Greedy, 0)] {
            for tau in [Some(&taus[..]), None] {
                let tau_rows: Vec<f32> = tau.map_or(vec![0.8; rows], |t| t.to_vec());
                let pis = cpu_policies(&logits, &arm, &reference, &weights, j, &tau_rows, v, k);
                for step in 0..4u32 {
                    let seed = 1000 + step as u64 * 31;
                    // SAFETY: host buffers of the documented lengths stand for device memory under the emulation.
                    let st = unsafe {
                        cage_decode_step_device_f32(
                            s,
                            rows,
                            v,
                            j,
                            k,
                            logits.as_ptr(),
                            if j == 0 { null() } else { arm.as_ptr() },
                            if j == 0 { null() } else { reference.as_ptr() },
                            if j == 0 { null() } else { weights.as_ptr() },
                            tau.map_or(null(), |t| t.as_ptr()),
                            code,
                            seed,
                            step,
                            tokens.as_mut_ptr(),
                            null_mut(),
                        )
                    };
                    assert_eq!(st, CageStatus::CageOk, "{}", last_error());
                    for (row, (ids, pi)) in pis.iter().enumerate() {
                        let c = choose_row(pi, choice, seed, row as u32, step).unwrap();
                        assert_eq!(tokens[row], ids[c], "J {j} {choice:?} tau {tau:?} step {step} row {row}");
                        checked += 1;
                        changed += usize::from(c != 0);
                    }
                }
            }
        }
    }
    // Most choices are off the base's top candidate, so a step that ignored the game or the draw would be seen.
    assert!(changed * 2 > checked, "only {changed} of {checked} choices off the top candidate");
    // SAFETY: created above, destroyed once.
    unsafe { cage_solver_destroy(s) };
}

/// Per row: the candidate ids and the f32 policy of the CPU's game from the logits (J principals from the ARM
/// and reference logits) at the rows' taus.
#[allow(clippy::too_many_arguments)]
fn cpu_policies(
    logits: &[f32],
    arm: &[f32],
    reference: &[f32],
    weights: &[f32],
    j: usize,
    tau: &[f32],
    v: usize,
    k: usize,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let rows = tau.len();
    let lse = |x: &[f32]| cage::softmax::logsumexp(x) as f32;
    let mut out = vec![];
    for r in 0..rows {
        let sel = cage::candidates::select(&logits[r * v..(r + 1) * v], cage::candidates::Selection::TopK(k)).unwrap();
        let rf = &reference[r * v..(r + 1) * v];
        let mut values = vec![0f32; j * k];
        for p in 0..j {
            let a = &arm[(r * 2 + p) * v..(r * 2 + p + 1) * v];
            for (c, &id) in sel.ids.iter().enumerate() {
                values[p * k + c] = (a[id as usize] - lse(a)) - (rf[id as usize] - lse(rf));
            }
        }
        let batch = Batch::new(BatchInput {
            rows: 1,
            candidates: k,
            principals: j,
            base_logprobs: sel.base_logprobs.clone(),
            values,
            weights: weights[r * 2..r * 2 + j].to_vec(),
            tau: vec![tau[r]],
            normalize: Normalize::ShiftMin,
            names: vec![],
        })
        .unwrap();
        let sol = solve(&batch, &SolveOptions::new(Method::Exact)).unwrap();
        out.push((sel.ids.clone(), sol.policy));
    }
    out
}
