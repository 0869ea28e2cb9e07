//! The batched game in the flat layout the kernels use: B rows, N candidates, J principals.
//!
//! - `base`:    B x N   log pi0 over the candidates (need not be normalised; `-inf` excludes a candidate)
//! - `values`:  B x J x N  the values v_j = preprocess(q_j) * w_j the game is played with (>= 0, finite)
//! - `weights`: B x J   the user's weights w_j (kept for reporting; already folded into `values`)
//! - `tau`:     B       the agent's temperature per row
//!
//! Candidates whose base log-probability is `-inf` get probability 0 and are otherwise ignored: they take no
//! part in `shift_min`, in the value scale, or in any principal's incentives (their values are stored as 0).

use crate::error::{CageError, Result};
use crate::real::Real;

/// How a principal's raw token values q become the values v the game is played with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Normalize {
    /// `v = (q - min_a q) * w`: the authors' preprocessing, makes every value >= 0.
    #[default]
    ShiftMin,
    /// `v = q * w`: the caller guarantees q >= 0.
    None,
}

crate::spelled!(Normalize, "normalize");

/// Raw input of a batch before validation; [`Batch::new`] checks it and applies the preprocessing.
#[derive(Clone, Debug, Default)]
pub struct BatchInput<T> {
    /// B.
    pub rows: usize,
    /// N.
    pub candidates: usize,
    /// J.
    pub principals: usize,
    /// B x N base log-probabilities.
    pub base_logprobs: Vec<T>,
    /// B x J x N raw principal values q.
    pub values: Vec<T>,
    /// B x J weights (>= 0).
    pub weights: Vec<T>,
    /// One tau for the whole batch, or one per row.
    pub tau: Vec<T>,
    /// Value preprocessing.
    pub normalize: Normalize,
    /// Optional principal names (J of them), used in error messages.
    pub names: Vec<String>,
}

/// A validated batch of games, ready for any solver.
#[derive(Clone, Debug)]
pub struct Batch<T> {
    rows: usize,
    candidates: usize,
    principals: usize,
    base: Vec<T>,
    values: Vec<T>,
    weights: Vec<T>,
    tau: Vec<T>,
}

/// One row of a batch: the single-step game the solvers work on.
#[derive(Clone, Copy, Debug)]
pub struct Row<'a, T> {
    /// N base log-probabilities (`-inf` = excluded).
    pub base: &'a [T],
    /// J x N values v_j >= 0 (0 at excluded candidates).
    pub values: &'a [T],
    /// Temperature.
    pub tau: T,
    /// Number of principals J.
    pub principals: usize,
}

impl<'a, T: Real> Row<'a, T> {
    /// N.
    pub fn len(&self) -> usize {
        self.base.len()
    }
    /// True when N = 0 (never for a validated batch).
    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }
    /// Values of principal `j`.
    pub fn value(&self, j: usize) -> &'a [T] {
        let n = self.base.len();
        &self.values[j * n..(j + 1) * n]
    }
}

fn check_finite<T: Real>(what: &dyn Fn() -> String, xs: &[T], allow_neg_inf: bool) -> Result<()> {
    for (i, &x) in xs.iter().enumerate() {
        let ok = x.is_finite() || (allow_neg_inf && x == T::neg_infinity());
        if !ok {
            return Err(CageError::NonFinite { what: what(), index: i, value: format!("{x}") });
        }
    }
    Ok(())
}

