//! Test bodies of the CUDA kernels, shared by tests/kernels_emu.rs (host emulation, every CI run) and
//! tests/gpu_kernels.rs (a real GPU when one is present): the same checks against the CPU solvers on both,
//! listed once in [`kernel_tests`]. Included with `#[macro_use] #[path]`; as its own test target it runs
//! nothing.
#![allow(dead_code)]

/// The kernel tests of one device, from one list (candle's `test_device!`): `kernel_tests!(NAME, open: F,
/// full_row: N, jacobi: (CASES, TOL), must_split: B)` makes a module NAME with one `#[test]` per body. Each test
/// opens its device with `F(test name) -> Option<Gpu>` (None: skipped) and runs with the sizes that suit the
/// device: the long row of [`equilibrium_matches_reference`], the converged cases of [`jacobi_matches_cpu`] and
/// their tolerance, and whether [`equilibrium_cluster_split`] must find clusters.
#[allow(unused_macros)]
macro_rules! kernel_tests {
    (
        $device:ident, open: $open:expr, full_row: $full:expr, jacobi: ($cases:expr, $tol:expr),
        must_split: $must:expr
    ) => {
        kernel_tests!(@tests $device, $open, {
            equilibrium_matches_reference: |g| bodies::equilibrium_matches_reference(g, $full),
            equilibrium_edge_cases: bodies::equilibrium_edge_cases,
            equilibrium_cluster_split: |g| {
                let ran = bodies::equilibrium_cluster_split(g);
                assert!(ran || !$must, "this device must run thread-block clusters");
            },
            equilibrium_bf16_values: bodies::equilibrium_bf16_values,
            equilibrium_rejects_bad_requests: bodies::equilibrium_rejects_bad_requests,
            // 3001 tokens: more than the top-k limit, so `k = min(V, 1024)` and the full row take different paths.
            candidates_match_cpu: |g| bodies::candidates_match_cpu(g, 3001),
            candidates_massive_ties: bodies::candidates_massive_ties,
            candidates_split_rows: bodies::candidates_split_rows,
            principal_values_split_rows: bodies::principal_values_split_rows,
            equilibrium_staged_vector_tails: bodies::equilibrium_staged_vector_tails,
            candidates_mostly_excluded: bodies::candidates_mostly_excluded,
            candidates_reject_bad_requests: bodies::candidates_reject_bad_requests,
            device_step_matches_host_chain: bodies::device_step_matches_host_chain,
            choose_is_reproducible_and_follows_pi: bodies::choose_is_reproducible_and_follows_pi,
            principal_values_match_cpu: bodies::principal_values_match_cpu,
            policy_matches_host_stage: bodies::policy_matches_host_stage,
            resident_step_reports_tokens_and_values: bodies::resident_step_reports_tokens_and_values,
            resident_step_split_rows: bodies::resident_step_split_rows,
            jacobi_matches_cpu: |g| bodies::jacobi_matches_cpu(g, $cases, $tol),
            graph_replays_equilibrium: bodies::graph_replays_equilibrium,
            stale_jobs_are_refused: bodies::stale_jobs_are_refused,
            attention_matches_reference: bodies::attention_matches_reference,
            attention_rejects_bad_requests: bodies::attention_rejects_bad_requests,
            quant_matmul_matches_reference: bodies::quant_matmul_matches_reference,
            quant_matmul_rejects_bad_requests: bodies::quant_matmul_rejects_bad_requests,
            gguf_matmul_matches_reference: bodies::gguf_matmul_matches_reference,
        });
    };
    (@tests $device:ident, $open:expr, { $($name:ident: $body:expr),* $(,)? }) => {
        mod $device {
            use super::*;
            $(
                #[test]
                fn $name() {
                    if let Some(mut gpu) = ($open)(concat!(stringify!($device), "::", stringify!($name))) {
                        ($body)(&mut gpu);
                    }
                }
            )*
        }
    };
}

use cage::candidates::{Selection, select};
use cage::gpu::{
    AttentionShape, DevicePolicy, DeviceStep, EqOptions, Gpu, Heads, KvCacheType, Logits, ValueType, attention_splits,
};
use cage::sampling::Choice;
use cage::solver::{exact, reference};
use cage::{Batch, BatchInput, Normalize, Solution};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a generated game looks like.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub rows: usize,
    pub n: usize,
    pub j: usize,
    /// Fraction of candidates excluded with a base log-probability of -inf.
    pub excluded: f64,
    /// Values drawn from a few levels only, and base log-probabilities too: many exact ties.
    pub ties: bool,
    /// Scale of the raw values (the softmax sees up to J * scale / tau).
    pub value_scale: f64,
    pub tau: (f64, f64),
}

impl Shape {
    pub fn new(rows: usize, n: usize, j: usize) -> Self {
        Self { rows, n, j, excluded: 0.0, ties: false, value_scale: 2.0, tau: (0.05, 0.5) }
    }
}

/// A random batch, already rounded to f32 (the GPU's precision) and returned in both precisions.
pub fn batch(shape: Shape, seed: u64) -> (Batch<f64>, Batch<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Shape { rows, n, j, excluded, ties, value_scale, tau } = shape;
    let level = |rng: &mut StdRng, k: f64| {
        if ties { (rng.random::<f64>() * k).floor() / k } else { rng.random::<f64>() }
    };
    let mut base = Vec::with_capacity(rows * n);
    for _ in 0..rows {
        let start = base.len();
        for _ in 0..n {
            base.push(if rng.random::<f64>() < excluded { f64::NEG_INFINITY } else { -6.0 * level(&mut rng, 4.0) });
        }
        // Every row keeps at least one candidate.
        if base[start..].iter().all(|b| *b == f64::NEG_INFINITY) {
            base[start] = -1.0;
        }
    }
    let values: Vec<f64> = (0..rows * j * n).map(|_| value_scale * level(&mut rng, 3.0)).collect();
    let weights: Vec<f64> = (0..rows * j).map(|_| rng.random_range(0.2..1.5)).collect();
    let tau: Vec<f64> = (0..rows).map(|_| rng.random_range(tau.0..tau.1)).collect();
    let b32 = Batch::new(BatchInput {
        rows,
        candidates: n,
        principals: j,
        base_logprobs: base.iter().map(|&x| x as f32).collect(),
        values: values.iter().map(|&x| x as f32).collect(),
        weights: weights.iter().map(|&x| x as f32).collect(),
        tau: tau.iter().map(|&x| x as f32).collect(),
        normalize: Normalize::ShiftMin,
        names: vec![],
    })
    .expect("valid generated batch");
    (b32.convert::<f64>().expect("f64 copy"), b32)
}

/// Largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f64], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - *y as f64).abs()).fold(0.0, f64::max)
}

/// Checks a GPU equilibrium against the f64 reference: the policy, aggregate incentive, each principal's
/// incentives and payoffs, and that the GPU reports convergence. Tolerances are those of an f32 solve to
/// relative tolerance 1e-6: policy entries to 2e-5 plus the f32 rounding of the largest logit the softmax sees
/// (values / tau can reach thousands), money amounts to 2e-4 of the row's value scale.
pub fn check_against_reference(b64: &Batch<f64>, sol: &Solution<f32>, what: &str) {
    let reference = reference::solve(b64, 1e-12, 1_000_000);
    let (n, j) = (b64.candidates(), b64.principals());
    for r in 0..b64.rows() {
        assert!(reference.converged[r], "{what}: reference did not converge in row {r}");
        assert!(sol.converged[r], "{what}: GPU row {r} did not converge (residual {})", sol.residual[r]);
        let row = b64.row(r);
        let scale = reference::value_scale(&row);
        let zmax = row.base.iter().filter(|b| b.is_finite()).fold(0.0f64, |m, b| m.max(b.abs()))
            + (0..j).map(|p| row.value(p).iter().cloned().fold(0.0, f64::max)).sum::<f64>() / row.tau;
        let pi_tol = 2e-5 + 4.0 * zmax * f32::EPSILON as f64;
        let dpi = max_diff(reference.policy_row(r), sol.policy_row(r));
        assert!(dpi <= pi_tol, "{what}: row {r}: policy differs by {dpi:e} (tolerance {pi_tol:e})");
        let s: f64 = sol.policy_row(r).iter().map(|&x| x as f64).sum();
        assert!((s - 1.0).abs() < 1e-5, "{what}: row {r}: policy sums to {s}");
        for a in 0..n {
            if row.base[a] == f64::NEG_INFINITY {
                assert_eq!(sol.policy_row(r)[a], 0.0, "{what}: excluded candidate {a} of row {r} has probability");
            }
        }
        let dy = max_diff(reference.aggregate_row(r), sol.aggregate_row(r));
        assert!(dy <= 2e-4 * scale, "{what}: row {r}: aggregate incentive differs by {dy:e} (scale {scale})");
        let dpay = max_diff(reference.payoff_row(r), sol.payoff_row(r));
        assert!(dpay <= 2e-4 * scale, "{what}: row {r}: payoffs differ by {dpay:e}");
        for p in 0..j {
            let d = max_diff(reference.incentive_row(r, p), sol.incentive_row(r, p));
            assert!(d <= 2e-4 * scale, "{what}: row {r}: incentives of principal {p} differ by {d:e}");
        }
    }
}

pub fn eq_opts() -> EqOptions {
    EqOptions { tol: 1e-6, ..EqOptions::default() }
}

/// The batched equilibrium over B = 1..8, J = 1..4, k = 50 and a longer "full" row whose length is no multiple
/// of the block or of the vector width, staged in shared memory and not.
pub fn equilibrium_matches_reference(gpu: &mut Gpu, full_n: usize) {
    let mut seed = 1;
    for (rows, n) in [(1, 50), (3, 50), (8, 50), (2, full_n)] {
        for j in 1..=4 {
            for stage in [Some(true), Some(false)] {
                seed += 1;
                let (b64, b32) = batch(Shape::new(rows, n, j), seed);
                let sol = gpu.equilibrium(&b32, &EqOptions { stage, ..eq_opts() }).expect("equilibrium");
                check_against_reference(&b64, &sol, &format!("B={rows} N={n} J={j} stage={stage:?}"));
                // The fast CPU solver in the same precision agrees as well (an independent implementation).
                let cpu = exact::solve(&b32, 1e-6, 20_000);
                for r in 0..rows {
                    let d =
                        cpu.policy_row(r).iter().zip(sol.policy_row(r)).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                    assert!(d <= 2e-5, "B={rows} N={n} J={j}: CPU f32 and GPU policies differ by {d:e} in row {r}");
                }
            }
        }
    }
}

