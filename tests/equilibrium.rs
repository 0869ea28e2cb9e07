//! The CPU equilibrium checked against independent references: the f64 reference iteration, Algorithm 1, and
//! the equilibrium conditions themselves (no principal gains by deviating).

mod common;

use cage::solver::{Method, SolveOptions, exact, jacobi, reference, solve};
use cage::{Batch, BatchInput, Normalize, Solution};
use common::*;
use rand::Rng;

fn exact64(b: &Batch<f64>) -> Solution<f64> {
    solve(b, &SolveOptions::new(Method::Exact)).unwrap()
}

#[test]
fn fast_solver_matches_the_f64_reference() {
    let mut r = rng(1);
    for case in 0..200 {
        let (n, j) = (r.random_range(1..80), r.random_range(1..5));
        let g = RandomGame::new(&mut r, n, j);
        let b = g.batch::<f64>();
        let want = reference::solve(&b, 1e-13, 1_000_000);
        assert!(want.converged[0], "reference did not converge on case {case}");
        let got = exact64(&b);
        assert!(got.converged[0], "case {case}: exact did not converge: {:?}", got.residual);
        let scale = b.values().iter().cloned().fold(g.tau, f64::max);
        assert!(max_diff(&got.policy, &want.policy) < 1e-9, "case {case} policy");
        assert!(max_diff(&got.payoffs, &want.payoffs) < 1e-9 * scale, "case {case} payoffs");
        assert!(max_diff(&got.incentives, &want.incentives) < 1e-8 * scale, "case {case} incentives");
        assert!(max_diff(&got.aggregate, &want.aggregate) < 1e-8 * scale, "case {case} aggregate");

        let got32 = solve(&g.batch::<f32>(), &SolveOptions::new(Method::Exact)).unwrap();
        assert!(got32.converged[0], "case {case}: f32 did not converge");
        assert!(max_diff(&got32.policy, &want.policy) < 2e-4, "case {case} f32 policy");
        let d = max_diff(&got32.payoffs, &want.payoffs);
        // f32 rounding of the logits is amplified where the game is ill-conditioned (dF/du near 0).
        assert!(d < 5e-4 * scale, "case {case} f32 payoffs differ by {d} (scale {scale})");
    }
}

#[test]
fn batched_rows_in_parallel_equal_rows_solved_alone() {
    let mut r = rng(2);
    let b = random_batch(&mut r, 16, 37, 3);
    let all = exact64(&b);
    for row in 0..16 {
        let one = reference::solve(
            &Batch::new(BatchInput {
                rows: 1,
                candidates: 37,
                principals: 3,
                base_logprobs: b.row(row).base.to_vec(),
                values: b.row(row).values.to_vec(),
                weights: vec![1.0; 3],
                tau: vec![b.tau()[row]],
                normalize: Normalize::None,
                names: vec![],
            })
            .unwrap(),
            1e-13,
            1_000_000,
        );
        assert!(max_diff(all.policy_row(row), &one.policy) < 1e-9, "row {row}");
        assert!(max_diff(all.payoff_row(row), &one.payoffs) < 1e-9, "row {row}");
    }
}

#[test]
fn jacobi_reaches_the_exact_equilibrium() {
    let mut r = rng(3);
    for case in 0..40 {
        let (n, j) = (r.random_range(2..40), r.random_range(1..5));
        let b = RandomGame::new(&mut r, n, j).batch::<f64>();
        let want = exact64(&b);
        let got = solve(&b, &SolveOptions::new(Method::Jacobi)).unwrap();
        assert!(got.converged[0], "case {case}: jacobi did not converge ({})", got.residual[0]);
        assert!(max_diff(&got.policy, &want.policy) < 1e-7, "case {case} policy");
        assert!(max_diff(&got.payoffs, &want.payoffs) < 1e-7, "case {case} payoffs");
    }
}

