//! Sampled decoding (`sampling: sample`) end to end on the tiny fixture: a seed fixes the tokens and another
//! changes them; every sampled token is the draw keyed by (seed, row, step) from the base model's distribution
//! computed here; first tokens over many rows follow that distribution (chi-square); the CPU choice follows pi
//! in frequency; and the CPU and the CUDA kernel (on the host emulation) pick the same token for the same key.

mod common;

use cage::gpu::Gpu;
use cage::model::Model;
use cage::sampling::{Choice, choose_row};
use common::fixtures::{decode, fixture, ids, next_logprobs, tiny_run_config, tokens};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Arc;

const PROMPTS: [&str; 3] = ["t3 t4 t5 t6", "t20 t21", "t100 t7 t8 t9 t50 t60"];

/// Pearson's chi-square statistic of `counts` against probabilities `p` (bins with an expected count under 5
/// pooled into one) and its degrees of freedom.
fn chi_square(counts: &[u64], p: &[f64]) -> (f64, usize) {
    let n: u64 = counts.iter().sum();
    let (mut stat, mut bins, mut pooled) = (0.0, 0usize, (0u64, 0.0f64));
    for (&c, &pi) in counts.iter().zip(p) {
        let e = pi * n as f64;
        if e < 5.0 {
            pooled = (pooled.0 + c, pooled.1 + e);
        } else {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pooled.1 > 0.0 {
        stat += (pooled.0 as f64 - pooled.1).powi(2) / pooled.1;
        bins += 1;
    } else if pooled.0 > 0 {
        return (f64::INFINITY, bins);
    }
    (stat, bins.saturating_sub(1))
}

/// A bound the statistic exceeds with probability far below 1e-6 when the counts follow `p` (mean df,
/// standard deviation sqrt(2 df)); the seeds are fixed, so this never flakes.
fn chi_square_bound(df: usize) -> f64 {
    df as f64 + 8.0 * (2.0 * df as f64).sqrt() + 10.0
}

#[test]
fn a_seed_fixes_the_sampled_tokens_and_another_changes_them() {
    for method in ["base", "cage"] {
        let cfg = |seed: u64| {
            tiny_run_config(json!({"method": method, "sampling": "sample", "seed": seed, "k": 0, "tau": 1.0,
                                   "max_new_tokens": 12}))
        };
        let a = tokens(&decode(&cfg(7), &PROMPTS).unwrap());
        assert_eq!(a, tokens(&decode(&cfg(7), &PROMPTS).unwrap()), "{method}: seed 7 twice");
        assert_ne!(a, tokens(&decode(&cfg(8), &PROMPTS).unwrap()), "{method}: seeds 7 and 8 agree");
        // And sampling is not greedy decoding.
        let greedy = tiny_run_config(json!({"method": method, "k": 0, "tau": 1.0, "max_new_tokens": 12}));
        assert_ne!(a, tokens(&decode(&greedy, &PROMPTS).unwrap()), "{method}: sampling equals greedy");
    }
}

/// Each token of a sampled `base` decoding is the Gumbel-max draw keyed by (seed, row, step) from the base
/// model's next-token distribution, recomputed here by the plain CPU decoder on the row's prefix.
#[test]
fn every_sampled_token_is_the_keyed_draw_from_the_base_distribution() {
    let seed = 1234;
    let cfg = tiny_run_config(json!({"method": "base", "sampling": "sample", "seed": seed, "k": 0,
                                     "max_new_tokens": 10}));
    let got = decode(&cfg, &PROMPTS).unwrap();
    let model = Arc::new(Model::load(&fixture("tiny-llama")).unwrap());
    for (row, (r, p)) in got.iter().zip(PROMPTS).enumerate() {
        let mut seq = ids(p);
        for (step, &tok) in r.tokens.iter().enumerate() {
            let pi: Vec<f32> = next_logprobs(&model, &seq).iter().map(|l| l.exp() as f32).collect();
            let want = choose_row(&pi, Choice::Gumbel, seed, row as u32, step as u32).unwrap();
            assert_eq!(tok as usize, want, "row {row} step {step}");
            seq.push(tok);
        }
    }
}

/// First tokens sampled over many rows of one prompt (each row its own key) follow the base distribution.
#[test]
fn first_sampled_tokens_follow_the_base_distribution() {
    let rows = 3000;
    let prompt = "t30 t31 t32";
    let cfg = tiny_run_config(json!({"method": "base", "sampling": "sample", "seed": 99, "k": 0,
                                     "max_new_tokens": 1, "batch_size": 500}));
    let got = decode(&cfg, &vec![prompt; rows]).unwrap();
    let model = Arc::new(Model::load(&fixture("tiny-llama")).unwrap());
    let p: Vec<f64> = next_logprobs(&model, &ids(prompt)).iter().map(|l| l.exp()).collect();
    let mut counts = vec![0u64; p.len()];
    for r in &got {
        counts[r.tokens[0] as usize] += 1;
    }
    let (stat, df) = chi_square(&counts, &p);
    assert!(df >= 5, "the base distribution is too peaked to test: {df} degrees of freedom");
    assert!(stat < chi_square_bound(df), "chi-square {stat:.1} with {df} degrees of freedom");
    // The uniform distribution over the vocabulary is rejected by the same test: it has the power to fail.
    let uniform = vec![1.0 / p.len() as f64; p.len()];
    let (stat_u, df_u) = chi_square(&counts, &uniform);
    assert!(stat_u > chi_square_bound(df_u), "uniform not rejected: {stat_u:.1} ({df_u} df)");
}

/// `choose_row` samples in proportion to pi: by Gumbel-max and by exponential race (the same draws, hence the
/// same token), over steps, with entries of 0 never chosen and rows that do not sum to 1 scaled.
#[test]
fn the_cpu_choice_follows_pi_in_frequency() {
    let p = [0.4f32, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0];
    let scaled: Vec<f32> = p.iter().map(|x| 3.0 * x).collect();
    let steps = 20_000u32;
    let mut counts = [0u64; 7];
    for step in 0..steps {
        let g = choose_row(&p, Choice::Gumbel, 5, 2, step).unwrap();
        assert_eq!(g, choose_row(&p, Choice::Race, 5, 2, step).unwrap(), "step {step}: Gumbel and race differ");
        assert_eq!(g, choose_row(&scaled, Choice::Gumbel, 5, 2, step).unwrap(), "step {step}: scaling changed it");
        counts[g] += 1;
    }
    assert_eq!(counts[6], 0, "a candidate of probability 0 was chosen");
    let pf: Vec<f64> = p.iter().map(|&x| x as f64).collect();
    let (stat, df) = chi_square(&counts[..6], &pf[..6]);
    assert_eq!(df, 5);
    assert!(stat < chi_square_bound(df), "chi-square {stat:.1}: {counts:?}");
    // Greedy is the argmax, whatever the key.
    assert!((0..50).all(|s| choose_row(&p, Choice::Greedy, s, 0, s as u32).unwrap() == 0));
}

/// The CUDA choice kernel (host emulation) and the CPU pick the same candidate for the same policy and
/// (seed, row, step), row by row, for random policies with zeros.
#[test]
fn cpu_and_gpu_pick_the_same_token_for_the_same_key() {
    let mut gpu = Gpu::emulated();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (rows, n) = (6, 300);
    for trial in 0..6u64 {
        let pi: Vec<f32> =
            (0..rows * n).map(|_| if rng.random_bool(0.2) { 0.0 } else { rng.random::<f32>().powi(4) }).collect();
        for choice in [Choice::Greedy, Choice::Gumbel, Choice::Race] {
            let (seed, step) = (trial * 1_000_003 + 11, trial as u32 * 7);
            let got = gpu.choose(&pi, rows, n, None, choice, seed, step).unwrap();
            for r in 0..rows {
                let cpu = choose_row(&pi[r * n..(r + 1) * n], choice, seed, r as u32, step).unwrap();
                assert_eq!(got[r] as usize, cpu, "trial {trial} {choice:?} row {r}");
            }
        }
    }
}
