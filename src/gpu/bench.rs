//! Kernel measurements shared by `cage bench solver` and the criterion benches (benches/kernels.rs): time per
//! launch with the L2 cache warm or flushed, bytes moved, GB/s and the fraction of the device-to-device copy
//! bandwidth measured in the same run (the roofline a memory-bound kernel is judged against).

use super::device::DevBuf;
use super::{AttentionShape, EqOptions, Gpu, Heads, KvCacheType, Logits, ValueType};
use crate::error::Result;
use crate::problem::{Batch, BatchInput, Normalize};
use crate::sampling::Choice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Cache state a launch is timed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Inputs left in L2 by the previous launch (as logits are after the LM-head GEMM).
    Warm,
    /// L2 flushed before every launch by copying a buffer larger than any L2.
    Flushed,
}

/// One measured shape.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// What was run.
    pub name: String,
    /// Cache state.
    pub cache: Cache,
    /// Median time of one launch in microseconds (device events on a GPU, wall clock under emulation).
    pub micros: f64,
    /// Bytes one launch must move at least (inputs read once, outputs written once).
    pub bytes: usize,
}

impl Measurement {
    /// Effective bandwidth in GB/s.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / (self.micros * 1e-6) / 1e9
    }
}

/// A random batch of `rows` x `n` candidates and `j` principals (values in [0, 2), tau = 0.1).
pub fn random_batch(rows: usize, n: usize, j: usize, seed: u64) -> Result<Batch<f32>> {
    let mut g = StdRng::seed_from_u64(seed);
    Batch::new(BatchInput {
        rows,
        candidates: n,
        principals: j,
        base_logprobs: (0..rows * n).map(|_| g.random_range(-12.0..=0.0)).collect(),
        values: (0..rows * j * n).map(|_| g.random_range(0.0..2.0)).collect(),
        weights: vec![1.0; rows * j],
        tau: vec![0.1],
        normalize: Normalize::None,
        names: vec![],
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Bytes of the buffer copied to flush L2 (H100: 50 MB of L2, H200 the same; 256 MiB is safely larger).
const FLUSH_BYTES: usize = 256 << 20;

/// Two buffers larger than any L2 (1 MiB under the emulation): a copy from one to the other before a launch
/// leaves nothing of the launch's inputs in L2.
pub struct L2Flush {
    from: DevBuf,
    to: DevBuf,
}

impl L2Flush {
    /// Allocates the two buffers on `gpu`.
    pub fn new(gpu: &mut Gpu) -> Result<Self> {
        let bytes = if gpu.is_emulated() { 1 << 20 } else { FLUSH_BYTES };
        Ok(Self { from: gpu.alloc(bytes)?, to: gpu.alloc(bytes)? })
    }

    /// Flushes the L2 cache of `gpu` (the device the buffers were allocated on).
    pub fn run(&self, gpu: &mut Gpu) -> Result<()> {
        gpu.device().copy(self.to.ptr(), self.from.ptr(), self.from.bytes())
    }
}

/// Times `f` `reps` times (after one warm-up) and returns the median in microseconds.
pub fn time_us(gpu: &mut Gpu, cache: Cache, reps: usize, f: &mut dyn FnMut(&mut Gpu) -> Result<()>) -> Result<f64> {
    let flush = if cache == Cache::Flushed { Some(L2Flush::new(gpu)?) } else { None };
    f(gpu)?;
    gpu.device().synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        if let Some(flush) = &flush {
            flush.run(gpu)?;
        }
        gpu.device().timer_start()?;
        f(gpu)?;
        let t = gpu.device().timer_stop()?;
        times.push(t * 1e3);
    }
    Ok(median(times))
}

/// Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second) over `bytes`.
pub fn copy_bandwidth(gpu: &mut Gpu, bytes: usize, reps: usize) -> Result<f64> {
    let (a, b) = (gpu.alloc(bytes)?, gpu.alloc(bytes)?);
    let us = time_us(gpu, Cache::Warm, reps, &mut |g| g.device().copy(b.ptr(), a.ptr(), bytes))?;
    Ok(2.0 * bytes as f64 / (us * 1e-6) / 1e9)
}

/// The batched equilibrium on a random batch of this shape, without writing the per-principal incentives.
pub fn equilibrium(
    gpu: &mut Gpu,
    rows: usize,
    n: usize,
    j: usize,
    values: ValueType,
    cache: Cache,
    reps: usize,
) -> Result<Measurement> {
    equilibrium_with(gpu, rows, n, j, EqOptions { values, incentives: false, ..EqOptions::default() }, cache, reps)
}

/// The batched equilibrium with explicit options; the name says how it was launched (one block per row with
/// the row staged on chip or read from global memory on every pass, or split across a cluster).
pub fn equilibrium_with(
    gpu: &mut Gpu,
    rows: usize,
    n: usize,
    j: usize,
    opts: EqOptions,
    cache: Cache,
    reps: usize,
) -> Result<Measurement> {
    let batch = random_batch(rows, n, j, 1)?;
    let job = gpu.prepare_equilibrium(&batch, &opts)?;
    let micros = time_us(gpu, cache, reps, &mut |g| g.run_equilibrium(&job))?;
    let launch = match Gpu::equilibrium_launch(&job) {
        (_, c) if c > 1 => format!("cluster of {c}"),
        (true, _) => "staged".into(),
        (false, _) => "global".into(),
    };
    let name = format!("equilibrium B={rows} N={n} J={j} values={:?} ({launch})", opts.values);
    Ok(Measurement { name, cache, micros, bytes: job.bytes_moved() })
}

/// The equilibrium replayed from a CUDA graph (warm L2): the launch cost a decoding loop pays per step.
pub fn equilibrium_graph(gpu: &mut Gpu, rows: usize, n: usize, j: usize, reps: usize) -> Result<Measurement> {
    let batch = random_batch(rows, n, j, 1)?;
    let job = gpu.prepare_equilibrium(&batch, &EqOptions { incentives: false, ..EqOptions::default() })?;
    let graph = gpu.capture_equilibrium(&job)?;
    let micros = time_us(gpu, Cache::Warm, reps, &mut |g| g.run_graph(graph))?;
    let name = format!("equilibrium (CUDA graph) B={rows} N={n} J={j} values=F32");
    Ok(Measurement { name, cache: Cache::Warm, micros, bytes: job.bytes_moved() })
}

/// Fused log-softmax + top-k (`k = Some`) or full log-softmax (`None`) from bf16 logits.
pub fn candidates(
    gpu: &mut Gpu,
    rows: usize,
    vocab: usize,
    k: Option<usize>,
    cache: Cache,
    reps: usize,
) -> Result<Measurement> {
    let mut g = StdRng::seed_from_u64(3);
    let x: Vec<half::bf16> = (0..rows * vocab).map(|_| half::bf16::from_f64(g.random_range(-10.0..10.0))).collect();
    let job = gpu.prepare_candidates(Logits::Bf16(&x), rows, vocab, k)?;
    let micros = time_us(gpu, cache, reps, &mut |g| g.run_candidates(&job))?;
    let bytes = job.bytes_moved();
    let split = match job.blocks_per_row() {
        1 => String::new(),
        p => format!(" ({p} blocks per row)"),
    };
    let name = format!("candidates B={rows} V={vocab} k={}{split}", k.map_or("all".into(), |k| k.to_string()));
    Ok(Measurement { name, cache, micros, bytes })
}

/// The principal values from bf16 logits: the log-sum-exps of B x J ARM rows and of B reference rows shared by
/// the principals (each row once, split over several blocks at small batch), then the gather at k candidates.
pub fn values(gpu: &mut Gpu, rows: usize, j: usize, vocab: usize, cache: Cache, reps: usize) -> Result<Measurement> {
    let k = 50;
    let mut g = StdRng::seed_from_u64(5);
    let mut logits =
        |n: usize| -> Vec<half::bf16> { (0..n).map(|_| half::bf16::from_f64(g.random_range(-10.0..10.0))).collect() };
    let (arm, reference) = (logits(rows * j * vocab), logits(rows * vocab));
    let ids: Vec<u32> = (0..rows * k).map(|i| ((i * 7919) % vocab) as u32).collect();
    let upload = |gpu: &mut Gpu, bytes: &[u8]| -> Result<DevBuf> {
        let mut b = gpu.alloc(bytes.len())?;
        b.upload(gpu.device(), bytes)?;
        Ok(b)
    };
    let bufs = [
        upload(gpu, bytemuck::cast_slice(&arm))?,
        upload(gpu, bytemuck::cast_slice(&reference))?,
        upload(gpu, bytemuck::cast_slice(&ids))?,
        upload(gpu, bytemuck::cast_slice(&vec![-1.0f32; rows * k]))?,
        upload(gpu, bytemuck::cast_slice(&vec![1.0f32; rows * j]))?,
        gpu.alloc(rows * j * k * 4)?,
    ];
    let args = super::values::ValuesArgs {
        tag: "bf16",
        arm: bufs[0].ptr(),
        reference: bufs[1].ptr(),
        ref_per_principal: false,
        rows,
        j,
        v: vocab,
        k,
        ids: bufs[2].ptr(),
        base: bufs[3].ptr(),
        weights: bufs[4].ptr(),
        shift_min: true,
        out: bufs[5].ptr(),
    };
    // SAFETY: every buffer was allocated above with the extents ValuesArgs states.
    let micros = time_us(gpu, cache, reps, &mut |g| unsafe { g.launch_values(&args) })?;
    let bytes = (rows * j + rows) * vocab * 2 + rows * j * k * 4;
    Ok(Measurement { name: format!("values B={rows} J={j} V={vocab} k={k}"), cache, micros, bytes })
}

/// Token choice by Gumbel-max over B x n probabilities.
pub fn choose(gpu: &mut Gpu, rows: usize, n: usize, cache: Cache, reps: usize) -> Result<Measurement> {
    let pi = vec![1.0 / n as f32; rows * n];
    let mut step = 0;
    let micros = time_us(gpu, cache, reps, &mut |g| {
        step += 1;
        g.choose(&pi, rows, n, None, Choice::Gumbel, 7, step).map(|_| ())
    })?;
    Ok(Measurement { name: format!("choose B={rows} N={n}"), cache, micros, bytes: rows * n * 4 })
}

/// Decode attention of one token (batch 1) at position `ctx - 1` over a random cache of `ctx` positions: one
/// pass (`splits` = Some(1)), a forced split, or the decoder's choice (None, [`super::attention_splits`]).
pub fn attention(
    gpu: &mut Gpu,
    heads: Heads,
    ctx: usize,
    kv: KvCacheType,
    splits: Option<usize>,
    cache: Cache,
    reps: usize,
) -> Result<Measurement> {
    let mut g = StdRng::seed_from_u64(5);
    let n = ctx * heads.kv * heads.dim;
    let k: Vec<f32> = (0..n).map(|_| g.random_range(-1.0..1.0)).collect();
    let v: Vec<f32> = (0..n).map(|_| g.random_range(-1.0..1.0)).collect();
    let q: Vec<f32> = (0..heads.q * heads.dim).map(|_| g.random_range(-1.0..1.0)).collect();
    let shape = AttentionShape { heads, slots: 1, max_seq: ctx, window: 0, kv };
    let mut job = gpu.prepare_attention(shape, &k, &v, &q, &[0], &[ctx - 1])?;
    let used = gpu.run_attention(&mut job, splits)?;
    let micros = time_us(gpu, cache, reps, &mut |g| g.run_attention(&mut job, splits).map(|_| ()))?;
    let how = if used == 1 { "one pass".to_string() } else { format!("split-K x{used}") };
    let name = format!("attention B=1 ctx={ctx} H={}/{} d={} {kv} ({how})", heads.q, heads.kv, heads.dim);
    Ok(Measurement { name, cache, micros, bytes: job.bytes_moved() })
}

/// What `cage bench solver` runs: each kernel on the target shapes on a GPU, on reduced shapes under
/// the host emulation (whose figures say nothing about a GPU and are labelled so).
pub fn solver_report(gpu: &mut Gpu, reps: usize) -> Result<String> {
    use std::fmt::Write as _;
    let emu = gpu.is_emulated();
    let mut out = String::new();
    let _ = writeln!(out, "device: {}", gpu.describe());
    let copy = copy_bandwidth(gpu, if emu { 8 << 20 } else { 1 << 30 }, reps)?;
    let _ = writeln!(out, "device-to-device copy: {copy:.1} GB/s (read + write), the 100% of the last column");
    if emu {
        let _ = writeln!(
            out,
            "HOST EMULATION on reduced shapes: these are not GPU figures (GPU figures: not yet measured)"
        );
    }
    let mut rows: Vec<Measurement> = Vec::new();
    let warm_and_flushed = |m: &mut dyn FnMut(Cache) -> Result<Measurement>, rows: &mut Vec<Measurement>| {
        for c in [Cache::Warm, Cache::Flushed] {
            rows.push(m(c)?);
        }
        Ok::<(), crate::error::CageError>(())
    };
    if emu {
        warm_and_flushed(&mut |c| equilibrium(gpu, 2, 50, 4, ValueType::F32, c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| equilibrium(gpu, 1, 4096, 2, ValueType::Bf16, c, reps), &mut rows)?;
        // A row too large for one block: split across a cluster (each block on its own host thread here).
        warm_and_flushed(&mut |c| equilibrium(gpu, 1, 60_000, 2, ValueType::F32, c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| candidates(gpu, 2, 8192, Some(50), c, reps), &mut rows)?;
        // Rows split over several blocks (partials, then a merge).
        warm_and_flushed(&mut |c| candidates(gpu, 1, 20_000, Some(50), c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| values(gpu, 1, 2, 20_000, c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| choose(gpu, 2, 4096, c, reps), &mut rows)?;
        let h = Heads { q: 4, kv: 2, dim: 64 };
        for (kv, splits) in [(KvCacheType::F32, Some(1)), (KvCacheType::F32, None), (KvCacheType::Bf16, None)] {
            rows.push(attention(gpu, h, 1024, kv, splits, Cache::Flushed, reps)?);
        }
    } else {
        // Targets (H100): the first within 2x one read of its inputs at copy bandwidth; the B = 1, k = 50 step
        // under 10 us including launch; top-k at >= 80% of copy bandwidth for B x V >= 8M.
        warm_and_flushed(&mut |c| equilibrium(gpu, 64, 128_256, 4, ValueType::Bf16, c, reps), &mut rows)?;
        // The same without the cluster split: every Newton pass re-reads the rows from global memory.
        let unsplit = EqOptions {
            values: ValueType::Bf16,
            incentives: false,
            cluster: Some(1),
            stage: Some(false),
            ..EqOptions::default()
        };
        warm_and_flushed(&mut |c| equilibrium_with(gpu, 64, 128_256, 4, unsplit, c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| equilibrium(gpu, 1, 50, 4, ValueType::F32, c, reps), &mut rows)?;
        rows.push(equilibrium_graph(gpu, 1, 50, 4, reps)?);
        warm_and_flushed(&mut |c| equilibrium(gpu, 64, 50, 4, ValueType::F32, c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| equilibrium(gpu, 8, 32_000, 2, ValueType::Bf16, c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| candidates(gpu, 64, 128_256, Some(50), c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| candidates(gpu, 64, 128_256, None, c, reps), &mut rows)?;
        // Small batch: rows split over several blocks (candidates::row_split), then merged.
        warm_and_flushed(&mut |c| candidates(gpu, 1, 152_064, Some(50), c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| candidates(gpu, 1, 128_256, Some(50), c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| candidates(gpu, 1, 128_256, None, c, reps), &mut rows)?;
        // Each row's log-sum-exp once (the shared reference too), then the gather.
        warm_and_flushed(&mut |c| values(gpu, 1, 4, 128_256, c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| values(gpu, 64, 4, 128_256, c, reps), &mut rows)?;
        warm_and_flushed(&mut |c| choose(gpu, 64, 128_256, c, reps), &mut rows)?;
        // Decode attention at batch 1 on the Llama-3.1-8B shape (32 query heads, 8 KV heads, d = 128), one layer:
        // one pass (32 blocks) against split-K (the decoder's choice), f32 and bf16 caches. Target: split-K within
        // 2x one read of the cache at copy bandwidth.
        let h = Heads { q: 32, kv: 8, dim: 128 };
        for ctx in [8192, 32_768] {
            for (kv, splits) in [(KvCacheType::F32, Some(1)), (KvCacheType::F32, None), (KvCacheType::Bf16, None)] {
                rows.push(attention(gpu, h, ctx, kv, splits, Cache::Flushed, reps)?);
            }
        }
    }
    let _ = writeln!(out, "{:<58} {:>8} {:>12} {:>10} {:>8}", "kernel", "L2", "time (us)", "GB/s", "of copy");
    for m in &rows {
        let _ = writeln!(
            out,
            "{:<58} {:>8} {:>12.2} {:>10.2} {:>7.1}%",
            m.name,
            if m.cache == Cache::Warm { "warm" } else { "flushed" },
            m.micros,
            m.gbps(),
            100.0 * m.gbps() / copy
        );
    }
    Ok(out)
}

/// `cage bench solver --backend B --reps R`: prints the report of [`solver_report`] on the GPU (`cuda`), the host
/// emulation (`emulation`) or the GPU when usable, else the emulation (`auto`). `cpu` has no kernels to time.
pub fn cli(backend: crate::Backend, reps: usize) -> Result<()> {
    use crate::Backend;
    let mut gpu = match backend {
        Backend::Cuda => Gpu::cuda(0)?,
        Backend::Emulation => Gpu::emulated(),
        Backend::Auto => Gpu::cuda(0).unwrap_or_else(|e| {
            eprintln!("cage bench: {e}; using the host emulation");
            Gpu::emulated()
        }),
        Backend::Cpu => {
            return Err(crate::error::CageError::InvalidArgument(
                "cage bench solver times the CUDA kernels: backend cpu has none (use cuda, emulation or auto)".into(),
            ));
        }
    };
    crate::out!("{}", solver_report(&mut gpu, reps.max(1))?)?;
    Ok(())
}