#[test]
fn no_principal_gains_by_deviating() {
    let mut r = rng(4);
    for case in 0..25 {
        let (n, j) = (r.random_range(2..25), r.random_range(1..4));
        let g = RandomGame::new(&mut r, n, j);
        let b = g.batch::<f64>();
        let sol = exact64(&b);
        let vs = g.values();
        for (p, v) in vs.iter().enumerate() {
            let y = sol.incentive_row(0, p).to_vec();
            let others: Vec<f64> = sol.aggregate.iter().zip(&y).map(|(t, a)| t - a).collect();
            let at_eq = payoff(&g.base, &others, v, &y, g.tau);
            assert!((at_eq - sol.payoffs[p]).abs() < 1e-10, "case {case}: reported payoff is not the payoff");
            let mut starts = vec![y.clone(), vec![0.0; n], v.to_vec()];
            for _ in 0..3 {
                starts.push(v.iter().map(|x| x * r.random_range(0.0..1.0)).collect());
            }
            let best = best_deviation(&g.base, &others, v, g.tau, &starts);
            assert!(best <= at_eq + 1e-9, "case {case} principal {p}: deviation gains {}", best - at_eq);
            for (a, (&ya, &va)) in y.iter().zip(v).enumerate() {
                assert!((0.0..=va).contains(&ya), "case {case}: y[{a}] = {ya} outside [0, {va}]");
            }
        }
    }
}

#[test]
fn same_policy_from_several_starting_points() {
    let mut r = rng(5);
    for case in 0..30 {
        let (n, j) = (r.random_range(2..50), r.random_range(1..5));
        let b = RandomGame::new(&mut r, n, j).batch::<f64>();
        let row = b.row(0);
        let want = exact64(&b);
        let hi = reference::start(&row);
        for _ in 0..4 {
            let u0: Vec<f64> = hi.iter().map(|h| h * r.random_range(0.0..1.0)).collect();
            let (u, _, _, ok) = reference::solve_row_from(&row, u0, 1e-13, 1_000_000, |_| ());
            assert!(ok, "case {case}");
            assert!(max_diff(&reference::policy(&row, &u), &want.policy) < 1e-9, "case {case}");
        }
    }
}

#[test]
fn residual_decreases_geometrically() {
    let mut r = rng(6);
    let mut passes = (0, 0);
    for case in 0..30 {
        let (n, j) = (r.random_range(5..50), r.random_range(1..5));
        let b = RandomGame::new(&mut r, n, j).batch::<f64>();
        let mut trace = Vec::new();
        let (_, _, _, ok) =
            reference::solve_row_from(&b.row(0), reference::start(&b.row(0)), 1e-13, 100_000, |x| trace.push(x));
        assert!(ok, "case {case}");
        // Every window of 50 iterations (once past the first 10) at least halves the residual, unless it is
        // already at rounding level: linear convergence at a rate of 0.986 or better.
        for k in 10..trace.len().saturating_sub(50) {
            if trace[k] > 1e-11 {
                assert!(
                    trace[k + 50] < 0.5 * trace[k],
                    "case {case}: residual {} -> {} at {k}",
                    trace[k],
                    trace[k + 50]
                );
            }
        }
        // Newton needs far fewer passes than Picard (seen: 6 to 24 against 77 to 629, 14x in total), though
        // the reference above iterates to 1e-13 and the fast solver to its default 1e-11.
        let fast = exact64(&b);
        let (newton, picard) = (fast.iterations[0] as usize, trace.len());
        assert!(fast.converged[0] && 3 * newton <= picard, "case {case}: {newton} Newton passes, {picard} Picard");
        passes.0 += newton;
        passes.1 += picard;
    }
    assert!(8 * passes.0 <= passes.1, "{} Newton passes in all against {} Picard", passes.0, passes.1);
}

