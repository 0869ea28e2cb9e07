//! GPU forward pass: the same batches, KV-cache slots and logits as the CPU [`super::forward`], behind the same
//! [`Decoder`] trait, on a [`Gpu`] (a CUDA device, or the host emulation in tests).
//!
//! - Weights are uploaded once, when the decoder is made: matrices (embedding, projections, LM head, unmerged
//!   LoRA pairs) in bf16, norms, biases and the RoPE frequencies in f32. Merged adapters need nothing special
//!   (merge before making the decoder); unmerged ones run per row like on the CPU.
//! - With `gpu_weights` int8 / int4 ([`GpuDecoder::with_weights`]) the projections are quantized at upload and
//!   multiplied by kernels/quant.cu (src/gpu/quant.rs); the embedding, LM head and LoRA pairs stay bf16. With
//!   `stored`, GGUF blocks (`import-gguf --keep-quantized`) go up as they are, other projections in bf16.
//! - GEMMs go through [`Device::gemm_bf16`] (cuBLAS, bf16 inputs, f32 accumulation); everything else is one
//!   kernel of `kernels/transformer.cu` per step of the CPU forward, launched by `src/gpu/transformer.rs`.
//!   Since cuBLAS multiplies bf16 by bf16, the activations entering each GEMM are rounded to bf16, the residual
//!   stream and everything else stay f32.
//! - The q / k / v projections are one GEMM on their weights stacked at upload (`[q + k + v, hidden]`), gate and
//!   up another (`[2 ffn, hidden]`): one weight read and one launch instead of three and two. Unmerged LoRA
//!   pairs of those projections add their update to their slice of the fused output (`cage_tf_add_cols`).
//! - The KV cache lives on the device with the CPU's layout (`[layer][slot][position][kv_dim]`), in f32 by
//!   default: no rounding of keys and values, which keeps the GPU within bf16 activation rounding of the CPU
//!   (see tests/model_gpu.rs). [`KvCacheType::Bf16`] halves its bytes (more rows or longer contexts fit) at the
//!   cost of one bf16 rounding of each key and value.
//! - Attention is one pass per (token, head) for prefill and large batches, split-K for decode calls with few
//!   (token, head) pairs and long contexts: [`crate::gpu::attention_splits`] chooses, from the call's longest
//!   context; the partial states go to a fixed scratch buffer ([`crate::gpu::attention_scratch_bytes`]).
//! - Every activation buffer is allocated at construction for `max_tokens` tokens per call: a forward call
//!   uploads only its token ids, positions, slots and logit rows, packed in one staged copy that does not wait,
//!   and allocates nothing on the device. [`GpuDecoder::stage_device`] and [`GpuDecoder::launch_staged`] split
//!   a call in two, so that the launches can be captured into a graph.
//! - [`GpuDecoder::forward_device`] leaves the logits on the device (f32, row-major `[rows, vocab]`), where
//!   [`Gpu::prepare_candidates_device`] and the equilibrium kernels read them without a copy; the trait's
//!   [`Decoder::forward`] downloads them.
//!
//! [`bf16_weights`] gives the model the GPU effectively runs (weights rounded to bf16): a CPU decoder on it
//! differs from the GPU only by the rounding of the GEMM inputs, which tests/model_gpu.rs's reference mirrors.

use super::devquant::{self, GpuWeights, QuantMatrix};
use super::forward::{Decoder, LogitsAt, Seq};
use super::llama::{Linear, Model};
use super::weight::Weight;
use crate::backend::Backend;
use crate::error::{CageError, Result};
use crate::gpu::device::{DevBuf, DevPtr, Device};
use crate::gpu::quant::{GEMV_MAX_TOKENS, QuantLinear};
use crate::gpu::transformer::{self as tf, Heads, KvCache};
use crate::gpu::{Gpu, KvCacheType};
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
    let mut m = model.to_f32_weights();
    round(m.embed.make_f32());
    let lins = m
        .layers
        .iter_mut()
        .flat_map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down])
        .chain(m.lm_head.as_mut());
    for lin in lins {
        round(lin.w.make_f32());
        for p in lin.lora.iter_mut().flatten() {
            round(&mut p.a);
            round(&mut p.b);
        }
    }
    m
}

