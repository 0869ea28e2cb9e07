//! Candidate selection and the log-normaliser on one decoding row of SmolLM2's vocabulary (49,152 logits):
//! the old approach (sort-based top-k over an index vector, then a sequential `f64::exp` sum, then the
//! normaliser again inside `select`) side by side with `cage::candidates::select` and
//! `cage::softmax::logsumexp`. Logits look like a decoding step's: ~N(0, 2.5^2) with a few -inf.

use cage::candidates::{Candidates, Selection, select};
use criterion::{Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;

const V: usize = 49_152;

fn row(seed: u64) -> Vec<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..V)
        .map(|_| {
            let (a, b): (f64, f64) = (r.random_range(1e-12..1.0), r.random_range(0.0..1.0));
            let z = (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos();
            if r.random_range(0..1000) == 0 { f32::NEG_INFINITY } else { (2.5 * z) as f32 }
        })
        .collect()
}

/// The log-normaliser as it was: an 8-lane max, then a sequential sum of `f64::exp`.
fn old_logsumexp(z: &[f32]) -> f64 {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m }) as f64;
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + z.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln()
}

/// `select` as it was: a NaN / +inf scan, the normaliser, then `select_nth_unstable_by` over all ids.
fn old_select(logits: &[f32], k: usize) -> Candidates<f32> {
    assert!(!logits.iter().any(|x| x.is_nan() || *x == f32::INFINITY));
    let lse = old_logsumexp(logits);
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |a: &u32, b: &u32| (logits[*b as usize] as f64).total_cmp(&(logits[*a as usize] as f64)).then(a.cmp(b));
    ids.select_nth_unstable_by(k - 1, order);
    ids.truncate(k);
    ids.sort_unstable_by(order);
    let base_logprobs = ids.iter().map(|&i| (logits[i as usize] as f64 - lse) as f32).collect();
    Candidates { ids, base_logprobs }
}

fn bench_candidates(c: &mut Criterion) {
    let x = row(3);
    assert_eq!(old_select(&x, 50).ids, select(&x, Selection::TopK(50)).unwrap().ids);
    let mut g = c.benchmark_group("candidates_v49152");
    g.bench_function("select_top50/old", |b| b.iter(|| old_select(black_box(&x), 50)));
    g.bench_function("select_top50/new", |b| b.iter(|| select(black_box(&x), Selection::TopK(50)).unwrap()));
    g.bench_function("logsumexp/old", |b| b.iter(|| old_logsumexp(black_box(&x))));
    g.bench_function("logsumexp/new", |b| b.iter(|| cage::softmax::logsumexp(black_box(&x))));
    g.finish();
}

criterion_group!(benches, bench_candidates);
criterion_main!(benches);
