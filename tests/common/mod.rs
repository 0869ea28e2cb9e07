//! Helpers shared by the integration tests: random games and an independent evaluation of a principal's payoff.
#![allow(dead_code)]

pub mod fixtures;
pub mod gguf;
pub mod skip;

use cage::{Batch, BatchInput, Normalize};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded generator, so every failure is reproducible.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Shape and contents of a random game.
#[derive(Clone, Debug)]
pub struct RandomGame {
    /// N.
    pub n: usize,
    /// J.
    pub j: usize,
    /// Base log-probabilities (unnormalised logits).
    pub base: Vec<f64>,
    /// Raw values q (J x N).
    pub q: Vec<f64>,
    /// Weights (J).
    pub w: Vec<f64>,
    /// Temperature.
    pub tau: f64,
}

impl RandomGame {
    /// A random game like a decoding step: peaked base logits, ARM-like values with a spread of a few units.
    pub fn new(rng: &mut StdRng, n: usize, j: usize) -> Self {
        let base = (0..n).map(|_| rng.random_range(-6.0..0.0)).collect();
        let q = (0..n * j).map(|_| rng.random_range(-3.0..1.0)).collect();
        let w = (0..j).map(|_| rng.random_range(0.1..1.0)).collect();
        let tau = [0.05, 0.1, 0.3, 1.0][rng.random_range(0..4)];
        Self { n, j, base, q, w, tau }
    }

    /// The game values v_j by [`shift_min_values`].
    pub fn values(&self) -> Vec<Vec<f64>> {
        shift_min_values(&self.base, &self.q, &self.w)
    }

    /// The game as a one-row batch in precision `T`.
    pub fn batch<T: cage::Real>(&self) -> Batch<T> {
        let c = |xs: &[f64]| xs.iter().map(|&x| T::of(x)).collect::<Vec<T>>();
        Batch::new(BatchInput {
            rows: 1,
            candidates: self.n,
            principals: self.j,
            base_logprobs: c(&self.base),
            values: c(&self.q),
            weights: c(&self.w),
            tau: vec![T::of(self.tau)],
            normalize: Normalize::ShiftMin,
            names: vec![],
        })
        .expect("random games are valid")
    }
}

/// Several random games stacked into one batch (same N and J), with per-row tau.
pub fn random_batch(rng: &mut StdRng, rows: usize, n: usize, j: usize) -> Batch<f64> {
    let games: Vec<RandomGame> = (0..rows).map(|_| RandomGame::new(rng, n, j)).collect();
    Batch::new(BatchInput {
        rows,
        candidates: n,
        principals: j,
        base_logprobs: games.iter().flat_map(|g| g.base.clone()).collect(),
        values: games.iter().flat_map(|g| g.q.clone()).collect(),
        weights: games.iter().flat_map(|g| g.w.clone()).collect(),
        tau: games.iter().map(|g| g.tau).collect(),
        normalize: Normalize::ShiftMin,
        names: vec![],
    })
    .expect("random batches are valid")
}

/// The values the game is played with under `shift_min`, built here rather than read back from the crate:
/// v_j(a) = (q_j(a) - min over live candidates of q_j) * w_j, and 0 at excluded (-inf) candidates. `q` is J x N.
pub fn shift_min_values(base: &[f64], q: &[f64], w: &[f64]) -> Vec<Vec<f64>> {
    let n = base.len();
    let live = |a: &usize| base[*a] != f64::NEG_INFINITY;
    q.chunks_exact(n)
        .zip(w)
        .map(|(qj, wj)| {
            let lo = (0..n).filter(live).map(|a| qj[a]).fold(f64::INFINITY, f64::min);
            (0..n).map(|a| if live(&a) { (qj[a] - lo) * wj } else { 0.0 }).collect()
        })
        .collect()
}

/// pi = softmax(base + Y / tau), computed here independently of the crate.
pub fn agent_policy(base: &[f64], y_total: &[f64], tau: f64) -> Vec<f64> {
    let z: Vec<f64> = base.iter().zip(y_total).map(|(b, y)| b + y / tau).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// Payoff of a principal with values `v` offering `y` when the others offer `others` in total.
pub fn payoff(base: &[f64], others: &[f64], v: &[f64], y: &[f64], tau: f64) -> f64 {
    let total: Vec<f64> = others.iter().zip(y).map(|(o, a)| o + a).collect();
    let pi = agent_policy(base, &total, tau);
    pi.iter().zip(v).zip(y).map(|((p, v), y)| p * (v - y)).sum()
}

/// The best payoff a test-local optimiser finds for one principal against fixed `others`: projected
/// gradient ascent (finite-difference-free, analytic gradient derived in the test) with backtracking, from
/// `starts`. Deliberately a different algorithm from the crate's solvers.
pub fn best_deviation(base: &[f64], others: &[f64], v: &[f64], tau: f64, starts: &[Vec<f64>]) -> f64 {
    let n = v.len();
    let mut best = f64::NEG_INFINITY;
    for s in starts {
        let mut y: Vec<f64> = s.iter().zip(v).map(|(a, b)| a.clamp(0.0, *b)).collect();
        let mut f = payoff(base, others, v, &y, tau);
        let mut step = 1.0;
        for _ in 0..3000 {
            let total: Vec<f64> = others.iter().zip(&y).map(|(o, a)| o + a).collect();
            let pi = agent_policy(base, &total, tau);
            let g: Vec<f64> = (0..n).map(|a| pi[a] * ((v[a] - y[a] - f) / tau - 1.0)).collect();
            let mut moved = false;
            let mut st = step * 2.0;
            while st > 1e-14 {
                let t: Vec<f64> = (0..n).map(|a| (y[a] + st * g[a]).clamp(0.0, v[a])).collect();
                let ft = payoff(base, others, v, &t, tau);
                if ft > f {
                    y = t;
                    f = ft;
                    step = st;
                    moved = true;
                    break;
                }
                st *= 0.5;
            }
            if !moved {
                break;
            }
        }
        best = best.max(f);
    }
    best
}

/// Max absolute difference of two slices.
pub fn max_diff<T: cage::Real, U: cage::Real>(a: &[T], b: &[U]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x.f64() - y.f64()).abs()).fold(0.0, f64::max)
}
