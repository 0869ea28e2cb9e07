//! CPU forward pass in f32 (weights f32 or in their stored format, see [`super::weight`]): a batch of sequences of different lengths, each in its own KV-cache slot, prefill
//! (many tokens of a sequence) and decode (one token) in the same call, every buffer allocated once.
//!
//! The [`Decoder`] trait is the seam for other backends: generation code only sees `Decoder`, so a CUDA
//! implementation can replace [`CpuDecoder`] without changes above it.

use super::linalg::{matmul_t, rms_norm, silu_mul};
use super::llama::{Linear, Model};
use super::packed::{Packed, matmul_t_many};
use super::weight::Weight;
use crate::error::{CageError, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Part of one sequence fed in one forward call: its tokens are appended after what its slot already holds.
#[derive(Debug, Clone, Copy)]
pub struct Seq<'a> {
    /// KV-cache slot of the sequence.
    pub slot: usize,
    /// New tokens (at least one).
    pub tokens: &'a [u32],
    /// Unmerged adapter for this row (`None`: the backbone alone).
    pub adapter: Option<usize>,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// The last new token of each sequence: `[seqs, vocab]`.
    Last,
    /// Every new token, sequences one after another: `[tokens, vocab]`.
    All,
}

/// A model runtime that keeps per-slot KV caches and returns logits; implemented by [`CpuDecoder`], and the
/// interface a GPU backend implements.
pub trait Decoder {
    /// Vocabulary size (logit row width).
    fn vocab_size(&self) -> usize;
    /// Number of KV-cache slots (concurrent sequences).
    fn slots(&self) -> usize;
    /// Tokens a slot holds so far.
    fn slot_len(&self, slot: usize) -> usize;
    /// Forgets a slot's sequence.
    fn reset(&mut self, slot: usize);
    /// Runs the batch and returns its logits (see [`LogitsAt`]), row-major f32.
    fn forward(&mut self, seqs: &[Seq], at: LogitsAt) -> Result<&[f32]>;
    /// Bytes this decoder's device copied to and from the host so far (none on the CPU).
    fn transfers(&self) -> crate::gpu::device::Transfers {
        crate::gpu::device::Transfers::default()
    }
    /// The GPU decoder behind this one, for a decoding step that keeps the logits on its device (None: the
    /// logits live on the host).
    fn as_gpu(&mut self) -> Option<&mut super::gpu::GpuDecoder> {
        None
    }
}

/// Flat KV cache: `[layer][slot][kv_head][position][head_dim]` for keys and for values (head-major, so that
/// attention streams each head's positions contiguously and the hardware prefetcher keeps up).
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Aligned,
    v: Aligned,
    lens: Vec<usize>,
    max_seq: usize,
    kv_dim: usize,
}

impl KvCache {
    /// Allocates room for `slots` sequences of up to `max_seq` tokens.
    pub fn new(model: &Model, slots: usize, max_seq: usize) -> Self {
        let c = &model.config;
        let kv_dim = c.num_kv_heads * c.head_dim;
        let n = c.num_layers * slots * max_seq * kv_dim;
        KvCache { k: Aligned::zeros(n), v: Aligned::zeros(n), lens: vec![0; slots], max_seq, kv_dim }
    }
    fn base(&self, layer: usize, slot: usize) -> usize {
        (layer * self.lens.len() + slot) * self.max_seq * self.kv_dim
    }
}

/// A zeroed f32 buffer whose start is aligned to a cache line (64 bytes). The matmul kernels read rows of
/// activations (and attention the cached keys and values) with unaligned 32-byte loads; from a buffer that is
/// only 16-byte aligned, as the allocator may return it, one load in four splits across cache lines, which
/// made a batch-4 decode step about 8% slower in some processes than in others.
#[derive(Debug, Clone)]
struct Aligned {
    buf: Vec<Line>,
    len: usize,
}

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

// SAFETY: sixteen f32 fill the 64-byte alignment exactly (no padding), and all-zero bits are 0.0.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; every bit pattern is a valid [f32; 16].
unsafe impl bytemuck::Pod for Line {}

impl Aligned {
    fn zeros(len: usize) -> Self {
        Aligned { buf: vec![Line([0.0; 16]); len.div_ceil(16)], len }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.buf)[..self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut bytemuck::cast_slice_mut(&mut self.buf)[..self.len]
    }
}

