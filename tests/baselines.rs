//! Baselines and candidate selection against formulas computed here.

mod common;

use cage::baselines::{ModDivergence, genarm, mod_policy};
use cage::candidates::{Selection, gather, select};
use cage::solver::{Method, SolveOptions, solve};
use common::*;

fn softmax(z: &[f64]) -> Vec<f64> {
    agent_policy(z, &vec![0.0; z.len()], 1.0)
}

#[test]
fn linear_tilt_is_the_formula() {
    let mut r = rng(21);
    let g = RandomGame::new(&mut r, 30, 3);
    let b = g.batch::<f64>();
    let s = solve(&b, &SolveOptions::new(Method::Linear)).unwrap();
    let v = g.values();
    let z: Vec<f64> = (0..30).map(|a| g.base[a] + (0..3).map(|j| v[j][a]).sum::<f64>() / g.tau).collect();
    assert!(max_diff(&s.policy, &softmax(&z)) < 1e-12);
    assert!(s.payoffs.iter().all(|&p| p.abs() < 1e-15));
    let base = solve(&b, &SolveOptions::new(Method::Base)).unwrap();
    assert!(max_diff(&base.policy, &softmax(&g.base)) < 1e-12);
}

#[test]
fn genarm_is_the_formula() {
    let base = [-0.2, -1.7, -3.0, f64::NEG_INFINITY];
    let arm1 = [-1.0, -0.5, -2.5, -0.1];
    let arm2 = [1.0, 2.0, 0.0, 3.0];
    let pi = genarm(&base, &[&arm1, &arm2], &[0.3, 0.7]).unwrap();
    let lse = |x: &[f64]| x.iter().map(|v| v.exp()).sum::<f64>().ln();
    let z: Vec<f64> =
        (0..4).map(|a| base[a] - lse(&base) + 0.3 * (arm1[a] - lse(&arm1)) + 0.7 * (arm2[a] - lse(&arm2))).collect();
    assert!(max_diff(&pi, &softmax(&z)) < 1e-12);
    assert_eq!(pi[3], 0.0);
    // alpha = 0 for every ARM gives the base policy.
    assert!(max_diff(&genarm(&base, &[&arm1], &[0.0]).unwrap(), &softmax(&base)) < 1e-12);
    assert!(genarm(&base, &[&arm1[..3]], &[1.0]).unwrap_err().to_string().contains("shape"));
    assert!(genarm(&base, &[&arm1], &[-1.0]).unwrap_err().to_string().contains("weight"));
    assert!(genarm(&[f64::NEG_INFINITY; 4], &[&arm1], &[1.0]).unwrap_err().to_string().contains("empty"));
}

#[test]
fn mod_combines_policies_as_defined() {
    let l1 = [2.0, 0.0, -1.0];
    let l2 = [-1.0, 1.0, 0.5];
    let logp = |l: &[f64]| {
        let s = l.iter().map(|v| v.exp()).sum::<f64>().ln();
        l.iter().map(|v| v - s).collect::<Vec<f64>>()
    };
    let (p1, p2) = (logp(&l1), logp(&l2));
    let rev = mod_policy(&[&l1, &l2], &[0.25, 0.75], ModDivergence::Reverse).unwrap();
    let want: Vec<f64> = (0..3).map(|a| 0.25 * p1[a] + 0.75 * p2[a]).collect();
    assert!(max_diff(&rev, &softmax(&want)) < 1e-12);
    let fwd = mod_policy(&[&l1, &l2], &[0.25, 0.75], ModDivergence::Forward).unwrap();
    let want: Vec<f64> =
        (0..3).map(|a| -((-p1[a] + 0.25f64.ln()).exp() + (-p2[a] + 0.75f64.ln()).exp()).ln()).collect();
    assert!(max_diff(&fwd, &softmax(&want)) < 1e-12);
    assert!(mod_policy::<f64>(&[], &[], ModDivergence::Reverse).is_err());
}

#[test]
fn top_k_selects_the_most_likely_tokens_with_ties_by_id() {
    let logits = [0.5f32, 3.0, -1.0, 3.0, 2.0, f32::NEG_INFINITY, 0.5];
    let c = select(&logits, Selection::TopK(4)).unwrap();
    assert_eq!(c.ids, vec![1, 3, 4, 0]);
    let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
    for (id, lp) in c.ids.iter().zip(&c.base_logprobs) {
        assert!((*lp as f64 - (logits[*id as usize] as f64 - lse)).abs() < 1e-6);
    }
    let all = select(&logits, Selection::All).unwrap();
    assert_eq!(all.ids, (0..7).collect::<Vec<u32>>());
    assert_eq!(all.base_logprobs[5], f32::NEG_INFINITY);
    // k larger than V keeps everything, sorted by probability.
    assert_eq!(select(&logits, Selection::TopK(50)).unwrap().ids, vec![1, 3, 4, 0, 6, 2, 5]);
    assert_eq!(gather(&[10.0f32, 11.0, 12.0, 13.0, 14.0], &c.ids).unwrap(), vec![11.0, 13.0, 14.0, 10.0]);
    assert!(gather(&[1.0f32], &[3]).is_err());
    assert!(select(&logits, Selection::TopK(0)).is_err());
    assert!(select(&[f32::NAN, 0.0], Selection::All).unwrap_err().to_string().contains("NaN"));
    assert!(select(&[f32::NEG_INFINITY; 3], Selection::TopK(2)).is_err());
}

#[test]
fn top_k_of_a_random_vocabulary_matches_a_full_sort() {
    use rand::Rng;
    let mut r = rng(22);
    let logits: Vec<f32> = (0..5000).map(|_| (r.random_range(0..200) as f32) * 0.1).collect();
    let c = select(&logits, Selection::TopK(50)).unwrap();
    let mut order: Vec<u32> = (0..5000).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    assert_eq!(c.ids, order[..50].to_vec());
}

#[test]
fn the_vectorisable_exp_is_accurate() {
    use cage::Real;
    let mut worst32: f64 = 0.0;
    let mut worst64: f64 = 0.0;
    let mut x = -700.0f64;
    while x <= 0.0 {
        let want = x.exp();
        worst64 = worst64.max(((x.exp_nonpos() - want) / want).abs());
        if x > -87.0 {
            let w32 = (x as f32 as f64).exp();
            worst32 = worst32.max((((x as f32).exp_nonpos() as f64 - w32) / w32).abs());
        }
        x += 0.0137;
    }
    assert!(worst64 < 1e-15, "f64 relative error {worst64}");
    assert!(worst32 < 3e-7, "f32 relative error {worst32}");
    assert_eq!(f64::NEG_INFINITY.exp_nonpos(), 0.0);
    assert_eq!(f32::NEG_INFINITY.exp_nonpos(), 0.0);
    assert_eq!((-800.0f64).exp_nonpos(), 0.0);
    assert_eq!((-100.0f32).exp_nonpos(), 0.0);
    assert_eq!(0.0f64.exp_nonpos(), 1.0);
    assert_eq!(0.0f32.exp_nonpos(), 1.0);
}