/// A decoder for `model` on `device` with `slots` KV-cache slots of `max_seq` positions and room for
/// `max_tokens` tokens per forward call (an f32 KV cache on a GPU).
pub fn new_decoder(
    device: Backend,
    model: Arc<Model>,
    slots: usize,
    max_seq: usize,
    max_tokens: usize,
) -> Result<Box<dyn Decoder + Send>> {
    new_decoder_with(device, model, slots, max_seq, max_tokens, GpuOptions::default())
}

/// How a GPU decoder holds its KV cache and its linear layers; the defaults are the reference (f32 cache, bf16
/// weights).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// The KV cache's element type.
    pub kv_cache: KvCacheType,
    /// The linear layers' format.
    pub weights: GpuWeights,
}

/// [`new_decoder`] with a GPU decoder held as `opts` says. The CPU decoder's KV cache is f32 whatever
/// `opts.kv_cache` says; quantized `opts.weights` on the CPU is an error (the CPU decoder reads the weights as
/// loaded), rather than a setting silently ignored.
pub fn new_decoder_with(
    device: Backend,
    model: Arc<Model>,
    slots: usize,
    max_seq: usize,
    max_tokens: usize,
    opts: GpuOptions,
) -> Result<Box<dyn Decoder + Send>> {
    let weights = opts.weights;
    let gpu = match device {
        Backend::Cpu if weights != GpuWeights::Bf16 => {
            return Err(bad(format!(
                "gpu_weights {weights} applies to a model on a GPU (model_device cuda or emulation); the CPU \
                 decoder reads the weights as loaded"
            )));
        }
        Backend::Cpu => return Ok(Box::new(super::CpuDecoder::new(model, slots, max_seq, max_tokens))),
        Backend::Cuda => Gpu::cuda(0)?,
        Backend::Emulation => Gpu::emulated(),
        Backend::Auto => return new_decoder_with(device.resolve(), model, slots, max_seq, max_tokens, opts),
    };
    Ok(Box::new(GpuDecoder::with_options(gpu, model, slots, max_seq, max_tokens, opts)?))
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

/// One unmerged LoRA pair on the device, updating `width` output columns from `col` on: a slice of a fused
/// projection, or the whole output.
struct LoraW {
    a: DevBuf,
    b: DevBuf,
    r: usize,
    scale: f32,
    col: usize,
    width: usize,
}

/// A linear layer's weight on the device: bf16 for cuBLAS, or int8 / int4 for the kernels of kernels/quant.cu.
enum LinWeight {
    Bf16(DevBuf),
    Quant(QuantLinear),
}

/// A linear layer on the device: one projection, or several fused (their weights stacked row-wise, so their
/// outputs are column slices of one output).
struct LinW {
    w: LinWeight,
    bias: Option<DevBuf>,
    inp: usize,
    out: usize,
    /// By adapter id, the pairs of the fused projections it targets.
    lora: Vec<Vec<LoraW>>,
}

struct LayerW {
    ln1: DevBuf,
    ln2: DevBuf,
    /// q / k / v fused: `[q_dim + 2 kv_dim, hidden]`.
    qkv: LinW,
    o: LinW,
    /// gate / up fused: `[2 ffn, hidden]`.
    gate_up: LinW,
    down: LinW,
}

/// Contiguous tokens of one sequence in a call.
#[derive(Clone, Copy, Debug, PartialEq)]
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
    /// Fused q / k / v output, f32 `[t, q_dim + 2 kv_dim]`.
    qkv: DevBuf,
    /// Output of o / down before the residual add, f32 `[t, hidden]`.
    tmp: DevBuf,
    /// Fused gate / up output, f32 `[t, 2 ffn]`.
    gu: DevBuf,
    /// LoRA `x A^T`, f32 and bf16 `[t, max rank]`.
    lora_f32: DevBuf,
    lora_bf16: DevBuf,
    /// A slice's LoRA update before it is added to the fused output, f32 `[t, max(q_dim, ffn)]` (empty without
    /// adapters).
    lora_out: DevBuf,
    /// Split-K attention's partial states ([`crate::gpu::attention_scratch_bytes`]).
    parts: DevBuf,
    /// f32 `[max_rows, vocab]`.
    logits: DevBuf,
    /// The call's inputs packed for one copy: token ids, positions and KV slots (t ints each), then the logit
    /// rows (see [`Packed`]).
    inputs: DevBuf,
    /// bf16 scratch for a quantized weight dequantized before a GEMM of more than GEMV_MAX_TOKENS rows (empty
    /// with bf16 weights or when no call is that large).
    dequant: DevBuf,
}

