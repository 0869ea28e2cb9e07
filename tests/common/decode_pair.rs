//! Logits of two GPU decoders side by side, for the weight-format tests (model_gpu_quant, model_gptq): one
//! prefill long enough for the dequantize-then-GEMM path, then decoding steps on the GEMV.

use cage::gpu::quant::GEMV_MAX_TOKENS;
use cage::model::forward::{Decoder, LogitsAt, Seq, argmax};

/// The largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Deterministic prompts of the given lengths.
pub fn prompts(lens: &[usize], v: usize) -> Vec<Vec<u32>> {
    lens.iter().enumerate().map(|(r, &n)| (0..n).map(|i| ((r * 31 + i * 17 + 3) % v) as u32).collect()).collect()
}

/// One prefill of 3 prompts (41 tokens: the dequantize-then-GEMM path) and 4 decoding steps (3 tokens: the
/// GEMV) on `a` and `b`, feeding both `a`'s greedy tokens; returns the largest logit difference of the prefill
/// and of the steps.
pub fn run_pair(a: &mut dyn Decoder, b: &mut dyn Decoder, v: usize) -> (f32, f32) {
    let ps = prompts(&[13, 17, 11], v);
    assert!(ps.iter().map(Vec::len).sum::<usize>() > GEMV_MAX_TOKENS);
    let seqs: Vec<Seq> = ps.iter().enumerate().map(|(slot, p)| Seq { slot, tokens: p, adapter: None }).collect();
    let la = a.forward(&seqs, LogitsAt::Last).unwrap().to_vec();
    let lb = b.forward(&seqs, LogitsAt::Last).unwrap().to_vec();
    let prefill = max_diff(&la, &lb);
    let mut ends: Vec<u32> = la.chunks_exact(v).map(argmax).collect();
    let mut steps = 0f32;
    for _ in 0..4 {
        let toks: Vec<[u32; 1]> = ends.iter().map(|&t| [t]).collect();
        let seqs: Vec<Seq> = toks.iter().enumerate().map(|(slot, t)| Seq { slot, tokens: t, adapter: None }).collect();
        let la = a.forward(&seqs, LogitsAt::Last).unwrap().to_vec();
        let lb = b.forward(&seqs, LogitsAt::Last).unwrap().to_vec();
        steps = steps.max(max_diff(&la, &lb));
        ends = la.chunks_exact(v).map(argmax).collect();
    }
    (prefill, steps)
}
