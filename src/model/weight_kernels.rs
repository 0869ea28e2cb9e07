//! `y = x W^T` with `W` in the format it was stored in (bf16, f16, or llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks
//! exactly as the GGUF file holds them) and f32 activations.
//!
//! Decode (`m <= 8` rows of x) is bound by reading `W` once: each weight row is expanded to f32 in registers
//! (AVX2 + FMA + F16C: bf16 by a shift, f16 and the block scales by `vcvtph2ps`, quantized values by integer
//! widening and one fused `q * d + m`) and accumulated in f32 against every row of x, like `linalg::small_m`.
//! Larger `m` (prefill) is compute bound: tiles of 64 weight rows are expanded into a per-thread f32 buffer and
//! multiplied by the f32 GEMM, so the expansion costs `1 / m` of the product.
//!
//! Activations stay f32, unlike llama.cpp, which quantizes them to Q8 blocks on the fly and uses integer dot
//! products: here every expanded weight equals the dequantized f32 value bit for bit (`q * d` is exact in f32,
//! at most 19 significant bits), so the product differs from the f32 path on the dequantized weights by the
//! summation order only, and the quantization error is the weights' alone. The price is speed at batch 1
//! (f32 FMAs instead of int8 dot products); the bytes read, which bound decode, are the same.

use super::devquant::Int4Matrix;
use super::gguf::{GgmlType, dequantize_into};
use super::linalg::SendPtr;
use gemm::{Parallelism, gemm};
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;

/// A borrowed `[n, k]` row-major weight matrix in a stored format.
#[derive(Debug, Clone, Copy)]
pub enum Stored<'a> {
    /// bfloat16 values.
    Bf16(&'a [bf16]),
    /// IEEE half values.
    F16(&'a [f16]),
    /// Whole GGUF blocks, `k / block` blocks per row: Q8_0, Q4_0, Q4_1 (32 values each; kernels here) or the
    /// K-quants Q4_K, Q5_K, Q6_K (256 values each; kernels in [`super::kquant`]).
    Blocks(GgmlType, &'a [u8]),
}

/// Values per quantized block.
const QK: usize = 32;

/// Rows of `x` up to which the expand-in-registers kernel runs (as `linalg`'s small-m kernel).
const SMALL_M: usize = 8;

/// Weight rows per parallel task of the decode kernel.
const ROWS: usize = 16;

/// Weight rows expanded at once for the GEMM path (64 rows of a 4096-wide matrix: 1 MiB of f32).
const TILE: usize = 64;

impl Stored<'_> {
    /// Whether the matrix holds at least `n` rows of `k` values (`k` a whole number of blocks for block types).
    fn covers(&self, n: usize, k: usize) -> bool {
        match *self {
            Stored::Bf16(w) => w.len() >= n * k,
            Stored::F16(w) => w.len() >= n * k,
            Stored::Blocks(ty, raw) => {
                let per = match ty {
                    GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => QK,
                    GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => super::kquant::QK_K,
                    _ => return false,
                };
                k.is_multiple_of(per) && raw.len() >= n * row_bytes(ty, k)
            }
        }
    }
}

/// Bytes of one row of `k` values of block type `ty`.
pub fn row_bytes(ty: GgmlType, k: usize) -> usize {
    let (per, bytes) = ty.block();
    k / per * bytes
}

/// Row `i` of `w` (rows of `k` values) as f32 into `out[..k]`: the values the kernels multiply with.
pub fn row_into(w: Stored, i: usize, k: usize, out: &mut [f32]) {
    let out = &mut out[..k];
    match w {
        Stored::Bf16(w) => {
            for (o, v) in out.iter_mut().zip(&w[i * k..(i + 1) * k]) {
                *o = v.to_f32();
            }
        }
        Stored::F16(w) => {
            for (o, v) in out.iter_mut().zip(&w[i * k..(i + 1) * k]) {
                *o = v.to_f32();
            }
        }
        Stored::Blocks(ty, raw) => {
            let rb = row_bytes(ty, k);
            dequantize_into(ty, &raw[i * rb..(i + 1) * rb], out);
        }
    }
}

/// `out[m x n] (+)= alpha * x[m x k] * W^T`, `W` `[n x k]` in a stored format. With `accumulate` the product
/// is added to `out`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t(w: Stored, x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32], accumulate: bool, alpha: f32) {
    assert!(x.len() >= m * k && out.len() >= m * n && w.covers(n, k), "stored matmul: buffers smaller than the shapes");
    if m == 0 || n == 0 {
        return;
    }
    if let Stored::Blocks(ty, raw) = w
        && m <= SMALL_M
        && super::kquant::block_bytes(ty).is_some()
    {
        // The K-quants' decode kernel expands each 256-value block once for all rows of `x`; the shapes were
        // asserted above, which is all it checks.
        super::kquant::matmul_t(ty, raw, x, m, k, n, out, accumulate, alpha).expect("shapes asserted above");
        return;
    }
    let op = SendPtr(out.as_mut_ptr());
    let isa = isa();
    if m > direct_rows(isa, w) {
        (0..n.div_ceil(TILE)).into_par_iter().for_each(|t| gemm_tile(w, x, m, k, n, t, &op, accumulate, alpha));
        return;
    }
    run_jobs(isa, x, m, k, &[Job { w, n, out: &op, accumulate, alpha }]);
}

/// Rows of x up to which the expand-in-registers kernels run: 32 for the AVX-512 block kernel (eight rows at a
/// time: re-expanding each block four times still costs less than the GEMM path's expansion into f32, as for
/// the packed copies, `forward::PACKED_MAX_M`), [`SMALL_M`] otherwise.
fn direct_rows(isa: Isa, w: Stored) -> usize {
    match (isa, w) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Stored::Blocks(GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1, _)) => 32,
        _ => SMALL_M,
    }
}

