//! The f64 reference of the exact equilibrium: the damped Picard iteration of the specification, written to be
//! short and obviously right rather than fast. Every faster solver (CPU or GPU) is tested against it.
//!
//! Unknowns are the payoffs u_j. With c_j = u_j + tau:
//! `y_j = max(0, v_j - c_j)`, `pi = softmax(log pi0 + sum_j y_j / tau)`, `T(u)_j = sum_a pi_a min(v_j[a], c_j)`,
//! and `u <- (1 - eta) u + eta T(u)` from `u_j = max_a v_j[a]` (nobody pays) until
//! `max_j |T(u)_j - u_j| <= tol`.

use crate::problem::{Batch, Row};
use crate::solution::Solution;

/// Damping of the reference iteration (the specification's value).
pub const ETA: f64 = 0.3;

fn policy_at(row: &Row<'_, f64>, u: &[f64]) -> Vec<f64> {
    let n = row.len();
    let z: Vec<f64> = (0..n)
        .map(|a| {
            let y: f64 = (0..row.principals).map(|j| (row.value(j)[a] - u[j] - row.tau).max(0.0)).sum();
            row.base[a] + y / row.tau
        })
        .collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn t_map(row: &Row<'_, f64>, u: &[f64], pi: &[f64]) -> Vec<f64> {
    (0..row.principals).map(|j| row.value(j).iter().zip(pi).map(|(v, p)| p * v.min(u[j] + row.tau)).sum()).collect()
}

/// The row's value scale max(max v, tau): tolerances and residuals are relative to it.
pub fn value_scale(row: &Row<'_, f64>) -> f64 {
    row.values.iter().cloned().fold(row.tau, f64::max)
}

/// The specification's starting point: `u_j = max_a v_j[a]` (nobody pays).
pub fn start(row: &Row<'_, f64>) -> Vec<f64> {
    (0..row.principals).map(|j| row.value(j).iter().cloned().fold(0.0, f64::max)).collect()
}

/// Payoffs u at the equilibrium of one row from the specification's start, with iterations, relative
/// residual and convergence flag.
pub fn solve_row(row: &Row<'_, f64>, tol: f64, max_iter: u32) -> (Vec<f64>, u32, f64, bool) {
    solve_row_from(row, start(row), tol, max_iter, |_| ())
}

/// The iteration from any start `u`; `observe` sees the relative residual of every iteration.
pub fn solve_row_from(
    row: &Row<'_, f64>,
    mut u: Vec<f64>,
    tol: f64,
    max_iter: u32,
    mut observe: impl FnMut(f64),
) -> (Vec<f64>, u32, f64, bool) {
    let scale = value_scale(row);
    let mut residual = f64::INFINITY;
    for it in 0..max_iter {
        let t = t_map(row, &u, &policy_at(row, &u));
        residual = u.iter().zip(&t).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale;
        observe(residual);
        if residual <= tol {
            return (u, it, residual, true);
        }
        for (uj, tj) in u.iter_mut().zip(&t) {
            *uj = (1.0 - ETA) * *uj + ETA * tj;
        }
    }
    (u, max_iter, residual, false)
}

/// The policy the agent plays when the principals' payoffs are `u` (their threshold contracts).
pub fn policy(row: &Row<'_, f64>, u: &[f64]) -> Vec<f64> {
    policy_at(row, u)
}

/// Solves every row of `batch` with the reference iteration.
#[allow(clippy::needless_range_loop)] // index loops mirror the formulas
pub fn solve(batch: &Batch<f64>, tol: f64, max_iter: u32) -> Solution<f64> {
    let (n, jn) = (batch.candidates(), batch.principals());
    let mut sol = Solution::zeros(batch.rows(), n, jn);
    for r in 0..batch.rows() {
        let row = batch.row(r);
        let (u, it, res, ok) = solve_row(&row, tol, max_iter);
        let pi = policy_at(&row, &u);
        for j in 0..jn {
            for a in 0..n {
                let v = row.value(j)[a];
                let y = (v - u[j] - row.tau).max(0.0);
                sol.incentives[(r * jn + j) * n + a] = y;
                sol.aggregate[r * n + a] += y;
                sol.payoffs[r * jn + j] += pi[a] * (v - y);
            }
        }
        sol.policy[r * n..(r + 1) * n].copy_from_slice(&pi);
        (sol.iterations[r], sol.residual[r], sol.converged[r]) = (it, res, ok);
    }
    sol
}
