//! The fast exact equilibrium on the CPU: Newton on the J payoffs u in log space, safeguarded by a line
//! search and falling back to the reference's damped Picard iteration, so it reaches the same fixed point.
//!
//! With c_j = u_j + tau and g_j(u) = E_pi(u)[(c_j - v_j)^+], the fixed point T(u) = u of the reference is
//! g_j(u) = tau for every j (T_j = c_j - g_j). Newton runs on G_j(u) = ln(g_j(u) / tau) rather than on
//! F = T - u: where a principal pays on every likely candidate, g_j is exponentially small in u_j and F_j = tau
//! is flat (a plateau that stalls Newton on F and crawls under Picard), while ln g_j is nearly linear there
//! with slope ~1/tau. One evaluation is one pass over the row: the shifted logits, one softmax, then for each
//! principal the sums g_j = E[(c_j - v_j)^+], P_j = E[1{v_j > c_j}] and the cross terms
//! E[1{v_k > c_k} (c_j - v_j)^+] that give the exact Jacobian
//!   dg_j/du_k = [j = k] (1 - P_j) - Cov_pi(1{v_k > c_k}, (c_j - v_j)^+) / tau.
//! Newton typically converges in 4-10 passes where damped Picard needs 30-3000.
//! The hot loop allocates nothing: a [`Workspace`] holds every buffer.

use crate::error::{CageError, Result};
use crate::problem::{Batch, Row};
use crate::real::Real;
use crate::softmax::{BLOCK, exp_shifted, max, reduce2, reduce3, sum};
use crate::solution::Solution;
use rayon::prelude::*;

/// Damping of the Picard fallback (the specification's value).
const ETA: f64 = 0.3;
/// Line-search halvings tried before a Picard step is taken instead.
const BACKTRACKS: usize = 4;

/// Buffers for one row of size N with J principals; reuse it across rows and calls.
#[derive(Clone, Debug, Default)]
pub struct Workspace<T> {
    z: Vec<T>,
    u: Vec<f64>,
    f: Vec<f64>,
    g: Vec<f64>,
    lg: Vec<f64>,
    jac: Vec<f64>,
    ut: Vec<f64>,
    ft: Vec<f64>,
    gt: Vec<f64>,
    lgt: Vec<f64>,
    jt: Vec<f64>,
    d: Vec<f64>,
    lu: Vec<f64>,
    hi: Vec<f64>,
}

impl<T: Real> Workspace<T> {
    /// Buffers for rows of `n` candidates and `j` principals.
    pub fn new(n: usize, j: usize) -> Self {
        let mut w = Self::default();
        w.reserve(n, j);
        w
    }

    fn reserve(&mut self, n: usize, j: usize) {
        self.z.resize(n, T::zero());
        for v in [
            &mut self.u,
            &mut self.f,
            &mut self.g,
            &mut self.lg,
            &mut self.ut,
            &mut self.ft,
            &mut self.gt,
            &mut self.lgt,
            &mut self.d,
            &mut self.hi,
        ] {
            v.resize(j, 0.0);
        }
        for v in [&mut self.jac, &mut self.jt, &mut self.lu] {
            v.resize(j * j, 0.0);
        }
    }
}

/// Per-row statistics of a solve.
#[derive(Clone, Copy, Debug, Default)]
pub struct RowStats {
    /// Passes over the row.
    pub iterations: u32,
    /// max_j |T(u)_j - u_j| / max(max v, tau).
    pub residual: f64,
    /// Whether the residual reached the tolerance.
    pub converged: bool,
}

