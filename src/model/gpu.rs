//! GPU forward pass: the same batches, KV-cache slots and logits as the CPU [`super::forward`], behind the same
//! [`Decoder`] trait, on a [`Gpu`] (a CUDA device, or the host emulation in tests).
//!
//! - Weights are uploaded once, when the decoder is made: matrices (embedding, projections, LM head, unmerged
//!   LoRA pairs) in bf16, norms, biases and the RoPE frequencies in f32. Merged adapters need nothing special
//!   (merge before making the decoder); unmerged ones run per row like on the CPU.
//! - With `gpu_weights` int8 / int4 ([`GpuDecoder::with_weights`]) the projections are quantized at upload and
//!   multiplied by kernels/quant.cu (src/gpu/quant.rs); the embedding, LM head and LoRA pairs stay bf16.
//! - GEMMs go through [`Device::gemm_bf16`] (cuBLAS, bf16 inputs, f32 accumulation); everything else is one
//!   kernel of `kernels/transformer.cu` per step of the CPU forward, launched by `src/gpu/transformer.rs`.
//!   Since cuBLAS multiplies bf16 by bf16, the activations entering each GEMM are rounded to bf16, the residual
//!   stream and everything else stay f32.
//! - The KV cache lives on the device in f32 with the CPU's layout (`[layer][slot][position][kv_dim]`): twice
//!   the memory of a bf16 cache, but no rounding of keys and values, which keeps the GPU within bf16 activation
//!   rounding of the CPU (see tests/model_gpu.rs).
//! - Every activation buffer is allocated at construction for `max_tokens` tokens per call: a forward call
//!   uploads only the token ids and positions, and allocates nothing on the device.
//! - [`GpuDecoder::forward_device`] leaves the logits on the device (f32, row-major `[rows, vocab]`), where
//!   [`Gpu::prepare_candidates_device`] and the equilibrium kernels read them without a copy; the trait's
//!   [`Decoder::forward`] downloads them.
//!
//! [`bf16_weights`] gives the model the GPU effectively runs (weights rounded to bf16): a CPU decoder on it
//! differs from the GPU only by the rounding of the GEMM inputs, which tests/model_gpu.rs's reference mirrors.

use super::devquant::{GpuWeights, QuantMatrix};
use super::forward::{Decoder, LogitsAt, Seq};
use super::llama::{Linear, Model};
use crate::backend::Backend;
use crate::error::{CageError, Result};
use crate::gpu::Gpu;
use crate::gpu::device::{DevBuf, DevPtr, Device};
use crate::gpu::quant::{GEMV_MAX_TOKENS, QuantLinear};
use crate::gpu::transformer::{self as tf, Heads, KvCache};
use std::sync::Arc;

pub use crate::gpu::transformer::MAX_HEAD_DIM;

/// A copy of `model` whose matrices (embedding, projections, LM head, LoRA pairs) are rounded to bf16 as
/// [`GpuDecoder`] uploads them; norms and biases stay f32 as on the device. Packed copies are dropped (they
/// held the unrounded values). A CPU decoder on this model differs from the GPU only by the rounding of the
/// activations that enter the GEMMs.
pub fn bf16_weights(model: &Model) -> Model {
    fn round(w: &mut [f32]) {
        for x in w {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }
    let mut m = model.clone();
    m.unpack_weights();
    round(&mut m.embed);
    let lins = m
        .layers
        .iter_mut()
        .flat_map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down])
        .chain(m.lm_head.as_mut());
    for lin in lins {
        round(&mut lin.w);
        for p in lin.lora.iter_mut().flatten() {
            round(&mut p.a);
            round(&mut p.b);
        }
    }
    m
}

/// A decoder for `model` on `device` with `slots` KV-cache slots of `max_seq` positions and room for
/// `max_tokens` tokens per forward call.
pub fn new_decoder(
    device: Backend,
    model: Arc<Model>,
    slots: usize,
    max_seq: usize,
    max_tokens: usize,
) -> Result<Box<dyn Decoder + Send>> {
    new_decoder_as(device, GpuWeights::Bf16, model, slots, max_seq, max_tokens)
}

