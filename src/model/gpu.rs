//! GPU forward pass: the same batches, KV-cache slots and logits as the CPU [`super::forward`], behind the same
//! [`Decoder`] trait, on a [`Gpu`] (a CUDA device, or the host emulation in tests).
//!
//! - Weights are uploaded once, when the decoder is made: matrices (embedding, projections, LM head, unmerged
//!   LoRA pairs) in bf16, norms, biases and the RoPE frequencies in f32. Merged adapters need nothing special
//!   (merge before making the decoder); unmerged ones run per row like on the CPU.
//! - GEMMs go through [`Device::gemm_bf16`] (cuBLAS, bf16 inputs, f32 accumulation); everything else is one
//!   kernel of `kernels/transformer.cu` per step of the CPU forward. Since cuBLAS multiplies bf16 by bf16, the
//!   activations entering each GEMM are rounded to bf16, the residual stream and everything else stay f32.
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

use super::forward::{Decoder, LogitsAt, Seq};
use super::llama::{Linear, Model};
use crate::backend::Backend;
use crate::error::{CageError, Result};
use crate::gpu::Gpu;
use crate::gpu::device::{DevPtr, Device};
use std::ffi::c_void;
use std::sync::Arc;

/// Largest head dimension the attention kernel takes (`CAGE_TF_MAX_HD` in kernels/transformer.cu).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads of the attention kernel: `CAGE_TF_ATT_WARPS` warps.
const ATT_THREADS: u32 = 128;
/// Threads of the per-row kernels (norms, embedding, RoPE, cache stores).
const ROW_THREADS: u32 = 128;
/// Threads and most blocks of the grid-stride element-wise kernels.
const EW_THREADS: u32 = 256;
const EW_MAX_BLOCKS: usize = 4096;

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
) -> Result<Box<dyn Decoder>> {
    Ok(match device {
        Backend::Cpu => Box::new(super::CpuDecoder::new(model, slots, max_seq, max_tokens)),
        Backend::Cuda => Box::new(GpuDecoder::new(Gpu::cuda(0)?, model, slots, max_seq, max_tokens)?),
        Backend::Emulation => Box::new(GpuDecoder::new(Gpu::emulated(), model, slots, max_seq, max_tokens)?),
        Backend::Auto => return new_decoder(device.resolve(), model, slots, max_seq, max_tokens),
    })
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

/// A kernel parameter: the launch passes a pointer to each, as `cuLaunchKernel` takes them.
#[derive(Clone, Copy)]
enum Arg {
    Ptr(DevPtr),
    I32(i32),
    F32(f32),
}

fn launch(dev: &mut dyn Device, name: &str, grid: [u32; 2], block: u32, args: &mut [Arg]) -> Result<()> {
    let mut ptrs = [std::ptr::null_mut::<c_void>(); 12];
    for (p, a) in ptrs.iter_mut().zip(args.iter_mut()) {
        *p = match a {
            Arg::Ptr(x) => x as *mut DevPtr as *mut c_void,
            Arg::I32(x) => x as *mut i32 as *mut c_void,
            Arg::F32(x) => x as *mut f32 as *mut c_void,
        };
    }
    // SAFETY: every call site below passes the parameter list of the kernel it names in kernels/transformer.cu
    // (pointers as u64, int as i32, float as f32), with buffers sized at construction for the call's extents;
    // `args` outlives the launch call, which copies the values.
    unsafe { dev.launch(name, [grid[0], grid[1], 1], [block, 1, 1], 0, &mut ptrs[..args.len()]) }
}

/// Grid of an element-wise kernel over `n` values.
fn ew_grid(n: usize) -> [u32; 2] {
    [n.div_ceil(EW_THREADS as usize).clamp(1, EW_MAX_BLOCKS) as u32, 1]
}

/// One unmerged LoRA pair on the device.
struct LoraW {
    a: DevPtr,
    b: DevPtr,
    r: usize,
    scale: f32,
}

/// A linear layer on the device.
struct LinW {
    w: DevPtr,
    bias: Option<DevPtr>,
    inp: usize,
    out: usize,
    lora: Vec<Option<LoraW>>,
}

struct LayerW {
    ln1: DevPtr,
    ln2: DevPtr,
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
    x: DevPtr,
    /// GEMM input, bf16 `[t, max(hidden, q_dim, ffn)]`.
    act: DevPtr,
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    /// Output of o / down before the residual add, f32 `[t, hidden]`.
    tmp: DevPtr,
    gate: DevPtr,
    up: DevPtr,
    /// LoRA `x A^T`, f32 and bf16 `[t, max rank]`.
    lora_f32: DevPtr,
    lora_bf16: DevPtr,
    /// f32 `[max_rows, vocab]`.
    logits: DevPtr,
    tokens: DevPtr,
    pos: DevPtr,
    slot: DevPtr,
    rows: DevPtr,
}

/// The GPU [`Decoder`]: the model's weights on a device, a KV cache of `slots` sequences of up to `max_seq`
/// tokens, and buffers for `max_tokens` tokens per call.
pub struct GpuDecoder {
    model: Arc<Model>,
    gpu: Gpu,
    owned: Vec<DevPtr>,
    layers: Vec<LayerW>,
    embed: DevPtr,
    lm_head: DevPtr,
    norm: DevPtr,
    inv_freq: DevPtr,
    kc: DevPtr,
    vc: DevPtr,
    acts: Acts,
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
}

impl Drop for GpuDecoder {
    fn drop(&mut self) {
        for p in self.owned.drain(..) {
            self.gpu.device().free(p);
        }
    }
}

fn bad(msg: String) -> CageError {
    CageError::InvalidArgument(msg)
}

/// Allocates and remembers a device buffer (freed with the decoder).
fn alloc(dev: &mut dyn Device, owned: &mut Vec<DevPtr>, bytes: usize) -> Result<DevPtr> {
    let p = dev.alloc(bytes.max(16))?;
    owned.push(p);
    Ok(p)
}

fn upload_f32(dev: &mut dyn Device, owned: &mut Vec<DevPtr>, x: &[f32]) -> Result<DevPtr> {
    let p = alloc(dev, owned, x.len() * 4)?;
    dev.upload(p, bytemuck::cast_slice(x))?;
    Ok(p)
}

fn upload_bf16(dev: &mut dyn Device, owned: &mut Vec<DevPtr>, x: &[f32]) -> Result<DevPtr> {
    let h: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let p = alloc(dev, owned, h.len() * 2)?;
    dev.upload(p, bytemuck::cast_slice(&h))?;
    Ok(p)
}

fn upload_linear(dev: &mut dyn Device, owned: &mut Vec<DevPtr>, l: &Linear) -> Result<LinW> {
    let w = upload_bf16(dev, owned, &l.w)?;
    let bias = l.bias.as_ref().map(|b| upload_f32(dev, owned, b)).transpose()?;
    let mut lora = Vec::with_capacity(l.lora.len());
    for p in &l.lora {
        lora.push(match p {
            Some(p) => Some(LoraW {
                a: upload_bf16(dev, owned, &p.a)?,
                b: upload_bf16(dev, owned, &p.b)?,
                r: p.r,
                scale: p.scale,
            }),
            None => None,
        });
    }
    Ok(LinW { w, bias, inp: l.inp, out: l.out, lora })
}

/// `out[t, lin.out] = x[t, lin.inp] W^T (+ bias) (+ each run's LoRA)`, as `apply` does on the CPU. `x` is bf16.
fn apply(dev: &mut dyn Device, lin: &LinW, x: DevPtr, t: usize, out: DevPtr, runs: &[Run], acts: &Acts) -> Result<()> {
    let (inp, o) = (lin.inp, lin.out);
    // SAFETY: `x` holds t x inp bf16 (the act buffer is sized for the widest GEMM input), `out` t x o f32, the
    // weight o x inp bf16; the output buffers never alias the inputs.
    unsafe { dev.gemm_bf16(t, o, inp, x, lin.w, out, 1.0, 0.0)? };
    if let Some(b) = lin.bias {
        launch(
            dev,
            "cage_tf_bias",
            ew_grid(t * o),
            EW_THREADS,
            &mut [Arg::Ptr(out), Arg::Ptr(b), Arg::I32(o as i32), Arg::I32(t as i32)],
        )?;
    }
    for run in runs {
        let Some(Some(p)) = run.adapter.and_then(|a| lin.lora.get(a)) else { continue };
        let xs = x + (run.start * inp * 2) as DevPtr;
        let os = out + (run.start * o * 4) as DevPtr;
        // SAFETY: the run's rows lie inside the t rows above; the LoRA buffers hold t x max rank values.
        unsafe { dev.gemm_bf16(run.len, p.r, inp, xs, p.a, acts.lora_f32, 1.0, 0.0)? };
        let n = run.len * p.r;
        launch(
            dev,
            "cage_tf_cast_bf16",
            ew_grid(n),
            EW_THREADS,
            &mut [Arg::Ptr(acts.lora_f32), Arg::I32(n as i32), Arg::Ptr(acts.lora_bf16)],
        )?;
        // SAFETY: as above; beta = 1 adds the scaled update to the run's rows of `out`.
        unsafe { dev.gemm_bf16(run.len, o, p.r, acts.lora_bf16, p.b, os, p.scale, 1.0)? };
    }
    Ok(())
}

impl GpuDecoder {
    /// Uploads `model` to `gpu` and allocates a KV cache of `slots` sequences of up to `max_seq` tokens and
    /// buffers for up to `max_tokens` tokens per call (and as many logit rows, or `slots` when larger).
    pub fn new(mut gpu: Gpu, model: Arc<Model>, slots: usize, max_seq: usize, max_tokens: usize) -> Result<Self> {
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
        let mut owned = Vec::new();
        let built = (|| -> Result<_> {
            let dev = gpu.device();
            let o = &mut owned;
            let embed = upload_bf16(dev, o, &model.embed)?;
            let lm_head = match &model.lm_head {
                Some(l) => upload_bf16(dev, o, &l.w)?,
                None => embed,
            };
            let norm = upload_f32(dev, o, &model.norm)?;
            let inv_freq = upload_f32(dev, o, &c.inv_freq())?;
            let mut layers = Vec::with_capacity(model.layers.len());
            for l in &model.layers {
                layers.push(LayerW {
                    ln1: upload_f32(dev, o, &l.ln1)?,
                    ln2: upload_f32(dev, o, &l.ln2)?,
                    q: upload_linear(dev, o, &l.q)?,
                    k: upload_linear(dev, o, &l.k)?,
                    v: upload_linear(dev, o, &l.v)?,
                    o: upload_linear(dev, o, &l.o)?,
                    gate: upload_linear(dev, o, &l.gate)?,
                    up: upload_linear(dev, o, &l.up)?,
                    down: upload_linear(dev, o, &l.down)?,
                });
            }
            let cache = c.num_layers * slots * max_seq * kvd * 4;
            let kc = alloc(dev, o, cache)?;
            let vc = alloc(dev, o, cache)?;
            let t = max_tokens;
            let acts = Acts {
                x: alloc(dev, o, t * h * 4)?,
                act: alloc(dev, o, t * widest * 2)?,
                q: alloc(dev, o, t * qd * 4)?,
                k: alloc(dev, o, t * kvd * 4)?,
                v: alloc(dev, o, t * kvd * 4)?,
                tmp: alloc(dev, o, t * h * 4)?,
                gate: alloc(dev, o, t * ffn * 4)?,
                up: alloc(dev, o, t * ffn * 4)?,
                lora_f32: alloc(dev, o, t * max_r * 4)?,
                lora_bf16: alloc(dev, o, t * max_r * 2)?,
                logits: alloc(dev, o, max_rows * vocab * 4)?,
                tokens: alloc(dev, o, t * 4)?,
                pos: alloc(dev, o, t * 4)?,
                slot: alloc(dev, o, t * 4)?,
                rows: alloc(dev, o, max_rows * 4)?,
            };
            Ok((embed, lm_head, norm, inv_freq, layers, kc, vc, acts))
        })();
        let (embed, lm_head, norm, inv_freq, layers, kc, vc, acts) = match built {
            Ok(b) => b,
            Err(e) => {
                for p in owned {
                    gpu.device().free(p);
                }
                return Err(e);
            }
        };
        Ok(GpuDecoder {
            gpu,
            owned,
            layers,
            embed,
            lm_head,
            norm,
            inv_freq,
            kc,
            vc,
            acts,
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
        let rows = self.prepare(seqs, at)?;
        let Self { model, gpu, layers, acts: a, runs, lens, .. } = self;
        let c = &model.config;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (kvd, ffn, vocab) = (nkv * hd, c.intermediate_size, c.vocab_size);
        let slots = lens.len();
        let t = self.h_tokens.len();
        let dev = gpu.device();
        dev.upload(a.tokens, bytemuck::cast_slice(&self.h_tokens))?;
        dev.upload(a.pos, bytemuck::cast_slice(&self.h_pos))?;
        dev.upload(a.slot, bytemuck::cast_slice(&self.h_slot))?;
        let (t32, h32, hd32) = (t as i32, h as i32, hd as i32);
        let eps = c.rms_norm_eps;
        launch(
            dev,
            "cage_tf_embed",
            [t as u32, 1],
            ROW_THREADS,
            &mut [Arg::Ptr(self.embed), Arg::Ptr(a.tokens), Arg::I32(h32), Arg::Ptr(a.x)],
        )?;
        let layer_cache = (slots * self.max_seq * kvd * 4) as DevPtr;
        for (li, l) in layers.iter().enumerate() {
            let (kc, vc) = (self.kc + li as DevPtr * layer_cache, self.vc + li as DevPtr * layer_cache);
            let window = c.window(li).map_or(0, |w| w.min(i32::MAX as usize) as i32);
            launch(
                dev,
                "cage_tf_rmsnorm",
                [t as u32, 1],
                ROW_THREADS,
                &mut [Arg::Ptr(a.x), Arg::Ptr(0), Arg::Ptr(l.ln1), Arg::F32(eps), Arg::I32(h32), Arg::Ptr(a.act)],
            )?;
            apply(dev, &l.q, a.act, t, a.q, runs, a)?;
            apply(dev, &l.k, a.act, t, a.k, runs, a)?;
            apply(dev, &l.v, a.act, t, a.v, runs, a)?;
            for (buf, heads) in [(a.q, nh), (a.k, nkv)] {
                launch(
                    dev,
                    "cage_tf_rope",
                    [t as u32, 1],
                    ROW_THREADS,
                    &mut [
                        Arg::Ptr(buf),
                        Arg::Ptr(a.pos),
                        Arg::Ptr(self.inv_freq),
                        Arg::I32(heads as i32),
                        Arg::I32(hd32),
                    ],
                )?;
            }
            launch(
                dev,
                "cage_tf_kv_store",
                [t as u32, 1],
                ROW_THREADS,
                &mut [
                    Arg::Ptr(a.k),
                    Arg::Ptr(a.v),
                    Arg::Ptr(a.slot),
                    Arg::Ptr(a.pos),
                    Arg::I32(self.max_seq as i32),
                    Arg::I32(kvd as i32),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                ],
            )?;
            launch(
                dev,
                "cage_tf_attention",
                [t as u32, nh as u32],
                ATT_THREADS,
                &mut [
                    Arg::Ptr(a.q),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                    Arg::Ptr(a.slot),
                    Arg::Ptr(a.pos),
                    Arg::I32(nh as i32),
                    Arg::I32(nkv as i32),
                    Arg::I32(hd32),
                    Arg::I32(self.max_seq as i32),
                    // Sliding window of this layer (0: full causal attention), transformers' semantics.
                    Arg::I32(window),
                    Arg::F32(1.0 / (hd as f32).sqrt()),
                    Arg::Ptr(a.act),
                ],
            )?;
            apply(dev, &l.o, a.act, t, a.tmp, runs, a)?;
            launch(
                dev,
                "cage_tf_add",
                ew_grid(t * h),
                EW_THREADS,
                &mut [Arg::Ptr(a.x), Arg::Ptr(a.tmp), Arg::I32(t32 * h32)],
            )?;
            launch(
                dev,
                "cage_tf_rmsnorm",
                [t as u32, 1],
                ROW_THREADS,
                &mut [Arg::Ptr(a.x), Arg::Ptr(0), Arg::Ptr(l.ln2), Arg::F32(eps), Arg::I32(h32), Arg::Ptr(a.act)],
            )?;
            apply(dev, &l.gate, a.act, t, a.gate, runs, a)?;
            apply(dev, &l.up, a.act, t, a.up, runs, a)?;
            launch(
                dev,
                "cage_tf_silu_mul",
                ew_grid(t * ffn),
                EW_THREADS,
                &mut [Arg::Ptr(a.gate), Arg::Ptr(a.up), Arg::I32((t * ffn) as i32), Arg::Ptr(a.act)],
            )?;
            apply(dev, &l.down, a.act, t, a.tmp, runs, a)?;
            launch(
                dev,
                "cage_tf_add",
                ew_grid(t * h),
                EW_THREADS,
                &mut [Arg::Ptr(a.x), Arg::Ptr(a.tmp), Arg::I32(t32 * h32)],
            )?;
        }
        // Final norm only on the rows that get logits.
        let rows_ptr = match at {
            LogitsAt::All => 0,
            LogitsAt::Last => {
                dev.upload(a.rows, bytemuck::cast_slice(&self.h_rows))?;
                a.rows
            }
        };
        launch(
            dev,
            "cage_tf_rmsnorm",
            [rows as u32, 1],
            ROW_THREADS,
            &mut [
                Arg::Ptr(a.x),
                Arg::Ptr(rows_ptr),
                Arg::Ptr(self.norm),
                Arg::F32(eps),
                Arg::I32(h32),
                Arg::Ptr(a.act),
            ],
        )?;
        // SAFETY: act holds rows x h bf16, the LM head vocab x h bf16, logits max_rows x vocab f32.
        unsafe { dev.gemm_bf16(rows, vocab, h, a.act, self.lm_head, a.logits, 1.0, 0.0)? };
        for r in runs.iter() {
            lens[self.h_slot[r.start] as usize] += r.len;
        }
        Ok(DeviceLogits { ptr: a.logits, rows, vocab })
    }
}

impl Decoder for GpuDecoder {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
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