/// -inf candidates, exact ties, extreme values / small tau, and J = 5..8.
pub fn equilibrium_edge_cases(gpu: &mut Gpu) {
    let cases = [
        ("excluded", Shape { excluded: 0.3, ..Shape::new(4, 61, 3) }),
        ("ties", Shape { ties: true, ..Shape::new(3, 50, 2) }),
        ("ties+excluded", Shape { ties: true, excluded: 0.5, ..Shape::new(2, 97, 4) }),
        ("extreme", Shape { value_scale: 40.0, tau: (0.01, 0.05), ..Shape::new(3, 50, 3) }),
        ("one candidate", Shape::new(2, 1, 2)),
        ("J=5", Shape::new(2, 50, 5)),
        ("J=8", Shape::new(1, 45, 8)),
    ];
    for (i, (what, shape)) in cases.into_iter().enumerate() {
        let (b64, b32) = batch(shape, 100 + i as u64);
        let sol = gpu.equilibrium(&b32, &eq_opts()).unwrap_or_else(|e| panic!("{what}: {e}"));
        check_against_reference(&b64, &sol, what);
    }
    // No principal: the policy is pi0.
    let (_, b32) = batch(Shape { excluded: 0.2, ..Shape::new(2, 33, 0) }, 7);
    let sol = gpu.equilibrium(&b32, &eq_opts()).expect("J = 0");
    let base = cage::baselines::base(&b32);
    let d = base.policy.iter().zip(&sol.policy).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(d <= 1e-6, "J = 0: policy differs from pi0 by {d:e}");
    assert!(sol.payoffs.is_empty() && sol.incentives.is_empty());
}

/// The game of `b` with its (preprocessed, weighted) values rounded to bf16: what the kernels see when they
/// store values as bf16.
pub fn rounded_to_bf16(b: &Batch<f32>) -> Batch<f32> {
    Batch::new(BatchInput {
        rows: b.rows(),
        candidates: b.candidates(),
        principals: b.principals(),
        base_logprobs: b.base().to_vec(),
        values: b.values().iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        weights: vec![1.0; b.rows() * b.principals()],
        tau: b.tau().to_vec(),
        normalize: Normalize::None,
        names: vec![],
    })
    .expect("a bf16-rounded copy of a valid batch")
}

/// bf16 storage of the values: the equilibrium of the bf16-rounded game.
pub fn equilibrium_bf16_values(gpu: &mut Gpu) {
    let b32r = rounded_to_bf16(&batch(Shape::new(3, 50, 4), 42).1);
    let sol = gpu.equilibrium(&b32r, &EqOptions { values: ValueType::Bf16, ..eq_opts() }).expect("bf16");
    check_against_reference(&b32r.convert::<f64>().unwrap(), &sol, "bf16 values");
}

/// Shapes and options the kernels cannot take are errors, not panics.
pub fn equilibrium_rejects_bad_requests(gpu: &mut Gpu) {
    let (_, b9) = batch(Shape::new(1, 10, 9), 3);
    let e = gpu.equilibrium(&b9, &eq_opts()).unwrap_err().to_string();
    assert!(e.contains("up to 8 principals"), "{e}");
    let (_, big) = batch(Shape::new(1, 200_000, 1), 3);
    let no_split = EqOptions { stage: Some(true), cluster: Some(1), ..eq_opts() };
    let e = gpu.equilibrium(&big, &no_split).unwrap_err().to_string();
    assert!(e.contains("shared memory"), "{e}");
    // A split that contradicts the other options, or that cannot fit, is refused by name.
    let e = gpu.equilibrium(&b9, &EqOptions { cluster: Some(2), ..eq_opts() }).unwrap_err().to_string();
    assert!(e.contains("principals"), "{e}");
    let (_, b) = batch(Shape::new(1, 100, 2), 3);
    let e = gpu.equilibrium(&b, &EqOptions { cluster: Some(2), stage: Some(false), ..eq_opts() }).unwrap_err();
    assert!(e.to_string().contains("stage"), "{e}");
    assert!(gpu.equilibrium(&b, &EqOptions { cluster: Some(0), ..eq_opts() }).is_err());
    let e = gpu.equilibrium(&b, &EqOptions { cluster: Some(16), ..eq_opts() }).unwrap_err().to_string();
    assert!(e.contains("cluster of 16"), "{e}");
    let (_, b) = batch(Shape::new(1, 10, 1), 3);
    assert!(gpu.equilibrium(&b, &EqOptions { tol: 0.0, ..eq_opts() }).is_err());
    assert!(gpu.equilibrium(&b, &EqOptions { tol: f64::NAN, ..eq_opts() }).is_err());
    assert!(gpu.equilibrium(&b, &EqOptions { max_iter: 0, ..eq_opts() }).is_err());
}

/// Whether the device runs the cluster-split equilibrium kernels.
pub fn has_clusters(gpu: &mut Gpu) -> bool {
    gpu.device().supports_cluster("cage_eqc_f32_j1", 512, 2, 4096)
}

/// Rows split across a thread-block cluster (forced, on rows small enough for the emulation), against the
/// reference and the one-block kernel: J = 1..4, f32 and bf16 values, -inf entries and ties, slices that end
/// mid-vector, clusters whose last blocks hold nothing; then a row too large for one block, split on its own.
/// Returns false (after a skip line) where the device has no clusters.
pub fn equilibrium_cluster_split(gpu: &mut Gpu) -> bool {
    if !has_clusters(gpu) {
        println!("SKIP equilibrium_cluster_split: {} has no thread-block clusters", gpu.describe());
        return false;
    }
    let cases = [
        ("c=2", Shape::new(1, 211, 1), 2),
        ("c=4", Shape::new(2, 1001, 2), 4),
        ("c=8", Shape { excluded: 0.3, ..Shape::new(3, 517, 3) }, 8),
        ("empty blocks", Shape::new(2, 7, 4), 8),
        ("ties+excluded", Shape { ties: true, excluded: 0.4, ..Shape::new(2, 3001, 4) }, 8),
    ];
    for (i, (what, shape, c)) in cases.into_iter().enumerate() {
        let (b64, b32) = batch(shape, 300 + i as u64);
        let job = gpu.prepare_equilibrium(&b32, &EqOptions { cluster: Some(c), ..eq_opts() }).expect("prepare");
        assert_eq!(Gpu::equilibrium_launch(&job), (true, c), "{what}: launch shape");
        gpu.run_equilibrium(&job).unwrap_or_else(|e| panic!("{what}: {e}"));
        let sol = gpu.fetch_equilibrium(&job).expect("fetch");
        check_against_reference(&b64, &sol, &format!("cluster {what}"));
        let one = gpu.equilibrium(&b32, &EqOptions { cluster: Some(1), ..eq_opts() }).expect("one block");
        let d = policy_gap(&one.policy, &sol.policy);
        assert!(d <= 2e-5, "{what}: split and one-block policies differ by {d:e}");
        assert_eq!(one.iterations, sol.iterations, "{what}: the split changed the Newton path");
    }
    // bf16 values, split.
    let b32r = rounded_to_bf16(&batch(Shape::new(2, 1003, 4), 320).1);
    let opts = EqOptions { values: ValueType::Bf16, cluster: Some(4), ..eq_opts() };
    let sol = gpu.equilibrium(&b32r, &opts).expect("bf16 split");
    check_against_reference(&b32r.convert::<f64>().unwrap(), &sol, "bf16 values, split");
    // A row of 40000 candidates with f32 values does not fit one block (320 KB): the host splits it itself.
    let (b64, b32) = batch(Shape::new(1, 40_000, 1), 321);
    let job = gpu.prepare_equilibrium(&b32, &eq_opts()).expect("prepare");
    let (stage, cluster) = Gpu::equilibrium_launch(&job);
    assert!(stage && cluster > 1, "a row too large for one block was not split (cluster {cluster})");
    gpu.run_equilibrium(&job).expect("auto split");
    check_against_reference(&b64, &gpu.fetch_equilibrium(&job).unwrap(), "auto split");
    true
}

/// Logits with ties and -inf entries, in the three input types, rounded so that every type holds them exactly.
pub fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * vocab)
        .map(|_| {
            let u = rng.random::<f64>();
            if u < 0.02 {
                f32::NEG_INFINITY
            } else if u < 0.3 {
                // A few repeated levels: ties across many ids.
                ((rng.random::<f64>() * 8.0).floor() - 4.0) as f32
            } else {
                // 8 significant bits: exact in bf16 and f16.
                half::bf16::from_f64(rng.random_range(-12.0..9.0)).to_f32()
            }
        })
        .collect()
}

/// Top-k and full log-softmax against src/candidates.rs for f32, bf16 and f16 logits.
pub fn candidates_match_cpu(gpu: &mut Gpu, vocab: usize) {
    let rows = 3;
    let x = logits(rows, vocab, 5);
    let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let xh: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    for input in [Logits::F32(&x), Logits::Bf16(&xb), Logits::F16(&xh)] {
        for k in [Some(1), Some(50), Some(vocab.min(1024)), None] {
            let got = gpu.candidates(input, rows, vocab, k).expect("candidates");
            for r in 0..rows {
                let row = &x[r * vocab..(r + 1) * vocab];
                let sel = match k {
                    Some(k) => Selection::TopK(k),
                    None => Selection::All,
                };
                let want = select(row, sel).expect("cpu selection");
                let kk = want.ids.len();
                assert_eq!(got.k, kk);
                assert_eq!(&got.ids[r * kk..(r + 1) * kk], &want.ids[..], "{input:?} k={k:?} row {r}: ids");
                for (c, (&g, &w)) in got.logp[r * kk..(r + 1) * kk].iter().zip(&want.base_logprobs).enumerate() {
                    let ok = (g == w) || (g - w).abs() <= 2e-5 * (1.0 + w.abs());
                    assert!(ok, "k={k:?} row {r} candidate {c}: log pi0 {g} vs {w}");
                }
            }
        }
    }
}