/// Scratch buffers of the forward pass, sized once for `max_tokens` tokens per call.
#[derive(Debug, Clone)]
pub struct ForwardState {
    max_tokens: usize,
    max_logit_rows: usize,
    x: Aligned,
    xn: Aligned,
    q: Aligned,
    k: Aligned,
    v: Aligned,
    att: Aligned,
    tmp: Aligned,
    gate: Aligned,
    up: Aligned,
    lora_tmp: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    logits: Vec<f32>,
    pos: Vec<usize>,
    slot: Vec<usize>,
    inv_freq: Vec<f32>,
}

impl ForwardState {
    /// Buffers for up to `max_tokens` tokens per call and `max_logit_rows` logit rows (`LogitsAt::All` needs
    /// one row per token).
    pub fn new(model: &Model, max_tokens: usize, max_logit_rows: usize) -> Self {
        let c = &model.config;
        let t = max_tokens;
        let qd = c.num_heads * c.head_dim;
        let kvd = c.num_kv_heads * c.head_dim;
        let max_r = model.max_lora_rank();
        ForwardState {
            max_tokens,
            max_logit_rows,
            x: Aligned::zeros(t * c.hidden_size),
            xn: Aligned::zeros(t * c.hidden_size),
            q: Aligned::zeros(t * qd),
            k: Aligned::zeros(t * kvd),
            v: Aligned::zeros(t * kvd),
            att: Aligned::zeros(t * qd),
            tmp: Aligned::zeros(t * c.hidden_size),
            gate: Aligned::zeros(t * c.intermediate_size),
            up: Aligned::zeros(t * c.intermediate_size),
            lora_tmp: vec![0.0; t * max_r],
            cos: vec![0.0; t * c.head_dim / 2],
            sin: vec![0.0; t * c.head_dim / 2],
            logits: vec![0.0; max_logit_rows * c.vocab_size],
            pos: vec![0; t],
            slot: vec![0; t],
            inv_freq: c.inv_freq(),
        }
    }
}

/// Token counts up to which packed weights are used; above it the f32 GEMM is faster (compute bound).
const PACKED_MAX_M: usize = 32;

/// Contiguous tokens of one sequence.
#[derive(Clone, Copy)]
struct Run {
    start: usize,
    len: usize,
    adapter: Option<usize>,
}

fn apply(lin: &Linear, x: &[f32], t: usize, out: &mut [f32], runs: &[Run], lora_tmp: &mut [f32]) {
    let (inp, o) = (lin.inp, lin.out);
    match &lin.packed {
        Some(p) if t <= PACKED_MAX_M => p.matmul_t(x, t, inp, o, out, false, 1.0),
        _ => lin.w.matmul_t(x, t, inp, o, out, false, 1.0),
    }
    epilogue(lin, x, t, out, runs, lora_tmp);
}

/// Several linears of the same input (q, k, v; gate, up): with packed weights, one parallel loop for all the
/// products (a batch-1 decode step is ~200 small products, each parallel loop a fork and a join).
fn apply_many<const N: usize>(
    lins: [&Linear; N],
    x: &[f32],
    t: usize,
    mut outs: [&mut [f32]; N],
    runs: &[Run],
    lora_tmp: &mut [f32],
) {
    let inp = lins[0].inp;
    if t <= PACKED_MAX_M && lins.iter().all(|l| l.packed.is_none() && l.inp == inp) {
        // Matrices in their stored formats (GGUF blocks, bf16): one parallel loop too.
        let mut it = lins.iter().zip(outs.iter_mut());
        let products: [(&Weight, usize, &mut [f32]); N] = std::array::from_fn(|_| {
            let (l, o) = it.next().expect("N linears");
            (&l.w, l.out, &mut **o)
        });
        Weight::matmul_t_many(x, t, inp, products);
        for (lin, out) in lins.iter().zip(outs.iter_mut()) {
            epilogue(lin, x, t, out, runs, lora_tmp);
        }
        return;
    }
    if t > PACKED_MAX_M || lins.iter().any(|l| l.packed.is_none() || l.inp != inp) {
        for (lin, out) in lins.iter().zip(outs.iter_mut()) {
            apply(lin, x, t, out, runs, lora_tmp);
        }
        return;
    }
    let mut it = lins.iter().zip(outs.iter_mut());
    let products: [(&Packed, usize, &mut [f32]); N] = std::array::from_fn(|_| {
        let (l, o) = it.next().expect("N linears");
        (l.packed.as_ref().expect("packed (checked)"), l.out, &mut **o)
    });
    matmul_t_many(x, t, inp, products);
    for (lin, out) in lins.iter().zip(outs.iter_mut()) {
        epilogue(lin, x, t, out, runs, lora_tmp);
    }
}