#[test]
fn small_perturbations_move_the_policy_proportionally() {
    let mut r = rng(7);
    for case in 0..20 {
        let g = RandomGame::new(&mut r, 30, 2);
        let pi = exact64(&g.batch()).policy;
        let dir_b: Vec<f64> = (0..30).map(|_| r.random_range(-1.0..1.0)).collect();
        let dir_q: Vec<f64> = (0..60).map(|_| r.random_range(-1.0..1.0)).collect();
        let moved = |eps: f64| {
            let mut h = g.clone();
            h.base.iter_mut().zip(&dir_b).for_each(|(x, d)| *x += eps * d);
            h.q.iter_mut().zip(&dir_q).for_each(|(x, d)| *x += eps * d);
            max_diff(&exact64(&h.batch()).policy, &pi)
        };
        let (d1, d2) = (moved(1e-6), moved(2e-6));
        assert!(d1 > 0.0 && d1 < 1e-6 * 1e3, "case {case}: change {d1} for a 1e-6 perturbation");
        let ratio = d2 / d1;
        assert!((1.7..2.3).contains(&ratio), "case {case}: doubling the perturbation scaled the change by {ratio}");
    }
}

fn game(base: Vec<f64>, values: Vec<Vec<f64>>, weights: Vec<f64>, tau: f64, normalize: Normalize) -> Batch<f64> {
    let (n, j) = (base.len(), values.len());
    Batch::new(BatchInput {
        rows: 1,
        candidates: n,
        principals: j,
        base_logprobs: base,
        values: values.concat(),
        weights,
        tau: vec![tau],
        normalize,
        names: vec![],
    })
    .unwrap()
}

#[test]
fn a_principal_in_the_dead_zone_pays_nothing() {
    // Flat values: nothing to gain, so no incentive, and the policy is the other principal's alone.
    let base = vec![-0.5, -1.0, -2.0, -3.0];
    let flat =
        game(base.clone(), vec![vec![0.7; 4], vec![1.0, 0.0, 2.0, 0.5]], vec![1.0, 1.0], 0.1, Normalize::ShiftMin);
    let alone = game(base.clone(), vec![vec![1.0, 0.0, 2.0, 0.5]], vec![1.0], 0.1, Normalize::ShiftMin);
    let (s, a) = (exact64(&flat), exact64(&alone));
    assert!(s.incentive_row(0, 0).iter().all(|&y| y == 0.0));
    assert!(max_diff(&s.policy, &a.policy) < 1e-10);
    // Values whose spread above their mean is below tau: the threshold is never reached.
    let small = game(base, vec![vec![0.0, 0.05, 0.02, 0.01]], vec![1.0], 0.1, Normalize::None);
    let s = exact64(&small);
    assert!(s.incentives.iter().all(|&y| y == 0.0));
    assert!(
        max_diff(&s.policy, &exact64(&game(vec![-0.5, -1.0, -2.0, -3.0], vec![], vec![], 0.1, Normalize::None)).policy)
            < 1e-12
    );
}

#[test]
fn weight_zero_is_inert_and_no_principal_gives_pi0() {
    let mut r = rng(8);
    let g = RandomGame::new(&mut r, 20, 2);
    let with = exact64(&g.batch());
    let mut h = g.clone();
    h.j = 3;
    h.q.extend((0..20).map(|_| r.random_range(-5.0..5.0)));
    h.w.push(0.0);
    let zero = exact64(&h.batch());
    assert!(max_diff(&zero.policy, &with.policy) < 1e-12);
    assert!(zero.incentive_row(0, 2).iter().all(|&y| y == 0.0));

    let none = RandomGame { j: 0, q: vec![], w: vec![], ..g.clone() };
    let pi0 = agent_policy(&g.base, &[0.0; 20], 1.0);
    for m in [Method::Exact, Method::Jacobi, Method::Base, Method::Linear] {
        let s = solve(&none.batch::<f64>(), &SolveOptions::new(m)).unwrap();
        assert!(max_diff(&s.policy, &pi0) < 1e-12, "{m:?}");
    }
}