/// Top-k with fewer finite logits than k: the -inf tokens fill the rest in id order, with log pi0 = -inf, as
/// on the CPU.
pub fn candidates_mostly_excluded(gpu: &mut Gpu) {
    let vocab = 100;
    let x: Vec<f32> = (0..vocab).map(|i| if i % 10 == 3 { (i as f32) * 0.1 } else { f32::NEG_INFINITY }).collect();
    for k in [5, 50, 100] {
        let got = gpu.candidates(Logits::F32(&x), 1, vocab, Some(k)).unwrap();
        let want = select(&x, Selection::TopK(k)).unwrap();
        assert_eq!(got.ids, want.ids, "k = {k}");
        for (&g, &w) in got.logp.iter().zip(&want.base_logprobs) {
            assert!(g == w || (g - w).abs() <= 2e-5 * (1.0 + w.abs()), "k = {k}: log pi0 {g} vs {w}");
        }
        assert_eq!(got.logp.iter().filter(|x| x.is_infinite()).count(), k.saturating_sub(10), "k = {k}");
    }
}

/// Rows where more than 2048 logits fall in the bin of the k-th largest (the kernel's on-chip buffer): one
/// with 3000 exact ties at the top (the lowest ids win), one with 2500 distinct values in [8, 9) (one 12-bit
/// key bin); both take the radix fallback of the top-k kernel, which must agree with the CPU as well.
pub fn candidates_massive_ties(gpu: &mut Gpu) {
    let vocab = 5003;
    let mut rng = StdRng::seed_from_u64(11);
    let mut x = Vec::with_capacity(2 * vocab);
    for i in 0..vocab {
        x.push(if i % 5 < 3 { 2.0 } else { rng.random_range(-5.0..1.0) as f32 });
    }
    for i in 0..vocab {
        x.push(if i % 2 == 0 { 8.0 + (i as f32) * 1e-4 } else { rng.random_range(-5.0..7.0) as f32 });
    }
    for k in [1, 50, 1024] {
        let got = gpu.candidates(Logits::F32(&x), 2, vocab, Some(k)).expect("candidates");
        for r in 0..2 {
            let want = select(&x[r * vocab..(r + 1) * vocab], Selection::TopK(k)).unwrap();
            assert_eq!(&got.ids[r * k..(r + 1) * k], &want.ids[..], "k = {k}, row {r}: ids");
            for (&g, &w) in got.logp[r * k..(r + 1) * k].iter().zip(&want.base_logprobs) {
                assert!((g - w).abs() <= 2e-5 * (1.0 + w.abs()), "k = {k}, row {r}: log pi0 {g} vs {w}");
            }
        }
    }
}

/// Rows long enough for the launcher to split each over several blocks (partial log-sum-exps and top k per
/// slice, then a merge): top-k for k = 1, 50, 1024 and the full log-softmax against src/candidates.rs, f32 and
/// bf16, with ties and -inf entries across slice boundaries; then a row whose only finite logits sit in one
/// slice (fewer than k: the -inf tokens of every slice fill the rest in id order).
pub fn candidates_split_rows(gpu: &mut Gpu) {
    let vocab = 2 * cage::gpu::MIN_SLICE + 1001;
    for rows in [1, 2] {
        let x = logits(rows, vocab, 40 + rows as u64);
        let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        for input in [Logits::F32(&x), Logits::Bf16(&xb)] {
            for k in [Some(1), Some(50), Some(1024), None] {
                let job = gpu.prepare_candidates(input, rows, vocab, k).expect("prepare");
                assert!(job.blocks_per_row() > 1, "B = {rows}, V = {vocab}, k = {k:?}: rows were not split");
                gpu.run_candidates(&job).expect("run");
                let got = gpu.fetch_candidates(&job).expect("fetch");
                for r in 0..rows {
                    let sel = k.map_or(Selection::All, Selection::TopK);
                    let want = select(&x[r * vocab..(r + 1) * vocab], sel).expect("cpu selection");
                    let kk = want.ids.len();
                    assert_eq!(&got.ids[r * kk..(r + 1) * kk], &want.ids[..], "{input:?} k={k:?} row {r}: ids");
                    for (c, (&g, &w)) in got.logp[r * kk..(r + 1) * kk].iter().zip(&want.base_logprobs).enumerate() {
                        let ok = (g == w) || (g - w).abs() <= 2e-5 * (1.0 + w.abs());
                        assert!(ok, "split k={k:?} row {r} candidate {c}: log pi0 {g} vs {w}");
                    }
                }
            }
        }
    }
    let mut x = vec![f32::NEG_INFINITY; vocab];
    for i in 0..30 {
        x[vocab - 100 + 3 * i] = (i % 7) as f32 * 0.5;
    }
    let job = gpu.prepare_candidates(Logits::F32(&x), 1, vocab, Some(50)).unwrap();
    assert!(job.blocks_per_row() > 1);
    gpu.run_candidates(&job).unwrap();
    let got = gpu.fetch_candidates(&job).unwrap();
    let want = select(&x, Selection::TopK(50)).unwrap();
    assert_eq!(got.ids, want.ids, "mostly excluded split row");
    for (&g, &w) in got.logp.iter().zip(&want.base_logprobs) {
        assert!(g == w || (g - w).abs() <= 2e-5 * (1.0 + w.abs()), "mostly excluded split row: {g} vs {w}");
    }
}

/// The principal values when the launcher splits the log-sum-exp of each logit row over several blocks, with a
/// reference shared by the principals, against the f64 computation of [`values_against_cpu`].
pub fn principal_values_split_rows(gpu: &mut Gpu) {
    let (rows, j, vocab) = (1, 2, 2 * cage::gpu::MIN_SLICE + 77);
    assert!(cage::gpu::row_split(rows * j + rows, vocab, None).is_some(), "this shape no longer splits rows");
    let finite =
        |x: Vec<f32>| x.into_iter().map(|v| if v == f32::NEG_INFINITY { -30.0 } else { v }).collect::<Vec<_>>();
    let arm = finite(logits(rows * j, vocab, 51));
    let reference = finite(logits(rows, vocab, 52));
    let cands = gpu.candidates(Logits::F32(&logits(rows, vocab, 53)), rows, vocab, Some(50)).unwrap();
    let mut base = cands.logp.clone();
    base[3] = f32::NEG_INFINITY;
    let weights = [0.7f32, 1.3];
    values_against_cpu(gpu, (&arm, &reference), (rows, j, vocab), &cands, &base, &weights, Normalize::ShiftMin);
}

/// Staged rows whose lengths leave 1, 2 and 3 elements in the last group of 4 of the staged loop (padding with
/// log pi0 = -inf and value 0), f32 and bf16 values, -inf entries, J = 1..8 (the register-heaviest loop),
/// against the f64 reference and the global-memory loop of the same kernel.
pub fn equilibrium_staged_vector_tails(gpu: &mut Gpu) {
    for (i, (n, j)) in [(5, 1), (6, 3), (7, 4), (129, 8), (258, 2)].into_iter().enumerate() {
        let shape = Shape { excluded: 0.2, ..Shape::new(2, n, j) };
        let (b64, b32) = batch(shape, 500 + i as u64);
        let job = gpu.prepare_equilibrium(&b32, &EqOptions { stage: Some(true), ..eq_opts() }).unwrap();
        assert_eq!(Gpu::equilibrium_launch(&job), (true, 1), "N = {n}, J = {j}: not staged in one block");
        gpu.run_equilibrium(&job).unwrap();
        let staged = gpu.fetch_equilibrium(&job).unwrap();
        check_against_reference(&b64, &staged, &format!("staged N = {n} J = {j}"));
        let global = gpu.equilibrium(&b32, &EqOptions { stage: Some(false), ..eq_opts() }).unwrap();
        let d = policy_gap(&staged.policy, &global.policy);
        assert!(d <= 2e-5, "N = {n} J = {j}: staged and global-memory policies differ by {d:e}");
        let b32r = rounded_to_bf16(&b32);
        let opts = EqOptions { values: ValueType::Bf16, stage: Some(true), ..eq_opts() };
        let sol = gpu.equilibrium(&b32r, &opts).unwrap();
        check_against_reference(&b32r.convert::<f64>().unwrap(), &sol, &format!("staged bf16 N = {n} J = {j}"));
    }
}

