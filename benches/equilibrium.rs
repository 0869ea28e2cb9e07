//! Criterion benches of the exact CPU solver on the shapes:
//! single rows (N=50, J=2), (N=49152, J=3), (N=128256, J=4) and a batch of 64 rows with N=32000, J=2.
//! Inputs look like a decoding step: base logits ~ N(0, 2.5^2) (a peaked softmax), principal values
//! q = log pi_ARM - log pi_ref ~ N(0, 1), weights in [0.2, 1], tau = 0.1, shift_min preprocessing.
//! `benches/numpy_peer.py` draws inputs from the same distributions for the NumPy float64 peer.

use cage::solver::{Method, SolveOptions, exact, solve};
use cage::{Batch, BatchInput, Normalize, Real};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;

fn normal(r: &mut StdRng) -> f64 {
    // Box-Muller: keeps the bench free of a distributions crate.
    let (a, b): (f64, f64) = (r.random_range(1e-12..1.0), r.random_range(0.0..1.0));
    (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
}

/// A batch shaped like a decoding step (see the module comment).
pub fn decoding_batch<T: Real>(rows: usize, n: usize, j: usize, seed: u64) -> Batch<T> {
    let mut r = StdRng::seed_from_u64(seed);
    let base = (0..rows * n).map(|_| T::of(2.5 * normal(&mut r))).collect();
    let values = (0..rows * j * n).map(|_| T::of(normal(&mut r))).collect();
    let weights = (0..rows * j).map(|_| T::of(r.random_range(0.2..1.0))).collect();
    Batch::new(BatchInput {
        rows,
        candidates: n,
        principals: j,
        base_logprobs: base,
        values,
        weights,
        tau: vec![T::of(0.1)],
        normalize: Normalize::ShiftMin,
        names: vec![],
    })
    .expect("valid batch")
}

fn bench_exact(c: &mut Criterion) {
    let mut g = c.benchmark_group("exact");
    for &(rows, n, j) in &[(1usize, 50usize, 2usize), (1, 49152, 3), (1, 128256, 4), (64, 32000, 2)] {
        let id = format!("B{rows}_N{n}_J{j}");
        g.throughput(Throughput::Elements((rows * n * j) as u64));
        let b64 = decoding_batch::<f64>(rows, n, j, 7);
        let b32 = decoding_batch::<f32>(rows, n, j, 7);
        let opts = SolveOptions::new(Method::Exact);
        if rows == 1 {
            // The latency path: one row, a reused workspace and outputs, no allocation, no thread pool.
            let mut ws = exact::Workspace::new(n, j);
            let (mut pi, mut y, mut ag, mut pay) = (vec![0f32; n], vec![0f32; j * n], vec![0f32; n], vec![0f32; j]);
            g.bench_function(BenchmarkId::new("f32_row_into", &id), |bch| {
                bch.iter(|| {
                    let out =
                        exact::RowOutput { policy: &mut pi, incentives: &mut y, aggregate: &mut ag, payoffs: &mut pay };
                    exact::solve_row_into(&b32.row(0), &mut ws, f32::DEFAULT_TOL, 20_000, out).unwrap()
                })
            });
        }
        g.bench_function(BenchmarkId::new("f32", &id), |bch| bch.iter(|| solve(black_box(&b32), &opts).unwrap()));
        g.bench_function(BenchmarkId::new("f64", &id), |bch| bch.iter(|| solve(black_box(&b64), &opts).unwrap()));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_exact
}
criterion_main!(benches);