/// `out_i[m x n_i] = x[m x k] * W_i^T` for several matrices with the same input (q, k and v; gate and up) in one
/// parallel loop at decode sizes (`m <= 8`, or 32 for the AVX-512 block kernel; no K-quants): a batch-1 step is
/// ~200 small products, and each parallel loop costs a fork and a join on every core. Other shapes run one
/// product at a time.
pub fn matmul_t_many<const N: usize>(x: &[f32], m: usize, k: usize, products: [(Stored, usize, &mut [f32]); N]) {
    let isa = isa();
    let one_loop = products.iter().all(|(w, _, _)| {
        m <= direct_rows(isa, *w) && !matches!(w, Stored::Blocks(ty, _) if super::kquant::block_bytes(*ty).is_some())
    });
    if !one_loop {
        for (w, n, out) in products {
            matmul_t(w, x, m, k, n, out, false, 1.0);
        }
        return;
    }
    let ptrs = products.each_ref().map(|(w, n, out)| {
        assert!(
            x.len() >= m * k && out.len() >= m * n && w.covers(*n, k),
            "stored matmul: buffers smaller than the shapes"
        );
        SendPtr(out.as_ptr().cast_mut())
    });
    let jobs: [Job; N] = std::array::from_fn(|i| Job {
        w: products[i].0,
        n: products[i].1,
        out: &ptrs[i],
        accumulate: false,
        alpha: 1.0,
    });
    run_jobs(isa, x, m, k, &jobs);
}

/// Which explicit decode kernel the CPU runs (the standard library caches the detection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// AVX-512F for the Q8_0 / Q4_0 / Q4_1 blocks (a 16-entry table per 4-bit block), AVX2 for bf16 / f16.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2 + FMA + F16C for every format.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        if avx2 && std::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// One product of a decode loop: the matrix, its output rows and where they go.
struct Job<'a> {
    w: Stored<'a>,
    n: usize,
    out: &'a SendPtr,
    accumulate: bool,
    alpha: f32,
}

/// The products of `jobs` (same `x`, `m` up to [`direct_rows`], shapes checked, no K-quants) as one loop over
/// chunks of `ROWS` output rows, parallel unless the work is too small to pay for the fork.
fn run_jobs(isa: Isa, x: &[f32], m: usize, k: usize, jobs: &[Job]) {
    let work = |mut c: usize| {
        let mut j = 0;
        while c >= jobs[j].n.div_ceil(ROWS) {
            c -= jobs[j].n.div_ceil(ROWS);
            j += 1;
        }
        let job = &jobs[j];
        let rows = c * ROWS..((c + 1) * ROWS).min(job.n);
        let (w, n, out, acc, alpha) = (job.w, job.n, job.out, job.accumulate, job.alpha);
        #[cfg(target_arch = "x86_64")]
        match (isa, w) {
            (Isa::Avx512, Stored::Blocks(ty @ (GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1), raw)) => {
                // SAFETY: AVX-512F, AVX2, FMA and F16C were detected (`isa`); the shapes were checked by the caller.
                unsafe { avx512::chunk(ty, raw, x, m, k, rows, n, out, acc, alpha) };
                return;
            }
            (Isa::Avx512 | Isa::Avx2, _) => {
                // SAFETY: AVX2, FMA and F16C were detected (`isa`); the shapes were checked by the caller.
                unsafe { avx2::chunk(w, x, m, k, rows, n, out, acc, alpha) };
                return;
            }
            (Isa::Portable, _) => {}
        }
        portable(w, x, m, k, rows, n, out, acc, alpha);
    };
    let total: usize = jobs.iter().map(|j| j.n.div_ceil(ROWS)).sum();
    if jobs.iter().map(|j| j.n * k * m).sum::<usize>() >= 1 << 15 {
        (0..total).into_par_iter().for_each(work);
    } else {
        (0..total).for_each(work);
    }
}