/// Evaluates F(u) = T(u) - u = tau - g (into `f`), g (into `g`) and the Jacobian dg/du (into `jac`,
/// row-major J x J), leaving the unnormalised softmax weights in `z`. Two sweeps over the row (logits and
/// their max; then exp and every sum), each block by block so that the J value rows are read from memory
/// once per sweep and the 1 + 2J + J(J - 1) reductions of a block run out of L1.
#[inline(always)]
fn eval<T: Real>(row: &Row<'_, T>, u: &[f64], z: &mut [T], f: &mut [f64], g: &mut [f64], jac: &mut [f64]) {
    let n = row.len();
    let j = row.principals;
    let tau = row.tau.f64();
    let inv_tau = T::of(1.0 / tau);
    let zero = T::zero();
    let c = |p: usize| T::of(u[p] + tau);
    let z = &mut z[..n];
    let mut m = T::neg_infinity();
    for (bi, zb) in z.chunks_mut(BLOCK).enumerate() {
        let (o, len) = (bi * BLOCK, zb.len());
        zb.copy_from_slice(&row.base[o..o + len]);
        for p in 0..j {
            let cp = c(p);
            for (zi, &v) in zb.iter_mut().zip(&row.value(p)[o..o + len]) {
                *zi = *zi + if v > cp { (v - cp) * inv_tau } else { zero };
            }
        }
        let mb = max(zb);
        m = if mb > m { mb } else { m };
    }
    // f accumulates P_p = E[1{v_p > c_p}] and jac the cross sums E[1{v_k > c_k} (c_p - v_p)^+] until the end.
    g.fill(0.0);
    f.fill(0.0);
    jac.fill(0.0);
    let mut s = 0.0;
    for (bi, zb) in z.chunks_mut(BLOCK).enumerate() {
        let (o, len) = (bi * BLOCK, zb.len());
        for x in zb.iter_mut() {
            *x = (*x - m).exp_nonpos();
        }
        let zb: &[T] = zb;
        s += sum(zb);
        for p in 0..j {
            let vp = &row.value(p)[o..o + len];
            let cp = c(p);
            // (c - v)^+ directly, not c - E[min(v, c)]: g can be far smaller than c and must keep its digits.
            g[p] += reduce2(zb, vp, |e, v| if cp > v { e * (cp - v) } else { zero });
            f[p] += reduce2(zb, vp, |e, v| if v > cp { e } else { zero });
            for k in (0..j).filter(|&k| k != p) {
                let (vk, ck) = (&row.value(k)[o..o + len], c(k));
                jac[p * j + k] += reduce3(zb, vk, vp, |e, a, b| if a > ck && cp > b { e * (cp - b) } else { zero });
            }
        }
    }
    let inv_s = 1.0 / s;
    for p in 0..j {
        g[p] *= inv_s;
        f[p] *= inv_s;
    }
    for p in 0..j {
        for k in 0..j {
            // dg_p/du_k = [p = k] (1 - P_p) - Cov(1{v_k > c_k}, (c_p - v_p)^+) / tau, and for k = p the
            // product in the covariance vanishes: Cov = -P_p g_p.
            jac[p * j + k] =
                if k == p { 1.0 - f[p] + f[p] * g[p] / tau } else { -(jac[p * j + k] * inv_s - f[k] * g[p]) / tau };
        }
    }
    for p in 0..j {
        f[p] = tau - g[p];
    }
}

/// F(u) = T(u) - u and the Jacobian dF/du (row-major J x J) of one row: exposed so tests can check the
/// analytic Jacobian against finite differences.
pub fn residual_and_jacobian<T: Real>(row: &Row<'_, T>, u: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let j = row.principals;
    let (mut z, mut f, mut g, mut jac) = (vec![T::zero(); row.len()], vec![0.0; j], vec![0.0; j], vec![0.0; j * j]);
    eval(row, u, &mut z, &mut f, &mut g, &mut jac);
    (f, jac.iter().map(|x| -x).collect())
}

/// Solves `a x = b` (J x J, row-major) by Gaussian elimination with partial pivoting into `x`.
/// Returns false when the matrix is numerically singular.
fn solve_linear(a: &[f64], b: &[f64], lu: &mut [f64], x: &mut [f64]) -> bool {
    let j = b.len();
    lu.copy_from_slice(a);
    x.copy_from_slice(b);
    let norm = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for col in 0..j {
        let piv = (col..j).max_by(|&r1, &r2| lu[r1 * j + col].abs().total_cmp(&lu[r2 * j + col].abs())).unwrap_or(col);
        let pivot = lu[piv * j + col].abs();
        if pivot.is_nan() || pivot <= 1e-13 * norm {
            return false;
        }
        if piv != col {
            for c in 0..j {
                lu.swap(piv * j + c, col * j + c);
            }
            x.swap(piv, col);
        }
        for r in col + 1..j {
            let m = lu[r * j + col] / lu[col * j + col];
            for c in col..j {
                lu[r * j + c] -= m * lu[col * j + c];
            }
            x[r] -= m * x[col];
        }
    }
    for col in (0..j).rev() {
        let s: f64 = (col + 1..j).map(|c| lu[col * j + c] * x[c]).sum();
        x[col] = (x[col] - s) / lu[col * j + col];
    }
    x.iter().all(|v| v.is_finite())
}

/// max |f_j|, NaN when any f_j is NaN (`f64::max` would drop it and call a NaN row converged).
fn norm_inf(f: &[f64]) -> f64 {
    f.iter().fold(0.0, |m, x| if x.abs() <= m { m } else { x.abs() })
}

/// ln(g / tau), the function Newton drives to 0; -inf where g underflowed.
fn log_residual(g: &[f64], tau: f64, out: &mut [f64]) -> f64 {
    for (o, &x) in out.iter_mut().zip(g) {
        *o = (x / tau).ln();
    }
    out.iter().map(|x| x * x).sum()
}