/// Bias and unmerged adapters, after the product.
fn epilogue(lin: &Linear, x: &[f32], t: usize, out: &mut [f32], runs: &[Run], lora_tmp: &mut [f32]) {
    let (inp, o) = (lin.inp, lin.out);
    if let Some(b) = &lin.bias {
        for row in out[..t * o].chunks_exact_mut(o) {
            for (y, bb) in row.iter_mut().zip(b) {
                *y += bb;
            }
        }
    }
    for run in runs {
        let Some(Some(p)) = run.adapter.and_then(|a| lin.lora.get(a)) else { continue };
        let xs = &x[run.start * inp..(run.start + run.len) * inp];
        let tmp = &mut lora_tmp[..run.len * p.r];
        matmul_t(xs, run.len, inp, &p.a, p.r, tmp, false, 1.0);
        matmul_t(tmp, run.len, p.r, &p.b, o, &mut out[run.start * o..(run.start + run.len) * o], true, p.scale);
    }
}

fn rope(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (row, (c, s)) in x.chunks_exact_mut(heads * hd).zip(cos.chunks_exact(half).zip(sin.chunks_exact(half))) {
        for h in row.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = (h[i], h[i + half]);
                h[i] = a * c[i] - b * s[i];
                h[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}

/// The `g` query heads of one key/value head (`q`: `g * hd`, heads one after another) against `n` cached
/// positions (rows `stride` apart in `keys` / `vals`): the softmax-weighted sums of the values go to `out`
/// (`g * hd`). The heads of a group share each key and value row, which is read once for all of them.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    g: usize,
    keys: &[f32],
    vals: &[f32],
    stride: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (just checked).
        unsafe { attend_avx2(q, g, keys, vals, stride, n, scale, scores, out) };
        return;
    }
    attend_body(q, g, keys, vals, stride, n, scale, scores, out)
}

/// [`attend_body`] compiled for AVX2: the crate's baseline is SSE2, which halves the width of these loops.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx2(
    q: &[f32],
    g: usize,
    keys: &[f32],
    vals: &[f32],
    stride: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_body(q, g, keys, vals, stride, n, scale, scores, out)
}