thread_local! {
    /// Expanded weight rows of the current task; grows to the largest tile once per thread.
    static BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Output columns `t * TILE ..` of a large-m product: the tile's weight rows expanded to f32, then the GEMM.
#[allow(clippy::too_many_arguments)]
fn gemm_tile(w: Stored, x: &[f32], m: usize, k: usize, n: usize, t: usize, out: &SendPtr, acc: bool, alpha: f32) {
    let (lo, hi) = (t * TILE, ((t + 1) * TILE).min(n));
    expanded_gemm(x, m, k, n, lo..hi, out, acc, alpha, |b| {
        for (i, o) in (lo..hi).enumerate() {
            row_into(w, o, k, &mut b[i * k..(i + 1) * k]);
        }
    });
}

/// `out[:, cols] (+)= alpha x W[cols]^T` with the weight rows `cols` expanded to f32 by `fill` (row `o - cols.start`
/// of its `[cols.len(), k]` buffer for output `o`), in a per-thread buffer that grows to the largest tile once.
#[allow(clippy::too_many_arguments)]
fn expanded_gemm(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    cols: std::ops::Range<usize>,
    out: &SendPtr,
    acc: bool,
    alpha: f32,
    fill: impl FnOnce(&mut [f32]),
) {
    let (lo, hi) = (cols.start, cols.end);
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < (hi - lo) * k {
            b.resize((hi - lo) * k, 0.0);
        }
        fill(&mut b[..(hi - lo) * k]);
        // SAFETY: out holds m*n floats (asserted by the callers) and this task writes only its columns lo..hi;
        // the buffer holds (hi - lo) rows of k floats; the strides describe row-major x and out and the
        // transpose of the row-major tile.
        unsafe {
            gemm(
                m,
                hi - lo,
                k,
                out.0.add(lo),
                1,
                n as isize,
                acc,
                x.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                k as isize,
                1,
                1.0,
                alpha,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });
}

/// Weight rows `rows` against all of x without explicit SIMD: each row expanded once, then one dot per row
/// of x.
#[allow(clippy::too_many_arguments)]
fn portable(
    w: Stored,
    x: &[f32],
    m: usize,
    k: usize,
    rows: std::ops::Range<usize>,
    n: usize,
    out: &SendPtr,
    accumulate: bool,
    alpha: f32,
) {
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < k {
            b.resize(k, 0.0);
        }
        for o in rows {
            row_into(w, o, k, &mut b);
            for r in 0..m {
                let v = alpha * b[..k].iter().zip(&x[r * k..(r + 1) * k]).map(|(a, c)| a * c).sum::<f32>();
                // SAFETY: each (r, o) is written by exactly one task; out holds m*n floats (asserted).
                unsafe {
                    let p = out.0.add(r * n + o);
                    *p = if accumulate { *p + v } else { v };
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{GgmlType, QK, SendPtr, Stored};
    use std::arch::x86_64::*;

    /// Formats as const parameters of [`tile`], so that each instantiation is straight-line code.
    const BF16: u8 = 0;
    const F16: u8 = 1;
    const Q8_0: u8 = 2;
    const Q4_0: u8 = 3;
    const Q4_1: u8 = 4;

    /// How far ahead of the block being expanded the kernel prefetches (bytes): decode is bound by waiting for
    /// weight bytes, and the hardware prefetcher alone keeps too few loads in flight (see `packed::PREFETCH`).
    const PREFETCH: usize = 2048;

    /// Weight rows `rows` against all rows of x, up to four rows of x at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk(
        w: Stored,
        x: &[f32],
        m: usize,
        k: usize,
        rows: std::ops::Range<usize>,
        n: usize,
        out: &SendPtr,
        accumulate: bool,
        alpha: f32,
    ) {
        let (ptr, f) = match w {
            Stored::Bf16(v) => (v.as_ptr().cast::<u8>(), BF16),
            Stored::F16(v) => (v.as_ptr().cast::<u8>(), F16),
            Stored::Blocks(GgmlType::Q8_0, raw) => (raw.as_ptr(), Q8_0),
            Stored::Blocks(GgmlType::Q4_0, raw) => (raw.as_ptr(), Q4_0),
            Stored::Blocks(GgmlType::Q4_1, raw) => (raw.as_ptr(), Q4_1),
            // Other block types do not get here (the K-quants have their own kernel, see `matmul_t`).
            Stored::Blocks(..) => return super::portable(w, x, m, k, rows, n, out, accumulate, alpha),
        };
        let t = Tile { w: ptr, x: x.as_ptr(), k, n, out, accumulate, alpha };
        let mut r0 = 0;
        while r0 < m {
            // SAFETY (all arms): the features are enabled here; rows r0..r0 + R of x exist, and `covers`
            // checked that w holds n rows of k values of its format.
            unsafe {
                macro_rules! run {
                    ($r:literal) => {
                        match f {
                            BF16 => t.run::<$r, BF16>(r0, rows.clone()),
                            F16 => t.run::<$r, F16>(r0, rows.clone()),
                            Q8_0 => t.run::<$r, Q8_0>(r0, rows.clone()),
                            Q4_0 => t.run::<$r, Q4_0>(r0, rows.clone()),
                            _ => t.run::<$r, Q4_1>(r0, rows.clone()),
                        }
                    };
                }
                match m - r0 {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    _ => run!(4),
                }
            }
            r0 += 4;
        }
    }

    /// One task's product, with raw pointers (checked by the caller).
    struct Tile<'a> {
        w: *const u8,
        x: *const f32,
        k: usize,
        n: usize,
        out: &'a SendPtr,
        accumulate: bool,
        alpha: f32,
    }

    /// An f16 value (little-endian bits at `p`) as f32, with F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_at(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees two readable bytes at p.
        let bits = unsafe { p.cast::<u16>().read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Eight bf16 (`F` = BF16) or f16 values at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn expand8<const F: u8>(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes at p.
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            if F == BF16 {
                // bf16 is the top half of an f32: widen and shift into place.
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                _mm256_cvtph_ps(h)
            }
        }
    }

    /// The 32 values of the block at `p` (or the 32 bf16 / f16 values there), as four vectors of eight.
    /// `q * d` is exact in f32, so one fused multiply-add rounds like `dequantize_into`'s multiply-then-add.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn expand32<const F: u8>(p: *const u8) -> [__m256; 4] {
        // SAFETY: the caller guarantees that the block (or 64 bytes of values) at p is readable; every load
        // stays inside it (Q8_0: 34 bytes, scale + 32; Q4_0: 18, scale + 16; Q4_1: 20, scale, min + 16).
        unsafe {
            if F == BF16 || F == F16 {
                return [expand8::<F>(p), expand8::<F>(p.add(16)), expand8::<F>(p.add(32)), expand8::<F>(p.add(48))];
            }
            let d = _mm256_set1_ps(half_at(p));
            if F == Q8_0 {
                let f = |i: usize| {
                    let v = _mm_loadl_epi64(p.add(2 + i * 8).cast());
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d)
                };
                return [f(0), f(1), f(2), f(3)];
            }
            // (q - 8) d = q d - 8 d exactly: both products are exact and so is their difference.
            let (q, mn) = if F == Q4_0 {
                (_mm_loadu_si128(p.add(2).cast()), _mm256_mul_ps(d, _mm256_set1_ps(-8.0)))
            } else {
                (_mm_loadu_si128(p.add(4).cast()), _mm256_set1_ps(half_at(p.add(2))))
            };
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
            let f = |v: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), d, mn);
            [f(lo), f(_mm_srli_si128::<8>(lo)), f(hi), f(_mm_srli_si128::<8>(hi))]
        }
    }

    impl Tile<'_> {
        /// Rows `r0 .. r0 + R` of x against the weight rows `rows`: each block is expanded once for all R rows.
        /// Independent accumulation chains per row: four for one or two rows (the FMA latency would otherwise
        /// bound a single row), two for three or four (16 vector registers).
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn run<const R: usize, const F: u8>(&self, r0: usize, rows: std::ops::Range<usize>) {
            let nacc = if R <= 2 { 4 } else { 2 };
            let (k, n) = (self.k, self.n);
            let nb = k / QK;
            // Bytes per 32 values and per row.
            let bb = match F {
                Q8_0 => 34,
                Q4_0 => 18,
                Q4_1 => 20,
                _ => 64,
            };
            let half = F == BF16 || F == F16;
            let row_bytes = if half { k * 2 } else { nb * bb };
            // SAFETY: the caller checked that w holds n rows of row_bytes and x m rows of k floats; all loads
            // below stay inside row o of w and rows r0..r0 + R of x (prefetches may point anywhere).
            unsafe {
                for o in rows {
                    let wr = self.w.add(o * row_bytes);
                    let mut acc = [[_mm256_setzero_ps(); 4]; R];
                    for b in 0..nb {
                        let p = wr.add(b * bb);
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH).cast());
                        let v = expand32::<F>(p);
                        for (r, a) in acc.iter_mut().enumerate() {
                            let xr = self.x.add((r0 + r) * k + b * QK);
                            for (c, vc) in v.iter().enumerate() {
                                let i = c % nacc;
                                a[i] = _mm256_fmadd_ps(*vc, _mm256_loadu_ps(xr.add(c * 8)), a[i]);
                            }
                        }
                    }
                    // bf16 / f16 rows whose length is not a multiple of 32: eight at a time, then one at a time.
                    let mut c = nb * QK;
                    while half && c + 8 <= k {
                        let v = expand8::<F>(wr.add(c * 2));
                        for (r, a) in acc.iter_mut().enumerate() {
                            a[0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(self.x.add((r0 + r) * k + c)), a[0]);
                        }
                        c += 8;
                    }
                    for (r, a) in acc.iter().enumerate() {
                        let mut s = a[0];
                        for ai in a.iter().take(nacc).skip(1) {
                            s = _mm256_add_ps(s, *ai);
                        }
                        let mut v = crate::model::linalg::hsum8(s);
                        for i in c..k {
                            let bits = wr.add(i * 2).cast::<u16>().read_unaligned();
                            let wi = if F == BF16 {
                                half::bf16::from_bits(bits).to_f32()
                            } else {
                                half::f16::from_bits(bits).to_f32()
                            };
                            v += wi * *self.x.add((r0 + r) * k + i);
                        }
                        let p = self.out.0.add((r0 + r) * n + o);
                        *p = if self.accumulate { *p + self.alpha * v } else { self.alpha * v };
                    }
                }
            }
        }
    }
}