/// Where the packed inputs of a call of `t` tokens lie in [`Acts::inputs`] (int offsets): one upload per call.
struct Packed;

impl Packed {
    fn tokens(base: DevPtr) -> DevPtr {
        base
    }
    fn pos(base: DevPtr, t: usize) -> DevPtr {
        base + (t * 4) as DevPtr
    }
    fn slot(base: DevPtr, t: usize) -> DevPtr {
        base + (2 * t * 4) as DevPtr
    }
    fn rows(base: DevPtr, t: usize) -> DevPtr {
        base + (3 * t * 4) as DevPtr
    }
}

/// What the launches of a forward call depend on besides device memory: two calls of equal shape enqueue the
/// same kernels with the same parameters (a captured graph of one replays the other).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardShape {
    t: usize,
    rows: usize,
    all: bool,
    logits: bool,
    runs: Vec<Run>,
    /// Each layer's split-K attention split (from the call's longest context and the layer's window): a launch
    /// parameter, so a graph captured at one split is not replayed at another.
    splits: Vec<usize>,
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
    kv: KvCacheType,
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
    /// The four above packed for the call's one upload.
    h_inputs: Vec<i32>,
    /// The shape of the call staged last ([`GpuDecoder::stage_device`]).
    staged: ForwardShape,
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

/// A `[rows, cols]` matrix in bf16 from any format it is held in, converted row by row (no f32 copy).
fn upload_weight(dev: &mut dyn Device, w: &Weight, cols: usize) -> Result<DevBuf> {
    let h = w.to_bf16(cols);
    let mut b = DevBuf::alloc(dev, h.len() * 2)?;
    b.upload(dev, &h)?;
    Ok(b)
}

/// The weights of `parts` (`inp` columns each) stacked row-wise in bf16, converted row by row from any format.
fn upload_stacked_bf16(dev: &mut dyn Device, parts: &[&Linear], inp: usize) -> Result<DevBuf> {
    let h: Vec<half::bf16> = parts.iter().flat_map(|l| l.w.to_bf16(inp)).collect();
    let mut b = DevBuf::alloc(dev, h.len() * 2)?;
    b.upload(dev, &h)?;
    Ok(b)
}