/// The decoding step on device-resident logits gives the tokens of the host chain (candidates, values,
/// equilibrium, choice; each of those is checked against the CPU above), greedy and sampled, for J = 0, 1, 3;
/// NaN logits and bad parameters are errors.
pub fn device_step_matches_host_chain(gpu: &mut Gpu) {
    let (rows, vocab, k) = (3, 3001, 50);
    let mut rng = StdRng::seed_from_u64(21);
    let mut gen_logits = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-8.0..8.0) as f32).collect() };
    let base = gen_logits(rows * vocab);
    let reference = gen_logits(rows * vocab);
    let arm_all = gen_logits(rows * 3 * vocab);
    let tau = vec![0.3f32, 0.7, 1.5];
    let upload = |gpu: &mut Gpu, x: &[f32]| {
        let mut b = gpu.alloc(x.len() * 4).unwrap();
        b.upload(gpu.device(), x).unwrap();
        b
    };
    let (base_buf, ref_buf) = (upload(gpu, &base), upload(gpu, &reference));
    let (dbase, dref) = (base_buf.ptr(), ref_buf.ptr());
    for j in [0usize, 1, 3] {
        // The first j principals of each row.
        let arm: Vec<f32> = (0..rows).flat_map(|r| arm_all[r * 3 * vocab..(r * 3 + j) * vocab].to_vec()).collect();
        let arm_buf = upload(gpu, if j == 0 { &base } else { &arm });
        let darm = arm_buf.ptr();
        let weights: Vec<f32> = (0..rows * j).map(|i| 0.5 + 0.25 * (i % 3) as f32).collect();
        for (choice, seed) in [(Choice::Greedy, 0), (Choice::Gumbel, 9), (Choice::Race, 9)] {
            let step = DeviceStep {
                rows,
                vocab,
                principals: j,
                k,
                logits: dbase,
                arm: darm,
                reference: dref,
                weights: &weights,
                tau: &tau,
                choice,
                seed,
                step: 4,
            };
            // SAFETY: the buffers above hold the documented sizes on this Gpu.
            let got = unsafe { gpu.decode_step_device(&step) }.expect("device step");
            // The host chain.
            let cands = gpu.candidates(Logits::F32(&base), rows, vocab, Some(k)).unwrap();
            let values = gpu
                .principal_values(
                    Logits::F32(&arm),
                    Logits::F32(&reference),
                    rows,
                    j,
                    vocab,
                    &cands,
                    &cands.logp,
                    &weights,
                    Normalize::ShiftMin,
                )
                .unwrap();
            let batch = Batch::new(BatchInput {
                rows,
                candidates: k,
                principals: j,
                base_logprobs: cands.logp.clone(),
                values,
                weights: vec![1.0; rows * j],
                tau: tau.clone(),
                normalize: Normalize::None,
                names: vec![],
            })
            .unwrap();
            let sol = gpu.equilibrium(&batch, &EqOptions { incentives: false, ..EqOptions::default() }).unwrap();
            let want = gpu.choose(&sol.policy, rows, k, Some(&cands.ids), choice, seed, 4).unwrap();
            assert_eq!(got.tokens, want, "J = {j} {choice:?}: device step and host chain chose differently");
            assert_eq!(got.iterations, sol.iterations, "J = {j}: equilibrium passes");
            assert!(got.converged.iter().all(|&c| c), "J = {j}: not converged");
            if choice == Choice::Greedy {
                // Greedy picks the most likely candidate of the equilibrium policy.
                for r in 0..rows {
                    let row = &sol.policy[r * k..(r + 1) * k];
                    let best = (0..k).fold(0, |b, c| if row[c] > row[b] { c } else { b });
                    assert_eq!(got.tokens[r], cands.ids[r * k + best], "J = {j} row {r}: greedy token");
                }
            }
        }
    }
    // NaN logits in row 1: an error naming the row, not a token.
    let mut bad_logits = base.clone();
    bad_logits[vocab + 17] = f32::NAN;
    let bad_buf = upload(gpu, &bad_logits);
    let dbad = bad_buf.ptr();
    let ok = DeviceStep {
        rows,
        vocab,
        principals: 0,
        k,
        logits: dbase,
        arm: 0,
        reference: 0,
        weights: &[],
        tau: &tau,
        choice: Choice::Greedy,
        seed: 0,
        step: 0,
    };
    // SAFETY: as above.
    let e = unsafe { gpu.decode_step_device(&DeviceStep { logits: dbad, ..ok }) }.unwrap_err().to_string();
    assert!(e.contains("row 1"), "{e}");
    for bad in [
        DeviceStep { k: 0, ..ok },
        DeviceStep { k: 2000, ..ok },
        DeviceStep { tau: &[0.3, 0.0, 1.0], ..ok },
        DeviceStep { principals: 1, weights: &[1.0, 1.0, 1.0], ..ok },
        DeviceStep { principals: 1, weights: &[1.0], arm: dbase, reference: dref, ..ok },
        DeviceStep { logits: 0, ..ok },
    ] {
        // SAFETY: every case is refused before a kernel runs.
        assert!(unsafe { gpu.decode_step_device(&bad) }.is_err(), "{bad:?} was accepted");
    }
}

/// Bad candidate requests are errors.
pub fn candidates_reject_bad_requests(gpu: &mut Gpu) {
    let x = logits(2, 100, 1);
    assert!(gpu.candidates(Logits::F32(&x), 2, 100, Some(0)).is_err());
    assert!(gpu.candidates(Logits::F32(&x), 2, 100, Some(101)).is_err());
    assert!(gpu.candidates(Logits::F32(&x), 3, 100, Some(5)).is_err());
    let mut y = x.clone();
    y[17] = f32::NAN;
    assert!(gpu.candidates(Logits::F32(&y), 2, 100, Some(5)).is_err());
    let z = vec![f32::NEG_INFINITY; 100];
    assert!(gpu.candidates(Logits::F32(&z), 1, 100, None).is_err());
}

/// Score of candidate `a` as the kernel computes it (same f32 formulas).
fn score(mode: Choice, p: f32, seed: u64, row: u32, step: u32, a: u32) -> f32 {
    let u = cage::rng::uniform(seed, row, step, a);
    match mode {
        Choice::Greedy => p,
        Choice::Gumbel => p.ln() - (-u.ln()).ln(),
        Choice::Race => u.ln() / p,
    }
}

/// Greedy and sampled choices: the chosen token has the best score under the mirrored RNG, sampling follows pi
/// in frequency, and the same (seed, row, step) gives the same token.
pub fn choose_is_reproducible_and_follows_pi(gpu: &mut Gpu) {
    let (rows, n) = (4, 37);
    let mut rng = StdRng::seed_from_u64(9);
    let mut pi: Vec<f32> = (0..rows * n).map(|i| if i % 7 == 3 { 0.0 } else { rng.random::<f64>() as f32 }).collect();
    pi[5] = pi[6]; // a tie for greedy
    for r in 0..rows {
        let s: f32 = pi[r * n..(r + 1) * n].iter().sum();
        pi[r * n..(r + 1) * n].iter_mut().for_each(|x| *x /= s);
    }
    let ids: Vec<u32> = (0..rows * n).map(|i| 1000 + i as u32).collect();
    for mode in [Choice::Greedy, Choice::Gumbel, Choice::Race] {
        for step in 0..5u32 {
            let got = gpu.choose(&pi, rows, n, Some(&ids), mode, 1234, step).expect("choose");
            let again = gpu.choose(&pi, rows, n, Some(&ids), mode, 1234, step).expect("choose");
            assert_eq!(got, again, "{mode:?}: not reproducible");
            for r in 0..rows {
                let a = (got[r] - ids[r * n]) as usize;
                let p = &pi[r * n..(r + 1) * n];
                assert!(p[a] > 0.0, "{mode:?}: chose a token of probability 0");
                let best = (0..n)
                    .filter(|&i| p[i] > 0.0)
                    .map(|i| score(mode, p[i], 1234, r as u32, step, i as u32))
                    .fold(f32::NEG_INFINITY, f32::max);
                let mine = score(mode, p[a], 1234, r as u32, step, a as u32);
                // Equal in emulation; within rounding of the device's logf on a GPU.
                assert!(mine >= best - 1e-5 * best.abs().max(1.0), "{mode:?} row {r}: score {mine} < best {best}");
            }
        }
    }
    // Frequencies over many steps match pi (deterministic seeds: no flakiness).
    let p = [0.5f32, 0.3, 0.15, 0.05, 0.0];
    let steps = 1500u32;
    let mut counts = [0u32; 5];
    let (mut agree, mut total) = (0, 0);
    for step in 0..steps {
        let g = gpu.choose(&p, 1, 5, None, Choice::Gumbel, 77, step).unwrap()[0];
        let e = gpu.choose(&p, 1, 5, None, Choice::Race, 77, step).unwrap()[0];
        counts[g as usize] += 1;
        agree += u32::from(g == e);
        total += 1;
    }
    assert_eq!(agree, total, "Gumbel-max and exponential race chose differently from the same draws");
    assert_eq!(counts[4], 0);
    for (i, &pi) in p.iter().enumerate().take(4) {
        let f = counts[i] as f64 / steps as f64;
        let sd = (pi as f64 * (1.0 - pi as f64) / steps as f64).sqrt();
        assert!((f - pi as f64).abs() <= 4.0 * sd + 1e-9, "token {i}: frequency {f} vs probability {pi}");
    }
    // Bad input.
    assert!(gpu.choose(&[0.0, 0.0], 1, 2, None, Choice::Greedy, 0, 0).is_err());
    assert!(gpu.choose(&[f32::NAN, 1.0], 1, 2, None, Choice::Greedy, 0, 0).is_err());
    assert!(gpu.choose(&[0.5, 0.5], 1, 3, None, Choice::Greedy, 0, 0).is_err());
}