/// The Q8_0 / Q4_0 / Q4_1 decode kernels with AVX-512: a block expands into two registers of sixteen weights,
/// shared by up to eight rows of x. A 4-bit block's sixteen possible weights are one register (`q * d + m`, or
/// `(q - 8) * d`) and each nibble picks its weight with one permute. The f16 scales are read through a table of
/// every f16 value as f32 and broadcast from memory (load instructions only): converting and broadcasting them
/// in registers took four more shuffle-port instructions per block, the port the expansion itself is bound by,
/// and left the kernel slower than the packed copies' (f32 scales). The few scales a model uses keep their
/// table lines in the cache.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{GgmlType, QK, SendPtr};
    use std::arch::x86_64::*;

    /// Formats as const parameters of [`Tile::run`], so that each instantiation is straight-line code.
    const Q8_0: u8 = 0;
    const Q4_0: u8 = 1;
    const Q4_1: u8 = 2;

    /// How far ahead of the block being expanded the kernel prefetches (bytes; see `packed::PREFETCH`).
    const PREFETCH: usize = 2048;

    /// Every f16 bit pattern as f32 (256 KiB, built on first use).
    fn f16_table() -> &'static [f32] {
        static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| (0..=u16::MAX).map(|b| half::f16::from_bits(b).to_f32()).collect())
    }

    /// Weight rows `rows` of the `ty` blocks in `raw` against all rows of x, up to eight rows of x at a time.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk(
        ty: GgmlType,
        raw: &[u8],
        x: &[f32],
        m: usize,
        k: usize,
        rows: std::ops::Range<usize>,
        n: usize,
        out: &SendPtr,
        accumulate: bool,
        alpha: f32,
    ) {
        let f = match ty {
            GgmlType::Q8_0 => Q8_0,
            GgmlType::Q4_0 => Q4_0,
            _ => Q4_1,
        };
        let t = Tile { w: raw.as_ptr(), x: x.as_ptr(), k, n, out, accumulate, alpha, f16: f16_table().as_ptr() };
        let mut r0 = 0;
        while r0 < m {
            // SAFETY (all arms): the features are enabled here; rows r0..r0 + R of x exist, and the caller
            // checked that raw holds n rows of k values of its type.
            unsafe {
                macro_rules! run {
                    ($r:literal) => {
                        match f {
                            Q8_0 => t.run::<$r, Q8_0>(r0, rows.clone()),
                            Q4_0 => t.run::<$r, Q4_0>(r0, rows.clone()),
                            _ => t.run::<$r, Q4_1>(r0, rows.clone()),
                        }
                    };
                }
                match m - r0 {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    4 => run!(4),
                    5 => run!(5),
                    6 => run!(6),
                    7 => run!(7),
                    _ => run!(8),
                }
            }
            r0 += 8;
        }
    }

    /// One task's product, with raw pointers (checked by the caller).
    struct Tile<'a> {
        w: *const u8,
        x: *const f32,
        k: usize,
        n: usize,
        out: &'a SendPtr,
        accumulate: bool,
        alpha: f32,
        /// [`f16_table`].
        f16: *const f32,
    }

    /// The 32 values of the block at `p`, as two vectors of sixteen (values 0..16, 16..32), each exactly the
    /// f32 value `dequantize_into` gives: `q * d` is exact in f32 (4- or 8-bit q, f16 d), so one fused
    /// multiply-add rounds like its multiply-then-add. `f16`: [`f16_table`].
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn expand32<const F: u8>(p: *const u8, f16: *const f32) -> [__m512; 2] {
        // SAFETY: the caller guarantees that the block at p is readable (Q8_0: 34 bytes, scale + 32; Q4_0: 18,
        // scale + 16; Q4_1: 20, scale, minimum + 16); every load stays inside it, and the table has an entry
        // for every u16.
        unsafe {
            let scale = |at: usize| *f16.add(p.add(at).cast::<u16>().read_unaligned() as usize);
            let d = _mm512_set1_ps(scale(0));
            if F == Q8_0 {
                let f = |i: usize| {
                    let v = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2 + i * 16).cast()));
                    _mm512_mul_ps(_mm512_cvtepi32_ps(v), d)
                };
                return [f(0), f(1)];
            }
            let iota =
                _mm512_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0);
            let (table, q) = if F == Q4_0 {
                // (q - 8) * d: q - 8 is exact, and so is its product with d.
                (_mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0)), d), p.add(2))
            } else {
                (_mm512_fmadd_ps(iota, d, _mm512_set1_ps(scale(2))), p.add(4))
            };
            // Low nibbles are values 0..16, high nibbles 16..32; vpermps reads the low four bits of each index.
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.cast()));
            [_mm512_permutexvar_ps(v, table), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table)]
        }
    }

    impl Tile<'_> {
        /// Rows `r0 .. r0 + R` of x against the weight rows `rows`: each block is expanded once for all R rows,
        /// two accumulation chains per row.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn run<const R: usize, const F: u8>(&self, r0: usize, rows: std::ops::Range<usize>) {
            let (k, n) = (self.k, self.n);
            let nb = k / QK;
            let bb = match F {
                Q8_0 => 34,
                Q4_0 => 18,
                _ => 20,
            };
            // SAFETY: the caller checked that w holds n rows of nb blocks and x m rows of k floats; all loads
            // below stay inside row o of w and rows r0..r0 + R of x (prefetches may point anywhere).
            unsafe {
                for o in rows {
                    let wr = self.w.add(o * nb * bb);
                    let mut acc = [[_mm512_setzero_ps(); 2]; R];
                    for b in 0..nb {
                        let p = wr.add(b * bb);
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH).cast());
                        let w = expand32::<F>(p, self.f16);
                        for (r, a) in acc.iter_mut().enumerate() {
                            let xr = self.x.add((r0 + r) * k + b * QK);
                            a[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr), a[0]);
                            a[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr.add(16)), a[1]);
                        }
                    }
                    for (r, a) in acc.iter().enumerate() {
                        let v = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
                        let p = self.out.0.add((r0 + r) * n + o);
                        *p = if self.accumulate { *p + self.alpha * v } else { self.alpha * v };
                    }
                }
            }
        }
    }
}

