//! Property tests (proptest) of the exact equilibrium on random games, with shrinking to a minimal failing
//! game: the threshold form of every incentive, the payoff identity, the agent's best response, no profitable
//! deviation, equivariance under permutations of candidates and of principals, and zero probability for
//! excluded (-inf) candidates.

mod common;

use cage::solver::{Method, SolveOptions, solve};
use cage::{Batch, BatchInput, Normalize, Solution};
use common::{agent_policy, best_deviation, payoff, shift_min_values};
use proptest::prelude::*;

/// A game as proptest generates it (f64, one row).
#[derive(Clone, Debug)]
struct Game {
    n: usize,
    j: usize,
    base: Vec<f64>,
    q: Vec<f64>,
    w: Vec<f64>,
    tau: f64,
}

impl Game {
    fn batch(&self) -> Batch<f64> {
        Batch::new(BatchInput {
            rows: 1,
            candidates: self.n,
            principals: self.j,
            base_logprobs: self.base.clone(),
            values: self.q.clone(),
            weights: self.w.clone(),
            tau: vec![self.tau],
            normalize: Normalize::ShiftMin,
            names: vec![],
        })
        .expect("generated games are valid")
    }
}

/// Games like decoding steps: peaked base log-probabilities with some excluded candidates (at least one
/// live), values spread over a few units, weights in [0, 1] with exact zeros, temperatures from 0.01 to 10.
fn game(max_n: usize, max_j: usize) -> impl Strategy<Value = Game> {
    (1..=max_n, 0..=max_j).prop_flat_map(|(n, j)| {
        let base = prop::collection::vec(prop_oneof![9 => -8.0..0.0f64, 1 => Just(f64::NEG_INFINITY)], n);
        let live = 0..n;
        let q = prop::collection::vec(-3.0..1.0f64, n * j);
        let w = prop::collection::vec(prop_oneof![4 => 0.0..1.0f64, 1 => Just(0.0)], j);
        let tau = prop::sample::select(vec![0.01, 0.05, 0.1, 0.3, 1.0, 10.0]);
        (base, live, q, w, tau).prop_map(move |(mut base, live, q, w, tau)| {
            if base.iter().all(|b| *b == f64::NEG_INFINITY) {
                base[live] = -1.0;
            }
            Game { n, j, base, q, w, tau }
        })
    })
}

fn exact(b: &Batch<f64>) -> Solution<f64> {
    solve(b, &SolveOptions::new(Method::Exact)).unwrap()
}