/// The principal values of the kernel (`arm`: B x J x V logits, `reference`: B x V) against q = log pi_ARM -
/// log pi_ref at the candidates computed here in f64, `shift_min` (the minimum over live candidates) or not,
/// times the weights; 0 at excluded candidates.
#[allow(clippy::too_many_arguments)]
fn values_against_cpu(
    gpu: &mut Gpu,
    (arm, reference): (&[f32], &[f32]),
    (rows, j, vocab): (usize, usize, usize),
    cands: &cage::gpu::Candidates,
    base: &[f32],
    weights: &[f32],
    normalize: Normalize,
) {
    let k = cands.k;
    let lse = |x: &[f32]| {
        let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
    };
    let got = gpu
        .principal_values(Logits::F32(arm), Logits::F32(reference), rows, j, vocab, cands, base, weights, normalize)
        .unwrap_or_else(|e| panic!("{normalize:?}: {e}"));
    for r in 0..rows {
        for p in 0..j {
            let a = &arm[(r * j + p) * vocab..(r * j + p + 1) * vocab];
            let rf = &reference[r * vocab..(r + 1) * vocab];
            let (la, lr) = (lse(a), lse(rf));
            let q: Vec<f64> = (0..k)
                .map(|c| {
                    let id = cands.ids[r * k + c] as usize;
                    (a[id] as f64 - la) - (rf[id] as f64 - lr)
                })
                .collect();
            let active = |c: usize| base[r * k + c] != f32::NEG_INFINITY;
            let shift = if normalize == Normalize::ShiftMin {
                (0..k).filter(|&c| active(c)).map(|c| q[c]).fold(f64::INFINITY, f64::min)
            } else {
                0.0
            };
            for c in 0..k {
                let want = if active(c) { (q[c] - shift) * weights[r * j + p] as f64 } else { 0.0 };
                let g = got[(r * j + p) * k + c] as f64;
                assert!(
                    (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{normalize:?}: row {r} principal {p} candidate {c}: {g} vs {want}"
                );
            }
        }
    }
}

/// ARM values at the candidates with `shift_min` and `none` and the weights, against a CPU computation; `none`
/// with some q < 0 at a live candidate is an error naming it.
pub fn principal_values_match_cpu(gpu: &mut Gpu) {
    let (rows, j, vocab) = (2, 3, 700);
    let arm = logits(rows * j, vocab, 11)
        .into_iter()
        .map(|x| if x == f32::NEG_INFINITY { -30.0 } else { x })
        .collect::<Vec<_>>();
    let reference =
        logits(rows, vocab, 12).into_iter().map(|x| if x == f32::NEG_INFINITY { -30.0 } else { x }).collect::<Vec<_>>();
    let base_logits = logits(rows, vocab, 13);
    let cands = gpu.candidates(Logits::F32(&base_logits), rows, vocab, Some(50)).unwrap();
    let mut base = cands.logp.clone();
    base[7] = f32::NEG_INFINITY; // an excluded candidate gets value 0
    let weights = [0.5f32, 1.0, 2.0, 0.0, 1.5, 0.25];
    let shape = (rows, j, vocab);
    values_against_cpu(gpu, (&arm, &reference), shape, &cands, &base, &weights, Normalize::ShiftMin);
    // Random logits give q < 0 somewhere: `none` refuses them, as the CPU batch does.
    let e = gpu
        .principal_values(
            Logits::F32(&arm),
            Logits::F32(&reference),
            rows,
            j,
            vocab,
            &cands,
            &base,
            &weights,
            Normalize::None,
        )
        .expect_err("`none` with negative values was accepted");
    assert!(matches!(e, cage::CageError::NegativeValue { .. }) && e.to_string().contains("needs values >= 0"), "{e}");
    // q >= 0 at every candidate: the reference puts almost no mass there (logit -20) and each ARM raises the
    // candidates by 2 to 4 nats over it, so log pi_ARM - log pi_ref is 2 to 4 less a negligible normaliser gap.
    let mut ref_pos = reference.clone();
    let mut arm_pos = arm.clone();
    for r in 0..rows {
        for &id in &cands.ids[r * 50..(r + 1) * 50] {
            ref_pos[r * vocab + id as usize] = -20.0;
        }
        for p in 0..j {
            let row = (r * j + p) * vocab;
            arm_pos[row..row + vocab].copy_from_slice(&ref_pos[r * vocab..(r + 1) * vocab]);
            for (c, &id) in cands.ids[r * 50..(r + 1) * 50].iter().enumerate() {
                arm_pos[row + id as usize] += 2.0 + ((c * 7 + p * 3) % 5) as f32 * 0.5;
            }
        }
    }
    values_against_cpu(gpu, (&arm_pos, &ref_pos), shape, &cands, &base, &weights, Normalize::None);
    // A reference shared by all principals (B x V) and one per principal (B x J x V) give the same values.
    let per: Vec<f32> =
        (0..rows).flat_map(|r| (0..j).flat_map(move |_| r * vocab..(r + 1) * vocab)).map(|i| reference[i]).collect();
    let a = gpu
        .principal_values(
            Logits::F32(&arm),
            Logits::F32(&reference),
            rows,
            j,
            vocab,
            &cands,
            &base,
            &weights,
            Normalize::ShiftMin,
        )
        .unwrap();
    let b = gpu
        .principal_values(
            Logits::F32(&arm),
            Logits::F32(&per),
            rows,
            j,
            vocab,
            &cands,
            &base,
            &weights,
            Normalize::ShiftMin,
        )
        .unwrap();
    assert_eq!(a, b);
    assert!(
        gpu.principal_values(
            Logits::F32(&arm),
            Logits::F32(&reference),
            rows,
            j,
            vocab,
            &cands,
            &base,
            &[-1.0; 6],
            Normalize::ShiftMin
        )
        .is_err()
    );
}

/// Max |a - b| over two policies.
fn policy_gap(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The Jacobi kernel run to convergence reaches the exact equilibrium, and in the paper's truncation it follows
/// the CPU's truncated iteration (same optimiser, same stopping rules; f32 here, f64 on the CPU) and stays away
/// from the equilibrium as the paper's solver does.
pub fn jacobi_matches_cpu(gpu: &mut Gpu, converged_cases: usize, tol: f64) {
    use cage::solver::jacobi::{self, JacobiOptions};
    let cases = [
        ("B=1 N=50 J=1", Shape::new(1, 50, 1)),
        ("B=1 N=37 J=3 excluded", Shape { excluded: 0.2, ..Shape::new(1, 37, 3) }),
        ("B=2 N=50 J=2", Shape::new(2, 50, 2)),
    ];
    for (i, (what, shape)) in cases.into_iter().enumerate() {
        let (b64, b32) = batch(shape, [302, 300, 301][i]);
        let reference = reference::solve(&b64, 1e-12, 1_000_000);
        let cpu_paper = jacobi::solve(&b32, &JacobiOptions::truncated());
        let paper = gpu.jacobi(&b32, &JacobiOptions::truncated()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let conv = (i < converged_cases)
            .then(|| gpu.jacobi(&b32, &JacobiOptions::converged(tol)).unwrap_or_else(|e| panic!("{what}: {e}")));
        for r in 0..b32.rows() {
            let refp: Vec<f32> = reference.policy_row(r).iter().map(|&x| x as f32).collect();
            assert_eq!(paper.iterations[r], cpu_paper.iterations[r], "{what} row {r}: paper rounds");
            let d = policy_gap(cpu_paper.policy_row(r), paper.policy_row(r));
            assert!(d <= 2e-5, "{what} row {r}: paper mode differs from the CPU's by {d:e}");
            let dp = policy_gap(cpu_paper.aggregate_row(r), paper.aggregate_row(r));
            assert!(dp <= 1e-4 * 4.0, "{what} row {r}: paper incentives differ from the CPU's by {dp:e}");
            // The truncation is visible: the paper's policy is not the equilibrium.
            assert!(policy_gap(&refp, paper.policy_row(r)) > 1e-3, "{what} row {r}: paper mode is the equilibrium?");
            if let Some(conv) = &conv {
                assert!(conv.converged[r], "{what} row {r}: Jacobi did not converge in {} rounds", conv.iterations[r]);
                // The stopping rule bounds the last step, not the distance: steps of tol leave up to ~25 tol in
                // pi (seen under emulation at tol 1e-5 on these three cases: 23, 3.5, 0.6 tol), and in money
                // up to ~0.8 tol x scale in the payoffs and ~5 in the aggregate incentive.
                let d = policy_gap(&refp, conv.policy_row(r));
                assert!(d as f64 <= 50.0 * tol, "{what} row {r}: converged Jacobi is {d:e} from the equilibrium");
                let scale = reference::value_scale(&b64.row(r));
                let dpay = max_diff(reference.payoff_row(r), conv.payoff_row(r));
                assert!(dpay <= 4.0 * tol * scale, "{what} row {r}: converged Jacobi's payoffs differ by {dpay:e}");
                let dagg = max_diff(reference.aggregate_row(r), conv.aggregate_row(r));
                assert!(dagg <= 20.0 * tol * scale, "{what} row {r}: aggregate incentive differs by {dagg:e}");
            }
        }
    }
}

/// A captured equilibrium replays with new inputs uploaded into the same buffers (the decoding-loop use), on a
/// GPU and on the emulation (which records the capture as CUDA does). The outputs are poisoned before the replay: the buffers are
/// reused, so a direct solve of the second game leaves its answer there, and a replay that did not run (or
/// read the captured inputs) would still pass. They get the first game's answer instead, which differs.
pub fn graph_replays_equilibrium(gpu: &mut Gpu) {
    let (_, first) = batch(Shape::new(2, 50, 3), 500);
    let (_, second) = batch(Shape::new(2, 50, 3), 501);
    let job = gpu.prepare_equilibrium(&first, &eq_opts()).unwrap();
    let graph = gpu.capture_equilibrium(&job).unwrap_or_else(|e| panic!("capture failed on {}: {e}", gpu.describe()));
    let direct = gpu.equilibrium(&second, &eq_opts()).unwrap();
    // Poison: the first game solved again in the same buffers.
    let again = gpu.prepare_equilibrium(&first, &eq_opts()).unwrap();
    gpu.run_equilibrium(&again).unwrap();
    let poison = gpu.fetch_equilibrium(&again).unwrap();
    assert!(policy_gap(&poison.policy, &direct.policy) > 1e-3, "the two games have the same policy");
    let job2 = gpu.prepare_equilibrium(&second, &eq_opts()).unwrap();
    gpu.run_graph(graph).unwrap();
    let replayed = gpu.fetch_equilibrium(&job2).unwrap();
    assert_eq!(direct.policy, replayed.policy, "graph replay differs from a direct launch");
    assert_eq!(direct.payoffs, replayed.payoffs, "graph replay's payoffs differ from a direct launch");
}

/// A prepared job whose device buffers a later, larger prepare reallocated would run on freed memory: running
/// or fetching it is an error naming the fix, while a job of the same or a smaller shape (same buffers) and the
/// new job still run and match the CPU.
pub fn stale_jobs_are_refused(gpu: &mut Gpu) {
    let (_, small) = batch(Shape::new(2, 50, 2), 600);
    let (_, same) = batch(Shape::new(2, 50, 2), 601);
    let (_, large) = batch(Shape::new(4, 300, 3), 602);
    let old = gpu.prepare_equilibrium(&small, &eq_opts()).unwrap();
    // The same shape reuses the buffers: the old job stays valid (it now sees the new inputs).
    let reused = gpu.prepare_equilibrium(&same, &eq_opts()).unwrap();
    gpu.run_equilibrium(&old).unwrap();
    gpu.fetch_equilibrium(&reused).unwrap();
    let new = gpu.prepare_equilibrium(&large, &eq_opts()).unwrap();
    for e in [gpu.run_equilibrium(&old).unwrap_err(), gpu.fetch_equilibrium(&old).unwrap_err()] {
        assert!(e.to_string().contains("prepare it again"), "{e}");
    }
    gpu.run_equilibrium(&new).unwrap();
    let got = gpu.fetch_equilibrium(&new).unwrap();
    let want = exact::solve(&large, 1e-6, 20_000);
    for r in 0..4 {
        assert!(policy_gap(want.policy_row(r), got.policy_row(r)) < 1e-4, "row {r} of the new job");
    }
    // Candidate selections: the same rule.
    let logits: Vec<f32> = (0..2 * 100).map(|i| ((i * 37) % 101) as f32 * 0.05).collect();
    let cand = gpu.prepare_candidates(Logits::F32(&logits), 2, 100, Some(10)).unwrap();
    let big: Vec<f32> = (0..8 * 3000).map(|i| ((i * 37) % 1009) as f32 * 0.01).collect();
    gpu.prepare_candidates(Logits::F32(&big), 8, 3000, Some(10)).unwrap();
    let e = gpu.run_candidates(&cand).unwrap_err();
    assert!(e.to_string().contains("prepare it again"), "{e}");
}

/// The policies of kernels/policy.cu against the host policy stage's formulas in f64 (`cage::baselines`:
/// `linear`, `genarm`, reverse-KL `mod_policy`, and the softmax of `base`), with excluded candidates, a weight
/// of 0 and own policies holding -inf; MOD without principals is refused.
pub fn policy_matches_host_stage(gpu: &mut Gpu) {
    use cage::baselines::{ModDivergence, genarm, linear, mod_policy};
    let (rows, j, k, tau) = (3, 3, 37, 0.3f32);
    let mut rng = StdRng::seed_from_u64(41);
    let mut logp: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-9.0f32..-0.1)).collect();
    logp[4] = f32::NEG_INFINITY;
    logp[k + 9] = f32::NEG_INFINITY;
    let values: Vec<f32> = (0..rows * j * k).map(|_| rng.random_range(0.0f32..2.0)).collect();
    let mut own: Vec<f32> = (0..rows * j * k).map(|_| rng.random_range(-8.0f32..0.0)).collect();
    own[2 * k + 5] = f32::NEG_INFINITY;
    // Row 1 weighs its second principal 0: it must not count, -inf or not.
    let weights: Vec<f32> = (0..rows * j).map(|i| if i == j + 1 { 0.0 } else { 0.2 + 0.3 * (i % 3) as f32 }).collect();
    let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    for policy in [DevicePolicy::Base, DevicePolicy::Linear, DevicePolicy::Genarm, DevicePolicy::Mod] {
        let got = gpu.policy(policy, rows, j, k, &logp, &values, &own, &weights, tau).unwrap();
        for r in 0..rows {
            let lp = f(&logp[r * k..(r + 1) * k]);
            let w = f(&weights[r * j..(r + 1) * j]);
            let own_r: Vec<Vec<f64>> = (0..j).map(|p| f(&own[(r * j + p) * k..(r * j + p + 1) * k])).collect();
            let own_refs: Vec<&[f64]> = own_r.iter().map(Vec::as_slice).collect();
            let want: Vec<f64> = match policy {
                DevicePolicy::Base => {
                    let mut z = lp.clone();
                    cage::softmax::softmax_in_place(&mut z);
                    z
                }
                DevicePolicy::Linear => {
                    // The values given are already preprocessed: `none` and the weight 1 hand them over as they are.
                    let b = Batch::new(BatchInput {
                        rows: 1,
                        candidates: k,
                        principals: j,
                        base_logprobs: lp.clone(),
                        values: f(&values[r * j * k..(r + 1) * j * k]),
                        weights: vec![1.0; j],
                        tau: vec![tau as f64],
                        normalize: Normalize::None,
                        names: vec![],
                    })
                    .unwrap();
                    linear(&b).policy
                }
                DevicePolicy::Genarm => genarm(&lp, &own_refs, &w).unwrap(),
                DevicePolicy::Mod => mod_policy(&own_refs, &w, ModDivergence::Reverse).unwrap(),
            };
            for c in 0..k {
                let g = got[r * k + c] as f64;
                assert!((g - want[c]).abs() <= 2e-6, "{policy:?} row {r} candidate {c}: {g} vs {}", want[c]);
            }
        }
        if policy != DevicePolicy::Mod {
            assert_eq!((got[4], got[k + 9]), (0.0, 0.0), "{policy:?}: an excluded candidate has probability 0");
        }
    }
    assert!(gpu.policy(DevicePolicy::Mod, 1, 0, k, &logp[..k], &[], &[], &[], tau).is_err());
}

/// The resident step on rows long enough for its log-sum-exps (cage_lse_streams) and its top-k to be split over
/// several blocks: the value at the greedy token against q computed here in f64.
pub fn resident_step_split_rows(gpu: &mut Gpu) {
    use cage::gpu::{PrincipalStreams, ResidentMethod, ResidentReport, ResidentStep};
    let (rows, v, k) = (1, 2 * cage::gpu::MIN_SLICE + 13, 8);
    assert!(cage::gpu::row_split(rows * 2, v, None).is_some(), "this shape no longer splits rows");
    let x: Vec<f32> =
        logits(rows * 2, v, 6).into_iter().map(|x| if x == f32::NEG_INFINITY { -30.0 } else { x }).collect();
    let mut buf = gpu.alloc(x.len() * 4).unwrap();
    buf.upload(gpu.device(), &x).unwrap();
    let table: Vec<u64> = (0..rows * 2).map(|i| buf.ptr() + (i * v * 4) as u64).collect();
    let step = ResidentStep {
        rows,
        streams: 2,
        vocab: v,
        k,
        table: &table,
        principals: &[PrincipalStreams::Ratio { of: 1, against: 0 }],
        lexicon: &[],
        weights: &[1.0],
        tau: 0.5,
        shift_min: false,
        method: ResidentMethod::Policy(DevicePolicy::Base),
        choice: Choice::Greedy,
        keys: &[0],
        seed: 1,
        step: 0,
    };
    let mut out = ResidentReport::default();
    // SAFETY: the table points into `buf`, 2 rows of V f32 logits.
    unsafe { gpu.resident_step(&step, &mut out) }.unwrap();
    let lse = |x: &[f32]| {
        let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
    };
    let (b, a) = (&x[..v], &x[v..]);
    let best = (0..v).fold(0, |i, j| if b[j] > b[i] { j } else { i });
    assert_eq!(out.tokens[0] as usize, best, "greedy base takes the largest logit");
    let q = (a[best] as f64 - lse(a)) - (b[best] as f64 - lse(b));
    assert!((out.values[0] as f64 - q).abs() < 1e-4, "{} vs {q}", out.values[0]);
}

/// The resident step on streams interleaved in one buffer (row r's stream s at row 2r + s, so the base rows
/// are gathered): greedy `base` picks each row's largest base logit, and the report carries each principal's
/// raw value there (a log-ratio of the two streams, a lexicon entry) against a CPU computation; malformed
/// requests are refused by name before any launch.
pub fn resident_step_reports_tokens_and_values(gpu: &mut Gpu) {
    use cage::gpu::{PrincipalStreams, ResidentMethod, ResidentReport, ResidentStep};
    let (rows, v, k) = (3, 300, 8);
    let x: Vec<f32> =
        logits(rows * 2, v, 5).into_iter().map(|x| if x == f32::NEG_INFINITY { -30.0 } else { x }).collect();
    let mut buf = gpu.alloc(x.len() * 4).unwrap();
    buf.upload(gpu.device(), &x).unwrap();
    let table: Vec<u64> = (0..rows * 2).map(|i| buf.ptr() + (i * v * 4) as u64).collect();
    let lexicon: Vec<f32> = (0..v).map(|id| (id % 7) as f32 * 0.5).collect();
    let principals = [PrincipalStreams::Ratio { of: 1, against: 0 }, PrincipalStreams::Lexicon { row: 0 }];
    let (weights, keys) = (vec![0.5f32; rows * 2], (0..rows as u32).collect::<Vec<_>>());
    let step = ResidentStep {
        rows,
        streams: 2,
        vocab: v,
        k,
        table: &table,
        principals: &principals,
        lexicon: &lexicon,
        weights: &weights,
        tau: 0.5,
        shift_min: true,
        method: ResidentMethod::Policy(DevicePolicy::Base),
        choice: Choice::Greedy,
        keys: &keys,
        seed: 1,
        step: 0,
    };
    let mut out = ResidentReport::default();
    // SAFETY: the table points into `buf`, 2 x rows rows of V f32 logits.
    unsafe { gpu.resident_step(&step, &mut out) }.unwrap();
    let lse = |x: &[f32]| {
        let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
    };
    for r in 0..rows {
        let (b, a) = (&x[2 * r * v..(2 * r + 1) * v], &x[(2 * r + 1) * v..(2 * r + 2) * v]);
        let best = (0..v).fold(0, |i, j| if b[j] > b[i] { j } else { i });
        assert_eq!(out.tokens[r] as usize, best, "row {r}: greedy base takes the largest logit");
        let q = (a[best] as f64 - lse(a)) - (b[best] as f64 - lse(b));
        assert!((out.values[2 * r] as f64 - q).abs() < 1e-4, "row {r}: {} vs {q}", out.values[2 * r]);
        assert_eq!(out.values[2 * r + 1], lexicon[best], "row {r}: the lexicon's score at the token");
    }
    let mut refused = |s: ResidentStep, what: &str| {
        let mut out = ResidentReport::default();
        // SAFETY: refused before any launch (and the table still points into `buf`).
        let e = unsafe { gpu.resident_step(&s, &mut out) }.unwrap_err().to_string();
        assert!(e.contains(what), "{what}: {e}");
    };
    let mut holed = table.clone();
    holed[3] = 0;
    refused(ResidentStep { table: &holed, ..step }, "null");
    let stream_2 = [PrincipalStreams::Ratio { of: 2, against: 0 }, principals[1]];
    refused(ResidentStep { principals: &stream_2, ..step }, "outside");
    let lexicon_row_1 = [principals[0], PrincipalStreams::Lexicon { row: 1 }];
    refused(ResidentStep { principals: &lexicon_row_1, ..step }, "outside");
    refused(ResidentStep { weights: &weights[1..], ..step }, "weights");
    refused(ResidentStep { keys: &keys[1..], ..step }, "row keys");
    let mod_alone =
        ResidentStep { principals: &[], weights: &[], method: ResidentMethod::Policy(DevicePolicy::Mod), ..step };
    refused(mod_alone, "MOD");
}

/// Causal attention in f64 of each token (its slot, position and query heads) over the cache as the kernels
/// read it (keys and values rounded to bf16 for a bf16 cache): `[t, q * dim]`.
pub fn attention_reference(
    shape: &AttentionShape,
    k: &[f32],
    v: &[f32],
    q: &[f32],
    slot: &[usize],
    pos: &[usize],
) -> Vec<f64> {
    let Heads { q: nq, kv: nkv, dim } = shape.heads;
    let stored = |x: f32| match shape.kv {
        KvCacheType::F32 => x as f64,
        KvCacheType::Bf16 => half::bf16::from_f32(x).to_f64(),
    };
    let kvd = nkv * dim;
    let mut out = vec![0f64; slot.len() * nq * dim];
    for (i, (&s, &p)) in slot.iter().zip(pos).enumerate() {
        let first = if shape.window > 0 { (p + 1).saturating_sub(shape.window) } else { 0 };
        for h in 0..nq {
            let kvh = h / (nq / nkv);
            let at = |x: &[f32], pp: usize, d: usize| stored(x[(s * shape.max_seq + pp) * kvd + kvh * dim + d]);
            let qv = &q[(i * nq + h) * dim..(i * nq + h + 1) * dim];
            let scores: Vec<f64> = (first..=p)
                .map(|pp| (0..dim).map(|d| qv[d] as f64 * at(k, pp, d)).sum::<f64>() / (dim as f64).sqrt())
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..dim {
                let o: f64 = (first..=p).map(|pp| e[pp - first] * at(v, pp, d)).sum();
                out[(i * nq + h) * dim + d] = o / sum;
            }
        }
    }
    out
}

/// The attention kernels against [`attention_reference`]: one pass and split-K with 2, 3 (uneven runs), 7, 16
/// and more splits than positions (empty splits), the launcher's own choice, GQA (2 query heads per KV head), a
/// head dimension that is no multiple of the warp, a sliding window, both cache types, and contexts of 1 to 300
/// positions in one call. The output is bf16: each element within 2^-8 of its magnitude (one bf16 rounding is
/// 2^-9) plus 1e-5 for f32 summation; a split whose positions were lost or counted twice moves outputs by
/// about 1e-1.
pub fn attention_matches_reference(gpu: &mut Gpu) {
    let mut rng = StdRng::seed_from_u64(31);
    let heads = Heads { q: 4, kv: 2, dim: 40 };
    let (slots, max_seq) = (3, 300);
    let cache = slots * max_seq * heads.kv * heads.dim;
    let k: Vec<f32> = (0..cache).map(|_| rng.random_range(-1.0..1.0)).collect();
    let v: Vec<f32> = (0..cache).map(|_| rng.random_range(-1.0..1.0)).collect();
    // Contexts of 300, 1, 131 and 8 positions.
    let (slot, pos) = ([1, 0, 2, 0], [299, 0, 130, 7]);
    // Scaled queries: scores with a spread of several units, so that the running max matters.
    let q: Vec<f32> = (0..slot.len() * heads.q * heads.dim).map(|_| rng.random_range(-6.0..6.0)).collect();
    for kv in [KvCacheType::F32, KvCacheType::Bf16] {
        for window in [0, 50] {
            let shape = AttentionShape { heads, slots, max_seq, window, kv };
            let want = attention_reference(&shape, &k, &v, &q, &slot, &pos);
            let mut job = gpu.prepare_attention(shape, &k, &v, &q, &slot, &pos).unwrap();
            for splits in [Some(1), Some(2), Some(3), Some(7), Some(16), Some(400), None] {
                let used = gpu.run_attention(&mut job, splits).unwrap();
                let ctx = if window > 0 { window } else { 300 };
                assert_eq!(used, splits.unwrap_or(attention_splits(slot.len(), heads.q, ctx)));
                let got = gpu.attention_output(&job).unwrap();
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert!(
                        (w - *g as f64).abs() <= w.abs() / 256.0 + 1e-5,
                        "{kv} cache, window {window}, {used} splits: element {i}: {g} vs reference {w}"
                    );
                }
            }
        }
    }
    // The launcher's rule: 16 (token, head) pairs at 300 positions split in 3 (128 positions at least each);
    // batch 1 of an 8B shape (32 heads) at 8192 positions reaches 256 blocks with 8; prefill-sized calls and
    // short contexts stay one pass.
    assert_eq!(attention_splits(4, 4, 300), 3);
    assert_eq!(attention_splits(1, 32, 8192), 8);
    assert_eq!(attention_splits(64, 32, 8192), 1);
    assert_eq!(attention_splits(1, 32, 100), 1);
}