/// Output columns per task of the portable int4 kernels: whole packed words of zeros (a multiple of 8), and a
/// tile of accumulators (`SMALL_M x INT4_COLS` f32) that stays in L1.
const INT4_COLS: usize = 64;

/// Output columns per task of the AVX2 int4 decode kernel: 1 KiB of each word row, so that each page of the
/// GPTQ layout (whose rows lie `out` words apart) is read a quarter at a time rather than a line.
const INT4_SPAN: usize = 256;

/// Row `o` of a GPTQ-layout int4 matrix (see [`Int4Matrix`]) dequantized into `out[..inp]`:
/// `scale * (q - zero)` of each input's group (`g_idx[i]`, act-order checkpoints, or `i / group`), exact in f32
/// (an f16 scale times an integer of at most 5 bits).
pub fn int4_row_into(w: &Int4Matrix, g_idx: Option<&[u32]>, o: usize, out: &mut [f32]) {
    let (n, zw) = (w.out, w.out / 8);
    for (i, v) in out[..w.inp].iter_mut().enumerate() {
        let g = g_idx.map_or(i / w.group, |g| g[i] as usize);
        let q = (w.qweight[(i / 8) * n + o] >> (4 * (i % 8))) & 15;
        let s = f16::from_bits(w.scales[g * n + o]).to_f32();
        let z = (w.qzeros[g * zw + o / 8] >> (4 * (o % 8))) & 15;
        *v = s * (q as f32 - z as f32);
    }
}