impl<T: Real> Batch<T> {
    /// Validates `input` and preprocesses the values. Every problem is reported as a [`CageError`] naming it.
    pub fn new(input: BatchInput<T>) -> Result<Self> {
        let BatchInput { rows, candidates: n, principals: j, base_logprobs, values, weights, tau, normalize, names } =
            input;
        let name = |p: usize| names.get(p).map_or_else(|| format!("{p}"), |s| format!("{s:?}"));
        let shape = |what: &str, expected: usize, got: usize| -> Result<()> {
            if expected == got { Ok(()) } else { Err(CageError::Shape { what: what.into(), expected, got }) }
        };
        if rows == 0 {
            return Err(CageError::InvalidArgument("a batch needs at least one row".into()));
        }
        if n == 0 {
            return Err(CageError::EmptyCandidates { row: 0 });
        }
        let bn = rows.checked_mul(n).ok_or_else(|| CageError::InvalidArgument("B x N overflows".into()))?;
        let bjn = bn.checked_mul(j).ok_or_else(|| CageError::InvalidArgument("B x J x N overflows".into()))?;
        shape("base_logprobs", bn, base_logprobs.len())?;
        shape("values", bjn, values.len())?;
        shape("weights", rows * j, weights.len())?;
        if !names.is_empty() {
            shape("principal names", j, names.len())?;
        }
        if tau.len() != 1 {
            shape("tau (one per batch or one per row)", rows, tau.len())?;
        }
        for &t in &tau {
            if !valid_tau(t) {
                return Err(CageError::BadTau(t.f64()));
            }
        }
        check_finite(&|| "base_logprobs".into(), &base_logprobs, true)?;
        for (i, &b) in base_logprobs.iter().enumerate() {
            if b == T::infinity() || b.is_nan() {
                return Err(CageError::NonFinite { what: "base_logprobs".into(), index: i, value: format!("{b}") });
            }
        }
        for (i, &w) in weights.iter().enumerate() {
            if !(w.is_finite() && w >= T::zero()) {
                return Err(CageError::BadWeight { principal: name(i % j.max(1)), value: w.f64() });
            }
        }
        let tau = if tau.len() == 1 { vec![tau[0]; rows] } else { tau };
        let mut v = values;
        for r in 0..rows {
            let base = &base_logprobs[r * n..(r + 1) * n];
            if base.iter().all(|&b| b == T::neg_infinity()) {
                return Err(CageError::EmptyCandidates { row: r });
            }
            for p in 0..j {
                let q = &mut v[(r * j + p) * n..(r * j + p + 1) * n];
                check_finite(&|| format!("values of principal {} (row {r})", name(p)), q, false)?;
                let w = weights[r * j + p];
                let active = || q.iter().zip(base).filter(|(_, b)| **b != T::neg_infinity()).map(|(x, _)| *x);
                let shift = match normalize {
                    Normalize::ShiftMin => active().fold(T::infinity(), T::min),
                    Normalize::None => {
                        if let Some((i, &x)) =
                            q.iter().enumerate().find(|&(i, &x)| x < T::zero() && base[i] != T::neg_infinity())
                        {
                            return Err(CageError::NegativeValue {
                                row: r,
                                principal: name(p),
                                index: i,
                                value: x.f64(),
                            });
                        }
                        T::zero()
                    }
                };
                for (x, &b) in q.iter_mut().zip(base) {
                    *x = if b == T::neg_infinity() { T::zero() } else { (*x - shift) * w };
                    if !x.is_finite() {
                        return Err(CageError::Overflow(format!(
                            "values of principal {} (row {r}) overflow {} after preprocessing; use f64 or smaller values",
                            name(p),
                            T::NAME
                        )));
                    }
                }
            }
            // The softmax sees base + sum_j v_j / tau: it must stay finite in the working precision.
            let vmax: f64 = (0..j)
                .map(|p| v[(r * j + p) * n..(r * j + p + 1) * n].iter().fold(0.0f64, |m, x| m.max(x.f64())))
                .sum();
            let bmax = base.iter().fold(f64::NEG_INFINITY, |m, x| m.max(x.f64()));
            let zmax = bmax.abs() + vmax / tau[r].f64();
            if !T::of(zmax).is_finite() || T::of(zmax) > T::max_value() / T::of(4.0) {
                return Err(CageError::Overflow(format!(
                    "row {r}: values / tau reach {zmax:e}, which overflows {}; use f64, a larger tau or smaller values",
                    T::NAME
                )));
            }
        }
        Ok(Self { rows, candidates: n, principals: j, base: base_logprobs, values: v, weights, tau })
    }

    /// Number of rows B.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of candidates N per row.
    pub fn candidates(&self) -> usize {
        self.candidates
    }
    /// Number of principals J.
    pub fn principals(&self) -> usize {
        self.principals
    }
    /// B x N base log-probabilities as given.
    pub fn base(&self) -> &[T] {
        &self.base
    }
    /// B x J x N preprocessed values v.
    pub fn values(&self) -> &[T] {
        &self.values
    }
    /// B x J weights.
    pub fn weights(&self) -> &[T] {
        &self.weights
    }
    /// Per-row temperatures (length B).
    pub fn tau(&self) -> &[T] {
        &self.tau
    }
    /// Row `r` as a single game.
    pub fn row(&self, r: usize) -> Row<'_, T> {
        let (n, j) = (self.candidates, self.principals);
        Row {
            base: &self.base[r * n..(r + 1) * n],
            values: &self.values[r * j * n..(r + 1) * j * n],
            tau: self.tau[r],
            principals: j,
        }
    }
    /// The batch's buffers back as an input (with `values` preprocessed and `normalize: none`), so that a caller
    /// solving batch after batch can refill them instead of allocating.
    pub fn into_input(self) -> BatchInput<T> {
        BatchInput {
            rows: self.rows,
            candidates: self.candidates,
            principals: self.principals,
            base_logprobs: self.base,
            values: self.values,
            weights: self.weights,
            tau: self.tau,
            normalize: Normalize::None,
            names: Vec::new(),
        }
    }

    /// The same batch in another precision (validation is repeated, so overflow in `f32` is reported).
    pub fn convert<U: Real>(&self) -> Result<Batch<U>> {
        let cv = |xs: &[T]| xs.iter().map(|x| U::of(x.f64())).collect::<Vec<U>>();
        Batch::new(BatchInput {
            rows: self.rows,
            candidates: self.candidates,
            principals: self.principals,
            base_logprobs: cv(&self.base),
            values: cv(&self.values),
            weights: vec![U::one(); self.rows * self.principals],
            tau: cv(&self.tau),
            normalize: Normalize::None,
            names: vec![],
        })
        .map(|mut b| {
            b.weights = cv(&self.weights);
            b
        })
    }
}

/// Whether `tau` is a usable temperature: finite, > 0, and with a finite reciprocal in its precision (a
/// subnormal tau passes the first two, and `x / tau` then overflows to a NaN policy).
pub fn valid_tau<T: num_traits::Float>(tau: T) -> bool {
    tau.is_finite() && tau > T::zero() && tau.recip().is_finite()
}