/// Malformed attention jobs are errors that name the problem, never a panic or a launch.
pub fn attention_rejects_bad_requests(gpu: &mut Gpu) {
    let shape =
        AttentionShape { heads: Heads { q: 4, kv: 2, dim: 8 }, slots: 1, max_seq: 4, window: 0, kv: KvCacheType::F32 };
    let kv = vec![0.0f32; 4 * 2 * 8];
    let q = vec![0.0f32; 4 * 8];
    let err = |gpu: &mut Gpu, shape: AttentionShape, q: &[f32], slot: &[usize], pos: &[usize]| {
        gpu.prepare_attention(shape, &kv, &kv, q, slot, pos).err().expect("a bad job").to_string()
    };
    let three = AttentionShape { heads: Heads { q: 3, kv: 2, dim: 8 }, ..shape };
    assert!(err(gpu, three, &q[..24], &[0], &[0]).contains("KV heads dividing"));
    let wide = AttentionShape { heads: Heads { q: 4, kv: 2, dim: 512 }, ..shape };
    assert!(err(gpu, wide, &q, &[0], &[0]).contains("head_dim"));
    assert!(err(gpu, shape, &q, &[0], &[4]).contains("outside the cache"));
    assert!(err(gpu, shape, &q, &[1], &[0]).contains("outside the cache"));
    assert!(err(gpu, shape, &q[..8], &[0], &[0]).contains("queries"));
    let mut job = gpu.prepare_attention(shape, &kv, &kv, &q, &[0], &[3]).unwrap();
    assert!(gpu.run_attention(&mut job, Some(0)).unwrap_err().to_string().contains("splits"));
}

