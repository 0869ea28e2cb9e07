//! The paper's Algorithm 1 (nonlinear Jacobi): every round, each principal best-responds to the others'
//! incentives of the previous round by maximising its own payoff f_j(y_j) = pi(Y) . (v_j - y_j) over the box
//! 0 <= y_j <= v_j, with the analytic gradient
//! `d f_j / d y_j[a] = pi_a ((v_j[a] - y_j[a] - f_j) / tau - 1)`.
//! It never uses the threshold form of the exact solver, which makes it the independent check of `exact`.
//!
//! Two inner optimisers:
//! - [`Inner::ScaledProjectedGradient`]: projected gradient ascent scaled by the inverse diagonal curvature
//!   tau / pi_a (Bertsekas' scaled gradient projection) with an Armijo search along the projection arc.
//!   Scaling by tau / pi_a makes the method indifferent to how small a candidate's probability is.
//! - [`Inner::ProjectedGradient`]: unscaled projected gradient with Barzilai-Borwein steps, started like a
//!   quasi-Newton method with an identity Hessian. With few iterations it stalls on low-probability candidates
//!   the way the authors' finite-difference L-BFGS-B does: the CUDA backend's `paper` uses it
//!   ([`JacobiOptions::truncated`]); the CPU's `paper` is the authors' solver itself ([`super::paper`]).
//!
//! Everything runs in f64 internally; it is a check and a reproduction, not the fast path.

use crate::problem::{Batch, Row};
use crate::real::Real;
use crate::solution::Solution;

/// Inner best-response optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inner {
    /// Diagonally scaled projected gradient with an Armijo arc search (accurate).
    ScaledProjectedGradient,
    /// Plain projected gradient with Barzilai-Borwein steps (the paper's truncated behaviour).
    ProjectedGradient,
}

/// Options of the Jacobi iteration.
#[derive(Clone, Copy, Debug)]
pub struct JacobiOptions {
    /// Maximum Jacobi rounds.
    pub max_rounds: u32,
    /// Maximum iterations of each principal's best-response solve.
    pub inner_max_iter: u32,
    /// Outer tolerance on max |dy| (relative to the value scale) and max |dpi|.
    pub tol: f64,
    /// Inner tolerance on the (scaled) projected gradient, relative to the value scale.
    pub inner_tol: f64,
    /// Inner relative decrease below which the inner solve stops (scipy's `ftol`); 0 disables it.
    pub inner_ftol: f64,
    /// Damping of the Jacobi update, y <- (1 - d) y + d BR(y); 1 is the paper's undamped iteration.
    pub damping: f64,
    /// Inner optimiser.
    pub inner: Inner,
}

impl JacobiOptions {
    /// Algorithm 1 run to convergence: the independent check of the exact solver. Simultaneous best responses
    /// can cycle (two principals alternately over- and under-paying), so the update is damped by 1/2; any
    /// fixed point of the damped iteration is a fixed point of the undamped one, i.e. an equilibrium.
    pub fn converged(tol: f64) -> Self {
        Self {
            max_rounds: 2000,
            inner_max_iter: 500,
            tol,
            inner_tol: tol * 0.1,
            inner_ftol: 0.0,
            damping: 0.5,
            inner: Inner::ScaledProjectedGradient,
        }
    }

    /// A look-alike of the authors' truncation for the GPU kernel: y = 0 at every step, at most 5 rounds, 8
    /// inner projected-gradient iterations, tolerance 1e-3, ftol 1e-4. Not their solver (that is
    /// [`crate::solver::paper`], SciPy's L-BFGS-B): on the paper golden it picks their token on 143/200 steps.
    pub fn truncated() -> Self {
        Self {
            max_rounds: 5,
            inner_max_iter: 8,
            tol: 1e-3,
            inner_tol: 1e-3,
            inner_ftol: 1e-4,
            damping: 1.0,
            inner: Inner::ProjectedGradient,
        }
    }
}

struct Game {
    base: Vec<f64>,
    values: Vec<Vec<f64>>,
    tau: f64,
    scale: f64,
}

impl Game {
    fn of<T: Real>(row: &Row<'_, T>) -> Self {
        let values: Vec<Vec<f64>> =
            (0..row.principals).map(|j| row.value(j).iter().map(|x| x.f64()).collect()).collect();
        let tau = row.tau.f64();
        let scale = values.iter().flatten().cloned().fold(tau, f64::max);
        Self { base: row.base.iter().map(|x| x.f64()).collect(), values, tau, scale }
    }

    /// pi = softmax(base + y_total / tau) into `pi`.
    fn policy(&self, y_total: &[f64], pi: &mut [f64]) {
        for ((p, b), y) in pi.iter_mut().zip(&self.base).zip(y_total) {
            *p = b + y / self.tau;
        }
        let m = pi.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut s = 0.0;
        for p in pi.iter_mut() {
            *p = (*p - m).exp();
            s += *p;
        }
        for p in pi.iter_mut() {
            *p /= s;
        }
    }

    /// Payoff of principal `j` offering `y` while the others offer `others` in total; fills `pi`.
    fn payoff(&self, j: usize, others: &[f64], y: &[f64], pi: &mut [f64], scratch: &mut [f64]) -> f64 {
        for ((s, o), yy) in scratch.iter_mut().zip(others).zip(y) {
            *s = o + yy;
        }
        self.policy(scratch, pi);
        pi.iter().zip(&self.values[j]).zip(y).map(|((p, v), yy)| p * (v - yy)).sum()
    }