/// [`new_decoder`] with a GPU decoder's linear layers held as `weights`; anything but bf16 on the CPU is an
/// error (the CPU decoder runs f32), rather than a setting silently ignored.
pub fn new_decoder_as(
    device: Backend,
    weights: GpuWeights,
    model: Arc<Model>,
    slots: usize,
    max_seq: usize,
    max_tokens: usize,
) -> Result<Box<dyn Decoder + Send>> {
    let gpu = match device {
        Backend::Cpu if weights != GpuWeights::Bf16 => {
            return Err(bad(format!(
                "gpu_weights {weights} applies to a model on a GPU (model_device cuda or emulation); the CPU \
                 decoder runs f32"
            )));
        }
        Backend::Cpu => return Ok(Box::new(super::CpuDecoder::new(model, slots, max_seq, max_tokens))),
        Backend::Cuda => Gpu::cuda(0)?,
        Backend::Emulation => Gpu::emulated(),
        Backend::Auto => return new_decoder_as(device.resolve(), weights, model, slots, max_seq, max_tokens),
    };
    Ok(Box::new(GpuDecoder::with_weights(gpu, model, slots, max_seq, max_tokens, weights)?))
}

/// Logits left on the device by [`GpuDecoder::forward_device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLogits {
    /// Device address of `rows x vocab` f32 values, row-major, owned by the decoder and valid until its next
    /// forward call.
    pub ptr: DevPtr,
    /// Rows (see [`LogitsAt`]).
    pub rows: usize,
    /// Row width.
    pub vocab: usize,
}

/// One unmerged LoRA pair on the device.
struct LoraW {
    a: DevBuf,
    b: DevBuf,
    r: usize,
    scale: f32,
}

/// A linear layer's weight on the device: bf16 for cuBLAS, or int8 / int4 for the kernels of kernels/quant.cu.
enum LinWeight {
    Bf16(DevBuf),
    Quant(QuantLinear),
}

/// A linear layer on the device.
struct LinW {
    w: LinWeight,
    bias: Option<DevBuf>,
    inp: usize,
    out: usize,
    lora: Vec<Option<LoraW>>,
}

struct LayerW {
    ln1: DevBuf,
    ln2: DevBuf,
    q: LinW,
    k: LinW,
    v: LinW,
    o: LinW,
    gate: LinW,
    up: LinW,
    down: LinW,
}

/// Contiguous tokens of one sequence in a call.
#[derive(Clone, Copy)]
struct Run {
    start: usize,
    len: usize,
    adapter: Option<usize>,
}

/// Device buffers of one forward call, sized for `max_tokens` tokens.
struct Acts {
    /// Residual stream, f32 `[t, hidden]`.
    x: DevBuf,
    /// GEMM input, bf16 `[t, max(hidden, q_dim, ffn)]`.
    act: DevBuf,
    q: DevBuf,
    k: DevBuf,
    v: DevBuf,
    /// Output of o / down before the residual add, f32 `[t, hidden]`.
    tmp: DevBuf,
    gate: DevBuf,
    up: DevBuf,
    /// LoRA `x A^T`, f32 and bf16 `[t, max rank]`.
    lora_f32: DevBuf,
    lora_bf16: DevBuf,
    /// f32 `[max_rows, vocab]`.
    logits: DevBuf,
    tokens: DevBuf,
    pos: DevBuf,
    slot: DevBuf,
    rows: DevBuf,
    /// bf16 scratch for a quantized weight dequantized before a GEMM of more than GEMV_MAX_TOKENS rows (empty
    /// with bf16 weights or when no call is that large).
    dequant: DevBuf,
}

/// The GPU [`Decoder`]: the model's weights on a device, a KV cache of `slots` sequences of up to `max_seq`
/// tokens, and buffers for `max_tokens` tokens per call.
pub struct GpuDecoder {
    model: Arc<Model>,
    layers: Vec<LayerW>,
    embed: DevBuf,
    /// The LM head, or None when it is tied to the embedding.
    lm_head: Option<DevBuf>,
    norm: DevBuf,
    inv_freq: DevBuf,
    kc: DevBuf,
    vc: DevBuf,
    acts: Acts,
    gpu: Gpu,
    lens: Vec<usize>,
    max_seq: usize,
    max_tokens: usize,
    max_rows: usize,
    // Host staging reused by every call.
    h_tokens: Vec<i32>,
    h_pos: Vec<i32>,
    h_slot: Vec<i32>,
    h_rows: Vec<i32>,
    seen: Vec<bool>,
    runs: Vec<Run>,
    host_logits: Vec<f32>,
    /// Final hidden states copied back, then normed: `[max_rows, hidden]` each.
    host_hidden: Vec<f32>,
}