/// `out[m x n] (+)= alpha * x[m x k] * W^T` with `W` `[n x k]` a GPTQ-layout int4 matrix and `g_idx` its
/// act-order groups, if any. Decode (`m <= 8`) expands each packed word row (8 inputs of 64 outputs) in
/// registers and accumulates in f32 (AVX2 + FMA + F16C intrinsics where the CPU has them, a portable loop
/// otherwise); larger `m` expands tiles of weight rows and runs the f32 GEMM, as [`matmul_t`] does.
#[allow(clippy::too_many_arguments)]
pub fn int4_matmul_t(
    w: &Int4Matrix,
    g_idx: Option<&[u32]>,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    alpha: f32,
) {
    assert!(
        k == w.inp && n == w.out && x.len() >= m * k && out.len() >= m * n && g_idx.is_none_or(|g| g.len() == k),
        "int4 matmul: buffers or shapes do not match the matrix"
    );
    if m == 0 || n == 0 {
        return;
    }
    let op = SendPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let fast = g_idx.is_none()
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let fast = false;
    // The AVX2 decode kernel reads INT4_SPAN outputs of each word row; the others work in tiles of INT4_COLS.
    let width = if fast { INT4_SPAN } else { INT4_COLS };
    let work = |t: usize| {
        let cols = t * width..((t + 1) * width).min(n);
        if fast {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2, FMA and F16C were detected; the shapes were asserted above.
            unsafe {
                int4_decode_avx2(w, x, m, cols, &op, accumulate, alpha)
            };
        } else if m > SMALL_M {
            int4_gemm_tile(w, g_idx, x, m, cols, &op, accumulate, alpha);
        } else {
            int4_decode(w, g_idx, x, m, cols, &op, accumulate, alpha);
        }
    };
    if n * k * m >= 1 << 15 {
        (0..n.div_ceil(width)).into_par_iter().for_each(work);
    } else {
        (0..n.div_ceil(width)).for_each(work);
    }
}

/// Columns `cols` (at most [`INT4_SPAN`], a multiple of 8) of a decode product with AVX2, FMA and F16C, up to 4
/// rows of x at a time (see [`int4_avx2::span`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn int4_decode_avx2(
    w: &Int4Matrix,
    x: &[f32],
    m: usize,
    cols: std::ops::Range<usize>,
    out: &SendPtr,
    acc: bool,
    alpha: f32,
) {
    use int4_avx2::span;
    for r0 in (0..m).step_by(4) {
        let a = (w, x, r0, cols.clone(), out, acc, alpha);
        // SAFETY: the caller detected AVX2, FMA and F16C and asserted the shapes.
        unsafe {
            match (m - r0).min(4) {
                1 => span::<1>(a),
                2 => span::<2>(a),
                3 => span::<3>(a),
                _ => span::<4>(a),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod int4_avx2 {
    use super::{INT4_SPAN, Int4Matrix, SendPtr};
    use std::arch::x86_64::*;

    /// Packed word rows read ahead of the one being expanded.
    const PREFETCH_ROWS: usize = 4;

    /// The arguments of [`span`]: matrix, x, first row, outputs, out, accumulate, alpha.
    pub(super) type Args<'a> = (&'a Int4Matrix, &'a [f32], usize, std::ops::Range<usize>, &'a SendPtr, bool, f32);

    /// Outputs `cols` against rows `r0 .. r0 + R` of x, for groups `i / group` (a multiple of 8, so a packed word
    /// row lies in one group). Word row by word row (its `cols` words contiguous: whole cache lines, where the
    /// GPTQ layout puts the next row `out` words away), each word of 8 outputs is expanded in registers to its 8
    /// inputs' `(q - zero) * scale` (exact) and accumulated by FMA into the R rows' sums of those outputs; the
    /// group's scales (F16C) and zeros (one word per 8 outputs, shifted per lane) are reloaded at each new group.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn span<const R: usize>(args: Args) {
        const U: usize = INT4_SPAN / 8;
        let (w, x, r0, cols, out, acc, alpha) = args;
        let (n, k, o, units) = (w.out, w.inp, cols.start, cols.len() / 8);
        // SAFETY: the caller asserted the shapes: every word, scale and zero read lies in the matrix (cols within
        // 0 .. n, o a multiple of 8), x holds rows r0 .. r0 + R of k values, and out's rows hold n values of which
        // this task alone writes columns `cols`.
        unsafe {
            let mut sums = [[_mm256_setzero_ps(); U]; R];
            let (mut s, mut z) = ([_mm256_setzero_ps(); U], [_mm256_setzero_ps(); U]);
            let lanes = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            let nib = _mm256_set1_epi32(15);
            let mut group = usize::MAX;
            let (qw, sc, qz, xp) = (w.qweight.as_ptr(), w.scales.as_ptr(), w.qzeros.as_ptr(), x.as_ptr().add(r0 * k));
            for kk in 0..k / 8 {
                if kk + PREFETCH_ROWS < k / 8 {
                    let ahead = qw.add((kk + PREFETCH_ROWS) * n + o);
                    for line in (0..units * 8).step_by(16) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(line).cast());
                    }
                }
                let g = 8 * kk / w.group;
                if g != group {
                    group = g;
                    for u in 0..units {
                        s[u] = _mm256_cvtph_ps(_mm_loadu_si128(sc.add(g * n + o + 8 * u).cast()));
                        let zw = _mm256_set1_epi32(*qz.add(g * (n / 8) + o / 8 + u) as i32);
                        z[u] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(zw, lanes), nib));
                    }
                }
                let xs = xp.add(8 * kk);
                for u in 0..units {
                    let word = _mm256_loadu_si256(qw.add(kk * n + o + 8 * u).cast());
                    let mut a: [__m256; R] = std::array::from_fn(|r| sums[r][u]);
                    for j in 0..8 {
                        let q = _mm256_cvtepi32_ps(_mm256_and_si256(
                            _mm256_srl_epi32(word, _mm_cvtsi32_si128(4 * j as i32)),
                            nib,
                        ));
                        let wv = _mm256_mul_ps(_mm256_sub_ps(q, z[u]), s[u]);
                        for (r, ar) in a.iter_mut().enumerate() {
                            *ar = _mm256_fmadd_ps(_mm256_broadcast_ss(&*xs.add(r * k + j)), wv, *ar);
                        }
                    }
                    for (r, ar) in a.iter().enumerate() {
                        sums[r][u] = *ar;
                    }
                }
            }
            for (r, row) in sums.iter().enumerate() {
                for (u, &v) in row.iter().take(units).enumerate() {
                    let mut lane = [0f32; 8];
                    _mm256_storeu_ps(lane.as_mut_ptr(), v);
                    for (t, &a) in lane.iter().enumerate() {
                        let p = out.0.add((r0 + r) * n + o + 8 * u + t);
                        *p = if acc { *p + alpha * a } else { alpha * a };
                    }
                }
            }
        }
    }
}