#[inline(always)]
fn payoffs_impl<T: Real>(row: &Row<'_, T>, ws: &mut Workspace<T>, tol: f64, max_iter: u32) -> RowStats {
    let j = row.principals;
    let tau = row.tau.f64();
    ws.reserve(row.len(), j);
    let mut scale = tau;
    for p in 0..j {
        ws.hi[p] = max(row.value(p)).f64().max(0.0);
        scale = scale.max(ws.hi[p]);
    }
    let Workspace { z, u, f, g, lg, jac, ut, ft, gt, lgt, jt, d, lu, hi } = ws;
    u.copy_from_slice(hi);
    eval(row, u, z, f, g, jac);
    let mut phi = log_residual(g, tau, lg);
    let mut iterations = 1u32;
    let mut picard_run = 1u32;
    while norm_inf(f) > tol * scale && iterations < max_iter {
        // Newton on G = ln(g / tau): dG/du = diag(1/g) dg/du, so solve (dg/du) d = -g * G.
        let mut accepted = false;
        if phi.is_finite() {
            for p in 0..j {
                d[p] = -g[p] * lg[p];
            }
            if solve_linear(jac, d, lu, ut) {
                d.copy_from_slice(ut);
                let mut alpha = 1.0;
                for _ in 0..=BACKTRACKS {
                    if iterations >= max_iter {
                        break;
                    }
                    // The fixed point lies in [0, max v_j]: project onto that box.
                    for p in 0..j {
                        ut[p] = (u[p] + alpha * d[p]).clamp(0.0, hi[p]);
                    }
                    eval(row, ut, z, ft, gt, jt);
                    iterations += 1;
                    let phit = log_residual(gt, tau, lgt);
                    if phit <= (1.0 - 1e-4 * alpha) * phi {
                        std::mem::swap(u, ut);
                        std::mem::swap(f, ft);
                        std::mem::swap(g, gt);
                        std::mem::swap(lg, lgt);
                        std::mem::swap(jac, jt);
                        phi = phit;
                        accepted = true;
                        break;
                    }
                    alpha *= 0.5;
                }
            }
        }
        if !accepted {
            // Watchdog: a run of the reference's damped Picard steps, twice as long after every Newton
            // failure. Picard can raise the merit, and Newton lower it again back to where it was: doubling
            // the runs breaks such cycles, and in the limit this is the reference iteration, which converges.
            for _ in 0..picard_run {
                if iterations >= max_iter || norm_inf(f) <= tol * scale {
                    break;
                }
                for p in 0..j {
                    u[p] += ETA * f[p];
                }
                eval(row, u, z, f, g, jac);
                iterations += 1;
            }
            phi = log_residual(g, tau, lg);
            picard_run *= 2;
        }
    }
    let residual = norm_inf(f) / scale;
    RowStats { iterations, residual, converged: residual <= tol }
}

/// Writes pi, y_j, Y and the payoffs of one row at payoffs `u`.
#[inline(always)]
fn emit<T: Real>(
    row: &Row<'_, T>,
    u: &[f64],
    policy: &mut [T],
    incentives: &mut [T],
    aggregate: &mut [T],
    payoffs: &mut [T],
) {
    let n = row.len();
    let tau = row.tau.f64();
    aggregate.fill(T::zero());
    for p in 0..row.principals {
        let c = T::of(u[p] + tau);
        let y = &mut incentives[p * n..(p + 1) * n];
        for ((yi, &v), ag) in y.iter_mut().zip(row.value(p)).zip(aggregate.iter_mut()) {
            *yi = (v - c).max(T::zero());
            *ag = *ag + *yi;
        }
    }
    let inv_tau = T::of(1.0 / tau);
    for ((z, &b), &ag) in policy.iter_mut().zip(row.base).zip(aggregate.iter()) {
        *z = b + ag * inv_tau;
    }
    let inv_s = T::of(1.0 / exp_shifted(policy));
    for x in policy.iter_mut() {
        *x = *x * inv_s;
    }
    let pi: &[T] = policy;
    for p in 0..row.principals {
        let (v, y) = (row.value(p), &incentives[p * n..(p + 1) * n]);
        payoffs[p] = T::of(reduce3(pi, v, y, |a, b, c| a * (b - c)));
    }
}

/// Finds the payoffs u of one row (left in the workspace). `tol` is relative to max(max v, tau).
pub fn solve_payoffs<T: Real>(row: &Row<'_, T>, ws: &mut Workspace<T>, tol: f64, max_iter: u32) -> RowStats {
    payoffs_impl(row, ws, tol, max_iter)
}

/// Caller-owned outputs of one row: policy (N), incentives (J x N), aggregate incentive (N), payoffs (J).
#[derive(Debug)]
pub struct RowOutput<'a, T> {
    /// N.
    pub policy: &'a mut [T],
    /// J x N.
    pub incentives: &'a mut [T],
    /// N.
    pub aggregate: &'a mut [T],
    /// J.
    pub payoffs: &'a mut [T],
}