#[test]
fn a_very_large_tau_gives_pi0() {
    let mut r = rng(9);
    let mut g = RandomGame::new(&mut r, 25, 3);
    g.tau = 1e9;
    let pi0 = agent_policy(&g.base, &[0.0; 25], 1.0);
    assert!(max_diff(&exact64(&g.batch()).policy, &pi0) < 1e-8);
}

#[test]
fn one_principal_is_its_threshold_contract() {
    // With one principal the equilibrium is its optimal contract: checked by deviation and by Jacobi.
    let mut r = rng(10);
    for _ in 0..10 {
        let g = RandomGame::new(&mut r, 15, 1);
        let b = g.batch::<f64>();
        let s = exact64(&b);
        let v = &g.values()[0];
        let y = s.incentive_row(0, 0);
        let at = payoff(&g.base, &[0.0; 15], v, y, g.tau);
        assert!((at - s.payoffs[0]).abs() < 1e-10, "reported payoff {} is not the payoff {at}", s.payoffs[0]);
        let best = best_deviation(&g.base, &[0.0; 15], v, g.tau, &[vec![0.0; 15], y.to_vec()]);
        assert!(best <= at + 1e-10);
        let jac = solve(&b, &SolveOptions::new(Method::Jacobi)).unwrap();
        assert!(max_diff(&jac.policy, &s.policy) < 1e-8);
    }
}

#[test]
fn a_single_candidate_takes_all_the_probability() {
    let s = exact64(&game(vec![-3.0], vec![vec![5.0], vec![1.0]], vec![1.0, 2.0], 0.1, Normalize::None));
    assert_eq!(s.policy, vec![1.0]);
    assert_eq!(s.incentives, vec![0.0, 0.0]);
    assert!((s.payoffs[0] - 5.0).abs() < 1e-12 && (s.payoffs[1] - 2.0).abs() < 1e-12);
}

#[test]
fn minus_infinity_candidates_are_ignored() {
    let ninf = f64::NEG_INFINITY;
    let full = game(
        vec![-0.3, ninf, -1.2, -2.0, ninf],
        vec![vec![0.1, 99.0, 0.9, 0.4, -50.0], vec![0.8, -99.0, 0.2, 0.5, 7.0]],
        vec![1.0, 0.7],
        0.1,
        Normalize::ShiftMin,
    );
    let kept = game(
        vec![-0.3, -1.2, -2.0],
        vec![vec![0.1, 0.9, 0.4], vec![0.8, 0.2, 0.5]],
        vec![1.0, 0.7],
        0.1,
        Normalize::ShiftMin,
    );
    for m in [Method::Exact, Method::Jacobi, Method::Linear, Method::Base] {
        let (a, b) = (solve(&full, &SolveOptions::new(m)).unwrap(), solve(&kept, &SolveOptions::new(m)).unwrap());
        let pick = |xs: &[f64]| vec![xs[0], xs[2], xs[3]];
        assert_eq!((a.policy[1], a.policy[4]), (0.0, 0.0), "{m:?}");
        assert!(max_diff(&pick(&a.policy), &b.policy) < 1e-10, "{m:?}");
        assert!(max_diff(&a.payoffs, &b.payoffs) < 1e-10, "{m:?}");
        for p in 0..2 {
            let y = a.incentive_row(0, p);
            assert_eq!((y[1], y[4]), (0.0, 0.0), "{m:?}");
            assert!(max_diff(&pick(y), b.incentive_row(0, p)) < 1e-9, "{m:?}");
        }
    }
}