/// Columns `cols` of a decode product: for each input, the tile's 64 weights expanded from their nibbles
/// (`scale * (q - zero)`, the group's scales and zeros reloaded when the group changes) and added, times the
/// input's value in each row of x, into f32 accumulators. Every loop runs over the whole tile (a partial tile
/// is padded with zero words and scales), so the compiler unrolls and vectorizes them.
#[allow(clippy::too_many_arguments)]
fn int4_decode(
    w: &Int4Matrix,
    g_idx: Option<&[u32]>,
    x: &[f32],
    m: usize,
    cols: std::ops::Range<usize>,
    out: &SendPtr,
    acc: bool,
    alpha: f32,
) {
    let (n, k, lo, width) = (w.out, w.inp, cols.start, cols.len());
    let mut sums = [[0f32; INT4_COLS]; SMALL_M];
    let (mut s, mut z, mut wv) = ([0f32; INT4_COLS], [0f32; INT4_COLS], [0f32; INT4_COLS]);
    let mut words = [0u32; INT4_COLS];
    let mut group = usize::MAX;
    for kk in 0..k / 8 {
        words[..width].copy_from_slice(&w.qweight[kk * n + lo..kk * n + lo + width]);
        for j in 0..8 {
            let i = 8 * kk + j;
            let g = g_idx.map_or(i / w.group, |g| g[i] as usize);
            if g != group {
                group = g;
                for t in 0..width {
                    let o = lo + t;
                    s[t] = f16::from_bits(w.scales[g * n + o]).to_f32();
                    z[t] = ((w.qzeros[g * (n / 8) + o / 8] >> (4 * (o % 8))) & 15) as f32;
                }
            }
            let shift = 4 * j as u32;
            for t in 0..INT4_COLS {
                wv[t] = s[t] * ((((words[t] >> shift) & 15) as i32) as f32 - z[t]);
            }
            for (row, sum) in sums.iter_mut().enumerate().take(m) {
                let xv = x[row * k + i];
                for t in 0..INT4_COLS {
                    sum[t] += xv * wv[t];
                }
            }
        }
    }
    for (r, sum) in sums.iter().enumerate().take(m) {
        for (t, &a) in sum[..width].iter().enumerate() {
            // SAFETY: out holds m x n floats (asserted by the caller) and this task writes only columns `cols`.
            unsafe {
                let p = out.0.add(r * n + lo + t);
                *p = if acc { *p + alpha * a } else { alpha * a };
            }
        }
    }
}