/// Uploads `parts` (one projection, or several of the same input to fuse) as one [`LinW`]: weights stacked
/// row-wise, in bf16 or quantized as `weights` says (round to nearest; int8's scales are per row and int4's
/// groups lie along a row, so the stacked matrix quantizes exactly as its parts would apart), biases likewise
/// (zeros for a part without one, none when no part has one), each part's adapters on its slice of the output.
/// GPTQ / AWQ int4 parts go to the int4 kernels as stored under `int4` and `stored` (stacked losslessly, see
/// [`super::gptq::stack`]); under `bf16` they are dequantized. `stored` also keeps GGUF blocks as they are (parts
/// of one type stacked, of different types kept apart, see [`devquant::GgufMatrix`]) and uploads the projections
/// held in any other format in bf16. `name` goes into errors.
fn upload_linear(dev: &mut dyn Device, parts: &[&Linear], weights: GpuWeights, name: &str) -> Result<LinW> {
    let inp = parts[0].inp;
    let out: usize = parts.iter().map(|l| l.out).sum();
    let stored = match weights {
        GpuWeights::Int4 | GpuWeights::Stored => {
            super::gptq::stack(&parts.iter().map(|l| &l.w).collect::<Vec<_>>(), name)?
        }
        _ => None,
    };
    let w = match (weights, parts, stored) {
        (_, _, Some(m)) => LinWeight::Quant(QuantLinear::upload(dev, &QuantMatrix::Int4(m))?),
        (GpuWeights::Bf16, _, _) => LinWeight::Bf16(upload_stacked_bf16(dev, parts, inp)?),
        (GpuWeights::Stored, _, None) => {
            let ws: Vec<(&Weight, usize)> = parts.iter().map(|l| (&l.w, l.out)).collect();
            match devquant::stored(&ws, inp, name)? {
                Some(q) => LinWeight::Quant(QuantLinear::upload(dev, &q)?),
                None => LinWeight::Bf16(upload_stacked_bf16(dev, parts, inp)?),
            }
        }
        _ => {
            // Each part dequantized in parallel straight into its rows of the stacked matrix.
            let mut f = vec![0f32; out * inp];
            let mut at = 0;
            for l in parts {
                l.w.to_f32_into(&mut f[at..at + l.out * inp]);
                at += l.out * inp;
            }
            match QuantMatrix::quantize(weights, &f, out, inp, name)? {
                None => LinWeight::Bf16(upload_bf16(dev, &f)?),
                Some(q) => LinWeight::Quant(QuantLinear::upload(dev, &q)?),
            }
        }
    };
    let bias = if parts.iter().any(|l| l.bias.is_some()) {
        let b: Vec<f32> = parts.iter().flat_map(|l| l.bias.clone().unwrap_or_else(|| vec![0.0; l.out])).collect();
        Some(upload_f32(dev, &b)?)
    } else {
        None
    };
    let adapters = parts.iter().map(|l| l.lora.len()).max().unwrap_or(0);
    let mut lora: Vec<Vec<LoraW>> = (0..adapters).map(|_| Vec::new()).collect();
    let mut col = 0;
    for l in parts {
        for (id, p) in l.lora.iter().enumerate() {
            if let Some(p) = p {
                let (a, b) = (upload_bf16(dev, &p.a)?, upload_bf16(dev, &p.b)?);
                lora[id].push(LoraW { a, b, r: p.r, scale: p.scale, col, width: l.out });
            }
        }
        col += l.out;
    }
    Ok(LinW { w, bias, inp, out, lora })
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
            LinWeight::Quant(q) => {
                if t > GEMV_MAX_TOKENS && q.scratch_bytes() > acts.dequant.bytes() {
                    return Err(bad(format!(
                        "a {} x {} quantized projection needs {} bytes of dequantization scratch, the decoder has {}",
                        lin.out,
                        lin.inp,
                        q.scratch_bytes(),
                        acts.dequant.bytes()
                    )));
                }
                q.matmul(dev, x, t, out, acts.dequant.ptr())?
            }
        }
        if let Some(b) = &lin.bias {
            tf::bias(dev, out, b.ptr(), o, t)?;
        }
    }
    let (lora_f32, lora_bf16, lora_out) = (acts.lora_f32.ptr(), acts.lora_bf16.ptr(), acts.lora_out.ptr());
    for run in runs {
        let Some(pairs) = run.adapter.and_then(|a| lin.lora.get(a)) else { continue };
        let xs = x + (run.start * inp * 2) as DevPtr;
        let os = out + (run.start * o * 4) as DevPtr;
        for p in pairs {
            // SAFETY: the run's rows lie inside the t rows above; the LoRA buffers hold t x max rank values and
            // lora_out t x the widest slice; beta = 1 adds the scaled update to the run's rows of `out`, and a
            // slice's update goes through lora_out to its columns.
            unsafe {
                dev.gemm_bf16(run.len, p.r, inp, xs, p.a.ptr(), lora_f32, 1.0, 0.0)?;
                tf::cast_bf16(dev, lora_f32, run.len * p.r, lora_bf16)?;
                if p.width == o {
                    dev.gemm_bf16(run.len, o, p.r, lora_bf16, p.b.ptr(), os, p.scale, 1.0)?;
                } else {
                    dev.gemm_bf16(run.len, p.width, p.r, lora_bf16, p.b.ptr(), lora_out, p.scale, 0.0)?;
                    tf::add_cols(dev, os, o, p.col, lora_out, p.width, run.len)?;
                }
            }
        }
    }
    Ok(())
}