#[test]
fn huge_and_tiny_values_are_solved_without_overflow() {
    // The game is invariant under (v, tau) -> (c v, c tau): the policy must not change with c.
    let mut r = rng(11);
    let g = RandomGame::new(&mut r, 40, 3);
    let want = exact64(&g.batch()).policy;
    for c in [1e-30, 1e-12, 1e12, 1e30] {
        let h = RandomGame { q: g.q.iter().map(|x| x * c).collect(), tau: g.tau * c, ..g.clone() };
        let s = exact64(&h.batch());
        assert!(s.converged[0] && max_diff(&s.policy, &want) < 1e-9, "f64, scale {c}");
    }
    for c in [1e-20, 1e20] {
        let h = RandomGame { q: g.q.iter().map(|x| x * c).collect(), tau: g.tau * c, ..g.clone() };
        let s = solve(&h.batch::<f32>(), &SolveOptions::new(Method::Exact)).unwrap();
        assert!(s.converged[0] && max_diff(&s.policy, &want) < 2e-4, "f32, scale {c}");
        assert!(s.payoffs.iter().all(|x| x.is_finite()));
    }
    // Base log-probabilities far apart (as after a very peaked softmax) stay finite too.
    let mut h = g.clone();
    h.base[0] = -1e4;
    h.base[1] = 1e4;
    let s = exact64(&h.batch());
    assert!(s.policy.iter().all(|p| p.is_finite()) && (s.policy[1] - 1.0).abs() < 1e-12);
}

#[test]
fn exact_newton_handles_rows_where_picard_is_slow() {
    // Small tau and many principals with overlapping values: the hardest cases for the damped iteration.
    let mut r = rng(12);
    for case in 0..50 {
        let mut g = RandomGame::new(&mut r, 50, 4);
        g.tau = 0.01;
        let b = g.batch::<f64>();
        let s = exact64(&b);
        let want = reference::solve(&b, 1e-13, 1_000_000);
        assert!(s.converged[0], "case {case}");
        assert!(max_diff(&s.policy, &want.policy) < 1e-8, "case {case}");
    }
}

#[test]
fn workspace_reuse_gives_identical_results() {
    let mut r = rng(13);
    let b = random_batch(&mut r, 4, 33, 2);
    let mut ws = exact::Workspace::new(1, 1);
    let n = 33;
    for row in 0..4 {
        let (mut pi, mut y, mut ag, mut pay) = (vec![0.0; n], vec![0.0; 2 * n], vec![0.0; n], vec![0.0; 2]);
        let out = exact::RowOutput { policy: &mut pi, incentives: &mut y, aggregate: &mut ag, payoffs: &mut pay };
        exact::solve_row_into(&b.row(row), &mut ws, 1e-11, 1000, out).unwrap();
        let all = exact64(&b);
        assert_eq!(pi, all.policy_row(row));
        assert_eq!(pay, all.payoff_row(row));
        assert_eq!(y, all.incentives[row * 2 * n..(row + 1) * 2 * n]);
    }
    let (mut pi, mut y, mut ag, mut pay) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; 2]);
    let out = exact::RowOutput { policy: &mut pi, incentives: &mut y, aggregate: &mut ag, payoffs: &mut pay };
    let e = exact::solve_row_into(&b.row(0), &mut ws, 1e-11, 1000, out).unwrap_err().to_string();
    assert!(e.contains("incentives output") && e.contains("expected 66"), "{e}");
}

