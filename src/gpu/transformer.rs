//! Host side of kernels/transformer.cu: one typed launcher per kernel of the transformer forward pass, each the
//! GPU form of one step of the CPU forward (`model::forward`): embedding, RMSNorm, bias, RoPE, KV-cache store,
//! attention, SiLU-gate, residual add and the bf16 cast of GEMM inputs. The GEMMs go through
//! [`Device::gemm_bf16`]; [`crate::model::gpu::GpuDecoder`] chains both into the forward pass.
//!
//! Attention runs in one pass (one block per token and query head) or, for decode calls with few (token, head)
//! pairs and long contexts, split-K (flash-decoding): [`attention_splits`] decides, [`attention`] launches.
//! [`AttentionJob`] runs the kernels on a cache filled from the host, for the tests and `cage bench solver`.
//!
//! Activations are row-major `[tokens, width]`; "bf16" buffers hold raw bf16 bits (the inputs of the GEMMs).
//! Every launcher is `unsafe` for the same reason: each pointer must be device memory of `dev` holding the
//! extents its documentation names, valid until the launch is over.

use super::device::{DevBuf, DevPtr, Device};
use super::{Gpu, Launch};
use crate::error::{CageError, Result};

/// Largest head dimension the attention kernel takes (`CAGE_TF_MAX_HD` in kernels/transformer.cu).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads of the attention kernel: `CAGE_TF_ATT_WARPS` warps.
const ATT_THREADS: u32 = 128;
/// Blocks split-K attention aims for: about two per SM of an H100 / H200 (132 SMs), enough to keep every SM
/// streaming keys and values at batch 1. A call with this many (token, head) pairs runs in one pass.
pub const ATT_TARGET_BLOCKS: usize = 256;
/// Fewest positions worth a split of their own: below this the partial states' write and the combine's read
/// cost more than the extra blocks gain.
pub const ATT_MIN_CHUNK: usize = 128;
/// Threads of the per-row kernels (norms, embedding, RoPE, cache stores).
const ROW_THREADS: u32 = 128;
/// Threads and most blocks of the grid-stride element-wise kernels.
const EW_THREADS: u32 = 256;
const EW_MAX_BLOCKS: usize = 4096;

/// A launch of one block per row.
fn per_row(kernel: &str, rows: usize) -> Launch<'_> {
    Launch::new(kernel).grid(rows as u32).block(ROW_THREADS)
}

/// A grid-stride launch over `n` elements.
fn elementwise(kernel: &str, n: usize) -> Launch<'_> {
    Launch::new(kernel).grid(n.div_ceil(EW_THREADS as usize).clamp(1, EW_MAX_BLOCKS) as u32).block(EW_THREADS)
}

/// Element type of the GPU decoder's KV cache (`kv_cache` in a run config, `--kv-cache` on the command line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum KvCacheType {
    /// Keys and values exactly as computed (f32), the default.
    #[default]
    F32,
    /// Keys and values rounded to bf16 when stored: half the cache bytes, so twice the rows or context fit and
    /// attention reads half as much; logits move by about a bf16 rounding of the attention inputs.
    Bf16,
}

crate::spelled!(KvCacheType, "KV-cache type");

impl KvCacheType {
    /// Bytes per cached value.
    pub fn bytes(self) -> usize {
        match self {
            KvCacheType::F32 => 4,
            KvCacheType::Bf16 => 2,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            KvCacheType::F32 => "f32",
            KvCacheType::Bf16 => "bf16",
        }
    }
}

/// One layer's KV cache and where the call's tokens go in it: `k` and `v` are `ty` values
/// `[slot][position][kv_dim]` with `max_seq` positions per slot; `slot` and `pos` hold one int per token.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvCache {
    pub(crate) k: DevPtr,
    pub(crate) v: DevPtr,
    pub(crate) slot: DevPtr,
    pub(crate) pos: DevPtr,
    pub(crate) max_seq: usize,
    pub(crate) ty: KvCacheType,
}

