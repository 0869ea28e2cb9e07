//! The authors' solver, token for token: `epec_one_step` of toz015/common-agency
//! (code/evaluation/generate_outputs_epec_genarm.py). y = 0 at every token; at most 5 Jacobi rounds; in each,
//! every principal best-responds to the others' previous offers with SciPy's L-BFGS-B ([`super::lbfgsb`]):
//! bounds [0, max(v, 0)], `maxiter` 8, `ftol` 1e-4, SciPy's other defaults, forward-difference gradients,
//! started from its previous y; stop when max|dy| + max|dpi| <= 1e-3 (absolute). The truncation is the point:
//! this is what produced the paper's numbers, not the equilibrium (`exact` computes that, `jacobi` checks it).
//!
//! Expressions keep the authors' order of operations (softmax(base + (others + y) / tau), the others' sum in
//! principal order), because the finite differences turn last-bit differences of f into gradient noise.

use super::lbfgsb::{LbfgsbOptions, Status, minimize};
use crate::problem::Batch;
use crate::problem::Row;
use crate::real::Real;
use crate::solution::Solution;

/// The authors' Jacobi round limit.
pub const ROUNDS: u32 = 5;
/// The authors' stopping tolerance on max|dy| + max|dpi|.
pub const TOL: f64 = 1e-3;

/// The authors' inner solver options: `options={"maxiter": 8, "ftol": 1e-4}`, SciPy's defaults otherwise.
pub fn inner_options() -> LbfgsbOptions {
    LbfgsbOptions { max_iter: 8, ftol: 1e-4, ..LbfgsbOptions::default() }
}

/// NumPy's sum of a contiguous f64 array (pairwise, eight accumulators below 128 elements).
fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        return a.iter().fold(0.0, |s, x| s + x);
    }
    if n <= 128 {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for x in &a[i..] {
            res += x;
        }
        return res;
    }
    let half = (n / 2) - (n / 2) % 8;
    numpy_sum(&a[..half]) + numpy_sum(&a[half..])
}

/// scipy.special.softmax(base + total / tau) into `pi` (`z` is scratch).
fn softmax(base: &[f64], total: &[f64], tau: f64, z: &mut [f64], pi: &mut [f64]) {
    for ((zi, b), t) in z.iter_mut().zip(base).zip(total) {
        *zi = b + t / tau;
    }
    let zmax = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    for (p, zi) in pi.iter_mut().zip(z.iter()) {
        *p = (zi - zmax).exp();
    }
    let s = numpy_sum(pi);
    for p in pi.iter_mut() {
        *p /= s;
    }
}

/// One row's game in f64.
struct Game {
    base: Vec<f64>,
    values: Vec<Vec<f64>>,
    tau: f64,
}

impl Game {
    fn of<T: Real>(row: &Row<'_, T>) -> Self {
        Self {
            base: row.base.iter().map(|x| x.f64()).collect(),
            values: (0..row.principals).map(|j| row.value(j).iter().map(|x| x.f64()).collect()).collect(),
            tau: row.tau.f64(),
        }
    }

    /// `solve_principal`: principal i's L-BFGS-B best response to the others' offers in `y`.
    fn solve_principal(&self, i: usize, y: &[Vec<f64>], opts: &LbfgsbOptions) -> Vec<f64> {
        let n = self.base.len();
        let v = &self.values[i];
        let mut others = vec![0.0; n];
        for (j, yj) in y.iter().enumerate() {
            if j != i {
                for (o, t) in others.iter_mut().zip(yj) {
                    *o += t;
                }
            }
        }
        let upper: Vec<f64> = v.iter().map(|x| x.max(0.0)).collect();
        let lower = vec![0.0; n];
        let x0: Vec<f64> = y[i].iter().zip(&upper).map(|(x, u)| x.max(0.0).min(*u)).collect();
        let (mut total, mut z, mut pi) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let neg_obj = |yi: &[f64]| {
            for ((t, o), x) in total.iter_mut().zip(&others).zip(yi) {
                *t = o + x;
            }
            softmax(&self.base, &total, self.tau, &mut z, &mut pi);
            -pi.iter().zip(v).zip(yi).map(|((p, q), x)| p * (q - x)).sum::<f64>()
        };
        // SciPy raises ValueError for a difference outside the bounds; the authors keep the start then. The
        // bounds and start built here are valid, so `minimize` has no error to report.
        match minimize(neg_obj, &x0, &lower, &upper, opts) {
            Ok(r) if r.status != Status::OutsideBounds => r.x,
            _ => x0,
        }
    }

    /// `epec_one_step`. Returns (y, pi, rounds, dy + dpi of the last round).
    fn solve(&self, max_rounds: u32) -> (Vec<Vec<f64>>, Vec<f64>, u32, f64) {
        let n = self.base.len();
        let opts = inner_options();
        let mut y = vec![vec![0.0; n]; self.values.len()];
        let (mut pi, mut z) = (vec![0.0; n], vec![0.0; n]);
        softmax(&self.base, &vec![0.0; n], self.tau, &mut z, &mut pi);
        let mut residual = f64::INFINITY;
        for round in 1..=max_rounds {
            let next: Vec<Vec<f64>> = (0..y.len()).map(|i| self.solve_principal(i, &y, &opts)).collect();
            let mut total = vec![0.0; n];
            for yj in &next {
                for (t, x) in total.iter_mut().zip(yj) {
                    *t += x;
                }
            }
            let mut new_pi = vec![0.0; n];
            softmax(&self.base, &total, self.tau, &mut z, &mut new_pi);
            let dy =
                next.iter().zip(&y).flat_map(|(a, b)| a.iter().zip(b).map(|(p, q)| (p - q).abs())).fold(0.0, f64::max);
            let dp = new_pi.iter().zip(&pi).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            (y, pi) = (next, new_pi);
            residual = dy + dp;
            if residual <= TOL {
                return (y, pi, round, residual);
            }
        }
        (y, pi, max_rounds, residual)
    }
}

/// Solves every row of `batch` the way the authors' code does, with at most `max_rounds` Jacobi rounds
/// (theirs: [`ROUNDS`]).
pub fn solve<T: Real>(batch: &Batch<T>, max_rounds: u32) -> Solution<T> {
    let mut sol = Solution::zeros(batch.rows(), batch.candidates(), batch.principals());
    for r in 0..batch.rows() {
        let game = Game::of(&batch.row(r));
        let (y, pi, rounds, residual) = game.solve(max_rounds);
        sol.set_row_from_incentives(r, &y, &pi, &game.values);
        (sol.iterations[r], sol.residual[r], sol.converged[r]) = (rounds, residual, residual <= TOL);
    }
    sol
}