fn bad(msg: String) -> CageError {
    CageError::InvalidArgument(msg)
}

fn upload_f32(dev: &mut dyn Device, x: &[f32]) -> Result<DevBuf> {
    let mut b = DevBuf::alloc(dev, x.len() * 4)?;
    b.upload(dev, x)?;
    Ok(b)
}

fn upload_bf16(dev: &mut dyn Device, x: &[f32]) -> Result<DevBuf> {
    let h: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let mut b = DevBuf::alloc(dev, h.len() * 2)?;
    b.upload(dev, &h)?;
    Ok(b)
}

/// Uploads `l` with its weight in `weights` (quantized here, round to nearest); `name` goes into errors.
fn upload_linear(dev: &mut dyn Device, l: &Linear, weights: GpuWeights, name: &str) -> Result<LinW> {
    let w = match QuantMatrix::quantize(weights, &l.w, l.out, l.inp, name)? {
        None => LinWeight::Bf16(upload_bf16(dev, &l.w)?),
        Some(q) => LinWeight::Quant(QuantLinear::upload(dev, &q)?),
    };
    let bias = l.bias.as_ref().map(|b| upload_f32(dev, b)).transpose()?;
    let mut lora = Vec::with_capacity(l.lora.len());
    for p in &l.lora {
        lora.push(match p {
            Some(p) => Some(LoraW { a: upload_bf16(dev, &p.a)?, b: upload_bf16(dev, &p.b)?, r: p.r, scale: p.scale }),
            None => None,
        });
    }
    Ok(LinW { w, bias, inp: l.inp, out: l.out, lora })
}

/// `out[t, lin.out] = x[t, lin.inp] W^T (+ bias) (+ each run's LoRA)`, as `apply` does on the CPU. `x` is bf16.
fn apply(dev: &mut dyn Device, lin: &LinW, x: DevPtr, t: usize, out: DevPtr, runs: &[Run], acts: &Acts) -> Result<()> {
    let (inp, o) = (lin.inp, lin.out);
    // SAFETY: `x` holds t x inp bf16 (the act buffer is sized for the widest GEMM input), `out` t x o f32, the
    // weight o x inp bf16 (or quantized, with the dequant scratch sized for the largest projection whenever
    // max_tokens exceeds the GEMV's rows) and the bias o f32; the output buffers never alias the inputs.
    unsafe {
        match &lin.w {
            LinWeight::Bf16(w) => dev.gemm_bf16(t, o, inp, x, w.ptr(), out, 1.0, 0.0)?,
            // The scratch buffer holds the largest quantized weight in bf16 when calls may exceed the GEMV's rows.
            LinWeight::Quant(q) => q.matmul(dev, x, t, out, acts.dequant.ptr())?,
        }
        if let Some(b) = &lin.bias {
            tf::bias(dev, out, b.ptr(), o, t)?;
        }
    }
    let (lora_f32, lora_bf16) = (acts.lora_f32.ptr(), acts.lora_bf16.ptr());
    for run in runs {
        let Some(Some(p)) = run.adapter.and_then(|a| lin.lora.get(a)) else { continue };
        let xs = x + (run.start * inp * 2) as DevPtr;
        let os = out + (run.start * o * 4) as DevPtr;
        // SAFETY: the run's rows lie inside the t rows above; the LoRA buffers hold t x max rank values; beta = 1
        // adds the scaled update to the run's rows of `out`.
        unsafe {
            dev.gemm_bf16(run.len, p.r, inp, xs, p.a.ptr(), lora_f32, 1.0, 0.0)?;
            tf::cast_bf16(dev, lora_f32, run.len * p.r, lora_bf16)?;
            dev.gemm_bf16(run.len, o, p.r, lora_bf16, p.b.ptr(), os, p.scale, 1.0)?;
        }
    }
    Ok(())
}

impl GpuDecoder {
    /// Uploads `model` to `gpu` and allocates a KV cache of `slots` sequences of up to `max_seq` tokens and
    /// buffers for up to `max_tokens` tokens per call (and as many logit rows, or `slots` when larger).
    pub fn new(gpu: Gpu, model: Arc<Model>, slots: usize, max_seq: usize, max_tokens: usize) -> Result<Self> {
        Self::with_weights(gpu, model, slots, max_seq, max_tokens, GpuWeights::Bf16)
    }

