//! What every solver returns for a batch: the policy and, for each principal, its incentives and payoff.

use crate::real::Real;
use serde::Serialize;

/// The equilibrium (or baseline) of every row of a batch, in the same flat layout as [`crate::Batch`].
#[derive(Clone, Debug)]
pub struct Solution<T> {
    /// B.
    pub rows: usize,
    /// N.
    pub candidates: usize,
    /// J.
    pub principals: usize,
    /// B x N policy pi over the candidates (sums to 1 per row; 0 at excluded candidates).
    pub policy: Vec<T>,
    /// B x J x N incentives y_j offered by each principal.
    pub incentives: Vec<T>,
    /// B x J payoffs f_j = pi . (v_j - y_j).
    pub payoffs: Vec<T>,
    /// B x N aggregate incentive Y = sum_j y_j.
    pub aggregate: Vec<T>,
    /// Per row: solver iterations (passes over the row for `exact`, Jacobi rounds for `jacobi` / `paper`).
    pub iterations: Vec<u32>,
    /// Per row: final residual, relative to the row's value scale max(max v, tau).
    pub residual: Vec<f64>,
    /// Per row: whether the tolerance was reached.
    pub converged: Vec<bool>,
}

/// One row of a [`Solution`] in the JSON shape `cage solve` prints.
#[derive(Clone, Debug, Serialize)]
pub struct RowReport {
    /// N.
    pub policy: Vec<f64>,
    /// J x N.
    pub incentives: Vec<Vec<f64>>,
    /// J.
    pub payoffs: Vec<f64>,
    /// N.
    pub aggregate_incentive: Vec<f64>,
    /// Iterations used.
    pub iterations: u32,
    /// Relative residual.
    pub residual: f64,
    /// Tolerance reached.
    pub converged: bool,
}

impl<T: Real> Solution<T> {
    /// An all-zero solution for a batch of this shape (policy filled in by the solver).
    pub fn zeros(rows: usize, candidates: usize, principals: usize) -> Self {
        Self {
            rows,
            candidates,
            principals,
            policy: vec![T::zero(); rows * candidates],
            incentives: vec![T::zero(); rows * principals * candidates],
            payoffs: vec![T::zero(); rows * principals],
            aggregate: vec![T::zero(); rows * candidates],
            iterations: vec![0; rows],
            residual: vec![0.0; rows],
            converged: vec![true; rows],
        }
    }

    /// Row `r` of a solver that keeps per-principal incentives `y` (J x N) and the policy `pi` in f64 (the
    /// Jacobi iteration and the authors' solver): policy, aggregate incentive, incentives and each principal's
    /// payoff pi . (v_j - y_j) on its values `values` (J x N).
    #[allow(clippy::needless_range_loop)] // index loops mirror the formulas
    pub(crate) fn set_row_from_incentives(&mut self, r: usize, y: &[Vec<f64>], pi: &[f64], values: &[Vec<f64>]) {
        let (n, jn) = (self.candidates, self.principals);
        for a in 0..n {
            self.policy[r * n + a] = T::of(pi[a]);
            self.aggregate[r * n + a] = T::of(y.iter().map(|yj| yj[a]).sum());
        }
        for (j, yj) in y.iter().enumerate() {
            for a in 0..n {
                self.incentives[(r * jn + j) * n + a] = T::of(yj[a]);
            }
            let f: f64 = (0..n).map(|a| pi[a] * (values[j][a] - yj[a])).sum();
            self.payoffs[r * jn + j] = T::of(f);
        }
    }

    /// Policy of row `r`.
    pub fn policy_row(&self, r: usize) -> &[T] {
        &self.policy[r * self.candidates..(r + 1) * self.candidates]
    }

    /// Incentives of principal `j` in row `r`.
    pub fn incentive_row(&self, r: usize, j: usize) -> &[T] {
        let n = self.candidates;
        let o = (r * self.principals + j) * n;
        &self.incentives[o..o + n]
    }

    /// Payoffs of row `r`.
    pub fn payoff_row(&self, r: usize) -> &[T] {
        &self.payoffs[r * self.principals..(r + 1) * self.principals]
    }

    /// Aggregate incentive of row `r`.
    pub fn aggregate_row(&self, r: usize) -> &[T] {
        &self.aggregate[r * self.candidates..(r + 1) * self.candidates]
    }

    /// Row `r` as a JSON-ready report.
    pub fn report(&self, r: usize) -> RowReport {
        let f = |xs: &[T]| xs.iter().map(|x| x.f64()).collect::<Vec<f64>>();
        RowReport {
            policy: f(self.policy_row(r)),
            incentives: (0..self.principals).map(|j| f(self.incentive_row(r, j))).collect(),
            payoffs: f(self.payoff_row(r)),
            aggregate_incentive: f(self.aggregate_row(r)),
            iterations: self.iterations[r],
            residual: self.residual[r],
            converged: self.converged[r],
        }
    }
}