/// A random `[out, inp]` weight: mostly in [-0.5, 0.5], with a few outliers per row (which set int8's scale and
/// widen int4's groups) and whole zero rows / groups (a zero scale).
fn quant_weight(out: usize, inp: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w: Vec<f32> = (0..out * inp).map(|_| rng.random_range(-0.5f32..0.5)).collect();
    for o in 0..out {
        w[o * inp + rng.random_range(0..inp)] = rng.random_range(-3f32..3.0);
    }
    w[..inp].fill(0.0);
    w
}

/// The quantized linear kernels (kernels/quant.cu) against an f64 product of the CPU reference's dequantized
/// weights (src/model/devquant.rs): int8 with an input width that takes the 16-byte path and one that does not,
/// int4 with a whole and a partial last group; m = 1..9 (the GEMV: one launch, then two) and m = 40 (more than
/// GEMV_MAX_TOKENS: the weight dequantized to bf16, then the GEMM, whose reference rounds each dequantized value
/// to bf16 likewise). Tolerance: f32 accumulation over `inp` terms, 2e-5 of the sum of the terms' magnitudes
/// (the rounding bound is inp x 2^-24 ~ 1e-5 at inp = 136). The quantizers themselves: every int8 weight within
/// half a step of the original, every int4 weight within a step (the zero point is rounded too).
pub fn quant_matmul_matches_reference(gpu: &mut Gpu) {
    use cage::model::devquant::{Int4Matrix, Int8Matrix, QuantMatrix};
    let mut cases = Vec::new();
    for (out, inp, seed) in [(37, 80, 1), (19, 70, 2)] {
        let w = quant_weight(out, inp, seed);
        let q = Int8Matrix::quantize(&w, out, inp, "test").unwrap();
        let deq = QuantMatrix::Int8(q.clone()).dequantize();
        for o in 0..out {
            for i in 0..inp {
                let err = (deq[o * inp + i] - w[o * inp + i] as f64).abs();
                assert!(err <= 0.5 * q.scale[o] as f64 * (1.0 + 1e-4), "int8 [{o}][{i}]: error {err}");
            }
        }
        cases.push((QuantMatrix::Int8(q), format!("int8 {out} x {inp}")));
    }
    for (out, inp, group, seed) in [(40, 96, 32, 3), (24, 136, 64, 4)] {
        let w = quant_weight(out, inp, seed);
        let q = Int4Matrix::quantize(&w, out, inp, group, "test").unwrap();
        let deq = QuantMatrix::Int4(q.clone()).dequantize();
        for o in 0..out {
            for i in 0..inp {
                let (_, s, _) = q.code(o, i);
                let err = (deq[o * inp + i] - w[o * inp + i] as f64).abs();
                assert!(err <= s as f64 * (1.0 + 1e-6), "int4 [{o}][{i}]: error {err} at scale {s}");
            }
        }
        cases.push((QuantMatrix::Int4(q), format!("int4 {out} x {inp} groups of {group}")));
    }
    let mut rng = StdRng::seed_from_u64(9);
    for (q, what) in &cases {
        check_quant_matmul(gpu, q, &q.dequantize(), &q.dequantize_bf16(), &mut rng, what);
    }
}