impl GpuDecoder {
    /// Uploads `model` to `gpu` and allocates an f32 KV cache of `slots` sequences of up to `max_seq` tokens and
    /// buffers for up to `max_tokens` tokens per call (and as many logit rows, or `slots` when larger).
    pub fn new(gpu: Gpu, model: Arc<Model>, slots: usize, max_seq: usize, max_tokens: usize) -> Result<Self> {
        Self::with_options(gpu, model, slots, max_seq, max_tokens, GpuOptions::default())
    }

    /// [`GpuDecoder::new`] with a KV cache of `kv` values.
    pub fn with_kv_cache(
        gpu: Gpu,
        model: Arc<Model>,
        slots: usize,
        max_seq: usize,
        max_tokens: usize,
        kv: KvCacheType,
    ) -> Result<Self> {
        let opts = GpuOptions { kv_cache: kv, ..GpuOptions::default() };
        Self::with_options(gpu, model, slots, max_seq, max_tokens, opts)
    }

    /// [`GpuDecoder::new`] with the linear layers held as `weights` (see [`GpuWeights`]).
    pub fn with_weights(
        gpu: Gpu,
        model: Arc<Model>,
        slots: usize,
        max_seq: usize,
        max_tokens: usize,
        weights: GpuWeights,
    ) -> Result<Self> {
        let opts = GpuOptions { weights, ..GpuOptions::default() };
        Self::with_options(gpu, model, slots, max_seq, max_tokens, opts)
    }