/// Columns `cols` of a large-m int4 product: the tile's weight rows dequantized, then the f32 GEMM.
#[allow(clippy::too_many_arguments)]
fn int4_gemm_tile(
    w: &Int4Matrix,
    g_idx: Option<&[u32]>,
    x: &[f32],
    m: usize,
    cols: std::ops::Range<usize>,
    out: &SendPtr,
    acc: bool,
    alpha: f32,
) {
    let (n, k, lo, hi) = (w.out, w.inp, cols.start, cols.end);
    expanded_gemm(x, m, k, n, cols, out, acc, alpha, |b| {
        // Word rows in order (contiguous along the output), each word's 8 inputs written together.
        for kk in 0..k / 8 {
            for (t, &word) in w.qweight[kk * n + lo..kk * n + hi].iter().enumerate() {
                let o = lo + t;
                for j in 0..8 {
                    let i = 8 * kk + j;
                    let g = g_idx.map_or(i / w.group, |g| g[i] as usize);
                    let s = f16::from_bits(w.scales[g * n + o]).to_f32();
                    let z = (w.qzeros[g * (n / 8) + o / 8] >> (4 * (o % 8))) & 15;
                    b[t * k + i] = s * (((word >> (4 * j)) & 15) as f32 - z as f32);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 reference: `alpha * x W^T` on the dequantized weights (`want`), plus the starting `out`.
    fn reference(w: Stored, x: &[f32], m: usize, k: usize, n: usize, start: &[f32], alpha: f32) -> Vec<f64> {
        let mut row = vec![0f32; k];
        let mut o = start.iter().map(|&v| v as f64).collect::<Vec<_>>();
        for c in 0..n {
            row_into(w, c, k, &mut row);
            for r in 0..m {
                let dot: f64 = (0..k).map(|i| x[r * k + i] as f64 * row[i] as f64).sum();
                o[r * n + c] += alpha as f64 * dot;
            }
        }
        o
    }

    /// Blocks of `ty` for `n x k` pseudo-random values, built byte by byte (scale as f16, then the quants).
    fn blocks(ty: GgmlType, n: usize, k: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for b in 0..n * k / QK {
            let d = half::f16::from_f32(0.01 + (b % 7) as f32 * 0.003);
            raw.extend_from_slice(&d.to_le_bytes());
            let q = |j: usize| ((b * 31 + j * 17) % 256) as u8;
            match ty {
                GgmlType::Q8_0 => raw.extend((0..32).map(q)),
                GgmlType::Q4_0 => raw.extend((0..16).map(q)),
                _ => {
                    raw.extend_from_slice(&half::f16::from_f32(-0.05 * (b % 3) as f32).to_le_bytes());
                    raw.extend((0..16).map(q));
                }
            }
        }
        raw
    }

    /// Every decode kernel this CPU can run (the detected one is what `matmul_t` picks).
    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if matches!(isa(), Isa::Avx2 | Isa::Avx512) {
                v.push(Isa::Avx2);
            }
            if isa() == Isa::Avx512 {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// `matmul_t` with the decode kernel `isa` at decode sizes (`m <= 8`), and `matmul_t` itself above.
    #[allow(clippy::too_many_arguments)]
    fn product_on(
        isa: Isa,
        w: Stored,
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        out: &mut [f32],
        acc: bool,
        alpha: f32,
    ) {
        if m > SMALL_M {
            return matmul_t(w, x, m, k, n, out, acc, alpha);
        }
        assert!(w.covers(n, k) && out.len() >= m * n);
        let op = SendPtr(out.as_mut_ptr());
        run_jobs(isa, x, m, k, &[Job { w, n, out: &op, accumulate: acc, alpha }]);
    }

    fn check(w: Stored, m: usize, k: usize, n: usize) {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32 * 0.25).collect();
        for isa in isas() {
            for (accumulate, alpha) in [(false, 1.0), (true, 0.5)] {
                let mut got = if accumulate { start.clone() } else { vec![f32::NAN; m * n] };
                product_on(isa, w, &x, m, k, n, &mut got, accumulate, alpha);
                let base = if accumulate { start.clone() } else { vec![0.0; m * n] };
                let want = reference(w, &x, m, k, n, &base, alpha);
                // f32 accumulation of k products of size <= ~2.5: a few ulp of the sum of magnitudes.
                for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - r).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + r.abs()),
                        "{w:?} {isa:?}: m={m} k={k} n={n} [{i}]: {g} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn half_kernels_match_an_f64_reference_at_odd_shapes() {
        // Every tile height (1..4, then a second tile), k with and without 32- and 8-wide tails, n not a
        // multiple of the 16-row tasks or the 64-row GEMM tiles; m = 9 takes the GEMM path.
        for &(k, n) in &[(37, 70), (64, 5), (96, 33), (13, 130), (7, 3)] {
            let vals: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0 + 1e-3 * i as f32).collect();
            let b: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
            let h: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
            for m in 1..=9 {
                check(Stored::Bf16(&b), m, k, n);
                check(Stored::F16(&h), m, k, n);
            }
        }
    }

    #[test]
    fn block_kernels_match_an_f64_reference_and_expand_like_the_dequantizer() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            for &(k, n) in &[(32, 70), (96, 33), (160, 5)] {
                let raw = blocks(ty, n, k);
                // 17, 32: the AVX-512 kernel in several passes of eight rows; 33: the GEMM path.
                for m in (1..=9).chain([17, 32, 33]) {
                    check(Stored::Blocks(ty, &raw), m, k, n);
                }
                // With x a unit vector, each output is one weight: the expansion is bit-identical to
                // dequantize_into's values.
                let mut all = vec![0f32; n * k];
                dequantize_into(ty, &raw, &mut all);
                for isa in isas() {
                    for i in [0, 1, 15, 16, 17, 31, k - 1] {
                        let mut x = vec![0f32; k];
                        x[i] = 1.0;
                        let mut got = vec![0f32; n];
                        product_on(isa, Stored::Blocks(ty, &raw), &x, 1, k, n, &mut got, false, 1.0);
                        for c in 0..n {
                            assert_eq!(got[c].to_bits(), all[c * k + i].to_bits(), "{ty:?} {isa:?} row {c} col {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn several_products_in_one_loop_match_one_at_a_time() {
        let k = 96;
        let (a, b, c) = (blocks(GgmlType::Q4_1, 19, k), blocks(GgmlType::Q8_0, 40, k), blocks(GgmlType::Q4_0, 7, k));
        let h: Vec<bf16> = (0..5 * k).map(|i| bf16::from_f32((i as f32 * 0.3).sin())).collect();
        for m in [1, 3, 8, 9, 20] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let ws = [
                (Stored::Blocks(GgmlType::Q4_1, &a), 19),
                (Stored::Blocks(GgmlType::Q8_0, &b), 40),
                (Stored::Blocks(GgmlType::Q4_0, &c), 7),
                (Stored::Bf16(&h), 5),
            ];
            let mut outs: Vec<Vec<f32>> = ws.iter().map(|(_, n)| vec![f32::NAN; m * n]).collect();
            let [o0, o1, o2, o3] = &mut outs[..] else { unreachable!() };
            matmul_t_many(
                &x,
                m,
                k,
                [(ws[0].0, 19, o0.as_mut_slice()), (ws[1].0, 40, o1), (ws[2].0, 7, o2), (ws[3].0, 5, o3)],
            );
            for ((w, n), got) in ws.iter().zip(&outs) {
                let mut want = vec![0f32; m * n];
                matmul_t(*w, &x, m, k, *n, &mut want, false, 1.0);
                assert_eq!(got, &want, "{w:?} m={m}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "buffers smaller than the shapes")]
    fn a_block_matrix_whose_rows_are_not_whole_blocks_is_refused() {
        let raw = blocks(GgmlType::Q8_0, 1, 64);
        matmul_t(Stored::Blocks(GgmlType::Q8_0, &raw), &[0.0; 48], 1, 48, 1, &mut [0.0], false, 1.0);
    }
}
