//! `cage bench forward`: prefill and decode throughput of the forward pass at several batch sizes, on the CPU
//! and, when a CUDA GPU is usable, on it ([`bench_forward_gpu`]). Both run through the
//! [`Decoder`](super::forward::Decoder) trait, so they measure the same calls.

use super::forward::{LogitsAt, Seq, argmax};
use super::gpu::{GpuOptions, new_decoder_with};
use super::llama::Model;
use crate::backend::Backend;
use crate::error::{CageError, Result};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// One measured batch size.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardBench {
    /// Rows decoded together.
    pub batch: usize,
    /// Prompt tokens per row.
    pub prompt_len: usize,
    /// Decode steps.
    pub decode_steps: usize,
    /// Prefill tokens per second (all rows in one forward call).
    pub prefill_tok_s: f64,
    /// Decode tokens per second (summed over rows).
    pub decode_tok_s: f64,
    /// Milliseconds per decode step (one token for every row).
    pub decode_step_ms: f64,
    /// Seconds to build the decoder (a GPU decoder: converting and uploading the weights).
    pub load_s: f64,
    /// Device memory the decoder took (free memory before it minus after; the host's for the emulation, so
    /// only indicative there); `None` on the CPU or where the device does not say.
    pub device_bytes: Option<u64>,
}

/// Runs the benchmark: for each batch size, prefill `prompt_len` tokens per row, then `steps` greedy decode
/// steps; the best of `repeats` runs counts (the first warms caches and the thread pool). The batch sizes take
/// turns within each repeat.
pub fn bench_forward(
    model: Arc<Model>,
    batches: &[usize],
    prompt_len: usize,
    steps: usize,
    repeats: usize,
) -> Result<Vec<ForwardBench>> {
    bench_decoder(Backend::Cpu, model, batches, prompt_len, steps, repeats, GpuOptions::default())
}

/// [`bench_forward`] on CUDA GPU 0 ([`super::gpu::GpuDecoder`]: bf16 weights, cuBLAS). No usable GPU is
/// [`CageError::NoGpu`], which callers report as a skipped measurement. Every forward call downloads its
/// logits, so the times include the device's work and that copy.
pub fn bench_forward_gpu(
    model: Arc<Model>,
    batches: &[usize],
    prompt_len: usize,
    steps: usize,
    repeats: usize,
) -> Result<Vec<ForwardBench>> {
    bench_forward_on(Backend::Cuda, model, batches, prompt_len, steps, repeats, GpuOptions::default())
}

/// [`bench_forward`] on `device` (`auto` resolved first): the CPU decoder, the GPU decoder on GPU 0 (no usable
/// GPU is [`CageError::NoGpu`]) or on the host emulation (tiny models: the GPU code path's dry run), the GPU
/// decoder with `opts` (its KV cache type and the format of its linear layers: bf16, or int8 / int4 for the
/// quantized throughput rows). The GPU decoder runs its production paths: fused q / k / v and gate / up GEMMs,
/// and split-K attention wherever [`crate::gpu::attention_splits`] picks it.
pub fn bench_forward_on(
    device: Backend,
    model: Arc<Model>,
    batches: &[usize],
    prompt_len: usize,
    steps: usize,
    repeats: usize,
    opts: GpuOptions,
) -> Result<Vec<ForwardBench>> {
    let device = device.resolve();
    if device == Backend::Cuda {
        crate::backend::cuda_usable()?;
    }
    bench_decoder(device, model, batches, prompt_len, steps, repeats, opts)
}

/// The measurement loop shared by every backend: one decoder on `device` with a slot per row of the largest
/// batch serves every batch size (a big model is uploaded once; a call's work depends on its rows, not on
/// the slots). Repeats are outermost and the batch sizes interleaved within each: a change of machine load
/// during the run then hits every batch size alike, and the ratios between them stay meaningful. A model with
/// unmerged adapters (ARMs) decodes them in the same batch: row `r` takes the backbone when `r % (n + 1)` is 0,
/// else adapter `r % (n + 1) - 1`.
fn bench_decoder(
    device: Backend,
    model: Arc<Model>,
    batches: &[usize],
    prompt_len: usize,
    steps: usize,
    repeats: usize,
    opts: GpuOptions,
) -> Result<Vec<ForwardBench>> {
    if prompt_len == 0 || steps == 0 || repeats == 0 || batches.is_empty() || batches.contains(&0) {
        return Err(CageError::InvalidArgument("batch sizes, prompt length, steps and repeats must be >= 1".into()));
    }
    let v = model.config.vocab_size;
    let arms = model.adapters.len();
    let slots = batches.iter().copied().max().unwrap_or(1);
    let mut probe = match device {
        Backend::Cuda => Some(crate::gpu::Gpu::cuda(0)?),
        Backend::Emulation => Some(crate::gpu::Gpu::emulated()),
        _ => None,
    };
    let mut free =
        || -> Result<Option<usize>> { Ok(probe.as_mut().map(|g| g.device().free_memory()).transpose()?.flatten()) };
    let before = free()?;
    let t_load = Instant::now();
    let mut dec = new_decoder_with(device, model.clone(), slots, prompt_len + steps, slots * prompt_len, opts)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let device_bytes = before.zip(free()?).map(|(b, a)| b.saturating_sub(a) as u64);
    let adapter = |r: usize| (r % (arms + 1)).checked_sub(1);
    let (mut best_pre, mut best_dec) = (vec![f64::INFINITY; batches.len()], vec![f64::INFINITY; batches.len()]);
    for _ in 0..repeats {
        for (bi, &b) in batches.iter().enumerate() {
            // Deterministic pseudo-text: different ids per row so rows do not share work by accident.
            let prompts: Vec<Vec<u32>> =
                (0..b).map(|r| (0..prompt_len).map(|i| ((r * 7919 + i * 104_729 + 17) % v) as u32).collect()).collect();
            for s in 0..b {
                dec.reset(s);
            }
            let seqs: Vec<Seq> =
                prompts.iter().enumerate().map(|(i, p)| Seq { slot: i, tokens: p, adapter: adapter(i) }).collect();
            let t0 = Instant::now();
            let mut next: Vec<u32> = dec.forward(&seqs, LogitsAt::Last)?.chunks_exact(v).map(argmax).collect();
            best_pre[bi] = best_pre[bi].min(t0.elapsed().as_secs_f64());
            let t1 = Instant::now();
            for _ in 0..steps {
                let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                let seqs: Vec<Seq> =
                    toks.iter().enumerate().map(|(i, t)| Seq { slot: i, tokens: t, adapter: adapter(i) }).collect();
                next = dec.forward(&seqs, LogitsAt::Last)?.chunks_exact(v).map(argmax).collect();
            }
            best_dec[bi] = best_dec[bi].min(t1.elapsed().as_secs_f64());
        }
    }
    Ok(batches
        .iter()
        .enumerate()
        .map(|(bi, &b)| ForwardBench {
            batch: b,
            prompt_len,
            decode_steps: steps,
            prefill_tok_s: (b * prompt_len) as f64 / best_pre[bi],
            decode_tok_s: (b * steps) as f64 / best_dec[bi],
            decode_step_ms: best_dec[bi] * 1e3 / steps as f64,
            load_s,
            device_bytes,
        })
        .collect())
}