    /// [`GpuDecoder::new`] with the KV cache and the linear layers held as `opts` says.
    pub fn with_options(
        mut gpu: Gpu,
        model: Arc<Model>,
        slots: usize,
        max_seq: usize,
        max_tokens: usize,
        opts: GpuOptions,
    ) -> Result<Self> {
        let GpuOptions { kv_cache: kv, weights } = opts;
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
        // A LoRA slice of a fused projection is at most q_dim or ffn wide.
        let slice = if max_r > 0 { qd.max(ffn) } else { 0 };
        // The largest (fused) projection, dequantized to bf16 for calls above the GEMV's rows: q / k / v or gate / up.
        // Whether `stored` keeps any projection quantized (GGUF blocks the kernels take, GPTQ / AWQ int4 codes).
        let has_blocks = model.layers.iter().flat_map(|l| l.linears()).any(|lin| match &lin.w {
            Weight::Quant { ty, .. } => devquant::gguf_on_gpu(*ty),
            Weight::Int4(_) => true,
            _ => false,
        });
        let quantized = match weights {
            GpuWeights::Bf16 => false,
            GpuWeights::Int8 | GpuWeights::Int4 => true,
            GpuWeights::Stored => has_blocks,
        };
        let dequant = if quantized && t > GEMV_MAX_TOKENS { h * (qd + 2 * kvd).max(2 * ffn) * 2 } else { 0 };
        // The activation buffers' bytes in the order of `Acts`' fields: summed for the check below, then allocated.
        let act_bytes = [
            t * h * 4,
            t * widest * 2,
            t * (qd + 2 * kvd) * 4,
            t * h * 4,
            t * 2 * ffn * 4,
            t * max_r * 4,
            t * max_r * 2,
            t * slice * 4,
            crate::gpu::attention_scratch_bytes(c.head_dim),
            max_rows * vocab * 4,
            (3 * t + max_rows) * 4,
            dequant,
        ];
        let cache = c.num_layers * slots * max_seq * kvd * kv.bytes();
        // Before the first upload: the weights (bf16, or the projections' quantized bytes; norms f32, counted as
        // bf16: a few KB), the KV cache and the activations against the card's free memory, so that a model that
        // cannot fit names both sizes and the setting that shrinks it.
        let shapes = [(qd, h), (kvd, h), (kvd, h), (h, qd), (ffn, h), (ffn, h), (h, ffn)];
        let per_layer = |kind| shapes.iter().map(|&(o, i)| QuantMatrix::bytes_for(kind, o, i)).sum::<u128>();
        let projections = match weights {
            // The real bytes of each projection as stored: GGUF blocks, GPTQ / AWQ codes (whose group size may not
            // be the 128 that `bytes_for` assumes), bf16 for any other format.
            GpuWeights::Stored => model
                .layers
                .iter()
                .flat_map(|l| l.linears())
                .map(|lin| devquant::stored_bytes(&lin.w, lin.out, lin.inp))
                .sum(),
            // A GPTQ / AWQ model under int4 uploads its stored codes.
            GpuWeights::Int4 => model
                .layers
                .iter()
                .flat_map(|l| l.linears())
                .map(|lin| matches!(lin.w, Weight::Int4(_)).then(|| devquant::stored_bytes(&lin.w, lin.out, lin.inp)))
                .sum::<Option<u128>>()
                .unwrap_or(c.num_layers as u128 * per_layer(weights)),
            _ => c.num_layers as u128 * per_layer(weights),
        };
        let others = super::memory::parameters(c) - c.num_layers as u128 * per_layer(GpuWeights::Bf16) / 2;
        let weight_bytes = (others + model.lora_parameters() as u128) * 2 + projections;
        let need = weight_bytes + 2 * cache as u128 + act_bytes.iter().sum::<usize>() as u128;
        let free = gpu.device().free_memory()?.map(|b| b as u128);
        let place = format!("on {}", gpu.describe());
        let what = format!("its weights ({weights}), KV cache and buffers");
        super::memory::check_fits(&model.source, &what, need, &place, free).map_err(|e| match (e, weights) {
            (CageError::Model { model, msg }, GpuWeights::Bf16 | GpuWeights::Int8) => {
                let blocks = if has_blocks { "gpu_weights stored (its GGUF blocks as they are), or " } else { "" };
                CageError::Model {
                    model,
                    msg: format!("{msg}, or {blocks}gpu_weights int8 / int4 (fewer bytes per weight)"),
                }
            }
            (CageError::Model { model, msg }, GpuWeights::Stored) => CageError::Model {
                model,
                msg: format!(
                    "{msg}, or gpu_weights int4 (half a byte per weight, re-quantized from the stored values)"
                ),
            },
            (e, _) => e,
        })?;
        // Every buffer frees itself, so an error part way leaves nothing allocated.
        let dev = gpu.device();
        let mut layers = Vec::with_capacity(model.layers.len());
        for (li, l) in model.layers.iter().enumerate() {
            let lin = |dev: &mut dyn Device, l: &[&Linear], name: &str| {
                upload_linear(dev, l, weights, &format!("{}: model.layers.{li}.{name}", model.source))
            };
            layers.push(LayerW {
                ln1: upload_f32(dev, &l.ln1)?,
                ln2: upload_f32(dev, &l.ln2)?,
                qkv: lin(dev, &[&l.q, &l.k, &l.v], "self_attn.q_proj/k_proj/v_proj")?,
                o: lin(dev, &[&l.o], "self_attn.o_proj")?,
                gate_up: lin(dev, &[&l.gate, &l.up], "mlp.gate_proj/up_proj")?,
                down: lin(dev, &[&l.down], "mlp.down_proj")?,
            });
        }
        let [x, act, qkv, tmp, gu, lora_f32, lora_bf16, lora_out, parts, logits, inputs, dequant] = act_bytes;
        let acts = Acts {
            x: DevBuf::alloc(dev, x)?,
            act: DevBuf::alloc(dev, act)?,
            qkv: DevBuf::alloc(dev, qkv)?,
            tmp: DevBuf::alloc(dev, tmp)?,
            gu: DevBuf::alloc(dev, gu)?,
            lora_f32: DevBuf::alloc(dev, lora_f32)?,
            lora_bf16: DevBuf::alloc(dev, lora_bf16)?,
            lora_out: DevBuf::alloc(dev, lora_out)?,
            parts: DevBuf::alloc(dev, parts)?,
            logits: DevBuf::alloc(dev, logits)?,
            inputs: DevBuf::alloc(dev, inputs)?,
            dequant: DevBuf::alloc(dev, dequant)?,
        };
        Ok(GpuDecoder {
            embed: upload_weight(dev, &model.embed, c.hidden_size)?,
            lm_head: model.lm_head.as_ref().map(|l| upload_weight(dev, &l.w, l.inp)).transpose()?,
            norm: upload_f32(dev, &model.norm)?,
            inv_freq: upload_f32(dev, &c.inv_freq())?,
            layers,
            kc: DevBuf::alloc(dev, cache)?,
            vc: DevBuf::alloc(dev, cache)?,
            kv,
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
            h_inputs: Vec::with_capacity(3 * max_tokens + max_rows),
            staged: ForwardShape::default(),
            seen: vec![false; slots],
            runs: Vec::with_capacity(slots),
            host_logits: vec![0.0; max_rows * vocab],
            host_hidden: vec![0.0; 2 * max_rows * h],
            model,
        })
    }