    /// [`GpuDecoder::new`] with the linear layers held as `weights` (see [`GpuWeights`]).
    pub fn with_weights(
        mut gpu: Gpu,
        model: Arc<Model>,
        slots: usize,
        max_seq: usize,
        max_tokens: usize,
        weights: GpuWeights,
    ) -> Result<Self> {
        let c = &model.config;
        if slots == 0 || max_seq == 0 || max_tokens == 0 {
            return Err(bad(format!(
                "a GPU decoder needs slots, max_seq and max_tokens >= 1, got {slots}, {max_seq} and {max_tokens}"
            )));
        }
        if c.head_dim > MAX_HEAD_DIM || !c.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "the GPU attention kernel takes an even head_dim <= {MAX_HEAD_DIM}, the model has {}",
                c.head_dim
            )));
        }
        let (h, qd, kvd, ffn, vocab) =
            (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, c.vocab_size);
        let max_rows = max_tokens.max(slots);
        let widest = h.max(qd).max(ffn);
        if weights == GpuWeights::Int4 && [h, qd, kvd, ffn].iter().any(|d| !d.is_multiple_of(8)) {
            return Err(bad(format!(
                "{}: gpu_weights int4 packs 8 weights per word, so hidden_size ({h}), the q / kv widths ({qd}, \
                 {kvd}) and intermediate_size ({ffn}) must be multiples of 8; use gpu_weights int8",
                model.source
            )));
        }
        // The kernels index a call's activations and a slot's positions with int.
        for (what, n) in [
            ("max_tokens x widest activation", max_tokens * widest),
            ("logit rows x vocabulary", max_rows * vocab),
            ("max_seq", max_seq),
            ("slots", slots),
        ] {
            if n > i32::MAX as usize {
                return Err(bad(format!("{what} = {n} is too large for the GPU kernels")));
            }
        }
        let max_r = model.max_lora_rank();
        let t = max_tokens;
        // The largest projection, dequantized to bf16 for calls above the GEMV's rows.
        let quantized = weights != GpuWeights::Bf16;
        let dequant = if quantized && t > GEMV_MAX_TOKENS { h * qd.max(ffn).max(kvd) * 2 } else { 0 };
        // The activation buffers' bytes in the order of `Acts`' fields: summed for the check below, then allocated.
        let act_bytes = [
            t * h * 4,
            t * widest * 2,
            t * qd * 4,
            t * kvd * 4,
            t * kvd * 4,
            t * h * 4,
            t * ffn * 4,
            t * ffn * 4,
            t * max_r * 4,
            t * max_r * 2,
            max_rows * vocab * 4,
            t * 4,
            t * 4,
            t * 4,
            max_rows * 4,
            dequant,
        ];
        let cache = c.num_layers * slots * max_seq * kvd * 4;
        // Before the first upload: the weights (bf16, or the projections' quantized bytes; norms f32, counted as
        // bf16: a few KB), the f32 KV cache and the activations against the card's free memory, so that a model
        // that cannot fit names both sizes and the setting that shrinks it.
        let shapes = [(qd, h), (kvd, h), (kvd, h), (h, qd), (ffn, h), (ffn, h), (h, ffn)];
        let per_layer = |kind| shapes.iter().map(|&(o, i)| QuantMatrix::bytes_for(kind, o, i)).sum::<u128>();
        let projections = c.num_layers as u128 * per_layer(weights);
        let others = super::memory::parameters(c) - c.num_layers as u128 * per_layer(GpuWeights::Bf16) / 2;
        let weight_bytes = (others + model.lora_parameters() as u128) * 2 + projections;
        let need = weight_bytes + 2 * cache as u128 + act_bytes.iter().sum::<usize>() as u128;
        let free = gpu.device().free_memory()?.map(|b| b as u128);
        let place = format!("on {}", gpu.describe());
        let what = format!("its weights ({weights}), KV cache and buffers");
        super::memory::check_fits(&model.source, &what, need, &place, free).map_err(|e| match (e, weights) {
            (CageError::Model { model, msg }, GpuWeights::Bf16 | GpuWeights::Int8) => {
                CageError::Model { model, msg: format!("{msg}, or gpu_weights int8 / int4 (fewer bytes per weight)") }
            }
            (e, _) => e,
        })?;
        // Every buffer frees itself, so an error part way leaves nothing allocated.
        let dev = gpu.device();
        let mut layers = Vec::with_capacity(model.layers.len());
        for (li, l) in model.layers.iter().enumerate() {
            let lin = |dev: &mut dyn Device, l: &Linear, name: &str| {
                upload_linear(dev, l, weights, &format!("{}: model.layers.{li}.{name}", model.source))
            };
            layers.push(LayerW {
                ln1: upload_f32(dev, &l.ln1)?,
                ln2: upload_f32(dev, &l.ln2)?,
                q: lin(dev, &l.q, "self_attn.q_proj")?,
                k: lin(dev, &l.k, "self_attn.k_proj")?,
                v: lin(dev, &l.v, "self_attn.v_proj")?,
                o: lin(dev, &l.o, "self_attn.o_proj")?,
                gate: lin(dev, &l.gate, "mlp.gate_proj")?,
                up: lin(dev, &l.up, "mlp.up_proj")?,
                down: lin(dev, &l.down, "mlp.down_proj")?,
            });
        }
        let [x, act, q, k, v, tmp, gate, up, lora_f32, lora_bf16, logits, tokens, pos, slot, rows, dequant] = act_bytes;
        let acts = Acts {
            x: DevBuf::alloc(dev, x)?,
            act: DevBuf::alloc(dev, act)?,
            q: DevBuf::alloc(dev, q)?,
            k: DevBuf::alloc(dev, k)?,
            v: DevBuf::alloc(dev, v)?,
            tmp: DevBuf::alloc(dev, tmp)?,
            gate: DevBuf::alloc(dev, gate)?,
            up: DevBuf::alloc(dev, up)?,
            lora_f32: DevBuf::alloc(dev, lora_f32)?,
            lora_bf16: DevBuf::alloc(dev, lora_bf16)?,
            logits: DevBuf::alloc(dev, logits)?,
            tokens: DevBuf::alloc(dev, tokens)?,
            pos: DevBuf::alloc(dev, pos)?,
            slot: DevBuf::alloc(dev, slot)?,
            rows: DevBuf::alloc(dev, rows)?,
            dequant: DevBuf::alloc(dev, dequant)?,
        };
        Ok(GpuDecoder {
            embed: upload_bf16(dev, &model.embed)?,
            lm_head: model.lm_head.as_ref().map(|l| upload_bf16(dev, &l.w)).transpose()?,
            norm: upload_f32(dev, &model.norm)?,
            inv_freq: upload_f32(dev, &c.inv_freq())?,
            layers,
            kc: DevBuf::alloc(dev, cache)?,
            vc: DevBuf::alloc(dev, cache)?,
            acts,
            gpu,
            lens: vec![0; slots],
            max_seq,
            max_tokens,
            max_rows,
            h_tokens: Vec::with_capacity(max_tokens),
            h_pos: Vec::with_capacity(max_tokens),
            h_slot: Vec::with_capacity(max_tokens),
            h_rows: Vec::with_capacity(max_rows),
            seen: vec![false; slots],
            runs: Vec::with_capacity(slots),
            host_logits: vec![0.0; max_rows * vocab],
            host_hidden: vec![0.0; 2 * max_rows * h],
            model,
        })
    }

    /// The model the decoder was made from (its weights on the device are this model's, rounded to bf16).
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The device, to run further kernels (candidates, equilibrium) on the logits of
    /// [`GpuDecoder::forward_device`] on the same stream.
    pub fn gpu(&mut self) -> &mut Gpu {
        &mut self.gpu
    }

    /// Checks a batch against the cache, the buffers and the model, before anything runs, so that a rejected
    /// call leaves the decoder as it was; lays out the tokens in the host staging vectors. Returns the logit
    /// rows.
    fn prepare(&mut self, seqs: &[Seq], at: LogitsAt) -> Result<usize> {
        let c = &self.model.config;
        let vocab = c.vocab_size;
        let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if seqs.is_empty() || t == 0 {
            return Err(bad("forward needs at least one token".into()));
        }
        if t > self.max_tokens {
            return Err(bad(format!(
                "{t} tokens in one forward call, the GPU decoder was sized for {}",
                self.max_tokens
            )));
        }
        let rows = if at == LogitsAt::All { t } else { seqs.len() };
        if rows > self.max_rows {
            return Err(bad(format!("{rows} logit rows requested, the GPU decoder was sized for {}", self.max_rows)));
        }
        self.seen.fill(false);
        self.runs.clear();
        self.h_tokens.clear();
        self.h_pos.clear();
        self.h_slot.clear();
        self.h_rows.clear();
        let mut start = 0;
        for s in seqs {
            let slot = s.slot;
            if slot >= self.lens.len() {
                return Err(bad(format!("slot {slot} does not exist (the cache has {})", self.lens.len())));
            }
            if std::mem::replace(&mut self.seen[slot], true) {
                return Err(bad(format!("slot {slot} appears twice in one batch")));
            }
            if s.tokens.is_empty() {
                return Err(bad(format!("sequence in slot {slot} has no new tokens")));
            }
            let end = self.lens[slot] + s.tokens.len();
            if end > self.max_seq {
                return Err(bad(format!(
                    "slot {slot} would hold {end} tokens, the cache was sized for {}",
                    self.max_seq
                )));
            }
            if let Some(a) = s.adapter
                && a >= self.model.adapters.len()
            {
                return Err(bad(format!(
                    "adapter id {a} is not attached (the model has {})",
                    self.model.adapters.len()
                )));
            }
            for (i, &tok) in s.tokens.iter().enumerate() {
                if tok as usize >= vocab {
                    return Err(bad(format!("token id {tok} is outside the vocabulary ({vocab})")));
                }
                self.h_tokens.push(tok as i32);
                self.h_pos.push((self.lens[slot] + i) as i32);
                self.h_slot.push(slot as i32);
            }
            self.runs.push(Run { start, len: s.tokens.len(), adapter: s.adapter });
            start += s.tokens.len();
            self.h_rows.push((start - 1) as i32);
        }
        Ok(rows)
    }

    /// Runs the batch and leaves its logits on the device (see [`DeviceLogits`]): the entry point for decoding
    /// loops whose next kernels (top-k, equilibrium) run on the same device. The work is queued on the device's
    /// stream; kernels launched next on that stream see the logits.
    pub fn forward_device(&mut self, seqs: &[Seq], at: LogitsAt) -> Result<DeviceLogits> {
        let rows = self.run(seqs, at, true)?;
        Ok(DeviceLogits { ptr: self.acts.logits.ptr(), rows, vocab: self.model.config.vocab_size })
    }

    /// Runs the batch and returns the final hidden state (after the final norm) of the last new token of each
    /// sequence, `[seqs, hidden]` f32 on the host: what a score head reads (see [`super::score`]). The f32
    /// residual rows come back and are normed on the host, because the device's final norm writes the bf16
    /// input of the LM-head GEMM.
    pub fn forward_hidden(&mut self, seqs: &[Seq]) -> Result<&[f32]> {
        let rows = self.run(seqs, LogitsAt::Last, false)?;
        let h = self.model.config.hidden_size;
        let (x, dev) = (self.acts.x.ptr(), self.gpu.device());
        let (raw, normed) = self.host_hidden.split_at_mut(self.max_rows * h);
        for (i, &row) in self.h_rows.iter().enumerate() {
            let dst = bytemuck::cast_slice_mut(&mut raw[i * h..(i + 1) * h]);
            dev.download(x + (row as usize * h * 4) as DevPtr, dst)?;
        }
        let eps = self.model.config.rms_norm_eps;
        super::linalg::rms_norm(&raw[..rows * h], &self.model.norm, eps, &mut normed[..rows * h]);
        Ok(&normed[..rows * h])
    }

    /// The layers of one batch, and with `logits` the final norm and the LM head; returns the rows.
    fn run(&mut self, seqs: &[Seq], at: LogitsAt, logits: bool) -> Result<usize> {
        let rows = self.prepare(seqs, at)?;
        let Self { model, gpu, layers, acts: a, runs, lens, .. } = self;
        let c = &model.config;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (kvd, ffn, vocab) = (nkv * hd, c.intermediate_size, c.vocab_size);
        let heads = Heads { q: nh, kv: nkv, dim: hd };
        let t = self.h_tokens.len();
        let eps = c.rms_norm_eps;
        let dev = gpu.device();
        let (tokens, pos, slot) = (a.tokens.ptr(), a.pos.ptr(), a.slot.ptr());
        dev.upload(tokens, bytemuck::cast_slice(&self.h_tokens))?;
        dev.upload(pos, bytemuck::cast_slice(&self.h_pos))?;
        dev.upload(slot, bytemuck::cast_slice(&self.h_slot))?;
        // Rows of the logits: every token, or the last of each sequence (listed in `rows`).
        let rows_ptr = match at {
            LogitsAt::All => 0,
            LogitsAt::Last => {
                dev.upload(a.rows.ptr(), bytemuck::cast_slice(&self.h_rows))?;
                a.rows.ptr()
            }
        };
        let (x, act, tmp) = (a.x.ptr(), a.act.ptr(), a.tmp.ptr());
        let layer_cache = (lens.len() * self.max_seq * kvd * 4) as DevPtr;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed).ptr();
        // SAFETY: every buffer was allocated by `new` for max_tokens tokens (max_rows logit rows) of this model,
        // and `prepare` checked the call against those sizes, the cache's slots and positions and the vocabulary.
        unsafe {
            tf::embed(dev, self.embed.ptr(), tokens, t, h, x)?;
            for (li, l) in layers.iter().enumerate() {
                let offset = li as DevPtr * layer_cache;
                let cache =
                    KvCache { k: self.kc.ptr() + offset, v: self.vc.ptr() + offset, slot, pos, max_seq: self.max_seq };
                tf::rmsnorm(dev, x, 0, l.ln1.ptr(), eps, h, t, act)?;
                apply(dev, &l.q, act, t, a.q.ptr(), runs, a)?;
                apply(dev, &l.k, act, t, a.k.ptr(), runs, a)?;
                apply(dev, &l.v, act, t, a.v.ptr(), runs, a)?;
                tf::rope(dev, a.q.ptr(), pos, self.inv_freq.ptr(), t, nh, hd)?;
                tf::rope(dev, a.k.ptr(), pos, self.inv_freq.ptr(), t, nkv, hd)?;
                tf::kv_store(dev, &cache, a.k.ptr(), a.v.ptr(), t, kvd)?;
                // Sliding window of this layer (0: full causal attention), transformers' semantics.
                tf::attention(dev, &cache, a.q.ptr(), t, heads, c.window(li).unwrap_or(0), act)?;
                apply(dev, &l.o, act, t, tmp, runs, a)?;
                tf::add(dev, x, tmp, t * h)?;
                tf::rmsnorm(dev, x, 0, l.ln2.ptr(), eps, h, t, act)?;
                apply(dev, &l.gate, act, t, a.gate.ptr(), runs, a)?;
                apply(dev, &l.up, act, t, a.up.ptr(), runs, a)?;
                tf::silu_mul(dev, a.gate.ptr(), a.up.ptr(), t * ffn, act)?;
                apply(dev, &l.down, act, t, tmp, runs, a)?;
                tf::add(dev, x, tmp, t * h)?;
            }
            if logits {
                // Final norm only on the rows that get logits.
                tf::rmsnorm(dev, x, rows_ptr, self.norm.ptr(), eps, h, rows, act)?;
                dev.gemm_bf16(rows, vocab, h, act, lm_head, a.logits.ptr(), 1.0, 0.0)?;
            }
        }
        for r in runs.iter() {
            lens[self.h_slot[r.start] as usize] += r.len;
        }
        Ok(rows)
    }
}

impl Decoder for GpuDecoder {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }
    fn transfers(&self) -> crate::gpu::device::Transfers {
        self.gpu.transfers()
    }
    fn as_gpu(&mut self) -> Option<&mut GpuDecoder> {
        Some(self)
    }
    fn slots(&self) -> usize {
        self.lens.len()
    }
    fn slot_len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }
    fn reset(&mut self, slot: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = 0;
        }
    }
    fn forward(&mut self, seqs: &[Seq], at: LogitsAt) -> Result<&[f32]> {
        let out = self.forward_device(seqs, at)?;
        let n = out.rows * out.vocab;
        self.gpu.device().download(out.ptr, bytemuck::cast_slice_mut(&mut self.host_logits[..n]))?;
        Ok(&self.host_logits[..n])
    }
}