/// `gpu.quant_matmul` of `q` at m = 1..=9 (the GEMV, which multiplies the `exact` weights) and at one prefill m
/// (dequantized to bf16, `rounded`, then the GEMM), each against an f64 product, within 2e-5 of the terms'
/// magnitude.
fn check_quant_matmul(
    gpu: &mut Gpu,
    q: &cage::model::devquant::QuantMatrix,
    exact: &[f64],
    rounded: &[f32],
    rng: &mut StdRng,
    what: &str,
) {
    use cage::gpu::quant::GEMV_MAX_TOKENS;
    let (out, inp) = (q.out(), q.inp());
    for m in (1..=9).chain([GEMV_MAX_TOKENS + 8]) {
        let x: Vec<u16> = (0..m * inp).map(|_| half::bf16::from_f32(rng.random_range(-1f32..1.0)).to_bits()).collect();
        let y = gpu.quant_matmul(q, &x, m).unwrap();
        assert_eq!(y.len(), m * out);
        for r in 0..m {
            for o in 0..out {
                let terms = (0..inp).map(|i| {
                    let w = if m > GEMV_MAX_TOKENS { rounded[o * inp + i] as f64 } else { exact[o * inp + i] };
                    w * half::bf16::from_bits(x[r * inp + i]).to_f64()
                });
                let (sum, mag) = terms.fold((0f64, 0f64), |(s, a), t| (s + t, a + t.abs()));
                let got = y[r * out + o] as f64;
                assert!((got - sum).abs() <= 2e-5 * mag + 1e-7, "{what}, m = {m}, [{r}][{o}]: {got} vs {sum}");
            }
        }
    }
}

/// Shapes the int4 packing cannot hold, act-order GPTQ tensors and mismatched activations are errors naming
/// the tensor or the sizes.
pub fn quant_matmul_rejects_bad_requests(gpu: &mut Gpu) {
    use cage::model::devquant::{Int4Matrix, Int8Matrix, QuantMatrix};
    let e = Int4Matrix::quantize(&vec![0.1; 12 * 16], 12, 16, 8, "layer.q").unwrap_err().to_string();
    assert!(e.contains("layer.q") && e.contains("multiples of 8"), "{e}");
    let e = Int8Matrix::quantize(&[0.0, f32::NAN], 1, 2, "layer.k").unwrap_err().to_string();
    assert!(e.contains("layer.k") && e.contains("NaN"), "{e}");
    let (out, inp, group) = (8, 16, 8);
    let mut g_idx: Vec<i32> = (0..inp as i32).map(|i| i / group as i32).collect();
    g_idx.swap(0, 15);
    let e = Int4Matrix::from_gptq(&[0; 16], &[0; 2], &[0; 16], Some(&g_idx), out, inp, group, true, "layer.o")
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer.o.g_idx") && e.contains("act-order"), "{e}");
    let e = Int4Matrix::from_gptq(&[0; 15], &[0; 2], &[0; 16], None, out, inp, group, true, "layer.v")
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer.v.qweight"), "{e}");
    let q = QuantMatrix::Int8(Int8Matrix::quantize(&[0.5; 32], 2, 16, "w").unwrap());
    let e = gpu.quant_matmul(&q, &[0; 31], 2).unwrap_err().to_string();
    assert!(e.contains("31 activations"), "{e}");
    // GGUF blocks: a byte count that is not the shape's, a row that is not whole blocks, a float type.
    use cage::model::devquant::GgufMatrix;
    use cage::model::gguf::GgmlType;
    let e = GgufMatrix::new(GgmlType::Q8_0, vec![0; 67], 2, 32, "blk.0.attn_q").unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q") && e.contains("67 bytes") && e.contains("needs 68"), "{e}");
    let e = GgufMatrix::new(GgmlType::Q4K, vec![0; 144], 1, 128, "blk.1.ffn_down").unwrap_err().to_string();
    assert!(e.contains("blk.1.ffn_down") && e.contains("whole Q4K blocks of 256"), "{e}");
    let e = GgufMatrix::new(GgmlType::F16, vec![0; 64], 1, 32, "blk.2.attn_v").unwrap_err().to_string();
    assert!(e.contains("blk.2.attn_v") && e.contains("F16"), "{e}");
}

/// gguf-py's K-quant goldens (tests/fixtures/golden-kquant.json, `scripts/make_fixtures.py kquant`): per type,
/// the raw blocks and the f32 values gguf-py 0.19.0 dequantizes them to.
fn kquant_golden() -> Vec<(cage::model::gguf::GgmlType, Vec<u8>, Vec<f32>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden-kquant.json");
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let types = g["types"].as_object().unwrap();
    types
        .values()
        .map(|c| {
            let ty = cage::model::gguf::GgmlType::from_id(c["id"].as_u64().unwrap() as u32).unwrap();
            let hex = c["blocks"].as_str().unwrap();
            let raw = (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
            let bits = c["bits"].as_array().unwrap().iter().map(|b| f32::from_bits(b.as_u64().unwrap() as u32));
            (ty, raw, bits.collect())
        })
        .collect()
}

/// A `[rows, inp]` GGUF matrix of golden blocks (row `o`, block `b` is golden block `(3 o + 5 b + seed) mod
/// count`) and gguf-py's values of it.
fn golden_matrix(
    ty: cage::model::gguf::GgmlType,
    raw: &[u8],
    vals: &[f32],
    rows: usize,
    inp: usize,
    seed: usize,
) -> (cage::model::devquant::GgufMatrix, Vec<f32>) {
    let (per, bytes) = ty.block();
    let count = raw.len() / bytes;
    let (mut w, mut v) = (Vec::new(), Vec::new());
    for o in 0..rows {
        for b in 0..inp / per {
            let g = (3 * o + 5 * b + seed) % count;
            w.extend_from_slice(&raw[g * bytes..(g + 1) * bytes]);
            v.extend_from_slice(&vals[g * per..(g + 1) * per]);
        }
    }
    (cage::model::devquant::GgufMatrix::new(ty, w, rows, inp, "golden").unwrap(), v)
}

/// GGUF blocks as stored (`gpu_weights stored`, kernels/quant.cu `cage_gguf_*`) against an f64 product of the
/// reference values: gguf-py's own dequantization of its K-quant goldens (Q4_K, Q5_K, Q6_K), and for Q8_0 /
/// Q4_0 / Q4_1 random blocks dequantized by the CPU's dequantize_into (llama.cpp's layouts, tests/model_gguf.rs).
/// One matrix stacks Q4_K, Q6_K and Q4_K parts (a fused projection of a Q4_K_M file: each part writes its own
/// rows). m = 1..9 runs the GEMV (a second launch from 9), m = 40 the bf16 dequantization and the GEMM against the
/// reference values rounded to bf16. The CPU's dequantization of the goldens is gguf-py's bit for bit. Tolerance:
/// f32 accumulation over up to 512 terms, 2e-5 of the terms' magnitude sum (the rounding bound is 512 x 2^-24 ~
/// 3e-5 worst case, ~1e-6 typical); a wrong nibble, scale or block offset moves a sum by a whole term.
pub fn gguf_matmul_matches_reference(gpu: &mut Gpu) {
    use cage::model::devquant::{GgufMatrix, QuantMatrix};
    use cage::model::gguf::GgmlType;
    let golden = kquant_golden();
    let mut cases: Vec<(QuantMatrix, Vec<f32>, String)> = Vec::new();
    for (k, (ty, raw, vals)) in golden.iter().enumerate() {
        let (m, v) = golden_matrix(*ty, raw, vals, 5, 512, k);
        cases.push((QuantMatrix::Gguf(m), v, format!("{ty:?} 5 x 512")));
    }
    let part = |ty: GgmlType, rows: usize, seed: usize| {
        let (_, raw, vals) = golden.iter().find(|g| g.0 == ty).unwrap();
        golden_matrix(ty, raw, vals, rows, 256, seed)
    };
    let parts = [part(GgmlType::Q4K, 3, 0), part(GgmlType::Q6K, 2, 1), part(GgmlType::Q4K, 4, 2)];
    let want: Vec<f32> = parts.iter().flat_map(|p| p.1.clone()).collect();
    let stacked = GgufMatrix::stack(parts.into_iter().map(|p| p.0).collect(), "qkv").unwrap();
    assert_eq!(stacked.parts.len(), 3, "Q4_K, Q6_K, Q4_K stay three parts");
    cases.push((QuantMatrix::Gguf(stacked), want, "Q4_K + Q6_K + Q4_K stacked, 9 x 256".into()));
    let mut rng = StdRng::seed_from_u64(21);
    for (ty, out, inp) in [(GgmlType::Q8_0, 7, 96), (GgmlType::Q4_0, 6, 64), (GgmlType::Q4_1, 3, 160)] {
        let (per, bytes) = ty.block();
        let mut raw = Vec::new();
        for _ in 0..out * inp / per {
            let mut b: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
            b[..2].copy_from_slice(&half::f16::from_f32(rng.random_range(0.002f32..0.05)).to_le_bytes());
            if ty == GgmlType::Q4_1 {
                b[2..4].copy_from_slice(&half::f16::from_f32(rng.random_range(-0.4f32..0.0)).to_le_bytes());
            }
            raw.extend(b);
        }
        let mut v = vec![0f32; out * inp];
        cage::model::gguf::dequantize_into(ty, &raw, &mut v);
        let m = GgufMatrix::new(ty, raw, out, inp, "random").unwrap();
        cases.push((QuantMatrix::Gguf(m), v, format!("{ty:?} {out} x {inp}")));
    }
    for (q, want, what) in &cases {
        let cpu = q.dequantize();
        assert_eq!(cpu.len(), want.len());
        for (k, (a, b)) in cpu.iter().zip(want).enumerate() {
            assert_eq!((*a as f32).to_bits(), b.to_bits(), "{what}: CPU dequantization of weight {k}");
        }
        let exact: Vec<f64> = want.iter().map(|&w| w as f64).collect();
        let rounded: Vec<f32> = want.iter().map(|&w| half::bf16::from_f32(w).to_f32()).collect();
        check_quant_matmul(gpu, q, &exact, &rounded, &mut rng, what);
    }
}