    /// The element type of the KV cache.
    pub fn kv_cache(&self) -> KvCacheType {
        self.kv
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
        let out = self.stage_device(seqs, at)?;
        self.launch_staged()?;
        Ok(out)
    }

    /// The first half of [`GpuDecoder::forward_device`]: checks the batch, uploads its inputs (one staged copy,
    /// no wait) and counts its tokens into the cache; [`GpuDecoder::launch_staged`] must follow, on the stream
    /// or into a graph ([`GpuDecoder::staged_shape`] says which graph stands for it).
    pub fn stage_device(&mut self, seqs: &[Seq], at: LogitsAt) -> Result<DeviceLogits> {
        let rows = self.stage(seqs, at, true)?;
        Ok(DeviceLogits { ptr: self.acts.logits.ptr(), rows, vocab: self.model.config.vocab_size })
    }

    /// The shape of the call staged last: two calls of equal shape launch the same kernels.
    pub fn staged_shape(&self) -> &ForwardShape {
        &self.staged
    }
    /// Runs the batch and returns the final hidden state (after the final norm) of the last new token of each
    /// sequence, `[seqs, hidden]` f32 on the host: what a score head reads (see [`super::score`]). The f32
    /// residual rows come back and are normed on the host, because the device's final norm writes the bf16
    /// input of the LM-head GEMM.
    pub fn forward_hidden(&mut self, seqs: &[Seq]) -> Result<&[f32]> {
        let rows = self.stage(seqs, LogitsAt::Last, false)?;
        self.launch_staged()?;
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

    /// Checks a batch, uploads its packed inputs in one staged copy and counts its tokens into the cache; with
    /// `logits` the launches will include the final norm and the LM head. Returns the rows.
    fn stage(&mut self, seqs: &[Seq], at: LogitsAt, logits: bool) -> Result<usize> {
        let rows = self.prepare(seqs, at)?;
        let t = self.h_tokens.len();
        self.h_inputs.clear();
        self.h_inputs.extend_from_slice(&self.h_tokens);
        self.h_inputs.extend_from_slice(&self.h_pos);
        self.h_inputs.extend_from_slice(&self.h_slot);
        // Rows of the logits: every token, or the last of each sequence.
        if at == LogitsAt::Last {
            self.h_inputs.extend_from_slice(&self.h_rows);
        }
        let inputs = self.acts.inputs.ptr();
        self.gpu.device().upload_staged(inputs, bytemuck::cast_slice(&self.h_inputs))?;
        for r in &self.runs {
            self.lens[self.h_slot[r.start] as usize] += r.len;
        }
        // The longest context of the call, which (with each layer's window) sets the attention's split.
        let max_ctx = self.h_pos.iter().max().map_or(0, |&p| p as usize + 1);
        let c = &self.model.config;
        let s = &mut self.staged;
        (s.t, s.rows, s.all, s.logits) = (t, rows, at == LogitsAt::All, logits);
        s.runs.clone_from(&self.runs);
        s.splits.clear();
        s.splits.extend((0..c.num_layers).map(|li| {
            let ctx = c.window(li).map_or(max_ctx, |w| if w > 0 { max_ctx.min(w) } else { max_ctx });
            tf::attention_splits(t, c.num_heads, ctx)
        }));
        Ok(rows)
    }

    /// Enqueues the layers of the staged batch, and with logits the final norm and the LM head: kernels and
    /// GEMMs only, so a graph capture can record them.
    pub fn launch_staged(&mut self) -> Result<()> {
        let Self { model, gpu, layers, acts: a, staged: shape, .. } = self;
        let c = &model.config;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (kvd, ffn, vocab) = (nkv * hd, c.intermediate_size, c.vocab_size);
        let heads = Heads { q: nh, kv: nkv, dim: hd };
        let (t, rows, runs) = (shape.t, shape.rows, &shape.runs[..]);
        if t == 0 {
            return Err(bad("launch_staged without a staged batch".into()));
        }
        let eps = c.rms_norm_eps;
        let dev = gpu.device();
        let inputs = a.inputs.ptr();
        let (tokens, pos, slot) = (Packed::tokens(inputs), Packed::pos(inputs, t), Packed::slot(inputs, t));
        let rows_ptr = if shape.all { 0 } else { Packed::rows(inputs, t) };
        let (x, act, tmp) = (a.x.ptr(), a.act.ptr(), a.tmp.ptr());
        let kv = self.kv;
        let layer_cache = (self.lens.len() * self.max_seq * kvd * kv.bytes()) as DevPtr;
        // The fused q / k / v output: q, k and v are column slices of rows `qkv_ld` wide.
        let qkv_ld = nh * hd + 2 * kvd;
        let (q, k, v) =
            (a.qkv.ptr(), a.qkv.ptr() + (nh * hd * 4) as DevPtr, a.qkv.ptr() + ((nh * hd + kvd) * 4) as DevPtr);
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed).ptr();
        // SAFETY: every buffer was allocated by `new` for max_tokens tokens (max_rows logit rows) of this model,
        // and `prepare` checked the call against those sizes, the cache's slots and positions and the vocabulary.
        unsafe {
            tf::embed(dev, self.embed.ptr(), tokens, t, h, x)?;
            for (li, l) in layers.iter().enumerate() {
                let offset = li as DevPtr * layer_cache;
                let (kc, vc) = (self.kc.ptr() + offset, self.vc.ptr() + offset);
                let cache = KvCache { k: kc, v: vc, slot, pos, max_seq: self.max_seq, ty: kv };
                tf::rmsnorm(dev, x, 0, l.ln1.ptr(), eps, h, t, act)?;
                apply(dev, &l.qkv, act, t, q, runs, a)?;
                tf::rope(dev, q, qkv_ld, pos, self.inv_freq.ptr(), t, nh, hd)?;
                tf::rope(dev, k, qkv_ld, pos, self.inv_freq.ptr(), t, nkv, hd)?;
                tf::kv_store(dev, &cache, k, v, qkv_ld, t, kvd)?;
                // Sliding window of this layer (0: full causal attention), transformers' semantics.
                let window = c.window(li).unwrap_or(0);
                let splits = shape.splits[li];
                tf::attention(dev, &cache, q, qkv_ld, t, heads, window, splits, a.parts.ptr(), act)?;
                apply(dev, &l.o, act, t, tmp, runs, a)?;
                tf::add(dev, x, tmp, t * h)?;
                tf::rmsnorm(dev, x, 0, l.ln2.ptr(), eps, h, t, act)?;
                apply(dev, &l.gate_up, act, t, a.gu.ptr(), runs, a)?;
                tf::silu_mul(dev, a.gu.ptr(), ffn, t, act)?;
                apply(dev, &l.down, act, t, tmp, runs, a)?;
                tf::add(dev, x, tmp, t * h)?;
            }
            if shape.logits {
                // Final norm only on the rows that get logits.
                tf::rmsnorm(dev, x, rows_ptr, self.norm.ptr(), eps, h, rows, act)?;
                dev.gemm_bf16(rows, vocab, h, act, lm_head, a.logits.ptr(), 1.0, 0.0)?;
            }
        }
        Ok(())
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