#[inline(always)]
fn row_impl<T: Real>(
    row: &Row<'_, T>,
    ws: &mut Workspace<T>,
    tol: f64,
    max_iter: u32,
    out: RowOutput<'_, T>,
) -> RowStats {
    let stats = if row.principals == 0 {
        RowStats { iterations: 0, residual: 0.0, converged: true }
    } else {
        payoffs_impl(row, ws, tol, max_iter)
    };
    emit(row, &ws.u[..row.principals], out.policy, out.incentives, out.aggregate, out.payoffs);
    stats
}

// The same row solve compiled for AVX2 (8 f32 / 4 f64 lanes instead of SSE2's 4 / 2): everything it calls is
// `#[inline(always)]`, so the whole pass is generated for the wider vectors. Chosen at run time, so the
// binary still runs on any x86-64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2<T: Real>(
    row: &Row<'_, T>,
    ws: &mut Workspace<T>,
    tol: f64,
    max_iter: u32,
    out: RowOutput<'_, T>,
) -> RowStats {
    row_impl(row, ws, tol, max_iter, out)
}

fn row_dispatch<T: Real>(
    row: &Row<'_, T>,
    ws: &mut Workspace<T>,
    tol: f64,
    max_iter: u32,
    out: RowOutput<'_, T>,
) -> RowStats {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features `row_avx2` is compiled for (checked just above).
        return unsafe { row_avx2(row, ws, tol, max_iter, out) };
    }
    row_impl(row, ws, tol, max_iter, out)
}

/// Solves one row into caller-owned outputs, allocating nothing once `ws` has grown to the row's size:
/// the low-latency path. `tol` is relative to max(max v, tau). Output lengths and the number of principals
/// (at most [`super::MAX_PRINCIPALS`]) are checked.
pub fn solve_row_into<T: Real>(
    row: &Row<'_, T>,
    ws: &mut Workspace<T>,
    tol: f64,
    max_iter: u32,
    out: RowOutput<'_, T>,
) -> Result<RowStats> {
    let (n, j) = (row.len(), row.principals);
    super::check_principals(j, "exact")?;
    for (what, expected, got) in [
        ("policy output", n, out.policy.len()),
        ("incentives output", j * n, out.incentives.len()),
        ("aggregate output", n, out.aggregate.len()),
        ("payoffs output", j, out.payoffs.len()),
    ] {
        if expected != got {
            return Err(CageError::Shape { what: what.into(), expected, got });
        }
    }
    Ok(row_dispatch(row, ws, tol, max_iter, out))
}

/// Solves every row of `batch`; rows run in parallel (rayon) when there are several. Does not check the
/// number of principals: [`super::solve`] refuses more than [`super::MAX_PRINCIPALS`], above which this may run
/// to `max_iter` passes of O(N J^2) each.
pub fn solve<T: Real>(batch: &Batch<T>, tol: f64, max_iter: u32) -> Solution<T> {
    let (b, n, j) = (batch.rows(), batch.candidates(), batch.principals());
    let mut sol = Solution::zeros(b, n, j);
    let mut stats = vec![RowStats::default(); b];
    {
        // chunks_mut needs a non-zero size; with J = 0 the buffers are empty, the iterators yield nothing and
        // every row gets an empty incentive and payoff slice.
        let mut inc = sol.incentives.chunks_mut((j * n).max(1));
        let mut pay = sol.payoffs.chunks_mut(j.max(1));
        let rows: Vec<(usize, RowOutput<'_, T>, &mut RowStats)> = sol
            .policy
            .chunks_mut(n)
            .zip(sol.aggregate.chunks_mut(n))
            .zip(stats.iter_mut())
            .enumerate()
            .map(|(r, ((policy, aggregate), st))| {
                let (incentives, payoffs) = (inc.next().unwrap_or_default(), pay.next().unwrap_or_default());
                (r, RowOutput { policy, incentives, aggregate, payoffs }, st)
            })
            .collect();
        let job = |ws: &mut Workspace<T>, (r, out, st): (usize, RowOutput<'_, T>, &mut RowStats)| {
            *st = row_dispatch(&batch.row(r), ws, tol, max_iter, out);
        };
        if b == 1 || rayon::current_num_threads() == 1 {
            let mut ws = Workspace::new(n, j);
            rows.into_iter().for_each(|x| job(&mut ws, x));
        } else {
            rows.into_par_iter().for_each_init(|| Workspace::new(n, j), job);
        }
    }
    for (r, s) in stats.iter().enumerate() {
        (sol.iterations[r], sol.residual[r], sol.converged[r]) = (s.iterations, s.residual, s.converged);
    }
    sol
}