/// Eight-lane dot product (one vector register under AVX2); `a.len()` need not be a multiple of 8.
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_body(
    q: &[f32],
    g: usize,
    keys: &[f32],
    vals: &[f32],
    stride: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len() / g;
    for p in 0..n {
        let kr = &keys[p * stride..p * stride + hd];
        for (gi, qh) in q.chunks_exact(hd).enumerate() {
            scores[gi * n + p] = dot8(qh, kr) * scale;
        }
    }
    for sc in scores[..g * n].chunks_exact_mut(n) {
        let mx = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in sc.iter_mut() {
            *s = (*s - mx).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for s in sc.iter_mut() {
            *s *= inv;
        }
    }
    out.fill(0.0);
    for p in 0..n {
        let vr = &vals[p * stride..p * stride + hd];
        for (gi, oh) in out.chunks_exact_mut(hd).enumerate() {
            let w = scores[gi * n + p];
            for (o, v) in oh.iter_mut().zip(vr) {
                *o += w * v;
            }
        }
    }
}

/// Checks a batch against the cache, the state and the model, and lays out its tokens; returns the runs.
fn prepare(model: &Model, cache: &KvCache, st: &mut ForwardState, seqs: &[Seq], at: LogitsAt) -> Result<Vec<Run>> {
    let c = &model.config;
    let (h, vocab) = (c.hidden_size, c.vocab_size);
    let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    if seqs.is_empty() || t == 0 {
        return Err(CageError::InvalidArgument("forward needs at least one token".into()));
    }
    if t > st.max_tokens {
        return Err(CageError::InvalidArgument(format!(
            "{t} tokens in one forward call, the state was sized for {}",
            st.max_tokens
        )));
    }
    let rows = if at == LogitsAt::All { t } else { seqs.len() };
    if rows > st.max_logit_rows {
        return Err(CageError::InvalidArgument(format!(
            "{rows} logit rows requested, the state was sized for {}",
            st.max_logit_rows
        )));
    }
    if cache.kv_dim != c.num_kv_heads * c.head_dim
        || cache.k.len() != c.num_layers * cache.lens.len() * cache.max_seq * cache.kv_dim
    {
        return Err(CageError::InvalidArgument("the KV cache was made for another model".into()));
    }
    let mut runs = Vec::with_capacity(seqs.len());
    let mut seen = vec![false; cache.lens.len()];
    let mut start = 0;
    for s in seqs {
        let slot = s.slot;
        if slot >= cache.lens.len() {
            return Err(CageError::InvalidArgument(format!(
                "slot {slot} does not exist (the cache has {})",
                cache.lens.len()
            )));
        }
        if std::mem::replace(&mut seen[slot], true) {
            return Err(CageError::InvalidArgument(format!("slot {slot} appears twice in one batch")));
        }
        if s.tokens.is_empty() {
            return Err(CageError::InvalidArgument(format!("sequence in slot {slot} has no new tokens")));
        }
        let end = cache.lens[slot] + s.tokens.len();
        if end > cache.max_seq {
            return Err(CageError::InvalidArgument(format!(
                "slot {slot} would hold {end} tokens, the cache was sized for {}",
                cache.max_seq
            )));
        }
        if let Some(a) = s.adapter
            && a >= model.adapters.len()
        {
            return Err(CageError::InvalidArgument(format!(
                "adapter id {a} is not attached (the model has {})",
                model.adapters.len()
            )));
        }
        for (i, &tok) in s.tokens.iter().enumerate() {
            if tok as usize >= vocab {
                return Err(CageError::InvalidArgument(format!("token id {tok} is outside the vocabulary ({vocab})")));
            }
            let j = start + i;
            st.pos[j] = cache.lens[slot] + i;
            st.slot[j] = slot;
            model.embed.row_into(tok as usize, h, &mut st.x[j * h..(j + 1) * h]);
        }
        runs.push(Run { start, len: s.tokens.len(), adapter: s.adapter });
        start += s.tokens.len();
    }
    Ok(runs)
}

/// Runs `seqs` through `model`, appending to `cache`; returns the logits held in `state`.
pub fn forward<'s>(
    model: &Model,
    cache: &mut KvCache,
    state: &'s mut ForwardState,
    seqs: &[Seq],
    at: LogitsAt,
) -> Result<&'s [f32]> {
    let runs = prepare(model, cache, state, seqs, at)?;
    // The whole pass runs on a pool thread: called from outside the pool, each of the ~250 parallel loops of a
    // decode step would otherwise hand its work over and block the caller on a latch (two context switches per
    // loop, about a tenth of a batch-1 step); inside, the loops fork and join by work stealing.
    let rows = rayon::scope(|_| {
        let rows = layers(model, cache, state, &runs, at);
        project(model, state, rows);
        rows
    });
    Ok(&state.logits[..rows * model.config.vocab_size])
}

/// Runs `seqs` through `model` like [`forward`], but stops after the final norm: returns the final hidden state
/// of the last new token of each sequence (`[seqs, hidden]`), which score heads read instead of logits.
pub fn forward_hidden<'s>(
    model: &Model,
    cache: &mut KvCache,
    state: &'s mut ForwardState,
    seqs: &[Seq],
) -> Result<&'s [f32]> {
    let runs = prepare(model, cache, state, seqs, LogitsAt::Last)?;
    let rows = rayon::scope(|_| layers(model, cache, state, &runs, LogitsAt::Last));
    Ok(&state.xn[..rows * model.config.hidden_size])
}

