//! Host side of kernels/transformer.cu: one typed launcher per kernel of the transformer forward pass, each the
//! GPU form of one step of the CPU forward (`model::forward`): embedding, RMSNorm, bias, RoPE, KV-cache store,
//! attention, SiLU-gate, residual add and the bf16 cast of GEMM inputs. The GEMMs go through
//! [`Device::gemm_bf16`]; [`crate::model::gpu::GpuDecoder`] chains both into the forward pass.
//!
//! Activations are row-major `[tokens, width]`; "bf16" buffers hold raw bf16 bits (the inputs of the GEMMs).
//! Every launcher is `unsafe` for the same reason: each pointer must be device memory of `dev` holding the
//! extents its documentation names, valid until the launch is over.

use super::Launch;
use super::device::{DevPtr, Device};
use crate::error::Result;

/// Largest head dimension the attention kernel takes (`CAGE_TF_MAX_HD` in kernels/transformer.cu).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads of the attention kernel: `CAGE_TF_ATT_WARPS` warps.
const ATT_THREADS: u32 = 128;
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

/// One layer's KV cache and where the call's tokens go in it: `k` and `v` are f32
/// `[slot][position][kv_dim]` with `max_seq` positions per slot; `slot` and `pos` hold one int per token.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvCache {
    pub(crate) k: DevPtr,
    pub(crate) v: DevPtr,
    pub(crate) slot: DevPtr,
    pub(crate) pos: DevPtr,
    pub(crate) max_seq: usize,
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

/// Rotates `x[t, heads, hd]` (f32) in place at the positions `pos[t]` with the frequencies `inv_freq[hd / 2]`.
///
/// # Safety
/// See the module documentation.
pub(crate) unsafe fn rope(
    dev: &mut dyn Device,
    x: DevPtr,
    pos: DevPtr,
    inv_freq: DevPtr,
    t: usize,
    heads: usize,
    hd: usize,
) -> Result<()> {
    let launch = per_row("cage_tf_rope", t).ptr(x).ptr(pos).ptr(inv_freq).i32(heads as i32).i32(hd as i32);
    // SAFETY: cage_tf_rope's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// Stores the keys and values `k`, `v` (f32 `[t, kvd]`) of `t` tokens in `cache`.
///
/// # Safety
/// See the module documentation; every (slot, position) must lie inside the cache.
pub(crate) unsafe fn kv_store(
    dev: &mut dyn Device,
    cache: &KvCache,
    k: DevPtr,
    v: DevPtr,
    t: usize,
    kvd: usize,
) -> Result<()> {
    let launch = per_row("cage_tf_kv_store", t)
        .ptr(k)
        .ptr(v)
        .ptr(cache.slot)
        .ptr(cache.pos)
        .i32(cache.max_seq as i32)
        .i32(kvd as i32)
        .ptr(cache.k)
        .ptr(cache.v);
    // SAFETY: cage_tf_kv_store's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// The heads of one attention call: query heads, KV heads (GQA) and the head dimension (<= [`MAX_HEAD_DIM`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) q: usize,
    pub(crate) kv: usize,
    pub(crate) dim: usize,
}

/// Causal attention of `t` tokens: `out[t, heads.q, heads.dim]` (bf16) from the queries `q` (f32, same shape)
/// over the positions 0..=pos of each token's slot in `cache` (the last `window` only, when > 0), with scores
/// scaled by 1 / sqrt(dim). One block per (token, query head).
///
/// # Safety
/// See the module documentation; the tokens' keys and values must already be stored ([`kv_store`]).
pub(crate) unsafe fn attention(
    dev: &mut dyn Device,
    cache: &KvCache,
    q: DevPtr,
    t: usize,
    heads: Heads,
    window: usize,
    out: DevPtr,
) -> Result<()> {
    let launch = Launch::new("cage_tf_attention")
        .grid_xy(t as u32, heads.q as u32)
        .block(ATT_THREADS)
        .ptr(q)
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
        .ptr(out);
    // SAFETY: cage_tf_attention's parameter list; the caller vouches for the buffers.
    unsafe { launch.run(dev) }
}

/// `out[i]` (bf16) = SiLU(`gate[i]`) `up[i]` over `n` f32 elements.
///
/// # Safety
/// See the module documentation.
pub(crate) unsafe fn silu_mul(dev: &mut dyn Device, gate: DevPtr, up: DevPtr, n: usize, out: DevPtr) -> Result<()> {
    let launch = elementwise("cage_tf_silu_mul", n).ptr(gate).ptr(up).i32(n as i32).ptr(out);
    // SAFETY: cage_tf_silu_mul's parameter list; the caller vouches for the buffers.
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