/// The row's value scale max(max v, tau), which tolerances are relative to.
fn scale(b: &Batch<f64>) -> f64 {
    b.values().iter().cloned().fold(b.tau()[0], f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// y_j = max(0, v_j - u_j - tau) at every live candidate; u_j = pi . (v_j - y_j); pi = softmax(log pi0 +
    /// Y / tau); excluded candidates get probability 0 and no incentive.
    #[test]
    fn the_equilibrium_has_the_threshold_form(g in game(40, 6)) {
        let b = g.batch();
        let sol = exact(&b);
        prop_assert!(sol.converged[0], "not converged: residual {}", sol.residual[0]);
        let (s, tau, vs) = (scale(&b), g.tau, shift_min_values(&g.base, &g.q, &g.w));
        for (p, v) in vs.iter().enumerate() {
            let (y, u) = (sol.incentive_row(0, p), sol.payoffs[p]);
            for a in 0..g.n {
                let want = if g.base[a] == f64::NEG_INFINITY { 0.0 } else { (v[a] - u - tau).max(0.0) };
                prop_assert!((y[a] - want).abs() <= 1e-9 * s, "y[{p}][{a}] = {} but the threshold gives {want}", y[a]);
            }
            let identity: f64 = sol.policy.iter().zip(v).zip(y).map(|((pi, v), y)| pi * (v - y)).sum();
            prop_assert!((identity - u).abs() <= 1e-9 * s, "principal {p}: u = {u} but pi . (v - y) = {identity}");
        }
        let pi = agent_policy(&g.base, &sol.aggregate, tau);
        for (a, ((&want, &got), &base)) in pi.iter().zip(&sol.policy).zip(&g.base).enumerate() {
            prop_assert!((want - got).abs() <= 1e-9, "pi[{a}] = {got} is not the best response {want}");
            if base == f64::NEG_INFINITY {
                prop_assert!(got == 0.0, "excluded candidate {a} has probability {got}");
            }
        }
    }

    /// Permuting the candidates permutes the policy and incentives and leaves the payoffs; permuting the
    /// principals permutes payoffs and incentives and leaves the policy.
    #[test]
    fn permutations_permute_the_solution(g in game(30, 5), seed in any::<u64>()) {
        let b = g.batch();
        let sol = exact(&b);
        let s = scale(&b);
        // A permutation from the seed (Fisher-Yates with a linear congruential generator).
        let perm = |len: usize, mut x: u64| -> Vec<usize> {
            let mut p: Vec<usize> = (0..len).collect();
            for i in (1..len).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                p.swap(i, (x >> 33) as usize % (i + 1));
            }
            p
        };
        let (pc, pp) = (perm(g.n, seed), perm(g.j, seed ^ 0x9e37_79b9));
        let mut h = g.clone();
        h.base = pc.iter().map(|&a| g.base[a]).collect();
        h.q = (0..g.j).flat_map(|p| pc.iter().map(move |&a| (p, a))).map(|(p, a)| g.q[p * g.n + a]).collect();
        let by_candidates = exact(&h.batch());
        let mut k = g.clone();
        k.q = pp.iter().flat_map(|&p| g.q[p * g.n..(p + 1) * g.n].to_vec()).collect();
        k.w = pp.iter().map(|&p| g.w[p]).collect();
        let by_principals = exact(&k.batch());
        for (i, &a) in pc.iter().enumerate() {
            prop_assert!((by_candidates.policy[i] - sol.policy[a]).abs() <= 1e-9, "candidate {a} moved to {i}");
            prop_assert!((by_principals.policy[a] - sol.policy[a]).abs() <= 1e-9, "policy of candidate {a}");
        }
        for (i, &p) in pp.iter().enumerate() {
            prop_assert!((by_candidates.payoffs[p] - sol.payoffs[p]).abs() <= 1e-9 * s, "payoff {p}");
            prop_assert!((by_principals.payoffs[i] - sol.payoffs[p]).abs() <= 1e-9 * s, "principal {p} moved to {i}");
            for a in 0..g.n {
                let y = sol.incentive_row(0, p)[a];
                prop_assert!((by_principals.incentive_row(0, i)[a] - y).abs() <= 1e-8 * s);
            }
        }
    }
}

proptest! {
    // Each case runs a projected-gradient optimiser per principal: fewer, smaller games.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// No principal gains more than 1e-9 (relative) by deviating from its equilibrium incentive.
    #[test]
    fn no_principal_gains_by_deviating(g in game(16, 3)) {
        let b = g.batch();
        let sol = exact(&b);
        let vs = shift_min_values(&g.base, &g.q, &g.w);
        for (p, v) in vs.iter().enumerate() {
            let y = sol.incentive_row(0, p).to_vec();
            let others: Vec<f64> = sol.aggregate.iter().zip(&y).map(|(t, a)| t - a).collect();
            let at_eq = payoff(&g.base, &others, v, &y, g.tau);
            prop_assert!((at_eq - sol.payoffs[p]).abs() <= 1e-9 * scale(&b), "principal {p}: reported payoff is not the payoff");
            let starts = vec![y.clone(), vec![0.0; g.n], v.to_vec(), v.iter().map(|x| x / 2.0).collect()];
            let best = best_deviation(&g.base, &others, v, g.tau, &starts);
            prop_assert!(best <= at_eq + 1e-9 * scale(&b), "principal {p} gains {}", best - at_eq);
        }
    }
}