#[test]
fn paper_mode_is_the_truncated_algorithm() {
    let mut r = rng(14);
    let mut differs = 0;
    for _ in 0..40 {
        let g = RandomGame::new(&mut r, 50, 2);
        let b = g.batch::<f64>();
        let p = solve(&b, &SolveOptions::new(Method::Paper)).unwrap();
        assert!(p.iterations[0] <= 5);
        assert!((p.policy.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(p.converged[0], p.residual[0] <= 1e-3);
        let e = exact64(&b);
        if max_diff(&p.policy, &e.policy) > 1e-4 {
            differs += 1;
        }
        // The truncated solver starts from y = 0, so what it pays is bounded by the values.
        for (j, vj) in g.values().iter().enumerate() {
            for (y, v) in p.incentive_row(0, j).iter().zip(vj) {
                assert!(*y >= 0.0 && y <= v);
            }
        }
    }
    // The point of the mode: it is an approximation, visibly different from the exact equilibrium.
    assert!(differs > 0);
    let _ = jacobi::JacobiOptions::truncated();
}

#[test]
fn analytic_jacobian_matches_finite_differences() {
    let mut r = rng(15);
    let mut checked = 0;
    for _ in 0..40 {
        let (n, j) = (r.random_range(3..40), r.random_range(1..5));
        let b = RandomGame::new(&mut r, n, j).batch::<f64>();
        let row = b.row(0);
        let hi = reference::start(&row);
        let u: Vec<f64> = hi.iter().map(|h| h * r.random_range(0.2..1.0)).collect();
        let (f0, jac) = exact::residual_and_jacobian(&row, &u);
        let h = 1e-7;
        for k in 0..j {
            let mut up = u.clone();
            up[k] += h;
            let mut dn = u.clone();
            dn[k] -= h;
            let (fp, _) = exact::residual_and_jacobian(&row, &up);
            let (fm, _) = exact::residual_and_jacobian(&row, &dn);
            for p in 0..j {
                // F is piecewise smooth: skip the rare difference that straddles a kink (v = u + tau).
                let (left, right) = ((f0[p] - fm[p]) / h, (fp[p] - f0[p]) / h);
                if (left - right).abs() > 1e-4 * (1.0 + left.abs()) {
                    continue;
                }
                let fd = (fp[p] - fm[p]) / (2.0 * h);
                assert!(
                    (fd - jac[p * j + k]).abs() < 1e-5 * (1.0 + fd.abs()),
                    "dF_{p}/du_{k}: {fd} vs {}",
                    jac[p * j + k]
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100);
}

#[test]
fn games_with_more_principals_than_the_limit_are_refused_quickly() {
    use cage::solver::MAX_PRINCIPALS;
    let mut r = rng(11);
    // At the limit every method solves, and exact converges even with a small tau.
    let mut g = RandomGame::new(&mut r, 50, MAX_PRINCIPALS);
    g.tau = 0.01;
    let b = g.batch::<f64>();
    let t = std::time::Instant::now();
    let sol = exact64(&b);
    assert!(sol.converged[0], "J = {MAX_PRINCIPALS}: residual {}", sol.residual[0]);
    assert!(t.elapsed().as_secs_f64() < 5.0, "J = {MAX_PRINCIPALS} took {:?}", t.elapsed());
    // One more is an error that says why, for every iterative method, before any pass (hundreds of principals
    // used to run 20000 passes: minutes).
    let b = RandomGame::new(&mut r, 50, 300).batch::<f64>();
    for method in [Method::Exact, Method::Jacobi, Method::Paper] {
        let t = std::time::Instant::now();
        let e = solve(&b, &SolveOptions::new(method)).unwrap_err().to_string();
        assert!(e.contains("300 principals") && e.contains(&format!("at most {MAX_PRINCIPALS}")), "{e}");
        assert!(t.elapsed().as_secs_f64() < 0.5, "{method:?} took {:?} to refuse", t.elapsed());
    }
    let b = RandomGame::new(&mut r, 20, MAX_PRINCIPALS + 1).batch::<f64>();
    assert!(exact64_err(&b).contains(&format!("{} principals", MAX_PRINCIPALS + 1)));
    // The low-latency row path too.
    let (n, j) = (20, MAX_PRINCIPALS + 1);
    let (mut policy, mut inc, mut agg, mut pay) = (vec![0.0; n], vec![0.0; j * n], vec![0.0; n], vec![0.0; j]);
    let out = exact::RowOutput { policy: &mut policy, incentives: &mut inc, aggregate: &mut agg, payoffs: &mut pay };
    let e = exact::solve_row_into(&b.row(0), &mut exact::Workspace::new(n, j), 1e-11, 1000, out).unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    // base and linear have no iteration and no limit.
    let b = RandomGame::new(&mut r, 20, 300).batch::<f64>();
    for method in [Method::Base, Method::Linear] {
        assert!(solve(&b, &SolveOptions::new(method)).is_ok());
    }
}

fn exact64_err(b: &Batch<f64>) -> String {
    solve(b, &SolveOptions::new(Method::Exact)).unwrap_err().to_string()
}