/// `x[t, h]` (f32) = rows `tokens[t]` (int) of the bf16 `table[vocab, h]`.
///
/// # Safety
/// See the module documentation; every token id must be inside the table.
pub(crate) unsafe fn embed(
    dev: &mut dyn Device,
    table: DevPtr,
    tokens: DevPtr,
    t: usize,
    h: usize,
    x: DevPtr,
) -> Result<()> {
    let launch = per_row("cage_tf_embed", t).ptr(table).ptr(tokens).i32(h as i32).ptr(x);
    // SAFETY: cage_tf_embed's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// `out[r, h]` (bf16) = RMSNorm of row `rows[r]` of `x` (f32, `rows` = 0: row r) with weight `w[h]`, for
/// `n` rows.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rmsnorm(
    dev: &mut dyn Device,
    x: DevPtr,
    rows: DevPtr,
    w: DevPtr,
    eps: f32,
    h: usize,
    n: usize,
    out: DevPtr,
) -> Result<()> {
    let launch = per_row("cage_tf_rmsnorm", n).ptr(x).ptr(rows).ptr(w).f32(eps).i32(h as i32).ptr(out);
    // SAFETY: cage_tf_rmsnorm's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// `y[r, i] += b[i]` over `rows` rows of `n` (f32).
///
/// # Safety
/// See the module documentation.
pub(crate) unsafe fn bias(dev: &mut dyn Device, y: DevPtr, b: DevPtr, n: usize, rows: usize) -> Result<()> {
    let launch = elementwise("cage_tf_bias", n * rows).ptr(y).ptr(b).i32(n as i32).i32(rows as i32);
    // SAFETY: cage_tf_bias's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// Rotates `x[t, heads, hd]` (f32, rows `ld` floats apart) in place at the positions `pos[t]` with the
/// frequencies `inv_freq[hd / 2]`.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rope(
    dev: &mut dyn Device,
    x: DevPtr,
    ld: usize,
    pos: DevPtr,
    inv_freq: DevPtr,
    t: usize,
    heads: usize,
    hd: usize,
) -> Result<()> {
    let launch =
        per_row("cage_tf_rope", t).ptr(x).i32(ld as i32).ptr(pos).ptr(inv_freq).i32(heads as i32).i32(hd as i32);
    // SAFETY: cage_tf_rope's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// Stores the keys and values `k`, `v` (f32 `[t, kvd]`, rows `ld` floats apart) of `t` tokens in `cache`.
///
/// # Safety
/// See the module documentation; every (slot, position) must lie inside the cache.
pub(crate) unsafe fn kv_store(
    dev: &mut dyn Device,
    cache: &KvCache,
    k: DevPtr,
    v: DevPtr,
    ld: usize,
    t: usize,
    kvd: usize,
) -> Result<()> {
    let name = format!("cage_tf_kv_store_{}", cache.ty.suffix());
    let launch = per_row(&name, t)
        .ptr(k)
        .ptr(v)
        .i32(ld as i32)
        .ptr(cache.slot)
        .ptr(cache.pos)
        .i32(cache.max_seq as i32)
        .i32(kvd as i32)
        .ptr(cache.k)
        .ptr(cache.v);
    // SAFETY: cage_tf_kv_store's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// The heads of one attention call: query heads, KV heads (GQA: a multiple of them) and the head dimension
/// (<= [`MAX_HEAD_DIM`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub q: usize,
    /// Key / value heads.
    pub kv: usize,
    /// Head dimension.
    pub dim: usize,
}

/// How many blocks share the positions of each (token, query head) of a call of `t` tokens whose longest
/// context (positions seen, after any window) is `max_ctx`. One (the one-pass kernel) when the call already has
/// [`ATT_TARGET_BLOCKS`] pairs (prefill, large decode batches); else enough splits to reach that many blocks,
/// but none shorter than [`ATT_MIN_CHUNK`] positions of the longest context, so short contexts stay one pass.
/// The call then has fewer than 2 x [`ATT_TARGET_BLOCKS`] blocks ([`attention_scratch_bytes`]).
pub fn attention_splits(t: usize, heads: usize, max_ctx: usize) -> usize {
    let pairs = (t * heads).max(1);
    if pairs >= ATT_TARGET_BLOCKS {
        return 1;
    }
    ATT_TARGET_BLOCKS.div_ceil(pairs).min(max_ctx.div_ceil(ATT_MIN_CHUNK)).max(1)
}

/// Bytes of the partial states of `blocks` split-K blocks (m, s and head_dim sums each, f32).
fn parts_bytes(blocks: usize, head_dim: usize) -> usize {
    blocks * (head_dim + 2) * 4
}

/// Bytes of the scratch buffer split-K attention needs for any call split by [`attention_splits`].
pub fn attention_scratch_bytes(head_dim: usize) -> usize {
    parts_bytes(2 * ATT_TARGET_BLOCKS, head_dim)
}

/// Causal attention of `t` tokens: `out[t, heads.q, heads.dim]` (bf16) from the queries `q` (f32, token rows
/// `q_ld` floats apart) over the positions 0..=pos of each token's slot in `cache` (the last `window` only, when
/// `window` is not 0), with scores scaled by 1 / sqrt(dim). One block per (token, query head) and split: with
/// `splits` > 1 each block writes its partial softmax state to `parts` and a second kernel merges them (see
/// kernels/transformer.cu).
///
/// # Safety
/// See the module documentation; the tokens' keys and values must already be stored ([`kv_store`]); with
/// `splits` > 1, `parts` must hold [`parts_bytes`] of `t * heads.q * splits` blocks.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention(
    dev: &mut dyn Device,
    cache: &KvCache,
    q: DevPtr,
    q_ld: usize,
    t: usize,
    heads: Heads,
    window: usize,
    splits: usize,
    parts: DevPtr,
    out: DevPtr,
) -> Result<()> {
    let name = format!("cage_tf_attention_{}", cache.ty.suffix());
    let launch = Launch::new(&name)
        .grid_xyz(t as u32, heads.q as u32, splits as u32)
        .block(ATT_THREADS)
        .ptr(q)
        .i32(q_ld as i32)
        .ptr(cache.k)
        .ptr(cache.v)
        .ptr(cache.slot)
        .ptr(cache.pos)
        .i32(heads.q as i32)
        .i32(heads.kv as i32)
        .i32(heads.dim as i32)
        .i32(cache.max_seq as i32)
        .i32(window.min(i32::MAX as usize) as i32)
        .f32(1.0 / (heads.dim as f32).sqrt())
        .ptr(out)
        .ptr(if splits > 1 { parts } else { 0 });
    // SAFETY: cage_tf_attention_*'s parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev)? };
    if splits > 1 {
        let combine = Launch::new("cage_tf_attention_combine")
            .grid_xy(t as u32, heads.q as u32)
            .block(ATT_THREADS)
            .ptr(parts)
            .i32(heads.q as i32)
            .i32(heads.dim as i32)
            .i32(splits as i32)
            .ptr(out);
        // SAFETY: cage_tf_attention_combine's parameter list; the first launch wrote the partial states.
        unsafe { combine.run(dev)? };
    }
    Ok(())
}

/// `out[r, i]` (bf16) = SiLU(`gu[r, i]`) `gu[r, ffn + i]` over `rows` rows of the fused gate / up output
/// (f32 `[rows, 2 ffn]`).
///
/// # Safety
/// See the module documentation.
pub(crate) unsafe fn silu_mul(dev: &mut dyn Device, gu: DevPtr, ffn: usize, rows: usize, out: DevPtr) -> Result<()> {
    let launch = elementwise("cage_tf_silu_mul", ffn * rows).ptr(gu).i32(ffn as i32).i32(rows as i32).ptr(out);
    // SAFETY: cage_tf_silu_mul's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// `y[r, col + i] += d[r, i]` over `rows` rows of `width` (f32; `y`'s rows `ld` wide): one slice's LoRA update
/// of a fused projection.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_cols(
    dev: &mut dyn Device,
    y: DevPtr,
    ld: usize,
    col: usize,
    d: DevPtr,
    width: usize,
    rows: usize,
) -> Result<()> {
    let launch = elementwise("cage_tf_add_cols", width * rows)
        .ptr(y)
        .i32(ld as i32)
        .i32(col as i32)
        .ptr(d)
        .i32(width as i32)
        .i32(rows as i32);
    // SAFETY: cage_tf_add_cols's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// `x[i] += d[i]` over `n` f32 elements (the residual add).
///
/// # Safety
/// See the module documentation.
pub(crate) unsafe fn add(dev: &mut dyn Device, x: DevPtr, d: DevPtr, n: usize) -> Result<()> {
    let launch = elementwise("cage_tf_add", n).ptr(x).ptr(d).i32(n as i32);
    // SAFETY: cage_tf_add's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// `out[i]` (bf16) = `x[i]` (f32) rounded, over `n` elements.
///
/// # Safety
/// See the module documentation.
pub(crate) unsafe fn cast_bf16(dev: &mut dyn Device, x: DevPtr, n: usize, out: DevPtr) -> Result<()> {
    let launch = elementwise("cage_tf_cast_bf16", n).ptr(x).i32(n as i32).ptr(out);
    // SAFETY: cage_tf_cast_bf16's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// The shape of an [`AttentionJob`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query and KV heads, head dimension.
    pub heads: Heads,
    /// Cache slots.
    pub slots: usize,
    /// Positions per slot.
    pub max_seq: usize,
    /// Sliding window (0: full causal attention).
    pub window: usize,
    /// Element type of the cache.
    pub kv: KvCacheType,
}

/// The attention kernels on a cache filled from the host, outside a decoder: what tests/kernels_bodies.rs checks
/// against an f64 reference at chosen splits and `cage bench solver` times (split-K against one pass).
pub struct AttentionJob {
    shape: AttentionShape,
    t: usize,
    max_ctx: usize,
    k: DevBuf,
    v: DevBuf,
    q: DevBuf,
    slot: DevBuf,
    pos: DevBuf,
    out: DevBuf,
    parts: DevBuf,
}

impl AttentionJob {
    /// Bytes one launch reads at least: the keys and values each token sees, plus the queries.
    pub fn bytes_moved(&self) -> usize {
        let h = self.shape.heads;
        self.t * (2 * self.max_ctx * h.kv * h.dim * self.shape.kv.bytes() + h.q * h.dim * 6)
    }

    /// The longest context (positions seen) of the job's tokens.
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }
}

impl Gpu {
    /// Uploads an attention problem: keys and values `[slots][max_seq][kv * dim]` (f32, rounded to bf16 for a
    /// bf16 cache), queries `[t, q * dim]` and each token's slot and position (it sees positions 0..=pos).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_attention(
        &mut self,
        shape: AttentionShape,
        k: &[f32],
        v: &[f32],
        q: &[f32],
        slot: &[usize],
        pos: &[usize],
    ) -> Result<AttentionJob> {
        let bad = |m: String| CageError::InvalidArgument(format!("attention: {m}"));
        let Heads { q: nq, kv: nkv, dim } = shape.heads;
        if nq == 0 || nkv == 0 || !nq.is_multiple_of(nkv) || dim == 0 || dim > MAX_HEAD_DIM {
            return Err(bad(format!(
                "{nq} query heads, {nkv} KV heads and head_dim {dim}: needs KV heads dividing query heads and \
                 1 <= head_dim <= {MAX_HEAD_DIM}"
            )));
        }
        let t = slot.len();
        let cache = shape.slots * shape.max_seq * nkv * dim;
        if t == 0 || pos.len() != t || q.len() != t * nq * dim || k.len() != cache || v.len() != cache {
            return Err(bad(format!(
                "{t} slots, {} positions, {} queries, {} keys and {} values for {t} tokens and a cache of {cache}",
                pos.len(),
                q.len(),
                k.len(),
                v.len()
            )));
        }
        if let Some(i) = (0..t).find(|&i| slot[i] >= shape.slots || pos[i] >= shape.max_seq) {
            return Err(bad(format!("token {i} at slot {} position {} is outside the cache", slot[i], pos[i])));
        }
        let max_ctx =
            pos.iter().map(|&p| if shape.window > 0 { (p + 1).min(shape.window) } else { p + 1 }).max().unwrap_or(0);
        let dev = self.device();
        let ints = |x: &[usize]| x.iter().map(|&a| a as i32).collect::<Vec<i32>>();
        let cache_buf = |dev: &mut dyn Device, x: &[f32]| -> Result<DevBuf> {
            let mut b = DevBuf::alloc(dev, x.len() * shape.kv.bytes())?;
            match shape.kv {
                KvCacheType::F32 => b.upload(dev, x)?,
                KvCacheType::Bf16 => b.upload(dev, &x.iter().map(|&a| half::bf16::from_f32(a)).collect::<Vec<_>>())?,
            };
            Ok(b)
        };
        let (kb, vb) = (cache_buf(dev, k)?, cache_buf(dev, v)?);
        let mut qb = DevBuf::alloc(dev, q.len() * 4)?;
        qb.upload(dev, q)?;
        let (mut sb, mut pb) = (DevBuf::alloc(dev, t * 4)?, DevBuf::alloc(dev, t * 4)?);
        sb.upload(dev, &ints(slot))?;
        pb.upload(dev, &ints(pos))?;
        let out = DevBuf::alloc(dev, t * nq * dim * 2)?;
        Ok(AttentionJob { shape, t, max_ctx, k: kb, v: vb, q: qb, slot: sb, pos: pb, out, parts: DevBuf::default() })
    }

    /// Runs the job with `splits` blocks per (token, head) (None: [`attention_splits`]'s choice, as the decoder
    /// makes it) and returns the splits used.
    pub fn run_attention(&mut self, job: &mut AttentionJob, splits: Option<usize>) -> Result<usize> {
        let h = job.shape.heads;
        let splits = splits.unwrap_or_else(|| attention_splits(job.t, h.q, job.max_ctx));
        if !(1..=u16::MAX as usize).contains(&splits) {
            return Err(CageError::InvalidArgument(format!("attention: {splits} splits (1 to 65535)")));
        }
        let dev = self.device();
        let parts = job.parts.reserve(dev, parts_bytes(job.t * h.q * splits, h.dim))?;
        let cache = KvCache {
            k: job.k.ptr(),
            v: job.v.ptr(),
            slot: job.slot.ptr(),
            pos: job.pos.ptr(),
            max_seq: job.shape.max_seq,
            ty: job.shape.kv,
        };
        let (q, out) = (job.q.ptr(), job.out.ptr());
        // SAFETY: prepare_attention sized every buffer for the job's tokens, heads and cache, and checked each
        // token's slot and position; `parts` was just reserved for this many splits.
        unsafe { attention(dev, &cache, q, h.q * h.dim, job.t, h, job.shape.window, splits, parts, out)? };
        Ok(splits)
    }

    /// The job's output, `[t, q * dim]`, as f32 (the kernels write bf16).
    pub fn attention_output(&mut self, job: &AttentionJob) -> Result<Vec<f32>> {
        let mut o = vec![half::bf16::ZERO; job.t * job.shape.heads.q * job.shape.heads.dim];
        self.device().download(job.out.ptr(), bytemuck::cast_slice_mut(&mut o))?;
        Ok(o.iter().map(|x| x.to_f32()).collect())
    }
}
