//! The baselines the paper compares against, on the same inputs as the equilibrium.
//!
//! - `base`:   pi0 itself.
//! - `linear`: softmax(log pi0 + sum_j v_j / tau), the linear tilt ("PARM-style"); it is the policy the agent
//!   picks when every principal pays its whole value (y_j = v_j), which is how its incentives are reported.
//! - [`genarm`]: log pi ~ log pi_base + sum_j alpha_j log pi_ARM_j (Xu et al., ICLR 2025).
//! - [`mod_policy`]: next-token distribution from sum_j w_j logits_j of J aligned policies (Shi et al., 2024).

use crate::error::{CageError, Result};
use crate::problem::Batch;
use crate::real::Real;
use crate::softmax::{logsumexp, softmax_in_place};
use crate::solution::Solution;

/// The base policy pi0 of every row (no principal pays).
pub fn base<T: Real>(batch: &Batch<T>) -> Solution<T> {
    let (n, j) = (batch.candidates(), batch.principals());
    let mut sol = Solution::zeros(batch.rows(), n, j);
    for r in 0..batch.rows() {
        let row = batch.row(r);
        let pi = &mut sol.policy[r * n..(r + 1) * n];
        pi.copy_from_slice(row.base);
        softmax_in_place(pi);
        for p in 0..j {
            sol.payoffs[r * j + p] = T::of(pi.iter().zip(row.value(p)).map(|(a, v)| (*a * *v).f64()).sum());
        }
    }
    sol
}

/// The linear tilt softmax(log pi0 + sum_j v_j / tau) of every row.
pub fn linear<T: Real>(batch: &Batch<T>) -> Solution<T> {
    let (n, j) = (batch.candidates(), batch.principals());
    let mut sol = Solution::zeros(batch.rows(), n, j);
    for r in 0..batch.rows() {
        let row = batch.row(r);
        let inv_tau = T::one() / row.tau;
        sol.incentives[r * j * n..(r + 1) * j * n].copy_from_slice(row.values);
        let agg = &mut sol.aggregate[r * n..(r + 1) * n];
        for p in 0..j {
            for (a, &v) in agg.iter_mut().zip(row.value(p)) {
                *a = *a + v;
            }
        }
        let pi = &mut sol.policy[r * n..(r + 1) * n];
        for ((z, &b), &a) in pi.iter_mut().zip(row.base).zip(agg.iter()) {
            *z = b + a * inv_tau;
        }
        softmax_in_place(pi);
    }
    sol
}

fn check_row<T: Real>(what: &str, xs: &[T], n: usize) -> Result<()> {
    if xs.len() != n {
        return Err(CageError::Shape { what: what.into(), expected: n, got: xs.len() });
    }
    if let Some((i, x)) = xs.iter().enumerate().find(|(_, x)| x.is_nan() || **x == T::infinity()) {
        return Err(CageError::NonFinite { what: what.into(), index: i, value: format!("{x}") });
    }
    Ok(())
}

/// GenARM: pi ~ exp(log pi_base + sum_j alpha_j log pi_ARM_j) over the same N candidates.
/// Inputs are log-probabilities (or logits: each is log-normalised first); `-inf` entries are allowed.
pub fn genarm<T: Real>(base_logprobs: &[T], arm_logprobs: &[&[T]], alphas: &[T]) -> Result<Vec<T>> {
    let n = base_logprobs.len();
    check_row("genarm base_logprobs", base_logprobs, n)?;
    if arm_logprobs.len() != alphas.len() {
        return Err(CageError::Shape { what: "genarm alphas".into(), expected: arm_logprobs.len(), got: alphas.len() });
    }
    let base_lse = logsumexp(base_logprobs);
    if base_lse == f64::NEG_INFINITY {
        return Err(CageError::EmptyCandidates { row: 0 });
    }
    let mut z: Vec<T> = base_logprobs.iter().map(|&b| b - T::of(base_lse)).collect();
    for (j, (arm, &alpha)) in arm_logprobs.iter().zip(alphas).enumerate() {
        check_row(&format!("genarm ARM {j} log-probs"), arm, n)?;
        if !(alpha.is_finite() && alpha >= T::zero()) {
            return Err(CageError::BadWeight { principal: format!("{j}"), value: alpha.f64() });
        }
        let lse = T::of(logsumexp(arm));
        for (zi, &l) in z.iter_mut().zip(arm.iter()) {
            // 0 * -inf is NaN; an ARM with weight 0 must not touch the token.
            if alpha > T::zero() {
                *zi = *zi + alpha * (l - lse);
            }
        }
    }
    if z.iter().all(|x| *x == T::neg_infinity()) {
        return Err(CageError::EmptyCandidates { row: 0 });
    }
    softmax_in_place(&mut z);
    Ok(z)
}

/// Which divergence MOD's aligned policies were trained with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModDivergence {
    /// Reverse KL: pi ~ exp(sum_j w_j log pi_j).
    Reverse,
    /// Forward KL: pi ~ exp(-logsumexp_j(-log pi_j + log w_j)).
    Forward,
}

/// MOD: combine J aligned policies' logits (or log-probabilities) with weights `w`.
pub fn mod_policy<T: Real>(logits: &[&[T]], weights: &[T], divergence: ModDivergence) -> Result<Vec<T>> {
    let Some(first) = logits.first() else {
        return Err(CageError::InvalidArgument("MOD needs at least one policy".into()));
    };
    let n = first.len();
    if weights.len() != logits.len() {
        return Err(CageError::Shape { what: "MOD weights".into(), expected: logits.len(), got: weights.len() });
    }
    let mut logp = Vec::with_capacity(logits.len());
    for (j, (l, &w)) in logits.iter().zip(weights).enumerate() {
        check_row(&format!("MOD policy {j} logits"), l, n)?;
        if !(w.is_finite() && w >= T::zero()) {
            return Err(CageError::BadWeight { principal: format!("{j}"), value: w.f64() });
        }
        let lse = logsumexp(l);
        logp.push(l.iter().map(|x| x.f64() - lse).collect::<Vec<f64>>());
    }
    let mut z: Vec<f64> = (0..n)
        .map(|a| match divergence {
            ModDivergence::Reverse => {
                logp.iter().zip(weights).filter(|(_, w)| **w > T::zero()).map(|(lp, w)| w.f64() * lp[a]).sum()
            }
            ModDivergence::Forward => {
                let terms: Vec<f64> = logp
                    .iter()
                    .zip(weights)
                    .filter(|(_, w)| **w > T::zero())
                    .map(|(lp, w)| -lp[a] + w.f64().ln())
                    .collect();
                -logsumexp(&terms)
            }
        })
        .collect();
    if z.iter().all(|x| *x == f64::NEG_INFINITY || x.is_nan()) {
        return Err(CageError::EmptyCandidates { row: 0 });
    }
    softmax_in_place(&mut z);
    Ok(z.into_iter().map(T::of).collect())
}