    /// Best response of principal `j` to `others`, started from (and written into) `y`.
    fn best_response(&self, j: usize, others: &[f64], y: &mut [f64], o: &JacobiOptions) {
        let n = y.len();
        let v = &self.values[j];
        let (mut pi, mut scratch, mut trial, mut g) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let project = |a: usize, x: f64| x.clamp(0.0, v[a]);
        let mut f = self.payoff(j, others, y, &mut pi, &mut scratch);
        let mut lambda = self.tau;
        for _ in 0..o.inner_max_iter {
            // Gradient and, for the scaled method, the gradient times tau / pi_a (computed without dividing).
            let dir: Vec<f64> = (0..n)
                .map(|a| {
                    g[a] = pi[a] * ((v[a] - y[a] - f) / self.tau - 1.0);
                    match o.inner {
                        Inner::ScaledProjectedGradient => v[a] - y[a] - f - self.tau,
                        Inner::ProjectedGradient => g[a],
                    }
                })
                .collect();
            let step0 = if o.inner == Inner::ScaledProjectedGradient { 1.0 } else { lambda };
            let stationarity = (0..n).map(|a| (project(a, y[a] + dir[a]) - y[a]).abs()).fold(0.0, f64::max);
            let measure =
                if o.inner == Inner::ScaledProjectedGradient { stationarity } else { stationarity * self.tau };
            if measure <= o.inner_tol * self.scale {
                return;
            }
            let mut alpha = step0;
            let mut accepted = None;
            for _ in 0..60 {
                let mut gain = 0.0;
                for a in 0..n {
                    trial[a] = project(a, y[a] + alpha * dir[a]);
                    gain += g[a] * (trial[a] - y[a]);
                }
                let ft = self.payoff(j, others, &trial, &mut pi, &mut scratch);
                if ft >= f + 1e-4 * gain {
                    accepted = Some(ft);
                    break;
                }
                alpha *= 0.5;
            }
            let Some(ft) = accepted else {
                self.payoff(j, others, y, &mut pi, &mut scratch);
                return;
            };
            // Barzilai-Borwein step for the unscaled method: s.s / -(s.(g_new - g)), from the new gradient.
            let (mut ss, mut sy) = (0.0, 0.0);
            for a in 0..n {
                let gn = pi[a] * ((v[a] - trial[a] - ft) / self.tau - 1.0);
                let s = trial[a] - y[a];
                ss += s * s;
                sy += s * (gn - g[a]);
            }
            lambda = if sy < 0.0 { (ss / -sy).clamp(1e-10, 1e10) } else { 1e10 };
            let decrease = (ft - f) / f.abs().max(ft.abs()).max(1.0);
            y.copy_from_slice(&trial);
            f = ft;
            if o.inner_ftol > 0.0 && decrease <= o.inner_ftol {
                return;
            }
        }
    }
}

/// Runs Algorithm 1 on one row from y = 0. Returns (y as J x N, pi, rounds, residual, converged).
fn solve_row(game: &Game, o: &JacobiOptions) -> (Vec<Vec<f64>>, Vec<f64>, u32, f64, bool) {
    let n = game.base.len();
    let jn = game.values.len();
    let mut y = vec![vec![0.0; n]; jn];
    let mut pi = vec![0.0; n];
    let mut total = vec![0.0; n];
    game.policy(&total, &mut pi);
    let mut residual = f64::INFINITY;
    for round in 1..=o.max_rounds {
        let mut next = y.clone();
        for (j, yj) in next.iter_mut().enumerate() {
            let others: Vec<f64> = total.iter().zip(&y[j]).map(|(t, own)| t - own).collect();
            game.best_response(j, &others, yj, o);
        }
        let mut dy: f64 = 0.0;
        for (yj, nj) in y.iter_mut().zip(&next) {
            for (a, b) in yj.iter_mut().zip(nj) {
                let new = (1.0 - o.damping) * *a + o.damping * b;
                dy = dy.max((new - *a).abs());
                *a = new;
            }
        }
        for (a, t) in total.iter_mut().enumerate() {
            *t = y.iter().map(|yj| yj[a]).sum();
        }
        let mut new_pi = vec![0.0; n];
        game.policy(&total, &mut new_pi);
        let dpi = new_pi.iter().zip(&pi).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        pi = new_pi;
        residual = (dy / game.scale).max(dpi);
        if residual <= o.tol {
            return (y, pi, round, residual, true);
        }
    }
    (y, pi, o.max_rounds, residual, false)
}

/// Solves every row of `batch` with Algorithm 1 under options `o`.
pub fn solve<T: Real>(batch: &Batch<T>, o: &JacobiOptions) -> Solution<T> {
    let mut sol = Solution::zeros(batch.rows(), batch.candidates(), batch.principals());
    for r in 0..batch.rows() {
        let game = Game::of(&batch.row(r));
        let (y, pi, rounds, residual, converged) = solve_row(&game, o);
        sol.set_row_from_incentives(r, &y, &pi, &game.values);
        (sol.iterations[r], sol.residual[r], sol.converged[r]) = (rounds, residual, converged);
    }
    sol
}