/// The body of [`forward`] after validation: the layers and the final norm (into `xn`, one row per logit row);
/// returns the number of rows.
fn layers(model: &Model, cache: &mut KvCache, state: &mut ForwardState, runs: &[Run], at: LogitsAt) -> usize {
    let c = &model.config;
    let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let (qd, kvd, ffn) = (nh * hd, nkv * hd, c.intermediate_size);
    let t: usize = runs.iter().map(|r| r.len).sum();
    let half = hd / 2;
    let st = state;
    for j in 0..t {
        // Angle in f32 (position times f32 frequency), as transformers computes it.
        let p = st.pos[j] as f32;
        for i in 0..half {
            let a = p * st.inv_freq[i];
            st.cos[j * half + i] = a.cos();
            st.sin[j * half + i] = a.sin();
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let group = nh / nkv;
    let max_seq = cache.max_seq;
    for (li, layer) in model.layers.iter().enumerate() {
        rms_norm(&st.x[..t * h], &layer.ln1, c.rms_norm_eps, &mut st.xn[..t * h]);
        let qkv: [&mut [f32]; 3] = [&mut st.q, &mut st.k, &mut st.v];
        apply_many([&layer.q, &layer.k, &layer.v], &st.xn, t, qkv, runs, &mut st.lora_tmp);
        rope(&mut st.q[..t * qd], nh, hd, &st.cos, &st.sin);
        rope(&mut st.k[..t * kvd], nkv, hd, &st.cos, &st.sin);
        for j in 0..t {
            for kvh in 0..nkv {
                let off = cache.base(li, st.slot[j]) + (kvh * max_seq + st.pos[j]) * hd;
                let src = j * kvd + kvh * hd;
                cache.k[off..off + hd].copy_from_slice(&st.k[src..src + hd]);
                cache.v[off..off + hd].copy_from_slice(&st.v[src..src + hd]);
            }
        }
        let cache_ref = &*cache;
        let (q, pos, slot) = (&st.q, &st.pos, &st.slot);
        let window = c.window(li);
        // One task per (token, key/value head), all query heads of the group together.
        st.att[..t * qd].par_chunks_mut(group * hd).enumerate().for_each_init(
            || vec![0f32; group * max_seq],
            |scores, (idx, out)| {
                let (j, kvh) = (idx / nkv, idx % nkv);
                // Keys from `first` to the token itself: all of them, or the last `window` (itself included).
                let first = window.map_or(0, |w| (pos[j] + 1).saturating_sub(w));
                let base = cache_ref.base(li, slot[j]) + (kvh * max_seq + first) * hd;
                let qv = &q[j * qd + kvh * group * hd..j * qd + (kvh + 1) * group * hd];
                let (keys, vals) = (&cache_ref.k[base..], &cache_ref.v[base..]);
                attend(qv, group, keys, vals, hd, pos[j] + 1 - first, scale, scores, out);
            },
        );
        apply(&layer.o, &st.att, t, &mut st.tmp, runs, &mut st.lora_tmp);
        for (x, d) in st.x[..t * h].iter_mut().zip(&st.tmp[..t * h]) {
            *x += d;
        }
        rms_norm(&st.x[..t * h], &layer.ln2, c.rms_norm_eps, &mut st.xn[..t * h]);
        let gate_up: [&mut [f32]; 2] = [&mut st.gate, &mut st.up];
        apply_many([&layer.gate, &layer.up], &st.xn, t, gate_up, runs, &mut st.lora_tmp);
        silu_mul(&mut st.gate[..t * ffn], &st.up[..t * ffn]);
        apply(&layer.down, &st.gate, t, &mut st.tmp, runs, &mut st.lora_tmp);
        for (x, d) in st.x[..t * h].iter_mut().zip(&st.tmp[..t * h]) {
            *x += d;
        }
    }
    for r in runs {
        cache.lens[st.slot[r.start]] += r.len;
    }
    // Final norm only on the rows that get logits.
    match at {
        LogitsAt::All => {
            rms_norm(&st.x[..t * h], &model.norm, c.rms_norm_eps, &mut st.xn[..t * h]);
            t
        }
        LogitsAt::Last => {
            for (i, r) in runs.iter().enumerate() {
                let j = r.start + r.len - 1;
                rms_norm(&st.x[j * h..(j + 1) * h], &model.norm, c.rms_norm_eps, &mut st.xn[i * h..(i + 1) * h]);
            }
            runs.len()
        }
    }
}

/// The output projection of the `rows` normed hidden states in `xn` into the logits.
fn project(model: &Model, st: &mut ForwardState, rows: usize) {
    let (h, vocab) = (model.config.hidden_size, model.config.vocab_size);
    let logits = &mut st.logits[..rows * vocab];
    let (w, packed) = match &model.lm_head {
        Some(l) => (&l.w, l.packed.as_ref()),
        None => (&model.embed, model.embed_packed.as_ref()),
    };
    match packed {
        Some(p) if rows <= PACKED_MAX_M => p.matmul_t(&st.xn, rows, h, vocab, logits, false, 1.0),
        _ => w.matmul_t(&st.xn, rows, h, vocab, logits, false, 1.0),
    }
}

/// The CPU [`Decoder`]: a shared model, its KV cache and its scratch state.
pub struct CpuDecoder {
    /// The model (shared between decoders).
    pub model: Arc<Model>,
    cache: KvCache,
    state: ForwardState,
}

impl CpuDecoder {
    /// A decoder with `slots` sequences of up to `max_seq` tokens, at most `max_tokens` tokens per call.
    pub fn new(model: Arc<Model>, slots: usize, max_seq: usize, max_tokens: usize) -> Self {
        let cache = KvCache::new(&model, slots, max_seq);
        let state = ForwardState::new(&model, max_tokens, max_tokens.max(slots));
        CpuDecoder { model, cache, state }
    }
}

impl CpuDecoder {
    /// Runs the batch and returns the final hidden state (after the final norm) of the last new token of each
    /// sequence, `[seqs, hidden]` row-major: what a score head reads (see [`super::score`]).
    pub fn forward_hidden(&mut self, seqs: &[Seq]) -> Result<&[f32]> {
        forward_hidden(&self.model, &mut self.cache, &mut self.state, seqs)
    }
}

impl Decoder for CpuDecoder {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }
    fn slots(&self) -> usize {
        self.cache.lens.len()
    }
    fn slot_len(&self, slot: usize) -> usize {
        self.cache.lens.get(slot).copied().unwrap_or(0)
    }
    fn reset(&mut self, slot: usize) {
        if let Some(l) = self.cache.lens.get_mut(slot) {
            *l = 0;
        }
    }
    fn forward(&mut self, seqs: &[Seq], at: LogitsAt) -> Result<&[f32]> {
        forward(&self.model, &mut self.cache, &mut self.state, seqs, at)
    }
}

/// Greedy decoding of several prompts at once (prompt i in slot i, slots reset first): returns the new tokens
/// of each row, stopping a row after any of `stop` or after `max_new` tokens.
pub fn greedy(
    dec: &mut dyn Decoder,
    prompts: &[&[u32]],
    adapters: &[Option<usize>],
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<Vec<u32>>> {
    if prompts.len() > dec.slots() {
        return Err(CageError::InvalidArgument(format!("{} prompts but only {} slots", prompts.len(), dec.slots())));
    }
    let mut out: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
    if max_new == 0 || prompts.is_empty() {
        return Ok(out);
    }
    let ad = |i: usize| adapters.get(i).copied().flatten();
    let v = dec.vocab_size();
    for i in 0..prompts.len() {
        dec.reset(i);
    }
    let seqs: Vec<Seq> = prompts.iter().enumerate().map(|(i, p)| Seq { slot: i, tokens: p, adapter: ad(i) }).collect();
    let mut next: Vec<u32> = dec.forward(&seqs, LogitsAt::Last)?.chunks_exact(v).map(argmax).collect();
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..max_new {
        for (k, &i) in live.iter().enumerate() {
            out[i].push(next[k]);
        }
        live.retain(|&i| out[i].last().is_some_and(|t| !stop.contains(t)));
        if live.is_empty() || step + 1 == max_new {
            break;
        }
        let toks: Vec<[u32; 1]> = live.iter().map(|&i| [out[i][out[i].len() - 1]]).collect();
        let seqs: Vec<Seq> = live.iter().zip(&toks).map(|(&i, t)| Seq { slot: i, tokens: t, adapter: ad(i) }).collect();
        next = dec.forward(&seqs, LogitsAt::Last)?.chunks_exact(v).map(argmax).collect();
    }
    Ok(out)
}

/// Index of the largest value (the first one on ties, like `torch.argmax`).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}
